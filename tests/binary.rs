//! One conformance suite for every XNOR-popcount path (`kernels::binary`): bit packing
//! round-trips at lengths that are not multiples of 64; the GEMM and the convolution equal the
//! float computation on ±1 values exactly, zero padding at the image border and strides
//! included, and the scaled layer output follows from the sums; each path's image packing
//! equals the plain loops. A path this machine cannot run says so and passes.

mod common;

use convpress::kernels::binary::{self, BitRows, PackedFilters, PackedImages, Path};
use convpress::kernels::conv::{self, Conv2dProblem};

/// Deterministic ±1 values (and a few zeros, which count as +1).
fn signs(n: usize, seed: u64) -> Vec<f32> {
    common::uniform(n, seed, -1.0, 1.0)
        .into_iter()
        .enumerate()
        .map(|(i, v)| if i % 97 == 5 { 0.0 } else { v })
        .collect()
}

fn pm1(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| if x >= 0.0 { 1.0 } else { -1.0 })
        .collect()
}

#[test]
fn packing_round_trips_at_lengths_that_are_not_whole_words() {
    for (rows, len) in [
        (1, 1),
        (3, 63),
        (2, 64),
        (5, 65),
        (4, 130),
        (1, 1000),
        (0, 7),
    ] {
        let v = signs(rows * len, (rows * 31 + len) as u64);
        let bits = BitRows::pack(&v, rows, len);
        assert_eq!(bits.words(), len.div_ceil(64));
        assert_eq!(bits.unpack(), pm1(&v), "{rows}x{len}");
        // Padding bits are 0.
        if len % 64 != 0 {
            for r in 0..rows {
                assert_eq!(bits.row(r).last().unwrap() >> (len % 64), 0, "{rows}x{len}");
            }
        }
    }
}

fn conv_case(path: Path, p: Conv2dProblem, seed: u64) {
    let x = signs(p.x_len(), seed);
    let w = signs(p.weight_len(), seed + 1);
    let want: Vec<i32> = conv::reference::forward(&p, &pm1(&x), &pm1(&w), None)
        .into_iter()
        .map(|v| v as i32)
        .collect();
    let px = PackedImages::pack_on(path, &x, p.batch, p.in_channels, p.in_hw);
    let pw = PackedFilters::pack(&w, p.out_channels, p.in_channels, p.kernel);
    let mut got = vec![i32::MIN; p.y_len()];
    binary::conv(path, &p, &px, &pw, &mut got);
    assert_eq!(got, want, "{} on {p:?}", path.name());
    // The layer's output: each filter's scale and bias applied to its sums.
    let scale: Vec<f32> = (0..p.out_channels).map(|o| 0.5 + o as f32).collect();
    let bias: Vec<f32> = (0..p.out_channels).map(|o| -(o as f32)).collect();
    let mut y = vec![f32::NAN; p.y_len()];
    binary::conv_scaled(path, &p, &px, &pw, &scale, Some(&bias), &mut y);
    let plane = p.y_len() / (p.batch * p.out_channels);
    for (i, (y, s)) in y.iter().zip(&want).enumerate() {
        let o = (i / plane) % p.out_channels;
        assert_eq!(
            *y,
            scale[o] * *s as f32 + bias[o],
            "{} output {i}",
            path.name()
        );
    }
}

fn problem(
    batch: usize,
    c: usize,
    o: usize,
    hw: [usize; 2],
    k: usize,
    s: usize,
    pad: usize,
) -> Conv2dProblem {
    Conv2dProblem {
        batch,
        in_channels: c,
        out_channels: o,
        in_hw: hw,
        kernel: [k, k],
        stride: [s, s],
        pad_begin: [pad, pad],
        pad_end: [pad, pad],
        dilation: [1, 1],
        groups: 1,
    }
}

