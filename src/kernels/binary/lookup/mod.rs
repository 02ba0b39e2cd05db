//! Binary and ternary weights on real-valued inputs (BWN, TWN and the other binarized layers
//! whose inputs stay in float, issue #13), by additions only: every product `s · x` with
//! `s ∈ {−1, 0, +1}` is `x`, `−x` or nothing, so a layer's output is a signed sum of inputs.
//!
//! Summing input by input costs one addition per weight, as many operations as the float
//! multiply-add it replaces. Tables do better (the lookup-table GEMM of BiQGEMM, Jeon et al.
//! 2020, "BiQGEMM: matrix multiplication with lookup table for binary-coding-based quantized
//! DNNs", section 3; LUT-GEMM, Park et al. 2024): for each group of 4 reduction steps, the 16
//! sums of every subset of its 4 inputs are built once (11 additions), and then each output
//! channel looks up the sum that its 4 weight bits select: one addition for 4 weights. The
//! sums are vectors over [`Lanes::N`] columns of the input (a convolution's output positions,
//! or a linear layer's images), so one addition covers 4 weights × N columns: 64 products in
//! one AVX-512 instruction, against 16 for a float fused multiply-add.
//!
//! A binary layer needs one bit plane, `+1` bits: with `P = Σ_{s=+1} x` and `T = Σ x`,
//! `Σ s·x = 2P − T` (T is the table's all-ones entry, summed). A ternary layer has a plane of
//! `+1` and one of `−1`: `P − M`, two look-ups per group.
//!
//! The input comes transposed, `[k][ld]` (reduction step major, columns contiguous: what
//! [`crate::kernels::conv::im2col`] writes), and the output is written `[out][y_stride]`
//! (a convolution's output planes), each output channel's scale and bias applied and a ReLU if
//! asked. Paths ([`TablePath`]): the plain [`TablePath::Reference`] (multiplies and sums in
//! order, what the others must equal), the tables on arrays of 8 (`Portable`, as compiled for
//! the baseline target), on AVX2 (8 lanes) and on AVX-512 (16 lanes). The sums are of floats
//! in another order than the reference's, so paths agree exactly where every partial sum is
//! exact (inputs that are small whole numbers: the conformance suite), and to rounding
//! otherwise.

#[cfg(target_arch = "x86_64")]
mod x86;

use super::{BitRows, WORD};
use std::ops::Range;

/// Columns per block of the widest path: the last row of the input must be readable up to `n`
/// rounded up to this (any values; they reach no output).
pub const COLUMN_BLOCK: usize = 16;

/// Floats that [`signed_sums`] reads of an input of `k` rows of `ld` floats with `n` columns.
pub fn input_len(k: usize, ld: usize, n: usize) -> usize {
    if k == 0 {
        0
    } else {
        (k - 1) * ld + n.div_ceil(COLUMN_BLOCK) * COLUMN_BLOCK
    }
}

/// Reduction steps per table (bits of a weight plane looked up at once).
const GROUP: usize = 4;

/// Groups in one 64-bit word of a plane.
const GROUPS_PER_WORD: usize = WORD / GROUP;

/// The weights of a layer with binary or ternary weights: `[out][k]` bit planes, the `+1`
/// bits and, for ternary weights, the `−1` bits (a weight in neither is 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignPlanes {
    plus: BitRows,
    minus: Option<BitRows>,
}

impl SignPlanes {
    /// Binary weights `[out, k]` (row-major) by sign: `+1` for `w >= 0`, as [`BitRows::pack`].
    pub fn binary(w: &[f32], out: usize, k: usize) -> SignPlanes {
        SignPlanes {
            plus: BitRows::pack(w, out, k),
            minus: None,
        }
    }

    /// Ternary weights `[out, k]`: `+1` for `w > 0`, `−1` for `w < 0`, 0 for 0.
    pub fn ternary(w: &[f32], out: usize, k: usize) -> SignPlanes {
        assert_eq!(w.len(), out * k, "ternary planes: not [out, k]");
        // A plane of `v` is `BitRows::pack` of values that are `>= 0` exactly where the bit is set.
        let plane = |set: fn(f32) -> bool| {
            let v: Vec<f32> = w.iter().map(|&x| if set(x) { 1.0 } else { -1.0 }).collect();
            BitRows::pack(&v, out, k)
        };
        SignPlanes {
            plus: plane(|x| x > 0.0),
            minus: Some(plane(|x| x < 0.0)),
        }
    }

