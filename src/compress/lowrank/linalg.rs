//! The few linear-algebra operations the factorizations need, on `faer` (a maintained pure-Rust
//! library: SVD, pseudo-inverse, least squares are never hand-rolled here). Weights arrive as
//! `f32`; the decompositions run in `f64`, so rounding in the solver stays far below the
//! truncation errors they report.

use faer::Mat;

/// A thin SVD `A = U diag(s) Vᵀ`, singular values in non-increasing order.
pub struct Svd {
    pub u: Mat<f64>,
    pub s: Vec<f64>,
    pub v: Mat<f64>,
}

/// The `rows x cols` row-major matrix `values` as a `faer` matrix.
pub fn matrix(values: &[f32], rows: usize, cols: usize) -> Mat<f64> {
    assert_eq!(values.len(), rows * cols, "matrix size");
    Mat::from_fn(rows, cols, |i, j| values[i * cols + j] as f64)
}

/// The thin SVD of `a`; refuses a matrix with non-finite entries (faer would not converge).
pub fn svd(a: &Mat<f64>) -> Result<Svd, String> {
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            if !a[(i, j)].is_finite() {
                return Err("the weights hold a NaN or an infinity".into());
            }
        }
    }
    let d = a
        .thin_svd()
        .map_err(|e| format!("the SVD did not converge: {e:?}"))?;
    Ok(Svd {
        u: d.U().to_owned(),
        s: d.S().column_vector().iter().copied().collect(),
        v: d.V().to_owned(),
    })
}

/// Just the singular values of `a`, largest first.
pub fn singular_values(a: &Mat<f64>) -> Result<Vec<f64>, String> {
    Ok(svd(a)?.s)
}

/// The Moore-Penrose pseudo-inverse of `a` (through its SVD): the least-squares solution of
/// `x a = b` is `b a⁺`, exact even when `a` is singular.
pub fn pseudoinverse(a: &Mat<f64>) -> Result<Mat<f64>, String> {
    let d = a
        .thin_svd()
        .map_err(|e| format!("the SVD did not converge: {e:?}"))?;
    Ok(d.pseudoinverse())
}

/// The smallest rank whose leading singular values hold at least `energy` of `Σ sᵢ²`.
pub fn energy_rank(s: &[f64], energy: f64) -> usize {
    let total: f64 = s.iter().map(|x| x * x).sum();
    if total == 0.0 {
        return 1;
    }
    let mut kept = 0.0;
    for (i, x) in s.iter().enumerate() {
        kept += x * x;
        if kept >= energy * total * (1.0 - 1e-12) {
            return i + 1;
        }
    }
    s.len().max(1)
}

/// `a` as a row-major `f32` vector.
pub fn values(a: &Mat<f64>) -> Vec<f32> {
    let mut out = Vec::with_capacity(a.nrows() * a.ncols());
    for i in 0..a.nrows() {
        for j in 0..a.ncols() {
            out.push(a[(i, j)] as f32);
        }
    }
    out
}
