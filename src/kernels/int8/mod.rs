//! Integer matrix products for int8 inference (issue #12): `c[m][n] = Σ_k a[m][k] · b[n][k]`,
//! with `a` unsigned 8-bit (activations, quantized asymmetrically; the caller folds the zero
//! point in through the row sums of `b`), `b` signed 8-bit (weights, symmetric per output
//! channel: one row of `b` per output channel, as conv weights `[out, in·kh·kw]` are laid out),
//! and `c` the exact 32-bit sums.
//!
//! The paths sit behind one small trait and are chosen at run time ([`best`]), never by a build
//! flag; `tests/int8.rs` holds every path this machine can run to [`Reference`], exactly, on
//! ordinary and worst-case inputs:
//! - [`Reference`]: three plain loops, obviously right;
//! - [`Portable`]: row-by-row dot products the compiler vectorises, on any CPU;
//! - [`Avx2`]: widens `a` and `b` to 16 bits and multiplies with `vpmaddwd` into 32-bit lanes;
//! - [`Blocked`]: the same instruction in register-blocked tiles of 6 rows × 16 output
//!   channels on packed weights ([`PackedB`]), its rows read from u8 rows, pairs, or gathered
//!   straight from a convolution's padded input, and an epilogue per task of rows;
//! - [`Quads::avx2`]: the blocked kernel on `vpmaddubsw` (u8 × i8 straight to 16 bits, four
//!   steps per broadcast instead of two), for weights in [-64, 64] ([`PackedQuads`]). It adds
//!   pairs of products in 16 bits with saturation, and 2 · 255 · 127 = 64,770 does not fit in
//!   32,767: it is exact for 7-bit weights (2 · 255 · 64 = 32,640), and for other weights the
//!   path falls back to the widening one;
//! - [`Quads::vnni`]: the blocked kernel on AVX-512 VNNI (`vpdpbusd`, `vnni.rs`), on the same quads
//!   for every int8 weight: four products summed into 32 bits in one instruction, no
//!   saturation. Where the CPU has it, int8 layers run on it ([`Blocked::best`]).

#[cfg(target_arch = "x86_64")]
mod vnni;

/// The longest reduction whose sums always fit in `i32`: 255 · 128 · `MAX_K` < 2^31.
pub const MAX_K: usize = 65_793;

/// One implementation of the int8 product.
pub trait Int8Gemm: Send + Sync {
    /// A short name for tests and benchmarks (`reference`, `portable`, `avx2`).
    fn name(&self) -> &'static str;

    /// `c = a · bᵀ`: `a` is `[m, k]` row-major, `b` is `[n, k]` row-major, `c` is `[m, n]`
    /// row-major and is overwritten. `k` is at most [`MAX_K`].
    fn gemm(&self, m: usize, n: usize, k: usize, a: &[u8], b: &[i8], c: &mut [i32]);
}

fn check_shapes(m: usize, n: usize, k: usize, a: &[u8], b: &[i8], c: &[i32]) {
    assert!(
        k <= MAX_K,
        "int8 gemm: k = {k} could overflow i32 (at most {MAX_K})"
    );
    assert_eq!(a.len(), m * k, "int8 gemm: a is not [m, k]");
    assert_eq!(b.len(), n * k, "int8 gemm: b is not [n, k]");
    assert_eq!(c.len(), m * n, "int8 gemm: c is not [m, n]");
}

/// Three plain loops.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reference;

impl Int8Gemm for Reference {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn gemm(&self, m: usize, n: usize, k: usize, a: &[u8], b: &[i8], c: &mut [i32]) {
        check_shapes(m, n, k, a, b, c);
        for i in 0..m {
            for j in 0..n {
                let mut sum = 0i32;
                for p in 0..k {
                    sum += a[i * k + p] as i32 * b[j * k + p] as i32;
                }
                c[i * n + j] = sum;
            }
        }
    }
}

/// Dot products of whole rows, which the compiler vectorises for the target it builds for;
/// rows of `c` are split across threads when the product is large.
#[derive(Debug, Clone, Copy, Default)]
pub struct Portable;

impl Int8Gemm for Portable {
    fn name(&self) -> &'static str {
        "portable"
    }

    fn gemm(&self, m: usize, n: usize, k: usize, a: &[u8], b: &[i8], c: &mut [i32]) {
        check_shapes(m, n, k, a, b, c);
        rows(m, n, k, c, |i, row| {
            let x = &a[i * k..(i + 1) * k];
            for (j, out) in row.iter_mut().enumerate() {
                let w = &b[j * k..(j + 1) * k];
                *out = x.iter().zip(w).map(|(&x, &w)| x as i32 * w as i32).sum();
            }
        });
    }
}

/// Runs `row(i, c_row)` for every row of `c`, on several threads if the product is large
/// enough to pay for them.
fn rows(m: usize, n: usize, k: usize, c: &mut [i32], row: impl Fn(usize, &mut [i32]) + Sync) {
    use rayon::prelude::*;
    if n == 0 {
        return;
    }
    if m > 1 && m * n * k >= 1 << 18 {
        c.par_chunks_mut(n).enumerate().for_each(|(i, r)| row(i, r));
    } else {
        c.chunks_mut(n).enumerate().for_each(|(i, r)| row(i, r));
    }
}

/// AVX2, widening to 16 bits and `vpmaddwd` (exact for all int8 weights); four output
/// channels share each load of `a`.
#[derive(Debug, Clone, Copy)]
pub struct Avx2 {
    _private: (),
}

impl Avx2 {
    /// The AVX2 path, if this CPU has AVX2.
    pub fn new() -> Option<Avx2> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Some(Avx2 { _private: () });
        }
        None
    }
}

