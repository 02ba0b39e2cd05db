//! The AVX-512 path: counts of differing bits with `vpopcntq` (AVX-512 VPOPCNTDQ), which counts
//! the bits of each 64-bit lane in one instruction, eight words a register. Per pair of
//! registers that is an XOR, the count and an add, where AVX2's nibble tables take about a
//! dozen operations per half as many bits (`avx2.rs`).
//!
//! Rows of the convolution are whole 4-word vectors ([`super::convolution`]), so a row's last
//! 512-bit step may be half a register: it is loaded with a mask, whose lanes past the row read
//! as zero and count nothing.
//!
//! Everything here runs only inside functions compiled with `avx512f`, `avx512vpopcntdq` (and
//! `avx2`, `popcnt`) enabled and called where [`super::Path::Avx512`] runs.

use super::XorCount;
use std::arch::x86_64::*;

pub(super) struct Avx512Count;

/// Words in one register.
const LANES: usize = 8;

/// The mask of the `n - v` (at most 8) words left from word `v`.
#[inline(always)]
fn mask(n: usize, v: usize) -> __mmask8 {
    let left = n - v;
    if left >= LANES {
        0xff
    } else {
        (1u8 << left) - 1
    }
}

/// Words `v ..` of `s` (those before `s.len()` under `m`, zeros in the other lanes).
#[inline(always)]
unsafe fn load(s: &[u64], v: usize, m: __mmask8) -> __m512i {
    // SAFETY: see the module doc; the mask covers only words inside `s`.
    unsafe { _mm512_maskz_loadu_epi64(m, s.as_ptr().add(v).cast()) }
}

/// The totals of eight accumulators of 64-bit lanes, `[Σ acc[0], …, Σ acc[7]]`, by a
/// transposing tree (pairs of lanes unpacked and added, then 128-bit lanes shuffled and added
/// twice): 21 operations where eight separate reductions take about 50.
#[inline(always)]
unsafe fn totals(acc: [__m512i; 8]) -> [u32; 8] {
    // SAFETY: see the module doc.
    unsafe {
        // Per 128-bit lane `i`: (acc[j][2i] + acc[j][2i + 1], the same of acc[j + 1]).
        let pair = |a: __m512i, b: __m512i| {
            _mm512_add_epi64(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
        };
        // Lanes [x.0 + x.1, x.2 + x.3, y.0 + y.1, y.2 + y.3].
        let fold = |x: __m512i, y: __m512i| {
            _mm512_add_epi64(
                _mm512_shuffle_i64x2::<0b10_00_10_00>(x, y),
                _mm512_shuffle_i64x2::<0b11_01_11_01>(x, y),
            )
        };
        let t = fold(pair(acc[0], acc[1]), pair(acc[2], acc[3]));
        let u = fold(pair(acc[4], acc[5]), pair(acc[6], acc[7]));
        // Each total is under 2^32 (a row's bits), so narrowing keeps it.
        std::mem::transmute::<__m256i, [u32; 8]>(_mm512_cvtepi64_epi32(fold(t, u)))
    }
}

impl XorCount for Avx512Count {
    #[inline(always)]
    fn count(a: &[u64], b: &[u64]) -> u32 {
        let n = a.len().min(b.len());
        // SAFETY: see the module doc; masked loads stay within `a[..n]`, `b[..n]`.
        unsafe {
            let mut acc = _mm512_setzero_si512();
            let mut v = 0;
            while v < n {
                let m = mask(n, v);
                let x = _mm512_xor_si512(load(a, v, m), load(b, v, m));
                acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(x));
                v += LANES;
            }
            _mm512_reduce_add_epi64(acc) as u32
        }
    }

    /// Two rows against four filters, eight words at a time: each word of the six rows is
    /// loaded once, the eight counts stay in registers as 64-bit lanes, and one [`totals`]
    /// tree reduces them.
    #[inline(always)]
    fn tile(a: [&[u64]; 2], b: [&[u64]; 4]) -> [[u32; 4]; 2] {
        let n = a[0].len();
        debug_assert!(a[1].len() == n && b.iter().all(|r| r.len() == n));
        // SAFETY: see the module doc; masked loads stay within the rows.
        unsafe {
            // Row r against filter f in `acc[4 r + f]`, the order `totals` keeps.
            let mut acc = [_mm512_setzero_si512(); 8];
            let mut v = 0;
            while v < n {
                let m = mask(n, v);
                let x = [load(a[0], v, m), load(a[1], v, m)];
                for f in 0..4 {
                    let w = load(b[f], v, m);
                    for r in 0..2 {
                        let d = _mm512_popcnt_epi64(_mm512_xor_si512(x[r], w));
                        acc[4 * r + f] = _mm512_add_epi64(acc[4 * r + f], d);
                    }
                }
                v += LANES;
            }
            let t = totals(acc);
            [[t[0], t[1], t[2], t[3]], [t[4], t[5], t[6], t[7]]]
        }
    }
}
