//! Throughput benchmarks on synthetic data: training images per second (forward, backward and
//! an SGD-with-momentum step) and inference images per second. `bench/torch_bench.py` measures
//! the same models, batches and thread count in PyTorch, and `bench/compare.sh` runs both.

use crate::models::{Arch, LayerSpec, ModelKind, Network, Shape};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::prelude::*;
use serde::Serialize;
use std::time::{Duration, Instant};

pub mod commands;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Train,
    Infer,
}

/// One measurement, in the same JSON shape as `bench/torch_bench.py` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub framework: String,
    pub version: String,
    /// Whose conv, batch-norm and pooling ran (convpress's kernels or Burn's ops).
    pub ops: crate::kernels::Ops,
    pub model: String,
    pub batch: usize,
    pub threads: usize,
    pub mode: Mode,
    pub images_per_sec: f64,
    pub ms_per_iter: f64,
    pub iters: usize,
}

/// The input shape a model is benchmarked at: MNIST's for the LeNets, CIFAR's for the others
/// (the same as the PyTorch script).
pub fn bench_input(model: ModelKind) -> [usize; 3] {
    match model {
        ModelKind::Lenet300 | ModelKind::Lenet5 => [1, 28, 28],
        ModelKind::VggSmall | ModelKind::Resnet20 => [3, 32, 32],
    }
}

/// Refuses benchmark settings that cannot be measured.
pub fn check_bench_args(batch: &[usize], seconds: f64) -> anyhow::Result<()> {
    if batch.contains(&0) {
        anyhow::bail!("--batch sizes must be at least 1");
    }
    crate::resources::check_seconds("--seconds", seconds).map_err(anyhow::Error::msg)?;
    Ok(())
}

/// Runs `step` once to warm up, then repeatedly until `budget` has passed (at least 3 times);
/// returns the number of iterations and the seconds they took.
fn time_loop(budget: Duration, mut step: impl FnMut()) -> (usize, f64) {
    step();
    let start = Instant::now();
    let mut iters = 0;
    while iters < 3 || start.elapsed() < budget {
        step();
        iters += 1;
    }
    (iters, start.elapsed().as_secs_f64())
}

pub fn measure(
    device: &Device,
    model: ModelKind,
    batch: usize,
    mode: Mode,
    budget: Duration,
) -> Measurement {
    let device = device.clone();
    let ad = device.clone().autodiff();
    let input = bench_input(model);
    let arch = model.arch(input, 10).expect("zoo models build");
    ad.seed(0);
    let shape = [batch, input[0], input[1], input[2]];
    let labels: Vec<i64> = (0..batch as i64).map(|i| i % 10).collect();
    let (iters, secs) = match mode {
        Mode::Train => {
            let mut net = Network::new(&arch, &ad).expect("valid");
            let mut optim = crate::train::OptimizerConfig::Sgd {
                lr: 0.01,
                momentum: 0.9,
                weight_decay: 5e-4,
            }
            .build();
            let loss_fn = CrossEntropyLossConfig::new().init(&ad);
            let x = Tensor::<4>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &ad);
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), &ad);
            time_loop(budget, || {
                let loss = loss_fn.forward(net.forward(x.clone()), y.clone());
                let grads = GradientsParams::from_grads(loss.backward(), &net);
                net = optim.step(0.01, net.clone(), grads);
                // Wait for the step to finish, as PyTorch's eager CPU ops do.
                let _ = device.sync();
            })
        }
        Mode::Infer => {
            let net = Network::new(&arch, &device).expect("valid").valid();
            let x =
                Tensor::<4>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &device);
            time_loop(budget, || {
                let out = net.forward(x.clone());
                let _: Vec<f32> = out.into_data().try_to_vec().expect("f32");
            })
        }
    };
    Measurement {
        framework: "convpress".into(),
        version: format!("{} (burn 0.22.1 flex)", env!("CARGO_PKG_VERSION")),
        ops: crate::kernels::current_ops(),
        model: model.name().into(),
        batch,
        threads: rayon::current_num_threads(),
        mode,
        images_per_sec: (iters * batch) as f64 / secs,
        ms_per_iter: 1000.0 * secs / iters as f64,
        iters,
    }
}

/// Milliseconds per forward pass of `network` (inference mode) on a random batch of `batch`
/// images: the latency figure of structured pruning's report.
pub fn infer_latency(network: &Network, batch: usize, budget: Duration, device: &Device) -> f64 {
    let net = network.valid();
    let [c, h, w] = net.arch.input;
    let x = Tensor::<4>::random(
        [batch, c, h, w],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        device,
    );
    let (iters, secs) = time_loop(budget, || {
        let out = net.forward(x.clone());
        let _: Vec<f32> = out.into_data().try_to_vec().expect("f32");
    });
    1000.0 * secs / iters as f64
}

