//! Weight sharing by k-means and Huffman coding.

use convpress::compress::huffman::{self, code_lengths};
use convpress::compress::share::{centroid_step, kmeans_linear, nearest};

fn lcg(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn kmeans_recovers_known_clusters_and_keeps_pruned_weights_at_zero() {
    let mut r = lcg(1);
    let centres = [-1.0f32, -0.2, 0.5, 2.0];
    let mut w = Vec::new();
    for i in 0..4000 {
        if i % 5 == 0 {
            w.push(0.0); // pruned
        } else {
            w.push(centres[i % 4] + 0.02 * (r() as f32 - 0.5));
        }
    }
    let book = kmeans_linear(&w, 2, 100).unwrap();
    for (c, want) in book.centroids.iter().zip(centres) {
        assert!((c - want).abs() < 0.01, "{:?}", book.centroids);
    }
    let decoded = book.decode();
    for (i, (&orig, &d)) in w.iter().zip(&decoded).enumerate() {
        if orig == 0.0 {
            assert_eq!(d, 0.0);
            assert!(book.assignment[i].is_none());
        } else {
            assert!((orig - d).abs() < 0.02);
        }
    }
}

#[test]
fn kmeans_starts_linear_and_refuses_impossible_settings() {
    // One iteration from linear initialisation on evenly spread data keeps the even grid.
    let w: Vec<f32> = (1..=64).map(|i| i as f32).collect();
    // Linear initialisation puts centroids at 1, 10, ..., 64; the first update takes the mean
    // of each one's nearest values: 1..=5 -> 3, 6..=14 -> 10, ..., 60..=64 -> 62.
    let book = kmeans_linear(&w, 3, 1).unwrap();
    assert_eq!(
        book.centroids,
        vec![3.0, 10.0, 19.0, 28.0, 37.0, 46.0, 55.0, 62.0]
    );
    assert!(kmeans_linear(&w, 0, 10).unwrap_err().contains("bits"));
    assert!(
        kmeans_linear(&w[..5], 3, 10)
            .unwrap_err()
            .contains("8 clusters")
    );
    assert!(kmeans_linear(&[0.0; 100], 1, 10).is_err());
    assert!(kmeans_linear(&[1.0, f32::NAN, 2.0, 3.0], 1, 10).is_err());
    assert_eq!(nearest(&[0.0, 1.0, 2.0], 1.4), 1);
    assert_eq!(nearest(&[0.0, 1.0, 2.0], 1.6), 2);
    assert_eq!(nearest(&[0.0, 1.0, 2.0], -5.0), 0);
    assert_eq!(nearest(&[0.0, 1.0, 2.0], 9.0), 2);
}

#[test]
fn centroid_gradient_is_the_sum_of_member_gradients() {
    let w = [1.0f32, 1.1, 0.0, 3.0, 2.9, 3.1];
    let book = kmeans_linear(&w, 1, 20).unwrap();
    let grads = [0.5f32, 0.25, 100.0, -1.0, -1.0, 1.0];
    let c = centroid_step(&book, &grads, 0.1);
    assert!((c[0] - (book.centroids[0] - 0.1 * 0.75)).abs() < 1e-6);
    assert!(
        (c[1] - (book.centroids[1] + 0.1)).abs() < 1e-6,
        "sum of member gradients is -1"
    );
}

#[test]
fn huffman_lengths_of_a_textbook_example() {
    // CLRS's example: a:45 b:13 c:12 d:16 e:9 f:5.
    assert_eq!(
        code_lengths(&[45, 13, 12, 16, 9, 5]),
        vec![1, 3, 3, 3, 4, 4]
    );
    assert_eq!(code_lengths(&[0, 7, 0]), vec![0, 1, 0]);
    assert_eq!(code_lengths(&[]), Vec::<u8>::new());
}

fn round_trip(symbols: &[u32], alphabet: usize) -> (u64, Vec<u8>) {
    let mut freqs = vec![0u64; alphabet];
    for &s in symbols {
        freqs[s as usize] += 1;
    }
    let lens = code_lengths(&freqs);
    let (bytes, bits) = huffman::encode(symbols, &lens).unwrap();
    assert_eq!(bytes.len() as u64, bits.div_ceil(8));
    let back = huffman::decode(&bytes, bits, symbols.len(), &lens).unwrap();
    assert_eq!(back, symbols);
    (bits, lens)
}

#[test]
fn huffman_round_trips_random_skewed_and_degenerate_streams() {
    let mut r = lcg(7);
    // Uniform over 32 symbols: 5 bits each.
    let uniform: Vec<u32> = (0..32 * 100).map(|i| (i % 32) as u32).collect();
    let (bits, _) = round_trip(&uniform, 32);
    assert_eq!(bits, 5 * uniform.len() as u64);
    // Random.
    let random: Vec<u32> = (0..10_000).map(|_| (r() * 256.0) as u32).collect();
    round_trip(&random, 256);
    // Skewed (geometric): within one bit of the entropy per symbol.
    let skewed: Vec<u32> = (0..20_000)
        .map(|_| {
            let mut k = 0;
            while r() < 0.5 && k < 30 {
                k += 1;
            }
            k
        })
        .collect();
    let (bits, _) = round_trip(&skewed, 32);
    let mut freqs = [0f64; 32];
    for &s in &skewed {
        freqs[s as usize] += 1.0;
    }
    let n = skewed.len() as f64;
    let entropy: f64 = freqs
        .iter()
        .filter(|&&f| f > 0.0)
        .map(|&f| -(f / n) * (f / n).log2())
        .sum();
    let per_symbol = bits as f64 / n;
    assert!(
        per_symbol >= entropy - 1e-9 && per_symbol < entropy + 1.0,
        "{per_symbol} vs {entropy}"
    );
    // One symbol only; empty stream.
    round_trip(&[3, 3, 3, 3], 4);
    round_trip(&[], 4);
    // Fibonacci frequencies would need codes longer than the cap: lengths are limited.
    let fib: Vec<u64> = (0..40)
        .scan((1u64, 1u64), |st, _| {
            let v = st.0;
            *st = (st.1, st.0 + st.1);
            Some(v)
        })
        .collect();
    let lens = code_lengths(&fib);
    assert!(lens.iter().all(|&l| l > 0 && l <= huffman::MAX_LEN));
    let kraft: f64 = lens.iter().map(|&l| 0.5f64.powi(l as i32)).sum();
    assert!(kraft <= 1.0 + 1e-12);
}

#[test]
fn huffman_refuses_damaged_input() {
    let lens = code_lengths(&[5, 3, 1, 1]);
    let (bytes, bits) = huffman::encode(&[0, 1, 2, 3, 0, 0], &lens).unwrap();
    assert!(
        huffman::decode(&bytes, bits + 64, 6, &lens).is_err(),
        "more bits than bytes"
    );
    assert!(
        huffman::decode(&bytes, bits, 7, &lens).is_err(),
        "more symbols than bits"
    );
    assert!(
        huffman::decode(&bytes, bits, 6, &[1, 1, 1, 1]).is_err(),
        "not a prefix code"
    );
    assert!(
        huffman::encode(&[9], &lens).is_err(),
        "symbol outside the alphabet"
    );
}

mod common;

#[test]
fn centroid_fine_tuning_keeps_each_layer_on_its_codebook() {
    use burn::prelude::Device;
    use convpress::checkpoint::named_tensors;
    use convpress::compress::share::finetune::ShareHook;
    use convpress::data::DatasetKind;
    use convpress::models::ModelKind;
    use convpress::train::{self, TrainConfig, TrainOptions};
    use std::collections::{BTreeMap, HashSet};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 640, 300, 28);
    let options = |name: &str| TrainOptions {
        run_dir: dir.path().join(name),
        device: Device::flex(),
        resume: false,
        progress_bar: false,
        verbose: false,
    };
    let mut c = TrainConfig::defaults(ModelKind::Lenet300, DatasetKind::Mnist);
    c.data_dir = data;
    c.epochs = 2;
    c.batch_size = 32;
    let dense = train::train(&c, vec![], &options("dense")).unwrap();

    // 3-bit codebooks for every weight matrix, with a third of the first layer pruned.
    let mut books = BTreeMap::new();
    for (path, _, d) in named_tensors(&dense.model) {
        if path.ends_with("weight") {
            let mut w: Vec<f32> = d.try_to_vec().unwrap();
            if path == "layers.1.weight" {
                for v in w.iter_mut().step_by(3) {
                    *v = 0.0;
                }
            }
            books.insert(path, kmeans_linear(&w, 3, 50).unwrap());
        }
    }
    let before: BTreeMap<String, Vec<f32>> = books
        .iter()
        .map(|(p, b)| (p.clone(), b.centroids.clone()))
        .collect();
    let shared = Arc::new(Mutex::new(books));
    c.init_from = Some(dense.model_path.clone());
    c.epochs = 1;
    c.optimizer = train::OptimizerConfig::Sgd {
        lr: 1e-3,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    let tuned = train::train(
        &c,
        vec![Box::new(ShareHook::new(shared.clone()))],
        &options("tuned"),
    )
    .unwrap();
    let books = shared.lock().unwrap();
    for (path, _, d) in named_tensors(&tuned.model) {
        let Some(book) = books.get(&path) else {
            continue;
        };
        let w: Vec<f32> = d.try_to_vec().unwrap();
        assert_eq!(
            w,
            book.decode(),
            "{path}: weights are exactly the decoded codebook"
        );
        let distinct: HashSet<u32> = w
            .iter()
            .filter(|v| **v != 0.0)
            .map(|v| v.to_bits())
            .collect();
        assert!(distinct.len() <= 8, "{path}: {} values", distinct.len());
        assert_ne!(
            book.centroids, before[&path],
            "{path}: centroids were trained"
        );
    }
    let zeros = named_tensors(&tuned.model)
        .into_iter()
        .find(|(p, _, _)| p == "layers.1.weight")
        .map(|(_, _, d)| {
            d.try_to_vec::<f32>()
                .unwrap()
                .iter()
                .step_by(3)
                .all(|&v| v == 0.0)
        })
        .unwrap();
    assert!(zeros, "pruned weights stay zero");
    assert!(
        tuned.metrics[0].test_acc > 0.8,
        "{}",
        tuned.metrics[0].test_acc
    );
}
