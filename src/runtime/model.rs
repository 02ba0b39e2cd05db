//! Whole-model CPU inference for pruned networks: every fully connected layer runs as
//! [`CsrLinear`] and every convolution as [`SparseIm2colConv`], so the weights that pruning
//! removed are neither stored nor multiplied (Han et al. 2015, "Learning both weights and
//! connections", section 5: the pruned network's speed-up on CPU comes from sparse
//! matrix-vector products), except convolutions that kept more than [`DenseConv::DENSITY`] of
//! their weights: those run dense on convpress's training kernels, which is faster there. The
//! rest (batch-norm in evaluation form, ReLU, pooling, flatten, residual sums) is plain Rust on
//! `[batch, C, H, W]` row-major activations.

use super::LinearKernel;
use super::conv::{Conv2dKernel, ConvGeometry, DenseConv, DirectConv, SparseIm2colConv};
use super::sparse::CsrLinear;
use crate::checkpoint::{CheckpointError, Loaded};
use crate::kernels::{self, pool::PoolProblem};
use crate::models::{Arch, LayerSpec, Shape};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// Burn's `BatchNormConfig` default; checkpoints do not store epsilon.
pub const BATCH_NORM_EPSILON: f64 = 1e-5;

/// Element-wise work below this runs on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 32 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Conv(ConvLayer),
    Linear(CsrLinear),
    /// Batch-norm in evaluation form, `x * scale[c] + shift[c]` (when no convolution precedes
    /// it to fold it into).
    Affine {
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Relu,
    MaxPool {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    AvgPool {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    GlobalAvgPool,
    Flatten,
    Residual {
        body: Vec<Step>,
        shortcut: Vec<Step>,
    },
}

/// A convolution, sparse or dense by how much of it pruning kept.
#[derive(Debug, Clone)]
enum ConvLayer {
    Sparse(SparseIm2colConv),
    Dense(DenseConv),
}

impl ConvLayer {
    fn new(dense: &DirectConv) -> Self {
        let stored = dense.weight.iter().filter(|&&w| w != 0.0).count();
        if DenseConv::pays_off(&dense.geometry, stored) {
            ConvLayer::Dense(DenseConv::from_reference(dense))
        } else {
            ConvLayer::Sparse(SparseIm2colConv::from_dense(dense))
        }
    }

    fn kernel(&self) -> &dyn Conv2dKernel {
        match self {
            ConvLayer::Sparse(k) => k,
            ConvLayer::Dense(k) => k,
        }
    }

    /// Weights the kernel stores: the non-zeros for the sparse one, all for the dense one.
    fn stored(&self) -> usize {
        match self {
            ConvLayer::Sparse(k) => k.nnz(),
            ConvLayer::Dense(k) => k.layer.weight.len(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            ConvLayer::Sparse(_) => "sparse im2col",
            ConvLayer::Dense(_) => "dense",
        }
    }
}

/// One executed layer (a convolution with its batch-norm folded in counts as one).
#[derive(Debug, Clone)]
struct Step {
    path: String,
    kind: &'static str,
    op: Op,
    input: Shape,
    output: Shape,
}

/// Wall time of one step in [`SparseModel::forward_timed`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerTime {
    pub path: String,
    pub kind: &'static str,
    pub seconds: f64,
}

/// What one weighted layer holds, from [`SparseModel::layers`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerInfo {
    pub path: String,
    pub kind: &'static str,
    /// Weights of the dense layer.
    pub weights: usize,
    /// Weights stored (the non-zeros).
    pub stored: usize,
    /// Bytes the runtime holds for the layer.
    pub bytes: usize,
    /// Which kernel runs it: "sparse im2col", "dense" or "csr".
    pub kernel: &'static str,
}

/// A pruned network ready to run on the CPU.
#[derive(Debug, Clone)]
pub struct SparseModel {
    pub arch: Arch,
    steps: Vec<Step>,
    /// Bytes of every float tensor in the checkpoint (what the dense network holds).
    dense_bytes: usize,
}

/// The checkpoint's tensors by path, each taken once.
struct Tensors<'a> {
    map: &'a HashMap<String, (burn::tensor::TensorData, Option<burn::module::ParamId>)>,
    used: usize,
}

