//! Kernel rescaling: the spatial scaling property of convolution, kernel resampling, the
//! low-resolution twins of the zoo, and a short rescaled run on real MNIST.

mod common;

use burn::prelude::*;
use convpress::checkpoint::{Tensors, load_tensors, tensor_map};
use convpress::data::DatasetKind;
use convpress::models::{ModelKind, Network};
use convpress::rescale::interp::{Interp, rescale_plane};
use convpress::rescale::phases::{self, OptimizerState, RescaleConfig, Switch};
use convpress::rescale::{KernelRule, low_res_twin, rescale_tensors};
use convpress::train::{OptimizerConfig, TrainConfig, TrainOptions};
use std::f64::consts::PI;
use std::process::Command;

/// Half resolution, bicubic, round-rule twin: the settings these tests share.
fn half_scale(switch: Switch, optimizer: OptimizerState) -> RescaleConfig {
    RescaleConfig {
        scale: 0.5,
        switch,
        interp: Interp::Bicubic,
        kernels: KernelRule::Round,
        optimizer,
    }
}

/// Circular cross-correlation `y[p] = sum_q w[q] x[p + q]` of an `n x n` image (periodic, so no
/// border effects blur the comparison).
fn correlate(x: &[f32], n: usize, w: &[f32], k: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            let mut acc = 0f32;
            for a in 0..k {
                for b in 0..k {
                    acc += w[a * k + b] * x[((i + a) % n) * n + (j + b) % n];
                }
            }
            y[i * n + j] = acc;
        }
    }
    y
}

/// Halves an image by averaging 2x2 blocks.
fn shrink(x: &[f32], n: usize) -> Vec<f32> {
    let m = n / 2;
    let mut y = vec![0f32; m * m];
    for i in 0..m {
        for j in 0..m {
            y[i * m + j] = 0.25
                * (x[2 * i * n + 2 * j]
                    + x[2 * i * n + 2 * j + 1]
                    + x[(2 * i + 1) * n + 2 * j]
                    + x[(2 * i + 1) * n + 2 * j + 1]);
        }
    }
    y
}

fn smooth_image(n: usize) -> Vec<f32> {
    (0..n * n)
        .map(|p| {
            let (i, j) = ((p / n) as f64, (p % n) as f64);
            let t = 2.0 * PI / n as f64;
            ((2.0 * t * i).sin() + (3.0 * t * j).cos() + 0.5 * (t * (i + j)).sin()) as f32
        })
        .collect()
}

