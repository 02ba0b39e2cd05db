//! Model shapes, parameter counts, FLOPs, a finite-difference gradient check and checkpoints.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use convpress::checkpoint::{self, ModelMeta};
use convpress::data::{DatasetKind, Preprocess};
use convpress::models::arch::build::{bn, conv, linear};
use convpress::models::{Arch, LayerSpec, ModelKind, Network};
use std::collections::HashMap;

/// What a checkpoint must hold (`Arch::tensor_shapes`, checked on every read) is exactly what
/// the Burn module holds, for every model of the zoo and a grouped, bias-free conv.
#[test]
fn tensor_shapes_are_what_the_network_holds() {
    let device = Device::flex();
    let mut archs: Vec<Arch> = [
        (ModelKind::Lenet300, [1, 28, 28]),
        (ModelKind::Lenet5, [1, 28, 28]),
        (ModelKind::VggSmall, [1, 32, 32]),
        (ModelKind::Resnet20, [3, 32, 32]),
    ]
    .iter()
    .map(|&(kind, input)| kind.arch(input, 10).unwrap())
    .collect();
    archs.push(Arch {
        name: "grouped".into(),
        input: [4, 8, 8],
        classes: 3,
        layers: vec![
            LayerSpec::Conv2d {
                in_channels: 4,
                out_channels: 6,
                kernel: [3, 3],
                stride: [1, 1],
                padding: [1, 1],
                pad_extra: [0, 0],
                dilation: [1, 1],
                groups: 2,
                bias: false,
            },
            bn(6),
            LayerSpec::Flatten,
            linear(6 * 8 * 8, 3),
        ],
    });
    for arch in archs {
        let net = Network::new(&arch, &device).unwrap();
        let mut held: Vec<(String, Vec<usize>)> = checkpoint::named_tensors(&net)
            .into_iter()
            .map(|(p, _, d)| (p, d.shape().to_vec()))
            .collect();
        held.sort();
        let mut want = arch.tensor_shapes();
        want.sort();
        assert_eq!(want, held, "{}", arch.name);
    }
}

#[test]
fn parameter_counts_match_the_papers() {
    // Deep Compression's LeNet-5 (Caffe form): 431K parameters.
    assert_eq!(
        ModelKind::Lenet5
            .arch([1, 28, 28], 10)
            .unwrap()
            .num_params(),
        431_080
    );
    // LeNet-300-100: 267K.
    assert_eq!(
        ModelKind::Lenet300
            .arch([1, 28, 28], 10)
            .unwrap()
            .num_params(),
        266_610
    );
    // ResNet-20 with projection shortcuts on 3x32x32: the 0.27M commonly reported.
    assert_eq!(
        ModelKind::Resnet20
            .arch([3, 32, 32], 10)
            .unwrap()
            .num_params(),
        272_474
    );
    // And what the Burn module really holds agrees with the description for every model.
    let device = Device::flex();
    for (kind, input) in [
        (ModelKind::Lenet300, [1, 28, 28]),
        (ModelKind::Lenet5, [1, 28, 28]),
        (ModelKind::VggSmall, [1, 32, 32]),
        (ModelKind::Resnet20, [1, 32, 32]),
    ] {
        let arch = kind.arch(input, 10).unwrap();
        let net = Network::new(&arch, &device).unwrap();
        let trainable: usize = checkpoint::named_tensors(&net)
            .iter()
            .filter(|(p, _, _)| !p.contains("running_"))
            .map(|(_, _, d)| d.num_elements())
            .sum();
        assert_eq!(trainable, arch.num_params(), "{kind:?}");
    }
}

