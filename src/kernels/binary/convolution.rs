//! The XNOR-popcount convolution over ±1 values with zero padding.
//!
//! The input is packed channels last (`[N, H, W, words_for(C)]`). Each image's windows are
//! gathered into rows of `kh · kw · C` bits, tap after tap with no gap between taps (packing
//! along channels × taps: a 3x3 window of 16 channels is 3 words, not 9), each row padded
//! with 0 bits to whole aligned vectors; the filters are packed the same way. Every window row
//! then meets every filter in register tiles of 2 windows × 4 filters, so each loaded word
//! serves several counts.
//!
//! A tap in the zero padding at the image border (which is neither +1 nor −1) is gathered as
//! 0 bits, that is −1, and so counted `−Σ_c w[o, c, tap]` where it should add 0: [`Border`]
//! adds that back, from each filter's count of +1 weights at each tap (kept with the packed
//! filters) and each output position's list of taps outside the image (empty for most).

#[cfg(target_arch = "x86_64")]
use super::{Avx2Count, Avx512Count, avx2};
use super::{CountOnes, Path, WORD, XorCount, sign_of, words_for};
use crate::kernels::conv::Conv2dProblem;
use rayon::prelude::*;

/// Words in one AVX2 vector; window and filter rows are whole vectors.
const VECTOR: usize = 4;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, align(32))]
struct Vector([u64; VECTOR]);

/// Words in whole vectors, aligned to 32 bytes so that no vector load splits a cache line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct VectorWords(Vec<Vector>);

impl VectorWords {
    fn zeroed(words: usize) -> VectorWords {
        VectorWords(vec![Vector::default(); words.div_ceil(VECTOR)])
    }

    fn words(&self) -> &[u64] {
        // SAFETY: `Vector` is `repr(C)` over `[u64; 4]` and 32 bytes, so it has no padding and
        // the vectors are `4 · len` consecutive initialized words.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * VECTOR) }
    }

    fn words_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `words`, and the borrow is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * VECTOR) }
    }
}

/// Words of one window or filter row: `taps · channels` bits, in whole vectors.
fn row_words(taps: usize, channels: usize) -> usize {
    words_for(taps * channels).next_multiple_of(VECTOR)
}

/// ORs the bits of `src`, whose bits past the ones it holds are 0, into `dst` from bit `at`.
#[inline(always)]
fn put_bits(dst: &mut [u64], at: usize, src: &[u64]) {
    let (first, shift) = (at / WORD, at % WORD);
    for (i, &v) in src.iter().enumerate() {
        dst[first + i] |= v << shift;
        // The high part is nonzero only where the row has bits left to hold it.
        if shift > 0 && v >> (WORD - shift) != 0 {
            dst[first + i + 1] |= v >> (WORD - shift);
        }
    }
}

/// A batch of images `[N, C, H, W]` binarized by sign and packed channels last:
/// `[N, H, W, words_for(C)]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedImages {
    pub batch: usize,
    pub channels: usize,
    pub hw: [usize; 2],
    data: Vec<u64>,
}

impl PackedImages {
    /// Binarizes and packs `x` (`[batch, channels, h, w]`): +1 for `v >= 0`, on the fastest
    /// path this CPU runs.
    pub fn pack(x: &[f32], batch: usize, channels: usize, hw: [usize; 2]) -> PackedImages {
        PackedImages::pack_on(Path::best(), x, batch, channels, hw)
    }

    /// As [`PackedImages::pack`], on `path`'s code: AVX2 comparisons for [`Path::Avx2`] and
    /// [`Path::Avx512`], plain loops for the others.
    pub fn pack_on(
        path: Path,
        x: &[f32],
        batch: usize,
        channels: usize,
        hw: [usize; 2],
    ) -> PackedImages {
        path.check();
        let plane = hw[0] * hw[1];
        assert_eq!(
            x.len(),
            batch * channels * plane,
            "binary pack: not [N, C, H, W]"
        );
        let words = words_for(channels);
        let mut data = vec![0u64; batch * plane * words];
        if plane > 0 && words > 0 {
            data.par_chunks_mut(plane * words)
                .zip(x.par_chunks(channels * plane))
                .for_each(|(out, image)| match path {
                    // SAFETY: the path runs here (checked above).
                    #[cfg(target_arch = "x86_64")]
                    Path::Avx2 | Path::Avx512 => unsafe {
                        avx2::pack_image(image, channels, plane, out)
                    },
                    _ => pack_image(image, channels, plane, out),
                });
        }
        PackedImages {
            batch,
            channels,
            hw,
            data,
        }
    }

    /// Words per pixel.
    pub fn words(&self) -> usize {
        words_for(self.channels)
    }

    pub fn data(&self) -> &[u64] {
        &self.data
    }
}