macro_rules! binary_conformance {
    ($name:ident, $path:expr) => {
        mod $name {
            use super::*;

            fn path() -> Option<Path> {
                let p: Path = $path;
                if !p.runs_here() {
                    eprintln!("{}: this machine cannot run it; skipped", p.name());
                    return None;
                }
                Some(p)
            }

            #[test]
            fn gemm_equals_the_float_product_of_signs() {
                let Some(path) = path() else { return };
                for (m, n, k) in [
                    (1, 1, 1),
                    (3, 5, 63),
                    (2, 4, 64),
                    (4, 3, 65),
                    (7, 9, 255),
                    (2, 3, 256),
                    (5, 6, 1000),
                    (0, 3, 5),
                    (3, 0, 5),
                ] {
                    let a = signs(m * k, (m * 7 + k) as u64);
                    let b = signs(n * k, (n * 13 + k) as u64);
                    let (sa, sb) = (pm1(&a), pm1(&b));
                    let mut want = vec![0i32; m * n];
                    for i in 0..m {
                        for j in 0..n {
                            want[i * n + j] =
                                (0..k).map(|t| (sa[i * k + t] * sb[j * k + t]) as i32).sum();
                        }
                    }
                    let mut got = vec![i32::MIN; m * n];
                    binary::gemm(
                        path,
                        &BitRows::pack(&a, m, k),
                        &BitRows::pack(&b, n, k),
                        &mut got,
                    );
                    assert_eq!(got, want, "{} on {m}x{n}x{k}", path.name());
                }
                // All equal and all opposite: the extremes ±k.
                let k = 300;
                let ones = vec![1.0; k];
                let minus = vec![-1.0; k];
                let mut c = vec![0; 2];
                binary::gemm(
                    path,
                    &BitRows::pack(&ones, 1, k),
                    &BitRows::pack(&[ones.clone(), minus].concat(), 2, k),
                    &mut c,
                );
                assert_eq!(c, vec![k as i32, -(k as i32)]);
            }

            #[test]
            fn conv_equals_the_float_convolution_of_signs_with_zero_padding() {
                let Some(path) = path() else { return };
                for (i, p) in [
                    problem(1, 1, 1, [3, 3], 3, 1, 1),
                    problem(2, 3, 4, [5, 6], 3, 1, 1),
                    problem(1, 64, 5, [4, 4], 3, 1, 1),
                    problem(2, 65, 3, [6, 5], 3, 2, 1),
                    problem(1, 130, 7, [7, 7], 5, 1, 2),
                    problem(1, 16, 8, [8, 8], 1, 1, 0),
                    problem(1, 32, 4, [9, 9], 3, 2, 0),
                    // A window of 8 words × 25 taps = 50 vectors: the byte counts are
                    // flushed after 31 of them.
                    problem(1, 512, 3, [5, 5], 5, 1, 2),
                    // More padding than the window reaches: border outputs see no pixel.
                    problem(1, 3, 2, [2, 2], 3, 1, 3),
                    // Taps packed densely: 9 × 16 bits in 3 words, 9 × 7 in one, and 96-bit
                    // taps that start mid-word.
                    problem(2, 16, 6, [6, 6], 3, 1, 1),
                    problem(1, 7, 5, [5, 4], 3, 1, 1),
                    problem(1, 96, 5, [5, 5], 3, 1, 1),
                    // Three-vector adders with a remainder: 9 × 48 bits = 7 vectors.
                    problem(1, 48, 9, [4, 4], 3, 1, 1),
                    // LeNet-5's second convolution.
                    problem(2, 20, 50, [12, 12], 5, 1, 0),
                ]
                .into_iter()
                .enumerate()
                {
                    conv_case(path, p, 100 + i as u64);
                }
            }

            #[test]
            fn worst_case_rows_where_every_bit_differs_count_exactly() {
                // Every bit differs: each byte of the counts grows by 8 a vector, the most it
                // can, over windows of 8 words × 25 taps = 50 vectors, and 1 word × 9 taps.
                let Some(path) = path() else { return };
                for p in [
                    problem(1, 512, 3, [5, 5], 5, 1, 2),
                    problem(2, 64, 4, [4, 4], 3, 1, 0),
                ] {
                    let x = vec![1.0f32; p.x_len()];
                    let w = vec![-1.0f32; p.weight_len()];
                    let px = PackedImages::pack_on(path, &x, p.batch, p.in_channels, p.in_hw);
                    let pw = PackedFilters::pack(&w, p.out_channels, p.in_channels, p.kernel);
                    let mut got = vec![0i32; p.y_len()];
                    binary::conv(path, &p, &px, &pw, &mut got);
                    let want = conv::reference::forward(&p, &x, &w, None);
                    let want: Vec<i32> = want.into_iter().map(|v| v as i32).collect();
                    assert_eq!(got, want, "{} on {p:?}", path.name());
                }
            }

            #[test]
            fn image_packing_equals_the_plain_loops() {
                let Some(path) = path() else { return };
                let specials = [0.0f32, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
                for channels in [1, 7, 31, 32, 33, 63, 64, 65, 130] {
                    for hw in [[1, 1], [1, 7], [2, 4], [3, 3], [1, 17], [14, 14]] {
                        let n = 2 * channels * hw[0] * hw[1];
                        let mut x = signs(n, (channels * 1000 + hw[1]) as u64);
                        for (i, v) in x.iter_mut().enumerate().filter(|(i, _)| i % 13 == 3) {
                            *v = specials[i % specials.len()];
                        }
                        let want = PackedImages::pack_on(Path::Reference, &x, 2, channels, hw);
                        let got = PackedImages::pack_on(path, &x, 2, channels, hw);
                        assert_eq!(got, want, "{} at {channels} channels, {hw:?}", path.name());
                        // Bit c of pixel p's word is x[c, p] >= 0 (NaN is −1).
                        let plane = hw[0] * hw[1];
                        let words = channels.div_ceil(64);
                        for c in 0..channels {
                            for q in 0..plane {
                                let bit = got.data()[q * words + c / 64] >> (c % 64) & 1;
                                assert_eq!(bit == 1, x[c * plane + q] >= 0.0);
                            }
                        }
                    }
                }
            }
        }
    };
}

binary_conformance!(reference, Path::Reference);
binary_conformance!(portable, Path::Portable);
binary_conformance!(popcnt, Path::Popcnt);
binary_conformance!(avx2, Path::Avx2);
binary_conformance!(avx512, Path::Avx512);

#[test]
fn the_best_path_runs_here_and_bad_problems_are_refused() {
    assert!(Path::best().runs_here());
    let p = Conv2dProblem {
        groups: 2,
        ..problem(1, 4, 4, [5, 5], 3, 1, 1)
    };
    let x = PackedImages::pack(&signs(p.x_len(), 1), 1, 4, [5, 5]);
    let w = PackedFilters::pack(&signs(4 * 4 * 9, 2), 4, 4, [3, 3]);
    let e = binary::check_conv(&p, &x, &w).unwrap_err();
    assert!(e.contains("groups"), "{e}");
    let q = problem(1, 4, 4, [6, 5], 3, 1, 1);
    let e = binary::check_conv(&q, &x, &w).unwrap_err();
    assert!(e.contains("packed input"), "{e}");
}