/// A network of `layers` alone, on inputs of shape `input` (one layer cut out of its model, or
/// the layers that replace it), with `tensors` named from `layers.0` as in the model: what
/// per-layer latency figures time. A flatten is added where the shapes need one (before dense
/// layers on flat input, after a feature map at the end).
pub fn layer_probe(
    layers: &[LayerSpec],
    tensors: &crate::checkpoint::Tensors,
    input: Shape,
    device: &Device,
) -> Result<Network, String> {
    let (image, lead) = match input {
        Shape::Map(m) => (m, 0),
        Shape::Flat(f) => ([f, 1, 1], 1),
    };
    let mut specs: Vec<LayerSpec> = Vec::new();
    if lead == 1 {
        specs.push(LayerSpec::Flatten);
    }
    specs.extend(layers.iter().cloned());
    let mut renamed = crate::checkpoint::Tensors::new();
    for (name, t) in tensors {
        let rest = name
            .strip_prefix("layers.")
            .ok_or("tensors are named layers.N.*")?;
        let (i, field) = rest.split_once('.').ok_or("tensors are named layers.N.*")?;
        let i: usize = i.parse().map_err(|_| "tensors are named layers.N.*")?;
        renamed.insert(format!("layers.{}.{field}", i + lead), t.clone());
    }
    let probe = Arch {
        name: "probe".into(),
        input: image,
        classes: 1,
        layers: specs.clone(),
    };
    // The top-level layers' output (`layer_stats` lists nested layers after their parent).
    let mut out = Shape::Map(probe.input);
    for l in &probe.layers {
        out = l
            .output_shape(out)
            .map_err(|e| format!("the probe's layers do not fit its input: {e}"))?;
    }
    if let Shape::Map(_) = out {
        specs.push(LayerSpec::Flatten);
    }
    let arch = Arch {
        classes: out.numel(),
        layers: specs,
        ..probe
    };
    crate::checkpoint::load_tensors(Network::new(&arch, device)?, renamed)
}

/// Milliseconds per forward pass of each of `networks` at `batch`, measured in turns (five
/// rounds of every network, `budget` in all per network) and reported as each network's
/// median round: on a shared machine a slow moment then touches all of them alike.
pub fn interleaved_latency(
    networks: &[&Network],
    batch: usize,
    budget: Duration,
    device: &Device,
) -> Vec<f64> {
    const ROUNDS: usize = 5;
    let mut rounds = vec![Vec::new(); networks.len()];
    for _ in 0..ROUNDS {
        for (net, r) in networks.iter().zip(&mut rounds) {
            r.push(infer_latency(net, batch, budget / ROUNDS as u32, device));
        }
    }
    rounds
        .into_iter()
        .map(|mut r| {
            r.sort_by(f64::total_cmp);
            r[ROUNDS / 2]
        })
        .collect()
}

/// Milliseconds per forward pass of convpress's sparse runtime on a random batch of `batch`
/// images: the latency a report gives for a pruned model.
pub fn sparse_latency(
    model: &crate::runtime::model::SparseModel,
    batch: usize,
    budget: Duration,
) -> f64 {
    use rand::{Rng, SeedableRng};
    let len: usize = model.arch.input.iter().product();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let x: Vec<f32> = (0..batch * len)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    let (iters, secs) = time_loop(budget, || {
        std::hint::black_box(model.forward(&x, batch));
    });
    1000.0 * secs / iters as f64
}

/// One sparse-versus-dense measurement of a fully connected layer.
#[derive(Debug, Clone, Serialize)]
pub struct SparseMeasurement {
    pub layer: String,
    pub in_features: usize,
    pub out_features: usize,
    pub sparsity: f64,
    pub batch: usize,
    pub threads: usize,
    /// Burn's dense `Linear` on the flex backend (convpress's dense path).
    pub dense_us: f64,
    /// convpress's CSR kernel.
    pub sparse_us: f64,
    pub speedup: f64,
    pub dense_bytes: usize,
    pub sparse_bytes: usize,
}

/// Times a layer of `in_f` x `out_f` random weights pruned by magnitude to `sparsity`, dense
/// (Burn) against CSR (convpress), at `batch`.
pub fn measure_sparse_linear(
    layer: &str,
    in_f: usize,
    out_f: usize,
    sparsity: f64,
    batch: usize,
    budget: Duration,
) -> Result<SparseMeasurement, String> {
    use crate::compress::prune::level_mask;
    use crate::runtime::sparse::CsrLinear;
    use crate::runtime::{DenseReference, LinearKernel};
    use rand::{Rng, SeedableRng};

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut w: Vec<f32> = (0..in_f * out_f)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let keep = level_mask(&w, sparsity)?;
    for (v, k) in w.iter_mut().zip(&keep) {
        if !k {
            *v = 0.0;
        }
    }
    let bias: Vec<f32> = (0..out_f).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let x: Vec<f32> = (0..batch * in_f)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();

    let device = Device::flex();
    let weight = Tensor::<2>::from_data(TensorData::new(w.clone(), [in_f, out_f]), &device);
    let b = Tensor::<1>::from_data(TensorData::new(bias.clone(), [out_f]), &device);
    let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [batch, in_f]), &device);
    let (iters, secs) = time_loop(budget, || {
        let y = burn::tensor::module::linear(xt.clone(), weight.clone(), Some(b.clone()));
        let _: Vec<f32> = y.into_data().try_to_vec().expect("f32");
    });
    let dense_us = 1e6 * secs / iters as f64;

    let csr = CsrLinear::from_dense(&DenseReference::from_burn_layout(
        in_f,
        out_f,
        &w,
        Some(bias),
    ));
    let mut y = vec![0f32; batch * out_f];
    let (iters, secs) = time_loop(budget, || csr.forward(&x, batch, &mut y));
    let sparse_us = 1e6 * secs / iters as f64;
    Ok(SparseMeasurement {
        layer: layer.into(),
        in_features: in_f,
        out_features: out_f,
        sparsity,
        batch,
        threads: rayon::current_num_threads(),
        dense_us,
        sparse_us,
        speedup: dense_us / sparse_us,
        dense_bytes: 4 * (in_f * out_f + out_f),
        sparse_bytes: csr.weight_bytes(),
    })
}

