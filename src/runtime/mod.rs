//! Inference kernels that no engine has: the compressed forms of convpress's layers.
//!
//! Each kind of layer has a small kernel trait; every implementation of it is checked against
//! a plain reference implementation by one conformance suite (`tests/kernels.rs`), after
//! tract's kernel tests and candle's reference-beside-fast layout.

pub mod binary;
pub mod circulant;
pub mod conv;
pub mod int8;
pub mod model;
pub mod signed;
pub mod sparse;

/// A fully connected layer `y = x W^T + b` on a batch. `x` is `[batch, in]` row-major, `y` is
/// `[batch, out]` row-major.
pub trait LinearKernel: Send + Sync {
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// Computes `y` for `batch` rows of `x`; `x.len() == batch * in`, `y.len() == batch * out`.
    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32]);
    /// Bytes the kernel's weights occupy in memory.
    fn weight_bytes(&self) -> usize;
}

/// The reference: dense weights `[out, in]`, three plain loops. Slow and obviously right.
#[derive(Debug, Clone)]
pub struct DenseReference {
    pub out_features: usize,
    pub in_features: usize,
    /// `[out, in]` row-major.
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl DenseReference {
    /// From Burn's linear layout `[in, out]`.
    pub fn from_burn_layout(
        in_features: usize,
        out_features: usize,
        w_in_out: &[f32],
        bias: Option<Vec<f32>>,
    ) -> Self {
        assert_eq!(w_in_out.len(), in_features * out_features);
        let mut weight = vec![0f32; in_features * out_features];
        for i in 0..in_features {
            for o in 0..out_features {
                weight[o * in_features + i] = w_in_out[i * out_features + o];
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

impl LinearKernel for DenseReference {
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
        for b in 0..batch {
            for o in 0..n_out {
                let mut acc = self.bias.as_ref().map_or(0.0, |v| v[o]);
                for i in 0..n_in {
                    acc += self.weight[o * n_in + i] * x[b * n_in + i];
                }
                y[b * n_out + o] = acc;
            }
        }
    }
    fn weight_bytes(&self) -> usize {
        4 * (self.weight.len() + self.bias.as_ref().map_or(0, Vec::len))
    }
}

/// What one step of the whole-model runtime ([`model::SparseModel`]) hands the next.
#[derive(Debug, Clone)]
pub enum Activations {
    /// Floats, channels first: `[batch, C, H, W]` (or `[batch, F]`).
    Values(Vec<f32>),
    /// The u8 codes of `quantizer`, channels last: `[batch, H, W, C]` (or `[batch, F]`). An
    /// int8 layer hands these to the int8 layer after it, requantized in its epilogue, so
    /// that no float activation is written between them; max-pooling, ReLU and flattening
    /// in between run on the codes (quantization is monotonic, so they commute with it).
    Codes {
        codes: Vec<u8>,
        quantizer: crate::compress::quantize::Quantizer,
    },
}

impl Activations {
    /// As floats, channels first (`dims` is `[C, H, W]` of one image): codes are dequantized,
    /// `(q − z) · s`.
    pub fn into_values(self, dims: [usize; 3]) -> Vec<f32> {
        match self {
            Activations::Values(v) => v,
            Activations::Codes { codes, quantizer } => {
                let [c, h, w] = dims;
                let plane = h * w;
                let mut out = vec![0f32; codes.len()];
                for (src, dst) in codes
                    .chunks_exact(c * plane)
                    .zip(out.chunks_exact_mut(c * plane))
                {
                    for (pos, px) in src.chunks_exact(c).enumerate() {
                        for (ch, &q) in px.iter().enumerate() {
                            dst[ch * plane + pos] =
                                (q as i32 - quantizer.zero_point) as f32 * quantizer.scale;
                        }
                    }
                }
                out
            }
        }
    }
}
