//! Structured (filter) pruning: channel groups across residual additions, physically smaller
//! models that compute what the original computed on the channels they keep.

mod common;

use burn::prelude::*;
use convpress::checkpoint::{self, Tensors, load_tensors, tensor_map};
use convpress::compress::structured::{self, Analysis, Criterion, Target};
use convpress::models::{Arch, LayerSpec, ModelKind, Network};
use rand::{Rng, SeedableRng};
use std::process::Command;

fn tensors_of(net: &Network) -> Tensors {
    tensor_map(net)
}

fn build(arch: &Arch, tensors: Tensors, device: &Device) -> Network {
    load_tensors(Network::new(arch, device).unwrap(), tensors).unwrap()
}

fn edit(tensors: &mut Tensors, name: &str, f: impl FnOnce(&mut Vec<f32>, &[usize])) {
    let (data, id) = tensors
        .get(name)
        .unwrap_or_else(|| panic!("{name}"))
        .clone();
    let shape = data.shape().to_vec();
    let mut v: Vec<f32> = data.try_to_vec().unwrap();
    f(&mut v, &shape);
    tensors.insert(name.into(), (TensorData::new(v, shape), id));
}

fn logits(net: &Network, x: &Tensor<4>) -> Vec<f32> {
    net.forward(x.clone()).into_data().try_to_vec().unwrap()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * scale, "logit {i}: {x} vs {y}");
    }
}

fn random_input(arch: &Arch, batch: usize, device: &Device) -> Tensor<4> {
    let [c, h, w] = arch.input;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let v: Vec<f32> = (0..batch * c * h * w)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_data(TensorData::new(v, [batch, c, h, w]), device)
}

#[test]
fn resnet20_groups_follow_the_residual_additions() {
    let arch = ModelKind::Resnet20.arch([1, 32, 32], 10).unwrap();
    let a = Analysis::new(&arch).unwrap();
    let prunable: Vec<_> = a.prunable().map(|g| &a.groups[g]).collect();
    // Nine residual bodies' inner convolutions, plus one group per stage that ties the stem or
    // projection shortcut to the three blocks' second convolutions.
    assert_eq!(prunable.len(), 12);
    let coupled: Vec<_> = prunable.iter().filter(|g| g.coupled()).collect();
    assert_eq!(coupled.len(), 3);
    for g in &coupled {
        assert_eq!(g.producers.len(), 4, "{:?}", g.producers);
    }
    assert!(coupled[0].producers.contains(&"layers.0".to_string()));
    for (g, shortcut) in [(1, "layers.9.shortcut.0"), (2, "layers.15.shortcut.0")] {
        assert!(
            coupled[g].producers.contains(&shortcut.to_string()),
            "{:?}",
            coupled[g].producers
        );
    }
    // The classifier's outputs and the model input are never pruned.
    assert!(
        a.groups
            .iter()
            .any(|g| g.fixed.as_deref() == Some("class scores"))
    );
    assert!(
        a.groups
            .iter()
            .any(|g| g.fixed.as_deref() == Some("model input"))
    );
}