/// One whole-model measurement: Burn's dense `Network::forward` (flex) against convpress's
/// sparse runtime on the same pruned checkpoint, batch and thread pool.
#[derive(Debug, Clone, Serialize)]
pub struct ModelMeasurement {
    pub model: String,
    pub checkpoint: String,
    pub batch: usize,
    pub threads: usize,
    pub dense_ms: f64,
    pub sparse_ms: f64,
    pub dense_images_per_sec: f64,
    pub sparse_images_per_sec: f64,
    pub speedup: f64,
    /// Bytes of the checkpoint's float tensors (what the dense network holds).
    pub dense_bytes: usize,
    /// Bytes the sparse runtime holds (non-zeros, indices, biases).
    pub sparse_bytes: usize,
}

/// Times both engines on the first `batch` images of `images` (repeated if there are fewer).
pub fn measure_model(
    checkpoint: &str,
    dense: &Network,
    sparse: &crate::runtime::model::SparseModel,
    images: &[f32],
    batch: usize,
    budget: Duration,
) -> ModelMeasurement {
    let x = batch_of(images, &sparse.arch.input, batch);
    let device = Device::flex();
    let [c, h, w] = sparse.arch.input;
    let xt = Tensor::<4>::from_data(TensorData::new(x.clone(), [batch, c, h, w]), &device);
    let (iters, secs) = time_loop(budget, || {
        let out = dense.forward(xt.clone());
        let _: Vec<f32> = out.into_data().try_to_vec().expect("f32");
    });
    let dense_ms = 1000.0 * secs / iters as f64;
    let (iters, secs) = time_loop(budget, || {
        std::hint::black_box(sparse.forward(&x, batch));
    });
    let sparse_ms = 1000.0 * secs / iters as f64;
    ModelMeasurement {
        model: sparse.arch.name.clone(),
        checkpoint: checkpoint.into(),
        batch,
        threads: rayon::current_num_threads(),
        dense_ms,
        sparse_ms,
        dense_images_per_sec: 1000.0 * batch as f64 / dense_ms,
        sparse_images_per_sec: 1000.0 * batch as f64 / sparse_ms,
        speedup: dense_ms / sparse_ms,
        dense_bytes: sparse.dense_bytes(),
        sparse_bytes: sparse.weight_bytes(),
    }
}

/// `batch` images from `images`, cycling through them if there are fewer.
fn batch_of(images: &[f32], input: &[usize; 3], batch: usize) -> Vec<f32> {
    let len: usize = input.iter().product();
    let n = images.len() / len;
    assert!(n > 0, "no images to run");
    (0..batch)
        .flat_map(|i| images[(i % n) * len..(i % n + 1) * len].iter().copied())
        .collect()
}

/// Mean seconds per step of the sparse runtime, per layer, over repeated forward passes.
pub fn sparse_layer_times(
    sparse: &crate::runtime::model::SparseModel,
    images: &[f32],
    batch: usize,
    budget: Duration,
) -> Vec<crate::runtime::model::LayerTime> {
    let x = batch_of(images, &sparse.arch.input, batch);
    let (_, mut total) = sparse.forward_timed(&x, batch);
    let start = Instant::now();
    let mut runs = 1;
    while runs < 3 || start.elapsed() < budget {
        let (_, t) = sparse.forward_timed(&x, batch);
        for (a, b) in total.iter_mut().zip(t) {
            a.seconds += b.seconds;
        }
        runs += 1;
    }
    for t in &mut total {
        t.seconds /= runs as f64;
    }
    total
}

/// How far the sparse runtime's class scores are from Burn's on the same images.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub images: usize,
    /// Largest |sparse logit - dense logit| over all images and classes.
    pub max_abs_diff: f64,
    /// Largest |dense logit|, for scale.
    pub max_abs_logit: f64,
    /// Images whose predicted class is the same in both.
    pub same_prediction: usize,
    /// Accuracy of each engine when labels are known.
    pub dense_accuracy: Option<f64>,
    pub sparse_accuracy: Option<f64>,
}

