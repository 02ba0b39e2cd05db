//! 2-D convolution, forward and backward, on `[N, C, H, W]` row-major `f32` buffers
//! (PyTorch's and Burn's layout and semantics: weights `[out, in/groups, kh, kw]`, zero padding,
//! stride, dilation, groups).
//!
//! A plain reference and the fast paths sit side by side:
//! - [`reference`]: seven nested loops, slow and obviously right; the tests hold the fast path
//!   to it, and it to finite differences;
//! - the fast path ([`forward`], [`backward`]): im2col + GEMM per image (Chellapilla et al.
//!   2006, "High performance convolutional neural networks for document processing"), one image
//!   per rayon task with that thread's own column buffer, so the GEMMs run single-threaded on
//!   cache-sized blocks. The weight gradient reuses the forward's column matrix
//!   (`dW += dY · colsᵀ`); the input gradient is `col2im(Wᵀ · dY)`. A 1x1 stride-1 unpadded
//!   convolution needs no im2col: the image *is* the column matrix. Convolutions with one input
//!   channel per group (depthwise) skip GEMM, whose one-row products would be all overhead, for
//!   direct loops: whole shifted planes at stride 1 ([`depthwise`]), shifted rows otherwise;
//! - [`direct`] (x86-64 with AVX2 and FMA, checked at run time): the forward of every
//!   convolution with a window of 2+ taps that is not depthwise, and the input gradient of the
//!   stride-1 ones, with register-blocked micro-kernels and no column matrix. Where it runs, the
//!   GEMM paths above still compute weight gradients, and [`forward_gemm`] / [`backward_gemm`]
//!   keep them callable so the tests hold them to the reference on every machine.

use super::gemm::{Mat, Threads, sgemm};
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

mod depthwise;
pub mod direct;

/// Everything a convolution kernel needs to know about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dProblem {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Input `[H, W]`.
    pub in_hw: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Zero padding before (top, left) and after (bottom, right).
    pub pad_begin: [usize; 2],
    pub pad_end: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl Conv2dProblem {
    /// Checks what the kernels rely on: positive sizes, groups dividing both channel counts and
    /// a window that fits the padded input.
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
        for i in 0..2 {
            if self.in_hw[i] + self.pad_begin[i] + self.pad_end[i] < self.span(i) {
                return Err(format!(
                    "a {:?} window (dilation {:?}) does not fit the padded {:?} input",
                    self.kernel, self.dilation, self.in_hw
                ));
            }
        }
        Ok(())
    }

    fn span(&self, i: usize) -> usize {
        self.dilation[i] * (self.kernel[i] - 1) + 1
    }

    /// Output `[H', W']`; the problem must be valid.
    pub fn out_hw(&self) -> [usize; 2] {
        [0, 1].map(|i| {
            (self.in_hw[i] + self.pad_begin[i] + self.pad_end[i] - self.span(i)) / self.stride[i]
                + 1
        })
    }

    pub fn in_per_group(&self) -> usize {
        self.in_channels / self.groups
    }

    pub fn out_per_group(&self) -> usize {
        self.out_channels / self.groups
    }

    /// Rows of a group's column matrix (weights per output channel): `in/groups * kh * kw`.
    pub fn patch_len(&self) -> usize {
        self.in_per_group() * self.kernel[0] * self.kernel[1]
    }

    fn in_plane(&self) -> usize {
        self.in_hw[0] * self.in_hw[1]
    }

    pub fn out_plane(&self) -> usize {
        let [oh, ow] = self.out_hw();
        oh * ow
    }

    pub fn x_len(&self) -> usize {
        self.batch * self.in_channels * self.in_plane()
    }

    pub fn weight_len(&self) -> usize {
        self.out_channels * self.patch_len()
    }

    pub fn y_len(&self) -> usize {
        self.batch * self.out_channels * self.out_plane()
    }

    /// Multiply-adds of one forward pass.
    pub fn macs(&self) -> usize {
        self.batch * self.out_channels * self.out_plane() * self.patch_len()
    }

    /// A 1x1, stride 1, unpadded convolution: its column matrix is the input itself.
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1]
            && self.stride == [1, 1]
            && self.pad_begin == [0, 0]
            && self.pad_end == [0, 0]
    }

    /// One input channel per group (depthwise, possibly with a channel multiplier).
    fn is_depthwise(&self) -> bool {
        self.in_per_group() == 1 && self.groups > 1
    }

    fn check(&self, x: usize, w: usize, y: usize) {
        if let Err(e) = self.validate() {
            panic!("conv2d: {e}");
        }
        assert_eq!(x, self.x_len(), "conv2d: input length");
        assert_eq!(w, self.weight_len(), "conv2d: weight length");
        assert_eq!(y, self.y_len(), "conv2d: output length");
    }
}

/// Output columns `j` whose input column `j * stride + offset` lies inside `0..len`:
/// `lo..hi` (empty when none does).
fn valid_range(offset: isize, stride: usize, len: usize, out: usize) -> (usize, usize) {
    let lo = if offset >= 0 {
        0
    } else {
        ((-offset) as usize).div_ceil(stride).min(out)
    };
    let limit = len as isize - 1 - offset;
    let hi = if limit < 0 {
        0
    } else {
        (limit as usize / stride + 1).min(out)
    };
    (lo, hi.max(lo))
}