impl Tensors<'_> {
    fn take(&mut self, path: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        let (data, _) = self
            .map
            .get(path)
            .ok_or_else(|| format!("no tensor {path}"))?;
        if data.shape().to_vec() != shape {
            return Err(format!(
                "tensor {path} has shape {:?}, the architecture needs {shape:?}",
                data.shape().to_vec()
            ));
        }
        self.used += 1;
        data.try_to_vec::<f32>()
            .map_err(|e| format!("tensor {path} is not f32: {e:?}"))
    }

    /// `scale` and `shift` of batch-norm `path` in evaluation form.
    fn batch_norm(&mut self, path: &str, features: usize) -> Result<(Vec<f32>, Vec<f32>), String> {
        let mut t = |name: &str| self.take(&format!("{path}.{name}"), &[features]);
        let (gamma, beta, mean, var) = (
            t("gamma")?,
            t("beta")?,
            t("running_mean")?,
            t("running_var")?,
        );
        let scale: Vec<f32> = gamma
            .iter()
            .zip(&var)
            .map(|(&g, &v)| (g as f64 / (v as f64 + BATCH_NORM_EPSILON).sqrt()) as f32)
            .collect();
        let shift = beta
            .iter()
            .zip(&mean)
            .zip(&scale)
            .map(|((&b, &m), &s)| b - m * s)
            .collect();
        Ok((scale, shift))
    }
}

impl SparseModel {
    /// Reads a checkpoint (`.safetensors` or `.cpz`) and builds its runtime.
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        let loaded = crate::checkpoint::read(path)?;
        SparseModel::from_loaded(&loaded).map_err(|why| CheckpointError::Invalid {
            path: path.display().to_string(),
            why,
        })
    }

    /// Builds the runtime from a checkpoint's architecture and tensors; every tensor must be
    /// used.
    pub fn from_loaded(loaded: &Loaded) -> Result<Self, String> {
        loaded.arch.validate()?;
        let mut tensors = Tensors {
            map: &loaded.tensors,
            used: 0,
        };
        let steps = build(
            &loaded.arch.layers,
            "layers",
            Shape::Map(loaded.arch.input),
            &mut tensors,
        )?;
        if tensors.used != loaded.tensors.len() {
            let mut names: Vec<_> = loaded.tensors.keys().cloned().collect();
            names.sort();
            return Err(format!(
                "{} of the checkpoint's tensors fit no layer (tensors: {names:?})",
                loaded.tensors.len() - tensors.used
            ));
        }
        let dense_bytes = loaded
            .tensors
            .values()
            .map(|(d, _)| 4 * d.num_elements())
            .sum();
        Ok(SparseModel {
            arch: loaded.arch.clone(),
            steps,
            dense_bytes,
        })
    }

    /// Class scores `[batch, classes]` for images `[batch, C, H, W]` (row-major).
    pub fn forward(&self, images: &[f32], batch: usize) -> Vec<f32> {
        self.check_input(images, batch);
        run(&self.steps, images.to_vec(), batch, None)
    }

    /// [`forward`](Self::forward), also returning each step's wall time in execution order.
    pub fn forward_timed(&self, images: &[f32], batch: usize) -> (Vec<f32>, Vec<LayerTime>) {
        self.check_input(images, batch);
        let mut times = Vec::new();
        let out = run(&self.steps, images.to_vec(), batch, Some(&mut times));
        (out, times)
    }

    fn check_input(&self, images: &[f32], batch: usize) {
        let [c, h, w] = self.arch.input;
        assert_eq!(
            images.len(),
            batch * c * h * w,
            "input is not [batch, {c}, {h}, {w}]"
        );
    }

    /// Bytes of the runtime's weights: stored non-zeros with their indices, biases, and the
    /// batch-norms that could not be folded.
    pub fn weight_bytes(&self) -> usize {
        fn sum(steps: &[Step]) -> usize {
            steps
                .iter()
                .map(|s| match &s.op {
                    Op::Conv(k) => k.kernel().weight_bytes(),
                    Op::Linear(k) => k.weight_bytes(),
                    Op::Affine { scale, shift } => 4 * (scale.len() + shift.len()),
                    Op::Residual { body, shortcut } => sum(body) + sum(shortcut),
                    _ => 0,
                })
                .sum()
        }
        sum(&self.steps)
    }

    /// Bytes of the checkpoint's dense float tensors (running statistics included).
    pub fn dense_bytes(&self) -> usize {
        self.dense_bytes
    }

    /// The convolutions and fully connected layers in execution order.
    pub fn layers(&self) -> Vec<LayerInfo> {
        fn walk(steps: &[Step], out: &mut Vec<LayerInfo>) {
            for s in steps {
                let (weights, stored, bytes, kernel) = match &s.op {
                    Op::Conv(k) => (
                        k.kernel().geometry().weight_len(),
                        k.stored(),
                        k.kernel().weight_bytes(),
                        k.name(),
                    ),
                    Op::Linear(k) => (
                        k.in_features * k.out_features,
                        k.nnz(),
                        k.weight_bytes(),
                        "csr",
                    ),
                    Op::Residual { body, shortcut } => {
                        walk(body, out);
                        walk(shortcut, out);
                        continue;
                    }
                    _ => continue,
                };
                out.push(LayerInfo {
                    path: s.path.clone(),
                    kind: s.kind,
                    weights,
                    stored,
                    bytes,
                    kernel,
                });
            }
        }
        let mut out = Vec::new();
        walk(&self.steps, &mut out);
        out
    }
}