/// Runs both engines over `images` (with `labels` if known) in batches of 256.
pub fn agreement(
    dense: &Network,
    sparse: &crate::runtime::model::SparseModel,
    images: &[f32],
    labels: Option<&[u8]>,
) -> Agreement {
    let [c, h, w] = sparse.arch.input;
    let len = c * h * w;
    let n = images.len() / len;
    let classes = sparse.arch.classes;
    let device = Device::flex();
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
                if x > bv { (i, x) } else { (bi, bv) }
            })
            .0
    };
    let (mut diff, mut scale, mut same) = (0f64, 0f64, 0);
    let (mut dense_ok, mut sparse_ok) = (0, 0);
    let mut start = 0;
    while start < n {
        let b = (n - start).min(256);
        let x = &images[start * len..(start + b) * len];
        let t = Tensor::<4>::from_data(TensorData::new(x.to_vec(), [b, c, h, w]), &device);
        let want: Vec<f32> = dense.forward(t).into_data().try_to_vec().expect("f32");
        let got = sparse.forward(x, b);
        for (g, w) in got.iter().zip(&want) {
            diff = diff.max((g - w).abs() as f64);
            scale = scale.max(w.abs() as f64);
        }
        for i in 0..b {
            let (pd, ps) = (
                argmax(&want[i * classes..(i + 1) * classes]),
                argmax(&got[i * classes..(i + 1) * classes]),
            );
            same += usize::from(pd == ps);
            if let Some(l) = labels {
                dense_ok += usize::from(pd == l[start + i] as usize);
                sparse_ok += usize::from(ps == l[start + i] as usize);
            }
        }
        start += b;
    }
    let acc = |k: usize| labels.map(|_| k as f64 / n.max(1) as f64);
    Agreement {
        images: n,
        max_abs_diff: diff,
        max_abs_logit: scale,
        same_prediction: same,
        dense_accuracy: acc(dense_ok),
        sparse_accuracy: acc(sparse_ok),
    }
}

/// One operation benchmarked by [`measure_op`]: its name (shared with `bench/torch_ops.py`)
/// and shapes. Batch 64, the training batch of the model benchmarks.
#[derive(Debug, Clone, Copy)]
pub struct OpCase {
    pub name: &'static str,
    pub kind: OpKind,
    /// Input `[N, C, H, W]`.
    pub input: [usize; 4],
}

#[derive(Debug, Clone, Copy)]
pub enum OpKind {
    /// `out` channels, square kernel, stride, padding; no bias (ResNet) or with bias (LeNet).
    Conv {
        out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    },
    BatchNorm,
    MaxPool2x2,
}

/// The layers that dominate LeNet-5 (Caffe) and ResNet-20 training.
pub const OP_CASES: &[OpCase] = &[
    OpCase {
        name: "lenet5.conv1 1->20 k5 28x28",
        kind: OpKind::Conv {
            out: 20,
            kernel: 5,
            stride: 1,
            padding: 0,
            bias: true,
        },
        input: [64, 1, 28, 28],
    },
    OpCase {
        name: "lenet5.conv2 20->50 k5 12x12",
        kind: OpKind::Conv {
            out: 50,
            kernel: 5,
            stride: 1,
            padding: 0,
            bias: true,
        },
        input: [64, 20, 12, 12],
    },
    OpCase {
        name: "lenet5.pool1 2x2 20x24x24",
        kind: OpKind::MaxPool2x2,
        input: [64, 20, 24, 24],
    },
    OpCase {
        name: "resnet20.conv 16->16 k3 32x32",
        kind: OpKind::Conv {
            out: 16,
            kernel: 3,
            stride: 1,
            padding: 1,
            bias: false,
        },
        input: [64, 16, 32, 32],
    },
    OpCase {
        name: "resnet20.conv 16->32 k3 s2 32x32",
        kind: OpKind::Conv {
            out: 32,
            kernel: 3,
            stride: 2,
            padding: 1,
            bias: false,
        },
        input: [64, 16, 32, 32],
    },
    OpCase {
        name: "resnet20.conv 32->32 k3 16x16",
        kind: OpKind::Conv {
            out: 32,
            kernel: 3,
            stride: 1,
            padding: 1,
            bias: false,
        },
        input: [64, 32, 16, 16],
    },
    OpCase {
        name: "resnet20.conv 64->64 k3 8x8",
        kind: OpKind::Conv {
            out: 64,
            kernel: 3,
            stride: 1,
            padding: 1,
            bias: false,
        },
        input: [64, 64, 8, 8],
    },
    OpCase {
        name: "resnet20.shortcut 16->32 k1 s2",
        kind: OpKind::Conv {
            out: 32,
            kernel: 1,
            stride: 2,
            padding: 0,
            bias: false,
        },
        input: [64, 16, 32, 32],
    },
    OpCase {
        name: "resnet20.bn 16x32x32",
        kind: OpKind::BatchNorm,
        input: [64, 16, 32, 32],
    },
    OpCase {
        name: "resnet20.bn 64x8x8",
        kind: OpKind::BatchNorm,
        input: [64, 64, 8, 8],
    },
];

/// Milliseconds per call of one operation, forward alone (plain device, inference) and
/// forward + backward (autodiff device, gradients of the input and the parameters).
#[derive(Debug, Clone, Serialize)]
pub struct OpMeasurement {
    pub framework: String,
    pub ops: crate::kernels::Ops,
    pub op: String,
    pub threads: usize,
    pub forward_ms: f64,
    pub forward_backward_ms: f64,
}