/// Channels whose batch-norm scale and shift are zero contribute nothing, in any branch of a
/// residual addition; removing exactly those (ranked by |γ|) must leave the logits unchanged.
#[test]
fn resnet20_without_its_dead_channels_computes_the_same_logits() {
    let device = Device::flex();
    let arch = ModelKind::Resnet20.arch([1, 32, 32], 10).unwrap();
    device.seed(5);
    let net = Network::new(&arch, &device).unwrap();
    let mut tensors = tensors_of(&net);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let names: Vec<String> = tensors.keys().cloned().collect();
    for name in names {
        let dead = |v: &mut Vec<f32>, rng: &mut rand::rngs::StdRng, live: (f32, f32)| {
            let half = v.len() / 2;
            for (i, x) in v.iter_mut().enumerate() {
                *x = if i < half {
                    0.0
                } else {
                    rng.random_range(live.0..live.1)
                };
            }
        };
        if name.ends_with(".gamma") {
            edit(&mut tensors, &name, |v, _| dead(v, &mut rng, (0.5, 1.5)));
        } else if name.ends_with(".beta") {
            edit(&mut tensors, &name, |v, _| dead(v, &mut rng, (-0.2, 0.2)));
        } else if name.ends_with(".running_mean") {
            edit(&mut tensors, &name, |v, _| {
                v.iter_mut().for_each(|x| *x = rng.random_range(-0.1..0.1))
            });
        } else if name.ends_with(".running_var") {
            edit(&mut tensors, &name, |v, _| {
                v.iter_mut().for_each(|x| *x = rng.random_range(0.5..2.0))
            });
        }
    }
    let full = build(&arch, tensors.clone(), &device);
    let target = Target {
        ratio: 0.5,
        criterion: Criterion::BnGamma,
        skip_coupled: false,
    };
    let pruned = structured::prune(&arch, &tensors, &target).unwrap();
    assert!(pruned.arch.num_params() < arch.num_params() / 3);
    assert!(pruned.arch.flops() < arch.flops() / 3);
    let small = build(&pruned.arch, pruned.tensors, &device);
    let x = random_input(&arch, 3, &device);
    assert_close(&logits(&full, &x), &logits(&small, &x), 1e-4);
}

/// LeNet-5 has no batch norm: zero filters (and zero hidden neurons) are the dead ones, and
/// the L1 ranking must find them, through the flatten into the first dense layer.
#[test]
fn lenet5_without_its_zero_filters_and_neurons_computes_the_same_logits() {
    let device = Device::flex();
    let arch = ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap();
    device.seed(6);
    let net = Network::new(&arch, &device).unwrap();
    let mut tensors = tensors_of(&net);
    // Odd-numbered filters of both convolutions and of fc1 are zero, bias included.
    for conv in ["layers.0", "layers.2"] {
        edit(&mut tensors, &format!("{conv}.weight"), |v, s| {
            let per: usize = s[1..].iter().product();
            for c in (1..s[0]).step_by(2) {
                v[c * per..(c + 1) * per].fill(0.0);
            }
        });
        edit(&mut tensors, &format!("{conv}.bias"), |v, _| {
            v.iter_mut().skip(1).step_by(2).for_each(|x| *x = 0.0)
        });
    }
    edit(&mut tensors, "layers.5.weight", |v, s| {
        for i in 0..s[0] {
            for o in (1..s[1]).step_by(2) {
                v[i * s[1] + o] = 0.0;
            }
        }
    });
    edit(&mut tensors, "layers.5.bias", |v, _| {
        v.iter_mut().skip(1).step_by(2).for_each(|x| *x = 0.0)
    });
    let full = build(&arch, tensors.clone(), &device);
    for criterion in [Criterion::L1, Criterion::L2] {
        let target = Target {
            ratio: 0.5,
            criterion,
            skip_coupled: false,
        };
        let pruned = structured::prune(&arch, &tensors, &target).unwrap();
        let widths: Vec<usize> = pruned
            .arch
            .layers
            .iter()
            .filter_map(|l| match l {
                LayerSpec::Conv2d { out_channels, .. } => Some(*out_channels),
                LayerSpec::Linear { out_features, .. } => Some(*out_features),
                _ => None,
            })
            .collect();
        assert_eq!(widths, vec![10, 25, 250, 10]);
        let small = build(&pruned.arch, pruned.tensors, &device);
        let x = random_input(&arch, 4, &device);
        assert_close(&logits(&full, &x), &logits(&small, &x), 1e-4);
    }
}

