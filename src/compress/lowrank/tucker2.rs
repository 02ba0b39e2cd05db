//! Tucker-2 decomposition (Kim et al. 2016, "Compression of Deep Convolutional Neural Networks
//! for Fast and Low Power Mobile Applications", §2.2, eq. 3): a `kh×kw` convolution `C → N`
//! with kernel `W[n, c, y, x]` becomes
//!
//! `W[n, c, y, x] ≈ Σ_{r₂, r₁} U_out[n, r₂] G[r₂, r₁, y, x] U_in[c, r₁]`,
//!
//! run as a 1×1 convolution `C → R₁` (`U_inᵀ`), the `kh×kw` core `R₁ → R₂` (stride, padding
//! and dilation of the original) and a 1×1 convolution `R₂ → N` (`U_out`, with the bias). The
//! factors come from the HOSVD (De Lathauwer et al. 2000): `U_out` and `U_in` are the leading
//! left singular vectors of the kernel's output- and input-channel unfoldings, and the core is
//! `W ×₀ U_outᵀ ×₁ U_inᵀ`. Ranks come from an energy threshold on those singular values, or
//! from VBMF on the same unfoldings (the paper's choice). A rank equal to its channel count
//! would make its 1×1 an invertible change of basis: that convolution is left out and folded
//! into the core (a first layer with one input channel is a "Tucker-1" of two layers).

use super::{
    Factor, Factorization, LayerWeights, Rank, Spectral, conv_like, describe, linalg, plain_conv,
    vbmf,
};
use crate::models::LayerSpec;
use faer::Mat;

pub struct Tucker2;

/// The mode-0 (`N × C·kh·kw`) or mode-1 (`C × N·kh·kw`) unfolding of the kernel.
fn unfolding(
    weight: &[f32],
    (c, n, [kh, kw]): (usize, usize, [usize; 2]),
    mode: usize,
) -> Mat<f64> {
    let taps = kh * kw;
    match mode {
        0 => Mat::from_fn(n, c * taps, |o, col| weight[o * c * taps + col] as f64),
        _ => Mat::from_fn(c, n * taps, |ci, col| {
            let (o, t) = (col / taps, col % taps);
            weight[(o * c + ci) * taps + t] as f64
        }),
    }
}

fn dims(spec: &LayerSpec) -> Result<(usize, usize, [usize; 2]), String> {
    plain_conv(spec, "tucker2")
}

impl Factorization for Tucker2 {
    fn check(&self, spec: &LayerSpec) -> Result<(), String> {
        let (c, n, _) = dims(spec)?;
        if c == 1 && n == 1 {
            return Err(format!(
                "{} has one channel on each side: nothing to factorize",
                describe(spec)
            ));
        }
        Ok(())
    }

    /// `[R₁, R₂]`: each at most its channel count and the rank of its unfolding.
    fn max_rank(&self, spec: &LayerSpec) -> Rank {
        let (c, n, [kh, kw]) = dims(spec).expect("checked");
        vec![c.min(n * kh * kw), n.min(c * kh * kw)]
    }

    fn specs(&self, spec: &LayerSpec, rank: &Rank) -> Vec<LayerSpec> {
        let (c, n, kernel) = dims(spec).expect("checked");
        let bias = matches!(spec, LayerSpec::Conv2d { bias: true, .. });
        let (r1, r2) = (rank[0].min(c), rank[1].min(n));
        let mut out = Vec::new();
        if r1 < c {
            out.push(conv_like(spec, [c, r1], [1, 1], 1, [false, false], false));
        }
        out.push(conv_like(
            spec,
            [r1, r2],
            kernel,
            1,
            [true, true],
            bias && r2 == n,
        ));
        if r2 < n {
            out.push(conv_like(spec, [r2, n], [1, 1], 1, [false, false], bias));
        }
        out
    }

    fn candidates(&self, spec: &LayerSpec) -> Vec<Rank> {
        let max = self.max_rank(spec);
        let steps = max[0].max(max[1]);
        let mut out: Vec<Rank> = (1..=steps)
            .map(|j| {
                max.iter()
                    .map(|&m| (m * j).div_ceil(steps).max(1))
                    .collect()
            })
            .collect();
        out.dedup();
        out
    }

    fn spectral_rank(&self, layer: &LayerWeights, rule: Spectral) -> Result<Rank, String> {
        let d = dims(layer.spec)?;
        // [R₁, R₂] from the input (mode-1) and output (mode-0) unfoldings.
        [1, 0]
            .into_iter()
            .map(|mode| {
                let m = unfolding(layer.weight, d, mode);
                match rule {
                    Spectral::Energy(e) => {
                        Ok(linalg::energy_rank(&linalg::singular_values(&m)?, e))
                    }
                    Spectral::Vbmf => vbmf::rank(&m),
                }
            })
            .collect()
    }

    fn factorize(&self, layer: &LayerWeights, rank: &Rank) -> Result<Vec<Factor>, String> {
        let d @ (c, n, [kh, kw]) = dims(layer.spec)?;
        let taps = kh * kw;
        let (r1, r2) = (rank[0].min(c), rank[1].min(n));
        // Leading left singular vectors, or the identity when a mode keeps every channel.
        let basis = |mode: usize, r: usize, size: usize| -> Result<Mat<f64>, String> {
            if r == size {
                return Ok(Mat::identity(size, size));
            }
            let s = linalg::svd(&unfolding(layer.weight, d, mode))?;
            Ok(s.u.subcols(0, r).to_owned())
        };
        let u_in = basis(1, r1, c)?;
        let u_out = basis(0, r2, n)?;
        // Core G[r₂, r₁, t] = Σ_{n, c} U_out[n, r₂] U_in[c, r₁] W[n, c, t], in two products.
        let w0 = unfolding(layer.weight, d, 0); // [N, C·taps]
        let half = u_out.transpose() * &w0; // [R₂, C·taps]
        let mut core = vec![0f32; r2 * r1 * taps];
        for a in 0..r2 {
            for b in 0..r1 {
                for t in 0..taps {
                    let mut acc = 0.0;
                    for ci in 0..c {
                        acc += u_in[(ci, b)] * half[(a, ci * taps + t)];
                    }
                    core[(a * r1 + b) * taps + t] = acc as f32;
                }
            }
        }
        let specs = self.specs(layer.spec, rank);
        let mut out = Vec::new();
        let mut spec = specs.into_iter();
        if r1 < c {
            let mut w = vec![0f32; r1 * c];
            for b in 0..r1 {
                for ci in 0..c {
                    w[b * c + ci] = u_in[(ci, b)] as f32;
                }
            }
            out.push(Factor {
                spec: spec.next().expect("three specs"),
                weight: w,
                bias: None,
            });
        }
        out.push(Factor {
            spec: spec.next().expect("a core"),
            weight: core,
            bias: if r2 == n {
                layer.bias.map(<[f32]>::to_vec)
            } else {
                None
            },
        });
        if r2 < n {
            let mut w = vec![0f32; n * r2];
            for o in 0..n {
                for a in 0..r2 {
                    w[o * r2 + a] = u_out[(o, a)] as f32;
                }
            }
            out.push(Factor {
                spec: spec.next().expect("three specs"),
                weight: w,
                bias: layer.bias.map(<[f32]>::to_vec),
            });
        }
        Ok(out)
    }
}
