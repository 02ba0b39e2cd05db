//! The compressed model file: encode -> decode is the identity on pruned, shared layers, and
//! damaged files are refused without panics.

use convpress::checkpoint::ModelMeta;
use convpress::compress::format::{self, TensorPayload};
use convpress::compress::prune::level_mask;
use convpress::compress::share::kmeans_linear;
use convpress::data::{DatasetKind, Preprocess};
use convpress::models::ModelKind;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn meta() -> ModelMeta {
    ModelMeta {
        dataset: DatasetKind::Mnist,
        preprocess: Preprocess {
            pad: 0,
            resize: None,
            resize_mode: Default::default(),
            mean: vec![0.13],
            std: vec![0.31],
        },
        info: serde_json::json!({}),
    }
}

/// The tensors to write, in order, and the values each must decode to.
type Model = (
    convpress::models::Arch,
    Vec<(String, Vec<usize>, TensorPayload)>,
    Vec<Vec<f32>>,
);

/// LeNet-300's tensors, weights replaced by random sparse quantised layers.
fn random_model(rng: &mut Rng) -> Model {
    let arch = ModelKind::Lenet300.arch([1, 28, 28], 10).unwrap();
    let shapes = [
        ("layers.1.bias", vec![300]),
        ("layers.1.weight", vec![784, 300]),
        ("layers.3.bias", vec![100]),
        ("layers.3.weight", vec![300, 100]),
        ("layers.5.bias", vec![10]),
        ("layers.5.weight", vec![100, 10]),
    ];
    let mut payloads = Vec::new();
    let mut expected = Vec::new();
    for (path, shape) in shapes {
        let n: usize = shape.iter().product();
        if path.ends_with("bias") {
            let v: Vec<f32> = (0..n).map(|_| rng.unit() - 0.5).collect();
            expected.push(v.clone());
            payloads.push((path.to_string(), shape, TensorPayload::Raw(v)));
            continue;
        }
        let bits = 1 + rng.below(6) as u32;
        let gap_bits = 2 + rng.below(6) as u32;
        let sparsity = [0.0, 0.5, 0.9, 0.98][rng.below(4) as usize];
        let mut w: Vec<f32> = (0..n).map(|_| rng.unit() - 0.5).collect();
        let keep = level_mask(&w, sparsity).unwrap();
        for (v, k) in w.iter_mut().zip(keep) {
            if !k {
                *v = 0.0;
            }
        }
        // A long run of zeros, so escapes are exercised.
        let start = rng.below(n as u64 / 2) as usize;
        w[start..start + n / 4].fill(0.0);
        let nnz = w.iter().filter(|&&v| v != 0.0).count();
        let bits = bits.min(nnz.max(2).ilog2());
        let book = kmeans_linear(&w, bits, 20).unwrap();
        expected.push(book.decode());
        payloads.push((
            path.to_string(),
            shape,
            TensorPayload::Shared {
                centroids: book.centroids,
                assignment: book.assignment,
                bits,
                gap_bits,
            },
        ));
    }
    (arch, payloads, expected)
}

#[test]
fn encode_then_decode_is_the_identity() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..8 {
        let (arch, payloads, expected) = random_model(&mut rng);
        let paths: Vec<String> = payloads.iter().map(|p| p.0.clone()).collect();
        let (bytes, stages) = format::encode(&arch, &meta(), payloads).unwrap();
        let back = format::decode(&bytes).unwrap();
        assert_eq!(back.arch, arch);
        assert_eq!(back.meta, meta());
        for (path, want) in paths.iter().zip(&expected) {
            let got: Vec<f32> = back.tensors[path].0.clone().try_to_vec().unwrap();
            assert_eq!(got.len(), want.len());
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{path}"
            );
        }
        // Huffman never costs more than the fixed-width shared form (plus its tables).
        for s in stages {
            assert!(s.huffman <= s.shared + (1 << 16) + 256, "{}", s.path);
        }
    }
}

