//! Quantized models end to end (issue #12): int8 convolutions against a float reference on
//! every instruction path, batch-norm folding, post-training quantization, and the version-2
//! `.cpz` file: bit-exact round trips, real size, sparse zeros, refusals of damaged files.

mod common;

use common::{pruned_checkpoint, reseal, uniform};
use convpress::checkpoint::{self, Loaded};
use convpress::compress::fold::fold_batch_norms;
use convpress::compress::format::{self, Encoding};
use convpress::compress::ptq::{PtqSettings, quantize_model};
use convpress::compress::quantize::{Calibration, Observer};
use convpress::data::ImageSet;
use convpress::kernels::int8;
use convpress::models::ModelKind;
use convpress::runtime::conv::{Conv2dKernel, ConvGeometry, DirectConv};
use convpress::runtime::int8::Int8Conv;
use convpress::runtime::model::SparseModel;
use std::collections::BTreeMap;

fn images(n: usize, shape: [usize; 3], seed: u64) -> ImageSet {
    let len: usize = shape.iter().product();
    ImageSet {
        n,
        channels: shape[0],
        height: shape[1],
        width: shape[2],
        pixels: uniform(n * len, seed, -1.0, 2.0),
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        classes: 10,
    }
}

fn settings(bits: u32) -> PtqSettings {
    PtqSettings {
        bits,
        calibration: Calibration::MinMax,
        layer_bits: BTreeMap::new(),
        weight_bits: None,
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// An int8 convolution equals, on every path this machine has, the float convolution of its
/// dequantized input and weights (up to the epilogue's f32 rounding), and every path gives the
/// same bits: padding, stride and dilation included.
#[test]
fn int8_convolutions_match_the_float_reference_on_every_path() {
    let cases = [
        ([3, 8, 3, 3], [1, 1], [1, 1], [1, 1], [9, 9]),
        ([1, 6, 5, 5], [0, 0], [1, 1], [1, 1], [12, 12]),
        ([4, 5, 3, 3], [2, 1], [2, 2], [1, 1], [11, 10]),
        ([2, 17, 3, 3], [2, 2], [1, 1], [2, 2], [8, 8]),
        // Even and 1-wide windows, and an output of fewer than 4 rows.
        ([3, 4, 2, 4], [1, 2], [1, 1], [1, 1], [7, 9]),
        ([16, 8, 1, 1], [0, 0], [2, 2], [1, 1], [6, 6]),
        ([2, 3, 3, 3], [0, 0], [1, 1], [1, 1], [3, 4]),
    ];
    for (n, &([cin, cout, kh, kw], padding, stride, dilation, hw)) in cases.iter().enumerate() {
        let g = ConvGeometry {
            in_channels: cin,
            out_channels: cout,
            kernel: [kh, kw],
            stride,
            padding,
            dilation,
            groups: 1,
        };
        let w = uniform(g.weight_len(), n as u64, -0.5, 0.5);
        let bias = uniform(cout, 100 + n as u64, -0.2, 0.2);
        let batch = if hw == [3, 4] { 1 } else { 3 };
        let x = uniform(batch * cin * hw[0] * hw[1], 200 + n as u64, -1.0, 3.0);
        let mut obs = Observer::default();
        obs.observe(&x).unwrap();
        let input = obs.quantizer(Calibration::MinMax, 8).unwrap();
        // 8-bit weights run on widened pairs; 7-bit ones, where the channels come in fours,
        // on `vpmaddubsw` quads read from the padded codes.
        for bits in [8, 7] {
            let conv = Int8Conv::new(g, &w, Some(bias.clone()), bits, input).unwrap();
            // On AVX-512 VNNI every weight runs as quads; on AVX2 7-bit ones do.
            match int8::Blocked::best() {
                Some(kb) if cin % 4 == 0 && (bits == 7 || kb.has_vnni()) => {
                    assert_eq!(conv.kernel_name(), kb.quads_name(), "case {n}")
                }
                _ => {}
            }
            let (codes, wq) = conv.weights();
            let per = g.patch_len();
            let w_hat: Vec<f32> = codes
                .iter()
                .enumerate()
                .map(|(i, &c)| wq[i / per].dequantize(c as i32))
                .collect();
            let x_hat: Vec<f32> = x.iter().map(|&v| input.round_trip(v)).collect();
            let reference = DirectConv::new(g, w_hat, Some(bias.clone())).unwrap();
            let out_hw = g.output_hw(hw).unwrap();
            let mut want = vec![0f32; batch * cout * out_hw[0] * out_hw[1]];
            reference.forward(&x_hat, batch, hw, &mut want);
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            let mut first: Option<Vec<f32>> = None;
            for path in int8::available() {
                let path: &'static dyn int8::Int8Gemm = Box::leak(path);
                let k = conv.clone().with_kernel(path);
                let mut got = vec![0f32; want.len()];
                k.forward(&x, batch, hw, &mut got);
                let d = max_abs_diff(&got, &want);
                assert!(
                    d <= 1e-4 * scale,
                    "case {n} on {}: {d} (scale {scale})",
                    path.name()
                );
                match &first {
                    None => first = Some(got),
                    Some(f) => assert_eq!(&got, f, "case {n}: {} differs", path.name()),
                }
            }
            // The layer as it runs by default (on AVX2: pairs read straight from the padded
            // input, no im2col) gives the same bits.
            let mut plain = vec![0f32; want.len()];
            conv.forward(&x, batch, hw, &mut plain);
            assert_eq!(
                Some(&plain),
                first.as_ref(),
                "case {n}: the default path differs"
            );
            // ReLU in the epilogue is ReLU after it.
            let mut fused = vec![0f32; want.len()];
            conv.clone().with_relu().forward(&x, batch, hw, &mut fused);
            let relu: Vec<f32> = plain.iter().map(|v| v.max(0.0)).collect();
            assert_eq!(fused, relu, "case {n}");
        }
    }
}

/// Folding batch norms into the convolutions before them leaves the network's function as it
/// was and removes them from the architecture.
#[test]
fn folding_batch_norms_keeps_the_function() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = pruned_checkpoint(ModelKind::Resnet20, [3, 16, 16], 0.3, dir.path());
    let loaded = checkpoint::read(&path).unwrap();
    let (folded, renamed) = fold_batch_norms(&loaded).unwrap();
    folded.check().unwrap();
    let kinds: Vec<&str> = folded.arch.layer_stats().iter().map(|s| s.kind).collect();
    assert!(!kinds.contains(&"batch_norm"), "{kinds:?}");
    assert!(renamed.len() > folded.arch.layer_stats().len() / 2);
    let x = uniform(2 * 3 * 16 * 16, 5, -2.0, 2.0);
    let a = SparseModel::from_loaded(&loaded).unwrap().forward(&x, 2);
    let b = SparseModel::from_loaded(&folded).unwrap().forward(&x, 2);
    let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    assert!(max_abs_diff(&a, &b) <= 1e-4 * scale);
}

/// Post-training quantization of a pruned ResNet-20 and a pruned LeNet-5: the file decodes to
/// exactly the quantized model, re-encodes to the same bytes, keeps the pruned zeros (stored
/// sparsely), spends `bits / 8` bytes per stored weight and less than a byte per position, and its int8 runtime gives the
/// float model's class scores within the quantization error.
#[test]
fn quantized_files_round_trip_bit_exactly_at_their_real_size() {
    for (kind, input, sparsity, bits) in [
        (ModelKind::Lenet5, [1, 28, 28], 0.9, 8),
        (ModelKind::Lenet5, [1, 28, 28], 0.0, 4),
        (ModelKind::Resnet20, [3, 16, 16], 0.5, 8),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (_, path) = pruned_checkpoint(kind, input, sparsity, dir.path());
        let float = checkpoint::read(&path).unwrap();
        let calib = images(32, input, 9);
        let q = quantize_model(&float, &settings(bits), &calib).unwrap();
        let (bytes, stages) = format::encode_quantized(&q.model).unwrap();
        let back: Loaded = format::decode(&bytes).unwrap();
        back.check().unwrap();
        assert_eq!(back.quant, q.model.quant, "{kind:?}");
        for (name, (data, _)) in &q.model.tensors {
            assert_eq!(back.tensors[name].0, *data, "{kind:?} {name}");
        }
        let (again, _) = format::encode_quantized(&back).unwrap();
        assert!(again == bytes, "{kind:?}: re-encoding changed the bytes");
        // Zeros stay zeros, and the pruned tensors are stored sparsely.
        let spec = q.model.quant.as_ref().unwrap();
        assert!(!spec.layers.is_empty());
        let entries = format::entries(&bytes).unwrap();
        for e in entries.iter().filter(|e| e.path.ends_with(".weight")) {
            let Encoding::Quantized { bits: b, gaps, .. } = &e.encoding else {
                panic!("{kind:?} {}: not quantized", e.path)
            };
            assert_eq!(*b, bits);
            if sparsity >= 0.9 {
                assert!(gaps.is_some(), "{kind:?} {}: dense codes", e.path);
            }
        }
        let weights: usize = stages
            .iter()
            .filter(|s| s.path.ends_with(".weight"))
            .map(|s| s.nnz)
            .sum();
        let weight_bytes: usize = stages
            .iter()
            .filter(|s| s.path.ends_with(".weight"))
            .map(|s| s.huffman)
            .sum();
        // The codes at their width, plus (sparse) under a byte per position, plus the steps.
        let ideal = weights * bits as usize / 8;
        let positions = if sparsity > 0.0 { weights } else { 0 };
        assert!(
            weight_bytes >= ideal && weight_bytes <= ideal + positions + 4096,
            "{kind:?}: {weight_bytes} bytes for {weights} weights at {bits} bits"
        );
        // The int8 runtime from the file equals the one from memory, and is close to float.
        let x = calib.pixels[..4 * calib.image_len()].to_vec();
        let from_file = SparseModel::from_loaded(&back).unwrap().forward(&x, 4);
        let from_memory = SparseModel::from_loaded(&q.model).unwrap().forward(&x, 4);
        assert_eq!(from_file, from_memory);
        let want = SparseModel::from_loaded(&float).unwrap().forward(&x, 4);
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let tol = if bits == 8 { 0.1 } else { 0.6 };
        assert!(
            max_abs_diff(&from_file, &want) <= tol * scale,
            "{kind:?} at {bits} bits: {} (scale {scale})",
            max_abs_diff(&from_file, &want)
        );
        let layers = SparseModel::from_loaded(&back).unwrap().layers();
        assert!(layers.iter().all(|l| l.kernel == "int8" && l.bits == bits));
    }
}

/// Int8 layers that hand the next int8 layer codes (requantized in their epilogue, through
/// max-pooling, ReLU and flattening on u8 codes channels last) give exactly the class scores of
/// the unfused model, where every layer gives floats and the next quantizes them again:
/// LeNet-5 (pooling, a flattened map into a linear layer) and ResNet-20 (padding, stride,
/// residual blocks), at batch sizes on both sides of the blocked kernel's.
#[test]
fn chained_int8_layers_equal_the_unfused_model() {
    for (kind, input, bits) in [
        (ModelKind::Lenet5, [1, 28, 28], 8),
        (ModelKind::Lenet5, [1, 28, 28], 7),
        (ModelKind::Lenet5, [1, 28, 28], 4),
        (ModelKind::Resnet20, [3, 16, 16], 8),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (_, path) = pruned_checkpoint(kind, input, 0.0, dir.path());
        let float = checkpoint::read(&path).unwrap();
        let calib = images(16, input, 4);
        let q = quantize_model(&float, &settings(bits), &calib).unwrap();
        let fused = SparseModel::from_loaded(&q.model).unwrap();
        let unfused = SparseModel::from_loaded_unfused(&q.model).unwrap();
        assert!(
            fused.layers().iter().any(|l| l.codes_out),
            "{kind:?}: nothing chained"
        );
        for batch in [1, 3, 16] {
            let x = calib.pixels[..batch * calib.image_len()].to_vec();
            let (a, b) = (fused.forward(&x, batch), unfused.forward(&x, batch));
            assert_eq!(a, b, "{kind:?} at {bits} bits, batch {batch}");
        }
    }
}

/// The same on a network built for the purpose: an odd channel count handed on as codes (the
/// next layer pads it to pairs), ReLU after max-pooling (run on the codes), a dilated and a
/// strided window, and a dense head; on the default kernels and forced onto the row-by-row
/// path (im2col rows from the codes put channels first again).
#[test]
fn chained_codes_cover_odd_channels_relu_on_codes_and_every_path() {
    use burn::prelude::*;
    use convpress::models::{Arch, LayerSpec, Network};
    let conv = |cin, cout, k, stride, padding, dilation| LayerSpec::Conv2d {
        in_channels: cin,
        out_channels: cout,
        kernel: [k, k],
        stride: [stride, stride],
        padding: [padding, padding],
        pad_extra: [0, 0],
        dilation: [dilation, dilation],
        groups: 1,
        bias: true,
    };
    let arch = Arch {
        name: "lenet5".into(),
        input: [3, 14, 14],
        classes: 10,
        layers: vec![
            conv(3, 5, 3, 1, 1, 1),
            LayerSpec::MaxPool {
                kernel: [2, 2],
                stride: [2, 2],
            },
            LayerSpec::Relu,
            conv(5, 6, 3, 1, 2, 2),
            LayerSpec::Relu,
            conv(6, 4, 3, 2, 1, 1),
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 4 * 4 * 4,
                out_features: 12,
                bias: true,
            },
            LayerSpec::Relu,
            LayerSpec::Linear {
                in_features: 12,
                out_features: 10,
                bias: true,
            },
        ],
    };
    arch.validate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("custom.safetensors");
    let device = Device::flex();
    device.seed(11);
    let mut meta = common::meta();
    meta.preprocess.mean = vec![0.0; 3];
    meta.preprocess.std = vec![1.0; 3];
    checkpoint::save(&path, &Network::new(&arch, &device).unwrap(), &meta).unwrap();
    let float = checkpoint::read(&path).unwrap();
    let calib = images(16, [3, 14, 14], 8);
    let q = quantize_model(&float, &settings(8), &calib).unwrap();
    let fused = SparseModel::from_loaded(&q.model).unwrap();
    let unfused = SparseModel::from_loaded_unfused(&q.model).unwrap();
    assert!(
        fused.layers().iter().filter(|l| l.codes_out).count() == 4,
        "{:?}",
        fused.layers()
    );
    assert!(unfused.layers().iter().all(|l| !l.codes_out));
    for batch in [1, 2, 16] {
        let x = calib.pixels[..batch * calib.image_len()].to_vec();
        assert_eq!(
            fused.forward(&x, batch),
            unfused.forward(&x, batch),
            "batch {batch}"
        );
    }
    // Every layer on each row-by-row path: the same scores again.
    let x = calib.pixels[..4 * calib.image_len()].to_vec();
    let want = unfused.forward(&x, 4);
    for path in int8::available() {
        let path: &'static dyn int8::Int8Gemm = Box::leak(path);
        let forced = fused.clone().with_int8_kernel(path);
        assert_eq!(forced.forward(&x, 4), want, "{}", path.name());
    }
}