/// The `[kh, kw]` tap `(ki, kj)` of the window as an offset into the input: input row
/// `i * stride + off_h` feeds output row `i`.
fn tap_offsets(p: &Conv2dProblem, ki: usize, kj: usize) -> (isize, isize) {
    (
        (ki * p.dilation[0]) as isize - p.pad_begin[0] as isize,
        (kj * p.dilation[1]) as isize - p.pad_begin[1] as isize,
    )
}

/// One piece of a column-matrix row: output row `i`, columns `j0..j1` of it, stored from `at`
/// in the block row. Columns `lo..hi` read the input line `line` (an offset into the group's
/// planes, `None` when the row falls in the padding) at `start + (j - lo) * stride`; the others
/// read padding.
struct Piece {
    at: usize,
    j0: usize,
    j1: usize,
    lo: usize,
    hi: usize,
    line: Option<usize>,
    start: usize,
}

/// Walks the block of columns `cols` (output positions `i * W' + j`) of a group's column
/// matrix, row `r = (c, ki, kj)` by row, calling `f(r, piece)`: the one index computation that
/// [`im2col`] and its adjoint [`col2im`] share.
fn for_each_piece(
    p: &Conv2dProblem,
    cols: std::ops::Range<usize>,
    mut f: impl FnMut(usize, Piece),
) {
    let [h, w] = p.in_hw;
    let ow = p.out_hw()[1];
    let [kh, kw] = p.kernel;
    let sh = p.stride[0];
    for r in 0..p.patch_len() {
        let (c, ki, kj) = (r / (kh * kw), r / kw % kh, r % kw);
        let (off_h, off_w) = tap_offsets(p, ki, kj);
        let (v_lo, v_hi) = valid_range(off_w, p.stride[1], w, ow);
        let mut q = cols.start;
        while q < cols.end {
            let (i, j0) = (q / ow, q % ow);
            let j1 = ow.min(j0 + (cols.end - q));
            let (lo, hi) = (v_lo.clamp(j0, j1), v_hi.clamp(j0, j1));
            let src = (i * sh) as isize + off_h;
            let line = (src >= 0 && (src as usize) < h).then(|| (c * h + src as usize) * w);
            let start = ((lo * p.stride[1]) as isize + off_w).max(0) as usize;
            f(
                r,
                Piece {
                    at: q - cols.start,
                    j0,
                    j1,
                    lo,
                    hi,
                    line,
                    start,
                },
            );
            q += j1 - j0;
        }
    }
}

/// Columns `cols` of the column matrix `[in/groups * kh * kw, H' * W']` of one group of one
/// image (`planes` holds its `in/groups` input planes), into `out` (`[rows, cols.len()]`).
/// Building the matrix a block of columns at a time keeps it in cache for the GEMM that reads it.
pub fn im2col(p: &Conv2dProblem, planes: &[f32], cols: std::ops::Range<usize>, out: &mut [f32]) {
    let (width, sw) = (cols.len(), p.stride[1]);
    for_each_piece(p, cols, |r, x| {
        let dst = &mut out[r * width + x.at..][..x.j1 - x.j0];
        let Some(line) = x.line else {
            dst.fill(0.0);
            return;
        };
        dst[..x.lo - x.j0].fill(0.0);
        dst[x.hi - x.j0..].fill(0.0);
        if x.lo == x.hi {
            return;
        }
        let dst = &mut dst[x.lo - x.j0..x.hi - x.j0];
        let src = &planes[line + x.start..];
        if sw == 1 {
            dst.copy_from_slice(&src[..dst.len()]);
        } else {
            for (k, o) in dst.iter_mut().enumerate() {
                *o = src[k * sw];
            }
        }
    });
}

/// The adjoint of [`im2col`]: adds each entry of the column block back onto the input
/// position it was read from (`planes` must start zeroed or hold what it should add to).
pub fn col2im(p: &Conv2dProblem, block: &[f32], cols: std::ops::Range<usize>, planes: &mut [f32]) {
    let (width, sw) = (cols.len(), p.stride[1]);
    for_each_piece(p, cols, |r, x| {
        let Some(line) = x.line.filter(|_| x.lo < x.hi) else {
            return;
        };
        let src = &block[r * width + x.at + (x.lo - x.j0)..][..x.hi - x.lo];
        let dst = &mut planes[line + x.start..];
        if sw == 1 {
            for (o, &v) in dst.iter_mut().zip(src) {
                *o += v;
            }
        } else {
            for (k, &v) in src.iter().enumerate() {
                dst[k * sw] += v;
            }
        }
    });
}

/// Output columns per block of the column matrix: about 48K floats (192 KB, inside a core's
/// L2 cache), at least 32 columns.
fn block_cols(p: &Conv2dProblem) -> usize {
    (48 * 1024 / p.patch_len().max(1))
        .max(32)
        .min(p.out_plane().max(1))
}

