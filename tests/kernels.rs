//! One conformance suite for every `LinearKernel`: each must equal the dense reference on
//! many shapes, sparsities and batch sizes (odd sizes, empty rows, no bias, batch 1, and
//! sizes large enough to take the multi-threaded path).

mod common;

use common::values;

use convpress::compress::prune::level_mask;
use convpress::runtime::sparse::CsrLinear;
use convpress::runtime::{DenseReference, LinearKernel};

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
    bad.cols.set(3, 100);
    assert!(bad.validate().unwrap_err().contains("column"));
    let mut bad = csr.clone();
    bad.row_start[5] = bad.row_start[6] + 1;
    assert!(bad.validate().is_err());
    let mut bad = csr;
    bad.bias = Some(vec![0.0; 3]);
    assert!(bad.validate().unwrap_err().contains("bias"));
}

#[test]
fn csr_uses_16_bit_columns_up_to_65536_inputs_and_32_bit_beyond() {
    use convpress::runtime::sparse::Columns;
    let narrow = CsrLinear::from_dense(&reference(65_536, 2, 0.9, true, false));
    assert!(matches!(narrow.cols, Columns::U16(_)));
    let r = reference(70_000, 3, 0.9, true, false);
    let wide = CsrLinear::from_dense(&r);
    assert!(matches!(wide.cols, Columns::U32(_)));
    assert!(wide.cols.get(wide.nnz() - 1) >= 65_536);
    for batch in [1, 2] {
        check(&wide, &r, batch);
    }
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

// ---- Convolutions -------------------------------------------------------------------------

use convpress::runtime::conv::{
    Conv2dKernel, ConvGeometry, DenseConv, DirectConv, SparseIm2colConv,
};

/// A reference convolution with random weights pruned by magnitude to `sparsity`.
fn conv_reference(g: ConvGeometry, sparsity: f64, bias: bool, seed: u64) -> DirectConv {
    let mut w = values(g.weight_len(), seed);
    let keep = level_mask(&w, sparsity).unwrap();
    for (v, k) in w.iter_mut().zip(keep) {
        if !k {
            *v = 0.0;
        }
    }
    DirectConv::new(g, w, bias.then(|| values(g.out_channels, seed + 1))).unwrap()
}

fn geometry(
    cin: usize,
    cout: usize,
    k: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 2],
    dil: [usize; 2],
    groups: usize,
) -> ConvGeometry {
    ConvGeometry {
        in_channels: cin,
        out_channels: cout,
        kernel: k,
        stride,
        padding: pad,
        dilation: dil,
        groups,
    }
}

fn check_conv(kernel: &dyn Conv2dKernel, reference: &DirectConv, batch: usize, hw: [usize; 2]) {
    let g = reference.geometry;
    let [oh, ow] = g.output_hw(hw).expect("window fits");
    let x = values(
        batch * g.in_channels * hw[0] * hw[1],
        (batch * 7 + hw[0]) as u64,
    );
    let mut want = vec![0f32; batch * g.out_channels * oh * ow];
    reference.forward(&x, batch, hw, &mut want);
    let mut got = vec![f32::NAN; want.len()];
    kernel.forward(&x, batch, hw, &mut got);
    for (i, (g2, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g2 - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{g:?} batch {batch} input {hw:?}: y[{i}] = {g2}, reference {w}"
        );
    }
}

/// Geometries covering what the zoo uses and what it does not: odd sizes, stride 2, padding,
/// dilation, grouped and depthwise, 1x1 projections, non-square kernels.
fn conv_cases() -> Vec<(ConvGeometry, [usize; 2])> {
    vec![
        (geometry(1, 1, [1, 1], [1, 1], [0, 0], [1, 1], 1), [1, 1]),
        (geometry(1, 20, [5, 5], [1, 1], [0, 0], [1, 1], 1), [28, 28]),
        (
            geometry(20, 50, [5, 5], [1, 1], [0, 0], [1, 1], 1),
            [12, 12],
        ),
        (geometry(3, 16, [3, 3], [1, 1], [1, 1], [1, 1], 1), [9, 7]),
        (
            geometry(16, 32, [3, 3], [2, 2], [1, 1], [1, 1], 1),
            [11, 10],
        ),
        (geometry(16, 32, [1, 1], [2, 2], [0, 0], [1, 1], 1), [9, 9]),
        (geometry(8, 8, [1, 1], [1, 1], [0, 0], [1, 1], 1), [5, 6]),
        (geometry(4, 6, [3, 2], [1, 2], [2, 1], [2, 1], 1), [7, 9]),
        (geometry(6, 6, [3, 3], [1, 1], [1, 1], [1, 1], 6), [8, 5]),
        (geometry(6, 12, [3, 3], [2, 1], [0, 2], [1, 2], 3), [10, 7]),
        (geometry(4, 4, [1, 1], [1, 1], [0, 0], [1, 1], 2), [3, 3]),
        // Padding larger than the kernel reach: whole im2col rows are zero.
        (geometry(2, 3, [2, 2], [3, 3], [3, 3], [1, 1], 1), [4, 4]),
        // Large enough to take the multi-threaded paths at batch 1.
        (
            geometry(32, 64, [3, 3], [1, 1], [1, 1], [1, 1], 1),
            [16, 16],
        ),
    ]
}

