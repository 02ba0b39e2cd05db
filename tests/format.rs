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
        let (bytes, stages) = format::encode(&arch, &meta(), payloads, None).unwrap();
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
    let (bytes, _) = format::encode(&arch, &meta(), payloads, None).unwrap();

    let e = format::decode(&bytes[..bytes.len() - 1]).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
    let e = format::decode(&bytes[..10]).unwrap_err();
    assert!(e.contains("too short"), "{e}");
    let mut v4 = bytes.clone();
    v4[4] = 4;
    assert!(format::decode(&v4).unwrap_err().contains("version 4"));
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
    let (bytes, _) = format::encode(&arch, &meta(), payloads, None).unwrap();
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
        let (bytes, stages) = format::encode(&arch, &meta(), payloads, None).unwrap();
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
    let mut damaged = format::encode(&random_model(&mut rng).0, &meta(), vec![], None)
        .unwrap()
        .0;
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    assert!(format::stages(&damaged).is_err());
}

/// Small models for the fuzzer's seed corpus (`fuzz/seeds/`): one per kind of section (raw,
/// shared, shared with escape-coded gaps) and of layer (conv, batch norm, linear, residual).
fn seed_models() -> Vec<(&'static str, Model)> {
    use convpress::models::{Arch, LayerSpec};
    let linear = |i, o| LayerSpec::Linear {
        in_features: i,
        out_features: o,
        bias: true,
    };
    let raw = |path: &str, shape: Vec<usize>, v: Vec<f32>| (path.to_string(), shape, v);
    // (name, arch, [(path, shape, values, Some((bits, gap_bits)) if shared)])
    type Spec = (
        &'static str,
        Arch,
        Vec<(String, Vec<usize>, Vec<f32>, Option<(u32, u32)>)>,
    );
    let with = |(p, s, v): (String, Vec<usize>, Vec<f32>), share| (p, s, v, share);
    let specs: Vec<Spec> = vec![
        (
            "mlp-raw",
            Arch {
                name: "tiny".into(),
                input: [1, 2, 2],
                classes: 2,
                layers: vec![LayerSpec::Flatten, linear(4, 2)],
            },
            vec![
                with(
                    raw(
                        "layers.1.weight",
                        vec![4, 2],
                        vec![0.5, -0.25, 0.0, 1.0, 2.0, 0.0, -1.5, 0.125],
                    ),
                    None,
                ),
                with(raw("layers.1.bias", vec![2], vec![0.1, -0.1]), None),
            ],
        ),
        (
            "conv-bn-shared",
            Arch {
                name: "tiny".into(),
                input: [1, 6, 6],
                classes: 3,
                layers: vec![
                    LayerSpec::Conv2d {
                        in_channels: 1,
                        out_channels: 2,
                        kernel: [3, 3],
                        stride: [1, 1],
                        padding: [0, 0],
                        pad_extra: [0, 0],
                        dilation: [1, 1],
                        groups: 1,
                        bias: true,
                    },
                    LayerSpec::BatchNorm { features: 2 },
                    LayerSpec::Relu,
                    LayerSpec::MaxPool {
                        kernel: [2, 2],
                        stride: [2, 2],
                    },
                    LayerSpec::Flatten,
                    linear(8, 3),
                ],
            },
            vec![
                with(
                    raw(
                        "layers.0.weight",
                        vec![2, 1, 3, 3],
                        vec![
                            -0.5, 0.0, 0.25, 0.75, 0.0, 0.0, -0.5, 0.25, 0.75, 0.0, 0.0, 0.0, 0.25,
                            0.25, -0.5, 0.0, 0.75, 0.0,
                        ],
                    ),
                    Some((2, 2)),
                ),
                with(raw("layers.0.bias", vec![2], vec![0.01, -0.02]), None),
                with(raw("layers.1.gamma", vec![2], vec![1.0, 0.9]), None),
                with(raw("layers.1.beta", vec![2], vec![0.0, 0.1]), None),
                with(raw("layers.1.running_mean", vec![2], vec![0.2, -0.3]), None),
                with(raw("layers.1.running_var", vec![2], vec![1.1, 0.8]), None),
                with(
                    raw(
                        "layers.5.weight",
                        vec![8, 3],
                        (0..24).map(|i| [0.0, 0.5, -0.5][i % 3]).collect(),
                    ),
                    Some((1, 3)),
                ),
                with(raw("layers.5.bias", vec![3], vec![0.0, 0.5, -0.5]), None),
            ],
        ),
        (
            "residual-escapes",
            Arch {
                name: "tiny".into(),
                input: [1, 4, 4],
                classes: 2,
                layers: vec![
                    LayerSpec::Flatten,
                    linear(16, 4),
                    LayerSpec::Residual {
                        body: vec![LayerSpec::Relu, linear(4, 4)],
                        shortcut: vec![],
                    },
                    linear(4, 2),
                ],
            },
            vec![
                // Long runs of zeros with 2 gap bits: escapes.
                with(
                    raw(
                        "layers.1.weight",
                        vec![16, 4],
                        (0..64)
                            .map(|i| match i {
                                3 => 0.5,
                                20 => -0.25,
                                21 => 0.125,
                                47 => 1.0,
                                63 => -1.0,
                                _ => 0.0,
                            })
                            .collect(),
                    ),
                    Some((2, 2)),
                ),
                with(raw("layers.1.bias", vec![4], vec![0.0; 4]), None),
                with(
                    raw(
                        "layers.2.body.1.weight",
                        vec![4, 4],
                        (0..16)
                            .map(|i| if i % 5 == 0 { 1.0 } else { 0.0 })
                            .collect(),
                    ),
                    Some((1, 2)),
                ),
                with(raw("layers.2.body.1.bias", vec![4], vec![0.5; 4]), None),
                with(
                    raw(
                        "layers.3.weight",
                        vec![4, 2],
                        vec![1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 2.0, -2.0],
                    ),
                    None,
                ),
                with(raw("layers.3.bias", vec![2], vec![0.0, 0.0]), None),
            ],
        ),
    ];
    specs
        .into_iter()
        .map(|(name, arch, tensors)| {
            let mut payloads = Vec::new();
            let mut expected = Vec::new();
            for (path, shape, values, share) in tensors {
                match share {
                    None => {
                        expected.push(values.clone());
                        payloads.push((path, shape, TensorPayload::Raw(values)));
                    }
                    Some((bits, gap_bits)) => {
                        let book = kmeans_linear(&values, bits, 20).unwrap();
                        expected.push(book.decode());
                        payloads.push((
                            path,
                            shape,
                            TensorPayload::Shared {
                                centroids: book.centroids,
                                assignment: book.assignment,
                                bits,
                                gap_bits,
                            },
                        ));
                    }
                }
            }
            (name, (arch, payloads, expected))
        })
        .collect()
}