impl Int8Gemm for Avx2 {
    fn name(&self) -> &'static str {
        "avx2"
    }

    fn gemm(&self, m: usize, n: usize, k: usize, a: &[u8], b: &[i8], c: &mut [i32]) {
        check_shapes(m, n, k, a, b, c);
        #[cfg(target_arch = "x86_64")]
        rows(m, n, k, c, |i, row| {
            // SAFETY: an `Avx2` exists only where the CPU has AVX2 (`Avx2::new`); the slices
            // have the lengths `check_shapes` asserted.
            unsafe { avx2::row(&a[i * k..(i + 1) * k], b, k, row) }
        });
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("Avx2::new returns None off x86_64");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `row[j] = Σ_p x[p] · b[j·k + p]` for every output channel `j`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn row(x: &[u8], b: &[i8], k: usize, row: &mut [i32]) {
        let n = row.len();
        let mut j = 0;
        while j + 4 <= n {
            let w = [
                &b[j * k..(j + 1) * k],
                &b[(j + 1) * k..(j + 2) * k],
                &b[(j + 2) * k..(j + 3) * k],
                &b[(j + 3) * k..(j + 4) * k],
            ];
            let mut acc = [_mm256_setzero_si256(); 4];
            let mut p = 0;
            while p + 16 <= k {
                // SAFETY: p + 16 <= k, and every slice here is k long.
                let xs = unsafe { _mm256_cvtepu8_epi16(_mm_loadu_si128(x.as_ptr().add(p).cast())) };
                for (acc, w) in acc.iter_mut().zip(&w) {
                    let ws =
                        unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(w.as_ptr().add(p).cast())) };
                    *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(xs, ws));
                }
                p += 16;
            }
            for (q, (acc, w)) in acc.iter().zip(&w).enumerate() {
                row[j + q] = hsum(*acc) + tail(&x[p..], &w[p..]);
            }
            j += 4;
        }
        while j < n {
            let w = &b[j * k..(j + 1) * k];
            let mut acc = _mm256_setzero_si256();
            let mut p = 0;
            while p + 16 <= k {
                // SAFETY: as above.
                let (xs, ws) = unsafe {
                    (
                        _mm256_cvtepu8_epi16(_mm_loadu_si128(x.as_ptr().add(p).cast())),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(w.as_ptr().add(p).cast())),
                    )
                };
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(xs, ws));
                p += 16;
            }
            row[j] = hsum(acc) + tail(&x[p..], &w[p..]);
            j += 1;
        }
    }

    /// One tile: `R` rows (their starts in `rows`) against one panel of `W` registers (8 output
    /// channels each) over all `groups` groups of reduction steps, its sums stored to `out` as
    /// `R` rows of 16 lanes (a narrow panel leaves lanes 8..16 as they were). Each group is an
    /// `i32` of the row broadcast against 32 bytes of weights per register: two u16 against
    /// two i16 per channel (`vpmaddwd`), or with `QUADS` four u8 against four i8
    /// (`vpmaddubsw`, then `vpmaddwd` by ones to 32 bits). `R` and `W` are constants so that
    /// the `R · W` accumulators live in registers: 6 × 2 = 12, with the two weight registers
    /// and the broadcast 15 of AVX2's 16 (16 with the quads' constant of ones).
    ///
    /// # Safety
    /// AVX2; every group `src` places after those rows' starts must be readable, `panel` must
    /// hold `groups · W · 32` bytes, and `out` `R · 16` values; with `QUADS`, every weight in
    /// [-64, 64].
    #[target_feature(enable = "avx2")]
    pub unsafe fn tile<const R: usize, const W: usize, const QUADS: bool, P: super::Pairs>(
        src: &P,
        rows: &[*const u8; R],
        panel: *const u8,
        groups: usize,
        out: *mut i32,
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); W]; R];
        for q in 0..groups {
            let off = src.offset(q);
            // SAFETY: panel holds `groups` steps of `W` registers; every row's group `q` lies
            // in `src` (the caller's).
            unsafe {
                let ptr = panel.add(q * W * 32);
                let mut b = [_mm256_setzero_si256(); W];
                for (w, b) in b.iter_mut().enumerate() {
                    *b = _mm256_loadu_si256(ptr.add(32 * w).cast());
                }
                for (acc, row) in acc.iter_mut().zip(rows) {
                    let av =
                        _mm256_set1_epi32(std::ptr::read_unaligned(row.add(off).cast::<i32>()));
                    for (acc, b) in acc.iter_mut().zip(&b) {
                        let sums = if QUADS {
                            _mm256_madd_epi16(_mm256_maddubs_epi16(av, *b), ones)
                        } else {
                            _mm256_madd_epi16(av, *b)
                        };
                        *acc = _mm256_add_epi32(*acc, sums);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (w, acc) in acc.iter().enumerate() {
                // SAFETY: `out` holds `R` rows of 16 lanes.
                unsafe { _mm256_storeu_si256(out.add(r * 16 + 8 * w).cast(), *acc) };
            }
        }
    }

    /// [`super::Dequant::codes_rows`]: whole panels stored as 16 bytes, the last one's
    /// channels copied.
    ///
    /// # Safety
    /// AVX2, and the lengths that `codes_rows` asserts.
    #[target_feature(enable = "avx2")]
    pub unsafe fn requantize_rows(
        d: &super::Dequant,
        sums: &super::Sums,
        next: super::Rounding,
        out: &mut [u8],
    ) {
        let n = sums.n;
        let len = out.len();
        let ptr = out.as_mut_ptr();
        for r in 0..sums.rows {
            for p in 0..n.div_ceil(16) {
                let at = r * n + 16 * p;
                // SAFETY: the caller's.
                let bytes = unsafe {
                    if n - 16 * p > 8 {
                        requantize::<2>(d, p, sums.panel(r, p), next)
                    } else {
                        requantize::<1>(d, p, sums.panel(r, p), next)
                    }
                };
                if at + 16 <= len {
                    // SAFETY: 16 bytes from `at` lie in `out`. Past the row's last channel
                    // they are the next row's first, which it writes after this.
                    unsafe { _mm_storeu_si128(ptr.add(at).cast(), bytes) };
                } else {
                    let mut tmp = [0u8; 16];
                    // SAFETY: 16 bytes out.
                    unsafe { _mm_storeu_si128(tmp.as_mut_ptr().cast(), bytes) };
                    out[at..].copy_from_slice(&tmp[..len - at]);
                }
            }
        }
    }

    /// [`super::Dequant::codes`] of one panel: 16 lanes to 16 codes (the first `8 H`
    /// computed, the rest 0).
    ///
    /// # Safety
    /// AVX2; `d`'s scales and offsets hold channels `16 p .. 16 p + 16`.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn requantize<const H: usize>(
        d: &super::Dequant,
        p: usize,
        lanes: &[i32; 16],
        next: super::Rounding,
    ) -> __m128i {
        let zero = _mm256_setzero_ps();
        let (qs, qo, ql, qh) = (
            _mm256_set1_ps(next.inverse),
            _mm256_set1_ps(next.offset),
            _mm256_set1_ps(next.lo),
            _mm256_set1_ps(next.hi),
        );
        let mut ints = [_mm256_setzero_si256(); 2];
        // `H` halves of eight lanes: 1 where the panel has at most 8 channels.
        for (h, ints) in ints.iter_mut().enumerate().take(H) {
            // SAFETY: eight lanes, scales and offsets from `16 p + 8 h` (the caller's).
            unsafe {
                let v = _mm256_cvtepi32_ps(_mm256_loadu_si256(lanes.as_ptr().add(8 * h).cast()));
                let s = _mm256_loadu_ps(d.scales.as_ptr().add(16 * p + 8 * h));
                let o = _mm256_loadu_ps(d.offsets.as_ptr().add(16 * p + 8 * h));
                let mut y = _mm256_add_ps(_mm256_mul_ps(v, s), o);
                if d.relu {
                    // `max(y, 0)` gives 0 for a NaN y, as `f32::max` does.
                    y = _mm256_max_ps(y, zero);
                }
                let t = _mm256_min_ps(
                    _mm256_max_ps(_mm256_add_ps(_mm256_mul_ps(y, qs), qo), ql),
                    qh,
                );
                *ints = _mm256_cvttps_epi32(t);
            }
        }
        // In [0, 255] after the clamp, so the saturating packs are exact: 16 i32 to 16 i16
        // (in-lane, hence the permute), then to 16 bytes.
        let words = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(ints[0], ints[1]));
        _mm_packus_epi16(
            _mm256_castsi256_si128(words),
            _mm256_extracti128_si256::<1>(words),
        )
    }

    /// [`super::quantize_u8`] on a multiple of 32 values.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize(x: &[f32], inverse: f32, offset: f32, lo: f32, hi: f32, out: &mut [u8]) {
        debug_assert!(x.len().is_multiple_of(32) && out.len() == x.len());
        let (s, o, l, h) = (
            _mm256_set1_ps(inverse),
            _mm256_set1_ps(offset),
            _mm256_set1_ps(lo),
            _mm256_set1_ps(hi),
        );
        // After the two in-lane packs the 32-bit groups are in the order 0 2 4 6 1 3 5 7.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (xs, os) in x.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
            let mut v = [_mm256_setzero_si256(); 4];
            for (j, v) in v.iter_mut().enumerate() {
                // SAFETY: each chunk holds 32 floats: four loads of eight.
                let f = unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * j)) };
                // max(x, lo) gives lo for a NaN x, as `f32::max` does.
                let t = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(_mm256_mul_ps(f, s), o), l), h);
                *v = _mm256_cvttps_epi32(t);
            }
            let p01 = _mm256_packs_epi32(v[0], v[1]);
            let p23 = _mm256_packs_epi32(v[2], v[3]);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), order);
            // SAFETY: 32 bytes out.
            unsafe { _mm256_storeu_si256(os.as_mut_ptr().cast(), bytes) };
        }
    }

    /// The sum of the eight 32-bit lanes.
    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// The last `k % 16` products.
    fn tail(x: &[u8], w: &[i8]) -> i32 {
        x.iter().zip(w).map(|(&x, &w)| x as i32 * w as i32).sum()
    }
}