fn blocks(p: &Conv2dProblem) -> impl Iterator<Item = std::ops::Range<usize>> {
    let (n, b) = (p.out_plane(), block_cols(p));
    (0..n.div_ceil(b)).map(move |i| i * b..((i + 1) * b).min(n))
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch buffer of `len` floats: the thread's own when it is free (it is
/// reused from call to call, so steady-state training allocates no column matrices), a fresh
/// one when a nested call on the same thread already holds it.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// Whether to spread the images of a batch over the threads (each GEMM then single-threaded)
/// or, for a batch smaller than the pool, run images in turn with multi-threaded GEMMs.
fn per_image_tasks(batch: usize) -> bool {
    batch >= rayon::current_num_threads()
}

/// `y = conv2d(x, w) + bias`.
pub fn forward(p: &Conv2dProblem, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    forward_with(p, x, w, bias, false, true, y)
}

/// `y = max(0, conv2d(x, w) + bias)`, the ReLU applied to each output block while it is
/// still in registers or cache (inference, where a following ReLU needs no separate pass).
pub fn forward_relu(p: &Conv2dProblem, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    forward_with(p, x, w, bias, true, true, y)
}

/// [`forward`] or [`forward_relu`] into a new buffer, which is not zeroed first when the direct
/// kernel writes every element anyway.
pub fn forward_new(
    p: &Conv2dProblem,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    check_forward(p, x, w, bias, p.y_len());
    if p.in_channels * p.in_plane() > 0 && p.out_plane() > 0 && direct::applies(p) {
        let mut y = Vec::with_capacity(p.y_len());
        direct::forward(
            p,
            x,
            w,
            bias,
            relu,
            &mut y.spare_capacity_mut()[..p.y_len()],
        );
        // SAFETY: the direct kernel wrote all `y_len` elements (see `direct::forward`).
        unsafe { y.set_len(p.y_len()) };
        return y;
    }
    let mut y = vec![0f32; p.y_len()];
    forward_with(p, x, w, bias, relu, true, &mut y);
    y
}

/// [`forward`] without the direct kernel: the GEMM paths it replaces where AVX2 is present,
/// kept callable so that the tests hold them to the reference on every machine.
pub fn forward_gemm(p: &Conv2dProblem, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    forward_with(p, x, w, bias, false, false, y)
}

/// Panics with a clear message unless the buffers fit the problem.
fn check_forward(p: &Conv2dProblem, x: &[f32], w: &[f32], bias: Option<&[f32]>, y_len: usize) {
    p.check(x.len(), w.len(), y_len);
    if let Some(b) = bias {
        assert_eq!(b.len(), p.out_channels, "conv2d: bias length");
    }
}

fn forward_with(
    p: &Conv2dProblem,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    allow_direct: bool,
    y: &mut [f32],
) {
    check_forward(p, x, w, bias, y.len());
    let x_img = p.in_channels * p.in_plane();
    let y_img = p.out_channels * p.out_plane();
    if x_img == 0 || y_img == 0 {
        return;
    }
    if allow_direct && direct::applies(p) {
        // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and the kernel only writes
        // initialised values through this view.
        let y = unsafe { &mut *(y as *mut [f32] as *mut [MaybeUninit<f32>]) };
        return direct::forward(p, x, w, bias, relu, y);
    }
    let step = images_per_call(p);
    let one = |(x, y): (&[f32], &mut [f32]), threads: Threads| {
        forward_images(p, x, w, bias, y, threads);
        if relu {
            for v in y.iter_mut() {
                *v = v.max(0.0);
            }
        }
    };
    if per_image_tasks(p.batch) {
        x.par_chunks(step * x_img)
            .zip(y.par_chunks_mut(step * y_img))
            .for_each(|pair| one(pair, Threads::One));
    } else {
        x.chunks(step * x_img)
            .zip(y.chunks_mut(step * y_img))
            .for_each(|pair| one(pair, Threads::All));
    }
}

/// Images one call of the image kernels takes: several for the shifted-GEMM path (their
/// padded planes laid end to end make one longer GEMM), one otherwise.
fn images_per_call(p: &Conv2dProblem) -> usize {
    if !shifted::applies(p) {
        return 1;
    }
    let per_task = p.batch.div_ceil(rayon::current_num_threads()).max(1);
    shifted::images_per_call(p).min(per_task)
}

/// The forward of consecutive images (`x.len()` a multiple of one image's size).
fn forward_images(
    p: &Conv2dProblem,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    threads: Threads,
) {
    let x_img = p.in_channels * p.in_plane();
    let y_img = p.out_channels * p.out_plane();
    if shifted::applies(p) {
        for img in y.chunks_exact_mut(y_img) {
            start_from_bias(p, bias, img);
        }
        return shifted::forward_images(p, x, w, y, x.len() / x_img, threads);
    }
    for (x, y) in x.chunks_exact(x_img).zip(y.chunks_exact_mut(y_img)) {
        forward_image(p, x, w, bias, y, threads);
    }
}

/// Sets one image's output planes to their bias (or zero): the GEMM paths accumulate onto it.
fn start_from_bias(p: &Conv2dProblem, bias: Option<&[f32]>, y_img: &mut [f32]) {
    match bias {
        Some(b) => {
            for (row, &v) in y_img.chunks_exact_mut(p.out_plane()).zip(b) {
                row.fill(v);
            }
        }
        None => y_img.fill(0.0),
    }
}

fn forward_image(
    p: &Conv2dProblem,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    threads: Threads,
) {
    let plane = p.out_plane();
    start_from_bias(p, bias, y);
    if p.is_depthwise() {
        if depthwise::applies(p) {
            return depthwise::forward_image(p, x, w, y, threads);
        }
        return depthwise_forward(p, x, w, y);
    }
    let (k, og) = (p.patch_len(), p.out_per_group());
    let x_group = p.in_per_group() * p.in_plane();
    for g in 0..p.groups {
        let planes = &x[g * x_group..(g + 1) * x_group];
        let wg = Mat::rows(&w[g * og * k..(g + 1) * og * k], k);
        let yg = &mut y[g * og * plane..(g + 1) * og * plane];
        if p.is_pointwise() {
            sgemm(
                og,
                plane,
                k,
                yg,
                plane,
                true,
                wg,
                Mat::rows(planes, plane),
                threads,
            );
            continue;
        }
        with_scratch(k * block_cols(p), |buf| {
            for cols in blocks(p) {
                let width = cols.len();
                let block = &mut buf[..k * width];
                im2col(p, planes, cols.clone(), block);
                let out = &mut yg[cols.start..];
                sgemm(
                    og,
                    width,
                    k,
                    out,
                    plane,
                    true,
                    wg,
                    Mat::rows(block, width),
                    threads,
                );
            }
        });
    }
}

/// Direct depthwise forward of one image with a stride (stride 1 takes [`depthwise`]): each
/// output plane adds one shifted, strided copy of its input plane per tap.
fn depthwise_forward(p: &Conv2dProblem, x: &[f32], w: &[f32], y: &mut [f32]) {
    let [h, wd] = p.in_hw;
    let [oh, ow] = p.out_hw();
    let [kh, kw] = p.kernel;
    let [sh, sw] = p.stride;
    let og = p.out_per_group();
    for (o, out) in y.chunks_exact_mut(oh * ow).enumerate() {
        let plane = &x[(o / og) * h * wd..(o / og + 1) * h * wd];
        for ki in 0..kh {
            for kj in 0..kw {
                let wv = w[(o * kh + ki) * kw + kj];
                let (off_h, off_w) = tap_offsets(p, ki, kj);
                let (j_lo, j_hi) = valid_range(off_w, sw, wd, ow);
                for (i, row) in out.chunks_exact_mut(ow).enumerate() {
                    let src = (i * sh) as isize + off_h;
                    if src < 0 || src as usize >= h {
                        continue;
                    }
                    let line = &plane[src as usize * wd..(src as usize + 1) * wd];
                    let start = ((j_lo * sw) as isize + off_w) as usize;
                    for (k, o) in row[j_lo..j_hi].iter_mut().enumerate() {
                        *o += wv * line[start + k * sw];
                    }
                }
            }
        }
    }
}

/// Gradients of one convolution; each is `None` when not asked for.
#[derive(Debug, Clone, Default)]
pub struct ConvGrads {
    pub x: Option<Vec<f32>>,
    pub weight: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
}

/// Which gradients [`backward`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub x: bool,
    pub weight: bool,
    pub bias: bool,
}

