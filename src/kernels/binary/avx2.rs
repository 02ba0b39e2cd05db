//! The AVX2 path: counts of differing bits with `vpshufb` nibble tables (Muła, Kurz and
//! Lemire 2018, "Faster population counts using AVX2 instructions"), three vectors at a time
//! through a carry-save adder, and the sign packing of `f32` images with `vcmpps`.
//!
//! Everything here runs only inside functions compiled with `avx2` and `popcnt` enabled and
//! called where [`super::Path::Avx2`] runs.

use super::{CountOnes, XorCount};
use std::arch::x86_64::*;

pub(super) struct Avx2Count;

/// Per-byte popcounts of `x` from the nibble table `table` (which may hold multiples of the
/// counts).
#[inline(always)]
unsafe fn byte_counts(table: __m256i, x: __m256i) -> __m256i {
    // SAFETY: see the module doc.
    unsafe {
        let low = _mm256_set1_epi8(0x0f);
        let lo = _mm256_and_si256(x, low);
        let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
        _mm256_add_epi8(
            _mm256_shuffle_epi8(table, lo),
            _mm256_shuffle_epi8(table, hi),
        )
    }
}

#[inline(always)]
unsafe fn nibble_table() -> __m256i {
    // SAFETY: see the module doc.
    unsafe {
        _mm256_setr_epi8(
            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2,
            3, 3, 4,
        )
    }
}

#[inline(always)]
unsafe fn load(s: &[u64], v: usize) -> __m256i {
    // SAFETY: see the module doc.
    unsafe { _mm256_loadu_si256(s.as_ptr().add(4 * v) as *const __m256i) }
}

/// The four byte-count accumulators' totals, `[Σ acc[0], …, Σ acc[3]]`: `vpsadbw` sums each
/// one's bytes into four 64-bit lanes (each under 2^16), two of them share each 64-bit lane,
/// and unpacking and adding leaves one 32-bit total each.
#[inline(always)]
unsafe fn totals(acc: [__m256i; 4]) -> __m128i {
    // SAFETY: see the module doc.
    unsafe {
        let zero = _mm256_setzero_si256();
        let s = acc.map(|a| _mm256_sad_epu8(a, zero));
        let t01 = _mm256_or_si256(s[0], _mm256_slli_epi64(s[1], 32));
        let t23 = _mm256_or_si256(s[2], _mm256_slli_epi64(s[3], 32));
        let u = _mm256_add_epi32(
            _mm256_unpacklo_epi64(t01, t23),
            _mm256_unpackhi_epi64(t01, t23),
        );
        _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1))
    }
}

impl XorCount for Avx2Count {
    #[inline(always)]
    fn count(a: &[u64], b: &[u64]) -> u32 {
        let n = a.len().min(b.len());
        let vectors = n / 4;
        let mut total = 0u32;
        // SAFETY: see the module doc; loads stay within `a[..n]`, `b[..n]`.
        unsafe {
            let table = nibble_table();
            let mut v = 0;
            // Byte counts grow by at most 8 a vector: 31 vectors fit in a byte.
            while v < vectors {
                let end = (v + 31).min(vectors);
                let mut sums = _mm256_setzero_si256();
                while v < end {
                    let x = _mm256_xor_si256(load(a, v), load(b, v));
                    sums = _mm256_add_epi8(sums, byte_counts(table, x));
                    v += 1;
                }
                let zero = _mm256_setzero_si256();
                total += _mm_cvtsi128_si32(totals([sums, zero, zero, zero])) as u32;
            }
        }
        total + CountOnes::count(&a[4 * vectors..n], &b[4 * vectors..n])
    }

    /// Rows of whole vectors, one at a time ([`row_counts`]).
    #[inline(always)]
    fn tile(a: [&[u64]; 2], b: [&[u64]; 4]) -> [[u32; 4]; 2] {
        // SAFETY: see the module doc.
        unsafe { [row_counts(a[0], b), row_counts(a[1], b)] }
    }
}