/// Weights packed for [`Blocked`]: panels of 16 output channels (two registers of eight
/// sums), the last one only 8 wide where at most 8 channels are left (LeNet-5's 20 and 50
/// end so). Within a panel, for each group of `G` reduction steps (`G` = 2 for `vpmaddwd`,
/// 4 for `vpmaddubsw`), the channels' `G` values side by side, in the order the instruction
/// takes them (channel 0's, channel 1's, ...): 32 bytes per register either way. Channels past
/// `n` and steps past `k` are zero. Packed once per layer, since weights do not change.
#[derive(Debug, Clone)]
pub struct Packed<E> {
    n: usize,
    k: usize,
    /// Groups of reduction steps: `ceil(k / G)`.
    groups: usize,
    /// Registers (of 8 channels) per panel: 2, or 1 for a narrow last panel.
    widths: Vec<usize>,
    /// Where each panel starts in `data`.
    starts: Vec<usize>,
    data: Vec<E>,
    /// Whether every weight lies in [-64, 64] (see [`PackedQuads`]).
    seven_bit: bool,
}

/// Pairs of steps widened to `i16`, for `vpmaddwd`: exact for every int8 weight.
pub type PackedB = Packed<i16>;

/// Quads of steps as `i8`, for `vpmaddubsw`, which multiplies u8 by i8 and adds pairs of
/// products in 16 bits with saturation: exact when every weight lies in [-64, 64]
/// (2 · 255 · 64 = 32,640 ≤ 32,767), as 7-bit weights (±63) do; twice the steps per
/// instruction of the pairs, half the bytes.
pub type PackedQuads = Packed<i8>;

/// Output channels per panel of [`Packed`], and lanes per row of [`Sums`].
pub const PANEL: usize = 16;
/// Rows of a tile of the blocked kernel (see `avx2::tile`).
const ROWS: usize = 6;
/// Rows of one task at most: its tiles reuse each panel of weights from L1.
const CHUNK: usize = 96;

impl<E: Copy + Default + From<i8>> Packed<E> {
    fn pack(n: usize, k: usize, b: &[i8], group: usize) -> Packed<E> {
        assert_eq!(b.len(), n * k, "int8 pack: b is not [n, k]");
        let groups = k.div_ceil(group);
        let panels = n.div_ceil(PANEL);
        let widths: Vec<usize> = (0..panels)
            .map(|p| if n - p * PANEL > PANEL / 2 { 2 } else { 1 })
            .collect();
        let starts: Vec<usize> = widths
            .iter()
            .scan(0, |at, &w| {
                let start = *at;
                *at += groups * w * 8 * group;
                Some(start)
            })
            .collect();
        let mut data = vec![E::default(); widths.iter().sum::<usize>() * groups * 8 * group];
        for p in 0..panels {
            let lanes = widths[p] * 8;
            for q in 0..groups {
                let base = starts[p] + q * lanes * group;
                for c in 0..lanes.min(n - p * PANEL) {
                    let ch = p * PANEL + c;
                    for t in 0..group {
                        let step = group * q + t;
                        if step < k {
                            data[base + group * c + t] = E::from(b[ch * k + step]);
                        }
                    }
                }
            }
        }
        Packed {
            n,
            k,
            groups,
            widths,
            starts,
            data,
            seven_bit: b.iter().all(|&w| (-64..=64).contains(&w)),
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Panels of [`PANEL`] output channels: `ceil(n / 16)`.
    pub fn panels(&self) -> usize {
        self.widths.len()
    }

    /// Panel `p` as bytes (32 per register and group of steps).
    fn panel_bytes(&self, p: usize) -> &[u8] {
        let data = &self.data[self.starts[p]..];
        // SAFETY: `E` is `i8` or `i16`, plain integers: any bytes of them are valid `u8`.
        unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), std::mem::size_of_val(data)) }
    }
}

