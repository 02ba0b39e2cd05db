//! convpress's conv, batch-norm and pooling kernels: the fast path equals the plain reference
//! on many shapes (odd sizes, stride 2, asymmetric padding, dilation, groups, depthwise, 1x1,
//! batch 1), the reference equals finite differences, and through the Burn extension both
//! values and gradients equal Burn's own ops, down to whole networks.

mod common;

use common::{assert_close, values};

use burn::backend::ops::ConvOptions;
use burn::prelude::*;
use convpress::kernels::conv::{self, Conv2dProblem, Wanted};
use convpress::kernels::norm::{self, NormShape};
use convpress::kernels::{self, Ops, PoolParams, with_ops};
use convpress::models::{ModelKind, Network};

/// `(batch, in, out, hw, kernel, stride, pad_begin, pad_end, dilation, groups)`.
type Case = (
    usize,
    usize,
    usize,
    [usize; 2],
    [usize; 2],
    [usize; 2],
    [usize; 2],
    [usize; 2],
    [usize; 2],
    usize,
);

const CASES: &[Case] = &[
    (2, 3, 4, [7, 6], [3, 3], [1, 1], [1, 1], [1, 1], [1, 1], 1),
    (1, 1, 5, [9, 9], [5, 5], [1, 1], [0, 0], [0, 0], [1, 1], 1), // LeNet conv1, batch 1
    (3, 4, 6, [8, 7], [3, 3], [2, 2], [1, 1], [1, 1], [1, 1], 1), // stride 2
    (2, 4, 4, [5, 5], [1, 1], [1, 1], [0, 0], [0, 0], [1, 1], 1), // pointwise
    (2, 4, 6, [6, 6], [1, 1], [2, 2], [0, 0], [0, 0], [1, 1], 1), // projection shortcut
    (2, 4, 6, [7, 5], [3, 2], [1, 2], [2, 0], [0, 1], [1, 1], 2), // groups, asymmetric
    (2, 4, 4, [6, 6], [3, 3], [1, 1], [1, 1], [1, 1], [1, 1], 4), // depthwise
    (1, 3, 6, [7, 7], [3, 3], [2, 2], [1, 1], [1, 1], [1, 1], 3), // depthwise x2, stride 2
    (2, 2, 3, [9, 8], [3, 3], [1, 1], [2, 2], [2, 2], [2, 2], 1), // dilation
    (5, 3, 2, [4, 4], [4, 4], [1, 1], [0, 0], [0, 0], [1, 1], 1), // 1x1 output
    (1, 2, 2, [3, 5], [2, 4], [3, 1], [1, 2], [0, 1], [1, 1], 1), // odd everything
    // Stride 1 with 8 or more input channels per group: the shifted-GEMM path.
    (2, 8, 4, [6, 5], [3, 2], [1, 1], [2, 0], [0, 1], [1, 1], 1), // asymmetric padding
    (2, 16, 6, [5, 5], [3, 3], [1, 1], [1, 1], [1, 1], [1, 1], 2), // groups
    (3, 9, 3, [4, 9], [2, 3], [1, 1], [0, 2], [1, 0], [2, 1], 1), // dilated rows
    (1, 8, 2, [3, 3], [3, 3], [1, 1], [0, 0], [0, 0], [1, 1], 1), // one output position
    // Wide enough for several 8-pixel segments per row in the direct kernel, with ragged row
    // ends, output channels not a multiple of 4, strides and dilations on phase planes.
    (2, 5, 7, [13, 35], [3, 3], [2, 2], [1, 1], [1, 1], [1, 1], 1), // stride 2, 18 columns
    (1, 3, 9, [11, 30], [5, 3], [1, 1], [2, 1], [2, 1], [1, 2], 1), // dilated columns, 28 wide
    (3, 6, 10, [9, 41], [3, 5], [1, 3], [1, 2], [0, 2], [2, 1], 2), // stride (1, 3), groups
    // Stride-1 depthwise: whole shifted planes. CP's k×1 and 1×k layers, then a multiplier of
    // 2 with asymmetric padding and dilation at batch 1 (its channels split across threads).
    (3, 5, 5, [12, 12], [5, 1], [1, 1], [0, 0], [0, 0], [1, 1], 5),
    (2, 5, 5, [8, 12], [1, 5], [1, 1], [0, 0], [0, 0], [1, 1], 5),
    (1, 3, 6, [7, 9], [3, 2], [1, 1], [2, 0], [1, 1], [2, 1], 3),
];

