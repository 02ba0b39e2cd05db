//! A circulant layer at inference ([`crate::kernels::circulant`]): the spectrum of its vector
//! is computed once at load, so a batch costs one forward and one inverse real FFT per row.

use super::{DenseReference, LinearKernel};
use crate::kernels::circulant::{self, CirculantPlan, CirculantShape};
use realfft::num_complex::Complex;

#[derive(Debug, Clone)]
pub struct CirculantLinear {
    pub in_features: usize,
    pub out_features: usize,
    plan: CirculantPlan,
    /// `fft(r)`.
    spectrum: Vec<Complex<f32>>,
    signs: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl CirculantLinear {
    /// From the layer's vector `r` (`max(in, out)` values), its sign seed and bias.
    pub fn new(
        in_features: usize,
        out_features: usize,
        r: &[f32],
        sign_seed: u64,
        bias: Option<Vec<f32>>,
    ) -> Result<Self, String> {
        let d = in_features.max(out_features);
        if in_features == 0 || out_features == 0 {
            return Err("a circulant layer needs at least one input and one output".into());
        }
        if r.len() != d {
            return Err(format!(
                "circulant vector has {} values, max(in, out) is {d}",
                r.len()
            ));
        }
        if bias.as_ref().is_some_and(|b| b.len() != out_features) {
            return Err(format!("circulant bias must have {out_features} values"));
        }
        let plan = CirculantPlan::new(d);
        Ok(CirculantLinear {
            in_features,
            out_features,
            spectrum: plan.spectrum(r),
            plan,
            signs: circulant::signs(sign_seed, in_features),
            bias,
        })
    }

    /// The explicit dense layer it equals (`W[o][i] = r[(o − i) mod d] · sign[i]`): what the
    /// conformance suite compares it with.
    pub fn dense_equivalent(
        in_features: usize,
        out_features: usize,
        r: &[f32],
        sign_seed: u64,
        bias: Option<Vec<f32>>,
    ) -> DenseReference {
        let d = r.len();
        let signs = circulant::signs(sign_seed, in_features);
        let mut weight = Vec::with_capacity(in_features * out_features);
        for o in 0..out_features {
            for (i, s) in signs.iter().enumerate() {
                weight.push(r[(o + d - i) % d] * s);
            }
        }
        DenseReference {
            out_features,
            in_features,
            weight,
            bias,
        }
    }
}

impl LinearKernel for CirculantLinear {
    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        let shape = CirculantShape {
            batch,
            in_features: self.in_features,
            out_features: self.out_features,
        };
        self.plan.forward_into(
            &shape,
            x,
            &self.spectrum,
            &self.signs,
            self.bias.as_deref(),
            false,
            y,
        );
    }

    fn weight_bytes(&self) -> usize {
        8 * self.spectrum.len() + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }
}
