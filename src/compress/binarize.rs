//! Binary and ternary weights (issue #13), trained through a [`TrainHook`]: every step's
//! forward pass sees each binarized layer's weights as the method makes them from the real
//! ("latent") weights, and the gradient reaches the latent weights through the clipped
//! straight-through estimator, `c + (b(w) − c).detach()` with `c = clamp(w, −1, 1)`: the
//! identity where `|w| ≤ 1`, zero outside (Hubara et al. 2016, eq. 4); the clipping of the
//! latent weights is BinaryConnect's (Courbariaux et al. 2015, section 2.4). After every step the latent weights are clipped to `[−1, 1]` (BinaryConnect's
//! rule, kept for every method so that they compare at equal settings; BinaryConnect's own
//! bound is its scale `H`, below). Scales are treated as constants in the backward pass.
//!
//! The methods, per output channel (filter) unless said otherwise:
//! - BinaryConnect, deterministic: `b = H·sign(w)`, with `sign(0) = +1` (Courbariaux et al.
//!   2015, eq. 1), where `H = √(1.5 / (fan_in + fan_out))` per layer, Glorot's bound, an
//!   option of the paper's code (`H = "Glorot"`; its MNIST run uses `H = 1` with a batch norm
//!   after every layer, which LeNet-5 lacks: with ±1 weights a layer sums hundreds of ±1
//!   terms, and stochastic training diverged here); latent weights are clipped to `[−H, H]`,
//!   and the straight-through estimator passes `|w| ≤ H`;
//! - BinaryConnect, stochastic: `b = +H` with probability `σ(w/H) = clip((w/H + 1)/2, 0, 1)`,
//!   else `−H` (eq. 2, with eq. 3's hard sigmoid), drawn anew at every step; the written model takes
//!   the deterministic sign;
//! - binary-weight networks (BWN): `b = α·sign(w)`, `α = mean |w|` (Rastegari et al. 2016,
//!   section 3.1);
//! - XNOR-Net: BWN's weights, and each binarized layer's input taken by its sign after a batch
//!   norm (Rastegari et al. 2016, section 3.2; [`super::xnor`]);
//! - few multiplications (Lin et al. 2016, "Neural networks with few multiplications"):
//!   TernaryConnect's stochastic ternary weights, `b = H·sign(w)` with probability `|w|/H`,
//!   else 0 (section 3.1; `H` as BinaryConnect's), so that the forward products are sign
//!   changes, and quantized back-propagation (section 3.2, [`super::few_multiplications`]);
//!   the written model rounds: `H·sign(w)` where `|w| > H/2`, else 0;
//! - ternary weight networks (TWN): `Δ = 0.7·mean |w|`, `b = α·sign(w)` where `|w| > Δ` and 0
//!   elsewhere, `α` the mean of `|w|` over `|w| > Δ` (Li et al. 2016's approximate solution;
//!   the paper states it per layer, here it is per filter, as the authors' later code does);
//! - loss-aware binarization (LAB): `b = α·sign(w)` per layer with `α = ‖d ⊙ w‖₁ / ‖d‖₁`, the
//!   closed-form proximal Newton step whose diagonal Hessian `d` is Adam's second-moment
//!   estimate, `d = √v̂ + ε` (Hou, Yao and Kwok 2017, section 3). Burn's Adam does not expose
//!   its state, so the hook keeps the same estimate from the same gradients (`β₂ = 0.999`,
//!   bias-corrected, Burn's `ε = 1e-5`), and the latent weights take Adam's steps, which is
//!   the paper's `w − ∇ℓ/d` up to Adam's momentum. The written scale is computed from the
//!   final latent weights.