fn problem(c: &Case) -> Conv2dProblem {
    let &(
        batch,
        in_channels,
        out_channels,
        in_hw,
        kernel,
        stride,
        pad_begin,
        pad_end,
        dilation,
        groups,
    ) = c;
    let p = Conv2dProblem {
        batch,
        in_channels,
        out_channels,
        in_hw,
        kernel,
        stride,
        pad_begin,
        pad_end,
        dilation,
        groups,
    };
    p.validate().unwrap();
    p
}

const ALL: Wanted = Wanted {
    x: true,
    weight: true,
    bias: true,
};

#[test]
fn fast_conv_equals_the_reference_forward_and_backward() {
    for (i, c) in CASES.iter().enumerate() {
        let p = problem(c);
        let x = values(p.x_len(), i as u64 + 1);
        let w = values(p.weight_len(), i as u64 + 100);
        let b = values(p.out_channels, i as u64 + 200);
        let dy = values(p.y_len(), i as u64 + 300);
        let mut y = vec![0f32; p.y_len()];
        conv::forward(&p, &x, &w, Some(&b), &mut y);
        let want = conv::reference::forward(&p, &x, &w, Some(&b));
        assert_close(&y, &want, 1e-5, &format!("case {i} y"));
        // The GEMM paths the direct kernel replaces where AVX2 is present stay tested.
        let mut y_gemm = vec![f32::NAN; p.y_len()];
        conv::forward_gemm(&p, &x, &w, Some(&b), &mut y_gemm);
        assert_close(&y_gemm, &want, 1e-5, &format!("case {i} y (GEMM)"));
        let y_new = conv::forward_new(&p, &x, &w, Some(&b), false);
        assert_close(&y_new, &want, 1e-5, &format!("case {i} y (new buffer)"));
        let mut y_relu = vec![f32::NAN; p.y_len()];
        conv::forward_relu(&p, &x, &w, Some(&b), &mut y_relu);
        let want_relu: Vec<f32> = want.iter().map(|v| v.max(0.0)).collect();
        assert_close(&y_relu, &want_relu, 1e-5, &format!("case {i} relu(y)"));
        let fast = conv::backward(&p, &x, &w, &dy, ALL);
        let slow = conv::reference::backward(&p, &x, &w, &dy, ALL);
        assert_close(
            fast.x.as_ref().unwrap(),
            slow.x.as_ref().unwrap(),
            1e-5,
            &format!("case {i} dx"),
        );
        let gemm = conv::backward_gemm(&p, &x, &w, &dy, ALL);
        assert_close(
            gemm.x.as_ref().unwrap(),
            slow.x.as_ref().unwrap(),
            1e-5,
            &format!("case {i} dx (GEMM)"),
        );
        assert_close(
            fast.weight.as_ref().unwrap(),
            slow.weight.as_ref().unwrap(),
            1e-5,
            &format!("case {i} dw"),
        );
        assert_close(
            fast.bias.as_ref().unwrap(),
            slow.bias.as_ref().unwrap(),
            1e-5,
            &format!("case {i} db"),
        );
        // Asking for less computes less, and the same.
        let only_w = conv::backward(
            &p,
            &x,
            &w,
            &dy,
            Wanted {
                x: false,
                weight: true,
                bias: false,
            },
        );
        assert!(only_w.x.is_none() && only_w.bias.is_none());
        assert_close(
            only_w.weight.as_ref().unwrap(),
            slow.weight.as_ref().unwrap(),
            1e-5,
            "dw alone",
        );
    }
}

#[test]
fn fast_conv_is_the_same_on_one_thread_and_many_and_at_any_batch() {
    // Batch 1 takes the multi-threaded-GEMM path, batch 8 the image-per-task path.
    let c = (
        8,
        16,
        16,
        [12, 12],
        [3, 3],
        [1, 1],
        [1, 1],
        [1, 1],
        [1, 1],
        1,
    );
    let p = problem(&c);
    let x = values(p.x_len(), 7);
    let w = values(p.weight_len(), 8);
    let dy = values(p.y_len(), 9);
    let mut y = vec![0f32; p.y_len()];
    conv::forward(&p, &x, &w, None, &mut y);
    let g = conv::backward(&p, &x, &w, &dy, ALL);
    let one = Conv2dProblem { batch: 1, ..p };
    let (xs, ys, dys) = (one.x_len(), one.y_len(), one.y_len());
    let mut dw_sum = vec![0f32; p.weight_len()];
    for n in 0..p.batch {
        let mut y1 = vec![0f32; ys];
        conv::forward(&one, &x[n * xs..(n + 1) * xs], &w, None, &mut y1);
        assert_close(&y1, &y[n * ys..(n + 1) * ys], 1e-6, "batch-1 forward");
        let g1 = conv::backward(
            &one,
            &x[n * xs..(n + 1) * xs],
            &w,
            &dy[n * dys..(n + 1) * dys],
            ALL,
        );
        assert_close(
            g1.x.as_ref().unwrap(),
            &g.x.as_ref().unwrap()[n * xs..(n + 1) * xs],
            1e-6,
            "batch-1 dx",
        );
        for (s, v) in dw_sum.iter_mut().zip(g1.weight.unwrap()) {
            *s += v;
        }
    }
    assert_close(&dw_sum, g.weight.as_ref().unwrap(), 1e-5, "summed dw");
}