/// One row against four filters, all of whole vectors. Three vectors `p, q, s` of one pair go
/// through a carry-save adder, `l = p ⊕ q ⊕ s` and `h = maj(p, q, s)`, so that
/// `popcount(p) + popcount(q) + popcount(s) = popcount(l) + 2 · popcount(h)`: two table
/// lookups where three were, and five logic operations, which every vector port runs, in
/// place of shuffles and shifts, which only two do (Harley and Seal's adder, as in Muła, Kurz
/// and Lemire, section 4). One row at a time keeps the four accumulators, the row's three
/// vectors and the tables in registers.
#[inline(always)]
unsafe fn row_counts(a: &[u64], b: [&[u64]; 4]) -> [u32; 4] {
    let n = a.len();
    debug_assert!(n.is_multiple_of(4) && b.iter().all(|r| r.len() == n));
    let vectors = n / 4;
    // SAFETY: see the module doc; every row holds `4 · vectors` words.
    unsafe {
        let table = nibble_table();
        let doubled = _mm256_add_epi8(table, table);
        let zero = _mm256_setzero_si256();
        let mut out = _mm_setzero_si128();
        let mut v = 0;
        while v < vectors {
            // Byte counts grow by at most 8 a vector: 30 vectors (ten adders) fit.
            let end = (v + 30).min(vectors);
            let mut acc = [zero; 4];
            while v + 3 <= end {
                let x = [load(a, v), load(a, v + 1), load(a, v + 2)];
                for f in 0..4 {
                    let p = _mm256_xor_si256(x[0], load(b[f], v));
                    let q = _mm256_xor_si256(x[1], load(b[f], v + 1));
                    let s = _mm256_xor_si256(x[2], load(b[f], v + 2));
                    let u = _mm256_xor_si256(p, q);
                    let l = _mm256_xor_si256(u, s);
                    let h = _mm256_or_si256(_mm256_and_si256(p, q), _mm256_and_si256(u, s));
                    acc[f] = _mm256_add_epi8(
                        acc[f],
                        _mm256_add_epi8(byte_counts(table, l), byte_counts(doubled, h)),
                    );
                }
                v += 3;
            }
            while v < end {
                let x = load(a, v);
                for f in 0..4 {
                    let d = _mm256_xor_si256(x, load(b[f], v));
                    acc[f] = _mm256_add_epi8(acc[f], byte_counts(table, d));
                }
                v += 1;
            }
            out = _mm_add_epi32(out, totals(acc));
        }
        std::mem::transmute::<__m128i, [u32; 4]>(out)
    }
}

/// Packs one image `[C, plane]` channels last into `out` (`[plane, words]`, zeroed), bit `c`
/// of a pixel's word `c / 64` set for `x >= 0`: eight pixels at a time, each channel's
/// comparison mask ANDed with its bit and ORed into two registers of 32-bit halves, which are
/// then interleaved into the eight pixels' words.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn pack_image(image: &[f32], channels: usize, plane: usize, out: &mut [u64]) {
    // SAFETY: see the module doc.
    unsafe {
        let words = channels.div_ceil(64);
        debug_assert!(image.len() == channels * plane && out.len() == plane * words);
        let blocks = plane / 8;
        let zero = _mm256_setzero_ps();
        for j in 0..words {
            let first = 64 * j;
            let last = (first + 64).min(channels);
            // The loop below reads 64 channel planes at once, more streams than the hardware
            // prefetchers follow: bring the group's planes into L2 in one sequential pass.
            let group = &image[first * plane..last * plane];
            for line in (0..group.len()).step_by(16) {
                _mm_prefetch::<_MM_HINT_T1>(group.as_ptr().add(line) as *const i8);
            }
            for block in 0..blocks {
                let p0 = 8 * block;
                let half = |from: usize, to: usize| {
                    let mut bits = _mm256_setzero_si256();
                    let mut bit = _mm256_set1_epi32(1);
                    for c in from..to {
                        let v = _mm256_loadu_ps(image.as_ptr().add(c * plane + p0));
                        let mask = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(v, zero));
                        bits = _mm256_or_si256(bits, _mm256_and_si256(mask, bit));
                        bit = _mm256_add_epi32(bit, bit);
                    }
                    bits
                };
                let middle = (first + 32).min(last);
                let halves = [half(first, middle), half(middle, last)];
                // Per 128-bit lane: pixels (0, 1 | 4, 5) and (2, 3 | 6, 7) as whole words.
                let even = _mm256_unpacklo_epi32(halves[0], halves[1]);
                let odd = _mm256_unpackhi_epi32(halves[0], halves[1]);
                let pixels: [u64; 8] = std::mem::transmute([
                    _mm256_permute2x128_si256::<0x20>(even, odd),
                    _mm256_permute2x128_si256::<0x31>(even, odd),
                ]);
                for (k, &word) in pixels.iter().enumerate() {
                    out[(p0 + k) * words + j] = word;
                }
            }
            for p in 8 * blocks..plane {
                out[p * words + j] = (first..last).fold(0u64, |word, c| {
                    word | ((image[c * plane + p] >= 0.0) as u64) << (c - first)
                });
            }
        }
    }
}