use crate::models::Network;
use crate::models::network::Layer;
use crate::train::{EpochMetrics, Progress, TrainHook};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Distribution;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// A binarization or ternarization method.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// BinaryConnect, deterministic: H·sign(w), H = √(1.5 / (fan_in + fan_out)) per layer.
    BinaryConnect,
    /// BinaryConnect, stochastic: +H with probability clip((w/H + 1)/2, 0, 1), else −H.
    Stochastic,
    /// Binary-weight networks: mean |w| · sign(w) per filter.
    Bwn,
    /// XNOR-Net: BWN's weights, and binary inputs (sign after a batch norm).
    Xnor,
    /// Ternary weight networks: α · sign(w) where |w| > 0.7 mean |w|, else 0, per filter.
    Twn,
    /// Few multiplications: stochastic ternary weights (H·sign(w) with probability |w|/H, else
    /// 0), and layer inputs quantized to powers of two in back-propagation.
    FewMultiplications,
    /// Loss-aware binarization: ‖d ⊙ w‖₁ / ‖d‖₁ · sign(w) per layer, d from Adam's second moment.
    LossAware,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::BinaryConnect => "binary-connect",
            Method::Stochastic => "stochastic",
            Method::Bwn => "bwn",
            Method::Xnor => "xnor",
            Method::Twn => "twn",
            Method::FewMultiplications => "few-multiplications",
            Method::LossAware => "loss-aware",
        }
    }

    /// Whether a weight may become 0 (ternary) rather than only ±α.
    pub fn ternary(self) -> bool {
        matches!(self, Method::Twn | Method::FewMultiplications)
    }

    /// Whether the weights' gradients see the layer inputs quantized to powers of two.
    pub fn shift_backward(self) -> bool {
        self == Method::FewMultiplications
    }

    /// Whether the binarized layers' inputs are binarized too (XNOR-Net).
    pub fn binary_inputs(self) -> bool {
        self == Method::Xnor
    }
}

/// Adam's second-moment decay and the ε added to its square root (Burn's defaults).
const BETA2: f64 = 0.999;
const EPSILON: f32 = 1e-5;

/// The binarized values of one output channel's weights `row`: `alpha` is LAB's per-layer
/// scale, `h` BinaryConnect's.
fn binarize_row(method: Method, row: &[f32], alpha: Option<f32>, h: f32) -> Vec<f32> {
    let sign = |v: f32| if v >= 0.0 { 1.0 } else { -1.0 };
    let mean_abs = row.iter().map(|v| v.abs()).sum::<f32>() / row.len().max(1) as f32;
    match method {
        Method::BinaryConnect | Method::Stochastic => row.iter().map(|&v| h * sign(v)).collect(),
        Method::FewMultiplications => row
            .iter()
            .map(|&v| if v.abs() > h / 2.0 { h * sign(v) } else { 0.0 })
            .collect(),
        Method::Bwn | Method::Xnor => row.iter().map(|&v| mean_abs * sign(v)).collect(),
        Method::LossAware => {
            let a = alpha.expect("loss-aware binarization has a scale per layer");
            row.iter().map(|&v| a * sign(v)).collect()
        }
        Method::Twn => {
            let delta = 0.7 * mean_abs;
            let kept: Vec<f32> = row.iter().map(|v| v.abs()).filter(|&a| a > delta).collect();
            let a = kept.iter().sum::<f32>() / kept.len().max(1) as f32;
            row.iter()
                .map(|&v| if v.abs() > delta { a * sign(v) } else { 0.0 })
                .collect()
        }
    }
}

/// BinaryConnect's scale of a weight of `shape` (conv `[out, in, kh, kw]`, Burn's linear
/// `[in, out]`): Glorot's bound `√(1.5 / (fan_in + fan_out))`, a conv's fans counted over its
/// window, as the BinaryConnect code computes it.
pub fn glorot_scale(shape: &[usize], channels_last: bool) -> f32 {
    let (fan_in, fan_out) = if channels_last {
        (shape[0], shape[shape.len() - 1])
    } else {
        let window: usize = shape[2..].iter().product();
        (shape[1] * window, shape[0] * window)
    };
    (1.5 / (fan_in + fan_out).max(1) as f32).sqrt()
}

/// The bound latent weights are clipped to, which the straight-through estimator passes.
fn clip_bound(method: Method, shape: &[usize], channels_last: bool) -> f32 {
    match method {
        Method::BinaryConnect | Method::Stochastic | Method::FewMultiplications => {
            glorot_scale(shape, channels_last)
        }
        _ => 1.0,
    }
}