/// Central differences of `loss = Σ dy · f(input)` with respect to `input[i]`.
fn numeric_grad(input: &mut [f32], i: usize, dy: &[f32], f: &dyn Fn(&[f32]) -> Vec<f32>) -> f64 {
    let h = 1e-2f32;
    let keep = input[i];
    input[i] = keep + h;
    let plus: f64 = f(input)
        .iter()
        .zip(dy)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    input[i] = keep - h;
    let minus: f64 = f(input)
        .iter()
        .zip(dy)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    input[i] = keep;
    (plus - minus) / (2.0 * h as f64)
}

#[test]
fn reference_conv_gradients_equal_finite_differences() {
    for c in [CASES[2], CASES[5], CASES[8]] {
        let p = problem(&c);
        let mut x = values(p.x_len(), 11);
        let mut w = values(p.weight_len(), 12);
        let dy = values(p.y_len(), 13);
        let g = conv::reference::backward(&p, &x, &w, &dy, ALL);
        let wc = w.clone();
        for i in (0..x.len()).step_by(7) {
            let n = numeric_grad(&mut x, i, &dy, &|x| {
                conv::reference::forward(&p, x, &wc, None)
            });
            assert!(
                (n - g.x.as_ref().unwrap()[i] as f64).abs() < 2e-3,
                "dx[{i}]"
            );
        }
        let xc = x.clone();
        for i in (0..w.len()).step_by(5) {
            let n = numeric_grad(&mut w, i, &dy, &|w| {
                conv::reference::forward(&p, &xc, w, None)
            });
            assert!(
                (n - g.weight.as_ref().unwrap()[i] as f64).abs() < 2e-3,
                "dw[{i}]"
            );
        }
    }
}

#[test]
fn fast_batch_norm_equals_the_reference_and_finite_differences() {
    for (i, s) in [
        NormShape {
            batch: 4,
            channels: 3,
            plane: 25,
        },
        NormShape {
            batch: 1,
            channels: 5,
            plane: 9,
        },
        NormShape {
            batch: 7,
            channels: 2,
            plane: 1,
        }, // batch norm on a flat layer
        NormShape {
            batch: 3,
            channels: 4,
            plane: 37,
        },
    ]
    .into_iter()
    .enumerate()
    {
        let x: Vec<f32> = values(s.len(), i as u64 + 20)
            .iter()
            .map(|v| 3.0 * v + 1.5)
            .collect();
        let gamma = values(s.channels, 21);
        let beta = values(s.channels, 22);
        let dy = values(s.len(), 23);
        let eps = 1e-5;
        let (y, mean, var) = norm::train_forward(s, &x, &gamma, &beta, eps);
        let (ry, rmean, rvar) = norm::reference::train_forward(s, &x, &gamma, &beta, eps);
        assert_close(&y, &ry, 1e-5, "bn y");
        assert_close(&mean, &rmean, 1e-6, "bn mean");
        assert_close(&var, &rvar, 1e-5, "bn var");
        let (dx, dg, db) = norm::train_backward(s, &x, &gamma, &mean, &var, eps, &dy);
        let (rdx, rdg, rdb) = norm::reference::train_backward(s, &x, &gamma, eps, &dy);
        assert_close(&dx, &rdx, 1e-4, "bn dx");
        assert_close(&dg, &rdg, 1e-5, "bn dgamma");
        assert_close(&db, &rdb, 1e-5, "bn dbeta");
        // The reference's input gradient against finite differences (the statistics move too).
        let mut xm = x.clone();
        let f = |x: &[f32]| norm::reference::train_forward(s, x, &gamma, &beta, eps).0;
        for k in (0..x.len()).step_by(5) {
            let n = numeric_grad(&mut xm, k, &dy, &f);
            assert!(
                (n - rdx[k] as f64).abs() < 5e-3 * (1.0 + n.abs()),
                "bn dx[{k}]: {n} vs {}",
                rdx[k]
            );
        }
    }
}