fn gaussian(k: usize, sigma: f64) -> Vec<f32> {
    let c = (k as f64 - 1.0) / 2.0;
    (0..k * k)
        .map(|p| {
            let (i, j) = ((p / k) as f64 - c, (p % k) as f64 - c);
            (-(i * i + j * j) / (2.0 * sigma * sigma)).exp() as f32
        })
        .collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn mean_abs(a: &[f32]) -> f64 {
    a.iter().map(|v| v.abs() as f64).sum::<f64>() / a.len() as f64
}

/// conv(shrink(x), rescale(w)) ≈ shrink(conv(x, w)) within 5% (relative L2), for smooth x and
/// w, with both interpolations; without the amplitude correction it is 4x off.

#[test]
fn convolution_commutes_with_shrinking_up_to_the_amplitude_correction() {
    let n = 64;
    let x = smooth_image(n);
    // A smooth kernel, not symmetric (a ramp times a Gaussian), 8x8 so s = 0.5 is exact.
    let w: Vec<f32> = gaussian(8, 1.8)
        .iter()
        .enumerate()
        .map(|(p, g)| g * (1.0 + 0.1 * (p % 8) as f32))
        .collect();
    // Output p of the full correlation reads pixels centred on p + 4, output i of the
    // low-resolution one full-resolution centres around 2i + 4: compare with every other
    // full output.
    let y = correlate(&x, n, &w, 8);
    let reference: Vec<f32> = (0..n * n / 4)
        .map(|p| y[2 * (p / (n / 2)) * n + 2 * (p % (n / 2))])
        .collect();
    for interp in [Interp::Bilinear, Interp::Bicubic] {
        let w_low = rescale_plane(&w, [8, 8], [4, 4], interp);
        let low = correlate(&shrink(&x, n), n / 2, &w_low, 4);
        let e = rel_err(&reference, &low);
        eprintln!("{interp:?}: commute relative error {e}");
        assert!(e < 0.03, "{interp:?}: relative error {e}");
        let ratio = mean_abs(&low) / mean_abs(&reference);
        assert!((ratio - 1.0).abs() < 0.05, "{interp:?}: scale {ratio}");
    }
}

/// Going up (what training does at the switch): the full-size kernel on the full image gives
/// the activations the low-resolution kernel gave on the shrunk image, at the same scale.
#[test]
fn rescaled_kernels_keep_the_activation_scale() {
    let n = 64;
    let x = smooth_image(n);
    let w_low = gaussian(3, 0.8);
    let low = correlate(&shrink(&x, n), n / 2, &w_low, 3);
    for interp in [Interp::Bilinear, Interp::Bicubic] {
        let w_full = rescale_plane(&w_low, [3, 3], [6, 6], interp);
        let full = correlate(&x, n, &w_full, 6);
        let ratio = mean_abs(&shrink(&full, n)) / mean_abs(&low);
        assert!((ratio - 1.0).abs() < 0.1, "{interp:?}: scale {ratio}");
        // Without the correction the response grows by the tap ratio (36 / 9 = 4).
        let raw = convpress::rescale::interp::resample(&w_low, [3, 3], [6, 6], interp);
        let ratio = mean_abs(&correlate(&x, n, &raw, 6)) / mean_abs(&low);
        assert!(ratio > 3.0, "{interp:?}: uncorrected scale {ratio}");
    }
}

#[test]
fn smooth_kernels_survive_down_then_up() {
    for interp in [Interp::Bilinear, Interp::Bicubic] {
        let w = gaussian(9, 2.0);
        let down = rescale_plane(&w, [9, 9], [5, 5], interp);
        let back = rescale_plane(&down, [5, 5], [9, 9], interp);
        let e = rel_err(&w, &back);
        eprintln!("{interp:?}: down-up relative error {e}");
        assert!(e < 0.15, "{interp:?}: relative error {e}");
    }
}

fn tensors_of(net: &Network) -> Tensors {
    tensor_map(net)
}

#[test]
fn twins_of_the_zoo_build_run_and_load_back_into_the_full_models() {
    let device = Device::flex();
    let cases = [
        (ModelKind::Lenet5, [1, 28, 28], KernelRule::Round),
        (ModelKind::Lenet300, [1, 28, 28], KernelRule::Round),
        (ModelKind::VggSmall, [3, 32, 32], KernelRule::Odd),
        (ModelKind::Resnet20, [1, 32, 32], KernelRule::Odd),
        // 3x3 -> 2x2: "same" padding becomes (0, 1), and the residual shapes still agree.
        (ModelKind::Resnet20, [1, 32, 32], KernelRule::Round),
    ];
    for (model, input, rule) in cases {
        let full = model.arch(input, 10).unwrap();
        let twin = low_res_twin(&full, 0.5, rule).unwrap();
        assert_eq!(twin.input, [input[0], input[1] / 2, input[2] / 2]);
        assert!(twin.flops() * 2 < full.flops(), "{}", full.name);
        let net = Network::new(&twin, &device).unwrap();
        let x = Tensor::<4>::ones([2, twin.input[0], twin.input[1], twin.input[2]], &device);
        assert_eq!(net.forward(x).dims(), [2, 10]);
        let tensors = rescale_tensors(&twin, &full, &tensors_of(&net), Interp::Bicubic).unwrap();
        let big = load_tensors(Network::new(&full, &device).unwrap(), tensors)
            .unwrap_or_else(|e| panic!("{}: {e}", full.name));
        let x = Tensor::<4>::ones([2, input[0], input[1], input[2]], &device);
        let out: Vec<f32> = big.forward(x).into_data().try_to_vec().unwrap();
        assert!(out.iter().all(|v| v.is_finite()));
    }
    // LeNet-5's twin: 5x5 kernels become 3x3, fc1 reads 50x2x2 instead of 50x4x4.
    let twin = low_res_twin(
        &ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap(),
        0.5,
        KernelRule::Round,
    )
    .unwrap();
    assert!(matches!(
        twin.layers[0],
        convpress::models::LayerSpec::Conv2d { kernel: [3, 3], .. }
    ));
    assert!(matches!(
        twin.layers[5],
        convpress::models::LayerSpec::Linear {
            in_features: 200,
            ..
        }
    ));
}

/// The dense layer reading a flattened map is rescaled as a kernel: a twin whose fc1 weights
/// are constant per channel becomes a full model whose fc1 weights are constant per channel,
/// at a quarter of the amplitude (2x2 -> 4x4 taps).
#[test]
fn dense_layers_on_flattened_maps_are_rescaled_like_kernels() {
    let device = Device::flex();
    let full = ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap();
    let twin = low_res_twin(&full, 0.5, KernelRule::Round).unwrap();
    let mut t = tensors_of(&Network::new(&twin, &device).unwrap());
    let (_, id) = t["layers.5.weight"].clone();
    // [in = 50 * 2 * 2, out = 500]: value = channel index + 1.
    let w: Vec<f32> = (0..200 * 500).map(|p| ((p / 500) / 4 + 1) as f32).collect();
    t.insert(
        "layers.5.weight".into(),
        (TensorData::new(w, [200, 500]), id),
    );
    let out = rescale_tensors(&twin, &full, &t, Interp::Bilinear).unwrap();
    let big: Vec<f32> = out["layers.5.weight"].0.try_to_vec().unwrap();
    assert_eq!(out["layers.5.weight"].0.shape().to_vec(), vec![800, 500]);
    for (p, v) in big.iter().enumerate() {
        let want = ((p / 500) / 16 + 1) as f32 / 4.0;
        assert!(
            (v - want).abs() < 1e-5,
            "feature {}: {v} vs {want}",
            p / 500
        );
    }
}

#[test]
fn impossible_rescalings_are_refused_with_the_layer_named() {
    let lenet5 = ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap();
    for s in [0.0, 1.0, 1.5, f64::NAN] {
        let e = low_res_twin(&lenet5, s, KernelRule::Round).unwrap_err();
        assert!(e.contains("(0, 1)"), "{e}");
    }
    let e = low_res_twin(&lenet5, 0.1, KernelRule::Round).unwrap_err();
    assert!(e.contains("layers.") && e.contains("larger"), "{e}");
    let vgg = ModelKind::VggSmall.arch([3, 32, 32], 10).unwrap();
    // 32 -> 4 pixels: the second max-pooling (layers.13) leaves no map for the third.
    let e = low_res_twin(&vgg, 0.125, KernelRule::Round).unwrap_err();
    assert!(e.contains("layers."), "{e}");
    assert!(low_res_twin(&vgg, 0.5, KernelRule::Round).is_ok());
    // Even twin kernels keep "same" maps with one extra row and column of padding after them.
    let resnet = ModelKind::Resnet20.arch([1, 32, 32], 10).unwrap();
    let twin = low_res_twin(&resnet, 0.5, KernelRule::Round).unwrap();
    assert!(matches!(
        twin.layers[0],
        convpress::models::arch::LayerSpec::Conv2d {
            kernel: [2, 2],
            padding: [0, 0],
            pad_extra: [1, 1],
            ..
        }
    ));

    let mut c = TrainConfig::defaults(ModelKind::Lenet5, DatasetKind::Mnist);
    c.epochs = 4;
    let rc = |switch| half_scale(switch, OptimizerState::Reset);
    for epoch in [0, 4, 9] {
        let e = phases::check(&c, &rc(Switch::Epoch { epoch })).unwrap_err();
        assert!(e.contains("--rescale-at"), "{e}");
    }
    assert!(phases::check(&c, &rc(Switch::Epoch { epoch: 3 })).is_ok());
}

#[test]
fn bad_rescaling_flags_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 200, 50, 28);
    for (flags, needle) in [
        (vec!["--rescale-from", "1.5"], "(0, 1)"),
        (
            vec!["--rescale-from", "0.5", "--rescale-at", "7"],
            "--rescale-at",
        ),
        (
            vec!["--rescale-from", "0.5", "--rescale-at", "soon"],
            "--rescale-at",
        ),
        (vec!["--rescale-from", "0.05"], "larger"),
    ] {
        let run = dir.path().join("run");
        let out = Command::new(env!("CARGO_BIN_EXE_convpress"))
            .args(["train", "--model", "lenet5", "--epochs", "3", "--data-dir"])
            .arg(&data)
            .arg("--run-dir")
            .arg(&run)
            .args(&flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{flags:?}: {err}"
        );
        assert!(!run.exists(), "{flags:?} wrote {}", run.display());
    }
}

