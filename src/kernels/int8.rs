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
//! - [`Avx2`]: widens `a` and `b` to 16 bits and multiplies with `vpmaddwd` into 32-bit lanes.
//!   The faster `vpmaddubsw` (u8 × i8 straight to 16 bits) adds pairs of products in 16 bits
//!   with saturation, and 2 · 255 · 127 = 64,770 does not fit in 32,767: it is only exact for
//!   7-bit weights. The widening path is exact for every int8 weight.
//!
//! AVX-512 VNNI (`vpdpbusd`) is not written yet: no machine this project runs on has it, so it
//! could not be tested.

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

    /// `out = a · bᵀ` for rows `first .. first + rows` (up to `ROWS`) of `src`; `out` is
    /// `rows × b.n`. Full blocks of `ROWS` rows run the unrolled kernel; the rows left over run
    /// it one at a time.
    ///
    /// # Safety
    /// AVX2, and `src` must hold every pair of those rows.
    #[target_feature(enable = "avx2")]
    pub unsafe fn blocked<P: super::Pairs>(
        src: &P,
        first: usize,
        rows: usize,
        b: &super::PackedB,
        out: &mut [i32],
    ) {
        use super::ROWS;
        if rows == ROWS {
            // SAFETY: forwarded from the caller.
            unsafe { block::<ROWS, P>(src, first, b, out) };
        } else {
            let n = b.n;
            for r in 0..rows {
                // SAFETY: as above.
                unsafe { block::<1, P>(src, first + r, b, &mut out[r * n..(r + 1) * n]) };
            }
        }
    }

    /// `R` rows against every panel; `R` is a constant so that the `2 R` accumulators live in
    /// registers.
    #[target_feature(enable = "avx2")]
    unsafe fn block<const R: usize, P: super::Pairs>(
        src: &P,
        first: usize,
        b: &super::PackedB,
        out: &mut [i32],
    ) {
        use super::PANEL;
        let (n, pairs) = (b.n, b.pairs);
        assert!(out.len() == R * n);
        assert!(b.data.len() >= n.div_ceil(PANEL) * pairs * PANEL * 2);
        for p in 0..n.div_ceil(PANEL) {
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            let width = PANEL.min(n - p * PANEL);
            // SAFETY: the asserts above bound every offset: panel p holds `pairs` steps of
            // 2 * PANEL i16 (two 256-bit loads); the caller vouches for `src`'s rows.
            unsafe {
                let panel = b.data.as_ptr().add(p * pairs * PANEL * 2);
                if width > PANEL / 2 {
                    for q in 0..pairs {
                        let ptr = panel.add(q * PANEL * 2);
                        let b0 = _mm256_loadu_si256(ptr.cast());
                        let b1 = _mm256_loadu_si256(ptr.add(16).cast());
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let av = _mm256_set1_epi32(src.get(first + r, q));
                            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(av, b0));
                            acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(av, b1));
                        }
                    }
                } else {
                    // A last panel of at most 8 channels: its upper half is padding, so one
                    // register of them (LeNet-5's 20 and 50 channels end so).
                    for q in 0..pairs {
                        let b0 = _mm256_loadu_si256(panel.add(q * PANEL * 2).cast());
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let av = _mm256_set1_epi32(src.get(first + r, q));
                            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(av, b0));
                        }
                    }
                }
            }
            let first = p * PANEL;
            for (r, acc) in acc.iter().enumerate() {
                let mut lanes = [0i32; PANEL];
                // SAFETY: `lanes` holds 16 i32, two 256-bit stores.
                unsafe {
                    _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc[0]);
                    _mm256_storeu_si256(lanes.as_mut_ptr().add(8).cast(), acc[1]);
                }
                out[r * n + first..r * n + first + width].copy_from_slice(&lanes[..width]);
            }
        }
    }

    /// [`super::quantize_u8`] on a multiple of 32 values.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize(x: &[f32], scale: f32, offset: f32, lo: f32, hi: f32, out: &mut [u8]) {
        debug_assert!(x.len().is_multiple_of(32) && out.len() == x.len());
        let (s, o, l, h) = (
            _mm256_set1_ps(scale),
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
                let t = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(_mm256_div_ps(f, s), o), l), h);
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

