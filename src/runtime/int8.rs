//! An int8 fully connected layer (issue #12, first layer of the int8 runtime): weights
//! quantized symmetrically per output channel, the input per tensor (unsigned, with a zero
//! point), the product in exact 32-bit integers on [`crate::kernels::int8`], then one
//! multiply per output back to `f32` with the bias:
//!
//! `y[o] = s_x · s_w[o] · (Σ_k q_x[k] · q_w[o][k] − z_x · Σ_k q_w[o][k]) + b[o]`
//!
//! (Jacob et al. 2018, eq. 7: the zero point leaves the inner loop through the weights' row
//! sums, which are computed once). Fusing the requantization into the next layer's u8 input
//! is the next step; this layer takes and gives `f32`, so it drops into [`super::LinearKernel`].

use super::LinearKernel;
use crate::compress::quantize::{Quantizer, quantize_per_channel};
use crate::kernels::int8::{self, Int8Gemm};

/// `y = x Wᵀ + b` on int8 weights and u8 inputs.
pub struct Int8Linear {
    in_features: usize,
    out_features: usize,
    /// `[out, in]` codes.
    weight: Vec<i8>,
    weight_q: Vec<Quantizer>,
    /// `z_x · Σ_k q_w[o][k]` per output channel: the zero point's share of each sum.
    zero_sums: Vec<i64>,
    /// `s_x · s_w[o]` per output channel.
    scales: Vec<f32>,
    bias: Option<Vec<f32>>,
    input: Quantizer,
    kernel: Kernel,
}

/// Which int8 path runs the product.
enum Kernel {
    /// One path for every batch (tests force each one).
    Fixed(&'static dyn Int8Gemm),
    /// The best row-by-row path for batches below 4 rows (a matrix-vector product reads each
    /// weight once either way), the register-blocked AVX2 kernel on packed weights above.
    Auto {
        rows: &'static dyn Int8Gemm,
        blocked: Option<(int8::Avx2Blocked, int8::PackedB)>,
    },
}

impl Int8Linear {
    /// Quantizes `weight` (`[out, in]` row-major) to `bits` bits per output channel; `input`
    /// quantizes the layer's input (from calibration, 8-bit unsigned at most).
    pub fn new(
        in_features: usize,
        out_features: usize,
        weight: &[f32],
        bias: Option<Vec<f32>>,
        bits: u32,
        input: Quantizer,
    ) -> Result<Int8Linear, String> {
        crate::compress::quantize::check_bits("bits", bits)?;
        if weight.len() != in_features * out_features || out_features == 0 {
            return Err(format!(
                "weight of {} values for a {in_features} -> {out_features} layer",
                weight.len()
            ));
        }
        if in_features > int8::MAX_K {
            return Err(format!(
                "{in_features} inputs: more than the {} whose int8 sums fit in 32 bits",
                int8::MAX_K
            ));
        }
        if input.lo < 0 || input.hi > 255 {
            return Err("the input quantizer must be unsigned 8-bit at most".into());
        }
        if bias.as_ref().is_some_and(|b| b.len() != out_features) {
            return Err("bias length differs from the output features".into());
        }
        let (weight_q, weight) = quantize_per_channel(weight, out_features, bits);
        let zero_sums = weight
            .chunks_exact(in_features.max(1))
            .map(|r| input.zero_point as i64 * r.iter().map(|&v| v as i64).sum::<i64>())
            .collect();
        let scales = weight_q.iter().map(|q| input.scale * q.scale).collect();
        let blocked = int8::Avx2Blocked::new()
            .map(|k| (k, int8::PackedB::new(out_features, in_features, &weight)));
        Ok(Int8Linear {
            in_features,
            out_features,
            weight,
            weight_q,
            zero_sums,
            scales,
            bias,
            input,
            kernel: Kernel::Auto {
                rows: int8::best(),
                blocked,
            },
        })
    }

    /// The same layer on another int8 path (tests force each one).
    pub fn with_kernel(mut self, kernel: &'static dyn Int8Gemm) -> Self {
        self.kernel = Kernel::Fixed(kernel);
        self
    }

    /// The weight codes (`[out, in]`) and their per-channel quantizers.
    pub fn weights(&self) -> (&[i8], &[Quantizer]) {
        (&self.weight, &self.weight_q)
    }

    /// The path that runs a batch of `batch` rows.
    pub fn kernel_name(&self, batch: usize) -> &'static str {
        match &self.kernel {
            Kernel::Fixed(k) => k.name(),
            Kernel::Auto {
                blocked: Some((k, _)),
                ..
            } if batch >= 4 => k.name(),
            Kernel::Auto { rows, .. } => rows.name(),
        }
    }

    /// The input quantizer.
    pub fn input_quantizer(&self) -> Quantizer {
        self.input
    }
}

impl std::fmt::Debug for Int8Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Int8Linear")
            .field("in_features", &self.in_features)
            .field("out_features", &self.out_features)
            .field("input", &self.input)
            .field("kernel", &self.kernel_name(64))
            .finish_non_exhaustive()
    }
}

impl LinearKernel for Int8Linear {
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        let (n_in, n_out) = (self.in_features, self.out_features);
        assert_eq!(x.len(), batch * n_in);
        assert_eq!(y.len(), batch * n_out);
        let mut codes = vec![0u8; x.len()];
        self.input.quantize_u8_slice(x, &mut codes);
        let mut acc = vec![0i32; batch * n_out];
        match &self.kernel {
            Kernel::Fixed(k) => k.gemm(batch, n_out, n_in, &codes, &self.weight, &mut acc),
            Kernel::Auto {
                blocked: Some((k, packed)),
                ..
            } if batch >= 4 => k.gemm_packed(batch, packed, &codes, &mut acc),
            Kernel::Auto { rows, .. } => {
                rows.gemm(batch, n_out, n_in, &codes, &self.weight, &mut acc)
            }
        }
        for (acc_row, y_row) in acc.chunks_exact(n_out).zip(y.chunks_exact_mut(n_out)) {
            for (o, (&a, out)) in acc_row.iter().zip(y_row.iter_mut()).enumerate() {
                let exact = a as i64 - self.zero_sums[o];
                *out = exact as f32 * self.scales[o] + self.bias.as_ref().map_or(0.0, |b| b[o]);
            }
        }
    }
    fn weight_bytes(&self) -> usize {
        // One byte per weight, a scale per channel, the bias.
        self.weight.len() + 4 * self.weight_q.len() + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }
}
