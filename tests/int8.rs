//! One conformance suite for every int8 matrix-product path (`kernels::int8`): each must equal
//! the plain reference exactly, on ordinary shapes (every remainder of the 16-wide and 4-wide
//! blocks), on the worst cases for 16-bit intermediate sums (all 255 against all 127 or all
//! -128, where `vpmaddubsw` would saturate), and at the longest reduction that fits in i32.
//! A path this machine cannot run says so and passes.

use convpress::kernels::int8::{self, Int8Gemm, MAX_K, Reference};

/// Deterministic bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 56) as u8
        })
        .collect()
}

fn check(kernel: &dyn Int8Gemm, m: usize, n: usize, k: usize, a: &[u8], b: &[i8]) {
    let mut want = vec![0i32; m * n];
    Reference.gemm(m, n, k, a, b, &mut want);
    let mut got = vec![i32::MIN; m * n];
    kernel.gemm(m, n, k, a, b, &mut got);
    assert_eq!(got, want, "{} on {m}x{n}x{k}", kernel.name());
}

macro_rules! int8_gemm_conformance {
    ($name:ident, $build:expr) => {
        mod $name {
            use super::*;

            fn kernel() -> Option<Box<dyn Int8Gemm>> {
                let k: Option<Box<dyn Int8Gemm>> = $build;
                if k.is_none() {
                    eprintln!("{}: this machine cannot run it; skipped", stringify!($name));
                }
                k
            }

            #[test]
            fn matches_the_reference_on_many_shapes() {
                let Some(kernel) = kernel() else { return };
                for &(m, n, k) in &[
                    (1, 1, 1),
                    (1, 3, 15),
                    (2, 4, 16),
                    (3, 5, 17),
                    (7, 9, 31),
                    (7, 9, 32),
                    (8, 8, 33),
                    (64, 10, 784),
                    (5, 33, 4099),
                    (100, 20, 150),
                    (0, 3, 5),
                    (3, 0, 5),
                    (3, 4, 0),
                ] {
                    let a = bytes(m * k, (m * 131 + k) as u64);
                    let b: Vec<i8> = bytes(n * k, (n * 7 + k) as u64)
                        .into_iter()
                        .map(|v| v as i8)
                        .collect();
                    check(kernel.as_ref(), m, n, k, &a, &b);
                }
            }

            #[test]
            fn is_exact_where_16_bit_sums_would_saturate() {
                let Some(kernel) = kernel() else { return };
                for &(m, n, k) in &[(1, 1, 2), (3, 5, 16), (2, 7, 1000)] {
                    let a = vec![255u8; m * k];
                    for w in [127i8, -128, -1] {
                        let b = vec![w; n * k];
                        check(kernel.as_ref(), m, n, k, &a, &b);
                        let mut c = vec![0; m * n];
                        kernel.gemm(m, n, k, &a, &b, &mut c);
                        assert!(c.iter().all(|&v| v == 255 * w as i32 * k as i32));
                    }
                    // Alternating signs: large partial sums of both signs.
                    let b: Vec<i8> = (0..n * k)
                        .map(|i| if i % 2 == 0 { 127 } else { -128 })
                        .collect();
                    check(kernel.as_ref(), m, n, k, &a, &b);
                }
            }

            #[test]
            fn the_longest_reduction_fits() {
                let Some(kernel) = kernel() else { return };
                let (m, n, k) = (1, 2, MAX_K);
                let a = vec![255u8; m * k];
                let mut b = vec![-128i8; n * k];
                b[k..].fill(127);
                let mut c = vec![0; m * n];
                kernel.gemm(m, n, k, &a, &b, &mut c);
                assert_eq!(c, vec![-255 * 128 * k as i32, 255 * 127 * k as i32]);
            }
        }
    };
}

int8_gemm_conformance!(reference, Some(Box::new(int8::Reference)));
int8_gemm_conformance!(portable, Some(Box::new(int8::Portable)));
int8_gemm_conformance!(
    avx2,
    int8::Avx2::new().map(|k| Box::new(k) as Box<dyn Int8Gemm>)
);

#[test]
fn best_is_one_of_the_available_paths() {
    let names: Vec<&str> = int8::available().iter().map(|k| k.name()).collect();
    assert_eq!(names[0], "reference");
    assert!(names.contains(&int8::best().name()), "{names:?}");
}