/// Weights packed for [`Avx2Blocked`]: panels of 16 output channels; within a panel, for each
/// pair of reduction steps `(2q, 2q + 1)`, the 16 channels' two values widened to `i16`, in the
/// order `vpmaddwd` pairs them (channel 0's two, channel 1's two, ...). Channels past `n` and a
/// last odd step are zero. Packed once per layer, since weights do not change.
#[derive(Debug, Clone)]
pub struct PackedB {
    n: usize,
    k: usize,
    /// Pairs of reduction steps: `ceil(k / 2)`.
    pairs: usize,
    data: Vec<i16>,
}

/// Output channels per panel of [`PackedB`] (two 256-bit registers of eight i32 sums).
const PANEL: usize = 16;
/// Rows of `a` per block of the blocked kernel: 4 rows × 2 registers = 8 accumulators.
const ROWS: usize = 4;

impl PackedB {
    /// Packs `b` (`[n, k]` row-major).
    pub fn new(n: usize, k: usize, b: &[i8]) -> PackedB {
        assert_eq!(b.len(), n * k, "int8 pack: b is not [n, k]");
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0i16; panels * pairs * PANEL * 2];
        for p in 0..panels {
            for q in 0..pairs {
                let base = (p * pairs + q) * PANEL * 2;
                for c in 0..PANEL {
                    let ch = p * PANEL + c;
                    if ch >= n {
                        continue;
                    }
                    for t in 0..2 {
                        let step = 2 * q + t;
                        if step < k {
                            data[base + 2 * c + t] = b[ch * k + step] as i16;
                        }
                    }
                }
            }
        }
        PackedB { n, k, pairs, data }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Pairs of reduction steps per row: `ceil(k / 2)`.
    pub fn pairs(&self) -> usize {
        self.pairs
    }
}

/// AVX2, register-blocked: 4 rows of `a` against 16 output channels at a time, each pair of `a`
/// values broadcast and multiplied by `vpmaddwd` against the packed weights (exact, like
/// [`Avx2`]), 16 products per instruction with every load reused four or sixteen times. For
/// batches of at least 4 rows; [`Int8Gemm::gemm`] packs `b` on every call, so a layer keeps a
/// [`PackedB`] and calls [`Avx2Blocked::gemm_packed`].
#[derive(Debug, Clone, Copy)]
pub struct Avx2Blocked {
    _private: (),
}

impl Avx2Blocked {
    /// The blocked AVX2 path, if this CPU has AVX2.
    pub fn new() -> Option<Avx2Blocked> {
        Avx2::new().map(|_| Avx2Blocked { _private: () })
    }

    /// `c = a · bᵀ` with `b` packed.
    pub fn gemm_packed(&self, m: usize, b: &PackedB, a: &[u8], c: &mut [i32]) {
        let (n, k) = (b.n, b.k);
        assert!(
            k <= MAX_K,
            "int8 gemm: k = {k} could overflow i32 (at most {MAX_K})"
        );
        assert_eq!(a.len(), m * k, "int8 gemm: a is not [m, k]");
        assert_eq!(c.len(), m * n, "int8 gemm: c is not [m, n]");
        if m == 0 || n == 0 {
            return;
        }
        // Pairs of `a` as the i32 that `vpmaddwd` reads as two i16: (a[2q], a[2q + 1]).
        let pairs = b.pairs;
        let mut a2 = Vec::with_capacity(m * pairs);
        for row in a.chunks_exact(k.max(1)) {
            let mut it = row.chunks_exact(2);
            a2.extend(it.by_ref().map(|p| p[0] as i32 | ((p[1] as i32) << 16)));
            if let [last] = it.remainder() {
                a2.push(*last as i32);
            }
        }
        self.gemm_pairs(m, b, &a2, c);
    }

