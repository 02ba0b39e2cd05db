//! Spatially separable filters (Jaderberg, Vedaldi, Zisserman 2014, "Speeding up
//! Convolutional Neural Networks with Low Rank Expansions", scheme 2): a `kh×kw` convolution
//! `C → N` becomes a `kh×1` convolution `C → K` followed by a `1×kw` one `K → N`,
//!
//! `W[n, c, y, x] ≈ Σ_k H[n, k, x] V[k, c, y]`  (their eq. 5).
//!
//! Rearranged as the `(C·kh) × (N·kw)` matrix `M[(c, y), (n, x)]` this is a rank-K product, so
//! the best filters in the Frobenius norm come from the truncated SVD of `M` (the closed form
//! of Tai et al. 2016, "Convolutional neural networks with low-rank regularization"); the paper
//! reaches them by conjugate gradients and then minimises the layer's output error on data,
//! which fine-tuning the whole network (the `decompose` stage's next step) subsumes here.
//! Stride, padding and dilation of each axis move to the factor that spans that axis, and the
//! bias to the second; cost goes from `N·C·kh·kw` to `K·(C·kh + N·kw)` multiplies per pixel
//! (the first factor's output keeps the full width).

use super::{
    Factor, Factorization, LayerWeights, Rank, Spectral, conv_like, describe, linalg, plain_conv,
    vbmf,
};
use crate::models::LayerSpec;

pub struct Separable;

fn dims(spec: &LayerSpec) -> Result<(usize, usize, [usize; 2]), String> {
    let (c, n, k) = plain_conv(spec, "separable")?;
    if k[0] < 2 || k[1] < 2 {
        return Err(format!(
            "{} has a kernel of one row or column: it is already separable",
            describe(spec)
        ));
    }
    Ok((c, n, k))
}

/// `M[(c, y), (n, x)] = W[n, c, y, x]`.
fn unfolded(weight: &[f32], (c, n, [kh, kw]): (usize, usize, [usize; 2])) -> faer::Mat<f64> {
    faer::Mat::from_fn(c * kh, n * kw, |row, col| {
        let (ci, y) = (row / kh, row % kh);
        let (ni, x) = (col / kw, col % kw);
        weight[((ni * c + ci) * kh + y) * kw + x] as f64
    })
}

impl Factorization for Separable {
    fn check(&self, spec: &LayerSpec) -> Result<(), String> {
        dims(spec).map(|_| ())
    }

    fn max_rank(&self, spec: &LayerSpec) -> Rank {
        let (c, n, [kh, kw]) = dims(spec).expect("checked");
        vec![(c * kh).min(n * kw)]
    }

    fn specs(&self, spec: &LayerSpec, rank: &Rank) -> Vec<LayerSpec> {
        let (c, n, [kh, kw]) = dims(spec).expect("checked");
        let bias = matches!(spec, LayerSpec::Conv2d { bias: true, .. });
        vec![
            conv_like(spec, [c, rank[0]], [kh, 1], 1, [true, false], false),
            conv_like(spec, [rank[0], n], [1, kw], 1, [false, true], bias),
        ]
    }

    fn spectral_rank(&self, layer: &LayerWeights, rule: Spectral) -> Result<Rank, String> {
        let m = unfolded(layer.weight, dims(layer.spec)?);
        Ok(vec![match rule {
            Spectral::Energy(e) => linalg::energy_rank(&linalg::singular_values(&m)?, e),
            Spectral::Vbmf => vbmf::rank(&m)?,
        }])
    }

    fn factorize(&self, layer: &LayerWeights, rank: &Rank) -> Result<Vec<Factor>, String> {
        let dims @ (c, n, [kh, kw]) = dims(layer.spec)?;
        let k = rank[0];
        let d = linalg::svd(&unfolded(layer.weight, dims))?;
        // V: [K, C, kh, 1]; H: [N, K, 1, kw].
        let mut v = vec![0f32; k * c * kh];
        let mut h = vec![0f32; n * k * kw];
        for r in 0..k {
            let root = d.s[r].sqrt();
            for ci in 0..c {
                for y in 0..kh {
                    v[(r * c + ci) * kh + y] = (d.u[(ci * kh + y, r)] * root) as f32;
                }
            }
            for ni in 0..n {
                for x in 0..kw {
                    h[(ni * k + r) * kw + x] = (d.v[(ni * kw + x, r)] * root) as f32;
                }
            }
        }
        let specs = self.specs(layer.spec, rank);
        Ok(vec![
            Factor {
                spec: specs[0].clone(),
                weight: v,
                bias: None,
            },
            Factor {
                spec: specs[1].clone(),
                weight: h,
                bias: layer.bias.map(<[f32]>::to_vec),
            },
        ])
    }
}
