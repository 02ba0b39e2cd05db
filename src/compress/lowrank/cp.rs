//! CP decomposition (Lebedev, Ganin, Rakhuba, Oseledets, Lempitsky 2015, "Speeding-up
//! Convolutional Neural Networks Using Fine-tuned CP-Decomposition", §3): a `kh×kw`
//! convolution `C → N` with kernel `W[n, c, y, x]` becomes the sum of `R` rank-one terms
//!
//! `W[n, c, y, x] ≈ Σ_r A[n, r] B[c, r] Y[y, r] X[x, r]`  (their eq. 3),
//!
//! run as a 1×1 convolution `C → R` (`Bᵀ`), a `kh×1` depthwise one (`Y`), a `1×kw` depthwise
//! one (`X`) and a 1×1 convolution `R → N` (`A`, with the bias) (their eq. 4-7).
//!
//! The factors come from alternating least squares (Kolda & Bader 2009, "Tensor Decompositions
//! and Applications", §3.4): each sweep solves for one factor with the others fixed,
//! `F_m = W_(m) (⊙_{o≠m} F_o) (∗_{o≠m} F_oᵀF_o)⁺`, exactly (through the pseudo-inverse), so the
//! reconstruction error never increases. **Initialisation**: the leading `R` left singular
//! vectors of each mode's unfolding (HOSVD), columns past a mode's size drawn uniformly from
//! [−1, 1] with a fixed seed. **Stopping rule**: after a sweep whose relative error
//! `‖W − Ŵ‖_F/‖W‖_F` fell by less than [`TOLERANCE`] (relative to its value), below
//! [`EXACT`], or after [`MAX_SWEEPS`] sweeps. The rank-one terms are then balanced (each factor
//! column gets the fourth root of the term's norm), which keeps the four layers at one scale
//! for fine-tuning. (The paper reports that ALS was less accurate than non-linear least squares
//! on their layers; fine-tuning recovers the rest, as it does there.)

use super::{
    Factor, Factorization, LayerWeights, Rank, Spectral, conv_like, describe, linalg, plain_conv,
};
use crate::models::LayerSpec;
use faer::Mat;
use rand::{Rng, SeedableRng};

/// Stop when a sweep lowers the relative error by less than this fraction of it.
pub const TOLERANCE: f64 = 1e-5;
/// Stop when the relative error is below this (the tensor is reproduced).
pub const EXACT: f64 = 1e-7;
/// At most this many sweeps.
pub const MAX_SWEEPS: usize = 500;

pub struct CpAls;

fn dims(spec: &LayerSpec) -> Result<(usize, usize, [usize; 2]), String> {
    let (c, n, k) = plain_conv(spec, "cp")?;
    if k == [1, 1] {
        return Err(format!(
            "{} is a 1x1 convolution: it has no spatial modes for cp (use tucker2, or svd on a dense layer)",
            describe(spec)
        ));
    }
    Ok((c, n, k))
}

/// The result of [`cp_als`]: factors `[A, B, Y, X]`, each `size × R` row-major, and the
/// relative error after every sweep.
pub struct CpResult {
    pub factors: [Vec<f64>; 4],
    pub errors: Vec<f64>,
}

