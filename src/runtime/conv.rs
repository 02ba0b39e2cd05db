//! Convolutions for inference: a direct reference, a dense kernel on convpress's training
//! kernels, and a sparse im2col kernel that multiplies only the weights that survived pruning (Han et al. 2015, "Learning both weights and
//! connections": pruned conv layers keep 10-40% of their weights, and skipping the zeros is
//! what turns that into CPU time saved).
//!
//! The sparse kernel lays each image out as im2col rows `[C*kh*kw, H'*W']`; every stored
//! weight is then one axpy of a contiguous im2col row into its output row, which the compiler
//! vectorises. Dense GEMM cannot skip zeros; sparse-times-dense with the dense side contiguous
//! can.

use crate::kernels::conv::{self as kernels, Conv2dProblem};
use rayon::prelude::*;
use std::cell::RefCell;

/// The shape of a 2-D convolution (PyTorch/Burn semantics: weights `[out, in/groups, kh, kw]`,
/// zero padding on both sides, no ceil mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl ConvGeometry {
    /// Checks what the kernels rely on: positive sizes and groups dividing both channel counts.
    pub fn validate(&self) -> Result<(), String> {
        if self.groups == 0
            || !self.in_channels.is_multiple_of(self.groups)
            || !self.out_channels.is_multiple_of(self.groups)
        {
            return Err(format!(
                "groups {} must divide {} and {}",
                self.groups, self.in_channels, self.out_channels
            ));
        }
        if self.kernel.contains(&0) || self.stride.contains(&0) || self.dilation.contains(&0) {
            return Err("kernel, stride and dilation must be positive".into());
        }
        Ok(())
    }

    /// Weights per output channel: `in/groups * kh * kw`.
    pub fn patch_len(&self) -> usize {
        self.in_channels / self.groups * self.kernel[0] * self.kernel[1]
    }

    /// Number of weights of the dense layer.
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.patch_len()
    }

    /// Output `[H', W']` for input `[H, W]`, or `None` if the window does not fit.
    pub fn output_hw(&self, hw: [usize; 2]) -> Option<[usize; 2]> {
        let dim = |i: usize| {
            let span = self.dilation[i] * (self.kernel[i] - 1) + 1;
            let padded = hw[i] + 2 * self.padding[i];
            (padded >= span).then(|| (padded - span) / self.stride[i] + 1)
        };
        Some([dim(0)?, dim(1)?])
    }

    /// A 1x1, stride 1, unpadded convolution: its im2col matrix is the input itself.
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }

    /// The training kernels' description of this convolution on `batch` images of `hw`.
    pub fn problem(&self, batch: usize, hw: [usize; 2]) -> Conv2dProblem {
        Conv2dProblem {
            batch,
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            in_hw: hw,
            kernel: self.kernel,
            stride: self.stride,
            pad_begin: self.padding,
            pad_end: self.padding,
            dilation: self.dilation,
            groups: self.groups,
        }
    }
}

/// A convolution on a batch of images `[batch, C, H, W]` (row-major) into
/// `[batch, out, H', W']`.
pub trait Conv2dKernel: Send + Sync {
    fn geometry(&self) -> &ConvGeometry;
    /// `x.len() == batch * C * H * W`, `y.len() == batch * out * H' * W'` for `hw = [H, W]`.
    fn forward(&self, x: &[f32], batch: usize, hw: [usize; 2], y: &mut [f32]);
    /// Bytes the kernel's weights (and bias) occupy in memory.
    fn weight_bytes(&self) -> usize;
}

fn check_sizes(g: &ConvGeometry, x: &[f32], batch: usize, hw: [usize; 2], y: &[f32]) -> [usize; 2] {
    let out = g
        .output_hw(hw)
        .unwrap_or_else(|| panic!("conv window larger than the padded {hw:?} input"));
    assert_eq!(x.len(), batch * g.in_channels * hw[0] * hw[1], "input size");
    assert_eq!(
        y.len(),
        batch * g.out_channels * out[0] * out[1],
        "output size"
    );
    out
}

