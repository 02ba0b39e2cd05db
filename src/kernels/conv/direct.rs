//! Direct convolution forward: no column matrix and no GEMM call. A register block of
//! 2 × 8 output pixels × 6 output channels stays in twelve AVX2 registers over the whole
//! reduction (input channels × kernel taps), then gets its bias and ReLU and is stored once.
//!
//! This is the loop structure of oneDNN's JIT direct convolutions (Georganas et al. 2018,
//! "Anatomy of high-performance deep learning convolutions on SIMD architectures"), written
//! with `std::arch` intrinsics instead of a JIT: each reduction step loads two 8-pixel input
//! vectors, broadcasts six weights and issues twelve FMAs (the shape of the `gemm` crate's
//! 16x6 micro-kernel; a 24x4 block needs all sixteen registers and spills). The shifted-GEMM path it replaces
//! for the forward pass re-read and re-wrote the output once per kernel tap with a reduction
//! depth of only `in/groups`, which is what kept ResNet-20's convolutions at about half of
//! oneDNN's speed.
//!
//! Strides are handled by splitting the padded input into `stride_h × stride_w` phase planes
//! (space-to-depth): output pixel `(r, c)` and tap `(i, j)` read phase `(i·d % s, j·d % s)` at
//! `(r + i·d / s, c + j·d / s)`, so 8 consecutive output pixels always read 8 consecutive
//! floats, and one table of per-step offsets (`Plan::steps`) covers every stride, dilation and
//! padding.

use super::{Conv2dProblem, per_image_tasks};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Floats in one AVX2 register: the output pixels of a segment.
const LANES: usize = 8;
/// Output channels in a full register block; the last block of a group may have 4 or 2.
const NR: usize = 6;
/// Output segments in a full register block.
const SEGS: usize = 2;

/// Whether this CPU can run the kernel (checked once per call; the detection is cached by std).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Every convolution with a window of two or more taps but depthwise ones (a 2-channel block
/// would be half empty at best). 1x1 convolutions keep GEMM: unstrided, it reads the image in
/// place; strided, it gathers only the pixels it uses, where this kernel would first copy all
/// of them into phase planes.
pub(super) fn applies(p: &Conv2dProblem) -> bool {
    p.kernel[0] * p.kernel[1] > 1 && !p.is_depthwise() && available()
}

/// Eight consecutive output pixels of one output row.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Offset in a prepared input channel of the segment's first pixel at tap (0, 0).
    input: usize,
    /// Offset in an output plane.
    output: usize,
    /// Pixels that exist (8 except at the end of a row whose width is not a multiple of 8).
    valid: usize,
}

/// What one problem needs, computed once per call.
struct Plan {
    /// Floats of one prepared (padded, phase-split) input channel.
    channel: usize,
    /// Floats of one prepared image group, with slack for the last segment's spare lanes.
    prepared: usize,
    /// Per reduction step `k = c·kh·kw + i·kw + j` (the weights' order): where tap `(i, j)` of
    /// input channel `c` starts in the prepared group.
    steps: Vec<usize>,
    segments: Vec<Segment>,
    /// Row width of a phase plane.
    wq: usize,
    hq: usize,
}

impl Plan {
    fn new(p: &Conv2dProblem) -> Plan {
        let [s0, s1] = p.stride;
        let [d0, d1] = p.dilation;
        let hp = p.in_hw[0] + p.pad_begin[0] + p.pad_end[0];
        let wp = p.in_hw[1] + p.pad_begin[1] + p.pad_end[1];
        let (hq, wq) = (hp.div_ceil(s0), wp.div_ceil(s1));
        let phase = hq * wq;
        let channel = s0 * s1 * phase;
        let [kh, kw] = p.kernel;
        let mut steps = Vec::with_capacity(p.patch_len());
        for c in 0..p.in_per_group() {
            for i in 0..kh {
                for j in 0..kw {
                    let (a, b) = (i * d0, j * d1);
                    let ph = (a % s0) * s1 + b % s1;
                    steps.push(c * channel + ph * phase + (a / s0) * wq + b / s1);
                }
            }
        }
        let [oh, ow] = p.out_hw();
        let segments = (0..oh)
            .flat_map(|r| {
                (0..ow).step_by(LANES).map(move |c| Segment {
                    input: r * wq + c,
                    output: r * ow + c,
                    valid: (ow - c).min(LANES),
                })
            })
            .collect();
        Plan {
            channel,
            prepared: p.in_per_group() * channel + LANES,
            steps,
            segments,
            wq,
            hq,
        }
    }
}

