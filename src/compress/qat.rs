//! Quantization-aware training at k bits (issue #12): the forward pass sees weights and layer
//! inputs on their quantization grids, the backward pass treats the rounding as the identity
//! (the straight-through estimator, Bengio et al. 2013), clipped: no gradient flows through an
//! input outside its quantizer's range (Hubara et al. 2016, "Binarized neural networks",
//! eq. 4; Jacob et al. 2018, section 3). Weights are fake-quantized symmetrically per output
//! channel on their current largest magnitude, so nothing of them is clipped; inputs on the
//! ranges calibrated before training, kept fixed, so that the trained network sees the grids
//! the int8 runtime runs on (up to ties: Burn rounds them to even, the quantizers away from
//! zero). The per-epoch test accuracy of the run is that of the float weights with fake-
//! quantized inputs; the written file's accuracy is measured on the int8 kernels. Batch norms
//! are folded before training (`compress::fold`).
//!
//! With learned step sizes ([`super::lsq`], Esser et al. 2020) every quantizer's step trains
//! too, and the written file is quantized on the learned steps.

use super::lsq::{self, LearnedSteps, Steps};
use super::quantize::Quantizer;
use crate::models::Network;
use crate::models::network::{Activation, Layer};
use crate::train::{EpochMetrics, Progress, TrainHook};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use burn::tensor::Gradients;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// How a layer's input is fake-quantized. (One per layer: the variants stay inline.)
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum InputGrid {
    /// On `quantizer`, or, with a learned `step` (`[1]`, tracked), on that step with the
    /// quantizer's zero point and bounds.
    Uniform {
        quantizer: Quantizer,
        step: Option<Tensor<1>>,
    },
    /// XNOR-Net: taken by its sign ([`super::xnor::sign_activation`]).
    Signs,
}

/// The input quantizer of each fake-quantized layer, by layer path; the network applies it in
/// its forward pass (`Network::fake_quant`).
#[derive(Debug, Clone, Default)]
pub struct FakeQuantInputs {
    by_path: BTreeMap<String, InputGrid>,
    /// Layers whose weight gradients see their inputs quantized to powers of two, with the
    /// exponent bits (`compress::few_multiplications`).
    shift_backward: BTreeMap<String, u32>,
}

impl FakeQuantInputs {
    pub fn new(by_path: BTreeMap<String, Quantizer>) -> Self {
        FakeQuantInputs {
            by_path: by_path
                .into_iter()
                .map(|(p, quantizer)| {
                    let grid = InputGrid::Uniform {
                        quantizer,
                        step: None,
                    };
                    (p, grid)
                })
                .collect(),
            shift_backward: BTreeMap::new(),
        }
    }

    /// The inputs of `layers` binarized by sign (XNOR-Net).
    pub fn signs(layers: &std::collections::BTreeSet<String>) -> Self {
        FakeQuantInputs {
            by_path: layers
                .iter()
                .map(|p| (p.clone(), InputGrid::Signs))
                .collect(),
            ..Default::default()
        }
    }

    /// The weight gradients of `layers` taken on their inputs quantized to powers of two with
    /// exponents of `bits` bits (few multiplications); the forward values are unchanged.
    pub fn shift_backward(layers: &std::collections::BTreeSet<String>, bits: u32) -> Self {
        FakeQuantInputs {
            shift_backward: layers.iter().map(|p| (p.clone(), bits)).collect(),
            ..Default::default()
        }
    }

    /// The exponent bits of layer `path`'s quantized back-propagation, if it has one.
    pub fn shift_bits(&self, path: &str) -> Option<u32> {
        self.shift_backward.get(path).copied()
    }