impl PackedB {
    /// Packs `b` (`[n, k]` row-major).
    pub fn new(n: usize, k: usize, b: &[i8]) -> PackedB {
        Packed::pack(n, k, b, 2)
    }

    /// Pairs of reduction steps per row: `ceil(k / 2)`.
    pub fn pairs(&self) -> usize {
        self.groups
    }
}

impl PackedQuads {
    /// Packs `b` (`[n, k]` row-major); `None` unless every weight lies in [-64, 64].
    pub fn new(n: usize, k: usize, b: &[i8]) -> Option<PackedQuads> {
        let p: PackedQuads = Packed::pack(n, k, b, 4);
        p.seven_bit.then_some(p)
    }

    /// Packs `b` (`[n, k]` row-major) whatever its weights, for [`Quads::vnni`], which does not
    /// saturate; the `vpmaddubsw` tiles refuse it unless every weight lies in [-64, 64].
    pub fn any(n: usize, k: usize, b: &[i8]) -> PackedQuads {
        Packed::pack(n, k, b, 4)
    }

    /// Quads of reduction steps per row: `ceil(k / 4)`.
    pub fn quads(&self) -> usize {
        self.groups
    }
}

/// The exact sums of a block of rows as the blocked kernel leaves them for an epilogue: panel
/// after panel, each row's 16 lanes (channels `16 p .. 16 p + 16`) side by side, so that an
/// epilogue reads 16 channels of a row with two vector loads. Lanes past `n` hold anything.
pub struct Sums<'a> {
    data: &'a [i32],
    rows: usize,
    n: usize,
}

impl Sums<'_> {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Row `r`'s 16 lanes of panel `p`.
    pub fn panel(&self, r: usize, p: usize) -> &[i32; PANEL] {
        let at = (p * self.rows + r) * PANEL;
        self.data[at..at + PANEL].try_into().expect("16 lanes")
    }

    /// Row `r`'s `n` sums, into `out`.
    pub fn row_into(&self, r: usize, out: &mut [i32]) {
        for (p, out) in out[..self.n].chunks_mut(PANEL).enumerate() {
            out.copy_from_slice(&self.panel(r, p)[..out.len()]);
        }
    }
}

/// Where the rows of a product gathered from a convolution's padded input start: row `r` is
/// output position `(image, y, x)` in row-major order, and starts `image · image_len +
/// y · step[0] + x · step[1]` values into the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub images: usize,
    pub out_hw: [usize; 2],
    /// Values per image.
    pub image_len: usize,
    /// Values between output rows, and between output columns.
    pub step: [usize; 2],
}

impl Grid {
    /// Rows of the product: `images · H' · W'`.
    pub fn rows(&self) -> usize {
        self.images * self.out_hw[0] * self.out_hw[1]
    }

    /// Panics unless every group of `width` values that `offsets` place after a row's start
    /// lies in a buffer of `len` values.
    fn check_reach(&self, offsets: &[usize], width: usize, len: usize) {
        if self.rows() == 0 || offsets.is_empty() {
            return;
        }
        let reach = self
            .last_base()
            .and_then(|r| r.checked_add(*offsets.iter().max()?))
            .and_then(|r| r.checked_add(width));
        assert!(
            reach.is_some_and(|r| r <= len),
            "int8 gemm: a gathered group lies outside a"
        );
    }

    /// The largest base, that of the last position (every term grows with its index); `None`
    /// on overflow.
    fn last_base(&self) -> Option<usize> {
        let [oh, ow] = self.out_hw;
        (self.images - 1)
            .checked_mul(self.image_len)?
            .checked_add((oh - 1).checked_mul(self.step[0])?)?
            .checked_add((ow - 1).checked_mul(self.step[1])?)
    }
}

/// Register-blocked, on AVX2: tiles of 6 rows of `a` against 16 output channels, each pair of
/// `a` values broadcast and multiplied by `vpmaddwd` against the packed weights (exact, like
/// [`Avx2`]), 16 products per instruction with every load reused six or sixteen times. Rows are
/// split into tasks of up to 96 (over threads where the product is large); a task runs its
/// tiles panel by panel, so that a panel's weights stay in L1, then hands its sums to the
/// caller's epilogue while they are in cache. For batches of at least 4 rows; [`Int8Gemm::gemm`]
/// packs `b` on every call, so a layer keeps a [`PackedB`]. Quads ([`PackedQuads`]) run on
/// `vpmaddubsw`, or on AVX-512 VNNI in tiles of 12 rows ([`Blocked::with_vnni`], `vnni.rs`).
#[derive(Debug, Clone, Copy)]
pub struct Blocked {
    /// Whether quads run on AVX-512 VNNI (`vnni.rs`) rather than on `vpmaddubsw`.
    vnni: bool,
}

/// What the blocked kernel does with each task's sums: `(first row, sums, the task's rows of
/// the output)`.
pub type Epilogue<'a, T> = &'a (dyn Fn(usize, &Sums, &mut [T]) + Sync);

impl Blocked {
    /// The blocked AVX2 path, if this CPU has AVX2 (quads on `vpmaddubsw`).
    pub fn new() -> Option<Blocked> {
        Avx2::new().map(|_| Blocked { vnni: false })
    }

    /// The blocked path with quads on AVX-512 VNNI, if this CPU has it (pairs stay on AVX2).
    pub fn with_vnni() -> Option<Blocked> {
        #[cfg(target_arch = "x86_64")]
        if Avx2::new().is_some() && vnni::detected() {
            return Some(Blocked { vnni: true });
        }
        None
    }

    /// What int8 layers run on: VNNI where the CPU has it, unless the environment variable
    /// `CONVPRESS_VNNI` is `off` (to measure the AVX2 path on such a machine), else AVX2.
    pub fn best() -> Option<Blocked> {
        let off = std::env::var("CONVPRESS_VNNI").is_ok_and(|v| v == "off");
        (!off)
            .then(Blocked::with_vnni)
            .flatten()
            .or_else(Blocked::new)
    }

