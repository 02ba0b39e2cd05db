//! One conformance suite for every path of the table-lookup kernel for binary and ternary
//! weights on real inputs (`kernels::binary::lookup`): on inputs that are small whole numbers,
//! where every partial sum is exact in any order, each path equals the plain reference exactly,
//! for binary and ternary weights, at reduction lengths that are not whole groups or words,
//! column counts that are not whole vectors, and with the scale, bias and ReLU applied; on
//! random real inputs, it equals the float computation to rounding. A path this machine cannot
//! run says so and passes.

mod common;

use convpress::kernels::binary::lookup::{
    COLUMN_BLOCK, Columns, Scaling, SignPlanes, TablePath, input_len, signed_sums,
};

/// Weights with zeros among them (ternary keeps them, binary takes them as +1).
fn weights(n: usize, seed: u64) -> Vec<f32> {
    common::uniform(n, seed, -1.0, 1.0)
        .into_iter()
        .enumerate()
        .map(|(i, v)| if i % 5 == 2 { 0.0 } else { v })
        .collect()
}

/// Whole numbers in [-8, 8].
fn whole(n: usize, seed: u64) -> Vec<f32> {
    common::uniform(n, seed, -8.5, 8.5)
        .into_iter()
        .map(f32::round)
        .collect()
}

/// `x` as `[k][ld]`, `ld` the columns plus a gap (`n + n % 3`), the gaps and the padding after
/// the last row NaN (read, never written: a NaN there must not reach an output).
fn transposed(x: &[f32], k: usize, n: usize) -> (Vec<f32>, usize) {
    let ld = n + n % 3;
    let mut t = vec![f32::NAN; input_len(k, ld, n).max(k * ld)];
    assert!(input_len(k, ld, n) <= k * ld + COLUMN_BLOCK);
    for i in 0..k {
        t[i * ld..i * ld + n].copy_from_slice(&x[i * n..(i + 1) * n]);
    }
    (t, ld)
}

/// The float computation on the weights' values, `[out][n]`.
fn float_sums(w: &[f32], ternary: bool, x: &[f32], outs: usize, k: usize, n: usize) -> Vec<f64> {
    let value = |v: f32| match (ternary, v) {
        (true, 0.0) => 0.0,
        (_, v) if v >= 0.0 => 1.0,
        _ => -1.0,
    };
    let mut y = vec![0f64; outs * n];
    for o in 0..outs {
        for j in 0..n {
            y[o * n + j] = (0..k)
                .map(|i| value(w[o * k + i]) * x[i * n + j] as f64)
                .sum();
        }
    }
    y
}

fn planes(w: &[f32], ternary: bool, outs: usize, k: usize) -> SignPlanes {
    if ternary {
        SignPlanes::ternary(w, outs, k)
    } else {
        SignPlanes::binary(w, outs, k)
    }
}

const SHAPES: [(usize, usize, usize); 10] = [
    (1, 1, 1),
    (3, 3, 5),
    (2, 4, 17),
    (5, 63, 9),
    (4, 64, 16),
    (7, 65, 33),
    (16, 150, 40),
    (3, 300, 1),
    (33, 129, 24),
    (2, 5, 0),
];