    /// `x`, the input of layer `path`, fake-quantized if the layer is one of them.
    pub fn apply(&self, path: &str, x: Activation) -> Activation {
        let Some(grid) = self.by_path.get(path) else {
            return x;
        };
        let (q, step) = match grid {
            InputGrid::Uniform { quantizer, step } => (quantizer, step),
            InputGrid::Signs => {
                return match x {
                    Activation::Map(t) => Activation::Map(super::xnor::sign_activation(t)),
                    Activation::Flat(t) => Activation::Flat(super::xnor::sign_activation(t)),
                };
            }
        };
        match (step, x) {
            (None, Activation::Map(t)) => Activation::Map(fake_quant(t, q)),
            (None, Activation::Flat(t)) => Activation::Flat(fake_quant(t, q)),
            (Some(s), Activation::Map(t)) => Activation::Map(lsq::lsq_input(t, s.clone(), q)),
            (Some(s), Activation::Flat(t)) => Activation::Flat(lsq::lsq_input(t, s.clone(), q)),
        }
    }
}

/// `q(x)` in the forward pass, the clipped identity backward: `c + (round(c / s) · s − c)`
/// with the bracket detached, `c = clamp(x, range)`. Zero points are integers, so the grid is
/// the multiples of the step.
pub fn fake_quant<const D: usize>(x: Tensor<D>, q: &Quantizer) -> Tensor<D> {
    let (lo, hi) = q.range();
    let clipped = x.clamp(lo, hi);
    let on_grid = (clipped.clone() / q.scale).round() * q.scale;
    clipped.clone() + (on_grid - clipped).detach()
}

/// Per-output-channel symmetric fake quantization of `w` (`[channels, rest]`) at `bits`, the
/// step from each channel's largest magnitude (detached: only the weights train).
fn fake_quant_rows(w: Tensor<2>, bits: u32) -> Tensor<2> {
    let hi = ((1i32 << (bits - 1)) - 1) as f32;
    let step = (w.clone().abs().max_dim(1) / hi).clamp_min(1e-8).detach();
    let on_grid = (w.clone() / step.clone()).round().clamp(-hi, hi) * step;
    w.clone() + (on_grid - w).detach()
}

/// A conv weight `[out, in, kh, kw]` fake-quantized per output channel.
pub fn fake_quant_conv(w: Tensor<4>, bits: u32) -> Tensor<4> {
    let dims = w.dims();
    fake_quant_rows(w.reshape([dims[0], dims[1] * dims[2] * dims[3]]), bits).reshape(dims)
}

/// A linear weight in Burn's `[in, out]` fake-quantized per output channel (column).
pub fn fake_quant_linear(w: Tensor<2>, bits: u32) -> Tensor<2> {
    fake_quant_rows(w.transpose(), bits).transpose()
}

/// The training hook: sets the network's input fake quantization at every epoch, and gives
/// every step's forward pass weights on their grids (gradients reach the trained weights
/// through the straight-through estimator). With learned steps it also trains every step.
pub struct QatHook {
    /// Bits of each quantized layer's weights, by layer path.
    bits: BTreeMap<String, u32>,
    inputs: Arc<FakeQuantInputs>,
    learned: Option<LearnedSteps>,
    /// The learned steps at the end of the last epoch trained.
    result: Arc<Mutex<Option<Steps>>>,
}

impl QatHook {
    /// Steps fixed: weights' from their largest magnitude, inputs' as calibrated.
    pub fn new(bits: BTreeMap<String, u32>, inputs: BTreeMap<String, Quantizer>) -> Self {
        QatHook {
            bits,
            inputs: Arc::new(FakeQuantInputs::new(inputs)),
            learned: None,
            result: Arc::default(),
        }
    }

    /// Steps learned (LSQ) from `start`, updated by `optim` at the run's learning rate.
    pub fn learning(start: Steps, optim: ModuleOptimizer) -> Self {
        let bits = start
            .iter()
            .map(|(p, l)| (p.clone(), l.weight_bits))
            .collect();
        let inputs = start.iter().map(|(p, l)| (p.clone(), l.input)).collect();
        QatHook {
            learned: Some(LearnedSteps::new(start, optim)),
            ..QatHook::new(bits, inputs)
        }
    }