    /// Whether quads run on VNNI, and so take every int8 weight ([`PackedQuads::any`]).
    pub fn has_vnni(&self) -> bool {
        self.vnni
    }

    /// The name of the path that runs quads: `avx512-vnni` or `avx2-quads`.
    pub fn quads_name(&self) -> &'static str {
        if self.vnni {
            "avx512-vnni"
        } else {
            "avx2-quads"
        }
    }

    /// Packs `b` as quads if this kernel can run them exactly: any weights on VNNI, weights
    /// in [-64, 64] on `vpmaddubsw`.
    pub fn pack_quads(&self, n: usize, k: usize, b: &[i8]) -> Option<PackedQuads> {
        if self.vnni {
            Some(PackedQuads::any(n, k, b))
        } else {
            PackedQuads::new(n, k, b)
        }
    }

    /// `c = a · bᵀ` with `b` packed.
    pub fn gemm_packed(&self, m: usize, b: &PackedB, a: &[u8], c: &mut [i32]) {
        assert_eq!(a.len(), m * b.k, "int8 gemm: a is not [m, k]");
        self.gemm_pairs(m, b, &pairs_of(a, b.k, b.groups), c);
    }

    /// [`Blocked::gemm_packed`] with an epilogue: `out` holds `per_row` values per row.
    pub fn gemm_packed_with<T: Send>(
        &self,
        m: usize,
        b: &PackedB,
        a: &[u8],
        out: &mut [T],
        per_row: usize,
        epilogue: Epilogue<T>,
    ) {
        assert_eq!(a.len(), m * b.k, "int8 gemm: a is not [m, k]");
        let a2 = pairs_of(a, b.k, b.groups);
        self.gemm_pairs_with(m, b, &a2, out, per_row, epilogue);
    }

    /// [`Blocked::gemm_packed`] on rows already widened to pairs: row `i` of `a2` is
    /// `b.pairs()` values `a[i][2q] | a[i][2q + 1] << 16` (a last odd step paired with 0), which
    /// is the row's u8 values widened to `u16` read as `i32` on this little-endian target.
    pub fn gemm_pairs(&self, m: usize, b: &PackedB, a2: &[i32], c: &mut [i32]) {
        self.gemm_pairs_with(m, b, a2, c, b.n, &copy_sums);
    }

    /// [`Blocked::gemm_pairs`] with an epilogue.
    pub fn gemm_pairs_with<T: Send>(
        &self,
        m: usize,
        b: &PackedB,
        a2: &[i32],
        out: &mut [T],
        per_row: usize,
        epilogue: Epilogue<T>,
    ) {
        assert_eq!(a2.len(), m * b.groups, "int8 gemm: a2 is not [m, pairs]");
        let src = Contiguous::pairs(a2, b.groups);
        self.run(m, b, &src, out, per_row, epilogue);
    }

    /// `c = a · bᵀ` where row `r`'s pair `q` is the two `u16` at `a[base + offsets[q]]`, `base` the row's start on `grid`
    /// (read as one `i32`, as in [`Blocked::gemm_pairs`]; `vpmaddwd` reads them as signed
    /// 16-bit values, so they must be codes of at most 255 for [`MAX_K`] to hold). An int8
    /// convolution reads its patches so straight from the widened, padded input (`offsets`
    /// walk the window, the grid the output positions): no im2col buffer.
    pub fn gemm_gathered(
        &self,
        grid: &Grid,
        offsets: &[usize],
        a: &[u16],
        b: &PackedB,
        c: &mut [i32],
    ) {
        self.gemm_gathered_with(grid, offsets, a, b, c, b.n, &copy_sums);
    }

    /// [`Blocked::gemm_gathered`] with an epilogue.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_gathered_with<T: Send>(
        &self,
        grid: &Grid,
        offsets: &[usize],
        a: &[u16],
        b: &PackedB,
        out: &mut [T],
        per_row: usize,
        epilogue: Epilogue<T>,
    ) {
        assert_eq!(offsets.len(), b.groups, "int8 gemm: one offset per pair");
        let m = grid.rows();
        grid.check_reach(offsets, 2, a.len());
        // SAFETY: any bytes of `u16`s are valid `u8`s.
        let bytes = unsafe { std::slice::from_raw_parts(a.as_ptr().cast(), 2 * a.len()) };
        let src = Gathered {
            bytes,
            elem: 2,
            grid: *grid,
            offsets,
        };
        self.run(m, b, &src, out, per_row, epilogue);
    }

    /// `c = a · bᵀ` on `vpmaddubsw` (see [`PackedQuads`]): `a` is `[m, 4 · b.quads()]`, each
    /// row's `k` codes then zeros up to a whole quad.
    pub fn gemm_quads_with<T: Send>(
        &self,
        m: usize,
        b: &PackedQuads,
        a: &[u8],
        out: &mut [T],
        per_row: usize,
        epilogue: Epilogue<T>,
    ) {
        let row_bytes = 4 * b.groups;
        assert_eq!(a.len(), m * row_bytes, "int8 gemm: a is not [m, 4 quads]");
        let src = Contiguous {
            bytes: a,
            row_bytes,
        };
        self.run(m, b, &src, out, per_row, epilogue);
    }

    /// [`Blocked::gemm_gathered_with`] on `vpmaddubsw`: row `r`'s quad `q` is the four u8
    /// at `a[base + offsets[q]]`, `base` the row's start on `grid` (the padded input as codes, channels last: no
    /// widening).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_gathered_quads_with<T: Send>(
        &self,
        grid: &Grid,
        offsets: &[usize],
        a: &[u8],
        b: &PackedQuads,
        out: &mut [T],
        per_row: usize,
        epilogue: Epilogue<T>,
    ) {
        assert_eq!(offsets.len(), b.groups, "int8 gemm: one offset per quad");
        let m = grid.rows();
        grid.check_reach(offsets, 4, a.len());
        let src = Gathered {
            bytes: a,
            elem: 1,
            grid: *grid,
            offsets,
        };
        self.run(m, b, &src, out, per_row, epilogue);
    }

    /// The driver: tasks of rows, tiles within a task panel by panel, then the epilogue.
    fn run<P: Pairs, T: Send, E: Copy + Default + From<i8> + Sync>(
        &self,
        m: usize,
        b: &Packed<E>,
        src: &P,
        out: &mut [T],
        per_row: usize,
        epilogue: Epilogue<T>,
    ) {
        use rayon::prelude::*;
        let (n, k) = (b.n, b.k);
        assert!(
            k <= MAX_K,
            "int8 gemm: k = {k} could overflow i32 (at most {MAX_K})"
        );
        assert_eq!(
            out.len(),
            m * per_row,
            "int8 gemm: the output is not [m, per_row]"
        );
        // Quads (`i8` groups) run on `vpmaddubsw` only where it cannot saturate.
        assert!(
            size_of::<E>() != 1 || b.seven_bit || self.vnni,
            "int8 gemm: quads need weights in [-64, 64] without VNNI"
        );
        if m == 0 || per_row == 0 {
            return;
        }
        let parallel = m * n * k >= 1 << 18 && m > ROWS;
        // Where it pays, at least four tasks a thread (rows permitting), whole tiles each.
        let chunk = if parallel {
            m.div_ceil(4 * rayon::current_num_threads())
                .next_multiple_of(ROWS)
                .clamp(ROWS, CHUNK)
        } else {
            CHUNK
        };
        let task = |(t, out): (usize, &mut [T])| {
            let (first, rows) = (t * chunk, out.len() / per_row);
            // A buffer of this thread's, reused (every lane the epilogue reads is written).
            let mut sums = SUMS.take();
            if sums.len() < b.panels() * rows * PANEL {
                sums.resize(b.panels() * rows * PANEL, 0);
            }
            // Where each row starts, found once for all panels.
            let mut starts = [std::ptr::null::<u8>(); CHUNK];
            // SAFETY: the entry points checked that the source holds rows `first .. first + rows`.
            unsafe { src.starts(first, &mut starts[..rows]) };
            #[cfg(target_arch = "x86_64")]
            for p in 0..b.panels() {
                let panel = b.panel_bytes(p);
                let at = &mut sums[p * rows * PANEL..(p + 1) * rows * PANEL];
                let (starts, g) = (&starts[..rows], b.groups);
                // SAFETY: a `Blocked` exists only where the CPU has AVX2 (and with `vnni`,
                // AVX-512 VNNI: `vnni::detected`); the source
                // holds rows `first .. first + rows` (checked by the entry points), the panel
                // `groups · width · 32` bytes, `at` `rows · 16`; without VNNI quads hold
                // only weights in [-64, 64] (asserted above).
                unsafe {
                    let wide = b.widths[p] == 2;
                    match (wide, size_of::<E>() == 1, self.vnni) {
                        (_, true, true) => vnni::panel_tiles(src, starts, wide, panel, g, at),
                        (false, false, _) => panel_tiles::<1, false, P>(src, starts, panel, g, at),
                        (true, false, _) => panel_tiles::<2, false, P>(src, starts, panel, g, at),
                        (false, true, _) => panel_tiles::<1, true, P>(src, starts, panel, g, at),
                        (true, true, _) => panel_tiles::<2, true, P>(src, starts, panel, g, at),
                    }
                }
            }
            epilogue(
                first,
                &Sums {
                    data: &sums,
                    rows,
                    n,
                },
                out,
            );
            SUMS.set(sums);
        };
        if parallel {
            out.par_chunks_mut(chunk * per_row)
                .enumerate()
                .for_each(task);
        } else {
            out.chunks_mut(chunk * per_row).enumerate().for_each(task);
        }
    }
}

