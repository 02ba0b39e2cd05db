//! Whole-model CPU inference for compressed networks.
//!
//! Pruned networks: every fully connected layer runs as
//! [`CsrLinear`] and every convolution as [`SparseIm2colConv`], so the weights that pruning
//! removed are neither stored nor multiplied (Han et al. 2015, "Learning both weights and
//! connections", section 5: the pruned network's speed-up on CPU comes from sparse
//! matrix-vector products), except convolutions that kept more than [`DenseConv::DENSITY`] of
//! their weights: those run dense on convpress's training kernels, which is faster there. The
//! rest (batch-norm in evaluation form, ReLU, pooling, flatten, residual sums) is plain Rust on
//! `[batch, C, H, W]` row-major activations.
//!
//! Quantized networks (a [`QuantSpec`] on the checkpoint, issue #12): each quantized
//! convolution runs as [`Int8Conv`] and each quantized linear layer as [`Int8Linear`], with a
//! ReLU that follows folded into their epilogue; layers kept in float run as above. A
//! quantized layer with binary inputs (XNOR-Net, issue #13) runs as [`BinaryConv`] or
//! [`BinaryLinear`] on the XNOR-popcount kernels, and one of binary or ternary weights on float
//! inputs (BWN, TWN) as [`SignedConv`] or [`SignedLinear`] on the table-lookup kernels.

use super::binary::{BinaryConv, BinaryLinear};
use super::circulant::CirculantLinear;
use super::conv::{Conv2dKernel, ConvGeometry, DenseConv, DirectConv, SparseIm2colConv};
use super::int8::{Int8Conv, Int8Linear};
use super::signed::{SignedConv, SignedLinear};
use super::sparse::CsrLinear;
use super::{Activations, LinearKernel};
use crate::checkpoint::{CheckpointError, Loaded};
use crate::compress::quantize::QuantSpec;
use crate::kernels::{self, pool::PoolProblem};
use crate::models::{Arch, LayerSpec, Shape};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

pub use crate::compress::fold::BATCH_NORM_EPSILON;

/// Images per thread from which [`SparseModel::forward`] splits a batch across threads.
pub const SPLIT_MIN: usize = 8;

/// Element-wise work below this runs on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 32 * 1024;

/// (A model holds a few dozen steps: its layers stay inline rather than boxed.)
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum Op {
    Conv(ConvLayer),
    Linear(CsrLinear),
    Circulant(CirculantLinear),
    Int8Linear(Int8Linear),
    BitLinear(BitLinear),
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
    /// `[relu(x), relu(−x)]` along the channels.
    CRelu,
    /// Branches on one input, concatenated along the channels.
    Concat {
        branches: Vec<Vec<Step>>,
    },
}

impl Op {
    /// The step lists nested in this one (a residual block's branches, a concatenation's).
    fn children(&self) -> Vec<&Vec<Step>> {
        match self {
            Op::Residual { body, shortcut } => vec![body, shortcut],
            Op::Concat { branches } => branches.iter().collect(),
            _ => vec![],
        }
    }

    fn children_mut(&mut self) -> Vec<&mut Vec<Step>> {
        match self {
            Op::Residual { body, shortcut } => vec![body, shortcut],
            Op::Concat { branches } => branches.iter_mut().collect(),
            _ => vec![],
        }
    }
}

/// A linear layer of 1- or 2-bit weights: XNOR-Net's with binary inputs, or one on float
/// inputs.
#[derive(Debug, Clone)]
enum BitLinear {
    Xnor(BinaryLinear),
    Lookup(SignedLinear),
}

impl BitLinear {
    fn kernel(&self) -> &dyn LinearKernel {
        match self {
            BitLinear::Xnor(k) => k,
            BitLinear::Lookup(k) => k,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            BitLinear::Xnor(_) => "xnor",
            BitLinear::Lookup(_) => "lookup",
        }
    }
}