/// Pads group `g` of one image and splits it into phase planes:
/// `dst[c][phase (a, b)][rq][cq] = padded[c][rq·s0 + a][cq·s1 + b]`.
fn prepare(p: &Conv2dProblem, plan: &Plan, x_img: &[f32], g: usize, dst: &mut [f32]) {
    let [s0, s1] = p.stride;
    let [h, w] = p.in_hw;
    let [top, left] = p.pad_begin;
    let (ig, plane) = (p.in_per_group(), h * w);
    let phase = plan.hq * plan.wq;
    if p.stride == [1, 1] {
        // One phase plane: the padded image, written once (borders zeroed, interior copied).
        let wq = plan.wq;
        for (c, chan) in dst.chunks_exact_mut(plan.channel).take(ig).enumerate() {
            let src = &x_img[(g * ig + c) * plane..][..plane];
            chan[..top * wq].fill(0.0);
            chan[(top + h) * wq..].fill(0.0);
            for (line, row) in src
                .chunks_exact(w)
                .zip(chan[top * wq..].chunks_exact_mut(wq))
            {
                row[..left].fill(0.0);
                row[left..left + w].copy_from_slice(line);
                row[left + w..].fill(0.0);
            }
        }
        return;
    }
    // Where each input row starts in its phase plane, and for each phase column the first input
    // column it takes (every s1-th from there) and where that lands: computed once per call,
    // since the divisions cost more than the copies they place.
    let rows: Vec<usize> = (0..h)
        .map(|r| {
            let rp = r + top;
            (rp % s0) * s1 * phase + (rp / s0) * plan.wq
        })
        .collect();
    let cols: Vec<(usize, usize)> = (0..s1)
        .map(|b| ((b + s1 - left % s1) % s1, b))
        .filter(|&(first, _)| first < w)
        .map(|(first, b)| (first, b * phase + (first + left) / s1))
        .collect();
    dst.fill(0.0);
    for c in 0..ig {
        let src = &x_img[(g * ig + c) * plane..][..plane];
        let chan = &mut dst[c * plan.channel..][..plan.channel];
        for (line, &row_base) in src.chunks_exact(w).zip(&rows) {
            for &(first, at) in &cols {
                // `chunks` rather than `step_by`, which compiles to a much slower loop here.
                for (d, run) in chan[row_base + at..]
                    .iter_mut()
                    .zip(line[first..].chunks(s1))
                {
                    *d = run[0];
                }
            }
        }
    }
}

/// Register-block width for `n` output channels (at most `NR`): 2, 4 or 6, the missing
/// channels computed from zero weights and not stored.
fn block_width(n: usize) -> usize {
    n.div_ceil(2) * 2
}

/// The group's weights as `[tile][k][width]`: tile `t` holds output channels `NR·t..` and all
/// tiles but the last are `NR` wide.
fn pack(p: &Conv2dProblem, w: &[f32], g: usize) -> Vec<f32> {
    let (k, og) = (p.patch_len(), p.out_per_group());
    let mut packed = vec![0f32; (og / NR) * NR * k + block_width(og % NR) * k];
    for o in 0..og {
        let row = &w[(g * og + o) * k..][..k];
        let width = block_width((og - o / NR * NR).min(NR));
        let tile = &mut packed[(o / NR) * NR * k..][..k * width];
        for (step, &v) in row.iter().enumerate() {
            tile[step * width + o % NR] = v;
        }
    }
    packed
}