/// The fuzzer's seeds are real, current files: each decodes to its model, and is exactly what
/// the encoder writes today. `CONVPRESS_WRITE_SEEDS=1` rewrites them after a format change.
#[test]
fn fuzz_seeds_are_current_files_that_decode() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let write = std::env::var_os("CONVPRESS_WRITE_SEEDS").is_some();
    let mut total = 0;
    for (name, (arch, payloads, expected)) in seed_models() {
        let paths: Vec<String> = payloads.iter().map(|p| p.0.clone()).collect();
        arch.validate().unwrap();
        let (bytes, _) = format::encode(&arch, &meta(), payloads, None).unwrap();
        let back = format::decode(&bytes).unwrap();
        assert_eq!(back.arch, arch);
        for (path, want) in paths.iter().zip(&expected) {
            let got: Vec<f32> = back.tensors[path].0.clone().try_to_vec().unwrap();
            assert_eq!(&got, want, "{name}: {path}");
        }
        let file = dir.join(format!("{name}.cpz"));
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&file, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&file).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (CONVPRESS_WRITE_SEEDS=1 writes it)",
                file.display()
            )
        });
        assert!(
            on_disk == bytes,
            "{name}: seed is stale; rerun with CONVPRESS_WRITE_SEEDS=1"
        );
        total += bytes.len();
    }
    assert!(total < 100_000, "seeds stay small: {total} bytes");
}