macro_rules! lookup_conformance {
    ($name:ident, $path:expr) => {
        mod $name {
            use super::*;

            fn path() -> Option<TablePath> {
                let p: TablePath = $path;
                if !p.runs_here() {
                    eprintln!("{}: this machine cannot run it; skipped", p.name());
                    return None;
                }
                Some(p)
            }

            #[test]
            fn equals_the_reference_exactly_on_whole_inputs() {
                let Some(path) = path() else { return };
                for ternary in [false, true] {
                    for (seed, &(outs, k, n)) in SHAPES.iter().enumerate() {
                        let seed = seed as u64 * 7 + ternary as u64;
                        let w = weights(outs * k, seed);
                        let x = whole(k * n, seed + 100);
                        let (xt, ld) = transposed(&x, k, n);
                        let p = planes(&w, ternary, outs, k);
                        let scales: Vec<f32> = (0..outs).map(|o| 0.25 * (o + 1) as f32).collect();
                        let bias: Vec<f32> = (0..outs).map(|o| o as f32 - 3.0).collect();
                        for relu in [false, true] {
                            let s = Scaling {
                                scales: &scales,
                                bias: Some(&bias),
                                relu,
                            };
                            // A stride wider than the columns: the gaps must stay untouched.
                            let stride = n + 3;
                            let mut want = vec![-7.0f32; outs * stride];
                            let mut got = want.clone();
                            let cols = Columns { x: &xt, ld, n };
                            signed_sums(
                                TablePath::Reference,
                                &p,
                                0..outs,
                                &cols,
                                &s,
                                &mut want,
                                stride,
                            );
                            signed_sums(path, &p, 0..outs, &cols, &s, &mut got, stride);
                            let what = format!("{} ternary={ternary} {outs}x{k}x{n}", path.name());
                            assert_eq!(got, want, "{what}");
                            // Two ranges of outputs, each into its own rows, give the same.
                            let mid = outs / 2 + 1;
                            let mut parts = vec![-7.0f32; outs * stride];
                            let (lo, hi) = parts.split_at_mut(mid.min(outs) * stride);
                            signed_sums(path, &p, 0..mid.min(outs), &cols, &s, lo, stride);
                            signed_sums(path, &p, mid.min(outs)..outs, &cols, &s, hi, stride);
                            assert_eq!(parts, want, "{what}, in two ranges");
                            // And the reference is the float computation.
                            let exact = float_sums(&w, ternary, &x, outs, k, n);
                            for o in 0..outs {
                                for j in 0..n {
                                    let mut v = scales[o] * exact[o * n + j] as f32 + bias[o];
                                    if relu {
                                        v = v.max(0.0);
                                    }
                                    assert_eq!(want[o * stride + j], v, "{what} at ({o}, {j})");
                                }
                            }
                        }
                    }
                }
            }

            #[test]
            fn equals_the_float_computation_to_rounding_on_real_inputs() {
                let Some(path) = path() else { return };
                for ternary in [false, true] {
                    let (outs, k, n) = (24, 2304, 20);
                    let w = weights(outs * k, 11 + ternary as u64);
                    let x = common::uniform(k * n, 12, -1.0, 1.0);
                    let (xt, ld) = transposed(&x, k, n);
                    let p = planes(&w, ternary, outs, k);
                    let ones = vec![1.0; outs];
                    let s = Scaling {
                        scales: &ones,
                        bias: None,
                        relu: false,
                    };
                    let mut got = vec![0f32; outs * n];
                    signed_sums(
                        path,
                        &p,
                        0..outs,
                        &Columns { x: &xt, ld, n },
                        &s,
                        &mut got,
                        n,
                    );
                    let exact = float_sums(&w, ternary, &x, outs, k, n);
                    // |Σ| of 2304 terms in [-1, 1): rounding errors of a few units of 2^-24
                    // per addition, far below 1e-3.
                    for (i, (g, e)) in got.iter().zip(&exact).enumerate() {
                        assert!(
                            (*g as f64 - e).abs() < 1e-3,
                            "{} output {i}: {g} vs {e}",
                            path.name()
                        );
                    }
                }
            }
        }
    };
}

lookup_conformance!(reference, TablePath::Reference);
lookup_conformance!(portable, TablePath::Portable);
lookup_conformance!(avx2, TablePath::Avx2);
lookup_conformance!(avx512, TablePath::Avx512);

#[test]
fn planes_hold_the_weights_and_the_best_path_runs_here() {
    assert!(TablePath::best().runs_here());
    let w = [0.5, -0.25, 0.0, -0.0, 3.0, -1.0];
    let b = SignPlanes::binary(&w, 2, 3);
    let t = SignPlanes::ternary(&w, 2, 3);
    let got = |p: &SignPlanes| -> Vec<f32> {
        (0..2)
            .flat_map(|o| (0..3).map(move |i| (o, i)))
            .map(|(o, i)| p.weight(o, i))
            .collect()
    };
    // -0.0 >= 0: binary takes it as +1 (BinaryConnect's sign), ternary as 0.
    assert_eq!(got(&b), [1.0, -1.0, 1.0, 1.0, 1.0, -1.0]);
    assert_eq!(got(&t), [1.0, -1.0, 0.0, 0.0, 1.0, -1.0]);
    assert!(!b.is_ternary() && t.is_ternary());
    assert_eq!((b.bytes(), t.bytes()), (16, 32));
}

/// `CONVPRESS_BINARY_PATH` picks the XNOR-popcount path that layers run on, where it runs here,
/// and a name that is not a path here leaves the fastest. (In this file, as no other test here
/// reads it.)
#[test]
fn the_environment_picks_a_slower_xnor_path() {
    use convpress::kernels::binary::Path;
    let fastest = Path::best();
    // SAFETY: no other thread of this test binary reads or writes the environment.
    unsafe { std::env::set_var("CONVPRESS_BINARY_PATH", "portable") };
    assert_eq!(Path::best(), Path::Portable);
    unsafe { std::env::set_var("CONVPRESS_BINARY_PATH", "no-such-path") };
    assert_eq!(Path::best(), fastest);
    unsafe { std::env::remove_var("CONVPRESS_BINARY_PATH") };
}