    pub fn outputs(&self) -> usize {
        self.plus.rows()
    }

    /// Reduction steps per output.
    pub fn len(&self) -> usize {
        self.plus.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plus.is_empty()
    }

    pub fn is_ternary(&self) -> bool {
        self.minus.is_some()
    }

    /// Weight `(o, i)` as −1, 0 or +1.
    pub fn weight(&self, o: usize, i: usize) -> f32 {
        let bit = |p: &BitRows| p.row(o)[i / WORD] >> (i % WORD) & 1 == 1;
        match &self.minus {
            None if bit(&self.plus) => 1.0,
            None => -1.0,
            Some(m) => bit(&self.plus) as i32 as f32 - bit(m) as i32 as f32,
        }
    }

    /// Bytes of the planes (8 per word).
    pub fn bytes(&self) -> usize {
        8 * (self.plus.data().len() + self.minus.as_ref().map_or(0, |m| m.data().len()))
    }
}

/// What is applied to each output channel's signed sum `s`: `scales[o] · s + bias[o]`, then a
/// ReLU if `relu`.
#[derive(Debug, Clone, Copy)]
pub struct Scaling<'a> {
    pub scales: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub relu: bool,
}

impl Scaling<'_> {
    #[inline(always)]
    fn apply(&self, o: usize, s: f32) -> f32 {
        let y = self.scales[o] * s + self.bias.map_or(0.0, |b| b[o]);
        if self.relu { y.max(0.0) } else { y }
    }
}

/// An instruction path for [`signed_sums`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TablePath {
    /// `Σ_k s·x` multiplied and summed in order.
    Reference,
    /// The tables on arrays of 8 floats, as compiled for the baseline target.
    Portable,
    /// The tables on AVX2 registers, 8 columns.
    Avx2,
    /// The tables on AVX-512 registers, 16 columns.
    Avx512,
}

