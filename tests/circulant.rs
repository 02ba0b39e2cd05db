//! Circulant layers (Cheng et al. 2015): the FFT path equals the explicit circulant matrix
//! product in values and gradients on square, wide, tall and odd sizes; the explicit
//! gradients equal finite differences; through Burn the layer's gradients equal those of the
//! same product written in Burn's ops; the runtime kernel equals its dense equivalent.

mod common;

use burn::prelude::*;
use common::values;
use convpress::kernels::circulant::{self, CirculantPlan, CirculantShape, Wanted, reference};
use convpress::kernels::extension::{self, Signs};
use convpress::kernels::{Ops, with_ops};
use convpress::runtime::LinearKernel;
use convpress::runtime::circulant::CirculantLinear;
use std::sync::Arc;

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: {g} vs {w} (tolerance {tol} x {scale})"
        );
    }
}

/// `(batch, in, out)`: square, wide, tall, odd, a power of two, one, and rows enough for
/// several threads.
const SHAPES: &[(usize, usize, usize)] = &[
    (3, 8, 8),
    (2, 13, 5),
    (4, 5, 13),
    (1, 7, 7),
    (5, 64, 10),
    (1, 1, 1),
    (2, 1, 4),
    (200, 96, 96),
    (3, 784, 300),
];

const ALL: Wanted = Wanted {
    x: true,
    r: true,
    bias: true,
};

fn case(
    i: usize,
    &(batch, n_in, n_out): &(usize, usize, usize),
) -> (CirculantShape, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = CirculantShape {
        batch,
        in_features: n_in,
        out_features: n_out,
    };
    let x = values(batch * n_in, 10 + i as u64);
    let r = values(s.d(), 20 + i as u64);
    let bias = values(n_out, 30 + i as u64);
    let signs = circulant::signs(i as u64, n_in);
    (s, x, r, bias, signs)
}

#[test]
fn signs_are_balanced_reproducible_and_seeded() {
    let a = circulant::signs(7, 10_000);
    assert_eq!(a, circulant::signs(7, 10_000));
    assert_ne!(a, circulant::signs(8, 10_000));
    assert!(a.iter().all(|&v| v == 1.0 || v == -1.0));
    let plus = a.iter().filter(|&&v| v > 0.0).count();
    assert!((4_800..5_200).contains(&plus), "{plus} of 10000 positive");
    // A prefix does not depend on the length asked for: the runtime and training agree.
    assert_eq!(circulant::signs(7, 10), a[..10]);
}

#[test]
fn fft_forward_equals_the_explicit_circulant_product() {
    for (i, c) in SHAPES.iter().enumerate() {
        let (s, x, r, bias, signs) = case(i, c);
        let plan = CirculantPlan::new(s.d());
        let got = plan.forward(&s, &x, &r, &signs, Some(&bias));
        let want = reference::forward(&s, &x, &r, &signs, Some(&bias));
        assert_close(&got, &want, 1e-5, &format!("{c:?} forward"));
        let got = plan.forward(&s, &x, &r, &signs, None);
        let want = reference::forward(&s, &x, &r, &signs, None);
        assert_close(&got, &want, 1e-5, &format!("{c:?} forward without bias"));
    }
}

#[test]
fn the_explicit_product_is_the_circulant_matrix_of_the_paper() {
    // R[i][j] = r[(i - j) mod d]: with x = e_j and all signs +1 (seed chosen so), column j of
    // the output is r rotated down by j.
    let s = CirculantShape {
        batch: 1,
        in_features: 4,
        out_features: 4,
    };
    let r = vec![1.0, 2.0, 3.0, 4.0];
    let ones = vec![1.0; 4];
    let y = reference::forward(&s, &[0.0, 1.0, 0.0, 0.0], &r, &ones, None);
    assert_eq!(y, vec![4.0, 1.0, 2.0, 3.0]);
    let plan = CirculantPlan::new(4);
    assert_close(
        &plan.forward(&s, &[0.0, 1.0, 0.0, 0.0], &r, &ones, None),
        &y,
        1e-6,
        "e_1",
    );
    // A sign of -1 flips its input.
    let y = reference::forward(&s, &[0.0, 1.0, 0.0, 0.0], &r, &[1.0, -1.0, 1.0, 1.0], None);
    assert_eq!(y, vec![-4.0, -1.0, -2.0, -3.0]);
}

#[test]
fn fft_gradients_equal_the_explicit_ones() {
    for (i, c) in SHAPES.iter().enumerate() {
        let (s, x, r, _, signs) = case(i, c);
        let g = values(s.batch * s.out_features, 40 + i as u64);
        let plan = CirculantPlan::new(s.d());
        let got = plan.backward(&s, &x, &r, &signs, &g, ALL);
        let want = reference::backward(&s, &x, &r, &signs, &g, ALL);
        assert_close(
            got.x.as_ref().unwrap(),
            want.x.as_ref().unwrap(),
            1e-5,
            &format!("{c:?} dx"),
        );
        assert_close(
            got.r.as_ref().unwrap(),
            want.r.as_ref().unwrap(),
            1e-5,
            &format!("{c:?} dr"),
        );
        assert_close(
            got.bias.as_ref().unwrap(),
            want.bias.as_ref().unwrap(),
            1e-5,
            &format!("{c:?} db"),
        );
        // Only what is asked for.
        let only_r = plan.backward(
            &s,
            &x,
            &r,
            &signs,
            &g,
            Wanted {
                x: false,
                r: true,
                bias: false,
            },
        );
        assert!(only_r.x.is_none() && only_r.bias.is_none());
        assert_close(
            only_r.r.as_ref().unwrap(),
            want.r.as_ref().unwrap(),
            1e-5,
            "dr alone",
        );
        let only_x = plan.backward(
            &s,
            &x,
            &r,
            &signs,
            &g,
            Wanted {
                x: true,
                r: false,
                bias: false,
            },
        );
        assert_close(
            only_x.x.as_ref().unwrap(),
            want.x.as_ref().unwrap(),
            1e-5,
            "dx alone",
        );
    }
}

