//! Learned step sizes for quantization-aware training (LSQ: Esser et al. 2020, "Learned Step
//! Size Quantization", ICLR 2020). The step of every quantizer is a trained parameter: each
//! output channel's weight step and each quantized layer's input step. The forward pass is
//! eqs. 1 and 2, `v̂ = (⌊clip(v/s + z, lo, hi)⌉ − z) · s`; the gradient reaches `v` as the clipped
//! identity and `s` as eq. 3, `⌊v/s⌉ − v/s` inside the range and the range's bound outside,
//! scaled by `g = 1/√(N·Qp)` (section 2.2, `N` the values that share the step) so that a step
//! moves at the rate of the values it quantizes.
//!
//! The steps live outside the network (it keeps its structure and its saved form): the QAT
//! hook owns them, gives them to each forward pass, takes their gradients after backward
//! (`TrainHook::own_gradients`) and updates them with an optimizer of its own, built like the
//! run's but without weight decay. Weight steps start where the weights' quantization error is
//! least (the paper starts from `2⟨|v|⟩/√Qp`, a range of about 22⟨|v|⟩ at 8 bits: far beyond
//! a trained layer's largest weight, a coarser grid than needed); input steps start from
//! calibration. Zero points stay as calibrated: after a ReLU they are 0, as in the paper.
//! Unlike the paper (one step a layer, codes down to `−2^(b−1)`), weights have a step per
//! output channel, with `N` the channel's weights, and the symmetric codes `±(2^(b−1) − 1)`
//! of the int8 runtime.

use super::quantize::Quantizer;
use crate::checkpoint::{Loaded, floats};
use burn::module::{Module, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::tensor::Gradients;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The smallest step an update may leave: a step at zero or below would divide by zero.
const MIN_STEP: f32 = 1e-8;

/// `x` quantized on the grid of `step` (broadcast over `x`), zero point `zero_point`, codes in
/// `lo ..= hi`: eqs. 1-2 forward, eq. 3 backward (see the module's documentation).
pub fn lsq<const D: usize>(
    x: Tensor<D>,
    step: Tensor<D>,
    zero_point: i32,
    lo: i32,
    hi: i32,
) -> Tensor<D> {
    let z = zero_point as f32;
    let v = (x / step.clone()).add_scalar(z).clamp(lo as f32, hi as f32);
    let rounded = v.clone() + (v.clone().round() - v).detach();
    rounded.sub_scalar(z) * step
}

/// `s` forward, `g · ∂L/∂s` backward: LSQ's gradient scale.
pub fn scale_gradient<const D: usize>(s: Tensor<D>, g: f32) -> Tensor<D> {
    let scaled = s.clone().mul_scalar(g);
    (s - scaled.clone()).detach() + scaled
}

/// LSQ's gradient scale for a step shared by `n` values with `levels` positive codes.
pub fn gradient_scale(n: usize, levels: i32) -> f32 {
    1.0 / ((n.max(1) as f32) * levels.max(1) as f32).sqrt()
}

/// A conv weight `[out, in, kh, kw]` on the symmetric grid of `bits` bits with one step per
/// output channel (`steps`, `[out]`).
pub fn lsq_conv(w: Tensor<4>, steps: Tensor<1>, bits: u32) -> Tensor<4> {
    let [out, i, kh, kw] = w.dims();
    let hi = (1i32 << (bits - 1)) - 1;
    let s = scale_gradient(steps, gradient_scale(i * kh * kw, hi)).reshape([out, 1, 1, 1]);
    lsq(w, s, 0, -hi, hi)
}

/// A linear weight in Burn's `[in, out]` with one step per output channel (column).
pub fn lsq_linear(w: Tensor<2>, steps: Tensor<1>, bits: u32) -> Tensor<2> {
    let [i, out] = w.dims();
    let hi = (1i32 << (bits - 1)) - 1;
    let s = scale_gradient(steps, gradient_scale(i, hi)).reshape([1, out]);
    lsq(w, s, 0, -hi, hi)
}

/// A layer input `[N, ...]` quantized by `q`'s zero point and bounds, on the learned `step`
/// (`[1]`) shared by every value of an image.
pub fn lsq_input<const D: usize>(x: Tensor<D>, step: Tensor<1>, q: &Quantizer) -> Tensor<D> {
    let per_image: usize = x.dims()[1..].iter().product();
    let s = scale_gradient(step, gradient_scale(per_image, q.hi - q.zero_point)).reshape([1; D]);
    lsq(x, s, q.zero_point, q.lo, q.hi)
}

/// The step of `bits`-bit symmetric quantization that makes the squared error of `values`
/// least, searched over clipping thresholds of 1% to 100% of their largest magnitude.
pub fn least_error_step(values: &[f32], bits: u32) -> f32 {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut best = (f64::INFINITY, Quantizer::symmetric(max, bits).scale);
    for k in 1..=100 {
        let q = Quantizer::symmetric(max * k as f32 / 100.0, bits);
        let error: f64 = values
            .iter()
            .map(|&v| ((q.round_trip(v) - v) as f64).powi(2))
            .sum();
        if error < best.0 {
            best = (error, q.scale);
        }
    }
    best.1
}

/// One quantized layer's steps as plain numbers: what training starts from and ends with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSteps {
    pub weight_bits: u32,
    /// One per output channel.
    pub weights: Vec<f32>,
    /// The input quantizer, its scale the learned step.
    pub input: Quantizer,
}