/// The reference: dense weights and seven nested loops. Slow and obviously right.
#[derive(Debug, Clone)]
pub struct DirectConv {
    pub geometry: ConvGeometry,
    /// `[out, in/groups, kh, kw]` row-major (Burn's and PyTorch's layout).
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl DirectConv {
    pub fn new(
        geometry: ConvGeometry,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Result<Self, String> {
        geometry.validate()?;
        if weight.len() != geometry.weight_len() {
            return Err(format!(
                "conv weight has {} values, the geometry needs {}",
                weight.len(),
                geometry.weight_len()
            ));
        }
        if bias
            .as_ref()
            .is_some_and(|b| b.len() != geometry.out_channels)
        {
            return Err("conv bias length differs from the output channels".into());
        }
        Ok(DirectConv {
            geometry,
            weight,
            bias,
        })
    }
}

impl Conv2dKernel for DirectConv {
    fn geometry(&self) -> &ConvGeometry {
        &self.geometry
    }

    fn forward(&self, x: &[f32], batch: usize, hw: [usize; 2], y: &mut [f32]) {
        let g = &self.geometry;
        let [oh, ow] = check_sizes(g, x, batch, hw, y);
        let [h, w] = hw;
        let [kh, kw] = g.kernel;
        let cin_g = g.in_channels / g.groups;
        let cout_g = g.out_channels / g.groups;
        for b in 0..batch {
            for o in 0..g.out_channels {
                let group = o / cout_g;
                for i in 0..oh {
                    for j in 0..ow {
                        let mut acc = self.bias.as_ref().map_or(0.0, |v| v[o]);
                        for ci in 0..cin_g {
                            let c = group * cin_g + ci;
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let r = (i * g.stride[0] + ki * g.dilation[0]) as isize
                                        - g.padding[0] as isize;
                                    let s = (j * g.stride[1] + kj * g.dilation[1]) as isize
                                        - g.padding[1] as isize;
                                    if r < 0 || s < 0 || r as usize >= h || s as usize >= w {
                                        continue;
                                    }
                                    let xv = x[((b * g.in_channels + c) * h + r as usize) * w
                                        + s as usize];
                                    acc += self.weight[((o * cin_g + ci) * kh + ki) * kw + kj] * xv;
                                }
                            }
                        }
                        y[((b * g.out_channels + o) * oh + i) * ow + j] = acc;
                    }
                }
            }
        }
    }

    fn weight_bytes(&self) -> usize {
        4 * (self.weight.len() + self.bias.as_ref().map_or(0, Vec::len))
    }
}

/// A convolution that keeps all its weights and runs on convpress's training kernels
/// ([`crate::kernels::conv`]: the AVX2 direct kernel where it applies, GEMM otherwise). The
/// runtime uses it for layers that pruning left mostly dense, where skipping zeros one axpy at
/// a time costs more than multiplying them (see [`DenseConv::pays_off`]).
#[derive(Debug, Clone)]
pub struct DenseConv {
    /// The same dense weights, bias and geometry the reference holds; only the arithmetic
    /// differs.
    pub layer: DirectConv,
}

impl DenseConv {
    /// Fraction of non-zero weights above which the dense kernel is used. Measured on this
    /// project's 2-core machine (LeNet-5's two convolutions, ResNet-20's 16- and 64-channel
    /// 3x3 ones; batches 1 and 64; sparsity 0.5 to 0.95): the sparse kernel wins at 90-95%
    /// sparsity, the two are even around 85%, and from 80% down the dense kernel is faster in
    /// 7 of 8 cases (up to 3x at 50%).
    pub const DENSITY: f64 = 0.2;

    pub fn from_reference(r: &DirectConv) -> Self {
        DenseConv { layer: r.clone() }
    }

    /// Whether a layer with `stored` of its weights non-zero runs faster dense.
    pub fn pays_off(geometry: &ConvGeometry, stored: usize) -> bool {
        stored as f64 > Self::DENSITY * geometry.weight_len() as f64
    }
}

impl Conv2dKernel for DenseConv {
    fn geometry(&self) -> &ConvGeometry {
        &self.layer.geometry
    }

    fn forward(&self, x: &[f32], batch: usize, hw: [usize; 2], y: &mut [f32]) {
        let l = &self.layer;
        let out_hw = check_sizes(&l.geometry, x, batch, hw, y);
        if out_hw.contains(&0) || batch == 0 {
            return;
        }
        let p = l.geometry.problem(batch, hw);
        kernels::forward(&p, x, &l.weight, l.bias.as_deref(), y);
    }

    fn weight_bytes(&self) -> usize {
        self.layer.weight_bytes()
    }
}

/// Work below this many multiply-adds runs on the calling thread (as in `CsrLinear`).
const PARALLEL_MIN_MACS: usize = 64 * 1024;

