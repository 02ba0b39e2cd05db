//! Quantization-aware training at k bits (issue #12): the forward pass sees weights and layer
//! inputs on their quantization grids, the backward pass treats the rounding as the identity
//! (the straight-through estimator, Bengio et al. 2013), clipped: no gradient flows through an
//! input outside its quantizer's range (Hubara et al. 2016, "Binarized neural networks",
//! eq. 4; Jacob et al. 2018, section 3). Weights are fake-quantized symmetrically per output
//! channel on their current largest magnitude, so nothing of them is clipped; inputs on the
//! ranges calibrated before training, kept fixed, so that the trained network sees the grids
//! the int8 runtime runs on (up to ties: Burn rounds them to even, the quantizers away from
//! zero). The per-epoch test accuracy of the run is that of the float weights with fake-
//! quantized inputs; the written file's accuracy is measured on the int8 kernels. Batch norms are folded before training (`compress::fold`).
//!
//! Learned step sizes (LSQ, Esser et al. 2020) are not implemented: the input ranges stay as
//! calibrated.

use super::quantize::Quantizer;
use crate::models::Network;
use crate::models::network::{Activation, Layer};
use crate::train::{Progress, TrainHook};
use burn::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The input quantizer of each fake-quantized layer, by layer path; the network applies it in
/// its forward pass (`Network::fake_quant`).
#[derive(Debug, Clone, Default)]
pub struct FakeQuantInputs {
    by_path: BTreeMap<String, Quantizer>,
}

impl FakeQuantInputs {
    pub fn new(by_path: BTreeMap<String, Quantizer>) -> Self {
        FakeQuantInputs { by_path }
    }

    /// `x`, the input of layer `path`, fake-quantized if the layer is one of them.
    pub fn apply(&self, path: &str, x: Activation) -> Activation {
        match (self.by_path.get(path), x) {
            (None, x) => x,
            (Some(q), Activation::Map(t)) => Activation::Map(fake_quant(t, q)),
            (Some(q), Activation::Flat(t)) => Activation::Flat(fake_quant(t, q)),
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
/// through the straight-through estimator).
pub struct QatHook {
    /// Bits of each quantized layer's weights, by layer path.
    bits: BTreeMap<String, u32>,
    inputs: Arc<FakeQuantInputs>,
}

impl QatHook {
    pub fn new(bits: BTreeMap<String, u32>, inputs: BTreeMap<String, Quantizer>) -> Self {
        QatHook {
            bits,
            inputs: Arc::new(FakeQuantInputs::new(inputs)),
        }
    }

    fn map(&self, layers: Vec<Layer>, prefix: &str) -> Vec<Layer> {
        layers
            .into_iter()
            .enumerate()
            .map(|(i, layer)| {
                let path = format!("{prefix}.{i}");
                let bits = self.bits.get(&path).copied();
                match (layer, bits) {
                    (Layer::Conv2d(mut c), Some(b)) => {
                        c.weight = c.weight.map(|w| fake_quant_conv(w, b));
                        Layer::Conv2d(c)
                    }
                    (Layer::Linear(mut l), Some(b)) => {
                        l.weight = l.weight.map(|w| fake_quant_linear(w, b));
                        Layer::Linear(l)
                    }
                    (Layer::Residual(mut r), _) => {
                        r.body = self.map(r.body, &format!("{path}.body"));
                        r.shortcut = self.map(r.shortcut, &format!("{path}.shortcut"));
                        Layer::Residual(r)
                    }
                    (layer, _) => layer,
                }
            })
            .collect()
    }
}

impl TrainHook for QatHook {
    fn name(&self) -> &str {
        "qat"
    }

    fn on_epoch_begin(&mut self, _progress: &Progress, mut model: Network) -> Network {
        model.fake_quant = Some(self.inputs.clone());
        model
    }

    fn forward_model(&mut self, _progress: &Progress, mut model: Network) -> Network {
        model.layers = self.map(std::mem::take(&mut model.layers), "layers");
        model
    }
}