/// Times one [`OpCase`] with whichever [`crate::kernels::Ops`] is in effect.
pub fn measure_op(device: &Device, case: &OpCase, budget: Duration) -> OpMeasurement {
    use crate::kernels::{PoolParams, extension as ext};
    let [n, c, h, w] = case.input;
    let normal = burn::tensor::Distribution::Normal(0.0, 1.0);
    let run = |d: &Device, train: bool| {
        let x = Tensor::<4>::random([n, c, h, w], normal, d);
        let x = if train { x.require_grad() } else { x };
        let op: Box<dyn Fn(Tensor<4>) -> (Tensor<4>, Vec<Tensor<1>>)> = match case.kind {
            OpKind::Conv {
                out,
                kernel,
                stride,
                padding,
                bias,
            } => {
                let wt = Tensor::<4>::random([out, c, kernel, kernel], normal, d);
                let b = bias.then(|| Tensor::<1>::random([out], normal, d));
                let (wt, b) = if train {
                    (wt.require_grad(), b.map(Tensor::require_grad))
                } else {
                    (wt, b)
                };
                let options =
                    burn::backend::ops::ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1);
                Box::new(move |x| {
                    let y = ext::conv2d(x, wt.clone(), b.clone(), options.clone());
                    (y, vec![wt.clone().flatten(0, 3)])
                })
            }
            OpKind::BatchNorm => {
                let gamma = Tensor::<1>::ones([c], d);
                let beta = Tensor::<1>::zeros([c], d);
                let (gamma, beta) = if train {
                    (gamma.require_grad(), beta.require_grad())
                } else {
                    (gamma, beta)
                };
                Box::new(move |x| {
                    let y = if train {
                        ext::batch_norm_train(x, gamma.clone(), beta.clone(), 1e-5).0
                    } else {
                        let mean = Tensor::<1>::zeros([c], &x.device());
                        let var = Tensor::<1>::ones([c], &x.device());
                        ext::batch_norm(x, gamma.clone(), beta.clone(), mean, var, 1e-5)
                    };
                    (y, vec![gamma.clone()])
                })
            }
            OpKind::MaxPool2x2 => Box::new(|x| {
                let p = PoolParams {
                    kernel: [2, 2],
                    stride: [2, 2],
                    padding: [0, 0],
                    dilation: [1, 1],
                };
                (ext::max_pool2d(x, p), vec![])
            }),
        };
        let (iters, secs) = time_loop(budget, || {
            let (y, _) = op(x.clone());
            if train {
                let grads = y.sum().backward();
                let _ = x.grad(&grads);
            } else {
                let _: Vec<f32> = y.into_data().try_to_vec().expect("f32");
            }
            let _ = d.sync();
        });
        1000.0 * secs / iters as f64
    };
    OpMeasurement {
        framework: "convpress".into(),
        ops: crate::kernels::current_ops(),
        op: case.name.into(),
        threads: rayon::current_num_threads(),
        forward_ms: run(device, false),
        forward_backward_ms: run(&device.clone().autodiff(), true),
    }
}

/// One layer, float against int8: Burn's dense `linear` on the flex backend (convpress's f32
/// path) and [`crate::runtime::int8::Int8Linear`] (8-bit weights per channel, the input
/// quantized per tensor inside the timing), same weights, batch and threads.
#[derive(Debug, Clone, Serialize)]
pub struct QuantMeasurement {
    pub layer: String,
    pub in_features: usize,
    pub out_features: usize,
    pub batch: usize,
    pub threads: usize,
    pub kernel: String,
    /// Medians over interleaved rounds, microseconds per call.
    pub f32_us: f64,
    pub int8_us: f64,
    pub speedup: f64,
    pub f32_bytes: usize,
    pub int8_bytes: usize,
}

/// Times an `in_f` x `out_f` layer of random weights at `batch`, f32 and int8 alternately in
/// `rounds` rounds of `budget / (2 rounds)` each; reports the medians.
pub fn measure_int8_linear(
    layer: &str,
    in_f: usize,
    out_f: usize,
    batch: usize,
    budget: Duration,
) -> Result<QuantMeasurement, String> {
    use crate::compress::quantize::{Calibration, Observer};
    use crate::runtime::LinearKernel;
    use crate::runtime::int8::Int8Linear;
    use rand::{Rng, SeedableRng};

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Burn's layout [in, out] for the float layer; [out, in] for the int8 one.
    let w_in_out: Vec<f32> = (0..in_f * out_f)
        .map(|_| rng.random_range(-0.1f32..0.1))
        .collect();
    let mut w_out_in = vec![0f32; in_f * out_f];
    for i in 0..in_f {
        for o in 0..out_f {
            w_out_in[o * in_f + i] = w_in_out[i * out_f + o];
        }
    }
    let bias: Vec<f32> = (0..out_f).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    // ReLU-like inputs, as a hidden layer sees.
    let x: Vec<f32> = (0..batch * in_f)
        .map(|_| rng.random_range(0.0f32..1.0))
        .collect();
    let mut observer = Observer::default();
    observer.observe(&x)?;
    let input = observer.quantizer(Calibration::MinMax, 8)?;
    let int8 = Int8Linear::new(in_f, out_f, &w_out_in, Some(bias.clone()), 8, input)?;

    let device = Device::flex();
    let weight = Tensor::<2>::from_data(TensorData::new(w_in_out, [in_f, out_f]), &device);
    let b = Tensor::<1>::from_data(TensorData::new(bias, [out_f]), &device);
    let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [batch, in_f]), &device);
    let mut y = vec![0f32; batch * out_f];
    let rounds = 10;
    let slice = budget / (2 * rounds);
    let (mut f32_us, mut int8_us) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (iters, secs) = time_loop(slice, || {
            let y = burn::tensor::module::linear(xt.clone(), weight.clone(), Some(b.clone()));
            let _: Vec<f32> = y.into_data().try_to_vec().expect("f32");
        });
        f32_us.push(1e6 * secs / iters as f64);
        let (iters, secs) = time_loop(slice, || int8.forward(&x, batch, &mut y));
        int8_us.push(1e6 * secs / iters as f64);
    }
    let (f32_us, int8_us) = (median(&mut f32_us), median(&mut int8_us));
    Ok(QuantMeasurement {
        layer: layer.into(),
        in_features: in_f,
        out_features: out_f,
        batch,
        threads: rayon::current_num_threads(),
        kernel: int8.kernel_name(batch).into(),
        f32_us,
        int8_us,
        speedup: f32_us / int8_us,
        f32_bytes: 4 * (in_f * out_f + out_f),
        int8_bytes: int8.weight_bytes(),
    })
}