/// A weight binarized for deployment: `w` of `shape` with its output channels first (conv
/// `[out, ...]`) or last (Burn's linear `[in, out]`); `alpha` is LAB's per-layer scale.
pub fn binarize_weight(
    method: Method,
    w: &[f32],
    shape: &[usize],
    channels_last: bool,
    alpha: Option<f32>,
) -> Vec<f32> {
    let channels = super::ptq::output_channels(shape, channels_last);
    let h = glorot_scale(shape, channels_last);
    // LAB without an estimate yet (uniform `d`): the layer's mean |w|.
    let alpha = match method {
        Method::LossAware => {
            Some(alpha.unwrap_or_else(|| loss_aware_scale(w, &vec![1.0; w.len()])))
        }
        _ => alpha,
    };
    let per = w.len() / channels.max(1);
    let mut out = vec![0f32; w.len()];
    for c in 0..channels {
        let index = |i: usize| {
            if channels_last {
                i * channels + c
            } else {
                c * per + i
            }
        };
        let row: Vec<f32> = (0..per).map(|i| w[index(i)]).collect();
        for (i, v) in binarize_row(method, &row, alpha, h).into_iter().enumerate() {
            out[index(i)] = v;
        }
    }
    out
}

/// LAB's scale of a layer: `‖d ⊙ w‖₁ / ‖d‖₁`.
pub fn loss_aware_scale(w: &[f32], d: &[f32]) -> f32 {
    let num: f64 = w.iter().zip(d).map(|(w, d)| (w.abs() * d) as f64).sum();
    let den: f64 = d.iter().map(|&d| d as f64).sum();
    (num / den.max(f64::MIN_POSITIVE)) as f32
}

fn sign<const D: usize>(w: Tensor<D>) -> Tensor<D> {
    w.greater_equal_elem(0.0)
        .float()
        .mul_scalar(2.0)
        .sub_scalar(1.0)
}

/// The forward value of rows `[channels, k]` of latent weights (detached); `h` is
/// BinaryConnect's scale.
fn binarize_rows(method: Method, w: Tensor<2>, alpha: Option<f32>, h: f32) -> Tensor<2> {
    let w = w.detach();
    let mean_abs = w.clone().abs().mean_dim(1);
    match method {
        Method::BinaryConnect => sign(w).mul_scalar(h),
        Method::Stochastic => {
            let p = w.clone().div_scalar(h).add_scalar(1.0).div_scalar(2.0);
            let r = Tensor::<2>::random(w.dims(), Distribution::Uniform(0.0, 1.0), &w.device());
            r.lower(p.clamp(0.0, 1.0))
                .float()
                .mul_scalar(2.0)
                .sub_scalar(1.0)
                .mul_scalar(h)
        }
        Method::FewMultiplications => {
            let p = w.clone().abs().div_scalar(h);
            let r = Tensor::<2>::random(w.dims(), Distribution::Uniform(0.0, 1.0), &w.device());
            sign(w) * r.lower(p).float().mul_scalar(h)
        }
        Method::Bwn | Method::Xnor => sign(w) * mean_abs,
        Method::LossAware => match alpha {
            Some(a) => sign(w).mul_scalar(a),
            // No estimate yet (uniform `d`): the layer's mean |w|.
            None => sign(w.clone()) * w.abs().mean().reshape([1, 1]),
        },
        Method::Twn => {
            let delta = mean_abs.mul_scalar(0.7);
            let kept = w.clone().abs().greater(delta).float();
            let count = kept.clone().sum_dim(1).clamp_min(1.0);
            let a = (w.clone().abs() * kept.clone()).sum_dim(1) / count;
            sign(w) * kept * a
        }
    }
}

/// `w` (rows) binarized forward, the clipped straight-through estimator backward: the
/// identity where `|w| ≤ bound`.
fn ste_rows(method: Method, w: Tensor<2>, alpha: Option<f32>, bound: f32) -> Tensor<2> {
    let clipped = w.clone().clamp(-bound, bound);
    let b = binarize_rows(method, w, alpha, bound);
    clipped.clone() + (b - clipped).detach()
}