fn build(
    layers: &[LayerSpec],
    prefix: &str,
    mut shape: Shape,
    tensors: &mut Tensors,
) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let path = format!("{prefix}.{i}");
        let spec = &layers[i];
        let output = spec
            .output_shape(shape)
            .map_err(|e| format!("{path}: {e}"))?;
        let mut kind = spec.kind();
        let op = match *spec {
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                pad_extra,
                dilation,
                groups,
                bias,
            } => {
                if pad_extra != [0, 0] {
                    return Err(format!(
                        "{path}: asymmetric padding (a low-resolution twin's even kernel) is not supported by the sparse runtime"
                    ));
                }
                let geometry = ConvGeometry {
                    in_channels,
                    out_channels,
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                };
                let wshape = [out_channels, in_channels / groups, kernel[0], kernel[1]];
                let mut weight = tensors.take(&format!("{path}.weight"), &wshape)?;
                let mut bias = if bias {
                    Some(tensors.take(&format!("{path}.bias"), &[out_channels])?)
                } else {
                    None
                };
                // A batch-norm right after the convolution is folded into its weights and
                // bias: scaling keeps zeros zero, so the sparsity pattern is unchanged.
                if let Some(LayerSpec::BatchNorm { features }) = layers.get(i + 1) {
                    let (scale, shift) =
                        tensors.batch_norm(&format!("{prefix}.{}", i + 1), *features)?;
                    let patch = geometry.patch_len();
                    for (o, w) in weight.chunks_exact_mut(patch).enumerate() {
                        w.iter_mut().for_each(|v| *v *= scale[o]);
                    }
                    let b0 = bias.unwrap_or_else(|| vec![0.0; out_channels]);
                    bias = Some(
                        b0.iter()
                            .enumerate()
                            .map(|(o, &b)| b * scale[o] + shift[o])
                            .collect(),
                    );
                    kind = "conv2d+batch_norm";
                    i += 1;
                }
                let dense =
                    DirectConv::new(geometry, weight, bias).map_err(|e| format!("{path}: {e}"))?;
                Op::Conv(ConvLayer::new(&dense))
            }
            LayerSpec::Linear {
                in_features,
                out_features,
                bias,
            } => {
                let w = tensors.take(&format!("{path}.weight"), &[in_features, out_features])?;
                let b = if bias {
                    Some(tensors.take(&format!("{path}.bias"), &[out_features])?)
                } else {
                    None
                };
                let dense =
                    super::DenseReference::from_burn_layout(in_features, out_features, &w, b);
                Op::Linear(CsrLinear::from_dense(&dense))
            }
            LayerSpec::BatchNorm { features } => {
                let (scale, shift) = tensors.batch_norm(&path, features)?;
                Op::Affine { scale, shift }
            }
            LayerSpec::Relu => Op::Relu,
            LayerSpec::MaxPool { kernel, stride } => Op::MaxPool { kernel, stride },
            LayerSpec::AvgPool { kernel, stride } => Op::AvgPool { kernel, stride },
            LayerSpec::GlobalAvgPool => Op::GlobalAvgPool,
            LayerSpec::Flatten => Op::Flatten,
            LayerSpec::Residual {
                ref body,
                ref shortcut,
            } => Op::Residual {
                body: build(body, &format!("{path}.body"), shape, tensors)?,
                shortcut: build(shortcut, &format!("{path}.shortcut"), shape, tensors)?,
            },
        };
        // A folded batch-norm keeps the shape, so `output` is still the step's output.
        steps.push(Step {
            path,
            kind,
            op,
            input: shape,
            output,
        });
        shape = output;
        i += 1;
    }
    Ok(steps)
}