thread_local! {
    /// The sums of the last task run on this thread, kept for the next.
    static SUMS: std::cell::Cell<Vec<i32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The rows that start at `starts` against one panel: whole tiles of [`ROWS`], then one row
/// at a time.
///
/// # Safety
/// As `avx2::tile`, for every row.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn panel_tiles<const W: usize, const QUADS: bool, P: Pairs>(
    src: &P,
    starts: &[*const u8],
    panel: &[u8],
    groups: usize,
    out: &mut [i32],
) {
    let rows = starts.len();
    assert!(panel.len() >= groups * W * 32 && out.len() >= rows * PANEL);
    let (b, o) = (panel.as_ptr(), out.as_mut_ptr());
    let mut r = 0;
    // SAFETY: the caller's, and the asserts above.
    unsafe {
        while r + ROWS <= rows {
            let tile: &[*const u8; ROWS] = starts[r..r + ROWS].try_into().expect("a tile");
            avx2::tile::<ROWS, W, QUADS, P>(src, tile, b, groups, o.add(r * PANEL));
            r += ROWS;
        }
        while r < rows {
            avx2::tile::<1, W, QUADS, P>(src, &[starts[r]], b, groups, o.add(r * PANEL));
            r += 1;
        }
    }
}

/// The epilogue of the plain entry points: the sums themselves, `[m, n]`.
fn copy_sums(_first: usize, sums: &Sums, c: &mut [i32]) {
    for (r, row) in c.chunks_exact_mut(sums.n).enumerate() {
        sums.row_into(r, row);
    }
}

/// Rows `[m, k]` of u8 as pairs `a[2q] | a[2q + 1] << 16` (a last odd step paired with 0).
fn pairs_of(a: &[u8], k: usize, pairs: usize) -> Vec<i32> {
    let mut a2 = Vec::with_capacity(a.len().div_ceil(2) + pairs);
    for row in a.chunks_exact(k.max(1)) {
        let mut it = row.chunks_exact(2);
        a2.extend(it.by_ref().map(|p| p[0] as i32 | ((p[1] as i32) << 16)));
        if let [last] = it.remainder() {
            a2.push(*last as i32);
        }
    }
    a2
}

/// Where the blocked kernel reads row `r`'s pair `q` of reduction steps: `offset(q)` bytes
/// after the start of row `r`.
trait Pairs: Sync {
    /// The starts of rows `first ..`, one per element of `out`.
    ///
    /// # Safety
    /// The source must hold those rows.
    unsafe fn starts(&self, first: usize, out: &mut [*const u8]);
    fn offset(&self, q: usize) -> usize;
}

/// Rows one after another, `row_bytes` apart; group `q` of a row is its `q`-th `i32`.
struct Contiguous<'a> {
    bytes: &'a [u8],
    row_bytes: usize,
}

impl<'a> Contiguous<'a> {
    /// Rows of pairs (`pairs` `i32` each).
    fn pairs(a2: &'a [i32], pairs: usize) -> Self {
        // SAFETY: any bytes of `i32`s are valid `u8`s.
        let bytes = unsafe { std::slice::from_raw_parts(a2.as_ptr().cast(), 4 * a2.len()) };
        Contiguous {
            bytes,
            row_bytes: 4 * pairs,
        }
    }
}