#[test]
fn flops_are_computed_from_shapes() {
    let arch = ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap();
    let stats = arch.layer_stats();
    // Multiply-adds worked out by hand: conv1 20x24x24 outputs of 25 MACs, conv2 50x8x8 of
    // 500, fc1 800x500, fc2 500x10.
    let macs = 20 * 24 * 24 * 25 + 50 * 8 * 8 * 500 + 800 * 500 + 500 * 10;
    let conv_fc: u64 = stats
        .iter()
        .filter(|s| s.kind == "conv2d" || s.kind == "linear")
        .map(|s| s.flops)
        .sum();
    let biases = (20 * 24 * 24 + 50 * 8 * 8 + 500 + 10) as u64;
    assert_eq!(conv_fc, 2 * macs as u64 + biases);
    assert_eq!(stats[0].output.to_string(), "20x24x24");
    assert_eq!(stats[4].output.to_string(), "800");
    // Halving the resolution divides the conv cost by about 4.
    let small = ModelKind::Resnet20.arch([1, 16, 16], 10).unwrap();
    let full = ModelKind::Resnet20.arch([1, 32, 32], 10).unwrap();
    let ratio = full.flops() as f64 / small.flops() as f64;
    assert!((3.9..4.1).contains(&ratio), "{ratio}");
}

#[test]
fn every_model_runs_forward_with_the_right_shape() {
    let device = Device::flex();
    for (kind, input) in [
        (ModelKind::Lenet300, [1, 28, 28]),
        (ModelKind::Lenet5, [1, 28, 28]),
        (ModelKind::Lenet5, [1, 32, 32]),
        (ModelKind::VggSmall, [3, 32, 32]),
        (ModelKind::Resnet20, [1, 32, 32]),
    ] {
        let arch = kind.arch(input, 10).unwrap();
        let net = Network::new(&arch, &device).unwrap();
        let x = Tensor::<4>::random(
            [3, input[0], input[1], input[2]],
            burn::tensor::Distribution::Default,
            &device,
        );
        assert_eq!(net.forward(x).dims(), [3, 10], "{kind:?} {input:?}");
    }
}

#[test]
fn invalid_architectures_are_refused_with_the_layer_named() {
    let e = ModelKind::Lenet5.arch([1, 6, 6], 10).unwrap_err();
    assert!(e.contains("lenet5") && e.contains("window"), "{e}");
    let arch = Arch {
        name: "broken".into(),
        input: [1, 8, 8],
        classes: 10,
        layers: vec![
            conv(1, 4, 3, 1, 1, true),
            LayerSpec::Flatten,
            linear(100, 10),
        ],
    };
    let e = arch.validate().unwrap_err();
    assert!(e.contains("layers.2") && e.contains("256"), "{e}");
}

/// A small smooth conv net for the gradient check: conv, batch norm, average pooling, linear.
fn small_net() -> Arch {
    Arch {
        name: "gradcheck".into(),
        input: [2, 6, 6],
        classes: 3,
        layers: vec![
            conv(2, 3, 3, 1, 1, true),
            bn(3),
            LayerSpec::AvgPool {
                kernel: [2, 2],
                stride: [2, 2],
            },
            conv(3, 4, 2, 1, 0, false),
            LayerSpec::Flatten,
            linear(16, 3),
        ],
    }
}

fn loss_of(net: &Network, x: &Tensor<4>, y: &Tensor<1, Int>) -> Tensor<1> {
    burn::nn::loss::CrossEntropyLossConfig::new()
        .init(&x.device())
        .forward(net.forward(x.clone()), y.clone())
}