#[test]
fn damaged_files_are_refused_with_a_reason() {
    let mut rng = Rng(99);
    let (arch, payloads, _) = random_model(&mut rng);
    let (bytes, _) = format::encode(&arch, &meta(), payloads).unwrap();

    let e = format::decode(&bytes[..bytes.len() - 1]).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
    let e = format::decode(&bytes[..10]).unwrap_err();
    assert!(e.contains("too short"), "{e}");
    let mut v2 = bytes.clone();
    v2[4] = 2;
    assert!(format::decode(&v2).unwrap_err().contains("version 2"));
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(format::decode(&bad).unwrap_err().contains("magic"));
    // Any flipped byte is caught by the checksum.
    for _ in 0..200 {
        let mut b = bytes.clone();
        let i = 16 + rng.below((b.len() - 20) as u64) as usize;
        b[i] ^= 1 << rng.below(8);
        let e = format::decode(&b).unwrap_err();
        assert!(e.contains("checksum"), "{e}");
    }
}

/// What a fuzzer would try: damaged bodies with a valid checksum. Decoding must return an
/// error or a model, never panic or allocate without bound.
#[test]
fn damaged_bodies_with_valid_checksums_never_panic() {
    let mut rng = Rng(7);
    let (arch, payloads, _) = random_model(&mut rng);
    let (bytes, _) = format::encode(&arch, &meta(), payloads).unwrap();
    let reseal = |mut b: Vec<u8>| {
        let n = b.len();
        let body_len = (n - 20) as u64;
        b[8..16].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32fast::hash(&b[..n - 4]);
        b[n - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    };
    let mut errors = 0;
    for round in 0..400 {
        let mut b = bytes.clone();
        match round % 3 {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let i = 16 + rng.below((b.len() - 20) as u64) as usize;
                    b[i] = rng.next() as u8;
                }
            }
            1 => {
                let cut = 20 + rng.below((b.len() - 24) as u64) as usize;
                b.truncate(cut);
                b.extend_from_slice(&[0; 4]);
            }
            _ => {
                // Inside the JSON header: change a digit.
                let hlen = u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize;
                let i = 20 + rng.below(hlen as u64) as usize;
                if b[i].is_ascii_digit() {
                    b[i] = b'0' + rng.below(10) as u8;
                }
            }
        }
        let b = reseal(b);
        let r = std::panic::catch_unwind(|| format::decode(&b).map(|_| ()));
        match r {
            Ok(Err(_)) => errors += 1,
            Ok(Ok(())) => {}
            Err(_) => panic!("decode panicked on round {round}"),
        }
    }
    assert!(errors > 100, "most damage is detected: {errors}");
}

/// `convpress info` reads the stage sizes back from the file: they equal what the encoder
/// reported, and the Huffman stage is what the tensors really take in the file.
#[test]
fn stage_sizes_read_back_from_the_file_match_the_encoder() {
    let mut rng = Rng(0x0bad_cafe_f00d_1234);
    for _ in 0..4 {
        let (arch, payloads, _) = random_model(&mut rng);
        let (bytes, stages) = format::encode(&arch, &meta(), payloads).unwrap();
        let back = format::stages(&bytes).unwrap();
        assert_eq!(back.len(), stages.len());
        for (a, b) in stages.iter().zip(&back) {
            assert_eq!(
                (a.numel, a.nnz, a.dense, a.sparse, a.shared, a.huffman),
                (b.numel, b.nnz, b.dense, b.sparse, b.shared, b.huffman),
                "{}",
                a.path
            );
        }
        let sections: usize = back.iter().map(|s| s.huffman).sum();
        assert!(sections < bytes.len() && bytes.len() - sections < 4096);
    }
    let mut damaged = format::encode(&random_model(&mut rng).0, &meta(), vec![])
        .unwrap()
        .0;
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    assert!(format::stages(&damaged).is_err());
}
