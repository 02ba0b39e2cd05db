//! Stride-1 depthwise convolutions (one input channel per group, any channel multiplier,
//! padding and dilation), forward and backward, as long contiguous loops.
//!
//! On a zero-padded plane of `Hp × Wp` values, the inputs under tap `(ki, kj)` for every output
//! position, laid out at width `Wp` (the last `Wp − W'` columns of each output row computed and
//! discarded), are the padded plane shifted by `ki·d·Wp + kj·d`: so each tap is one
//! `acc += w · shifted` over `(H' − 1)·Wp + W'` values, and in the backward one dot product
//! (the weight's gradient) and one `dpad[shift..] += w · dy` (the input's). The same shift as
//! the `shifted` GEMM path, without a GEMM: a depthwise tap has one weight per plane. Rows of
//! CP-decomposed layers (8 to 32 pixels) are too short for a loop per output row to vectorize;
//! a whole plane is long enough. On x86-64 with AVX2 and FMA (checked at run time) the loops are
//! compiled for them; elsewhere they are the same loops in plain Rust.

use super::{Conv2dProblem, Threads};
use rayon::prelude::*;
use std::cell::RefCell;

/// Stride 1 in both directions: the shifted views are contiguous.
pub(super) fn applies(p: &Conv2dProblem) -> bool {
    p.stride == [1, 1]
}

/// The padded plane's geometry.
#[derive(Clone, Copy)]
struct Layout {
    hp: usize,
    wp: usize,
    ow: usize,
    /// Values per shifted view: `(oh − 1)·wp + ow`.
    len: usize,
    padded: bool,
}

impl Layout {
    fn of(p: &Conv2dProblem) -> Self {
        let [h, w] = p.in_hw;
        let hp = h + p.pad_begin[0] + p.pad_end[0];
        let wp = w + p.pad_begin[1] + p.pad_end[1];
        let [oh, ow] = p.out_hw();
        Layout {
            hp,
            wp,
            ow,
            len: if oh == 0 || ow == 0 {
                0
            } else {
                (oh - 1) * wp + ow
            },
            padded: p.pad_begin != [0, 0] || p.pad_end != [0, 0],
        }
    }

    fn shift(&self, p: &Conv2dProblem, ki: usize, kj: usize) -> usize {
        ki * p.dilation[0] * self.wp + kj * p.dilation[1]
    }
}

/// Per-thread buffers: the padded plane, the accumulator at width `wp`, its gradient twin.
#[derive(Default)]
struct Buffers {
    pad: Vec<f32>,
    acc: Vec<f32>,
    grad: Vec<f32>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

fn with_buffers<R>(f: impl FnOnce(&mut Buffers) -> R) -> R {
    BUFFERS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        Err(_) => f(&mut Buffers::default()),
    })
}

/// `plane` zero-padded into `buf` (resized to `hp·wp`), or `plane` itself without padding.
fn padded<'a>(p: &Conv2dProblem, l: &Layout, plane: &'a [f32], buf: &'a mut Vec<f32>) -> &'a [f32] {
    if !l.padded {
        return plane;
    }
    let w = p.in_hw[1];
    buf.clear();
    buf.resize(l.hp * l.wp, 0.0);
    for (r, line) in plane.chunks_exact(w).enumerate() {
        let at = (r + p.pad_begin[0]) * l.wp + p.pad_begin[1];
        buf[at..at + w].copy_from_slice(line);
    }
    buf
}

/// One image's forward onto `y` (which holds the bias or zeros). `threads`: whether to spread
/// the channels over the pool (a batch too small for one image per thread).
pub(super) fn forward_image(
    p: &Conv2dProblem,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    threads: Threads,
) {
    let l = Layout::of(p);
    let (in_plane, out_plane) = (p.in_plane(), p.out_plane());
    let per_channel = p.out_per_group() * p.kernel[0] * p.kernel[1];
    let channel = |c: usize, xc: &[f32], yc: &mut [f32]| {
        let wc = &w[c * per_channel..(c + 1) * per_channel];
        with_buffers(|b| {
            #[cfg(target_arch = "x86_64")]
            if fma_available() {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { forward_channel_fma(p, &l, wc, xc, yc, b) };
            }
            forward_channel::<false>(p, &l, wc, xc, yc, b)
        })
    };
    let group = p.out_per_group() * out_plane;
    match threads {
        Threads::All => x
            .par_chunks_exact(in_plane)
            .zip(y.par_chunks_exact_mut(group))
            .enumerate()
            .for_each(|(c, (xc, yc))| channel(c, xc, yc)),
        _ => x
            .chunks_exact(in_plane)
            .zip(y.chunks_exact_mut(group))
            .enumerate()
            .for_each(|(c, (xc, yc))| channel(c, xc, yc)),
    }
}