    /// [`Avx2Blocked::gemm_packed`] on rows already widened to pairs: row `i` of `a2` is
    /// `b.pairs()` values `a[i][2q] | a[i][2q + 1] << 16` (a last odd step paired with 0), which
    /// is the row's u8 values widened to `u16` read as `i32` on this little-endian target. A
    /// producer of rows (the int8 convolution's im2col) writes them so, skipping a pass.
    pub fn gemm_pairs(&self, m: usize, b: &PackedB, a2: &[i32], c: &mut [i32]) {
        let (n, k, pairs) = (b.n, b.k, b.pairs);
        assert!(
            k <= MAX_K,
            "int8 gemm: k = {k} could overflow i32 (at most {MAX_K})"
        );
        assert_eq!(a2.len(), m * pairs, "int8 gemm: a2 is not [m, pairs]");
        assert_eq!(c.len(), m * n, "int8 gemm: c is not [m, n]");
        if m == 0 || n == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use rayon::prelude::*;
            let run = |(block, out): (usize, &mut [i32])| {
                let rows = out.len() / n;
                let src = Contiguous { a2, pairs };
                // SAFETY: an `Avx2Blocked` exists only where the CPU has AVX2; `a2` holds
                // `m × pairs` values, as asserted above.
                unsafe { avx2::blocked(&src, block * ROWS, rows, b, out) }
            };
            if m * n * k >= 1 << 18 && m > ROWS {
                c.par_chunks_mut(ROWS * n).enumerate().for_each(run);
            } else {
                c.chunks_mut(ROWS * n).enumerate().for_each(run);
            }
        }
    }
}

impl Avx2Blocked {
    /// `c = a · bᵀ` where row `i`'s pair `q` is the two `u16` at `a[bases[i] + offsets[q]]`
    /// (read as one `i32`, as in [`Avx2Blocked::gemm_pairs`]; `vpmaddwd` reads them as signed
    /// 16-bit values, so they must be codes of at most 255 for [`MAX_K`] to hold). An int8 convolution reads its
    /// patches so straight from the widened, padded input (`offsets` walk the window, `bases`
    /// the output positions): no im2col buffer.
    pub fn gemm_gathered(
        &self,
        bases: &[usize],
        offsets: &[usize],
        a: &[u16],
        b: &PackedB,
        c: &mut [i32],
    ) {
        let (n, k, m) = (b.n, b.k, bases.len());
        assert!(
            k <= MAX_K,
            "int8 gemm: k = {k} could overflow i32 (at most {MAX_K})"
        );
        assert_eq!(offsets.len(), b.pairs, "int8 gemm: one offset per pair");
        assert_eq!(c.len(), m * n, "int8 gemm: c is not [m, n]");
        if m == 0 || n == 0 || offsets.is_empty() {
            c.fill(0);
            return;
        }
        let reach = bases
            .iter()
            .max()
            .and_then(|b| b.checked_add(*offsets.iter().max()?))
            .and_then(|r| r.checked_add(2));
        assert!(
            reach.is_some_and(|r| r <= a.len()),
            "int8 gemm: a gathered pair lies outside a"
        );
        #[cfg(target_arch = "x86_64")]
        {
            use rayon::prelude::*;
            let src = Gathered { a, bases, offsets };
            let run = |(block, out): (usize, &mut [i32])| {
                let rows = out.len() / n;
                // SAFETY: an `Avx2Blocked` exists only where the CPU has AVX2; every pair read
                // lies inside `a`, as asserted above.
                unsafe { avx2::blocked(&src, block * ROWS, rows, b, out) }
            };
            if m * n * k >= 1 << 18 && m > ROWS {
                c.par_chunks_mut(ROWS * n).enumerate().for_each(run);
            } else {
                c.chunks_mut(ROWS * n).enumerate().for_each(run);
            }
        }
    }
}