/// One image `[C, plane]` into `out` (`[plane, words]`, zeroed): the plain loops.
fn pack_image(image: &[f32], channels: usize, plane: usize, out: &mut [u64]) {
    let words = words_for(channels);
    for c in 0..channels {
        let (word, bit) = (c / WORD, c % WORD);
        for (p, &v) in image[c * plane..(c + 1) * plane].iter().enumerate() {
            out[p * words + word] |= ((v >= 0.0) as u64) << bit;
        }
    }
}

/// Convolution filters `[out, C, kh, kw]` binarized by sign, each packed as a window row:
/// bit `tap · C + c` for tap `ky · kw + kx`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedFilters {
    pub out: usize,
    pub channels: usize,
    pub kernel: [usize; 2],
    /// Words per filter, whole vectors.
    row: usize,
    data: VectorWords,
    /// `[out, taps]`: each filter's +1 weights at each tap, for the border correction.
    ones: Vec<i32>,
}

impl PackedFilters {
    pub fn pack(w: &[f32], out: usize, channels: usize, kernel: [usize; 2]) -> PackedFilters {
        let taps = kernel[0] * kernel[1];
        assert_eq!(
            w.len(),
            out * channels * taps,
            "binary pack: not [out, C, kh, kw]"
        );
        let row = row_words(taps, channels);
        let mut data = VectorWords::zeroed(out * row);
        let words = data.words_mut();
        let mut ones = vec![0i32; out * taps];
        for o in 0..out {
            for c in 0..channels {
                for t in 0..taps {
                    if w[(o * channels + c) * taps + t] >= 0.0 {
                        let bit = t * channels + c;
                        words[o * row + bit / WORD] |= 1 << (bit % WORD);
                        ones[o * taps + t] += 1;
                    }
                }
            }
        }
        PackedFilters {
            out,
            channels,
            kernel,
            row,
            data,
            ones,
        }
    }

    /// Bytes of the packed filters, rows padded to whole vectors.
    pub fn bytes(&self) -> usize {
        self.data.words().len() * 8
    }

    fn row(&self, o: usize) -> &[u64] {
        &self.data.words()[o * self.row..(o + 1) * self.row]
    }
}

/// Checks that `p` is a convolution these kernels run (one group, no dilation) on `x` and `w`.
pub fn check_conv(p: &Conv2dProblem, x: &PackedImages, w: &PackedFilters) -> Result<(), String> {
    p.validate()?;
    if p.groups != 1 || p.dilation != [1, 1] {
        return Err(format!(
            "binary convolution: groups {} and dilation {:?} are not supported (1 and [1, 1])",
            p.groups, p.dilation
        ));
    }
    if x.batch != p.batch || x.channels != p.in_channels || x.hw != p.in_hw {
        return Err("binary convolution: the packed input does not fit the problem".into());
    }
    if w.out != p.out_channels || w.channels != p.in_channels || w.kernel != p.kernel {
        return Err("binary convolution: the packed filters do not fit the problem".into());
    }
    Ok(())
}

/// Panics unless [`check_conv`] passes and `y_len` is the output's length.
fn check_call(p: &Conv2dProblem, x: &PackedImages, w: &PackedFilters, y_len: usize) {
    if let Err(e) = check_conv(p, x, w) {
        panic!("{e}");
    }
    assert_eq!(
        y_len,
        p.y_len(),
        "binary convolution: y is not [N, out, OH, OW]"
    );
}

/// Output positions and filters of one register tile.
const TILE_ROWS: usize = 2;
const TILE_FILTERS: usize = 4;

/// `y = conv2d(x, w)` over ±1 values with zero padding, `[N, out, OH, OW]` as i32.
///
/// Images are spread over the threads, or, for fewer images than threads, blocks of 4
/// filters.
pub fn conv(path: Path, p: &Conv2dProblem, x: &PackedImages, w: &PackedFilters, y: &mut [i32]) {
    if path == Path::Reference {
        check_call(p, x, w, y.len());
        return conv_reference(p, x, w, y);
    }
    conv_with(path, p, x, w, y, |_, sum| sum)
}

/// A binary layer's output: [`conv`]'s sums times each filter's scale (BWN's and XNOR-Net's
/// α = mean |w|), plus its bias, written as they are computed.
pub fn conv_scaled(
    path: Path,
    p: &Conv2dProblem,
    x: &PackedImages,
    w: &PackedFilters,
    scale: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    assert_eq!(
        scale.len(),
        p.out_channels,
        "binary convolution: one scale a filter"
    );
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            p.out_channels,
            "binary convolution: one bias a filter"
        );
    }
    let write = |o: usize, sum: i32| scale[o] * sum as f32 + bias.map_or(0.0, |b| b[o]);
    if path == Path::Reference {
        let mut sums = vec![0i32; y.len()];
        conv(path, p, x, w, &mut sums);
        let plane = p.out_plane().max(1);
        for (i, (out, s)) in y.iter_mut().zip(sums).enumerate() {
            *out = write((i / plane) % p.out_channels, s);
        }
        return;
    }
    conv_with(path, p, x, w, y, write)
}