/// CP-ALS of the 4-way tensor `t` of shape `shape` (row-major) at rank `r`.
pub fn cp_als(t: &[f32], shape: [usize; 4], r: usize, seed: u64) -> Result<CpResult, String> {
    let t: Vec<f64> = t.iter().map(|&v| v as f64).collect();
    if t.iter().any(|v| !v.is_finite()) {
        return Err("the weights hold a NaN or an infinity".into());
    }
    let norm2: f64 = t.iter().map(|v| v * v).sum();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut factors: [Vec<f64>; 4] = Default::default();
    for (m, f) in factors.iter_mut().enumerate() {
        *f = initial_factor(&t, shape, m, r, &mut rng)?;
    }
    let mut errors = Vec::new();
    if norm2 == 0.0 {
        return Ok(CpResult {
            factors,
            errors: vec![0.0],
        });
    }
    for _ in 0..MAX_SWEEPS {
        let mut last = (Vec::new(), 3);
        for m in 0..4 {
            let mttkrp = mttkrp(&t, shape, &factors, m, r);
            let mut gram = Mat::<f64>::from_fn(r, r, |_, _| 1.0);
            for (o, f) in factors.iter().enumerate() {
                if o != m {
                    let g = gram_of(f, shape[o], r);
                    gram = Mat::from_fn(r, r, |i, j| gram[(i, j)] * g[(i, j)]);
                }
            }
            let pinv = linalg::pseudoinverse(&gram)?;
            let mm = Mat::from_fn(shape[m], r, |i, k| mttkrp[i * r + k]);
            let new = &mm * &pinv;
            factors[m] = (0..shape[m] * r).map(|i| new[(i / r, i % r)]).collect();
            if m == 3 {
                last = (mttkrp, m);
            }
        }
        // ‖W − Ŵ‖² = ‖W‖² − 2⟨W, Ŵ⟩ + ‖Ŵ‖², with ⟨W, Ŵ⟩ from the last update's MTTKRP.
        let (mt, m) = last;
        let inner: f64 = mt.iter().zip(&factors[m]).map(|(a, b)| a * b).sum();
        let mut gram = Mat::<f64>::from_fn(r, r, |_, _| 1.0);
        for (o, f) in factors.iter().enumerate() {
            let g = gram_of(f, shape[o], r);
            gram = Mat::from_fn(r, r, |i, j| gram[(i, j)] * g[(i, j)]);
        }
        let mut fit2 = 0.0;
        for i in 0..r {
            for j in 0..r {
                fit2 += gram[(i, j)];
            }
        }
        let err = ((norm2 - 2.0 * inner + fit2).max(0.0) / norm2).sqrt();
        let done = err < EXACT
            || errors
                .last()
                .is_some_and(|&p: &f64| p - err < TOLERANCE * p);
        errors.push(err);
        if done {
            break;
        }
    }
    balance(&mut factors, shape, r);
    Ok(CpResult { factors, errors })
}

/// The unfolding of mode `m`: rows are that mode's index, columns the others in order.
fn unfolding(t: &[f64], shape: [usize; 4], m: usize) -> Mat<f64> {
    let total: usize = shape.iter().product();
    let cols = total / shape[m];
    let mut u = Mat::<f64>::zeros(shape[m], cols);
    let mut col_of = vec![0usize; shape[m]];
    for (flat, &v) in t.iter().enumerate() {
        let idx = index(flat, shape);
        u[(idx[m], col_of[idx[m]])] = v;
        col_of[idx[m]] += 1;
    }
    u
}

fn index(mut flat: usize, shape: [usize; 4]) -> [usize; 4] {
    let mut idx = [0; 4];
    for d in (0..4).rev() {
        idx[d] = flat % shape[d];
        flat /= shape[d];
    }
    idx
}

fn initial_factor(
    t: &[f64],
    shape: [usize; 4],
    m: usize,
    r: usize,
    rng: &mut rand::rngs::StdRng,
) -> Result<Vec<f64>, String> {
    let u = unfolding(t, shape, m);
    let d = linalg::svd(&u)?;
    let mut f = vec![0.0; shape[m] * r];
    for i in 0..shape[m] {
        for k in 0..r {
            f[i * r + k] = if k < d.u.ncols() {
                d.u[(i, k)]
            } else {
                rng.random_range(-1.0..1.0)
            };
        }
    }
    Ok(f)
}

/// `FᵀF` of a `rows × r` row-major factor.
fn gram_of(f: &[f64], rows: usize, r: usize) -> Mat<f64> {
    let m = Mat::from_fn(rows, r, |i, k| f[i * r + k]);
    m.transpose() * &m
}