/// The median of interleaved rounds' timings.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One whole-model measurement of `convpress bench quant --checkpoint`: the float model on
/// convpress's own f32 path (Burn with convpress's kernels) against the quantized file on the
/// int8 runtime, on the same random batch.
#[derive(Debug, Clone, Serialize)]
pub struct QuantModelMeasurement {
    pub model: String,
    pub batch: usize,
    pub threads: usize,
    pub f32_ms: f64,
    pub int8_ms: f64,
    pub speedup: f64,
}

/// Milliseconds per batch of `batch` images for `float` (Burn, inference mode) and `int8` (the
/// int8 runtime), as medians of 10 rounds that alternate between the two.
pub fn measure_quantized_model(
    float: &Network,
    int8: &crate::runtime::model::SparseModel,
    batch: usize,
    budget: Duration,
) -> QuantModelMeasurement {
    use rand::{Rng, SeedableRng};
    let net = float.valid();
    let [c, h, w] = int8.arch.input;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let x: Vec<f32> = (0..batch * c * h * w)
        .map(|_| rng.random_range(-1.0f32..2.0))
        .collect();
    let device = Device::flex();
    let xt = Tensor::<4>::from_data(TensorData::new(x.clone(), [batch, c, h, w]), &device);
    let rounds = 10;
    let slice = budget / (2 * rounds);
    let (mut f32_ms, mut int8_ms) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (iters, secs) = time_loop(slice, || {
            let out = net.forward(xt.clone());
            let _: Vec<f32> = out.into_data().try_to_vec().expect("f32");
        });
        f32_ms.push(1e3 * secs / iters as f64);
        let (iters, secs) = time_loop(slice, || {
            std::hint::black_box(int8.forward(&x, batch));
        });
        int8_ms.push(1e3 * secs / iters as f64);
    }
    let (f32_ms, int8_ms) = (median(&mut f32_ms), median(&mut int8_ms));
    QuantModelMeasurement {
        model: int8.arch.name.clone(),
        batch,
        threads: rayon::current_num_threads(),
        f32_ms,
        int8_ms,
        speedup: f32_ms / int8_ms,
    }
}

/// A convolution's random input in [-1, 1), weights and bias in [-0.1, 0.1), and BWN's scale of
/// each filter, its mean |w| (Rastegari et al. 2016, eq. 6).
struct ConvData {
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    alpha: Vec<f32>,
}

impl ConvData {
    fn random(p: &crate::kernels::conv::Conv2dProblem, seed: u64) -> ConvData {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut draw = |n: usize, r: f32| (0..n).map(|_| rng.random_range(-r..r)).collect();
        let x: Vec<f32> = draw(p.x_len(), 1.0);
        let w: Vec<f32> = draw(p.weight_len(), 0.1);
        let bias = draw(p.out_channels, 0.1);
        let taps = p.weight_len() / p.out_channels.max(1);
        let alpha = w
            .chunks(taps.max(1))
            .map(|f| f.iter().map(|v| v.abs()).sum::<f32>() / taps as f32)
            .collect();
        ConvData { x, w, bias, alpha }
    }
}

/// One binary convolution against convpress's f32 convolution of the same shape
/// (`convpress bench binary`): both from f32 input to f32 output, the binary one including the
/// binarization and packing of its input and its per-filter scale; and the binary one from
/// packed input to i32 sums alone.
#[derive(Debug, Clone, Serialize)]
pub struct BinaryMeasurement {
    pub layer: String,
    pub channels: [usize; 2],
    pub hw: [usize; 2],
    pub batch: usize,
    pub threads: usize,
    pub path: String,
    /// Medians over interleaved rounds, microseconds per call.
    pub f32_us: f64,
    pub binary_us: f64,
    pub packed_us: f64,
    pub speedup: f64,
    pub packed_speedup: f64,
    pub f32_weight_bytes: usize,
    pub binary_weight_bytes: usize,
}

