//! Rank selection by empirical variational Bayesian matrix factorization (EVBMF), the global
//! analytic solution of Nakajima, Sugiyama, Babacan, Tomioka 2013 ("Global Analytic Solution of
//! Fully-observed Variational Bayesian Matrix Factorization", JMLR 14), as Kim et al. 2016 use
//! it to choose Tucker-2 ranks: the model `Y = B Aᵀ + E` with Gaussian noise of variance σ²,
//! whose variational posterior keeps exactly the components with singular value
//!
//! `γ_h > γ̲ = √(M σ² (1 + τ̲)(1 + α/τ̲))`, `α = L/M ≤ 1`, `τ̲ ≈ 2.5129 √α` (their Theorem 13),
//!
//! and σ² is the minimiser of the free energy over a bounded interval (their eq. 38 and
//! Corollary 15's bounds). The minimisation is one-dimensional: a log-spaced scan of the
//! interval, refined by golden-section search around the best point (the scan guards against
//! the objective's local minima; no crate is needed for a 1-D search).

use super::linalg;
use faer::Mat;

/// The number of components EVBMF keeps in `y` (at least 1).
pub fn rank(y: &Mat<f64>) -> Result<usize, String> {
    let (l, m) = (y.nrows().min(y.ncols()), y.nrows().max(y.ncols()));
    let s = linalg::singular_values(y)?;
    Ok(rank_of(&s, l, m).max(1))
}

/// EVBMF's rank from the `l` singular values `s` (largest first) of an `l × m` matrix, `l ≤ m`.
pub fn rank_of(s: &[f64], l: usize, m: usize) -> usize {
    let top = s.first().copied().unwrap_or(0.0);
    if top <= 0.0 || l == 0 {
        return 0;
    }
    let (lf, mf) = (l as f64, m as f64);
    let alpha = lf / mf;
    let tau_bar = 2.5129 * alpha.sqrt();
    let x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar);
    // Exact zeros (a rank-deficient matrix) carry no noise information; the free energy's
    // log terms are undefined there, so they are left out.
    let s: Vec<f64> = s.iter().copied().filter(|v| *v > top * 1e-12).collect();
    let h = s.len();
    // Bounds on σ² (Corollary 15 of the paper): the noise is at least what the smallest
    // components that cannot be signal hold, at most the whole matrix's mean square.
    let e_ub = ((lf / (1.0 + alpha)).ceil() as usize)
        .saturating_sub(1)
        .min(h);
    let tail = e_ub.min(h - 1);
    let sq: Vec<f64> = s.iter().map(|v| v * v).collect();
    let upper = sq.iter().sum::<f64>() / (lf * mf);
    let lower = (sq[tail] / (mf * x_bar))
        .max(sq[tail..].iter().sum::<f64>() / (sq.len() - tail) as f64 / mf);
    let (lo, hi) = if lower < upper {
        (lower, upper)
    } else {
        (upper * 0.5, upper)
    };
    let objective = |sigma2: f64| free_energy(sigma2, &sq, m, alpha, x_bar);
    let sigma2 = minimise_log(objective, lo, hi);
    let threshold = (mf * sigma2 * (1.0 + tau_bar) * (1.0 + alpha / tau_bar)).sqrt();
    s.iter().filter(|v| **v > threshold).count()
}

/// The EVBMF free energy as a function of σ² (the paper's eq. 38, up to constants), for
/// squared singular values `sq` (all of the matrix's non-zero ones, so the paper's residual
/// and `(L − H) log σ²` terms vanish).
fn free_energy(sigma2: f64, sq: &[f64], m: usize, alpha: f64, x_bar: f64) -> f64 {
    let mf = m as f64;
    let tau = |x: f64| {
        let a = x - (1.0 + alpha);
        0.5 * (a + (a * a - 4.0 * alpha).max(0.0).sqrt())
    };
    let mut obj = 0.0;
    for &g in sq {
        let x = g / (mf * sigma2);
        if x > x_bar {
            let t = tau(x);
            obj += x - t + ((t + 1.0) / x).ln() + alpha * (t / alpha + 1.0).ln();
        } else {
            obj += x - x.ln();
        }
    }
    obj
}

/// The minimiser of `f` on `[lo, hi]` (`0 < lo ≤ hi`), searched in `ln σ²`.
fn minimise_log(f: impl Fn(f64) -> f64, lo: f64, hi: f64) -> f64 {
    if hi <= lo {
        return lo;
    }
    let (a, b) = (lo.ln(), hi.ln());
    let n = 200;
    let at = |i: usize| a + (b - a) * i as f64 / n as f64;
    let best = (0..=n)
        .min_by(|&i, &j| f(at(i).exp()).total_cmp(&f(at(j).exp())))
        .unwrap_or(0);
    let (mut x0, mut x1) = (at(best.saturating_sub(1)), at((best + 1).min(n)));
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..100 {
        let (c, d) = (x1 - phi * (x1 - x0), x0 + phi * (x1 - x0));
        if f(c.exp()) < f(d.exp()) {
            x1 = d;
        } else {
            x0 = c;
        }
    }
    (0.5 * (x0 + x1)).exp()
}