thread_local! {
    /// Each thread's im2col buffer, kept between calls so a forward pass does not allocate it
    /// again for every layer and image.
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a buffer of at least `len` floats: the thread's own when it is free, a fresh
/// one otherwise (a rayon thread that steals a second convolution while it waits).
pub(super) fn with_cols<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    COLS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// A pruned convolution: per output channel, the non-zero weights in compressed sparse rows,
/// each addressed by its im2col row `c * kh * kw + ki * kw + kj` (with `c` the input channel,
/// so grouped and depthwise convolutions need no special case).
#[derive(Debug, Clone, PartialEq)]
pub struct SparseIm2colConv {
    pub geometry: ConvGeometry,
    /// `row_start[o]..row_start[o + 1]` indexes `rows` and `values` for output channel `o`.
    pub row_start: Vec<u32>,
    /// im2col row of each stored weight.
    pub rows: Vec<u32>,
    pub values: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    /// The im2col rows some weight uses, ascending; the others are never built.
    pub used_rows: Vec<u32>,
}

impl SparseIm2colConv {
    /// Keeps the non-zero entries of `dense`.
    pub fn from_dense(dense: &DirectConv) -> Self {
        let g = dense.geometry;
        let patch = g.patch_len();
        let cout_g = g.out_channels / g.groups;
        let mut row_start = Vec::with_capacity(g.out_channels + 1);
        let (mut rows, mut values) = (Vec::new(), Vec::new());
        row_start.push(0);
        for o in 0..g.out_channels {
            // Input channels of this group start at im2col row `group * patch`.
            let base = (o / cout_g) * patch;
            for (k, &w) in dense.weight[o * patch..(o + 1) * patch].iter().enumerate() {
                if w != 0.0 {
                    rows.push((base + k) as u32);
                    values.push(w);
                }
            }
            row_start.push(values.len() as u32);
        }
        let mut used = vec![false; g.in_channels * g.kernel[0] * g.kernel[1]];
        for &r in &rows {
            used[r as usize] = true;
        }
        let used_rows = (0..used.len() as u32)
            .filter(|&r| used[r as usize])
            .collect();
        SparseIm2colConv {
            geometry: g,
            row_start,
            rows,
            values,
            bias: dense.bias.clone(),
            used_rows,
        }
    }

    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// Builds im2col row `r` (input channel, kernel row, kernel column) of one image.
    fn im2col_row(
        &self,
        image: &[f32],
        hw: [usize; 2],
        out_hw: [usize; 2],
        r: usize,
        row: &mut [f32],
    ) {
        let g = &self.geometry;
        let [h, w] = hw;
        let [oh, ow] = out_hw;
        let [kh, kw] = g.kernel;
        let (c, ki, kj) = (r / (kh * kw), r / kw % kh, r % kw);
        let plane = &image[c * h * w..(c + 1) * h * w];
        let (sh, sw) = (g.stride[0], g.stride[1]);
        let off_h = (ki * g.dilation[0]) as isize - g.padding[0] as isize;
        let off_w = (kj * g.dilation[1]) as isize - g.padding[1] as isize;
        // Output columns whose input column is inside the image: j_lo..j_hi.
        let j_lo = if off_w >= 0 {
            0
        } else {
            (((-off_w) as usize).div_ceil(sw)).min(ow)
        };
        let j_hi = {
            // One past the largest j with j * sw + off_w <= w - 1.
            let limit = w as isize - 1 - off_w;
            if limit < 0 {
                0
            } else {
                (limit as usize / sw + 1).min(ow)
            }
        }
        .max(j_lo);
        for (i, out) in row.chunks_exact_mut(ow).take(oh).enumerate() {
            let src = (i * sh) as isize + off_h;
            if src < 0 || src as usize >= h {
                out.fill(0.0);
                continue;
            }
            let line = &plane[src as usize * w..(src as usize + 1) * w];
            out[..j_lo].fill(0.0);
            out[j_hi..].fill(0.0);
            let start = (j_lo * sw) as isize + off_w;
            if sw == 1 {
                let s = start as usize;
                out[j_lo..j_hi].copy_from_slice(&line[s..s + (j_hi - j_lo)]);
            } else {
                for (k, o) in out[j_lo..j_hi].iter_mut().enumerate() {
                    *o = line[start as usize + k * sw];
                }
            }
        }
    }

    /// im2col of one image into `cols` (`[C*kh*kw, P]`; rows no weight uses are left as they
    /// were), over `threads` when it is worth it.
    fn im2col(
        &self,
        image: &[f32],
        hw: [usize; 2],
        out_hw: [usize; 2],
        cols: &mut [f32],
        parallel: bool,
    ) {
        let p = out_hw[0] * out_hw[1];
        if parallel {
            // Split the buffer into rows and build only the used ones.
            let mut slots: Vec<Option<&mut [f32]>> = cols.chunks_exact_mut(p).map(Some).collect();
            let jobs: Vec<(usize, &mut [f32])> = self
                .used_rows
                .iter()
                .map(|&r| {
                    (
                        r as usize,
                        slots[r as usize].take().expect("rows are distinct"),
                    )
                })
                .collect();
            jobs.into_par_iter()
                .for_each(|(r, row)| self.im2col_row(image, hw, out_hw, r, row));
        } else {
            for &r in &self.used_rows {
                let r = r as usize;
                self.im2col_row(image, hw, out_hw, r, &mut cols[r * p..(r + 1) * p]);
            }
        }
    }

    /// Output channels `first..` (as many as `out` holds rows of `p`) from the im2col matrix.
    fn channels(&self, cols: &[f32], p: usize, first: usize, out: &mut [f32]) {
        for (k, y) in out.chunks_exact_mut(p).enumerate() {
            let o = first + k;
            y.fill(self.bias.as_ref().map_or(0.0, |b| b[o]));
            let (s, e) = (self.row_start[o] as usize, self.row_start[o + 1] as usize);
            let (rows, vals) = (&self.rows[s..e], &self.values[s..e]);
            let row = |r: u32| &cols[r as usize * p..(r as usize + 1) * p];
            // Four weights per pass over the output row: a quarter of the loads and stores of
            // `y` that one axpy per weight would make.
            let mut rc = rows.chunks_exact(4);
            let mut vc = vals.chunks_exact(4);
            for (r, v) in (&mut rc).zip(&mut vc) {
                let (a, b, c, d) = (row(r[0]), row(r[1]), row(r[2]), row(r[3]));
                let (va, vb, vc, vd) = (v[0], v[1], v[2], v[3]);
                for ((((y, &a), &b), &c), &d) in y.iter_mut().zip(a).zip(b).zip(c).zip(d) {
                    *y += va * a + vb * b + vc * c + vd * d;
                }
            }
            for (&r, &v) in rc.remainder().iter().zip(vc.remainder()) {
                for (y, &a) in y.iter_mut().zip(row(r)) {
                    *y += v * a;
                }
            }
        }
    }

    /// One image, all output channels; output channels split across threads if `parallel`.
    fn image(
        &self,
        image: &[f32],
        hw: [usize; 2],
        out_hw: [usize; 2],
        y: &mut [f32],
        parallel: bool,
    ) {
        let p = out_hw[0] * out_hw[1];
        let run = |cols: &[f32], y: &mut [f32]| {
            if parallel {
                let threads = rayon::current_num_threads();
                let chunk = self.geometry.out_channels.div_ceil(threads * 4).max(1);
                y.par_chunks_mut(chunk * p)
                    .enumerate()
                    .for_each(|(c, out)| self.channels(cols, p, c * chunk, out));
            } else {
                self.channels(cols, p, 0, y);
            }
        };
        if self.geometry.is_pointwise() {
            run(image, y);
        } else {
            let len =
                self.geometry.in_channels * self.geometry.kernel[0] * self.geometry.kernel[1] * p;
            with_cols(len, |cols| {
                self.im2col(image, hw, out_hw, cols, parallel);
                run(cols, y);
            });
        }
    }
}

impl Conv2dKernel for SparseIm2colConv {
    fn geometry(&self) -> &ConvGeometry {
        &self.geometry
    }

    fn forward(&self, x: &[f32], batch: usize, hw: [usize; 2], y: &mut [f32]) {
        let g = &self.geometry;
        let out_hw = check_sizes(g, x, batch, hw, y);
        let (in_len, out_len) = (
            g.in_channels * hw[0] * hw[1],
            g.out_channels * out_hw[0] * out_hw[1],
        );
        if out_len == 0 {
            return;
        }
        let p = out_hw[0] * out_hw[1];
        let threads = rayon::current_num_threads();
        let work = (self.nnz() + g.in_channels * g.kernel[0] * g.kernel[1]) * p * batch;
        let parallel = threads > 1 && work >= PARALLEL_MIN_MACS;
        if parallel && batch >= threads {
            // Images are independent: one per task, each with its thread's buffer.
            y.par_chunks_mut(out_len)
                .zip(x.par_chunks(in_len))
                .for_each(|(y, x)| self.image(x, hw, out_hw, y, false));
        } else {
            for (y, x) in y.chunks_mut(out_len).zip(x.chunks(in_len)) {
                self.image(x, hw, out_hw, y, parallel);
            }
        }
    }

    fn weight_bytes(&self) -> usize {
        4 * (self.row_start.len() + self.rows.len() + self.values.len())
            + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }
}