/// Gradients of `y = conv2d(x, w) + b` given `dy`. Where the direct kernel applies to the
/// input gradient (stride 1, see [`input_gradient_problem`]) it computes it as a convolution
/// of `dy`; otherwise one pass over the batch builds each image's column matrix once for the
/// weight gradient and folds `Wᵀ · dY` back into the input gradient. Weight gradients are
/// summed per thread, then across threads.
pub fn backward(p: &Conv2dProblem, x: &[f32], w: &[f32], dy: &[f32], wanted: Wanted) -> ConvGrads {
    backward_with(p, x, w, dy, wanted, true)
}

/// [`backward`] with the input gradient from the GEMM paths, as [`forward_gemm`].
pub fn backward_gemm(
    p: &Conv2dProblem,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    wanted: Wanted,
) -> ConvGrads {
    backward_with(p, x, w, dy, wanted, false)
}

fn backward_with(
    p: &Conv2dProblem,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    wanted: Wanted,
    allow_direct: bool,
) -> ConvGrads {
    p.check(x.len(), w.len(), dy.len());
    if allow_direct
        && wanted.x
        && let Some(tp) = input_gradient_problem(p)
    {
        let dx = forward_new(&tp, dy, &flip_transpose(p, w), None, false);
        let mut grads = backward(p, x, w, dy, Wanted { x: false, ..wanted });
        grads.x = Some(dx);
        return grads;
    }
    let x_img = p.in_channels * p.in_plane();
    let y_img = p.out_channels * p.out_plane();
    let mut grads = ConvGrads {
        x: wanted.x.then(|| vec![0f32; x.len()]),
        weight: None,
        bias: wanted.bias.then(|| bias_grad(p, dy)),
    };
    if x_img == 0 || y_img == 0 || !(wanted.x || wanted.weight) {
        grads.weight = wanted.weight.then(|| vec![0f32; w.len()]);
        return grads;
    }
    let wlen = if wanted.weight { w.len() } else { 0 };
    let one = |dx: Option<&mut [f32]>, x: &[f32], dy: &[f32], dw: &mut [f32], t: Threads| {
        backward_images(p, x, w, dy, dx, wanted.weight.then_some(dw), t)
    };
    let step = images_per_call(p);
    let dw = if per_image_tasks(p.batch) {
        // Bound the number of per-thread weight-gradient buffers by splitting the batch into
        // one contiguous run of images per thread.
        let per_task = p.batch.div_ceil(rayon::current_num_threads()).max(1);
        let xs = x.par_chunks(per_task * x_img);
        let dys = dy.par_chunks(per_task * y_img);
        let partial = |(xs, dys): (&[f32], &[f32]), dxs: Option<&mut [f32]>| {
            let mut dw = vec![0f32; wlen];
            let mut dxs = dxs.map(|d| d.chunks_mut(step * x_img));
            for (x, dy) in xs.chunks(step * x_img).zip(dys.chunks(step * y_img)) {
                let dx = dxs
                    .as_mut()
                    .map(|it| it.next().expect("one input gradient per image"));
                one(dx, x, dy, &mut dw, Threads::One);
            }
            dw
        };
        let parts: Vec<Vec<f32>> = match grads.x.as_mut() {
            Some(dx) => xs
                .zip(dys)
                .zip(dx.par_chunks_mut(per_task * x_img))
                .map(|(pair, dxs)| partial(pair, Some(dxs)))
                .collect(),
            None => xs.zip(dys).map(|pair| partial(pair, None)).collect(),
        };
        sum_parts(parts, wlen)
    } else {
        let mut dw = vec![0f32; wlen];
        let mut dxs = grads.x.as_mut().map(|d| d.chunks_mut(step * x_img));
        for (x, dy) in x.chunks(step * x_img).zip(dy.chunks(step * y_img)) {
            let dx = dxs
                .as_mut()
                .map(|it| it.next().expect("one input gradient per image"));
            one(dx, x, dy, &mut dw, Threads::All);
        }
        dw
    };
    grads.weight = wanted.weight.then_some(dw);
    grads
}