impl Pairs for Contiguous<'_> {
    unsafe fn starts(&self, first: usize, out: &mut [*const u8]) {
        for (r, out) in out.iter_mut().enumerate() {
            // SAFETY: the caller's: the rows lie inside `bytes`.
            *out = unsafe { self.bytes.as_ptr().add((first + r) * self.row_bytes) };
        }
    }

    #[inline(always)]
    fn offset(&self, q: usize) -> usize {
        4 * q
    }
}

/// Groups gathered from one buffer of `elem`-byte values (u16 pairs, or u8 quads): row `r`
/// starts at its value on `grid`, its group `q` `offsets[q]` values on (see
/// [`Blocked::gemm_gathered`]).
struct Gathered<'a> {
    bytes: &'a [u8],
    elem: usize,
    grid: Grid,
    offsets: &'a [usize],
}

impl Pairs for Gathered<'_> {
    unsafe fn starts(&self, first: usize, out: &mut [*const u8]) {
        // One division for the first row, then a walk along the grid.
        let [oh, ow] = self.grid.out_hw;
        let (mut b, p) = (first / (oh * ow), first % (oh * ow));
        let (mut y, mut x) = (p / ow, p % ow);
        for out in out.iter_mut() {
            let base = b * self.grid.image_len + y * self.grid.step[0] + x * self.grid.step[1];
            // SAFETY: the caller's: every group of the row lies inside `bytes`.
            *out = unsafe { self.bytes.as_ptr().add(base * self.elem) };
            x += 1;
            if x == ow {
                (x, y) = (0, y + 1);
                if y == oh {
                    (y, b) = (0, b + 1);
                }
            }
        }
    }

    #[inline(always)]
    fn offset(&self, q: usize) -> usize {
        // SAFETY: `q < groups == offsets.len()` in the tile loop.
        self.elem * unsafe { *self.offsets.get_unchecked(q) }
    }
}

impl Int8Gemm for Blocked {
    fn name(&self) -> &'static str {
        "avx2-blocked"
    }

    fn gemm(&self, m: usize, n: usize, k: usize, a: &[u8], b: &[i8], c: &mut [i32]) {
        check_shapes(m, n, k, a, b, c);
        self.gemm_packed(m, &PackedB::new(n, k, b), a, c);
    }
}

/// The blocked kernel on quads ([`PackedQuads`]), as a path of its own: on `vpmaddubsw`
/// ([`Quads::avx2`], `avx2-quads`) for weights in [-64, 64], the widening kernel for any
/// other, exact either way (what an int8 layer of 7-bit weights runs at batches of 4 rows and
/// more on AVX2); or on AVX-512 VNNI ([`Quads::vnni`], `avx512-vnni`) for every int8 weight.
#[derive(Debug, Clone, Copy)]
pub struct Quads {
    blocked: Blocked,
}

impl Quads {
    /// On `vpmaddubsw`, if this CPU has AVX2.
    pub fn avx2() -> Option<Quads> {
        Blocked::new().map(|blocked| Quads { blocked })
    }

    /// On VNNI, if this CPU has AVX2 and AVX-512 VNNI (with F, BW and VL).
    pub fn vnni() -> Option<Quads> {
        Blocked::with_vnni().map(|blocked| Quads { blocked })
    }
}

impl Int8Gemm for Quads {
    fn name(&self) -> &'static str {
        self.blocked.quads_name()
    }

    fn gemm(&self, m: usize, n: usize, k: usize, a: &[u8], b: &[i8], c: &mut [i32]) {
        check_shapes(m, n, k, a, b, c);
        let Some(packed) = self.blocked.pack_quads(n, k, b) else {
            return self.blocked.gemm(m, n, k, a, b, c);
        };
        let a4 = quads_of(a, k, packed.quads());
        self.blocked
            .gemm_quads_with(m, &packed, &a4, c, n, &copy_sums);
    }
}

/// Rows `[m, k]` of u8 padded with zeros to `[m, 4 · quads]`.
pub fn quads_of(a: &[u8], k: usize, quads: usize) -> Vec<u8> {
    if k == 4 * quads {
        return a.to_vec();
    }
    let mut out = vec![0u8; a.len() / k.max(1) * 4 * quads];
    for (src, dst) in a
        .chunks_exact(k.max(1))
        .zip(out.chunks_exact_mut(4 * quads))
    {
        dst[..k].copy_from_slice(src);
    }
    out
}

/// One value of [`quantize_u8`]: `trunc(min(max(x · inverse + offset, lo), hi))`, `inverse`
/// being `1 / scale`: a multiply, not a division, which is several times slower and would be
/// the slowest step of an int8 layer's epilogue (a value within an ulp of a rounding boundary
/// may land on the other code than `x / scale` gives; neither is more right). `max` comes
/// before `min` so that a NaN comes out as `lo`; `lo` ≥ 0 and `hi` < 256 are the caller's.
#[inline]
pub fn round_u8(x: f32, inverse: f32, offset: f32, lo: f32, hi: f32) -> u8 {
    let t = (x * inverse + offset).max(lo).min(hi);
    // Truncation; `as` saturates (and sends NaN to 0), so bounds outside [0, 256) given by a
    // caller cannot make it undefined.
    t as u8
}

/// `out[i] = trunc(min(max(x[i] · inverse + offset, lo), hi))` as `u8`: the rounding of
/// `compress::quantize::Quantizer::quantize_u8` over a whole input (`offset` = zero point +
/// 0.5, `lo` ≥ 0, `hi` < 256), eight values per AVX2 instruction where the CPU has it and the
/// same scalar steps elsewhere: both give the same bytes (IEEE multiplication and addition,
/// NaN to `lo` by the order of `max` and `min`, truncation).
pub fn quantize_u8(x: &[f32], inverse: f32, offset: f32, lo: f32, hi: f32, out: &mut [u8]) {
    assert_eq!(x.len(), out.len(), "int8 quantize: lengths differ");
    assert!(lo >= 0.0 && hi < 256.0, "int8 quantize: range outside u8");
    let scalar = |x: &[f32], out: &mut [u8]| {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = round_u8(v, inverse, offset, lo, hi);
        }
    };
    #[cfg(target_arch = "x86_64")]
    if Avx2::new().is_some() {
        let whole = x.len() / 32 * 32;
        // SAFETY: AVX2 is present; the vector loop reads and writes `whole` elements.
        unsafe { avx2::quantize(&x[..whole], inverse, offset, lo, hi, &mut out[..whole]) };
        scalar(&x[whole..], &mut out[whole..]);
        return;
    }
    scalar(x, out);
}