/// Layers kept in float stay raw f32 and run on the float kernels.
#[test]
fn layers_kept_in_float_stay_float() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = pruned_checkpoint(ModelKind::Lenet5, [1, 28, 28], 0.0, dir.path());
    let float = checkpoint::read(&path).unwrap();
    let mut s = settings(8);
    s.layer_bits.insert("layers.0".into(), None);
    s.layer_bits.insert("layers.7".into(), Some(6));
    let q = quantize_model(&float, &s, &images(8, [1, 28, 28], 1)).unwrap();
    let spec = q.model.quant.as_ref().unwrap();
    assert!(!spec.layers.contains_key("layers.0"));
    assert_eq!(spec.layers["layers.7"].bits, 6);
    let (bytes, _) = format::encode_quantized(&q.model).unwrap();
    let layers = SparseModel::from_loaded(&format::decode(&bytes).unwrap())
        .unwrap()
        .layers();
    assert_eq!(layers[0].bits, 32);
    assert_ne!(layers[0].kernel, "int8");
    let last = layers.iter().find(|l| l.path == "layers.7").unwrap();
    assert_eq!((last.kernel, last.bits), ("int8", 6));
}

/// `weight_bits` narrows the weights of the layers that `layer_bits` does not name, and
/// leaves their inputs at `bits`; a named layer keeps its own width for both.
#[test]
fn weight_bits_narrow_only_the_layers_not_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = pruned_checkpoint(ModelKind::Lenet5, [1, 28, 28], 0.0, dir.path());
    let float = checkpoint::read(&path).unwrap();
    let mut s = settings(8);
    s.weight_bits = Some(7);
    s.layer_bits.insert("layers.7".into(), Some(8));
    let q = quantize_model(&float, &s, &images(8, [1, 28, 28], 3)).unwrap();
    let spec = q.model.quant.as_ref().unwrap();
    for (path, l) in &spec.layers {
        assert_eq!(
            (l.input.hi, l.input.bits()),
            (255, 8),
            "{path}: 8-bit inputs"
        );
        let want = if path == "layers.7" { 8 } else { 7 };
        assert_eq!(l.bits, want, "{path}");
    }
    // The file keeps both widths.
    let (bytes, _) = format::encode_quantized(&q.model).unwrap();
    assert_eq!(format::decode(&bytes).unwrap().quant, q.model.quant);
}