/// The input gradient of a stride-1 convolution is the "full" convolution of `dY` with the
/// weights flipped in both spatial axes and with input and output channels swapped:
/// `dX[c, y, x] = Σ_{o,i,j} W[o, c, i, j] · dY[o, y + p − i·d, x + p − j·d]`, i.e. padding
/// `d·(k − 1) − p` on each side. The direct kernel then serves the backward pass too.
fn input_gradient_problem(p: &Conv2dProblem) -> Option<Conv2dProblem> {
    if p.stride != [1, 1] {
        return None;
    }
    let full = [0, 1].map(|i| p.dilation[i] * (p.kernel[i] - 1));
    let (pad_begin, pad_end) = (
        [0, 1].map(|i| full[i].checked_sub(p.pad_begin[i])),
        [0, 1].map(|i| full[i].checked_sub(p.pad_end[i])),
    );
    let tp = Conv2dProblem {
        in_channels: p.out_channels,
        out_channels: p.in_channels,
        in_hw: p.out_hw(),
        pad_begin: [pad_begin[0]?, pad_begin[1]?],
        pad_end: [pad_end[0]?, pad_end[1]?],
        ..*p
    };
    (direct::applies(&tp) && tp.validate().is_ok()).then_some(tp)
}

/// Weights of [`input_gradient_problem`]: `W'[g·ig + c, o, i, j] = W[g·og + o, c, kh−1−i, kw−1−j]`.
fn flip_transpose(p: &Conv2dProblem, w: &[f32]) -> Vec<f32> {
    let (ig, og, [kh, kw]) = (p.in_per_group(), p.out_per_group(), p.kernel);
    let taps = kh * kw;
    let mut out = vec![0f32; w.len()];
    for g in 0..p.groups {
        for o in 0..og {
            for c in 0..ig {
                let src = &w[((g * og + o) * ig + c) * taps..][..taps];
                let dst = &mut out[((g * ig + c) * og + o) * taps..][..taps];
                for (t, &v) in src.iter().enumerate() {
                    dst[taps - 1 - t] = v;
                }
            }
        }
    }
    out
}

fn sum_parts(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut parts = parts.into_iter();
    let mut total = parts.next().unwrap_or_else(|| vec![0f32; len]);
    for part in parts {
        for (t, v) in total.iter_mut().zip(part) {
            *t += v;
        }
    }
    total
}

fn bias_grad(p: &Conv2dProblem, dy: &[f32]) -> Vec<f32> {
    let plane = p.out_plane();
    let mut db = vec![0f64; p.out_channels];
    if plane > 0 {
        for (i, row) in dy.chunks_exact(plane).enumerate() {
            db[i % p.out_channels] += row.iter().map(|&v| v as f64).sum::<f64>();
        }
    }
    db.into_iter().map(|v| v as f32).collect()
}

/// The backward of consecutive images; `dw` accumulates over them.
fn backward_images(
    p: &Conv2dProblem,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    mut dx: Option<&mut [f32]>,
    mut dw: Option<&mut [f32]>,
    threads: Threads,
) {
    let x_img = p.in_channels * p.in_plane();
    let y_img = p.out_channels * p.out_plane();
    let n = x.len() / x_img;
    if shifted::applies(p) {
        return shifted::backward_images(p, x, w, dy, dx, dw, n, threads);
    }
    for i in 0..n {
        let dxi = dx
            .as_deref_mut()
            .map(|d| &mut d[i * x_img..(i + 1) * x_img]);
        let (xi, dyi) = (
            &x[i * x_img..(i + 1) * x_img],
            &dy[i * y_img..(i + 1) * y_img],
        );
        backward_image(p, xi, w, dyi, dxi, dw.as_deref_mut(), threads);
    }
}