#[test]
fn gradients_match_finite_differences() {
    let ad = Device::flex().autodiff();
    ad.seed(3);
    let arch = small_net();
    let net = Network::new(&arch, &ad).unwrap();
    let x = Tensor::<4>::random(
        [5, 2, 6, 6],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &ad,
    );
    let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 1, 0], [5]), &ad);
    let grads = GradientsParams::from_grads(loss_of(&net, &x, &y).backward(), &net);

    let named = checkpoint::named_tensors(&net);
    let base: HashMap<_, _> = named
        .iter()
        .map(|(p, id, d)| (p.clone(), (d.clone(), Some(*id))))
        .collect();
    let eps = 1e-2f32;
    let mut checked = 0;
    for (path, id, data) in &named {
        if path.contains("running_") {
            continue;
        }
        let analytic: Vec<f32> = match data.rank() {
            1 => grads
                .get::<1>(*id)
                .unwrap()
                .into_data()
                .try_to_vec()
                .unwrap(),
            2 => grads
                .get::<2>(*id)
                .unwrap()
                .into_data()
                .try_to_vec()
                .unwrap(),
            4 => grads
                .get::<4>(*id)
                .unwrap()
                .into_data()
                .try_to_vec()
                .unwrap(),
            r => panic!("rank {r}"),
        };
        let values: Vec<f32> = data.try_to_vec().unwrap();
        for i in (0..values.len()).step_by(values.len().div_ceil(4)) {
            let f = |delta: f32| {
                let mut v = values.clone();
                v[i] += delta;
                let mut tensors = base.clone();
                tensors.insert(
                    path.clone(),
                    (TensorData::new(v, data.shape().clone()), Some(*id)),
                );
                let probe =
                    checkpoint::load_tensors(Network::new(&arch, &ad).unwrap(), tensors).unwrap();
                loss_of(&probe, &x, &y).into_scalar::<f32>()
            };
            let numeric = (f(eps) - f(-eps)) / (2.0 * eps);
            let a = analytic[i];
            assert!(
                (numeric - a).abs() <= 2e-3 + 2e-2 * a.abs().max(numeric.abs()),
                "{path}[{i}]: autodiff {a}, finite difference {numeric}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "checked {checked} entries");
}

fn meta() -> ModelMeta {
    ModelMeta {
        dataset: DatasetKind::Mnist,
        preprocess: Preprocess {
            pad: 2,
            resize: None,
            resize_mode: Default::default(),
            mean: vec![0.1],
            std: vec![0.3],
        },
        info: serde_json::json!({"note": "test"}),
    }
}

#[test]
fn checkpoint_round_trip_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let ad = Device::flex().autodiff();
    ad.seed(5);
    let arch = ModelKind::Resnet20.arch([1, 32, 32], 10).unwrap();
    let mut net = Network::new(&arch, &ad).unwrap();
    // One training step, so batch-norm running statistics are not their initial values.
    let x = Tensor::<4>::random([4, 1, 32, 32], burn::tensor::Distribution::Default, &ad);
    let y = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4], [4]), &ad);
    let grads = GradientsParams::from_grads(loss_of(&net, &x, &y).backward(), &net);
    let mut optim = convpress::train::OptimizerConfig::Sgd {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
    }
    .build();
    net = optim.step(0.1, net, grads);

    let path = dir.path().join("m.safetensors");
    checkpoint::save(&path, &net, &meta()).unwrap();
    let (back, m) = checkpoint::load(&path, &Device::flex()).unwrap();
    assert_eq!(m, meta());
    assert_eq!(back.arch, arch);
    let a = checkpoint::named_tensors(&net);
    let b = checkpoint::named_tensors(&back);
    assert_eq!(a.len(), b.len());
    for ((pa, ia, da), (pb, ib, db)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        if !pa.contains("running_") {
            // Running statistics keep their own ids in Burn; they have no optimizer state.
            assert_eq!(
                ia, ib,
                "{pa}: parameter ids survive, for optimizer state on resume"
            );
        }
        assert_eq!(da.as_bytes(), db.as_bytes(), "{pa} differs");
    }
    assert!(a.iter().any(|(p, _, _)| p.ends_with("running_var")));
    // Same predictions.
    let x = Tensor::<4>::random(
        [2, 1, 32, 32],
        burn::tensor::Distribution::Default,
        &Device::flex(),
    );
    let pa: Vec<f32> = net
        .valid()
        .forward(x.clone())
        .into_data()
        .try_to_vec()
        .unwrap();
    let pb: Vec<f32> = back.forward(x).into_data().try_to_vec().unwrap();
    assert_eq!(pa, pb);
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn bad_checkpoints_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let lenet = Network::new(&ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap(), &device).unwrap();
    let path = dir.path().join("lenet.safetensors");
    checkpoint::save(&path, &lenet, &meta()).unwrap();

    // Another architecture.
    let other = Network::new(&ModelKind::Lenet300.arch([1, 28, 28], 10).unwrap(), &device).unwrap();
    let e = checkpoint::load_into(&path, other).unwrap_err().to_string();
    assert!(e.contains("lenet5") && e.contains("lenet300"), "{e}");

    // Not a safetensors file / truncated.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"hello world, not a checkpoint").unwrap();
    let e = checkpoint::load(&junk, &device).unwrap_err().to_string();
    assert!(
        e.contains("junk.safetensors") && e.contains("not a convpress model file"),
        "{e}"
    );
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&junk, &bytes[..bytes.len() / 2]).unwrap();
    let e = checkpoint::load(&junk, &device).unwrap_err().to_string();
    assert!(e.contains("not a convpress model file"), "{e}");

    // A safetensors file without convpress metadata.
    let plain = safetensors::serialize(
        vec![(
            "w".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0u8; 4])
                .unwrap(),
        )],
        None,
    )
    .unwrap();
    std::fs::write(&junk, plain).unwrap();
    let e = checkpoint::load(&junk, &device).unwrap_err().to_string();
    assert!(e.contains("not a convpress checkpoint"), "{e}");

    // Missing file.
    let e = checkpoint::load(&dir.path().join("nope.safetensors"), &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.safetensors"), "{e}");
}