/// What the method refuses, before any work: a model already quantized, an empty
/// calibration set, bit widths outside 2..=8, a layer that is not a conv or linear one.
#[test]
fn bad_quantization_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = pruned_checkpoint(ModelKind::Lenet5, [1, 28, 28], 0.0, dir.path());
    let float = checkpoint::read(&path).unwrap();
    let calib = images(4, [1, 28, 28], 2);
    for bits in [0, 1, 9, 16] {
        let e = quantize_model(&float, &settings(bits), &calib).unwrap_err();
        assert!(e.contains("bits"), "{bits}: {e}");
    }
    let e = quantize_model(&float, &settings(8), &images(0, [1, 28, 28], 2)).unwrap_err();
    assert!(e.contains("at least one image"), "{e}");
    let mut s = settings(8);
    s.layer_bits.insert("layers.1".into(), Some(8));
    let e = quantize_model(&float, &s, &calib).unwrap_err();
    assert!(e.contains("layers.1"), "{e}");
    let mut all_float = settings(8);
    for l in ["layers.0", "layers.2", "layers.5", "layers.7"] {
        all_float.layer_bits.insert(l.into(), None);
    }
    let e = quantize_model(&float, &all_float, &calib).unwrap_err();
    assert!(e.contains("nothing to quantize"), "{e}");
    let q = quantize_model(&float, &settings(8), &calib).unwrap();
    let e = quantize_model(&q.model, &settings(8), &calib).unwrap_err();
    assert!(e.contains("already quantized"), "{e}");
}