fn backward_image(
    p: &Conv2dProblem,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    mut dx: Option<&mut [f32]>,
    mut dw: Option<&mut [f32]>,
    threads: Threads,
) {
    if p.is_depthwise() {
        if depthwise::applies(p) {
            return depthwise::backward_image(p, x, w, dy, dx, dw, threads);
        }
        return depthwise_backward(p, x, w, dy, dx, dw);
    }
    let plane = p.out_plane();
    let (k, og) = (p.patch_len(), p.out_per_group());
    let x_group = p.in_per_group() * p.in_plane();
    for g in 0..p.groups {
        let planes = &x[g * x_group..(g + 1) * x_group];
        let dyg = &dy[g * og * plane..(g + 1) * og * plane];
        let wg = &w[g * og * k..(g + 1) * og * k];
        let dxg = dx
            .as_deref_mut()
            .map(|d| &mut d[g * x_group..(g + 1) * x_group]);
        let dwg = dw
            .as_deref_mut()
            .map(|d| &mut d[g * og * k..(g + 1) * og * k]);
        if p.is_pointwise() {
            if let Some(dwg) = dwg {
                // dW[o, c] += Σ_p dY[o, p] · X[c, p]
                let xt = Mat::transposed(planes, plane);
                sgemm(
                    og,
                    k,
                    plane,
                    dwg,
                    k,
                    true,
                    Mat::rows(dyg, plane),
                    xt,
                    threads,
                );
            }
            if let Some(dxg) = dxg {
                // dX[c, p] = Σ_o W[o, c] · dY[o, p]
                let wt = Mat::transposed(wg, k);
                sgemm(
                    k,
                    plane,
                    og,
                    dxg,
                    plane,
                    false,
                    wt,
                    Mat::rows(dyg, plane),
                    threads,
                );
            }
            continue;
        }
        let (mut dxg, mut dwg) = (dxg, dwg);
        with_scratch(k * block_cols(p), |buf| {
            for cols in blocks(p) {
                let width = cols.len();
                let block = &mut buf[..k * width];
                let dy_block = Mat {
                    data: &dyg[cols.start..],
                    row_stride: plane,
                    col_stride: 1,
                };
                if let Some(dwg) = dwg.as_deref_mut() {
                    // dW[o, r] += Σ_p dY[o, p] · cols[r, p]
                    im2col(p, planes, cols.clone(), block);
                    let ct = Mat::transposed(block, width);
                    sgemm(og, k, width, dwg, k, true, dy_block, ct, threads);
                }
                if let Some(dxg) = dxg.as_deref_mut() {
                    // dcols[r, p] = Σ_o W[o, r] · dY[o, p], folded back with col2im
                    let wt = Mat::transposed(wg, k);
                    sgemm(k, width, og, block, width, false, wt, dy_block, threads);
                    col2im(p, block, cols, dxg);
                }
            }
        });
    }
}

fn depthwise_backward(
    p: &Conv2dProblem,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    mut dx: Option<&mut [f32]>,
    mut dw: Option<&mut [f32]>,
) {
    let [h, wd] = p.in_hw;
    let [oh, ow] = p.out_hw();
    let [kh, kw] = p.kernel;
    let [sh, sw] = p.stride;
    let og = p.out_per_group();
    for (o, grad) in dy.chunks_exact(oh * ow).enumerate() {
        let c = o / og;
        let plane = &x[c * h * wd..(c + 1) * h * wd];
        for ki in 0..kh {
            for kj in 0..kw {
                let widx = (o * kh + ki) * kw + kj;
                let wv = w[widx];
                let (off_h, off_w) = tap_offsets(p, ki, kj);
                let (j_lo, j_hi) = valid_range(off_w, sw, wd, ow);
                let mut acc = 0f32;
                for (i, row) in grad.chunks_exact(ow).enumerate() {
                    let src = (i * sh) as isize + off_h;
                    if src < 0 || src as usize >= h {
                        continue;
                    }
                    let base = src as usize * wd;
                    let start = ((j_lo * sw) as isize + off_w) as usize;
                    if dw.is_some() {
                        let line = &plane[base..base + wd];
                        for (k, &g) in row[j_lo..j_hi].iter().enumerate() {
                            acc += g * line[start + k * sw];
                        }
                    }
                    if let Some(dx) = dx.as_deref_mut() {
                        let line = &mut dx[c * h * wd + base..c * h * wd + base + wd];
                        for (k, &g) in row[j_lo..j_hi].iter().enumerate() {
                            line[start + k * sw] += wv * g;
                        }
                    }
                }
                if let Some(dw) = dw.as_deref_mut() {
                    dw[widx] += acc;
                }
            }
        }
    }
}

/// Stride-1 convolutions without a column matrix. On a zero-padded copy of the image (rows of
/// `Wp = W + pad` values), the input under tap `(ki, kj)` for every output position is the
/// padded planes shifted by `ki·d·Wp + kj·d`: a strided view, so each tap is one GEMM
/// `Y += W_tap · X_shifted` with `k = in/groups` (Lavin & Gray 2016 describe the same
/// decomposition). The GEMMs compute `Wp` columns per output row, of which the last
/// `Wp − W'` are discarded. This skips im2col's write and re-read of a `kh·kw`-times larger
/// matrix, which costs about 40% of an im2col convolution with 16 channels.
mod shifted {
    use super::*;

    /// Worth it with no stride to skip, a small window (each tap is a GEMM call) and enough
    /// input channels for those GEMMs to have some depth: measured with `convpress bench ops`,
    /// it halves the backward of ResNet-20's 3x3/16-channel convolutions but slows LeNet-5's
    /// 5x5 ones with 1 and 20 input channels, which keep im2col.
    pub(super) fn applies(p: &Conv2dProblem) -> bool {
        let taps = p.kernel[0] * p.kernel[1];
        p.stride == [1, 1] && (2..=9).contains(&taps) && p.in_per_group() >= 8
    }

    /// `(padded height, padded width, computed positions)`.
    fn dims(p: &Conv2dProblem) -> (usize, usize, usize) {
        let hp = p.in_hw[0] + p.pad_begin[0] + p.pad_end[0];
        let wp = p.in_hw[1] + p.pad_begin[1] + p.pad_end[1];
        let [oh, ow] = p.out_hw();
        (hp, wp, (oh - 1) * wp + ow)
    }