    /// Where the learned steps are left after every epoch (`None` with fixed steps).
    pub fn learned_steps(&self) -> Arc<Mutex<Option<Steps>>> {
        self.result.clone()
    }

    fn map(&self, layers: Vec<Layer>, prefix: &str) -> Vec<Layer> {
        layers
            .into_iter()
            .enumerate()
            .map(|(i, layer)| {
                let path = format!("{prefix}.{i}");
                let bits = self.bits.get(&path).copied();
                let learned = self.learned.as_ref().and_then(|l| l.weight(&path));
                match (layer, bits, learned) {
                    (Layer::Conv2d(mut c), _, Some((steps, b))) => {
                        c.weight = c.weight.map(|w| lsq::lsq_conv(w, steps, b));
                        Layer::Conv2d(c)
                    }
                    (Layer::Linear(mut l), _, Some((steps, b))) => {
                        l.weight = l.weight.map(|w| lsq::lsq_linear(w, steps, b));
                        Layer::Linear(l)
                    }
                    (Layer::Conv2d(mut c), Some(b), None) => {
                        c.weight = c.weight.map(|w| fake_quant_conv(w, b));
                        Layer::Conv2d(c)
                    }
                    (Layer::Linear(mut l), Some(b), None) => {
                        l.weight = l.weight.map(|w| fake_quant_linear(w, b));
                        Layer::Linear(l)
                    }
                    (Layer::Residual(mut r), _, _) => {
                        r.body = self.map(r.body, &format!("{path}.body"));
                        r.shortcut = self.map(r.shortcut, &format!("{path}.shortcut"));
                        Layer::Residual(r)
                    }
                    (layer, _, _) => layer,
                }
            })
            .collect()
    }

    /// The inputs' quantizers on the steps as they are now (fixed, for evaluation).
    fn current_inputs(&self) -> Arc<FakeQuantInputs> {
        match &self.learned {
            None => self.inputs.clone(),
            Some(l) => Arc::new(FakeQuantInputs::new(
                l.values().into_iter().map(|(p, s)| (p, s.input)).collect(),
            )),
        }
    }
}

impl TrainHook for QatHook {
    fn name(&self) -> &str {
        "qat"
    }

    fn on_epoch_begin(&mut self, _progress: &Progress, mut model: Network) -> Network {
        if let (Some(l), Some(device)) = (&mut self.learned, model.devices().first()) {
            l.place(device);
        }
        model.fake_quant = Some(self.current_inputs());
        model
    }

    fn forward_model(&mut self, _progress: &Progress, mut model: Network) -> Network {
        model.layers = self.map(std::mem::take(&mut model.layers), "layers");
        if let Some(l) = &self.learned {
            let by_path = self
                .bits
                .keys()
                .filter_map(|p| {
                    let (step, quantizer) = l.input(p)?;
                    let grid = InputGrid::Uniform {
                        quantizer,
                        step: Some(step),
                    };
                    Some((p.clone(), grid))
                })
                .collect();
            model.fake_quant = Some(Arc::new(FakeQuantInputs {
                by_path,
                ..Default::default()
            }));
        }
        model
    }

    fn own_gradients(&mut self, progress: &Progress, grads: &mut Gradients) {
        if let Some(l) = &mut self.learned {
            l.update(progress.lr, grads);
        }
    }

    fn after_step(&mut self, progress: &Progress, mut model: Network) -> Network {
        // The epoch's evaluation sees the inputs' steps as the epoch leaves them.
        if self.learned.is_some() && progress.batch + 1 == progress.batches {
            model.fake_quant = Some(self.current_inputs());
        }
        model
    }

    fn on_epoch_end(&mut self, _metrics: &EpochMetrics, _model: &Network) {
        if let Some(l) = &self.learned {
            *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(l.values());
        }
    }
}