/// Steps by layer path.
pub type Steps = BTreeMap<String, LayerSteps>;

/// The starting steps of every layer of `weight_bits` in the float model `folded`: weights'
/// from [`least_error_step`] per output channel, inputs' from their calibrated quantizers.
pub fn initial_steps(
    folded: &Loaded,
    weight_bits: &BTreeMap<String, u32>,
    inputs: &BTreeMap<String, Quantizer>,
) -> Result<Steps, String> {
    let linear = super::ptq::channels_last_layers(&folded.arch);
    let mut steps = Steps::new();
    for (path, &bits) in weight_bits {
        let (w, shape) = floats(&folded.tensors, &format!("{path}.weight"))?;
        let channels_last = *linear
            .get(path)
            .ok_or_else(|| format!("{path} is not a layer of the model"))?;
        let channels = super::ptq::output_channels(&shape, channels_last);
        let per_channel = w.len() / channels.max(1);
        let weights = (0..channels)
            .map(|c| {
                let values: Vec<f32> = if channels_last {
                    w.iter().skip(c).step_by(channels).copied().collect()
                } else {
                    w[c * per_channel..(c + 1) * per_channel].to_vec()
                };
                least_error_step(&values, bits)
            })
            .collect();
        let input = *inputs
            .get(path)
            .ok_or_else(|| format!("{path}: no input quantizer"))?;
        steps.insert(
            path.clone(),
            LayerSteps {
                weight_bits: bits,
                weights,
                input,
            },
        );
    }
    Ok(steps)
}

/// The trained steps, in the order of [`LearnedSteps::paths`].
#[derive(Module, Debug)]
struct StepParams {
    weights: Vec<Param<Tensor<1>>>,
    inputs: Vec<Param<Tensor<1>>>,
}

/// The steps while they train: parameters on the training device, and their optimizer.
pub struct LearnedSteps {
    start: Steps,
    paths: Vec<String>,
    params: Option<StepParams>,
    optim: ModuleOptimizer,
}

impl LearnedSteps {
    pub fn new(start: Steps, optim: ModuleOptimizer) -> Self {
        LearnedSteps {
            paths: start.keys().cloned().collect(),
            start,
            params: None,
            optim,
        }
    }

    /// Puts the starting steps on `device` (once: the first epoch's).
    pub fn place(&mut self, device: &Device) {
        if self.params.is_some() {
            return;
        }
        let param = |v: Vec<f32>| {
            let n = v.len();
            Param::from_tensor(Tensor::<1>::from_data(TensorData::new(v, [n]), device))
        };
        let layers = self.paths.iter().map(|p| &self.start[p]);
        self.params = Some(StepParams {
            weights: layers.clone().map(|l| param(l.weights.clone())).collect(),
            inputs: layers.map(|l| param(vec![l.input.scale])).collect(),
        });
    }

    fn index(&self, path: &str) -> Option<(usize, &StepParams)> {
        let i = self.paths.iter().position(|p| p == path)?;
        Some((i, self.params.as_ref()?))
    }

    /// Layer `path`'s weight steps (`[out]`) and bits, if it is quantized.
    pub fn weight(&self, path: &str) -> Option<(Tensor<1>, u32)> {
        let (i, p) = self.index(path)?;
        Some((p.weights[i].val(), self.start[path].weight_bits))
    }

    /// Layer `path`'s input step (`[1]`) and quantizer, if it is quantized.
    pub fn input(&self, path: &str) -> Option<(Tensor<1>, Quantizer)> {
        let (i, p) = self.index(path)?;
        Some((p.inputs[i].val(), self.start[path].input))
    }

    /// One optimizer step on the steps' gradients (taken out of `grads`), at `lr`; a step is
    /// kept positive.
    pub fn update(&mut self, lr: f64, grads: &mut Gradients) {
        let Some(params) = self.params.take() else {
            return;
        };
        let g = GradientsParams::from_module(grads, &params);
        let stepped = self.optim.step(lr, params, g);
        let positive =
            |p: Param<Tensor<1>>| p.map(|t| t.clamp_min(MIN_STEP).detach().require_grad());
        self.params = Some(StepParams {
            weights: stepped.weights.into_iter().map(positive).collect(),
            inputs: stepped.inputs.into_iter().map(positive).collect(),
        });
    }

    /// The steps now, as plain numbers.
    pub fn values(&self) -> Steps {
        let Some(p) = &self.params else {
            return self.start.clone();
        };
        let floats = |t: &Param<Tensor<1>>| -> Vec<f32> {
            t.val()
                .detach()
                .into_data()
                .try_to_vec()
                .expect("f32 steps")
        };
        self.paths
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let start = &self.start[path];
                let input = Quantizer {
                    scale: floats(&p.inputs[i])[0],
                    ..start.input
                };
                let layer = LayerSteps {
                    weight_bits: start.weight_bits,
                    weights: floats(&p.weights[i]),
                    input,
                };
                (path.clone(), layer)
            })
            .collect()
    }
}