/// Every path this machine can run, the reference first.
pub fn available() -> Vec<Box<dyn Int8Gemm>> {
    let mut out: Vec<Box<dyn Int8Gemm>> = vec![Box::new(Reference), Box::new(Portable)];
    if let Some(k) = Avx2::new() {
        out.push(Box::new(k));
    }
    if let Some(k) = Blocked::new() {
        out.push(Box::new(k));
    }
    if let Some(k) = Quads::avx2() {
        out.push(Box::new(k));
    }
    if let Some(k) = Quads::vnni() {
        out.push(Box::new(k));
    }
    out
}

/// The fastest path this machine has (detected once, at first use).
pub fn best() -> &'static dyn Int8Gemm {
    static BEST: std::sync::OnceLock<Box<dyn Int8Gemm>> = std::sync::OnceLock::new();
    BEST.get_or_init(|| match Avx2::new() {
        Some(k) => Box::new(k),
        None => Box::new(Portable),
    })
    .as_ref()
}

/// How sums become an int8 layer's output (Jacob et al. 2018, eq. 7, with the input's zero
/// point and the bias folded into `offsets`): channel `o`'s value is `y = sum · scales[o] +
/// offsets[o]` (a multiply, then an add: no fused multiply-add, so that every path rounds
/// alike), `max(y, 0)` with ReLU. [`Dequant::codes`] goes on to the next layer's input codes
/// with [`round_u8`] (requantization fused into the epilogue), [`Dequant::values`] stops at
/// `y`. Both take one panel of a row (16 lanes, channels `16 p ..`) and give the same results
/// on the AVX2 path as on the scalar one.
#[derive(Debug, Clone, Copy)]
pub struct Dequant<'a> {
    /// Per channel, padded with zeros to a multiple of 16.
    pub scales: &'a [f32],
    pub offsets: &'a [f32],
    pub relu: bool,
}

/// The rounding of [`round_u8`]: `trunc(min(max(y · inverse + offset, lo), hi))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rounding {
    /// `1 / scale`.
    pub inverse: f32,
    pub offset: f32,
    pub lo: f32,
    pub hi: f32,
}

impl Dequant<'_> {
    fn value(&self, o: usize, sum: i32) -> f32 {
        let y = sum as f32 * self.scales[o] + self.offsets[o];
        if self.relu { y.max(0.0) } else { y }
    }

    /// What the vector path of [`Dequant::codes`] relies on: scales and offsets for `panels`
    /// whole panels, and a rounding into u8.
    fn check(&self, panels: usize, next: Rounding) {
        assert!(
            self.scales.len() >= panels * PANEL && self.offsets.len() >= panels * PANEL,
            "int8 epilogue: scales and offsets are not padded to whole panels"
        );
        assert!(
            next.lo >= 0.0 && next.hi < 256.0,
            "int8 epilogue: range outside u8"
        );
    }

    /// The values of panel `p` of one row: `out` is its first `out.len()` (≤ 16) channels.
    pub fn values(&self, p: usize, lanes: &[i32; PANEL], out: &mut [f32]) {
        // Slices of one length, zipped: a loop the compiler vectorises.
        let (o0, w) = (p * PANEL, out.len());
        let (scales, offsets) = (&self.scales[o0..o0 + w], &self.offsets[o0..o0 + w]);
        for (((out, &sum), &s), &o) in out.iter_mut().zip(&lanes[..w]).zip(scales).zip(offsets) {
            let y = sum as f32 * s + o;
            *out = if self.relu { y.max(0.0) } else { y };
        }
    }

    /// The codes of panel `p` of one row under `next`'s rounding: `out` is its first
    /// `out.len()` (≤ 16) channels.
    pub fn codes(&self, p: usize, lanes: &[i32; PANEL], next: Rounding, out: &mut [u8]) {
        self.check(p + 1, next);
        #[cfg(target_arch = "x86_64")]
        if Avx2::new().is_some() {
            let mut bytes = [0u8; PANEL];
            // SAFETY: AVX2 is present; the scales and offsets hold panel p (asserted above).
            unsafe {
                let v = avx2::requantize::<2>(self, p, lanes, next);
                std::arch::x86_64::_mm_storeu_si128(bytes.as_mut_ptr().cast(), v);
            }
            for (o, &b) in out.iter_mut().zip(&bytes) {
                *o = b;
            }
            return;
        }
        self.codes_scalar(p, lanes, next, out);
    }

    /// [`Dequant::values`] of every row of a task's sums: `out` is `[rows, n]`.
    pub fn values_rows(&self, sums: &Sums, out: &mut [f32]) {
        for (r, row) in out.chunks_exact_mut(sums.n).enumerate() {
            for (p, o) in row.chunks_mut(PANEL).enumerate() {
                self.values(p, sums.panel(r, p), o);
            }
        }
    }

    /// [`Dequant::codes`] of every row of a task's sums: `out` is `[rows, n]`.
    pub fn codes_rows(&self, sums: &Sums, next: Rounding, out: &mut [u8]) {
        let n = sums.n;
        assert_eq!(
            out.len(),
            sums.rows * n,
            "int8 epilogue: out is not [rows, n]"
        );
        self.check(n.div_ceil(PANEL), next);
        #[cfg(target_arch = "x86_64")]
        if Avx2::new().is_some() {
            // SAFETY: AVX2 is present; the lengths are asserted above.
            unsafe { avx2::requantize_rows(self, sums, next, out) };
            return;
        }
        for (r, row) in out.chunks_exact_mut(n).enumerate() {
            for (p, o) in row.chunks_mut(PANEL).enumerate() {
                self.codes_scalar(p, sums.panel(r, p), next, o);
            }
        }
    }

    /// [`Dequant::codes`] one value at a time (the path off x86-64; tests hold the AVX2 path
    /// to it).
    pub fn codes_scalar(&self, p: usize, lanes: &[i32; PANEL], next: Rounding, out: &mut [u8]) {
        let o0 = p * PANEL;
        for (l, (out, &sum)) in out.iter_mut().zip(lanes).enumerate() {
            let y = self.value(o0 + l, sum);
            *out = round_u8(y, next.inverse, next.offset, next.lo, next.hi);
        }
    }
}