macro_rules! conv_kernel_conformance {
    ($name:ident, $build:expr) => {
        mod $name {
            use super::*;

            fn build(r: &DirectConv) -> Box<dyn Conv2dKernel> {
                let f: fn(&DirectConv) -> Box<dyn Conv2dKernel> = $build;
                f(r)
            }

            #[test]
            fn matches_the_reference_on_many_geometries() {
                for (n, (g, hw)) in conv_cases().into_iter().enumerate() {
                    for &sparsity in &[0.0, 0.6, 0.93] {
                        for &bias in &[true, false] {
                            let r = conv_reference(g, sparsity, bias, n as u64 + 11);
                            let k = build(&r);
                            assert_eq!(k.geometry(), &g);
                            for &batch in &[1, 2, 5] {
                                check_conv(k.as_ref(), &r, batch, hw);
                            }
                        }
                    }
                }
            }

            #[test]
            fn all_zero_and_channel_pruned_weights() {
                let g = geometry(8, 6, [3, 3], [1, 1], [1, 1], [1, 1], 1);
                let mut r = conv_reference(g, 0.0, true, 3);
                r.weight.fill(0.0);
                check_conv(build(&r).as_ref(), &r, 2, [6, 6]);
                // Input channels 2..6 pruned away entirely, and output channel 1.
                let mut r = conv_reference(g, 0.5, true, 4);
                for o in 0..6 {
                    for c in 2..6 {
                        r.weight[(o * 8 + c) * 9..(o * 8 + c + 1) * 9].fill(0.0);
                    }
                }
                r.weight[72..144].fill(0.0);
                check_conv(build(&r).as_ref(), &r, 1, [6, 6]);
                check_conv(build(&r).as_ref(), &r, 3, [6, 6]);
            }

            #[test]
            fn large_batches_take_the_parallel_path_correctly() {
                let g = geometry(16, 16, [3, 3], [1, 1], [1, 1], [1, 1], 1);
                let r = conv_reference(g, 0.5, true, 9);
                check_conv(build(&r).as_ref(), &r, 16, [16, 16]);
            }
        }
    };
}

conv_kernel_conformance!(direct_conv, |r| Box::new(r.clone()));
conv_kernel_conformance!(sparse_im2col_conv, |r| Box::new(
    SparseIm2colConv::from_dense(r)
));
conv_kernel_conformance!(dense_conv, |r| Box::new(DenseConv::from_reference(r)));

#[test]
fn the_reference_convolution_matches_hand_computed_values() {
    // One 3x3 image, a 2x2 kernel, padding 1, stride 2: output 2x2.
    let g = geometry(1, 1, [2, 2], [2, 2], [1, 1], [1, 1], 1);
    let r = DirectConv::new(g, vec![1.0, 2.0, 3.0, 4.0], Some(vec![0.5])).unwrap();
    let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
    let mut y = vec![0.0; 4];
    r.forward(&x, 1, [3, 3], &mut y);
    // (0,0) sees only x[0,0] under w[1,1]; (0,1) x[0,1],x[0,2] under w[1,0],w[1,1]; ...
    assert_eq!(
        y,
        vec![
            4.5,
            2.0 * 3.0 + 3.0 * 4.0 + 0.5,
            2.0 * 4.0 + 4.0 * 7.0 + 0.5,
            1.0 * 5.0 + 2.0 * 6.0 + 3.0 * 8.0 + 4.0 * 9.0 + 0.5
        ]
    );
    // Dilation 2 on a 3x3 image with a 2x2 kernel reads the four corners.
    let g = geometry(1, 1, [2, 2], [1, 1], [0, 0], [2, 2], 1);
    let r = DirectConv::new(g, vec![1.0, 10.0, 100.0, 1000.0], None).unwrap();
    let mut y = vec![0.0; 1];
    r.forward(&x, 1, [3, 3], &mut y);
    assert_eq!(y, vec![1.0 + 30.0 + 700.0 + 9000.0]);
    // Two groups: each output sees only its own input channel.
    let g = geometry(2, 2, [1, 1], [1, 1], [0, 0], [1, 1], 2);
    let r = DirectConv::new(g, vec![2.0, 3.0], None).unwrap();
    let mut y = vec![0.0; 2];
    r.forward(&[5.0, 7.0], 1, [1, 1], &mut y);
    assert_eq!(y, vec![10.0, 21.0]);
}

#[test]
fn sparse_conv_stores_only_the_survivors() {
    let g = geometry(20, 50, [5, 5], [1, 1], [0, 0], [1, 1], 1);
    let r = conv_reference(g, 0.93, true, 1);
    let k = SparseIm2colConv::from_dense(&r);
    assert_eq!(k.nnz(), r.weight.iter().filter(|&&w| w != 0.0).count());
    assert_eq!(k.nnz(), 1750);
    assert!(k.weight_bytes() < r.weight_bytes() / 6);
    assert!(DirectConv::new(g, vec![0.0; 3], None).is_err());
    assert!(
        DirectConv::new(
            geometry(3, 4, [1, 1], [1, 1], [0, 0], [1, 1], 2),
            vec![],
            None
        )
        .is_err()
    );
}