/// A tiny net where L1 and L2 disagree: filter 0 is one large weight, filter 1 two moderate
/// ones.
#[test]
fn l1_and_l2_rank_filters_differently() {
    let arch = Arch {
        name: "tiny".into(),
        input: [1, 1, 2],
        classes: 2,
        layers: vec![
            LayerSpec::Conv2d {
                in_channels: 1,
                out_channels: 2,
                kernel: [1, 2],
                stride: [1, 1],
                padding: [0, 0],
                pad_extra: [0, 0],
                dilation: [1, 1],
                groups: 1,
                bias: false,
            },
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 2,
                out_features: 2,
                bias: false,
            },
        ],
    };
    let device = Device::flex();
    let mut tensors = tensors_of(&Network::new(&arch, &device).unwrap());
    edit(&mut tensors, "layers.0.weight", |v, _| {
        v.copy_from_slice(&[3.0, 0.0, 2.0, 2.0])
    });
    edit(&mut tensors, "layers.2.weight", |v, _| {
        v.copy_from_slice(&[1.0, 2.0, 3.0, 4.0])
    });
    let kept = |criterion| {
        let p = structured::prune(
            &arch,
            &tensors,
            &Target {
                ratio: 0.5,
                criterion,
                skip_coupled: false,
            },
        )
        .unwrap();
        let w: Vec<f32> = p.tensors["layers.0.weight"].0.try_to_vec().unwrap();
        let fc: Vec<f32> = p.tensors["layers.2.weight"].0.try_to_vec().unwrap();
        (w, fc)
    };
    // L1 (mean |w|): 1.5 vs 2.0 keeps filter 1 and row 1 of the dense layer ([in, out]).
    assert_eq!(kept(Criterion::L1), (vec![2.0, 2.0], vec![3.0, 4.0]));
    // L2 (RMS): 2.12 vs 2.0 keeps filter 0.
    assert_eq!(kept(Criterion::L2), (vec![3.0, 0.0], vec![1.0, 2.0]));
}

#[test]
fn depthwise_convolutions_follow_their_input_channels() {
    let conv = |i, o, k, g| LayerSpec::Conv2d {
        in_channels: i,
        out_channels: o,
        kernel: [k, k],
        stride: [1, 1],
        padding: [k / 2, k / 2],
        pad_extra: [0, 0],
        dilation: [1, 1],
        groups: g,
        bias: true,
    };
    let arch = Arch {
        name: "separable".into(),
        input: [3, 8, 8],
        classes: 5,
        layers: vec![
            conv(3, 8, 3, 1),
            LayerSpec::BatchNorm { features: 8 },
            LayerSpec::Relu,
            conv(8, 8, 3, 8),
            conv(8, 6, 1, 1),
            LayerSpec::GlobalAvgPool,
            LayerSpec::Flatten,
            LayerSpec::Linear {
                in_features: 6,
                out_features: 5,
                bias: true,
            },
        ],
    };
    let device = Device::flex();
    let tensors = tensors_of(&Network::new(&arch, &device).unwrap());
    let a = Analysis::new(&arch).unwrap();
    assert_eq!(a.prunable().count(), 2);
    let p = structured::prune(
        &arch,
        &tensors,
        &Target {
            ratio: 0.5,
            criterion: Criterion::L1,
            skip_coupled: false,
        },
    )
    .unwrap();
    assert_eq!(p.arch.layers[3], conv(4, 4, 3, 4));
    assert_eq!(p.arch.layers[4], conv(4, 3, 1, 1));
    let net = build(&p.arch, p.tensors, &device);
    let out = net.forward(random_input(&p.arch, 2, &device));
    assert_eq!(out.dims(), [2, 5]);
}

