//! XNOR-popcount kernels for binary layers (issue #13). Values in {−1, +1} are stored one bit
//! each, 1 for +1 and 0 for −1, and a dot product of `k` of them is `k − 2·popcount(a ⊕ b)`:
//! the positions where the signs differ count −1, the others +1 (Rastegari et al. 2016,
//! "XNOR-Net", section 3.2, with ⊕ in place of XNOR, which saves the complement).
//!
//! Words are 64 bits. A row (a GEMM operand's row, or a convolution window's taps × channels)
//! is padded to whole words with 0 bits in every operand, so padding bits agree and ⊕ leaves
//! them out of the count; the dot product uses the true length. The convolution
//! ([`conv`], in `convolution.rs`) packs each window's bits densely, tap after tap, and its
//! rows in whole aligned vectors.
//!
//! The count runs on one of three paths, chosen at run time ([`Path::best`]), each beside the
//! plain [`Path::Reference`] (which multiplies unpacked ±1 values) and held by one conformance
//! suite to the float computation on ±1 values: `count_ones` as compiled for the baseline
//! target (`Portable`), the `popcnt` instruction (`Popcnt`), and AVX2's nibble-table count
//! with a carry-save adder (`Avx2`, in `avx2.rs`), and AVX-512's `vpopcntq`, eight words a
//! register (`Avx512`, in `avx512.rs`).
//!
//! Binary and ternary weights on real-valued inputs (BWN, TWN) run on [`lookup`]: sums of
//! subsets of inputs built once and looked up by the weight bits, additions only.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod convolution;
pub mod lookup;

#[cfg(target_arch = "x86_64")]
use avx2::Avx2Count;
#[cfg(target_arch = "x86_64")]
use avx512::Avx512Count;
pub use convolution::{PackedFilters, PackedImages, check_conv, conv, conv_scaled};

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
    /// AVX-512's `vpopcntq`, eight words at a time (images packed as on AVX2).
    Avx512,
}

impl Path {
    pub const ALL: [Path; 5] = [
        Path::Reference,
        Path::Portable,
        Path::Popcnt,
        Path::Avx2,
        Path::Avx512,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Path::Reference => "reference",
            Path::Portable => "portable",
            Path::Popcnt => "popcnt",
            Path::Avx2 => "avx2",
            Path::Avx512 => "avx512",
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
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => {
                Path::Avx2.runs_here()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vpopcntdq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest path this CPU runs, or the one named by the environment variable
    /// `CONVPRESS_BINARY_PATH` (`avx2`, `popcnt`, `portable`, `reference`; to measure or check
    /// a slower path on this machine) where it runs here.
    pub fn best() -> Path {
        let asked = std::env::var("CONVPRESS_BINARY_PATH").ok();
        if let Some(p) = Path::ALL
            .into_iter()
            .find(|p| asked.as_deref() == Some(p.name()) && p.runs_here())
        {
            return p;
        }
        [Path::Avx512, Path::Avx2, Path::Popcnt, Path::Portable]
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
/// of 2 rows against 4 (`[row][filter]`) of whole vectors (4 words), each word loaded once for
/// the tile.
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
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => unsafe { gemm_row_avx512(a.row(i), b, out) },
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vpopcntdq,avx2,popcnt")]
unsafe fn gemm_row_avx512(x: &[u64], b: &BitRows, out: &mut [i32]) {
    gemm_row::<Avx512Count>(x, b, out)
}
