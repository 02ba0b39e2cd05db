//! Sparse fully connected layers in compressed sparse row (CSR) form: only the weights that
//! survived pruning are stored and multiplied (Han et al. 2015, "Learning both weights and
//! connections", report about 3x on CPU at 90% sparsity; this is that inference path).

use super::{DenseReference, LinearKernel};
use rayon::prelude::*;

/// Column indices of the stored weights: 16 bits when the layer has at most 65,536 inputs (all
/// of the zoo's fully connected layers), which cuts a CSR layer's bytes by a quarter (Deep
/// Compression goes further with relative indices, `compress::format`). It did not measurably
/// change the batch-1 time here: the gather of `x`, not index bandwidth, bounds that loop.
#[derive(Debug, Clone, PartialEq)]
pub enum Columns {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl Columns {
    /// The narrowest indices that can address `in_features` columns.
    fn for_inputs(in_features: usize, cols: Vec<u32>) -> Self {
        if in_features <= 1 << 16 {
            Columns::U16(cols.into_iter().map(|c| c as u16).collect())
        } else {
            Columns::U32(cols)
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Columns::U16(v) => v.len(),
            Columns::U32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> usize {
        match self {
            Columns::U16(v) => v[i] as usize,
            Columns::U32(v) => v[i] as usize,
        }
    }

    /// Overwrites entry `i` (truncated to the index width).
    pub fn set(&mut self, i: usize, col: usize) {
        match self {
            Columns::U16(v) => v[i] = col as u16,
            Columns::U32(v) => v[i] = col as u32,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Columns::U16(v) => 2 * v.len(),
            Columns::U32(v) => 4 * v.len(),
        }
    }
}

/// An unsigned column index the kernels can be generic over.
trait Col: Copy + Send + Sync {
    fn at(self) -> usize;
}
impl Col for u16 {
    #[inline(always)]
    fn at(self) -> usize {
        self as usize
    }
}
impl Col for u32 {
    #[inline(always)]
    fn at(self) -> usize {
        self as usize
    }
}

/// CSR weights of a linear layer: row `o` holds the non-zero weights of output `o`.
#[derive(Debug, Clone, PartialEq)]
pub struct CsrLinear {
    pub out_features: usize,
    pub in_features: usize,
    /// `row_start[o]..row_start[o + 1]` indexes `cols` and `values` for output `o`.
    pub row_start: Vec<u32>,
    pub cols: Columns,
    pub values: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

/// Work below this many multiply-adds runs on the calling thread: rayon's fork-join costs
/// more than it saves.
const PARALLEL_MIN_MACS: usize = 64 * 1024;

impl CsrLinear {
    /// Keeps the non-zero entries of dense `[out, in]` weights.
    pub fn from_dense(dense: &DenseReference) -> Self {
        let (n_in, n_out) = (dense.in_features, dense.out_features);
        let mut row_start = Vec::with_capacity(n_out + 1);
        let mut cols = Vec::new();
        let mut values = Vec::new();
        row_start.push(0);
        for o in 0..n_out {
            for (i, &w) in dense.weight[o * n_in..(o + 1) * n_in].iter().enumerate() {
                if w != 0.0 {
                    cols.push(i as u32);
                    values.push(w);
                }
            }
            row_start.push(values.len() as u32);
        }
        let csr = CsrLinear {
            out_features: n_out,
            in_features: n_in,
            row_start,
            cols: Columns::for_inputs(n_in, cols),
            values,
            bias: dense.bias.clone(),
        };
        csr.validate().expect("built from dense weights");
        csr
    }

    /// Checks the structure (row offsets monotone and in range, column indices in range, bias
    /// length); the kernels rely on it.
    pub fn validate(&self) -> Result<(), String> {
        if self.row_start.len() != self.out_features + 1 || self.row_start[0] != 0 {
            return Err("row offsets do not match the output count".into());
        }
        if self.row_start.windows(2).any(|w| w[0] > w[1]) {
            return Err("row offsets decrease".into());
        }
        let nnz = *self.row_start.last().unwrap_or(&0) as usize;
        if nnz != self.cols.len() || nnz != self.values.len() {
            return Err("row offsets disagree with the stored entries".into());
        }
        if (0..self.cols.len()).any(|i| self.cols.get(i) >= self.in_features) {
            return Err("a column index is out of range".into());
        }
        if self
            .bias
            .as_ref()
            .is_some_and(|b| b.len() != self.out_features)
        {
            return Err("bias length differs from the output count".into());
        }
        Ok(())
    }

    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// Outputs `first..first + out.len()` for one input vector.
    fn rows_single(&self, x: &[f32], first: usize, out: &mut [f32]) {
        match &self.cols {
            Columns::U16(c) => self.rows_single_with(c, x, first, out),
            Columns::U32(c) => self.rows_single_with(c, x, first, out),
        }
    }

    fn rows_single_with<I: Col>(&self, all_cols: &[I], x: &[f32], first: usize, out: &mut [f32]) {
        assert!(first + out.len() <= self.out_features && x.len() == self.in_features);
        for (k, y) in out.iter_mut().enumerate() {
            let o = first + k;
            let (s, e) = (self.row_start[o] as usize, self.row_start[o + 1] as usize);
            let (cols, vals) = (&all_cols[s..e], &self.values[s..e]);
            // Four accumulators break the add dependency chain.
            let mut a = [0f32; 4];
            let mut cc = cols.chunks_exact(4);
            let mut vc = vals.chunks_exact(4);
            for (c, v) in (&mut cc).zip(&mut vc) {
                // SAFETY: every column index is < in_features (checked in `validate`, which
                // every constructor runs) and x.len() == in_features (asserted above).
                unsafe {
                    a[0] += v[0] * *x.get_unchecked(c[0].at());
                    a[1] += v[1] * *x.get_unchecked(c[1].at());
                    a[2] += v[2] * *x.get_unchecked(c[2].at());
                    a[3] += v[3] * *x.get_unchecked(c[3].at());
                }
            }
            for (&c, &v) in cc.remainder().iter().zip(vc.remainder()) {
                a[0] += v * x[c.at()];
            }
            *y = self.bias.as_ref().map_or(0.0, |b| b[o]) + ((a[0] + a[1]) + (a[2] + a[3]));
        }
    }

    /// Outputs `rows` for a whole batch, from `xt` (`x` transposed to `[in, batch]`), into
    /// `out` laid out `[rows, batch]`.
    fn rows_batch(&self, xt: &[f32], batch: usize, first: usize, out: &mut [f32]) {
        match &self.cols {
            Columns::U16(c) => self.rows_batch_with(c, xt, batch, first, out),
            Columns::U32(c) => self.rows_batch_with(c, xt, batch, first, out),
        }
    }

    fn rows_batch_with<I: Col>(
        &self,
        cols: &[I],
        xt: &[f32],
        batch: usize,
        first: usize,
        out: &mut [f32],
    ) {
        for (k, acc) in out.chunks_exact_mut(batch).enumerate() {
            let o = first + k;
            acc.fill(self.bias.as_ref().map_or(0.0, |b| b[o]));
            let (s, e) = (self.row_start[o] as usize, self.row_start[o + 1] as usize);
            for (&c, &v) in cols[s..e].iter().zip(&self.values[s..e]) {
                let col = &xt[c.at() * batch..(c.at() + 1) * batch];
                for (a, &xv) in acc.iter_mut().zip(col) {
                    *a += v * xv;
                }
            }
        }
    }
}

impl LinearKernel for CsrLinear {
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
        let work = self.nnz() * batch;
        let threads = rayon::current_num_threads();
        if batch == 1 {
            if threads > 1 && work >= PARALLEL_MIN_MACS {
                let chunk = n_out.div_ceil(threads * 4).max(1);
                y.par_chunks_mut(chunk)
                    .enumerate()
                    .for_each(|(c, out)| self.rows_single(x, c * chunk, out));
            } else {
                self.rows_single(x, 0, y);
            }
            return;
        }
        let parallel = work >= PARALLEL_MIN_MACS && threads > 1;
        // Transpose x once so each stored weight multiplies a contiguous run of the batch.
        let mut xt = vec![0f32; n_in * batch];
        for b in 0..batch {
            for i in 0..n_in {
                xt[i * batch + b] = x[b * n_in + i];
            }
        }
        let mut yt = vec![0f32; n_out * batch];
        if parallel {
            let rows = n_out.div_ceil(threads * 4).max(1);
            yt.par_chunks_mut(rows * batch)
                .enumerate()
                .for_each(|(c, out)| self.rows_batch(&xt, batch, c * rows, out));
        } else {
            self.rows_batch(&xt, batch, 0, &mut yt);
        }
        for o in 0..n_out {
            for b in 0..batch {
                y[b * n_out + o] = yt[o * batch + b];
            }
        }
    }

    fn weight_bytes(&self) -> usize {
        4 * (self.row_start.len() + self.values.len())
            + self.cols.bytes()
            + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }
}