// ----------------------------------------------------------------- through Burn, against Burn

fn ad() -> Device {
    Device::flex().autodiff()
}

fn t4(v: Vec<f32>, shape: [usize; 4], device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn t1(v: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

fn vec_of<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// Runs `f` on fresh leaf tensors with each engine and returns the output and the gradients of
/// `Σ output · weights` with respect to every leaf.
fn both_engines(
    leaves: &[(Vec<f32>, Vec<usize>)],
    f: &dyn Fn(&[Tensor<4>]) -> Tensor<4>,
) -> [(Vec<f32>, Vec<Vec<f32>>); 2] {
    [Ops::Burn, Ops::Convpress].map(|ops| {
        with_ops(ops, || {
            let d = ad();
            let ts: Vec<Tensor<4>> = leaves
                .iter()
                .map(|(v, s)| {
                    let mut shape = [1usize; 4];
                    shape[4 - s.len()..].copy_from_slice(s);
                    t4(v.clone(), shape, &d).require_grad()
                })
                .collect();
            let y = f(&ts);
            let n = y.shape().num_elements();
            let weights =
                Tensor::<1>::from_data(TensorData::new(values(n, 99), [n]), &d).reshape(y.shape());
            let grads = (y.clone() * weights).sum().backward();
            let g = ts.iter().map(|t| vec_of(t.grad(&grads).unwrap())).collect();
            (vec_of(y), g)
        })
    })
}

fn compare(leaves: &[(Vec<f32>, Vec<usize>)], f: &dyn Fn(&[Tensor<4>]) -> Tensor<4>, what: &str) {
    let [(yb, gb), (yc, gc)] = both_engines(leaves, f);
    assert_close(&yc, &yb, 1e-5, &format!("{what}: output"));
    for (i, (a, b)) in gc.iter().zip(&gb).enumerate() {
        assert_close(a, b, 1e-4, &format!("{what}: gradient of input {i}"));
    }
}

#[test]
fn conv_through_burn_equals_burns_conv_with_gradients() {
    for (i, c) in CASES.iter().enumerate() {
        let p = problem(c);
        let [kh, kw] = p.kernel;
        let options = ConvOptions::new_with_padding(
            p.stride,
            [
                (p.pad_begin[0], p.pad_end[0]),
                (p.pad_begin[1], p.pad_end[1]),
            ],
            p.dilation,
            p.groups,
        );
        let leaves = vec![
            (
                values(p.x_len(), i as u64),
                vec![p.batch, p.in_channels, p.in_hw[0], p.in_hw[1]],
            ),
            (
                values(p.weight_len(), 50 + i as u64),
                vec![p.out_channels, p.in_channels / p.groups, kh, kw],
            ),
            (values(p.out_channels, 80 + i as u64), vec![p.out_channels]),
        ];
        let o = options.clone();
        compare(
            &leaves,
            &move |t| {
                let b: Tensor<1> = t[2].clone().flatten(0, 3);
                kernels::extension::conv2d(t[0].clone(), t[1].clone(), Some(b), o.clone())
            },
            &format!("conv case {i}"),
        );
        let o = options.clone();
        compare(
            &leaves[..2],
            &move |t| kernels::extension::conv2d(t[0].clone(), t[1].clone(), None, o.clone()),
            &format!("conv case {i} without bias"),
        );
    }
}

#[test]
fn batch_norm_and_pooling_through_burn_equal_burns_ops_with_gradients() {
    let x = values(3 * 4 * 9 * 7, 5)
        .iter()
        .map(|v| 2.0 * v + 0.5)
        .collect::<Vec<_>>();
    let leaves = vec![
        (x.clone(), vec![3, 4, 9, 7]),
        (values(4, 6), vec![4]),
        (values(4, 7), vec![4]),
    ];
    compare(
        &leaves,
        &|t| {
            let (y, _, _) = kernels::extension::batch_norm_train(
                t[0].clone(),
                t[1].clone().flatten(0, 3),
                t[2].clone().flatten(0, 3),
                1e-5,
            );
            y
        },
        "batch norm (train)",
    );
    compare(
        &leaves,
        &|t| {
            let d = t[0].device();
            kernels::extension::batch_norm(
                t[0].clone(),
                t[1].clone().flatten(0, 3),
                t[2].clone().flatten(0, 3),
                t1(vec![0.1, -0.2, 0.3, 0.0], &d),
                t1(vec![1.0, 0.5, 2.0, 0.25], &d),
                1e-5,
            )
        },
        "batch norm (running statistics)",
    );
    for (k, s, p, d) in [
        ([2, 2], [2, 2], [0, 0], [1, 1]),
        ([3, 3], [2, 2], [1, 1], [1, 1]),
        ([3, 2], [1, 2], [1, 0], [1, 1]),
        ([2, 2], [1, 1], [0, 0], [2, 2]),
    ] {
        let params = PoolParams {
            kernel: k,
            stride: s,
            padding: p,
            dilation: d,
        };
        compare(
            &leaves[..1],
            &move |t| kernels::extension::max_pool2d(t[0].clone(), params),
            &format!("max pool {params:?}"),
        );
        if d == [1, 1] {
            for include in [true, false] {
                compare(
                    &leaves[..1],
                    &move |t| kernels::extension::avg_pool2d(t[0].clone(), params, include),
                    &format!("avg pool {params:?} include_pad {include}"),
                );
            }
        }
    }
}

#[test]
fn whole_networks_give_the_same_loss_gradients_and_running_statistics_with_either_engine() {
    for (model, input) in [
        (ModelKind::Lenet5, [1, 28, 28]),
        (ModelKind::Resnet20, [3, 16, 16]),
        (ModelKind::VggSmall, [3, 16, 16]),
    ] {
        let arch = model.arch(input, 10).unwrap();
        let x = values(3 * input.iter().product::<usize>(), 4);
        let run = |ops| {
            with_ops(ops, || {
                let d = ad();
                let net = Network::seeded(&arch, &d, 1).unwrap();
                let xs = t4(x.clone(), [3, input[0], input[1], input[2]], &d);
                let out = net.forward(xs);
                let loss = (out.clone() * out.clone()).mean();
                let grads = loss.backward();
                let mut all = vec_of(out);
                let mut visitor = Collect {
                    grads: &grads,
                    out: &mut all,
                };
                burn::module::Module::visit(&net, &mut visitor);
                // The running statistics moved the same way.
                let record = convpress::checkpoint::tensor_map(&net.clone().valid());
                (all, record)
            })
        };
        let (a, ra) = run(Ops::Burn);
        let (b, rb) = run(Ops::Convpress);
        assert_close(
            &b,
            &a,
            1e-4,
            &format!("{}: outputs and gradients", model.name()),
        );
        for (name, (da, _)) in &ra {
            let (db, _) = &rb[name];
            let (va, vb) = (
                da.try_to_vec::<f32>().unwrap(),
                db.try_to_vec::<f32>().unwrap(),
            );
            assert_close(&vb, &va, 1e-5, &format!("{}: {name}", model.name()));
        }
    }
}

struct Collect<'a> {
    grads: &'a burn::tensor::Gradients,
    out: &'a mut Vec<f32>,
}

impl burn::module::ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        if let Some(g) = param.val().grad(self.grads) {
            self.out.extend(vec_of(g));
        }
    }
}

#[test]
fn fused_inference_equals_burns_layer_by_layer_inference() {
    for (model, input) in [
        (ModelKind::Lenet5, [1, 28, 28]),
        (ModelKind::Resnet20, [3, 16, 16]),
        (ModelKind::VggSmall, [3, 16, 16]),
    ] {
        let arch = model.arch(input, 10).unwrap();
        let d = ad();
        let net = Network::seeded(&arch, &d, 2).unwrap();
        // One training forward moves the running statistics away from (0, 1).
        let n = 4 * input.iter().product::<usize>();
        let _ = net.forward(t4(values(n, 5), [4, input[0], input[1], input[2]], &d));
        let net = burn::module::Module::valid(&net);
        let plain = Device::flex();
        let x = t4(
            values(3 * n / 4, 6),
            [3, input[0], input[1], input[2]],
            &plain,
        );
        let layer_by_layer = with_ops(Ops::Burn, || vec_of(net.forward(x.clone())));
        let fused = with_ops(Ops::Convpress, || vec_of(net.forward(x.clone())));
        assert_close(&fused, &layer_by_layer, 1e-4, model.name());
    }
}