    fn taps(p: &Conv2dProblem, wp: usize) -> impl Iterator<Item = (usize, usize)> {
        let [kh, kw] = p.kernel;
        let [dh, dw] = p.dilation;
        (0..kh * kw).map(move |t| (t, (t / kw) * dh * wp + (t % kw) * dw))
    }

    /// Images per call: their padded input planes fill about 64K floats (256 KB).
    pub(super) fn images_per_call(p: &Conv2dProblem) -> usize {
        let (hp, wp, _) = dims(p);
        (64 * 1024 / (p.in_per_group() * hp * wp).max(1)).max(1)
    }

    /// Copies one plane into its padded slot (borders zero).
    fn pad(p: &Conv2dProblem, src: &[f32], wp: usize, dst: &mut [f32]) {
        let [h, w] = p.in_hw;
        let (top, left) = (p.pad_begin[0], p.pad_begin[1]);
        dst[..top * wp].fill(0.0);
        dst[(top + h) * wp..].fill(0.0);
        for (r, line) in src.chunks_exact(w).enumerate() {
            let row = &mut dst[(top + r) * wp..(top + r + 1) * wp];
            row[..left].fill(0.0);
            row[left..left + w].copy_from_slice(line);
            row[left + w..].fill(0.0);
        }
    }

    /// Tap `t` of the group's weights as an `[out, in]` matrix (or its transpose).
    fn tap_weights<'a>(wg: &'a [f32], p: &Conv2dProblem, t: usize, transposed: bool) -> Mat<'a> {
        let taps = p.kernel[0] * p.kernel[1];
        let (out_stride, in_stride) = (p.in_per_group() * taps, taps);
        Mat {
            data: &wg[t..],
            row_stride: if transposed { in_stride } else { out_stride },
            col_stride: if transposed { out_stride } else { in_stride },
        }
    }

    /// Layout of `n` images of one group: channel `c` of image `i` is padded at
    /// `c * n * img + i * img` (`img = Hp * Wp`), so the images of a channel are end to end and
    /// one GEMM row runs through all of them; `total` positions are computed.
    struct Layout {
        img: usize,
        channel: usize,
        total: usize,
    }

    fn layout(p: &Conv2dProblem, n: usize) -> (usize, usize, Layout) {
        let (hp, wp, len) = dims(p);
        let img = hp * wp;
        (
            hp,
            wp,
            Layout {
                img,
                channel: n * img,
                total: (n - 1) * img + len,
            },
        )
    }

    /// Pads group `g` of `n` images into `xp`.
    fn pad_group(
        p: &Conv2dProblem,
        x: &[f32],
        g: usize,
        n: usize,
        wp: usize,
        l: &Layout,
        xp: &mut [f32],
    ) {
        let (ig, plane) = (p.in_per_group(), p.in_plane());
        let x_img = p.in_channels * plane;
        for c in 0..ig {
            for i in 0..n {
                let src = &x[i * x_img + (g * ig + c) * plane..][..plane];
                pad(p, src, wp, &mut xp[c * l.channel + i * l.img..][..l.img]);
            }
        }
    }

    pub(super) fn forward_images(
        p: &Conv2dProblem,
        x: &[f32],
        w: &[f32],
        y: &mut [f32],
        n: usize,
        threads: Threads,
    ) {
        let (_, wp, l) = layout(p, n);
        let (ig, og, [oh, ow]) = (p.in_per_group(), p.out_per_group(), p.out_hw());
        let y_img = p.out_channels * oh * ow;
        let w_group = og * p.patch_len();
        for g in 0..p.groups {
            with_scratch(ig * l.channel + og * l.total, |buf| {
                let (xp, acc) = buf.split_at_mut(ig * l.channel);
                pad_group(p, x, g, n, wp, &l, xp);
                let wg = &w[g * w_group..(g + 1) * w_group];
                for (t, off) in taps(p, wp) {
                    let view = Mat {
                        data: &xp[off..],
                        row_stride: l.channel,
                        col_stride: 1,
                    };
                    let wt = tap_weights(wg, p, t, false);
                    sgemm(og, l.total, ig, acc, l.total, t > 0, wt, view, threads);
                }
                for i in 0..n {
                    for o in 0..og {
                        let out = &mut y[i * y_img + (g * og + o) * oh * ow..][..oh * ow];
                        let a = &acc[o * l.total + i * l.img..];
                        for (r, row) in out.chunks_exact_mut(ow).enumerate() {
                            for (v, &s) in row.iter_mut().zip(&a[r * wp..r * wp + ow]) {
                                *v += s;
                            }
                        }
                    }
                }
            });
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_images(
        p: &Conv2dProblem,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        mut dw: Option<&mut [f32]>,
        n: usize,
        threads: Threads,
    ) {
        let (_, wp, l) = layout(p, n);
        let (ig, og, [oh, ow]) = (p.in_per_group(), p.out_per_group(), p.out_hw());
        let [h, wd] = p.in_hw;
        let (x_img, y_img) = (p.in_channels * h * wd, p.out_channels * oh * ow);
        let taps_n = p.kernel[0] * p.kernel[1];
        let w_group = og * p.patch_len();
        let padded = ig * l.channel;
        for g in 0..p.groups {
            with_scratch(2 * padded + og * l.total + taps_n * og * ig, |buf| {
                let (xp, rest) = buf.split_at_mut(padded);
                let (dxp, rest) = rest.split_at_mut(padded);
                let (dyp, dwt) = rest.split_at_mut(og * l.total);
                // dY on the padded grid, zero in the discarded positions.
                dyp.fill(0.0);
                for i in 0..n {
                    for o in 0..og {
                        let src = &dy[i * y_img + (g * og + o) * oh * ow..][..oh * ow];
                        let dst = &mut dyp[o * l.total + i * l.img..];
                        for (r, row) in src.chunks_exact(ow).enumerate() {
                            dst[r * wp..r * wp + ow].copy_from_slice(row);
                        }
                    }
                }
                let wg = &w[g * w_group..(g + 1) * w_group];
                if let Some(dw) = dw.as_deref_mut() {
                    // dW_tap[o, c] = Σ_q dY[o, q] · X[c, q + off], kept tap-major, then added
                    // into the [out, in, kh, kw] layout.
                    pad_group(p, x, g, n, wp, &l, xp);
                    for (t, off) in taps(p, wp) {
                        let view = Mat {
                            data: &xp[off..],
                            row_stride: 1,
                            col_stride: l.channel,
                        };
                        let dst = &mut dwt[t * og * ig..(t + 1) * og * ig];
                        let dyr = Mat::rows(dyp, l.total);
                        sgemm(og, ig, l.total, dst, ig, false, dyr, view, threads);
                    }
                    let dwg = &mut dw[g * w_group..(g + 1) * w_group];
                    for (t, block) in dwt.chunks_exact(og * ig).enumerate() {
                        for (oc, &v) in block.iter().enumerate() {
                            dwg[oc * taps_n + t] += v;
                        }
                    }
                }
                if let Some(dx) = dx.as_deref_mut() {
                    // dX[c, q + off] += Σ_o W_tap[o, c] · dY[o, q], then the interiors copied out.
                    dxp.fill(0.0);
                    for (t, off) in taps(p, wp) {
                        let wt = tap_weights(wg, p, t, true);
                        let dyr = Mat::rows(dyp, l.total);
                        let dst = &mut dxp[off..];
                        sgemm(ig, l.total, og, dst, l.channel, true, wt, dyr, threads);
                    }
                    let (top, left) = (p.pad_begin[0], p.pad_begin[1]);
                    for i in 0..n {
                        for c in 0..ig {
                            let out = &mut dx[i * x_img + (g * ig + c) * h * wd..][..h * wd];
                            let src = &dxp[c * l.channel + i * l.img..];
                            for (r, line) in out.chunks_exact_mut(wd).enumerate() {
                                let at = (top + r) * wp + left;
                                line.copy_from_slice(&src[at..at + wd]);
                            }
                        }
                    }
                }
            });
        }
    }
}

/// The plain loops: the definition the fast path is tested against.
pub mod reference {
    use super::{Conv2dProblem, ConvGrads, Wanted};

    /// Calls `f(n, o, c, i, j, input_index, output_index, weight_index)` for every
    /// multiply-add of the convolution whose input position lies inside the image.
    fn for_each_mac(p: &Conv2dProblem, mut f: impl FnMut(usize, usize, usize)) {
        let [h, w] = p.in_hw;
        let [oh, ow] = p.out_hw();
        let [kh, kw] = p.kernel;
        let (ig, og) = (p.in_per_group(), p.out_per_group());
        for n in 0..p.batch {
            for o in 0..p.out_channels {
                let g = o / og;
                for i in 0..oh {
                    for j in 0..ow {
                        let y_idx = ((n * p.out_channels + o) * oh + i) * ow + j;
                        for c in 0..ig {
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let r = (i * p.stride[0] + ki * p.dilation[0]) as isize
                                        - p.pad_begin[0] as isize;
                                    let s = (j * p.stride[1] + kj * p.dilation[1]) as isize
                                        - p.pad_begin[1] as isize;
                                    if r < 0 || s < 0 || r as usize >= h || s as usize >= w {
                                        continue;
                                    }
                                    let ch = g * ig + c;
                                    let x_idx = ((n * p.in_channels + ch) * h + r as usize) * w
                                        + s as usize;
                                    let w_idx = ((o * ig + c) * kh + ki) * kw + kj;
                                    f(x_idx, y_idx, w_idx);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn forward(p: &Conv2dProblem, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        p.check(x.len(), w.len(), p.y_len());
        let plane = p.out_plane();
        let mut y: Vec<f64> = (0..p.y_len())
            .map(|i| bias.map_or(0.0, |b| b[(i / plane.max(1)) % p.out_channels] as f64))
            .collect();
        for_each_mac(p, |xi, yi, wi| y[yi] += x[xi] as f64 * w[wi] as f64);
        y.into_iter().map(|v| v as f32).collect()
    }

    pub fn backward(
        p: &Conv2dProblem,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        wanted: Wanted,
    ) -> ConvGrads {
        p.check(x.len(), w.len(), dy.len());
        let mut dx = vec![0f64; x.len()];
        let mut dw = vec![0f64; w.len()];
        for_each_mac(p, |xi, yi, wi| {
            dx[xi] += w[wi] as f64 * dy[yi] as f64;
            dw[wi] += x[xi] as f64 * dy[yi] as f64;
        });
        let plane = p.out_plane().max(1);
        let mut db = vec![0f64; p.out_channels];
        for (i, &g) in dy.iter().enumerate() {
            db[(i / plane) % p.out_channels] += g as f64;
        }
        let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        ConvGrads {
            x: wanted.x.then(|| f32s(dx)),
            weight: wanted.weight.then(|| f32s(dw)),
            bias: wanted.bias.then(|| f32s(db)),
        }
    }
}