/// Central differences of `Σ g · forward` with respect to one value of `v`.
fn numeric(v: &mut [f32], i: usize, g: &[f32], f: &dyn Fn(&[f32]) -> Vec<f32>) -> f32 {
    let h = 1e-2f32;
    let keep = v[i];
    let loss = |v: &[f32]| -> f64 { f(v).iter().zip(g).map(|(&a, &b)| a as f64 * b as f64).sum() };
    v[i] = keep + h;
    let plus = loss(v);
    v[i] = keep - h;
    let minus = loss(v);
    v[i] = keep;
    ((plus - minus) / (2.0 * h as f64)) as f32
}

#[test]
fn explicit_gradients_equal_finite_differences() {
    for (i, c) in SHAPES.iter().take(7).enumerate() {
        let (s, mut x, mut r, mut bias, signs) = case(i, c);
        let g = values(s.batch * s.out_features, 50 + i as u64);
        let want = reference::backward(&s, &x, &r, &signs, &g, ALL);
        let (r0, b0, x0) = (r.clone(), bias.clone(), x.clone());
        let dx: Vec<f32> = (0..x.len())
            .map(|k| {
                numeric(&mut x, k, &g, &|x| {
                    reference::forward(&s, x, &r0, &signs, Some(&b0))
                })
            })
            .collect();
        let dr: Vec<f32> = (0..r.len())
            .map(|k| {
                numeric(&mut r, k, &g, &|r| {
                    reference::forward(&s, &x0, r, &signs, Some(&b0))
                })
            })
            .collect();
        let db: Vec<f32> = (0..bias.len())
            .map(|k| {
                numeric(&mut bias, k, &g, &|b| {
                    reference::forward(&s, &x0, &r0, &signs, Some(b))
                })
            })
            .collect();
        assert_close(want.x.as_ref().unwrap(), &dx, 1e-3, &format!("{c:?} dx"));
        assert_close(want.r.as_ref().unwrap(), &dr, 1e-3, &format!("{c:?} dr"));
        assert_close(want.bias.as_ref().unwrap(), &db, 1e-3, &format!("{c:?} db"));
    }
}

fn tensor<const D: usize>(v: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

#[test]
fn through_burn_the_fft_op_and_burns_matrix_product_agree_with_gradients() {
    for (i, c) in SHAPES.iter().enumerate() {
        let (s, x, r, bias, signs) = case(i, c);
        let signs = Signs(Arc::new(signs));
        let g = values(s.batch * s.out_features, 60 + i as u64);
        let [burn, ours] = [Ops::Burn, Ops::Convpress].map(|ops| {
            with_ops(ops, || {
                let d = Device::flex().autodiff();
                let xt = tensor(x.clone(), [s.batch, s.in_features], &d).require_grad();
                let rt = tensor(r.clone(), [s.d()], &d).require_grad();
                let bt = tensor(bias.clone(), [s.out_features], &d).require_grad();
                let y = extension::circulant(xt.clone(), rt.clone(), bt.clone(), &signs);
                let w = tensor(g.clone(), [s.batch, s.out_features], &d);
                let grads = (y.clone() * w).sum().backward();
                let v = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
                let v1 = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
                (
                    v(y),
                    v(xt.grad(&grads).unwrap()),
                    v1(rt.grad(&grads).unwrap()),
                    v1(bt.grad(&grads).unwrap()),
                )
            })
        });
        assert_close(&ours.0, &burn.0, 1e-5, &format!("{c:?} y"));
        assert_close(&ours.1, &burn.1, 1e-4, &format!("{c:?} dx"));
        assert_close(&ours.2, &burn.2, 1e-4, &format!("{c:?} dr"));
        assert_close(&ours.3, &burn.3, 1e-4, &format!("{c:?} db"));
        // And the values are the reference's.
        let want = reference::forward(&s, &x, &r, &signs.0, Some(&bias));
        assert_close(&ours.0, &want, 1e-5, &format!("{c:?} y vs reference"));
    }
}

#[test]
fn the_runtime_kernel_equals_its_dense_equivalent() {
    for (i, c) in SHAPES.iter().enumerate() {
        let (s, x, r, bias, _) = case(i, c);
        for b in [Some(bias.clone()), None] {
            let k = CirculantLinear::new(s.in_features, s.out_features, &r, i as u64, b.clone())
                .unwrap();
            let dense =
                CirculantLinear::dense_equivalent(s.in_features, s.out_features, &r, i as u64, b);
            let mut got = vec![f32::NAN; s.batch * s.out_features];
            k.forward(&x, s.batch, &mut got);
            let mut want = vec![0.0; got.len()];
            dense.forward(&x, s.batch, &mut want);
            assert_close(&got, &want, 1e-5, &format!("{c:?} runtime"));
            assert!(k.weight_bytes() < 4 * (s.d() + 2 + s.out_features) * 2);
        }
    }
    assert!(
        CirculantLinear::new(4, 3, &[1.0; 3], 0, None)
            .unwrap_err()
            .contains("max(in, out)")
    );
    assert!(CirculantLinear::new(0, 3, &[1.0; 3], 0, None).is_err());
}