impl TablePath {
    pub const ALL: [TablePath; 4] = [
        TablePath::Reference,
        TablePath::Portable,
        TablePath::Avx2,
        TablePath::Avx512,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TablePath::Reference => "reference",
            TablePath::Portable => "portable",
            TablePath::Avx2 => "avx2",
            TablePath::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the path.
    pub fn runs_here(self) -> bool {
        match self {
            TablePath::Reference | TablePath::Portable => true,
            #[cfg(target_arch = "x86_64")]
            TablePath::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            TablePath::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest path this CPU runs.
    pub fn best() -> TablePath {
        [TablePath::Avx512, TablePath::Avx2]
            .into_iter()
            .find(|p| p.runs_here())
            .unwrap_or(TablePath::Portable)
    }
}

/// A layer's input as columns: `k` rows of `ld >= n` floats, `n` of them used, `[k][ld]`; with
/// at least [`input_len`] floats (a block of columns that runs past `n` reads into the next
/// row, or the padding after the last, and what it reads there reaches no output).
#[derive(Debug, Clone, Copy)]
pub struct Columns<'a> {
    pub x: &'a [f32],
    pub ld: usize,
    pub n: usize,
}

/// `y[(o − outs.start) · y_stride + j] = scaling(o, Σ_i w[o][i] · x[i · ld + j])` for every
/// output `o` of `outs` and column `j < n`, on `path`. One thread: callers spread ranges of
/// outputs (or whole images) over the threads.
pub fn signed_sums(
    path: TablePath,
    w: &SignPlanes,
    outs: Range<usize>,
    x: &Columns,
    scaling: &Scaling,
    y: &mut [f32],
    y_stride: usize,
) {
    let k = w.len();
    let (ld, n) = (x.ld, x.n);
    assert!(ld >= n, "signed sums: ld {ld} is under n = {n}");
    assert!(
        x.x.len() >= input_len(k, ld, n),
        "signed sums: x is not [k, ld] with its padding"
    );
    assert!(
        outs.end <= w.outputs(),
        "signed sums: outputs {outs:?} out of range"
    );
    assert!(
        scaling.scales.len() == w.outputs() && scaling.bias.is_none_or(|b| b.len() == w.outputs()),
        "signed sums: scales or bias do not fit the outputs"
    );
    assert!(
        outs.is_empty() || n == 0 || y.len() >= (outs.len() - 1) * y_stride + n && y_stride >= n,
        "signed sums: y is not [outs, y_stride]"
    );
    assert!(
        path.runs_here(),
        "this CPU cannot run the {} path",
        path.name()
    );
    if n == 0 || outs.is_empty() {
        return;
    }
    match path {
        TablePath::Reference => {
            for (r, o) in outs.enumerate() {
                for j in 0..n {
                    let s: f32 = (0..k).map(|i| w.weight(o, i) * x.x[i * ld + j]).sum();
                    y[r * y_stride + j] = scaling.apply(o, s);
                }
            }
        }
        // SAFETY (both): the path runs here (checked above), and the sizes were checked.
        #[cfg(target_arch = "x86_64")]
        TablePath::Avx2 => unsafe { x86::avx2(w, outs, x, scaling, y, y_stride) },
        #[cfg(target_arch = "x86_64")]
        TablePath::Avx512 => unsafe { x86::avx512(w, outs, x, scaling, y, y_stride) },
        _ => sums::<Array8>(w, outs, x, scaling, y, y_stride),
    }
}

/// One vector of `N` columns, as one path holds it.
trait Lanes: Copy {
    const N: usize;
    fn zero() -> Self;
    /// `N` floats from `p`.
    ///
    /// # Safety
    /// `p` points at `N` readable floats.
    unsafe fn load(p: *const f32) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    /// The `N` floats.
    fn to_array(self) -> [f32; 16];
}

/// The table of one group from its four inputs, by adding one input to a smaller subset's sum
/// for each subset: 11 additions (the 4 singletons are the inputs).
#[inline(always)]
fn group_table<V: Lanes>(e: [V; 4]) -> [V; 16] {
    let mut t = [V::zero(); 16];
    t[1] = e[0];
    t[2] = e[1];
    t[3] = e[0].add(e[1]);
    t[4] = e[2];
    for m in 5..8 {
        t[m] = t[m - 4].add(e[2]);
    }
    t[8] = e[3];
    for m in 9..16 {
        t[m] = t[m - 8].add(e[3]);
    }
    t
}

/// Output channels looked up together: their sums are independent chains of additions, which
/// the CPU overlaps (one chain alone waits out each addition's latency: 3.6 cycles a look-up
/// on the XNOR-Net shape, measured).
const OUTPUT_TILE: usize = 4;

/// The sums of outputs `o .. o + R` after word `word` of their planes, from `acc` (their sums
/// so far, unused at word 0): each output's groups split over two chains, even and odd.
#[inline(always)]
fn look_up_tile<V: Lanes, const R: usize>(
    w: &SignPlanes,
    t: &[[V; 16]; GROUPS_PER_WORD],
    groups: usize,
    word: usize,
    o: usize,
    acc: [V; R],
) -> [V; R] {
    let start = if word == 0 { [V::zero(); R] } else { acc };
    let plus: [u64; R] = std::array::from_fn(|r| w.plus.row(o + r)[word]);
    let mut s = chains::<V, R, false>(t, groups, plus, start);
    if let Some(minus) = &w.minus {
        let bits: [u64; R] = std::array::from_fn(|r| minus.row(o + r)[word]);
        s = chains::<V, R, true>(t, groups, bits, s);
    }
    s
}

/// `acc[r] ± Σ_g t[g][nibble g of bits[r]]` over the first `groups` groups (subtracted if
/// `NEG`), in two chains per output.
#[inline(always)]
fn chains<V: Lanes, const R: usize, const NEG: bool>(
    t: &[[V; 16]; GROUPS_PER_WORD],
    groups: usize,
    bits: [u64; R],
    acc: [V; R],
) -> [V; R] {
    let entry = |g: usize, b: u64| t[g][(b >> (GROUP * g)) as usize & 15];
    let step = |a: V, v: V| if NEG { a.sub(v) } else { a.add(v) };
    let (mut even, mut odd) = (acc, [V::zero(); R]);
    let mut g = 0;
    while g + 1 < groups {
        for r in 0..R {
            even[r] = step(even[r], entry(g, bits[r]));
            odd[r] = step(odd[r], entry(g + 1, bits[r]));
        }
        g += 2;
    }
    if g < groups {
        for r in 0..R {
            even[r] = step(even[r], entry(g, bits[r]));
        }
    }
    std::array::from_fn(|r| even[r].add(odd[r]))
}

/// [`signed_sums`] on the tables, columns in blocks of `V::N`.
#[inline(always)]
fn sums<V: Lanes>(
    w: &SignPlanes,
    outs: Range<usize>,
    x: &Columns,
    scaling: &Scaling,
    y: &mut [f32],
    y_stride: usize,
) {
    let (k, words) = (w.len(), w.plus.words());
    let (ld, n) = (x.ld, x.n);
    let mut partial = vec![V::zero(); outs.len()];
    // The tables of one word of groups (64 reduction steps), for one block of columns:
    // `tables[g][m] = Σ_{b: bit b of m} x[64·word + 4g + b]`.
    let mut tables = [[V::zero(); 16]; GROUPS_PER_WORD];
    for j0 in (0..n).step_by(V::N) {
        let mut total = V::zero();
        for word in 0..words {
            let first = word * WORD;
            let groups = (k - first).div_ceil(GROUP).min(GROUPS_PER_WORD);
            for (g, table) in tables.iter_mut().enumerate().take(groups) {
                let e = std::array::from_fn(|b| {
                    let i = first + GROUP * g + b;
                    if i < k {
                        // SAFETY: `i · ld + j0 + N <= input_len(k, ld, n) <= x.len()`, as
                        // `i <= k − 1` and `j0 + N <= n` rounded up to the block (N divides it).
                        unsafe { V::load(x.x.as_ptr().add(i * ld + j0)) }
                    } else {
                        V::zero()
                    }
                });
                *table = group_table(e);
                total = total.add(table[15]);
            }
            let t = &tables;
            let mut tiles = partial.chunks_exact_mut(OUTPUT_TILE);
            for (i, acc) in tiles.by_ref().enumerate() {
                let o = outs.start + i * OUTPUT_TILE;
                let acc: &mut [V; OUTPUT_TILE] = acc.try_into().expect("a whole tile");
                *acc = look_up_tile(w, t, groups, word, o, *acc);
            }
            let first_left = outs.end - outs.len() % OUTPUT_TILE;
            for (i, acc) in tiles.into_remainder().iter_mut().enumerate() {
                let [s] = look_up_tile(w, t, groups, word, first_left + i, [*acc]);
                *acc = s;
            }
        }
        let cols = V::N.min(n - j0);
        for (r, acc) in partial.iter().enumerate() {
            // A binary layer's sum is 2P − T.
            let s = if w.minus.is_none() {
                acc.add(*acc).sub(total)
            } else {
                *acc
            };
            let s = s.to_array();
            let out = &mut y[r * y_stride + j0..][..cols];
            for (v, &s) in out.iter_mut().zip(&s) {
                *v = scaling.apply(outs.start + r, s);
            }
        }
    }
}

/// The portable lanes: 8 floats, which the compiler may vectorize for the baseline target.
#[derive(Clone, Copy)]
struct Array8([f32; 8]);

impl Lanes for Array8 {
    const N: usize = 8;

    #[inline(always)]
    fn zero() -> Self {
        Array8([0.0; 8])
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's contract.
        Array8(unsafe { std::ptr::read_unaligned(p.cast()) })
    }

    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Array8(std::array::from_fn(|i| self.0[i] + o.0[i]))
    }

    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Array8(std::array::from_fn(|i| self.0[i] - o.0[i]))
    }

    #[inline(always)]
    fn to_array(self) -> [f32; 16] {
        let mut a = [0.0; 16];
        a[..8].copy_from_slice(&self.0);
        a
    }
}