/// A file around a hand-written JSON header and the section bytes after it, with a valid
/// length and checksum: what a fuzzer reaches once it gets past the checksum.
fn sealed(header: serde_json::Value, sections: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(&header).unwrap();
    let mut body = (header.len() as u32).to_le_bytes().to_vec();
    body.extend_from_slice(&header);
    body.extend_from_slice(sections);
    let mut out = b"CVPZ\x01\x00\x00\x00".to_vec();
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// An empty shared tensor (no non-zero entry): 14 bytes of section, any number of values.
fn empty_shared(path: &str, shape: &[usize]) -> (serde_json::Value, Vec<u8>) {
    let entry = serde_json::json!({
        "path": path, "shape": shape, "encoding": "shared", "bits": 1, "gap_bits": 2,
        "nnz": 0, "gap_symbols": 0, "gap_stream_bits": 0, "index_stream_bits": 0,
    });
    // Two centroids, two index code lengths, four gap code lengths, empty streams.
    (entry, vec![0; 8 + 2 + 4])
}

/// Found while reviewing the reader for the fuzzer (`fuzz/`; it did not reach these in its
/// runs): layer sizes whose products overflow `usize`. With overflow checks on (the fuzz
/// build) the reader panicked; in a release build the counts wrapped around, so a model of
/// 2^64 weights passed the size limit (its count wrapped to 0) and a 2^68-value feature map
/// passed as 16 values.
#[test]
fn architectures_whose_sizes_overflow_are_refused() {
    let huge = 1usize << 32;
    // An input of 2^30 values (the largest an architecture may take) and a linear layer of
    // 2^30 x 2^34 = 2^64 weights.
    let arch = serde_json::json!({
        "name": "tiny", "input": [1, 32768, 32768], "classes": 1usize << 34,
        "layers": [
            {"type": "flatten"},
            {"type": "linear", "in_features": 1usize << 30, "out_features": 1usize << 34, "bias": false},
        ],
    });
    let meta = serde_json::to_value(meta()).unwrap();
    let file = sealed(
        serde_json::json!({"arch": arch, "meta": meta, "tensors": []}),
        &[],
    );
    let e = format::decode(&file).unwrap_err();
    assert!(e.contains("more than"), "{e}");
    // Shapes that overflow inside a layer: a window span, a feature map, padding.
    for (input, layer) in [
        (
            [1, 4, 4],
            serde_json::json!({"type": "conv2d", "in_channels": 1, "out_channels": 1,
                "kernel": [usize::MAX, 1], "stride": [1, 1], "padding": [0, 0],
                "dilation": [2, 1], "bias": false}),
        ),
        // 2^68 values per image, 16 after wrapping around.
        ([huge, huge, 16], serde_json::json!({"type": "relu"})),
        (
            [1, 4, 4],
            serde_json::json!({"type": "conv2d", "in_channels": 1, "out_channels": 1,
                "kernel": [1, 1], "stride": [1, 1], "padding": [usize::MAX / 2 + 1, 0],
                "bias": false}),
        ),
        ([huge, huge, huge], serde_json::json!({"type": "relu"})),
    ] {
        let arch = serde_json::json!({
            "name": "tiny", "input": input, "classes": 2,
            "layers": [layer, {"type": "flatten"},
                {"type": "linear", "in_features": 16, "out_features": 2, "bias": false}],
        });
        let file = sealed(
            serde_json::json!({"arch": arch, "meta": meta.clone(), "tensors": []}),
            &[],
        );
        let r = std::panic::catch_unwind(|| format::decode(&file).map(|_| ()));
        let e = r.expect("no panic").unwrap_err();
        assert!(e.contains("architecture is inconsistent"), "{e}");
    }
}

/// Each tensor was bounded by the architecture, but not all of them together: a file of a
/// few hundred bytes could declare any number of empty shared tensors as large as the whole
/// model, and the reader allocated every one. The values of all tensors together are now
/// bounded by the model's parameters and batch-norm statistics.
#[test]
fn tensors_together_cannot_exceed_the_architecture() {
    let arch = convpress::models::ModelKind::Lenet300
        .arch([1, 28, 28], 10)
        .unwrap();
    let n = arch.num_params();
    let meta = serde_json::to_value(meta()).unwrap();
    let file = |count: usize, numel: usize| {
        let (mut entries, mut sections) = (Vec::new(), Vec::new());
        for i in 0..count {
            let (e, s) = empty_shared(&format!("t{i}"), &[numel]);
            entries.push(e);
            sections.extend(s);
        }
        sealed(
            serde_json::json!({"arch": arch, "meta": meta.clone(), "tensors": entries}),
            &sections,
        )
    };
    // The whole model in one tensor, or in two halves: fine.
    assert!(format::decode(&file(1, n)).is_ok());
    assert!(format::decode(&file(2, n / 2)).is_ok());
    // One value more, or the model twice over: refused, before the second is allocated.
    let e = format::decode(&file(1, n + 1)).unwrap_err();
    assert!(e.contains("does not fit the architecture"), "{e}");
    let e = format::decode(&file(100, n)).unwrap_err();
    assert!(e.contains("t1: shape") && e.contains("does not fit"), "{e}");
}