fn run(
    steps: &[Step],
    mut x: Vec<f32>,
    batch: usize,
    mut times: Option<&mut Vec<LayerTime>>,
) -> Vec<f32> {
    for step in steps {
        let start = Instant::now();
        let nested = matches!(step.op, Op::Residual { .. });
        x = step.forward(x, batch, times.as_deref_mut());
        if let Some(t) = times.as_deref_mut()
            && !nested
        {
            t.push(LayerTime {
                path: step.path.clone(),
                kind: step.kind,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
    }
    x
}

/// `[C, H, W]` of a feature map (a flat vector is `[F, 1, 1]`).
fn dims(s: Shape) -> [usize; 3] {
    match s {
        Shape::Map(m) => m,
        Shape::Flat(f) => [f, 1, 1],
    }
}

impl Step {
    fn forward(
        &self,
        mut x: Vec<f32>,
        batch: usize,
        times: Option<&mut Vec<LayerTime>>,
    ) -> Vec<f32> {
        let [c, h, w] = dims(self.input);
        let [oc, oh, ow] = dims(self.output);
        let out_len = batch * oc * oh * ow;
        match &self.op {
            Op::Conv(k) => {
                let mut y = vec![0f32; out_len];
                k.kernel().forward(&x, batch, [h, w], &mut y);
                y
            }
            Op::Linear(k) => {
                let mut y = vec![0f32; out_len];
                k.forward(&x, batch, &mut y);
                y
            }
            Op::Affine { scale, shift } => {
                let plane = h * w;
                let f = |(i, v): (usize, &mut [f32])| {
                    let ch = i % c;
                    v.iter_mut().for_each(|v| *v = *v * scale[ch] + shift[ch]);
                };
                if x.len() >= PARALLEL_MIN_ELEMENTS {
                    x.par_chunks_mut(plane).enumerate().for_each(f);
                } else {
                    x.chunks_mut(plane).enumerate().for_each(f);
                }
                x
            }
            Op::Relu => {
                if x.len() >= PARALLEL_MIN_ELEMENTS {
                    x.par_chunks_mut(4096)
                        .for_each(|v| v.iter_mut().for_each(|v| *v = v.max(0.0)));
                } else {
                    x.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                x
            }
            Op::MaxPool { kernel, stride } => pool(&x, [h, w], *kernel, *stride, true),
            Op::AvgPool { kernel, stride } => pool(&x, [h, w], *kernel, *stride, false),
            Op::GlobalAvgPool => {
                let n = (h * w) as f32;
                x.chunks_exact(h * w)
                    .map(|p| p.iter().sum::<f32>() / n)
                    .collect()
            }
            Op::Flatten => x,
            Op::Residual { body, shortcut } => {
                let mut times = times;
                let mut a = run(body, x.clone(), batch, times.as_deref_mut());
                let b = run(shortcut, x, batch, times);
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            }
        }
    }
}

/// Unpadded pooling with window `kernel` and `stride` on every `[H, W]` plane, on the training
/// kernels ([`crate::kernels::pool`]): the maximum (NaN propagating, as in Burn), or the mean
/// (no padding, so every window has `kh * kw` elements).
fn pool(
    x: &[f32],
    [h, w]: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    max: bool,
) -> Vec<f32> {
    let p = PoolProblem {
        planes: x.len() / (h * w).max(1),
        in_hw: [h, w],
        kernel,
        stride,
        padding: [0, 0],
        dilation: [1, 1],
    };
    if max {
        kernels::pool::max_forward(&p, x).0
    } else {
        kernels::pool::avg_forward(&p, x, true)
    }
}