/// Small checkpoints for the checkpoint fuzzer's seeds: a linear model, a conv + batch norm
/// model and a residual block, each of which must read back. Checkpoints are never committed,
/// so `CONVPRESS_WRITE_SEEDS=1` writes them into `fuzz/seeds-checkpoint/` before fuzzing;
/// otherwise they go to a temporary folder.
#[test]
fn checkpoint_fuzz_seeds_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = if std::env::var_os("CONVPRESS_WRITE_SEEDS").is_some() {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds-checkpoint")
    } else {
        tmp.path().to_path_buf()
    };
    let conv = |i, o| LayerSpec::Conv2d {
        in_channels: i,
        out_channels: o,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        pad_extra: [0, 0],
        dilation: [1, 1],
        groups: 1,
        bias: true,
    };
    let seeds = [
        (
            "mlp",
            Arch {
                name: "tiny".into(),
                input: [1, 2, 2],
                classes: 2,
                layers: vec![LayerSpec::Flatten, linear(4, 2)],
            },
        ),
        (
            "conv-bn",
            Arch {
                name: "tiny".into(),
                input: [1, 4, 4],
                classes: 2,
                layers: vec![
                    conv(1, 2),
                    bn(2),
                    LayerSpec::Relu,
                    LayerSpec::Flatten,
                    linear(32, 2),
                ],
            },
        ),
        (
            "residual",
            Arch {
                name: "tiny".into(),
                input: [2, 4, 4],
                classes: 2,
                layers: vec![
                    LayerSpec::Residual {
                        body: vec![conv(2, 2), bn(2)],
                        shortcut: vec![],
                    },
                    LayerSpec::GlobalAvgPool,
                    LayerSpec::Flatten,
                    linear(2, 2),
                ],
            },
        ),
    ];
    let device = Device::flex();
    for (name, arch) in seeds {
        let file = dir.join(format!("{name}.safetensors"));
        std::fs::create_dir_all(&dir).unwrap();
        let net = Network::seeded(&arch, &device, 1).unwrap();
        let mut meta = meta();
        let channels = arch.input[0];
        meta.preprocess.mean = vec![0.1; channels];
        meta.preprocess.std = vec![0.3; channels];
        checkpoint::save(&file, &net, &meta).unwrap();
        let loaded = checkpoint::read(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(loaded.arch, arch, "{name}");
        assert!(std::fs::metadata(&file).unwrap().len() < 4096, "{name}");
    }
}
