//! The blocked kernel's tiles on AVX-512 VNNI: `vpdpbusd` multiplies four u8 by four i8 and
//! adds the four products to a 32-bit lane in one instruction. The products (at most
//! 255 · 128 in magnitude) are summed in 32 bits without saturation, so it is exact for every
//! int8 weight, and it does in one instruction what AVX2 does in three (`vpmaddubsw`,
//! `vpmaddwd` by ones, `vpaddd`) for 7-bit weights only.
//!
//! The tiles read the quads layout of [`super::PackedQuads`] unchanged: a group of a whole
//! panel is 16 channels × 4 steps = 64 bytes, one 512-bit register, and a narrow panel's is
//! 32 bytes, one 256-bit register (the EVEX form, AVX-512 VL).

use super::{PANEL, Pairs};
use std::arch::x86_64::*;

/// Rows of a tile: 12 accumulators, the panel's register and the broadcast fit in AVX-512's
/// 32 registers with room to spare, and each weight load is shared by 12 rows.
pub const ROWS: usize = 12;

/// Whether this CPU has what the tiles use: AVX-512 F, BW and VL, and VNNI.
pub fn detected() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// One tile: `R` rows (their starts in `rows`) against one whole panel (64 bytes per group),
/// over all `groups` groups of four reduction steps; the sums go to `out` as `R` rows of 16.
///
/// # Safety
/// AVX-512 F, BW, VL and VNNI ([`detected`]); every group `src` places after those rows'
/// starts must be readable, `panel` must hold `groups · 64` bytes and `out` `R · 16` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn tile_wide<const R: usize, P: Pairs>(
    src: &P,
    rows: &[*const u8; R],
    panel: *const u8,
    groups: usize,
    out: *mut i32,
) {
    let mut acc = [_mm512_setzero_si512(); R];
    for q in 0..groups {
        let off = src.offset(q);
        // SAFETY: the caller's: the panel holds `groups` registers, and every row's group `q`
        // lies in `src`.
        unsafe {
            let b = _mm512_loadu_si512(panel.add(64 * q).cast());
            for (acc, row) in acc.iter_mut().zip(rows) {
                let a = _mm512_set1_epi32(std::ptr::read_unaligned(row.add(off).cast::<i32>()));
                *acc = _mm512_dpbusd_epi32(*acc, a, b);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: `out` holds `R` rows of 16 lanes.
        unsafe { _mm512_storeu_si512(out.add(r * PANEL).cast(), *acc) };
    }
}

/// [`tile_wide`] for a narrow last panel (8 channels, 32 bytes per group): lanes 8..16 of
/// each row of `out` are left as they were.
///
/// # Safety
/// As [`tile_wide`], with a panel of `groups · 32` bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn tile_narrow<const R: usize, P: Pairs>(
    src: &P,
    rows: &[*const u8; R],
    panel: *const u8,
    groups: usize,
    out: *mut i32,
) {
    let mut acc = [_mm256_setzero_si256(); R];
    for q in 0..groups {
        let off = src.offset(q);
        // SAFETY: as in `tile_wide`.
        unsafe {
            let b = _mm256_loadu_si256(panel.add(32 * q).cast());
            for (acc, row) in acc.iter_mut().zip(rows) {
                let a = _mm256_set1_epi32(std::ptr::read_unaligned(row.add(off).cast::<i32>()));
                *acc = _mm256_dpbusd_epi32(*acc, a, b);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: `out` holds `R` rows of 16 lanes.
        unsafe { _mm256_storeu_si256(out.add(r * PANEL).cast(), *acc) };
    }
}

/// The rows that start at `starts` against one panel (`wide`: 16 channels, else 8): tiles of
/// [`ROWS`], then of 4, then single rows.
///
/// # Safety
/// As [`tile_wide`] / [`tile_narrow`], for every row.
#[inline]
pub unsafe fn panel_tiles<P: Pairs>(
    src: &P,
    starts: &[*const u8],
    wide: bool,
    panel: &[u8],
    groups: usize,
    out: &mut [i32],
) {
    let rows = starts.len();
    let width = if wide { 64 } else { 32 };
    assert!(panel.len() >= groups * width && out.len() >= rows * PANEL);
    let (b, o) = (panel.as_ptr(), out.as_mut_ptr());
    let mut r = 0;
    // SAFETY: the caller's, and the asserts above.
    #[allow(clippy::int_plus_one)] // `r + R <= rows` reads as "a whole tile fits", for R = 1 too
    unsafe {
        macro_rules! tiles {
            ($r:expr) => {
                while r + $r <= rows {
                    let tile: &[*const u8; $r] = starts[r..r + $r].try_into().expect("a tile");
                    if wide {
                        tile_wide::<$r, P>(src, tile, b, groups, o.add(r * PANEL));
                    } else {
                        tile_narrow::<$r, P>(src, tile, b, groups, o.add(r * PANEL));
                    }
                    r += $r;
                }
            };
        }
        tiles!(ROWS);
        tiles!(4);
        tiles!(1);
    }
}