/// `M[i, r] = Σ_{other indices} T[..] Π_{o≠m} F_o[i_o, r]`: the matricized tensor times the
/// Khatri-Rao product of the other factors, without forming either.
fn mttkrp(t: &[f64], shape: [usize; 4], factors: &[Vec<f64>; 4], m: usize, r: usize) -> Vec<f64> {
    let mut out = vec![0.0; shape[m] * r];
    let mut prod = vec![0.0; r];
    let others: Vec<usize> = (0..4).filter(|&o| o != m).collect();
    for (flat, &v) in t.iter().enumerate() {
        if v == 0.0 {
            continue;
        }
        let idx = index(flat, shape);
        let (a, b, c) = (
            &factors[others[0]][idx[others[0]] * r..][..r],
            &factors[others[1]][idx[others[1]] * r..][..r],
            &factors[others[2]][idx[others[2]] * r..][..r],
        );
        for k in 0..r {
            prod[k] = v * a[k] * b[k] * c[k];
        }
        let row = &mut out[idx[m] * r..][..r];
        for k in 0..r {
            row[k] += prod[k];
        }
    }
    out
}

/// Gives the four columns of each rank-one term the same norm (the fourth root of the
/// term's), without changing the product.
fn balance(factors: &mut [Vec<f64>; 4], shape: [usize; 4], r: usize) {
    for k in 0..r {
        let norms: Vec<f64> = (0..4)
            .map(|m| {
                (0..shape[m])
                    .map(|i| factors[m][i * r + k].powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let lambda: f64 = norms.iter().product();
        if lambda == 0.0 {
            continue;
        }
        let target = lambda.powf(0.25);
        for m in 0..4 {
            for i in 0..shape[m] {
                factors[m][i * r + k] *= target / norms[m];
            }
        }
    }
}

impl Factorization for CpAls {
    fn check(&self, spec: &LayerSpec) -> Result<(), String> {
        dims(spec).map(|_| ())
    }

    /// A rank at which a CP decomposition of any such tensor exists: the product of all mode
    /// sizes but the largest (Kolda & Bader 2009, §3.1). ALS need not reach it exactly.
    fn max_rank(&self, spec: &LayerSpec) -> Rank {
        let (c, n, [kh, kw]) = dims(spec).expect("checked");
        let mut d = [n, c, kh, kw];
        d.sort_unstable();
        vec![d[0] * d[1] * d[2]]
    }

    fn specs(&self, spec: &LayerSpec, rank: &Rank) -> Vec<LayerSpec> {
        let (c, n, [kh, kw]) = dims(spec).expect("checked");
        let r = rank[0];
        let bias = matches!(spec, LayerSpec::Conv2d { bias: true, .. });
        vec![
            conv_like(spec, [c, r], [1, 1], 1, [false, false], false),
            conv_like(spec, [r, r], [kh, 1], r, [true, false], false),
            conv_like(spec, [r, r], [1, kw], r, [false, true], false),
            conv_like(spec, [r, n], [1, 1], 1, [false, false], bias),
        ]
    }

    fn has_spectrum(&self) -> bool {
        false
    }

    fn spectral_rank(&self, layer: &LayerWeights, _rule: Spectral) -> Result<Rank, String> {
        Err(format!(
            "cp has no singular values to threshold for this {}: give a rank or a compression",
            describe(layer.spec)
        ))
    }

    fn factorize(&self, layer: &LayerWeights, rank: &Rank) -> Result<Vec<Factor>, String> {
        let (c, n, [kh, kw]) = dims(layer.spec)?;
        let r = rank[0];
        let res = cp_als(layer.weight, [n, c, kh, kw], r, 0)?;
        let [a, b, y, x] = &res.factors;
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        // 1×1 C→R: [R, C, 1, 1] = Bᵀ; depthwise [R, 1, kh, 1] = Yᵀ and [R, 1, 1, kw] = Xᵀ;
        // 1×1 R→N: [N, R, 1, 1] = A.
        let transpose = |f: &[f64], rows: usize| -> Vec<f64> {
            (0..r * rows)
                .map(|i| f[(i % rows) * r + i / rows])
                .collect()
        };
        let specs = self.specs(layer.spec, rank);
        let weights = [
            f32s(&transpose(b, c)),
            f32s(&transpose(y, kh)),
            f32s(&transpose(x, kw)),
            f32s(a),
        ];
        Ok(specs
            .into_iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (spec, weight))| Factor {
                spec,
                weight,
                bias: if i == 3 {
                    layer.bias.map(<[f32]>::to_vec)
                } else {
                    None
                },
            })
            .collect())
    }
}