/// A convolution, sparse or dense by how much of it pruning kept.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum ConvLayer {
    Sparse(SparseIm2colConv),
    Dense(DenseConv),
    Int8(Int8Conv),
    Binary(BinaryConv),
    Lookup(SignedConv),
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
            ConvLayer::Int8(k) => k,
            ConvLayer::Binary(k) => k,
            ConvLayer::Lookup(k) => k,
        }
    }

    /// Weights the kernel stores: the non-zeros for the sparse one, all for the dense one.
    fn stored(&self) -> usize {
        match self {
            ConvLayer::Sparse(k) => k.nnz(),
            ConvLayer::Dense(k) => k.layer.weight.len(),
            ConvLayer::Int8(k) => k.weights().0.len(),
            ConvLayer::Binary(k) => k.weights(),
            ConvLayer::Lookup(k) => k.weights(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            ConvLayer::Sparse(_) => "sparse im2col",
            ConvLayer::Dense(_) => "dense",
            ConvLayer::Int8(_) => "int8",
            ConvLayer::Binary(_) => "xnor",
            ConvLayer::Lookup(_) => "lookup",
        }
    }
}

/// One executed layer (a convolution with its batch-norm folded in counts as one).
#[derive(Debug, Clone)]
struct Step {
    path: String,
    kind: &'static str,
    /// Bits per weight of a conv or linear layer (32 in float).
    bits: u32,
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
    /// Which kernel runs it: "sparse im2col", "dense", "csr" or "int8".
    pub kernel: &'static str,
    /// Bits per weight: 32 in float, the quantized width otherwise.
    pub bits: u32,
    /// Whether the layer hands the int8 layer after it u8 codes (requantized in its
    /// epilogue) rather than float values.
    pub codes_out: bool,
}

/// A pruned network ready to run on the CPU.
#[derive(Debug, Clone)]
pub struct SparseModel {
    pub arch: Arch,
    steps: Vec<Step>,
    /// Bytes of every float tensor in the checkpoint (what the dense network holds).
    dense_bytes: usize,
}