/// Damaged quantized files with a valid checksum (what a fuzzer reaches): decoding returns an
/// error or a model, never panics; flipped bytes are caught by the checksum. Also writes the
/// fuzz seed (`CONVPRESS_WRITE_SEEDS=1`), a small quantized file.
#[test]
fn damaged_quantized_files_are_refused_never_a_panic() {
    // A tiny model (the fuzzer's seed stays under its 8 KiB inputs): conv + batch norm + ReLU,
    // pooling, a linear layer; half its weights zero, so both dense and gap-coded codes occur.
    use convpress::models::{Arch, LayerSpec, Network};
    let arch = Arch {
        name: "tiny".into(),
        input: [1, 6, 6],
        classes: 10,
        layers: vec![
            LayerSpec::Conv2d {
                in_channels: 1,
                out_channels: 4,
                kernel: [3, 3],
                stride: [1, 1],
                padding: [1, 1],
                pad_extra: [0, 0],
                dilation: [1, 1],
                groups: 1,
                bias: false,
            },
            LayerSpec::BatchNorm { features: 4 },
            LayerSpec::Relu,
            LayerSpec::MaxPool {
                kernel: [2, 2],
                stride: [2, 2],
            },
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 36,
                out_features: 10,
                bias: true,
            },
        ],
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    let device = burn::prelude::Device::flex();
    checkpoint::save(
        &path,
        &Network::seeded(&arch, &device, 5).unwrap(),
        &common::meta(),
    )
    .unwrap();
    let mut float = checkpoint::read(&path).unwrap();
    for (name, (data, _)) in float.tensors.iter_mut() {
        if name == "layers.5.weight" {
            let shape = data.shape().to_vec();
            let mut v: Vec<f32> = data.clone().try_to_vec().unwrap();
            v.iter_mut().step_by(2).for_each(|w| *w = 0.0);
            *data = burn::tensor::TensorData::new(v, shape);
        }
    }
    let q = quantize_model(&float, &settings(4), &images(4, [1, 6, 6], 3)).unwrap();
    let (bytes, _) = format::encode_quantized(&q.model).unwrap();
    format::decode(&bytes).unwrap();
    assert!(bytes.len() < 8192, "{} bytes", bytes.len());
    if std::env::var_os("CONVPRESS_WRITE_SEEDS").is_some() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        std::fs::write(seeds.join("quantized-tiny-4bit.cpz"), &bytes).unwrap();
    }
    let mut flipped = bytes.clone();
    flipped[100] ^= 4;
    assert!(format::decode(&flipped).unwrap_err().contains("checksum"));
    // Resealed damage: refused, or a model that the runtime builds and runs without a panic.
    let refused = common::resealed_damages(&bytes, 12345, 2000, 4);
    assert!(
        refused > 100,
        "only {refused} of 2000 resealed damages refused"
    );
    // A version-1 file cannot hold quantized tensors.
    let mut v1 = bytes.clone();
    v1[4] = 1;
    let e = format::decode(&reseal(v1)).unwrap_err();
    assert!(e.contains("version-1"), "{e}");
}