/// Needs the real MNIST (CI runs it): one low-resolution epoch, rescale, one full epoch.
#[test]
fn a_short_rescaled_lenet5_run_learns_real_mnist() {
    let dir = common::real_mnist();
    let run = tempfile::tempdir().unwrap();
    let mut c = TrainConfig::defaults(ModelKind::Lenet5, DatasetKind::Mnist);
    c.data_dir = dir;
    c.epochs = 2;
    c.train_limit = Some(6000);
    c.test_limit = Some(2000);
    c.optimizer = OptimizerConfig::Sgd {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    let rc = half_scale(Switch::Epoch { epoch: 1 }, OptimizerState::Reset);
    let out = phases::train_rescaled(
        &c,
        &rc,
        &TrainOptions {
            run_dir: run.path().join("run"),
            device: Device::flex(),
            resume: false,
            progress_bar: false,
            verbose: false,
        },
    )
    .unwrap();
    assert_eq!(out.switch_epoch, 1);
    assert_eq!(out.timeline.len(), 2);
    assert_eq!(out.timeline[0].phase, "low");
    let acc = out.final_acc();
    assert!(acc >= 0.90, "rescaled LeNet-5: {acc}");
    assert!(run.path().join("run/rescale.json").is_file());
    // The rescaled checkpoint describes full-resolution input, so `eval` can read it.
    let rescaled =
        convpress::checkpoint::read(&run.path().join("run/rescaled.safetensors")).unwrap();
    assert_eq!(rescaled.arch.input, [1, 28, 28]);
    assert_eq!(
        rescaled.meta.preprocess.output_shape([1, 28, 28]),
        rescaled.arch.input
    );
}

#[test]
fn rescale_compare_runs_both_schedules_per_seed_and_plots_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 300, 100, 28);
    let out_dir = dir.path().join("cmp");
    let out = Command::new(env!("CARGO_BIN_EXE_convpress"))
        .args([
            "rescale-compare",
            "--model",
            "lenet5",
            "--epochs",
            "2",
            "--seeds",
            "1,2",
            "--rescale-at",
            "1",
            "--no-progress",
            "--data-dir",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("mean ± std") && text.contains("saved"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("compare.json")).unwrap())
            .unwrap();
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        assert_eq!(r["baseline"].as_array().unwrap().len(), 2);
        assert_eq!(r["rescaled"][0][1]["switch_epoch"], 1);
    }
    let svg = std::fs::read_to_string(out_dir.join("compare.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("rescaled at 1, seed 2"));
    for run in [
        "baseline-seed1",
        "rescaled-at1-seed1/low-res",
        "rescaled-at1-seed2/full-res",
    ] {
        assert!(
            out_dir.join(run).join("model.safetensors").is_file(),
            "{run}"
        );
    }
}

#[test]
fn kernel_rules_round_or_take_the_nearest_odd_size() {
    let sizes = [1, 2, 3, 5, 7, 9, 11];
    let at_half = |rule: KernelRule| sizes.map(|k| rule.apply(k, 0.5));
    assert_eq!(at_half(KernelRule::Round), [1, 1, 2, 3, 4, 5, 6]);
    assert_eq!(at_half(KernelRule::Odd), [1, 1, 1, 3, 3, 5, 5]);
    assert_eq!(KernelRule::Odd.apply(3, 0.75), 3);
}

#[test]
fn carried_optimizer_state_is_rescaled_like_the_weights_and_loads_into_the_full_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 256, 64, 28);
    let mut c = TrainConfig::defaults(ModelKind::Lenet5, DatasetKind::Mnist);
    c.data_dir = data;
    c.epochs = 2;
    let rc = half_scale(Switch::Epoch { epoch: 1 }, OptimizerState::Carry);
    let run = dir.path().join("run");
    let options = TrainOptions {
        run_dir: run.clone(),
        device: Device::flex(),
        resume: false,
        progress_bar: false,
        verbose: false,
    };
    // The full-resolution phase steps with the carried state: shapes that did not fit would
    // fail there.
    let out = phases::train_rescaled(&c, &rc, &options).unwrap();
    assert_eq!(out.timeline.len(), 2);
    let full = convpress::checkpoint::read(&run.join("rescaled.safetensors")).unwrap();
    let low = convpress::checkpoint::read(&run.join("low-res/model.safetensors")).unwrap();
    let shape_of = |t: &Tensors| -> std::collections::HashMap<u64, (String, Vec<usize>)> {
        t.iter()
            .filter_map(|(p, (d, id))| id.map(|id| (id.val(), (p.clone(), d.shape().to_vec()))))
            .collect()
    };
    let (full_shapes, low_shapes) = (shape_of(&full.tensors), shape_of(&low.tensors));
    let before =
        burn_pack::Reader::from_file(run.join("low-res/checkpoints/epoch-0001/optimizer.bpk"))
            .unwrap()
            .into_tensors()
            .unwrap();
    let after = burn_pack::Reader::from_file(run.join("rescaled-optimizer.bpk"))
        .unwrap()
        .into_tensors()
        .unwrap();
    assert_eq!(before.len(), after.len());
    assert!(!after.is_empty());
    let mut kernels = 0;
    for t in after {
        let (name, _, shape, id, bytes) = t.into_parts().unwrap();
        let (path, full_shape) = &full_shapes[&id.unwrap()];
        assert_eq!(shape.to_vec(), *full_shape, "{name} ({path})");
        let low_shape = &low_shapes[&id.unwrap()].1;
        if low_shape != full_shape {
            kernels += 1;
            // A real carried direction, not zeros.
            assert!(floats(&bytes).iter().any(|x| *x != 0.0), "{name}");
        }
    }
    // conv1, conv2 and fc1 (which reads the flattened map) change shape.
    assert_eq!(kernels, 3);
}

/// Little-endian `f32`s from a state tensor's bytes.
fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