/// The checkpoint's tensors by path, each taken once, and how its layers are quantized.
struct Tensors<'a> {
    map: &'a HashMap<String, (burn::tensor::TensorData, Option<burn::module::ParamId>)>,
    used: usize,
    quant: Option<&'a QuantSpec>,
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
        Ok(crate::compress::fold::batch_norm_affine(
            &gamma, &beta, &mean, &var,
        ))
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
    /// used. Int8 layers hand the int8 layers after them codes (see [`chain_codes`]).
    pub fn from_loaded(loaded: &Loaded) -> Result<Self, String> {
        Self::build_from(loaded, true)
    }

    /// [`from_loaded`](Self::from_loaded) with every int8 layer giving float values and
    /// every int8 layer quantizing its input again: the unfused form, which the fused one
    /// matches exactly (tests, and benchmarks of what fusing saves).
    pub fn from_loaded_unfused(loaded: &Loaded) -> Result<Self, String> {
        Self::build_from(loaded, false)
    }

    fn build_from(loaded: &Loaded, chained: bool) -> Result<Self, String> {
        loaded.arch.validate()?;
        let arch = loaded.arch.clone();
        let dense_bytes = loaded
            .tensors
            .values()
            .map(|(d, _)| 4 * d.num_elements())
            .sum();
        // Transformed filters run as the plain convolution they expand to.
        let expanded;
        let loaded = match crate::compress::compact::transformed::expand_model(loaded)? {
            Some(e) => {
                expanded = e;
                &expanded
            }
            None => loaded,
        };
        let mut tensors = Tensors {
            map: &loaded.tensors,
            used: 0,
            quant: loaded.quant.as_ref(),
        };
        let mut steps = build(
            &loaded.arch.layers,
            "layers",
            Shape::Map(loaded.arch.input),
            &mut tensors,
        )?;
        if chained {
            chain_codes(&mut steps)?;
        }
        if tensors.used != loaded.tensors.len() {
            let mut names: Vec<_> = loaded.tensors.keys().cloned().collect();
            names.sort();
            return Err(format!(
                "{} of the checkpoint's tensors fit no layer (tensors: {names:?})",
                loaded.tensors.len() - tensors.used
            ));
        }
        Ok(SparseModel {
            arch,
            steps,
            dense_bytes,
        })
    }

    /// Class scores `[batch, classes]` for images `[batch, C, H, W]` (row-major).
    ///
    /// A batch of at least [`SPLIT_MIN`] images per thread is split into parts of
    /// `ceil(batch / threads)` images (one per thread, or fewer), each run through the whole
    /// network on its own (every image's computation is
    /// independent): the threads then never wait for one another between layers, and each
    /// part's activations stay in its core's cache. Smaller batches run as one, each layer
    /// splitting its own work.
    pub fn forward(&self, images: &[f32], batch: usize) -> Vec<f32> {
        self.check_input(images, batch);
        let threads = rayon::current_num_threads();
        let classes = self.arch.classes;
        let whole = |x: &[f32], b: usize| {
            run(
                &self.steps,
                Activations::Values(x.to_vec()),
                b,
                &mut Probe::default(),
            )
            .into_values([classes, 1, 1])
        };
        if threads < 2 || batch < SPLIT_MIN * threads {
            return whole(images, batch);
        }
        let len = images.len() / batch;
        let per = batch.div_ceil(threads);
        let parts: Vec<Vec<f32>> = images
            .par_chunks(per * len)
            .map(|x| whole(x, x.len() / len))
            .collect();
        parts.concat()
    }

    /// [`forward`](Self::forward), showing `seen(path, input)` the input of every convolution
    /// and linear layer (calibration observes them, on float models). The input of an int8
    /// layer fed codes is shown dequantized, and after a flattened map in the channels-last
    /// order the codes have.
    pub fn forward_observed(
        &self,
        images: &[f32],
        batch: usize,
        seen: &mut dyn FnMut(&str, &[f32]),
    ) -> Vec<f32> {
        self.check_input(images, batch);
        let mut probe = Probe {
            times: None,
            inputs: Some(seen),
        };
        run(
            &self.steps,
            Activations::Values(images.to_vec()),
            batch,
            &mut probe,
        )
        .into_values([self.arch.classes, 1, 1])
    }

    /// [`forward`](Self::forward), also returning each step's wall time in execution order.
    pub fn forward_timed(&self, images: &[f32], batch: usize) -> (Vec<f32>, Vec<LayerTime>) {
        self.check_input(images, batch);
        let mut times = Vec::new();
        let mut probe = Probe {
            times: Some(&mut times),
            inputs: None,
        };
        let out = run(
            &self.steps,
            Activations::Values(images.to_vec()),
            batch,
            &mut probe,
        )
        .into_values([self.arch.classes, 1, 1]);
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
                    Op::Circulant(k) => k.weight_bytes(),
                    Op::Int8Linear(k) => k.weight_bytes(),
                    Op::BitLinear(k) => k.kernel().weight_bytes(),
                    Op::Affine { scale, shift } => 4 * (scale.len() + shift.len()),
                    op => op.children().into_iter().map(|c| sum(c)).sum(),
                })
                .sum()
        }
        sum(&self.steps)
    }

    /// Bytes of the checkpoint's dense float tensors (running statistics included).
    pub fn dense_bytes(&self) -> usize {
        self.dense_bytes
    }

    /// The same model with every int8 layer on int8 path `kernel` (tests force each one).
    pub fn with_int8_kernel(mut self, kernel: &'static dyn crate::kernels::int8::Int8Gemm) -> Self {
        fn walk(steps: &mut [Step], kernel: &'static dyn crate::kernels::int8::Int8Gemm) {
            for s in steps {
                let op = std::mem::replace(&mut s.op, Op::Flatten);
                s.op = match op {
                    Op::Conv(ConvLayer::Int8(k)) => {
                        Op::Conv(ConvLayer::Int8(k.with_kernel(kernel)))
                    }
                    Op::Int8Linear(k) => Op::Int8Linear(k.with_kernel(kernel)),
                    mut other => {
                        for c in other.children_mut() {
                            walk(c, kernel);
                        }
                        other
                    }
                };
            }
        }
        walk(&mut self.steps, kernel);
        self
    }

    /// The convolutions and fully connected layers in execution order.
    pub fn layers(&self) -> Vec<LayerInfo> {
        fn walk(steps: &[Step], out: &mut Vec<LayerInfo>) {
            for s in steps {
                let codes_out = match &s.op {
                    Op::Conv(ConvLayer::Int8(k)) => k.emits().is_some(),
                    Op::Int8Linear(k) => k.emits().is_some(),
                    _ => false,
                };
                let (weights, stored, bytes, kernel, bits) = match &s.op {
                    Op::Conv(k) => (
                        k.kernel().geometry().weight_len(),
                        k.stored(),
                        k.kernel().weight_bytes(),
                        k.name(),
                        s.bits,
                    ),
                    Op::Linear(k) => (
                        k.in_features * k.out_features,
                        k.nnz(),
                        k.weight_bytes(),
                        "csr",
                        32,
                    ),
                    Op::Circulant(k) => {
                        let d = k.in_features.max(k.out_features);
                        (
                            k.in_features * k.out_features,
                            d,
                            k.weight_bytes(),
                            "fft",
                            32,
                        )
                    }
                    Op::Int8Linear(k) => (
                        k.in_features() * k.out_features(),
                        k.weights().0.len(),
                        k.weight_bytes(),
                        "int8",
                        s.bits,
                    ),
                    Op::BitLinear(k) => {
                        let n = k.kernel().in_features() * k.kernel().out_features();
                        (n, n, k.kernel().weight_bytes(), k.name(), s.bits)
                    }
                    op => {
                        for c in op.children() {
                            walk(c, out);
                        }
                        continue;
                    }
                };
                out.push(LayerInfo {
                    path: s.path.clone(),
                    kind: s.kind,
                    weights,
                    stored,
                    bytes,
                    kernel,
                    bits,
                    codes_out,
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
        let quant = tensors.quant.and_then(|q| q.layers.get(&path)).cloned();
        let bits = quant.as_ref().map_or(32, |q| q.bits);
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
                // bias: scaling keeps zeros zero, so the sparsity pattern is unchanged. (A
                // quantized model was folded before it was quantized, so has none here.)
                if let Some(LayerSpec::BatchNorm { features }) = layers.get(i + 1)
                    && quant.is_none()
                {
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
                // A quantized layer takes the ReLU that follows into its epilogue.
                let fuse = quant.is_some() && matches!(layers.get(i + 1), Some(LayerSpec::Relu));
                if fuse {
                    kind = "conv2d+relu";
                    i += 1;
                }
                let at = |e: String| format!("{path}: {e}");
                match &quant {
                    Some(q) if q.float_input => {
                        let ternary = q.bits == 2;
                        let scales = q.weight_scales.clone();
                        let conv = SignedConv::new(geometry, &weight, ternary, scales, bias)
                            .map_err(at)?;
                        Op::Conv(ConvLayer::Lookup(if fuse {
                            conv.with_relu()
                        } else {
                            conv
                        }))
                    }
                    Some(q) if q.sign_input => {
                        let conv =
                            BinaryConv::new(geometry, &weight, q.weight_scales.clone(), bias)
                                .map_err(at)?;
                        Op::Conv(ConvLayer::Binary(if fuse {
                            conv.with_relu()
                        } else {
                            conv
                        }))
                    }
                    Some(q) => {
                        let codes = q.codes(&weight, false);
                        let conv = Int8Conv::from_codes(
                            geometry,
                            codes,
                            q.weight_quantizers(),
                            bias,
                            q.input,
                        )
                        .map_err(at)?;
                        Op::Conv(ConvLayer::Int8(if fuse { conv.with_relu() } else { conv }))
                    }
                    None => {
                        let dense = DirectConv::new(geometry, weight, bias)
                            .map_err(|e| format!("{path}: {e}"))?;
                        Op::Conv(ConvLayer::new(&dense))
                    }
                }
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
                let fuse = quant.is_some() && matches!(layers.get(i + 1), Some(LayerSpec::Relu));
                if fuse {
                    kind = "linear+relu";
                    i += 1;
                }
                let at = |e: String| format!("{path}: {e}");
                let (n_in, n_out) = (in_features, out_features);
                match &quant {
                    Some(q) if q.float_input => {
                        let ternary = q.bits == 2;
                        let scales = q.weight_scales.clone();
                        let linear =
                            SignedLinear::from_burn_layout(n_in, n_out, &w, ternary, scales, b)
                                .map_err(at)?;
                        let linear = if fuse { linear.with_relu() } else { linear };
                        Op::BitLinear(BitLinear::Lookup(linear))
                    }
                    Some(q) if q.sign_input => {
                        let scales = q.weight_scales.clone();
                        let linear = BinaryLinear::from_burn_layout(n_in, n_out, &w, scales, b)
                            .map_err(at)?;
                        let linear = if fuse { linear.with_relu() } else { linear };
                        Op::BitLinear(BitLinear::Xnor(linear))
                    }
                    Some(q) => {
                        // Burn's `[in, out]` to the kernels' `[out, in]`.
                        let codes_in_out = q.codes(&w, true);
                        let mut codes = vec![0i8; w.len()];
                        for i in 0..n_in {
                            for o in 0..n_out {
                                codes[o * n_in + i] = codes_in_out[i * n_out + o];
                            }
                        }
                        let quantizers = q.weight_quantizers();
                        let linear =
                            Int8Linear::from_codes(n_in, n_out, codes, quantizers, b, q.input)
                                .map_err(at)?;
                        Op::Int8Linear(if fuse { linear.with_relu() } else { linear })
                    }
                    None => {
                        let dense = super::DenseReference::from_burn_layout(
                            in_features,
                            out_features,
                            &w,
                            b,
                        );
                        Op::Linear(CsrLinear::from_dense(&dense))
                    }
                }
            }
            LayerSpec::Circulant {
                in_features,
                out_features,
                bias,
                sign_seed,
            } => {
                let d = in_features.max(out_features);
                let r = tensors.take(&format!("{path}.weight"), &[d])?;
                let b = if bias {
                    Some(tensors.take(&format!("{path}.bias"), &[out_features])?)
                } else {
                    None
                };
                let layer = CirculantLinear::new(in_features, out_features, &r, sign_seed, b)
                    .map_err(|e| format!("{path}: {e}"))?;
                Op::Circulant(layer)
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
            LayerSpec::CRelu => Op::CRelu,
            LayerSpec::Concat { ref branches } => Op::Concat {
                branches: (branches.iter().enumerate())
                    .map(|(b, l)| build(l, &format!("{path}.branches.{b}"), shape, tensors))
                    .collect::<Result<_, _>>()?,
            },
            LayerSpec::TransformedConv { .. } => {
                return Err(format!(
                    "{path}: internal error: transformed convolutions are expanded before the runtime is built"
                ));
            }
            LayerSpec::Residual {
                ref body,
                ref shortcut,
            } => Op::Residual {
                body: build(body, &format!("{path}.body"), shape, tensors)?,
                shortcut: build(shortcut, &format!("{path}.shortcut"), shape, tensors)?,
            },
        };
        if quant.is_some() && !matches!(op, Op::Conv(_) | Op::Int8Linear(_) | Op::BitLinear(_)) {
            return Err(format!(
                "{path} is quantized but is not a conv or linear layer"
            ));
        }
        // A folded batch-norm or ReLU keeps the shape, so `output` is still the step's output.
        steps.push(Step {
            path,
            kind,
            bits,
            op,
            input: shape,
            output,
        });
        shape = output;
        i += 1;
    }
    Ok(steps)
}

/// Lets each int8 layer whose output reaches another int8 layer through steps that commute
/// with quantization (max-pooling, ReLU, flattening) hand it codes, requantized in its
/// epilogue, channels last: no float activations between them. A linear layer that so gets a
/// flattened map takes it channels last. Residual blocks are chained inside; their sums stay
/// float.
fn chain_codes(steps: &mut [Step]) -> Result<(), String> {
    for i in 0..steps.len() {
        let children = steps[i].op.children_mut();
        if !children.is_empty() {
            for c in children {
                chain_codes(c)?;
            }
            continue;
        }
        if !matches!(
            steps[i].op,
            Op::Conv(ConvLayer::Int8(_)) | Op::Int8Linear(_)
        ) {
            continue;
        }
        let mut j = i + 1;
        while j < steps.len() && matches!(steps[j].op, Op::MaxPool { .. } | Op::Relu | Op::Flatten)
        {
            j += 1;
        }
        let next = match steps.get(j).map(|s| &s.op) {
            Some(Op::Conv(ConvLayer::Int8(k))) => k.input_quantizer(),
            Some(Op::Int8Linear(k)) => k.input_quantizer(),
            _ => continue,
        };
        let path = steps[i].path.clone();
        let emit = |op: Op| -> Result<Op, String> {
            Ok(match op {
                Op::Conv(ConvLayer::Int8(k)) => Op::Conv(ConvLayer::Int8(k.emit_codes(next)?)),
                Op::Int8Linear(k) => Op::Int8Linear(k.emit_codes(next)?),
                other => other,
            })
        };
        let op = std::mem::replace(&mut steps[i].op, Op::Flatten);
        steps[i].op = emit(op).map_err(|e| format!("{path}: {e}"))?;
        let flattened = steps[i + 1..j].iter().find_map(|s| match (&s.op, s.input) {
            (Op::Flatten, Shape::Map(dims)) => Some(dims),
            _ => None,
        });
        if let Some(dims) = flattened {
            let op = std::mem::replace(&mut steps[j].op, Op::Flatten);
            steps[j].op = match op {
                Op::Int8Linear(k) => Op::Int8Linear(
                    k.channels_last_input(dims)
                        .map_err(|e| format!("{}: {e}", steps[j].path))?,
                ),
                other => other,
            };
        }
    }
    Ok(())
}

/// Sees the input of a weighted layer: `(path, input)`.
type InputWatcher<'a> = &'a mut dyn FnMut(&str, &[f32]);

/// What a run reports as it goes: each step's time, each weighted layer's input.
#[derive(Default)]
struct Probe<'a> {
    times: Option<&'a mut Vec<LayerTime>>,
    inputs: Option<InputWatcher<'a>>,
}

fn run(steps: &[Step], mut x: Activations, batch: usize, probe: &mut Probe) -> Activations {
    for step in steps {
        if let Some(seen) = probe.inputs.as_deref_mut()
            && matches!(
                step.op,
                Op::Conv(_) | Op::Linear(_) | Op::Int8Linear(_) | Op::BitLinear(_)
            )
        {
            match &x {
                Activations::Values(v) => seen(&step.path, v),
                codes => seen(&step.path, &codes.clone().into_values(dims(step.input))),
            }
        }
        let start = Instant::now();
        let nested = !step.op.children().is_empty();
        x = step.forward(x, batch, probe);
        if let Some(t) = probe.times.as_deref_mut()
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
    fn forward(&self, x: Activations, batch: usize, probe: &mut Probe) -> Activations {
        let [c, h, w] = dims(self.input);
        let [oc, oh, ow] = dims(self.output);
        let out_len = batch * oc * oh * ow;
        // Codes go on as codes through the steps that commute with quantization.
        let x = match (&self.op, x) {
            (Op::Conv(ConvLayer::Int8(k)), x) => return k.run(&x, batch, [h, w]),
            (Op::Int8Linear(k), x) => return k.run(&x, batch),
            (Op::Flatten, x) => return x,
            (Op::MaxPool { kernel, stride }, Activations::Codes { codes, quantizer }) => {
                return Activations::Codes {
                    codes: max_pool_codes(&codes, batch, [c, h, w], *kernel, *stride),
                    quantizer,
                };
            }
            (
                Op::Relu,
                Activations::Codes {
                    mut codes,
                    quantizer,
                },
            ) => {
                // The code of 0.0 is the zero point, and quantization is monotonic.
                let zero = quantizer.zero_point as u8;
                codes.iter_mut().for_each(|v| *v = (*v).max(zero));
                return Activations::Codes { codes, quantizer };
            }
            (_, x) => x.into_values([c, h, w]),
        };
        Activations::Values(self.forward_values(x, batch, out_len, probe))
    }

    /// The step on float activations, channels first.
    fn forward_values(
        &self,
        mut x: Vec<f32>,
        batch: usize,
        out_len: usize,
        probe: &mut Probe,
    ) -> Vec<f32> {
        let [c, h, w] = dims(self.input);
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
            Op::Circulant(k) => {
                let mut y = vec![0f32; out_len];
                k.forward(&x, batch, &mut y);
                y
            }
            Op::Int8Linear(k) => {
                let mut y = vec![0f32; out_len];
                k.forward(&x, batch, &mut y);
                y
            }
            Op::BitLinear(k) => {
                let mut y = vec![0f32; out_len];
                k.kernel().forward(&x, batch, &mut y);
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
                let (a, b) = (
                    run(body, Activations::Values(x.clone()), batch, probe),
                    run(shortcut, Activations::Values(x), batch, probe),
                );
                let [oc, oh, ow] = dims(self.output);
                let mut a = a.into_values([oc, oh, ow]);
                let b = b.into_values([oc, oh, ow]);
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            }
            Op::CRelu => {
                // Per image: the C planes rectified, then the C planes negated and rectified.
                let image = c * h * w;
                let mut y = Vec::with_capacity(2 * x.len());
                for img in x.chunks_exact(image) {
                    y.extend(img.iter().map(|v| v.max(0.0)));
                    y.extend(img.iter().map(|v| (-v).max(0.0)));
                }
                y
            }
            Op::Concat { branches } => {
                let parts: Vec<Vec<f32>> = branches
                    .iter()
                    .map(|b| {
                        let out = b.last().map_or(self.input, |s| s.output);
                        run(b, Activations::Values(x.clone()), batch, probe).into_values(dims(out))
                    })
                    .collect();
                // Per image, each branch's channels in turn.
                let mut y = Vec::with_capacity(out_len);
                for n in 0..batch {
                    for p in &parts {
                        let per = p.len() / batch.max(1);
                        y.extend_from_slice(&p[n * per..(n + 1) * per]);
                    }
                }
                y
            }
        }
    }
}

/// Max-pooling (no padding) of codes `[batch, H, W, C]` channels last: the same codes as
/// quantizing the pooled values, since quantization is monotonic (but for NaN values, which
/// codes cannot hold).
fn max_pool_codes(
    codes: &[u8],
    batch: usize,
    [c, h, w]: [usize; 3],
    [kh, kw]: [usize; 2],
    [sh, sw]: [usize; 2],
) -> Vec<u8> {
    let (oh, ow) = ((h - kh) / sh + 1, (w - kw) / sw + 1);
    let mut out = vec![0u8; batch * oh * ow * c];
    // Down the window's rows first (whole image rows, contiguous), then across its columns.
    let image = |(src, dst): (&[u8], &mut [u8])| {
        let line = w * c;
        let mut rows = vec![0u8; line];
        for (oy, out) in dst.chunks_exact_mut(ow * c).enumerate() {
            let y0 = oy * sh;
            rows.copy_from_slice(&src[y0 * line..(y0 + 1) * line]);
            for i in 1..kh {
                let next = &src[(y0 + i) * line..(y0 + i + 1) * line];
                rows.iter_mut()
                    .zip(next)
                    .for_each(|(m, &v)| *m = (*m).max(v));
            }
            for (ox, px) in out.chunks_exact_mut(c).enumerate() {
                let x0 = ox * sw * c;
                px.iter_mut()
                    .zip(&rows[x0..x0 + c])
                    .for_each(|(d, &v)| *d = v);
                for j in 1..kw {
                    let at = x0 + j * c;
                    px.iter_mut()
                        .zip(&rows[at..at + c])
                        .for_each(|(d, &v)| *d = (*d).max(v));
                }
            }
        }
    };
    let (per_in, per_out) = (h * w * c, oh * ow * c);
    if codes.len() >= PARALLEL_MIN_ELEMENTS && batch > 1 {
        codes
            .par_chunks(per_in)
            .zip(out.par_chunks_mut(per_out))
            .for_each(image);
    } else {
        codes
            .chunks(per_in)
            .zip(out.chunks_mut(per_out))
            .for_each(image);
    }
    out
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

/// Test loss (mean cross-entropy) and accuracy of `model` on `set`, `batch` images at a time:
/// what `eval` reports for a model that runs on this runtime (a quantized one: its accuracy is
/// the int8 kernels', not that of its dequantized weights in float).
pub fn evaluate(model: &SparseModel, set: &crate::data::ImageSet, batch: usize) -> (f64, f64) {
    let len = set.image_len();
    let classes = model.arch.classes;
    let (mut loss, mut correct) = (0f64, 0usize);
    for start in (0..set.n).step_by(batch.max(1)) {
        let b = batch.min(set.n - start);
        let logits = model.forward(&set.pixels[start * len..(start + b) * len], b);
        for (row, &label) in logits
            .chunks_exact(classes)
            .zip(&set.labels[start..start + b])
        {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
            loss += sum.ln() - (row[label as usize] - max) as f64;
            let best = row
                .iter()
                .enumerate()
                .fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
            correct += usize::from(best == label as usize);
        }
    }
    let n = set.n.max(1) as f64;
    (loss / n, correct as f64 / n)
}
