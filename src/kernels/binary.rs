//! XNOR-popcount kernels for binary layers (issue #13). Values in {−1, +1} are stored one bit
//! each, 1 for +1 and 0 for −1, and a dot product of `k` of them is `k − 2·popcount(a ⊕ b)`:
//! the positions where the signs differ count −1, the others +1 (Rastegari et al. 2016,
//! "XNOR-Net", section 3.2, with ⊕ in place of XNOR, which saves the complement).
//!
//! Words are 64 bits. A row (a GEMM operand's row, or one pixel's channels in a convolution)
//! is padded to whole words with 0 bits in every operand, so padding bits agree and ⊕ leaves
//! them out of the count; the dot product uses the true length. A convolution's input is
//! packed channels last (`[N, H, W, words]`) and its filters as `[out, kh, kw, words]`, so one
//! window row is `kw · words` consecutive words in both. Taps in the zero padding at the image
//! border (which is neither +1 nor −1) are gathered as 0 words, that is −1, and their
//! contribution is taken back out afterwards (`sum_bases`), so they add 0, as zero padding does.
//!
//! The count runs on one of three paths, chosen at run time ([`Path::best`]), each beside the
//! plain [`Path::Reference`] (which multiplies unpacked ±1 values) and held by one conformance
//! suite to the float computation on ±1 values: `count_ones` as compiled for the baseline target (`Portable`), the `popcnt`
//! instruction (`Popcnt`), and AVX2's nibble-table count (`Avx2`: `vpshufb` on the low and
//! high nibbles, summed per 64-bit lane by `vpsadbw`; Muła, Kurz and Lemire 2018, "Faster
//! population counts using AVX2 instructions"). AVX-512's `vpopcntq` is not built: no machine
//! of this project has it, so it could not be tested.

use super::conv::Conv2dProblem;
use rayon::prelude::*;

/// Bits per word.
pub const WORD: usize = 64;

/// Words that hold `len` bits.
pub fn words_for(len: usize) -> usize {
    len.div_ceil(WORD)
}

/// Rows of ±1 values, one bit each, each row padded with 0 bits to whole words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitRows {
    rows: usize,
    len: usize,
    words: usize,
    data: Vec<u64>,
}

impl BitRows {
    /// Packs `rows × len` values (row-major) by sign: +1 for `v >= 0` (BinaryConnect's sign,
    /// which maps 0 to +1), −1 otherwise.
    pub fn pack(values: &[f32], rows: usize, len: usize) -> BitRows {
        assert_eq!(values.len(), rows * len, "binary pack: not [rows, len]");
        let words = words_for(len);
        let mut data = vec![0u64; rows * words];
        for (r, row) in values.chunks(len.max(1)).take(rows).enumerate() {
            pack_signs(row, &mut data[r * words..(r + 1) * words]);
        }
        BitRows {
            rows,
            len,
            words,
            data,
        }
    }

    /// The values as ±1.
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.len);
        for r in 0..self.rows {
            let row = self.row(r);
            out.extend((0..self.len).map(|i| sign_of(row, i)));
        }
        out
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0 || self.len == 0
    }

    /// Words per row.
    pub fn words(&self) -> usize {
        self.words
    }

    pub fn row(&self, r: usize) -> &[u64] {
        &self.data[r * self.words..(r + 1) * self.words]
    }

    /// Every row's words, row after row.
    pub fn data(&self) -> &[u64] {
        &self.data
    }
}

/// Sets bit `i` of `out` for every `values[i] >= 0`; `out` holds `words_for(values.len())`
/// words, and its padding bits are cleared.
pub fn pack_signs(values: &[f32], out: &mut [u64]) {
    for (w, chunk) in out.iter_mut().zip(values.chunks(WORD)) {
        let mut word = 0u64;
        for (b, &v) in chunk.iter().enumerate() {
            word |= ((v >= 0.0) as u64) << b;
        }
        *w = word;
    }
    for w in out.iter_mut().skip(words_for(values.len())) {
        *w = 0;
    }
}

fn sign_of(words: &[u64], i: usize) -> f32 {
    if words[i / WORD] >> (i % WORD) & 1 == 1 {
        1.0
    } else {
        -1.0
    }
}

/// An instruction path for the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Unpacked ±1 values multiplied and summed: what the others must equal.
    Reference,
    /// `u64::count_ones` as compiled for the baseline target.
    Portable,
    /// The `popcnt` instruction.
    Popcnt,
    /// AVX2's nibble-table count, four words at a time.
    Avx2,
}