/// A conv weight `[out, in, kh, kw]` binarized per output channel.
pub fn binarize_conv(method: Method, w: Tensor<4>, alpha: Option<f32>) -> Tensor<4> {
    let dims = w.dims();
    let bound = clip_bound(method, &dims, false);
    let rows = w.reshape([dims[0], dims[1] * dims[2] * dims[3]]);
    ste_rows(method, rows, alpha, bound).reshape(dims)
}

/// A linear weight in Burn's `[in, out]` binarized per output channel (column).
pub fn binarize_linear(method: Method, w: Tensor<2>, alpha: Option<f32>) -> Tensor<2> {
    let bound = clip_bound(method, &w.dims(), true);
    ste_rows(method, w.transpose(), alpha, bound).transpose()
}

/// The training hook: binarized weights in every forward pass, latent weights clipped after
/// every step, and for LAB the second-moment estimate and the per-layer scales.
pub struct BinarizeHook {
    method: Method,
    /// The binarized layers' paths (`layers.2`).
    layers: BTreeSet<String>,
    /// LAB: the running mean of squared gradients of each layer's weight, and the steps seen.
    second_moment: BTreeMap<String, Vec<f32>>,
    steps: i32,
    /// LAB: the scale of each layer at the last forward pass.
    scales: Arc<Mutex<BTreeMap<String, f32>>>,
    /// The binarized weights, read once from the model (parameter ids survive the steps).
    weights: Vec<Weight>,
}

/// One binarized layer's weight parameter.
struct Weight {
    /// The layer's path (`layers.2`) and the parameter's (`layers.2.weight`).
    layer: String,
    param: String,
    id: burn::module::ParamId,
    rank: usize,
    /// What the latent weights are clipped to.
    bound: f32,
}

impl BinarizeHook {
    pub fn new(method: Method, layers: BTreeSet<String>) -> Self {
        BinarizeHook {
            method,
            layers,
            second_moment: BTreeMap::new(),
            steps: 0,
            scales: Arc::default(),
            weights: Vec::new(),
        }
    }

    /// Where LAB leaves each layer's scale (empty for the other methods).
    pub fn scales(&self) -> Arc<Mutex<BTreeMap<String, f32>>> {
        self.scales.clone()
    }

    /// LAB's scale of layer `path` with latent weight `w`, from the estimate so far (none yet:
    /// `d` is uniform, and the scale is mean |w|).
    fn lab_scale<const D: usize>(&self, path: &str, w: &Tensor<D>) -> Option<f32> {
        if self.method != Method::LossAware {
            return None;
        }
        let values: Vec<f32> = w.clone().detach().into_data().try_to_vec().ok()?;
        Some(self.lab_scale_of(path, &values))
    }