/// [`conv`] on a counting path, each output written as `write(filter, sum)`.
fn conv_with<T: Send + Copy>(
    path: Path,
    p: &Conv2dProblem,
    x: &PackedImages,
    w: &PackedFilters,
    y: &mut [T],
    write: impl Fn(usize, i32) -> T + Sync,
) {
    check_call(p, x, w, y.len());
    path.check();
    let plane = p.out_plane();
    if plane == 0 || p.out_channels == 0 {
        return;
    }
    let row = w.row;
    let border = Border::new(p, w);
    // Windows padded to whole tiles with rows of zeros, whose sums are dropped.
    let rows = plane.next_multiple_of(TILE_ROWS);
    let image_len = p.out_channels * plane;
    let block = |windows: &[u64], first: usize, out: &mut [T], sums: &mut Vec<u32>| {
        let filters = (p.out_channels - first).min(TILE_FILTERS);
        sums.clear();
        sums.resize(rows * TILE_FILTERS, 0);
        let b = std::array::from_fn(|f| w.row(first + f.min(filters - 1)));
        match path {
            // SAFETY (both): the path runs here (checked above).
            #[cfg(target_arch = "x86_64")]
            Path::Popcnt => unsafe { tiles_popcnt(windows, row, b, sums) },
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => unsafe { tiles_avx2(windows, row, b, sums) },
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => unsafe { tiles_avx512(windows, row, b, sums) },
            _ => tiles::<CountOnes>(windows, row, b, sums),
        }
        let valid = &border.valid[..plane];
        for (f, (out, sums)) in out
            .chunks_exact_mut(plane)
            .zip(sums.chunks_exact(rows))
            .enumerate()
        {
            let o = first + f;
            for ((y, &d), &v) in out.iter_mut().zip(sums).zip(valid) {
                *y = write(o, v - 2 * d as i32);
            }
            // Positions whose windows reach into the padding, written again with their
            // correction.
            for (&pos, &extra) in border.edges.iter().zip(border.corrections(o)) {
                out[pos] = write(o, valid[pos] - 2 * sums[pos] as i32 + extra);
            }
        }
    };
    if p.batch >= rayon::current_num_threads() {
        // One task an image: windows gathered and every filter block run on one thread.
        y.par_chunks_mut(image_len).enumerate().for_each_init(
            || (VectorWords::zeroed(rows * row), Vec::new()),
            |(windows, sums), (n, out)| {
                gather_windows(p, x, n, row, &mut windows.words_mut()[..plane * row]);
                for (i, out) in out.chunks_mut(TILE_FILTERS * plane).enumerate() {
                    block(windows.words(), i * TILE_FILTERS, out, sums);
                }
            },
        );
    } else {
        // Few images: each image's filter blocks spread over the threads.
        let mut windows = VectorWords::zeroed(rows * row);
        for (n, out) in y.chunks_mut(image_len).enumerate() {
            gather_windows(p, x, n, row, &mut windows.words_mut()[..plane * row]);
            let windows = windows.words();
            out.par_chunks_mut(TILE_FILTERS * plane)
                .enumerate()
                .for_each_init(Vec::new, |sums, (i, out)| {
                    block(windows, i * TILE_FILTERS, out, sums)
                });
        }
    }
}

/// The output positions whose windows reach into the zero padding, and what each filter
/// adds back there.
struct Border {
    /// Per position: the taps inside the image times the channels.
    valid: Vec<i32>,
    /// The positions with taps in the padding (the rest have none).
    edges: Vec<usize>,
    /// `[out, edges]`: twice the filter's +1 weights at the edge's taps in the padding (there
    /// a −1 was gathered, which differs from each +1 weight, where the zero padding adds
    /// nothing).
    corrections: Vec<i32>,
}

