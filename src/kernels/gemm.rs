//! The one matrix product every kernel here calls: `gemm` (the crate Burn's flex backend uses),
//! behind a safe, bounds-checked signature. Strides make transposes free, so the convolution
//! backward passes read the forward buffers in place instead of transposing copies.

/// A read-only strided matrix: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix that has `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }

    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(
            last < self.data.len(),
            "gemm: {what} ({rows}x{cols}) reaches past its {} values",
            self.data.len()
        );
    }
}

/// Whether one product may use every thread (rayon) or must stay on the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    One,
    All,
}

/// `c[m, n] = (accumulate ? c : 0) + a[m, k] · b[k, n]`, `c` row-major with row stride `ldc`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    threads: Threads,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n, "gemm: row stride {ldc} below {n} columns");
    assert!((m - 1) * ldc + n <= c.len(), "gemm: output too small");
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    a.check(m, k, "left factor");
    b.check(k, n, "right factor");
    let parallelism = match threads {
        Threads::All if m * n * k >= 64 * 64 * 64 => gemm::Parallelism::Rayon(0),
        _ => gemm::Parallelism::None,
    };
    // SAFETY: every index the product touches was checked against the slices above, and `c`
    // is borrowed mutably, so it aliases neither factor.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_loops_with_transposes_and_accumulation() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 - 2.0).collect(); // [n, k]
        let mut c = vec![1.0f32; m * n];
        sgemm(
            m,
            n,
            k,
            &mut c,
            n,
            true,
            Mat::rows(&a, k),
            Mat::transposed(&bt, k),
            Threads::One,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum::<f32>();
                assert!((c[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