    /// [`Self::lab_scale`] on the weight's values; recorded as the layer's scale.
    fn lab_scale_of(&self, path: &str, values: &[f32]) -> f32 {
        let correction = 1.0 - BETA2.powi(self.steps.max(1)) as f32;
        let d: Vec<f32> = match self.second_moment.get(path) {
            Some(v) => v
                .iter()
                .map(|v| (v / correction).sqrt() + EPSILON)
                .collect(),
            None => vec![1.0; values.len()],
        };
        let a = loss_aware_scale(values, &d);
        self.scales
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_string(), a);
        a
    }

    /// The binarized weights of `model`, read once.
    fn weights(&mut self, model: &Network) -> &[Weight] {
        if self.weights.is_empty() {
            let (method, layers) = (self.method, &self.layers);
            self.weights = crate::checkpoint::named_tensors(model)
                .into_iter()
                .filter_map(|(param, id, data)| {
                    let layer = param.strip_suffix(".weight")?.to_string();
                    if !layers.contains(&layer) {
                        return None;
                    }
                    let shape = data.shape().to_vec();
                    let bound = clip_bound(method, &shape, shape.len() == 2);
                    Some(Weight {
                        layer,
                        param,
                        id,
                        rank: shape.len(),
                        bound,
                    })
                })
                .collect();
        }
        &self.weights
    }

    fn map(&self, layers: Vec<Layer>, prefix: &str) -> Vec<Layer> {
        layers
            .into_iter()
            .enumerate()
            .map(|(i, layer)| {
                let path = format!("{prefix}.{i}");
                let on = self.layers.contains(&path);
                match layer {
                    Layer::Conv2d(mut c) if on => {
                        let a = self.lab_scale(&path, &c.weight.val());
                        c.weight = c.weight.map(|w| binarize_conv(self.method, w, a));
                        Layer::Conv2d(c)
                    }
                    Layer::Linear(mut l) if on => {
                        let a = self.lab_scale(&path, &l.weight.val());
                        l.weight = l.weight.map(|w| binarize_linear(self.method, w, a));
                        Layer::Linear(l)
                    }
                    Layer::Residual(mut r) => {
                        r.body = self.map(r.body, &format!("{path}.body"));
                        r.shortcut = self.map(r.shortcut, &format!("{path}.shortcut"));
                        Layer::Residual(r)
                    }
                    layer => layer,
                }
            })
            .collect()
    }

    /// LAB: folds this step's gradients of the binarized weights into the estimate.
    fn observe(&mut self, model: &Network, grads: &GradientsParams) {
        self.weights(model);
        let b = BETA2 as f32;
        for w in &self.weights {
            let g = match w.rank {
                4 => grads.get::<4>(w.id).map(|g| g.into_data()),
                _ => grads.get::<2>(w.id).map(|g| g.into_data()),
            };
            let Some(Ok(g)) = g.map(|g| g.try_to_vec::<f32>()) else {
                continue;
            };
            let v = self
                .second_moment
                .entry(w.layer.clone())
                .or_insert_with(|| vec![0.0; g.len()]);
            for (v, g) in v.iter_mut().zip(g) {
                *v = b * *v + (1.0 - b) * g * g;
            }
        }
    }
}

impl TrainHook for BinarizeHook {
    fn name(&self) -> &str {
        "binarize"
    }

    /// XNOR-Net: the binarized layers' inputs are taken by their signs, in training and in
    /// the epoch's evaluation alike. Few multiplications: their weight gradients are taken on
    /// power-of-two inputs.
    fn on_epoch_begin(&mut self, _progress: &Progress, mut model: Network) -> Network {
        use crate::compress::qat::FakeQuantInputs;
        if self.method.binary_inputs() {
            model.fake_quant = Some(Arc::new(FakeQuantInputs::signs(&self.layers)));
        }
        if self.method.shift_backward() {
            let bits = crate::compress::few_multiplications::EXPONENT_BITS;
            let shifts = FakeQuantInputs::shift_backward(&self.layers, bits);
            model.fake_quant = Some(Arc::new(shifts));
        }
        model
    }

    fn forward_model(&mut self, _progress: &Progress, mut model: Network) -> Network {
        model.layers = self.map(std::mem::take(&mut model.layers), "layers");
        model
    }

    /// LAB: the scales from the weights the epoch leaves, which the written model takes.
    fn on_epoch_end(&mut self, _metrics: &EpochMetrics, model: &Network) {
        if self.method == Method::LossAware {
            self.weights(model);
            for (param, _, data) in crate::checkpoint::named_tensors(model) {
                let Some(w) = self.weights.iter().find(|w| w.param == param) else {
                    continue;
                };
                if let Ok(values) = data.try_to_vec::<f32>() {
                    self.lab_scale_of(&w.layer, &values);
                }
            }
        }
    }

    fn before_step(&mut self, _progress: &Progress, model: &Network, grads: &mut GradientsParams) {
        if self.method == Method::LossAware {
            self.steps += 1;
            self.observe(model, grads);
        }
    }

    fn after_step(&mut self, _progress: &Progress, model: Network) -> Network {
        self.weights(&model);
        let bounds: BTreeMap<&str, f32> = self
            .weights
            .iter()
            .map(|w| (w.param.as_str(), w.bound))
            .collect();
        crate::checkpoint::map_params_by_path(model, |path, w| {
            bounds.get(path).map(|&b| w.clamp(-b, b))
        })
    }
}