#[test]
fn impossible_requests_are_refused() {
    let arch = ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap();
    let device = Device::flex();
    let tensors = tensors_of(&Network::new(&arch, &device).unwrap());
    let t = |ratio, criterion| Target {
        ratio,
        criterion,
        skip_coupled: false,
    };
    for ratio in [1.0, -0.1, f64::NAN] {
        let e = structured::prune(&arch, &tensors, &t(ratio, Criterion::L1)).unwrap_err();
        assert!(e.contains("ratio"), "{e}");
    }
    let e = structured::prune(&arch, &tensors, &t(0.5, Criterion::BnGamma)).unwrap_err();
    assert!(e.contains("batch norm"), "{e}");
    // Skipping coupled groups leaves ResNet-20's stage widths alone.
    let arch = ModelKind::Resnet20.arch([1, 32, 32], 10).unwrap();
    let tensors = tensors_of(&Network::new(&arch, &device).unwrap());
    let p = structured::prune(
        &arch,
        &tensors,
        &Target {
            ratio: 0.5,
            criterion: Criterion::L1,
            skip_coupled: true,
        },
    )
    .unwrap();
    assert!(matches!(
        p.arch.layers[0],
        LayerSpec::Conv2d {
            out_channels: 16,
            ..
        }
    ));
    assert!(
        p.groups
            .iter()
            .all(|g| !g.coupled() || g.kept == g.channels)
    );
    assert!(p.arch.num_params() < arch.num_params());
}

#[test]
fn prune_filters_command_writes_a_smaller_model_that_trains_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 600, 200, 28);
    let d = data.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_convpress"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let base = dir.path().join("base");
    let (ok, _, err) = run(&[
        "train",
        "--model",
        "lenet5",
        "--epochs",
        "1",
        "--data-dir",
        d,
        "--run-dir",
        base.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let dense = base.join("model.safetensors");
    let out_dir = dir.path().join("filters");
    let (ok, stdout, err) = run(&[
        "prune-filters",
        "--checkpoint",
        dense.to_str().unwrap(),
        "--ratio",
        "0.5",
        "--epochs",
        "1",
        "--latency-seconds",
        "0.05",
        "--data-dir",
        d,
        "--run-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("fewer"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap())
            .unwrap();
    let params = report["params"].as_array().unwrap();
    assert!(params[1].as_u64().unwrap() * 3 < params[0].as_u64().unwrap());
    assert!(report["accuracy_finetuned"].as_f64().unwrap() > 0.5);
    let tuned = out_dir.join("model.safetensors");
    let (model, _) = checkpoint::load(&tuned, &Device::flex()).unwrap();
    assert!(matches!(
        model.arch.layers[0],
        LayerSpec::Conv2d {
            out_channels: 10,
            ..
        }
    ));
    let (ok, stdout, err) = run(&[
        "eval",
        "--checkpoint",
        tuned.to_str().unwrap(),
        "--data-dir",
        d,
    ]);
    assert!(ok && stdout.contains("accuracy"), "{err}");
    // Latency of both side by side; the pruned one has fewer FLOPs in the table.
    let (ok, stdout, err) = run(&[
        "bench",
        "latency",
        "--checkpoint",
        &format!("{},{}", dense.display(), tuned.display()),
        "--batch",
        "1",
        "--seconds",
        "0.05",
    ]);
    assert!(
        ok && stdout.contains("b1 ms") && stdout.lines().count() == 4,
        "{err}{stdout}"
    );
    let (ok, _, err) = run(&["bench", "latency", "--checkpoint", "missing.safetensors"]);
    assert!(!ok && err.matches("No such file").count() == 1, "{err}");
    // Bad requests fail before anything is written.
    for (args, needle) in [
        (vec!["--ratio", "1.0"], "--ratio"),
        (
            vec!["--ratio", "0.5", "--criterion", "bn-gamma"],
            "batch norm",
        ),
    ] {
        let fresh = dir.path().join("refused");
        let mut all = vec![
            "prune-filters",
            "--checkpoint",
            dense.to_str().unwrap(),
            "--data-dir",
            d,
            "--run-dir",
            fresh.to_str().unwrap(),
        ];
        all.extend(args);
        let (ok, _, err) = run(&all);
        assert!(!ok && err.contains(needle), "{err}");
        assert!(!fresh.exists());
    }
    let (ok, _, err) = run(&[
        "prune-filters",
        "--checkpoint",
        dense.to_str().unwrap(),
        "--ratio",
        "0.5",
        "--data-dir",
        d,
        "--run-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("already holds"), "{err}");
}