/// Times the 3x3 convolution (stride 1, padding 1) of `c_in` to `c_out` channels on `hw`
/// images at `batch`: convpress's f32 convolution, the binary layer from f32 to f32, and the
/// binary convolution on packed input, alternately in `rounds` rounds.
pub fn measure_binary_conv(
    layer: &str,
    [c_in, c_out]: [usize; 2],
    hw: [usize; 2],
    batch: usize,
    path: crate::kernels::binary::Path,
    budget: Duration,
) -> Result<BinaryMeasurement, String> {
    use crate::kernels::binary::{self, PackedFilters, PackedImages};
    use crate::kernels::conv::{self, Conv2dProblem};
    let p = Conv2dProblem {
        batch,
        in_channels: c_in,
        out_channels: c_out,
        in_hw: hw,
        kernel: [3, 3],
        stride: [1, 1],
        pad_begin: [1, 1],
        pad_end: [1, 1],
        dilation: [1, 1],
        groups: 1,
    };
    p.validate()?;
    let ConvData { x, w, bias, alpha } = ConvData::random(&p, 11);
    let filters = PackedFilters::pack(&w, c_out, c_in, [3, 3]);
    let mut y = vec![0f32; p.y_len()];
    let mut sums = vec![0i32; p.y_len()];
    let packed = PackedImages::pack_on(path, &x, batch, c_in, hw);
    let rounds = 5;
    let slice = budget / (3 * rounds);
    let (mut f32_us, mut binary_us, mut packed_us) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (iters, secs) = time_loop(slice, || conv::forward(&p, &x, &w, Some(&bias), &mut y));
        f32_us.push(1e6 * secs / iters as f64);
        let (iters, secs) = time_loop(slice, || {
            let input = PackedImages::pack_on(path, &x, batch, c_in, hw);
            binary::conv_scaled(path, &p, &input, &filters, &alpha, Some(&bias), &mut y);
        });
        binary_us.push(1e6 * secs / iters as f64);
        let (iters, secs) = time_loop(slice, || {
            binary::conv(path, &p, &packed, &filters, &mut sums)
        });
        packed_us.push(1e6 * secs / iters as f64);
    }
    let (f32_us, binary_us, packed_us) = (
        median(&mut f32_us),
        median(&mut binary_us),
        median(&mut packed_us),
    );
    Ok(BinaryMeasurement {
        layer: layer.into(),
        channels: [c_in, c_out],
        hw,
        batch,
        threads: rayon::current_num_threads(),
        path: path.name().into(),
        f32_us,
        binary_us,
        packed_us,
        speedup: f32_us / binary_us,
        packed_speedup: f32_us / packed_us,
        f32_weight_bytes: 4 * p.weight_len(),
        binary_weight_bytes: filters.bytes() + 4 * c_out,
    })
}

/// One layer of binary (and ternary) weights on float inputs, as BWN and TWN run it
/// (`convpress bench binary`): the table-lookup layer against convpress's f32 convolution of
/// the same shape, and against the int8 layer that the same weights run as with 8-bit inputs.
/// All from f32 input to f32 output (the int8 one including its input's quantization).
#[derive(Debug, Clone, Serialize)]
pub struct LookupMeasurement {
    pub layer: String,
    pub channels: [usize; 2],
    pub hw: [usize; 2],
    pub batch: usize,
    pub threads: usize,
    pub path: String,
    /// Medians over interleaved rounds, microseconds per call.
    pub f32_us: f64,
    pub binary_us: f64,
    pub ternary_us: f64,
    pub int8_us: f64,
    /// f32 time over the binary layer's, and over the ternary one's.
    pub speedup: f64,
    pub ternary_speedup: f64,
    /// The int8 layer's time over the binary one's.
    pub vs_int8: f64,
}