/// Where the blocked kernel reads row `r`'s pair `q` of reduction steps.
trait Pairs: Sync {
    /// # Safety
    /// `(r, q)` must be a pair the source holds.
    unsafe fn get(&self, r: usize, q: usize) -> i32;
}

/// Rows of pairs one after another, `pairs` each.
struct Contiguous<'a> {
    a2: &'a [i32],
    pairs: usize,
}

impl Pairs for Contiguous<'_> {
    #[inline(always)]
    unsafe fn get(&self, r: usize, q: usize) -> i32 {
        // SAFETY: the caller's.
        unsafe { *self.a2.get_unchecked(r * self.pairs + q) }
    }
}

/// Pairs gathered from one buffer of `u16` (see [`Avx2Blocked::gemm_gathered`]).
struct Gathered<'a> {
    a: &'a [u16],
    bases: &'a [usize],
    offsets: &'a [usize],
}

impl Pairs for Gathered<'_> {
    #[inline(always)]
    unsafe fn get(&self, r: usize, q: usize) -> i32 {
        // SAFETY: the caller's: `bases[r] + offsets[q] + 2 <= a.len()`.
        unsafe {
            let at = self.bases.get_unchecked(r) + self.offsets.get_unchecked(q);
            std::ptr::read_unaligned(self.a.as_ptr().add(at).cast::<i32>())
        }
    }
}

impl Int8Gemm for Avx2Blocked {
    fn name(&self) -> &'static str {
        "avx2-blocked"
    }

    fn gemm(&self, m: usize, n: usize, k: usize, a: &[u8], b: &[i8], c: &mut [i32]) {
        check_shapes(m, n, k, a, b, c);
        self.gemm_packed(m, &PackedB::new(n, k, b), a, c);
    }
}

/// One value of [`quantize_u8`]: `trunc(min(max(x / scale + offset, lo), hi))`. `max` comes
/// before `min` so that a NaN comes out as `lo`; `lo` ≥ 0 and `hi` < 256 are the caller's.
#[inline]
pub fn round_u8(x: f32, scale: f32, offset: f32, lo: f32, hi: f32) -> u8 {
    let t = (x / scale + offset).max(lo).min(hi);
    // Truncation; `as` saturates (and sends NaN to 0), so bounds outside [0, 256) given by a
    // caller cannot make it undefined.
    t as u8
}

/// `out[i] = trunc(min(max(x[i] / scale + offset, lo), hi))` as `u8`: the rounding of
/// `compress::quantize::Quantizer::quantize_u8` over a whole input (`offset` = zero point +
/// 0.5, `lo` ≥ 0, `hi` < 256), eight values per AVX2 instruction where the CPU has it and the
/// same scalar steps elsewhere: both give the same bytes (IEEE division and addition, NaN to
/// `lo` by the order of `max` and `min`, truncation).
pub fn quantize_u8(x: &[f32], scale: f32, offset: f32, lo: f32, hi: f32, out: &mut [u8]) {
    assert_eq!(x.len(), out.len(), "int8 quantize: lengths differ");
    assert!(lo >= 0.0 && hi < 256.0, "int8 quantize: range outside u8");
    let scalar = |x: &[f32], out: &mut [u8]| {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = round_u8(v, scale, offset, lo, hi);
        }
    };
    #[cfg(target_arch = "x86_64")]
    if Avx2::new().is_some() {
        let whole = x.len() / 32 * 32;
        // SAFETY: AVX2 is present; the vector loop reads and writes `whole` elements.
        unsafe { avx2::quantize(&x[..whole], scale, offset, lo, hi, &mut out[..whole]) };
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
    if let Some(k) = Avx2Blocked::new() {
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