/// `y = conv2d(x, w) + bias`, then `max(0, ·)` when `relu`. Every element of `y` is written
/// (each output plane is the union of its segments), so `y` may start uninitialised: the
/// callers that allocate the output skip zeroing it, a pass over as many bytes as the
/// convolution writes.
pub(super) fn forward(
    p: &Conv2dProblem,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    y: &mut [MaybeUninit<f32>],
) {
    // The micro-kernels' soundness rests on this, not on the callers having asked `applies`.
    assert!(available(), "direct conv: this CPU lacks AVX2/FMA");
    let plan = Plan::new(p);
    let packed: Vec<Vec<f32>> = (0..p.groups).map(|g| pack(p, w, g)).collect();
    let x_img = p.in_channels * p.in_plane();
    let y_img = p.out_channels * p.out_plane();
    let run = |x: &[f32], y: &mut [MaybeUninit<f32>], parallel_tiles: bool| {
        super::with_scratch(plan.prepared, |buf| {
            for (g, packed) in packed.iter().enumerate() {
                prepare(p, &plan, x, g, &mut buf[..plan.prepared - LANES]);
                buf[plan.prepared - LANES..].fill(0.0);
                group(p, &plan, buf, packed, bias, relu, g, y, parallel_tiles);
            }
        })
    };
    if per_image_tasks(p.batch) {
        x.par_chunks(x_img)
            .zip(y.par_chunks_mut(y_img))
            .for_each(|(x, y)| run(x, y, false));
    } else {
        for (x, y) in x.chunks(x_img).zip(y.chunks_mut(y_img)) {
            run(x, y, true);
        }
    }
}

/// One group of one image: every tile of up to `NR` output channels over every segment.
#[allow(clippy::too_many_arguments)]
fn group(
    p: &Conv2dProblem,
    plan: &Plan,
    xp: &[f32],
    packed: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    g: usize,
    y_img: &mut [MaybeUninit<f32>],
    parallel_tiles: bool,
) {
    let (og, plane, k) = (p.out_per_group(), p.out_plane(), p.patch_len());
    // Every load stays inside `xp`: the farthest is the last segment's spare lanes at the
    // farthest step, which the `LANES` floats of slack cover.
    let far = plan.segments.iter().map(|s| s.input).max().unwrap_or(0)
        + plan.steps.iter().copied().max().unwrap_or(0)
        + LANES;
    assert!(far <= xp.len(), "direct conv: prepared input too short");
    let y_group = &mut y_img[g * og * plane..(g + 1) * og * plane];
    let tile = |t: usize, y_tile: &mut [MaybeUninit<f32>]| {
        let n_oc = y_tile.len() / plane;
        let mut b = [0f32; NR];
        if let Some(bias) = bias {
            b[..n_oc].copy_from_slice(&bias[g * og + t * NR..][..n_oc]);
        }
        let w = &packed[t * k * NR..][..k * block_width(n_oc)];
        let out = Out {
            y: y_tile,
            plane,
            n_oc,
            relu,
        };
        run_tile(xp, &plan.steps, &plan.segments, w, b, out);
    };
    if parallel_tiles {
        y_group
            .par_chunks_mut(NR * plane)
            .enumerate()
            .for_each(|(t, y)| tile(t, y));
    } else {
        for (t, y) in y_group.chunks_mut(NR * plane).enumerate() {
            tile(t, y);
        }
    }
}

/// Where a tile's results go: `n_oc` output planes of `plane` floats each.
struct Out<'a> {
    y: &'a mut [MaybeUninit<f32>],
    plane: usize,
    n_oc: usize,
    relu: bool,
}

