//! Quantized back-propagation (Lin, Courbariaux, Memisevic and Bengio 2016, "Neural networks
//! with few multiplications", section 3.2). With ternary weights in the forward pass
//! ([`super::binarize::Method::FewMultiplications`]), a layer's output and the gradient it
//! sends back to its input, `δ · W_b`, take only sign changes (and one per-layer factor `H`);
//! the one product left, the weight gradient `δ ⊗ x`, becomes bit shifts when the input `x`
//! is quantized to signed powers of two for it: `x_q = sign(x) · 2^e`. The forward value keeps
//! the real `x`. The quantization runs on the host, from the f32 bits: on a GPU that is a copy
//! of each binarized layer's input per step.
//!
//! Burn's autodiff differentiates what it runs, so the layer runs as two products whose sum
//! has the forward value `f(x, W_b)` and whose gradients are those above:
//!
//! `y = f(x, detach(W_b)) + f(detach(x_q), W_b − detach(W_b))`
//!
//! The second term is 0 in value (its weight is 0, and it has no bias); its gradient with
//! respect to `W_b` is the layer's weight gradient on `x_q`, and the first term gives the input
//! and bias gradients. It costs one more product per binarized layer in training, and none in
//! evaluation, which runs the layer as it is.
//!
//! The paper bounds the exponent to a few bits (3 or 4); here each tensor's range of `2^bits`
//! exponents ends at the one of its largest magnitude (LeNet-5's inputs are not bounded by 1),
//! and magnitudes below the smallest power, rounded, become 0. The quantization is computed on
//! the host from the f32 bits, so every value is exactly a power of two.

use crate::models::network::{Activation, Layer};
use burn::prelude::*;
use burn::tensor::TensorData;

/// Exponent bits of the quantized inputs: 8 consecutive powers of two.
pub const EXPONENT_BITS: u32 = 3;

/// `2^e` for an exponent within f32's normal range, built from its bits (exact).
fn power(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// `values` quantized to signed powers of two: `sign(x) · 2^round(log2 |x|)`, the exponent
/// within the `2^bits` values ending at that of the largest magnitude, and 0 below them
/// (`bits` is taken as at most 8: f32 has 254 normal exponents).
pub fn power_of_two(values: &[f32], bits: u32) -> Vec<f32> {
    let bits = bits.min(8);
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    if !(max.is_finite() && max > 0.0) {
        return vec![0.0; values.len()];
    }
    // Rounding in the log domain: the exponent of |x| · √2, floored.
    let round_exp = |a: f32| (a * std::f32::consts::SQRT_2).log2().floor() as i32;
    let hi = round_exp(max).clamp(-126, 127);
    let lo = (hi - (1 << bits) + 1).max(-126);
    values
        .iter()
        .map(|&v| {
            let a = v.abs();
            if a == 0.0 || !a.is_finite() {
                return 0.0;
            }
            let e = round_exp(a);
            if e < lo {
                0.0
            } else {
                power(e.min(hi)).copysign(v)
            }
        })
        .collect()
}

fn quantized<const D: usize>(x: &Tensor<D>, bits: u32) -> Tensor<D> {
    let data = x.clone().detach().into_data();
    let shape = data.shape().to_vec();
    let values: Vec<f32> = data.convert::<f32>().try_to_vec().expect("f32 values");
    Tensor::from_data(
        TensorData::new(power_of_two(&values, bits), shape),
        &x.device(),
    )
}

/// `layer` (a conv or linear layer whose weight is the forward pass's ternary one) on `x`, with
/// its weight gradient taken on `x` quantized to powers of two; any other layer, or evaluation
/// (no autodiff), runs as it is.
pub fn forward(layer: &Layer, x: Activation, bits: u32) -> Activation {
    let training = match &x {
        Activation::Map(t) => t.device().is_autodiff(),
        Activation::Flat(t) => t.device().is_autodiff(),
    };
    if !training {
        return layer.forward(x);
    }
    let xq = match &x {
        Activation::Map(t) => Activation::Map(quantized(t, bits)),
        Activation::Flat(t) => Activation::Flat(quantized(t, bits)),
    };
    let (frozen, shifts) = match layer {
        Layer::Conv2d(m) => {
            let (mut frozen, mut shifts) = (m.clone(), m.clone());
            frozen.weight = frozen.weight.map(|w| w.detach());
            shifts.weight = shifts.weight.map(|w| w.clone() - w.detach());
            shifts.bias = None;
            (Layer::Conv2d(frozen), Layer::Conv2d(shifts))
        }
        Layer::Linear(m) => {
            let (mut frozen, mut shifts) = (m.clone(), m.clone());
            frozen.weight = frozen.weight.map(|w| w.detach());
            shifts.weight = shifts.weight.map(|w| w.clone() - w.detach());
            shifts.bias = None;
            (Layer::Linear(frozen), Layer::Linear(shifts))
        }
        other => return other.forward(x),
    };
    match (frozen.forward(x), shifts.forward(xq)) {
        (Activation::Map(a), Activation::Map(b)) => Activation::Map(a + b),
        (Activation::Flat(a), Activation::Flat(b)) => Activation::Flat(a + b),
        _ => unreachable!("both products have the layer's output shape"),
    }
}