impl Border {
    fn new(p: &Conv2dProblem, w: &PackedFilters) -> Border {
        let [h, wd] = p.in_hw;
        let [kh, kw] = p.kernel;
        let taps = kh * kw;
        let [_, ow] = p.out_hw();
        let plane = p.out_plane();
        let mut valid = Vec::with_capacity(plane);
        let mut edges = Vec::new();
        // Each edge's taps in the padding, `outside[starts[k]..starts[k + 1]]`.
        let (mut starts, mut outside) = (vec![0], Vec::new());
        for pos in 0..plane {
            let (top, left) = window_origin(p, ow, pos);
            let before = outside.len();
            outside.extend((0..taps).filter(|t| {
                let (iy, ix) = (top + (t / kw) as isize, left + (t % kw) as isize);
                iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize
            }));
            valid.push(((taps - (outside.len() - before)) * p.in_channels) as i32);
            if outside.len() > before {
                edges.push(pos);
                starts.push(outside.len());
            }
        }
        let mut corrections = Vec::with_capacity(p.out_channels * edges.len());
        for ones in w.ones.chunks_exact(taps.max(1)).take(p.out_channels) {
            corrections.extend(
                starts
                    .windows(2)
                    .map(|k| 2 * outside[k[0]..k[1]].iter().map(|&t| ones[t]).sum::<i32>()),
            );
        }
        Border {
            valid,
            edges,
            corrections,
        }
    }

    fn corrections(&self, o: usize) -> &[i32] {
        &self.corrections[o * self.edges.len()..(o + 1) * self.edges.len()]
    }
}

/// The input pixel at the top left of output position `pos`'s window (may be outside).
fn window_origin(p: &Conv2dProblem, ow: usize, pos: usize) -> (isize, isize) {
    (
        ((pos / ow) * p.stride[0]) as isize - p.pad_begin[0] as isize,
        ((pos % ow) * p.stride[1]) as isize - p.pad_begin[1] as isize,
    )
}

/// Image `n`'s windows as rows of `row` words (taps × channels bits, then 0 bits), row-major
/// over output positions.
fn gather_windows(p: &Conv2dProblem, x: &PackedImages, n: usize, row: usize, out: &mut [u64]) {
    let words = x.words();
    let c = p.in_channels;
    let [h, wd] = p.in_hw;
    let [kh, kw] = p.kernel;
    let [_, ow] = p.out_hw();
    let image = &x.data[n * h * wd * words..(n + 1) * h * wd * words];
    out.fill(0);
    for (pos, window) in out.chunks_exact_mut(row).enumerate() {
        let (top, left) = window_origin(p, ow, pos);
        for ky in 0..kh {
            let iy = top + ky as isize;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            for kx in 0..kw {
                let ix = left + kx as isize;
                if ix < 0 || ix >= wd as isize {
                    continue;
                }
                let at = (iy as usize * wd + ix as usize) * words;
                put_bits(window, (ky * kw + kx) * c, &image[at..at + words]);
            }
        }
    }
}

/// Every window (rows of `row` words, a whole number of tiles) against the 4 filters `b`:
/// `sums[f · windows + pos] = popcount(window ⊕ filter)`.
#[inline(always)]
fn tiles<C: XorCount>(windows: &[u64], row: usize, b: [&[u64]; 4], sums: &mut [u32]) {
    let rows = windows.len() / row;
    for (i, pair) in windows.chunks_exact(TILE_ROWS * row).enumerate() {
        let counts = C::tile([&pair[..row], &pair[row..]], b);
        for f in 0..TILE_FILTERS {
            sums[f * rows + 2 * i] = counts[0][f];
            sums[f * rows + 2 * i + 1] = counts[1][f];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn tiles_popcnt(windows: &[u64], row: usize, b: [&[u64]; 4], sums: &mut [u32]) {
    tiles::<CountOnes>(windows, row, b, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
unsafe fn tiles_avx2(windows: &[u64], row: usize, b: [&[u64]; 4], sums: &mut [u32]) {
    tiles::<Avx2Count>(windows, row, b, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vpopcntdq,avx2,popcnt")]
unsafe fn tiles_avx512(windows: &[u64], row: usize, b: [&[u64]; 4], sums: &mut [u32]) {
    tiles::<Avx512Count>(windows, row, b, sums)
}

/// Plain loops over unpacked ±1 values, zero outside the image.
fn conv_reference(p: &Conv2dProblem, x: &PackedImages, w: &PackedFilters, y: &mut [i32]) {
    let words = x.words();
    let [h, wd] = p.in_hw;
    let [kh, kw] = p.kernel;
    let [oh, ow] = p.out_hw();
    for n in 0..p.batch {
        for o in 0..p.out_channels {
            for r in 0..oh {
                for c in 0..ow {
                    let mut sum = 0i32;
                    for ch in 0..p.in_channels {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (r * p.stride[0] + ky) as isize - p.pad_begin[0] as isize;
                                let ix = (c * p.stride[1] + kx) as isize - p.pad_begin[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let pixel = (n * h + iy as usize) * wd + ix as usize;
                                let a = sign_of(&x.data[pixel * words..], ch);
                                let tap = ky * kw + kx;
                                let b = sign_of(w.row(o), tap * p.in_channels + ch);
                                sum += (a * b) as i32;
                            }
                        }
                    }
                    y[((n * p.out_channels + o) * oh + r) * ow + c] = sum;
                }
            }
        }
    }
}