/// Every segment of one tile, `SEGS` at a time, through the block of the tile's width.
fn run_tile(xp: &[f32], steps: &[usize], segs: &[Segment], w: &[f32], b: [f32; NR], mut out: Out) {
    assert_eq!(w.len(), steps.len() * block_width(out.n_oc));
    let kernel = |block: &[Segment], out: &mut Out| {
        // SAFETY: `forward` asserted AVX2 and FMA, `group` checked every load against `xp`,
        // `w` holds `steps.len()` rows of the block's width (asserted above), and stores are
        // bounds-checked slices of `out.y`.
        unsafe {
            match (block.len(), block_width(out.n_oc)) {
                (2, 6) => block_avx2::<2, 6>(xp, steps, block, w, b, out),
                (2, 4) => block_avx2::<2, 4>(xp, steps, block, w, b, out),
                (2, 2) => block_avx2::<2, 2>(xp, steps, block, w, b, out),
                (1, 6) => block_avx2::<1, 6>(xp, steps, block, w, b, out),
                (1, 4) => block_avx2::<1, 4>(xp, steps, block, w, b, out),
                (1, 2) => block_avx2::<1, 2>(xp, steps, block, w, b, out),
                other => unreachable!("no register block for {other:?}"),
            }
        }
    };
    for block in segs.chunks(SEGS) {
        kernel(block, &mut out);
    }
}

impl Out<'_> {
    /// Stores the pixels that exist of one segment of output channel `j`.
    fn store(&mut self, j: usize, seg: &Segment, values: &[f32; LANES]) {
        let dst = &mut self.y[j * self.plane + seg.output..][..seg.valid];
        for (d, &v) in dst.iter_mut().zip(values) {
            d.write(v);
        }
    }
}

/// The register block: `S` segments × `N` output channels, `N` weights per step in `w`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; for every segment and step, `seg.input + step + 8` must be
/// at most `xp.len()`, and `w` must hold `steps.len() * N` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<const S: usize, const N: usize>(
    xp: &[f32],
    steps: &[usize],
    segs: &[Segment],
    w: &[f32],
    b: [f32; NR],
    out: &mut Out,
) {
    use std::arch::x86_64::*;
    debug_assert!(segs.len() == S && w.len() >= steps.len() * N);
    let base: [*const f32; S] = std::array::from_fn(|s| unsafe { xp.as_ptr().add(segs[s].input) });
    let mut acc: [[__m256; S]; N] = std::array::from_fn(|j| [_mm256_set1_ps(b[j]); S]);
    let mut wk = w.as_ptr();
    for &off in steps {
        unsafe {
            let a: [__m256; S] = std::array::from_fn(|s| _mm256_loadu_ps(base[s].add(off)));
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let bj = _mm256_broadcast_ss(&*wk.add(j));
                for (acc_js, &a_s) in acc_j.iter_mut().zip(&a) {
                    *acc_js = _mm256_fmadd_ps(a_s, bj, *acc_js);
                }
            }
            wk = wk.add(N);
        }
    }
    let zero = _mm256_setzero_ps();
    for (j, acc_j) in acc.iter().enumerate().take(out.n_oc) {
        for (seg, &v) in segs.iter().zip(acc_j) {
            let v = if out.relu { _mm256_max_ps(v, zero) } else { v };
            if seg.valid == LANES {
                let dst = &mut out.y[j * out.plane + seg.output..][..LANES];
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr().cast::<f32>(), v) };
            } else {
                let mut tmp = [0f32; LANES];
                unsafe { _mm256_storeu_ps(tmp.as_mut_ptr(), v) };
                out.store(j, seg, &tmp);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_avx2<const S: usize, const N: usize>(
    _: &[f32],
    _: &[usize],
    _: &[Segment],
    _: &[f32],
    _: [f32; NR],
    _: &mut Out,
) {
    unreachable!("the direct kernel is only chosen where AVX2 is available")
}