/// Times the 3x3 convolution (stride 1, padding 1) of `c_in` to `c_out` channels on `hw`
/// images at `batch`: convpress's f32 convolution, the table-lookup layer on `path` with
/// binary and with ternary weights, and the runtime's int8 layer on the binary weights,
/// alternately in rounds.
pub fn measure_lookup_conv(
    layer: &str,
    [c_in, c_out]: [usize; 2],
    hw: [usize; 2],
    batch: usize,
    path: crate::kernels::binary::lookup::TablePath,
    budget: Duration,
) -> Result<LookupMeasurement, String> {
    use crate::compress::quantize::Quantizer;
    use crate::kernels::conv;
    use crate::runtime::conv::{Conv2dKernel, ConvGeometry};
    use crate::runtime::int8::Int8Conv;
    use crate::runtime::signed::SignedConv;
    let g = ConvGeometry {
        in_channels: c_in,
        out_channels: c_out,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    };
    let p = g.problem(batch, hw);
    p.validate()?;
    let ConvData { x, w, bias, alpha } = ConvData::random(&p, 12);
    // BWN's weights `α_o · sign(w)`; TWN's with a third of them 0.
    let taps = g.patch_len();
    let bwn: Vec<f32> = w
        .iter()
        .enumerate()
        .map(|(i, v)| alpha[i / taps] * if *v >= 0.0 { 1.0 } else { -1.0 })
        .collect();
    let twn: Vec<f32> = bwn
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 3 == 0 { 0.0 } else { *v })
        .collect();
    let binary =
        SignedConv::new(g, &bwn, false, alpha.clone(), Some(bias.clone()))?.with_path(path)?;
    let ternary =
        SignedConv::new(g, &twn, true, alpha.clone(), Some(bias.clone()))?.with_path(path)?;
    let codes: Vec<i8> = bwn.iter().map(|v| if *v >= 0.0 { 1 } else { -1 }).collect();
    let quantizers = alpha
        .iter()
        .map(|&scale| Quantizer {
            scale,
            zero_point: 0,
            lo: -1,
            hi: 1,
        })
        .collect();
    let input = Quantizer::asymmetric(-1.0, 1.0, 8);
    let int8 = Int8Conv::from_codes(g, codes, quantizers, Some(bias.clone()), input)?;
    let mut y = vec![0f32; p.y_len()];
    let rounds = 5;
    let slice = budget / (4 * rounds);
    let mut us: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        let time = |f: &mut dyn FnMut()| {
            let (iters, secs) = time_loop(slice, f);
            1e6 * secs / iters as f64
        };
        us[0].push(time(&mut || conv::forward(&p, &x, &w, Some(&bias), &mut y)));
        us[1].push(time(&mut || binary.forward(&x, batch, hw, &mut y)));
        us[2].push(time(&mut || ternary.forward(&x, batch, hw, &mut y)));
        us[3].push(time(&mut || int8.forward(&x, batch, hw, &mut y)));
    }
    let [f32_us, binary_us, ternary_us, int8_us] = us.map(|mut v| median(&mut v));
    Ok(LookupMeasurement {
        layer: layer.into(),
        channels: [c_in, c_out],
        hw,
        batch,
        threads: rayon::current_num_threads(),
        path: path.name().into(),
        f32_us,
        binary_us,
        ternary_us,
        int8_us,
        speedup: f32_us / binary_us,
        ternary_speedup: f32_us / ternary_us,
        vs_int8: int8_us / binary_us,
    })
}

/// One size of `convpress bench circulant`: a `d x d` dense layer (Burn's `Linear`, a matrix
/// product) against a circulant layer of the same size (the FFT kernel through the Burn
/// extension), forward and forward + backward, interleaved in rounds, as medians.
#[derive(Debug, Clone, Serialize)]
pub struct CirculantMeasurement {
    pub d: usize,
    pub batch: usize,
    pub threads: usize,
    pub dense_forward_ms: f64,
    pub circulant_forward_ms: f64,
    pub dense_forward_backward_ms: f64,
    pub circulant_forward_backward_ms: f64,
    /// Parameters of each (weights and bias).
    pub params: [usize; 2],
}

impl CirculantMeasurement {
    /// Dense time over circulant time: forward, forward + backward.
    pub fn speedup(&self) -> [f64; 2] {
        [
            self.dense_forward_ms / self.circulant_forward_ms,
            self.dense_forward_backward_ms / self.circulant_forward_backward_ms,
        ]
    }
}

/// Times both layers of size `d` at `batch` for about `budget` in all.
pub fn measure_circulant(
    device: &Device,
    d: usize,
    batch: usize,
    budget: Duration,
) -> CirculantMeasurement {
    use crate::models::network::Circulant;
    const ROUNDS: usize = 5;
    let ad = device.clone().autodiff();
    let normal = burn::tensor::Distribution::Normal(0.0, 1.0);
    let dense = |dev: &Device| burn::nn::LinearConfig::new(d, d).init(dev);
    let circ = |dev: &Device| Circulant::new(d, d, true, 0, dev);
    let (dense_plain, circ_plain) = (dense(device), circ(device));
    let (dense_ad, circ_ad) = (dense(&ad), circ(&ad));
    let x = Tensor::<2>::random([batch, d], normal, device);
    let x_ad = Tensor::<2>::random([batch, d], normal, &ad).require_grad();
    let slice = budget / (4 * ROUNDS) as u32;
    let time = |f: &dyn Fn()| {
        let (iters, secs) = time_loop(slice, f);
        1000.0 * secs / iters as f64
    };
    let infer = |y: Tensor<2>| {
        let _: Vec<f32> = y.into_data().try_to_vec().expect("f32");
    };
    let train = |y: Tensor<2>| {
        let grads = y.sum().backward();
        let _ = x_ad.grad(&grads);
    };
    let mut t = vec![Vec::new(); 4];
    for _ in 0..ROUNDS {
        t[0].push(time(&|| infer(dense_plain.forward(x.clone()))));
        t[1].push(time(&|| infer(circ_plain.forward(x.clone()))));
        t[2].push(time(&|| train(dense_ad.forward(x_ad.clone()))));
        t[3].push(time(&|| train(circ_ad.forward(x_ad.clone()))));
    }
    CirculantMeasurement {
        d,
        batch,
        threads: rayon::current_num_threads(),
        dense_forward_ms: median(&mut t[0]),
        circulant_forward_ms: median(&mut t[1]),
        dense_forward_backward_ms: median(&mut t[2]),
        circulant_forward_backward_ms: median(&mut t[3]),
        params: [d * d + d, 2 * d],
    }
}