/// One input channel's output planes (`wc`: their taps).
#[inline(always)]
fn forward_channel<const FMA: bool>(
    p: &Conv2dProblem,
    l: &Layout,
    wc: &[f32],
    xc: &[f32],
    yc: &mut [f32],
    b: &mut Buffers,
) {
    let Buffers { pad, acc, .. } = b;
    let src = padded(p, l, xc, pad);
    let [kh, kw] = p.kernel;
    // Full-width rows land in the output directly when there is nothing to drop.
    let direct = l.wp == l.ow;
    for (m, out) in yc.chunks_exact_mut(p.out_plane()).enumerate() {
        let wo = &wc[m * kh * kw..(m + 1) * kh * kw];
        if !direct {
            acc.clear();
            acc.resize(l.len, 0.0);
        }
        for ki in 0..kh {
            for kj in 0..kw {
                let s = l.shift(p, ki, kj);
                let target = if direct {
                    &mut out[..l.len]
                } else {
                    &mut acc[..]
                };
                axpy_body::<FMA>(target, &src[s..s + l.len], wo[ki * kw + kj]);
            }
        }
        if !direct {
            for (i, row) in out.chunks_exact_mut(l.ow).enumerate() {
                for (o, &v) in row.iter_mut().zip(&acc[i * l.wp..i * l.wp + l.ow]) {
                    *o += v;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_channel_fma(
    p: &Conv2dProblem,
    l: &Layout,
    wc: &[f32],
    xc: &[f32],
    yc: &mut [f32],
    b: &mut Buffers,
) {
    forward_channel::<true>(p, l, wc, xc, yc, b)
}

/// One image's backward: `dx` (this image's) and `dw` (the batch's) accumulate. `threads`:
/// whether to spread the channels over the pool (their slices of `dx` and `dw` are disjoint).
pub(super) fn backward_image(
    p: &Conv2dProblem,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    threads: Threads,
) {
    let l = Layout::of(p);
    let (in_plane, out_plane) = (p.in_plane(), p.out_plane());
    let og = p.out_per_group();
    let per_channel = og * p.kernel[0] * p.kernel[1];
    fn slices(d: Option<&mut [f32]>, len: usize, n: usize) -> Vec<Option<&mut [f32]>> {
        match d {
            Some(d) => d.chunks_mut(len).map(Some).collect(),
            None => (0..n).map(|_| None).collect(),
        }
    }
    let n = p.in_channels;
    let tasks: Vec<Grad> = slices(dx, in_plane, n)
        .into_iter()
        .zip(slices(dw, per_channel, n))
        .enumerate()
        .map(|(c, (dxc, dwc))| Grad {
            xc: &x[c * in_plane..(c + 1) * in_plane],
            wc: &w[c * per_channel..(c + 1) * per_channel],
            dyc: &dy[c * og * out_plane..(c + 1) * og * out_plane],
            dxc,
            dwc,
        })
        .collect();
    let one = |g: Grad| {
        with_buffers(|b| {
            #[cfg(target_arch = "x86_64")]
            if fma_available() {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { backward_channel_fma(p, &l, g, b) };
            }
            backward_channel::<false>(p, &l, g, b)
        })
    };
    match threads {
        Threads::All => tasks.into_par_iter().for_each(one),
        Threads::One => tasks.into_iter().for_each(one),
    }
}

/// One input channel's part of a backward pass.
struct Grad<'a> {
    xc: &'a [f32],
    wc: &'a [f32],
    dyc: &'a [f32],
    dxc: Option<&'a mut [f32]>,
    dwc: Option<&'a mut [f32]>,
}

#[inline(always)]
fn backward_channel<const FMA: bool>(p: &Conv2dProblem, l: &Layout, g: Grad, b: &mut Buffers) {
    let Grad {
        xc,
        wc,
        dyc,
        dxc,
        mut dwc,
    } = g;
    let Buffers { pad, acc, grad } = b;
    let [h, wd] = p.in_hw;
    let [kh, kw] = p.kernel;
    // The input is read only for the weight gradient.
    let src = if dwc.is_some() {
        padded(p, l, xc, pad)
    } else {
        &[][..]
    };
    // The input gradient of the padded plane, cropped into dx at the end.
    if dxc.is_some() {
        acc.clear();
        acc.resize(l.hp * l.wp, 0.0);
    }
    for (m, g_plane) in dyc.chunks_exact(p.out_plane()).enumerate() {
        // dy at width wp, the dropped columns zero.
        let gw: &[f32] = if l.wp == l.ow {
            &g_plane[..l.len]
        } else {
            grad.clear();
            grad.resize(l.len, 0.0);
            for (i, row) in g_plane.chunks_exact(l.ow).enumerate() {
                grad[i * l.wp..i * l.wp + l.ow].copy_from_slice(row);
            }
            grad
        };
        for ki in 0..kh {
            for kj in 0..kw {
                let s = l.shift(p, ki, kj);
                let t = m * kh * kw + ki * kw + kj;
                if let Some(dw) = dwc.as_deref_mut() {
                    dw[t] += dot_body::<FMA>(gw, &src[s..s + l.len]);
                }
                if dxc.is_some() {
                    axpy_body::<FMA>(&mut acc[s..s + l.len], gw, wc[t]);
                }
            }
        }
    }
    if let Some(dx) = dxc {
        for r in 0..h {
            let at = (r + p.pad_begin[0]) * l.wp + p.pad_begin[1];
            for (o, &v) in dx[r * wd..(r + 1) * wd].iter_mut().zip(&acc[at..at + wd]) {
                *o += v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_channel_fma(p: &Conv2dProblem, l: &Layout, g: Grad, b: &mut Buffers) {
    backward_channel::<true>(p, l, g, b)
}

#[cfg(target_arch = "x86_64")]
fn fma_available() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `FMA`: fused multiply-adds (only where the CPU has them: elsewhere `mul_add` is a library
/// call).
#[inline(always)]
fn axpy_body<const FMA: bool>(y: &mut [f32], x: &[f32], a: f32) {
    assert_eq!(y.len(), x.len());
    for (o, &v) in y.iter_mut().zip(x) {
        *o = if FMA { v.mul_add(a, *o) } else { *o + a * v };
    }
}

#[inline(always)]
fn dot_body<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] = if FMA {
                x[k].mul_add(y[k], lanes[k])
            } else {
                lanes[k] + x[k] * y[k]
            };
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    lanes.iter().sum::<f32>() + tail
}
