//! One conformance suite for every `LinearKernel`: each must equal the dense reference on
//! many shapes, sparsities and batch sizes (odd sizes, empty rows, no bias, batch 1, and
//! sizes large enough to take the multi-threaded path).

use convpress::compress::prune::level_mask;
use convpress::runtime::sparse::CsrLinear;
use convpress::runtime::{DenseReference, LinearKernel};

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A reference layer with weights pruned to `sparsity` (and, if asked, a few rows emptied).
fn reference(
    n_in: usize,
    n_out: usize,
    sparsity: f64,
    bias: bool,
    empty_rows: bool,
) -> DenseReference {
    let mut w = values(n_in * n_out, (n_in * 31 + n_out) as u64);
    let keep = level_mask(&w, sparsity).unwrap();
    for (v, k) in w.iter_mut().zip(keep) {
        if !k {
            *v = 0.0;
        }
    }
    if empty_rows {
        for o in (0..n_out).step_by(3) {
            w[o * n_in..(o + 1) * n_in].fill(0.0);
        }
    }
    DenseReference {
        out_features: n_out,
        in_features: n_in,
        weight: w,
        bias: bias.then(|| values(n_out, 99)),
    }
}

fn check(kernel: &dyn LinearKernel, reference: &DenseReference, batch: usize) {
    let x = values(batch * reference.in_features, batch as u64 + 5);
    let mut want = vec![0f32; batch * reference.out_features];
    reference.forward(&x, batch, &mut want);
    let mut got = vec![f32::NAN; batch * reference.out_features];
    kernel.forward(&x, batch, &mut got);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{}x{} batch {batch}: y[{i}] = {g}, reference {w}",
            reference.in_features,
            reference.out_features
        );
    }
}

macro_rules! linear_kernel_conformance {
    ($name:ident, $build:expr) => {
        mod $name {
            use super::*;

            fn build(r: &DenseReference) -> Box<dyn LinearKernel> {
                let f: fn(&DenseReference) -> Box<dyn LinearKernel> = $build;
                f(r)
            }

            #[test]
            fn matches_the_reference_on_many_shapes() {
                for &(n_in, n_out) in &[(1, 1), (3, 5), (17, 9), (64, 10), (784, 300), (800, 500)] {
                    for &sparsity in &[0.0, 0.5, 0.9, 0.99] {
                        for &bias in &[true, false] {
                            let r = reference(n_in, n_out, sparsity, bias, false);
                            let k = build(&r);
                            assert_eq!((k.in_features(), k.out_features()), (n_in, n_out));
                            for &batch in &[1, 2, 7, 64] {
                                check(k.as_ref(), &r, batch);
                            }
                        }
                    }
                }
            }

            #[test]
            fn empty_rows_and_all_zero_weights() {
                let r = reference(33, 20, 0.7, true, true);
                check(build(&r).as_ref(), &r, 1);
                check(build(&r).as_ref(), &r, 5);
                let mut z = reference(16, 8, 0.0, true, false);
                z.weight.fill(0.0);
                let k = build(&z);
                check(k.as_ref(), &z, 3);
            }

            #[test]
            fn large_batches_take_the_parallel_path_correctly() {
                let r = reference(512, 384, 0.5, true, false);
                check(build(&r).as_ref(), &r, 128);
                check(build(&r).as_ref(), &r, 1);
            }
        }
    };
}

linear_kernel_conformance!(dense_reference, |r| Box::new(r.clone()));
linear_kernel_conformance!(csr, |r| Box::new(CsrLinear::from_dense(r)));

#[test]
fn csr_stores_only_the_survivors_and_validates_its_structure() {
    let r = reference(100, 40, 0.9, true, false);
    let csr = CsrLinear::from_dense(&r);
    assert_eq!(csr.nnz(), 400);
    assert!(csr.weight_bytes() < 4 * (100 * 40 + 40) / 4);
    let mut bad = csr.clone();
    bad.cols[3] = 100;
    assert!(bad.validate().unwrap_err().contains("column"));
    let mut bad = csr.clone();
    bad.row_start[5] = bad.row_start[6] + 1;
    assert!(bad.validate().is_err());
    let mut bad = csr;
    bad.bias = Some(vec![0.0; 3]);
    assert!(bad.validate().unwrap_err().contains("bias"));
}

#[test]
fn burn_layout_is_transposed_into_the_reference() {
    // Burn stores linear weights [in, out].
    let w_in_out = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // in = 2, out = 3
    let r = DenseReference::from_burn_layout(2, 3, &w_in_out, None);
    assert_eq!(r.weight, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    let mut y = vec![0.0; 3];
    r.forward(&[1.0, 10.0], 1, &mut y);
    assert_eq!(y, vec![41.0, 52.0, 63.0]);
}