impl Path {
    pub const ALL: [Path; 4] = [Path::Reference, Path::Portable, Path::Popcnt, Path::Avx2];

    pub fn name(self) -> &'static str {
        match self {
            Path::Reference => "reference",
            Path::Portable => "portable",
            Path::Popcnt => "popcnt",
            Path::Avx2 => "avx2",
        }
    }

    /// Whether this CPU can run the path.
    pub fn runs_here(self) -> bool {
        match self {
            Path::Reference | Path::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Path::Popcnt => std::arch::is_x86_feature_detected!("popcnt"),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("popcnt")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest path this CPU runs.
    pub fn best() -> Path {
        [Path::Avx2, Path::Popcnt, Path::Portable]
            .into_iter()
            .find(|p| p.runs_here())
            .unwrap_or(Path::Portable)
    }

    fn check(self) {
        assert!(
            self.runs_here(),
            "binary kernels: this CPU cannot run the {} path",
            self.name()
        );
    }
}

/// `popcount(a ⊕ b)` over equal runs of words, as one path computes it: one pair, or a tile
/// of 2 rows against 4 (`[row][filter]`), each word loaded once for the tile.
trait XorCount {
    fn count(a: &[u64], b: &[u64]) -> u32;
    fn tile(a: [&[u64]; 2], b: [&[u64]; 4]) -> [[u32; 4]; 2];
}

struct CountOnes;

impl XorCount for CountOnes {
    #[inline(always)]
    fn count(a: &[u64], b: &[u64]) -> u32 {
        a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
    }

    #[inline(always)]
    fn tile(a: [&[u64]; 2], b: [&[u64]; 4]) -> [[u32; 4]; 2] {
        let mut out = [[0u32; 4]; 2];
        for i in 0..a[0].len() {
            let (x0, x1) = (a[0][i], a[1][i]);
            for f in 0..4 {
                let w = b[f][i];
                out[0][f] += (x0 ^ w).count_ones();
                out[1][f] += (x1 ^ w).count_ones();
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2Count;

#[cfg(target_arch = "x86_64")]
impl XorCount for Avx2Count {
    /// Only called inside functions compiled with AVX2 and popcnt enabled.
    #[inline(always)]
    fn count(a: &[u64], b: &[u64]) -> u32 {
        use std::arch::x86_64::*;
        let n = a.len().min(b.len());
        let mut i = 0;
        let mut total = 0u32;
        // SAFETY: the callers are `#[target_feature(enable = "avx2,popcnt")]` functions, run
        // only where `Path::Avx2.runs_here()`; loads are unaligned and within `a[..n]`, `b[..n]`.
        unsafe {
            if n >= 4 {
                let table = _mm256_setr_epi8(
                    0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                    2, 3, 2, 3, 3, 4,
                );
                let low = _mm256_set1_epi8(0x0f);
                let mut sums = _mm256_setzero_si256();
                while i + 4 <= n {
                    let x = _mm256_xor_si256(
                        _mm256_loadu_si256(a.as_ptr().add(i) as *const __m256i),
                        _mm256_loadu_si256(b.as_ptr().add(i) as *const __m256i),
                    );
                    let lo = _mm256_and_si256(x, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
                    let bytes = _mm256_add_epi8(
                        _mm256_shuffle_epi8(table, lo),
                        _mm256_shuffle_epi8(table, hi),
                    );
                    sums = _mm256_add_epi64(sums, _mm256_sad_epu8(bytes, _mm256_setzero_si256()));
                    i += 4;
                }
                let pair = _mm_add_epi64(
                    _mm256_castsi256_si128(sums),
                    _mm256_extracti128_si256(sums, 1),
                );
                total = (_mm_cvtsi128_si64(pair) + _mm_extract_epi64(pair, 1)) as u32;
            }
        }
        total + CountOnes::count(&a[i..n], &b[i..n])
    }

    #[inline(always)]
    fn tile(a: [&[u64]; 2], b: [&[u64]; 4]) -> [[u32; 4]; 2] {
        use std::arch::x86_64::*;
        let n = a[0].len();
        debug_assert!(a[1].len() == n && b.iter().all(|r| r.len() == n));
        let vectors = n / 4;
        let mut out = [[0u32; 4]; 2];
        // SAFETY: as in `count`; every row holds `n` words, loads stay below `4 · vectors`.
        unsafe {
            let table = _mm256_setr_epi8(
                0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3,
                2, 3, 3, 4,
            );
            let low = _mm256_set1_epi8(0x0f);
            let zero = _mm256_setzero_si256();
            let bytes_of = |x: __m256i| {
                let lo = _mm256_and_si256(x, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
                _mm256_add_epi8(
                    _mm256_shuffle_epi8(table, lo),
                    _mm256_shuffle_epi8(table, hi),
                )
            };
            let load =
                |s: &[u64], v: usize| _mm256_loadu_si256(s.as_ptr().add(4 * v) as *const __m256i);
            let mut v = 0;
            // Byte counts grow by at most 8 a vector: 31 vectors fit in a byte.
            while v < vectors {
                let end = (v + 31).min(vectors);
                let mut acc = [[zero; 4]; 2];
                while v < end {
                    let x0 = load(a[0], v);
                    let x1 = load(a[1], v);
                    for f in 0..4 {
                        let w = load(b[f], v);
                        acc[0][f] = _mm256_add_epi8(acc[0][f], bytes_of(_mm256_xor_si256(x0, w)));
                        acc[1][f] = _mm256_add_epi8(acc[1][f], bytes_of(_mm256_xor_si256(x1, w)));
                    }
                    v += 1;
                }
                for r in 0..2 {
                    for f in 0..4 {
                        let s = _mm256_sad_epu8(acc[r][f], zero);
                        let pair = _mm_add_epi64(
                            _mm256_castsi256_si128(s),
                            _mm256_extracti128_si256(s, 1),
                        );
                        out[r][f] += (_mm_cvtsi128_si64(pair) + _mm_extract_epi64(pair, 1)) as u32;
                    }
                }
            }
        }
        let tail = 4 * vectors;
        let rest = CountOnes::tile(
            [&a[0][tail..], &a[1][tail..]],
            [
                &b[0][tail..n],
                &b[1][tail..n],
                &b[2][tail..n],
                &b[3][tail..n],
            ],
        );
        for r in 0..2 {
            for f in 0..4 {
                out[r][f] += rest[r][f];
            }
        }
        out
    }
}

/// `c = a · bᵀ` over ±1 values: `c[i · b.rows() + j] = Σ_k a[i, k] · b[j, k]`, rows of the
/// same length. Rows of `a` are spread over the threads.
pub fn gemm(path: Path, a: &BitRows, b: &BitRows, c: &mut [i32]) {
    assert_eq!(a.len, b.len, "binary gemm: rows of different lengths");
    assert_eq!(
        c.len(),
        a.rows * b.rows,
        "binary gemm: c is not [a rows, b rows]"
    );
    path.check();
    if b.rows == 0 {
        return;
    }
    c.par_chunks_mut(b.rows)
        .enumerate()
        .for_each(|(i, out)| match path {
            Path::Reference => {
                let x = BitRows {
                    rows: 1,
                    data: a.row(i).to_vec(),
                    ..*a
                }
                .unpack();
                for (j, o) in out.iter_mut().enumerate() {
                    let w: Vec<f32> = (0..b.len).map(|k| sign_of(b.row(j), k)).collect();
                    *o = x.iter().zip(&w).map(|(p, q)| (p * q) as i32).sum();
                }
            }
            // SAFETY (both): the path runs here (checked above).
            #[cfg(target_arch = "x86_64")]
            Path::Popcnt => unsafe { gemm_row_popcnt(a.row(i), b, out) },
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => unsafe { gemm_row_avx2(a.row(i), b, out) },
            _ => gemm_row::<CountOnes>(a.row(i), b, out),
        });
}

#[inline(always)]
fn gemm_row<C: XorCount>(x: &[u64], b: &BitRows, out: &mut [i32]) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = b.len as i32 - 2 * C::count(x, b.row(j)) as i32;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn gemm_row_popcnt(x: &[u64], b: &BitRows, out: &mut [i32]) {
    gemm_row::<CountOnes>(x, b, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
unsafe fn gemm_row_avx2(x: &[u64], b: &BitRows, out: &mut [i32]) {
    gemm_row::<Avx2Count>(x, b, out)
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
    /// Binarizes and packs `x` (`[batch, channels, h, w]`): +1 for `v >= 0`.
    pub fn pack(x: &[f32], batch: usize, channels: usize, hw: [usize; 2]) -> PackedImages {
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
                .for_each(|(out, image)| {
                    for c in 0..channels {
                        let (word, bit) = (c / WORD, c % WORD);
                        for (p, &v) in image[c * plane..(c + 1) * plane].iter().enumerate() {
                            out[p * words + word] |= ((v >= 0.0) as u64) << bit;
                        }
                    }
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

/// Convolution filters `[out, C, kh, kw]` binarized by sign and packed `[out, kh, kw, words]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedFilters {
    pub out: usize,
    pub channels: usize,
    pub kernel: [usize; 2],
    data: Vec<u64>,
}

impl PackedFilters {
    pub fn pack(w: &[f32], out: usize, channels: usize, kernel: [usize; 2]) -> PackedFilters {
        let taps = kernel[0] * kernel[1];
        assert_eq!(
            w.len(),
            out * channels * taps,
            "binary pack: not [out, C, kh, kw]"
        );
        let words = words_for(channels);
        let mut data = vec![0u64; out * taps * words];
        for o in 0..out {
            for c in 0..channels {
                for t in 0..taps {
                    let v = w[(o * channels + c) * taps + t];
                    data[(o * taps + t) * words + c / WORD] |= ((v >= 0.0) as u64) << (c % WORD);
                }
            }
        }
        PackedFilters {
            out,
            channels,
            kernel,
            data,
        }
    }

    /// Bytes of the packed filters.
    pub fn bytes(&self) -> usize {
        self.data.len() * 8
    }

    pub fn data(&self) -> &[u64] {
        &self.data
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

/// Output positions and filters of one register tile.
const TILE_ROWS: usize = 2;
const TILE_FILTERS: usize = 4;

/// `y = conv2d(x, w)` over ±1 values with zero padding, `[N, out, OH, OW]` as i32.
///
/// Each image's windows are gathered into rows of `kh · kw · words` words (im2col on bits;
/// taps in the border padding as 0 words, that is −1), and every window row meets every
/// filter in tiles of 2 windows × 4 filters, so each loaded word serves several counts. A tap
/// in the padding then counted `−Σ_c w[o, c, tap]` instead of 0; [`sum_bases`] corrects it.
/// Images are spread over the threads, or, for fewer images than threads, blocks of 4
/// filters.
pub fn conv(path: Path, p: &Conv2dProblem, x: &PackedImages, w: &PackedFilters, y: &mut [i32]) {
    if path == Path::Reference {
        if let Err(e) = check_conv(p, x, w) {
            panic!("{e}");
        }
        assert_eq!(
            y.len(),
            p.y_len(),
            "binary convolution: y is not [N, out, OH, OW]"
        );
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
    if let Err(e) = check_conv(p, x, w) {
        panic!("{e}");
    }
    assert_eq!(
        y.len(),
        p.y_len(),
        "binary convolution: y is not [N, out, OH, OW]"
    );
    path.check();
    let plane = p.out_plane();
    if plane == 0 || p.out_channels == 0 {
        return;
    }
    let row = p.kernel[0] * p.kernel[1] * x.words();
    let base = sum_bases(p, w);
    // Windows padded to whole tiles with rows of zeros, whose sums are dropped.
    let rows = plane.next_multiple_of(TILE_ROWS);
    let image_len = p.out_channels * plane;
    let block = |windows: &[u64], first: usize, out: &mut [T], sums: &mut Vec<u32>| {
        let filters = (p.out_channels - first).min(TILE_FILTERS);
        sums.clear();
        sums.resize(rows * TILE_FILTERS, 0);
        let b = std::array::from_fn(|f| {
            let o = first + f.min(filters - 1);
            &w.data[o * row..(o + 1) * row]
        });
        match path {
            // SAFETY (both): the path runs here (checked above).
            #[cfg(target_arch = "x86_64")]
            Path::Popcnt => unsafe { tiles_popcnt(windows, row, b, sums) },
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => unsafe { tiles_avx2(windows, row, b, sums) },
            _ => tiles::<CountOnes>(windows, row, b, sums),
        }
        for f in 0..filters {
            let base = &base[(first + f) * plane..(first + f + 1) * plane];
            for ((o, b), d) in out[f * plane..(f + 1) * plane]
                .iter_mut()
                .zip(base)
                .zip(sums.chunks_exact(TILE_FILTERS))
            {
                *o = write(first + f, b - 2 * d[f] as i32);
            }
        }
    };
    if p.batch >= rayon::current_num_threads() {
        // One task an image: windows gathered and every filter block run on one thread.
        y.par_chunks_mut(image_len).enumerate().for_each_init(
            || (vec![0u64; rows * row], Vec::new()),
            |(windows, sums), (n, out)| {
                gather_windows(p, x, n, &mut windows[..plane * row]);
                for (i, out) in out.chunks_mut(TILE_FILTERS * plane).enumerate() {
                    block(windows, i * TILE_FILTERS, out, sums);
                }
            },
        );
    } else {
        // Few images: each image's filter blocks spread over the threads.
        let mut windows = vec![0u64; rows * row];
        for (n, out) in y.chunks_mut(image_len).enumerate() {
            gather_windows(p, x, n, &mut windows[..plane * row]);
            out.par_chunks_mut(TILE_FILTERS * plane)
                .enumerate()
                .for_each_init(Vec::new, |sums, (i, out)| {
                    block(&windows, i * TILE_FILTERS, out, sums)
                });
        }
    }
}

/// What each output adds to `−2 · differing bits`, `[out, OH · OW]`: `valid · C`, the window's
/// taps inside the image times the channels, plus twice the filter's +1 weights at the taps
/// in the padding (there a −1 input was counted as differing from every +1 weight, where the
/// zero padding adds nothing).
fn sum_bases(p: &Conv2dProblem, w: &PackedFilters) -> Vec<i32> {
    let words = words_for(p.in_channels);
    let [h, wd] = p.in_hw;
    let [kh, kw] = p.kernel;
    let [_, ow] = p.out_hw();
    let plane = p.out_plane();
    let ones: Vec<i32> = w
        .data
        .chunks(words.max(1))
        .map(|t| t.iter().map(|v| v.count_ones() as i32).sum())
        .collect();
    let mut base = vec![0i32; p.out_channels * plane];
    for pos in 0..plane {
        let top = ((pos / ow) * p.stride[0]) as isize - p.pad_begin[0] as isize;
        let left = ((pos % ow) * p.stride[1]) as isize - p.pad_begin[1] as isize;
        let outside: Vec<usize> = (0..kh * kw)
            .filter(|t| {
                let (iy, ix) = (top + (t / kw) as isize, left + (t % kw) as isize);
                iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize
            })
            .collect();
        let valid = ((kh * kw - outside.len()) * p.in_channels) as i32;
        for o in 0..p.out_channels {
            let padding: i32 = outside.iter().map(|t| ones[o * kh * kw + t]).sum();
            base[o * plane + pos] = valid + 2 * padding;
        }
    }
    base
}

/// Image `n`'s windows as rows of `kh · kw · words` words, row-major over output positions.
fn gather_windows(p: &Conv2dProblem, x: &PackedImages, n: usize, out: &mut [u64]) {
    let words = x.words();
    let [h, wd] = p.in_hw;
    let [kh, kw] = p.kernel;
    let [_, ow] = p.out_hw();
    let image = &x.data[n * h * wd * words..(n + 1) * h * wd * words];
    out.chunks_mut(kh * kw * words)
        .enumerate()
        .for_each(|(pos, window)| {
            let top = ((pos / ow) * p.stride[0]) as isize - p.pad_begin[0] as isize;
            let left = ((pos % ow) * p.stride[1]) as isize - p.pad_begin[1] as isize;
            for ky in 0..kh {
                let iy = top + ky as isize;
                for kx in 0..kw {
                    let ix = left + kx as isize;
                    let dst = &mut window[(ky * kw + kx) * words..][..words];
                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                        dst.fill(0);
                    } else {
                        let at = (iy as usize * wd + ix as usize) * words;
                        dst.copy_from_slice(&image[at..at + words]);
                    }
                }
            }
        });
}

/// Every window (rows of `row` words, a whole number of tiles) against the 4 filters `b`:
/// `sums[pos · 4 + f] = popcount(window ⊕ filter)`.
#[inline(always)]
fn tiles<C: XorCount>(windows: &[u64], row: usize, b: [&[u64]; 4], sums: &mut [u32]) {
    for (pair, out) in windows
        .chunks_exact(TILE_ROWS * row)
        .zip(sums.chunks_exact_mut(TILE_ROWS * TILE_FILTERS))
    {
        let counts = C::tile([&pair[..row], &pair[row..]], b);
        out[..4].copy_from_slice(&counts[0]);
        out[4..].copy_from_slice(&counts[1]);
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
                                let tap = (o * kh + ky) * kw + kx;
                                let b = sign_of(&w.data[tap * words..], ch);
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
