//! Compact and transferred filters: each rewrite's declared parameters and shapes, the exact
//! equivariance of rotated and mirrored filters, the fire module's concatenation gradient
//! against finite differences, the runtime against Burn on every rewrite, and the refusals of
//! layers that cannot take a form.

mod common;

use burn::prelude::*;
use common::{assert_close, values};
use convpress::compress::compact::{self, Form, Options};
use convpress::models::arch::build::{bn, conv, linear, maxpool};
use convpress::models::network::TransformedConv;
use convpress::models::{Arch, LayerSpec, ModelKind, Network, Shape};

fn options(form: Form) -> Options {
    Options {
        form,
        squeeze: 0.25,
        expand_kxk: 0.5,
    }
}

/// Every form on ResNet-20's first 16→16 3x3 convolution (followed by batch norm and ReLU):
/// the parameters each paper's form declares, and the same output shape.
#[test]
fn each_rewrite_has_the_declared_parameters_and_shapes() {
    let arch = ModelKind::Resnet20.arch([1, 32, 32], 10).unwrap();
    let path = "layers.3.body.0".to_string();
    // (form, parameters before, after): separable 16·9 depthwise + batch norm (2·16) + 16·16
    // pointwise; fire: squeeze 16→4 (1x1) + batch norm (2·4) + 4→8 (1x1) + 4→8 (3x3);
    // CReLU: the conv and its batch norm, halved; rotations 4 and mirrors 8 learned filters.
    let cases = [
        (Form::Separable, 2304, 144 + 32 + 256),
        (Form::Fire, 2304, 64 + 8 + 32 + 288),
        (Form::Crelu, 2304 + 32, 1152 + 16),
        (Form::Rotations, 2304, 4 * 16 * 9),
        (Form::Dihedral, 2304, 2 * 16 * 9),
    ];
    for (form, before, after) in cases {
        let r = compact::rewrite(&arch, None, std::slice::from_ref(&path), options(form)).unwrap();
        r.arch.validate().unwrap();
        let rep = &r.layers[0];
        assert_eq!(rep.params, [before, after], "{form:?}");
        let out_of = |a: &Arch, p: &str| {
            a.layer_stats()
                .into_iter()
                .find(|s| s.path == p)
                .unwrap()
                .output
        };
        assert_eq!(
            out_of(&arch, rep.old_paths.last().unwrap()),
            out_of(&r.arch, rep.new_paths.last().unwrap()),
            "{form:?}"
        );
        assert_eq!(
            arch.num_params() - r.arch.num_params(),
            before - after,
            "{form:?}"
        );
        // The whole model still maps images to ten scores.
        assert_eq!(r.arch.validate().unwrap(), Shape::Flat(10));
    }
    // Default layers: CReLU halves LeNet-5's fc1 (its convolutions have no ReLU after them).
    let lenet = ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap();
    assert_eq!(
        compact::default_layers(&lenet, Form::Crelu),
        vec!["layers.5"]
    );
    let r = compact::rewrite(&lenet, None, &["layers.5".into()], options(Form::Crelu)).unwrap();
    assert_eq!(r.layers[0].params, [400_500, 200_250]);
}

#[test]
fn layers_that_cannot_take_a_form_are_refused_with_the_reason() {
    let lenet = ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap();
    let why = |path: &str, form| compact::check(&lenet, path, form).unwrap_err();
    assert!(why("layers.2", Form::Fire).contains("same"));
    assert!(why("layers.2", Form::Rotations).contains("50 filters"));
    assert!(why("layers.7", Form::Crelu).contains("classifier"));
    assert!(why("layers.1", Form::Separable).contains("max_pool"));
    assert!(why("layers.9", Form::Separable).contains("no such layer"));
}

/// `[C, n, n]` planes rotated by 90° as the filters are (`rot(t)[i][j] = t[j][n−1−i]`) or
/// mirrored (`t[i][n−1−j]`).
fn transform_planes(x: &[f32], c: usize, n: usize, mirror: bool) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for ch in 0..c {
        for i in 0..n {
            for j in 0..n {
                let (si, sj) = if mirror {
                    (i, n - 1 - j)
                } else {
                    (j, n - 1 - i)
                };
                out[ch * n * n + i * n + j] = x[ch * n * n + si * n + sj];
            }
        }
    }
    out
}

/// Rotating (or mirroring) the input of a transformed layer rotates (mirrors) its output
/// maps and permutes each filter's transforms among themselves: exact equivariance.
#[test]
fn transformed_filters_are_exactly_equivariant() {
    let device = Device::flex();
    let (cin, base, n) = (2, 3, 9);
    for transforms in [4, 8] {
        let mut layer = TransformedConv::new(cin, base, transforms, 3, 1, 1, true, &device);
        layer.weight = burn::module::Param::from_tensor(
            Tensor::<1>::from_floats(values(base * cin * 9, 3).as_slice(), &device)
                .reshape([base, cin, 3, 3]),
        );
        let x = values(cin * n * n, 5);
        let run = |x: &[f32]| -> Vec<f32> {
            let t = Tensor::<1>::from_floats(x, &device).reshape([1, cin, n, n]);
            layer.forward(t).into_data().try_to_vec().unwrap()
        };
        let y = run(&x);
        let g = transforms;
        let plane = n * n;
        let moves: &[bool] = if g == 8 { &[false, true] } else { &[false] };
        for &mirror in moves {
            let y_t = run(&transform_planes(&x, cin, n, mirror));
            let y_then = transform_planes(&y, base * g, n, mirror);
            for b in 0..base {
                let mut used = vec![false; g];
                for t in 0..g {
                    let got = &y_t[(b * g + t) * plane..][..plane];
                    let m = (0..g).find(|&s| {
                        !used[s]
                            && got
                                .iter()
                                .zip(&y_then[(b * g + s) * plane..][..plane])
                                .all(|(a, e)| (a - e).abs() <= 1e-5 * (1.0 + e.abs()))
                    });
                    let m = m.unwrap_or_else(|| {
                        panic!("G={g} mirror={mirror}: output {b}/{t} is no transform's map")
                    });
                    used[m] = true;
                }
            }
        }
    }
}

/// The fire module's concatenation: Burn's gradient of a weighted sum of its output with
/// respect to the input equals central finite differences (the squeeze's ReLU left out: a
/// finite difference across its kink is not a derivative).
#[test]
fn fire_concatenation_gradient_matches_finite_differences() {
    let arch = Arch {
        name: "fire".into(),
        input: [3, 5, 5],
        classes: 10 * 25,
        layers: vec![
            conv(3, 2, 1, 1, 0, true),
            LayerSpec::Concat {
                branches: vec![
                    vec![conv(2, 4, 1, 1, 0, true)],
                    vec![conv(2, 6, 3, 1, 1, true)],
                ],
            },
            LayerSpec::Flatten,
        ],
    };
    let ad = Device::flex().autodiff();
    let net = Network::seeded(&arch, &ad, 3).unwrap();
    let weights = values(250, 9);
    let loss_of = |x: Tensor<4>| -> Tensor<1> {
        let w = Tensor::<1>::from_floats(weights.as_slice(), &x.device()).reshape([1, 250]);
        (net.forward(x) * w).sum()
    };
    let x0 = values(75, 11);
    let x = Tensor::<1>::from_floats(x0.as_slice(), &ad)
        .reshape([1, 3, 5, 5])
        .require_grad();
    let grads = loss_of(x.clone()).backward();
    let g: Vec<f32> = x.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
    let eps = 1e-2f32;
    let mut fd = Vec::new();
    for i in 0..75 {
        let at = |d: f32| {
            let mut v = x0.clone();
            v[i] += d;
            let t = Tensor::<1>::from_floats(v.as_slice(), &ad).reshape([1, 3, 5, 5]);
            loss_of(t).into_scalar::<f32>()
        };
        fd.push((at(eps) - at(-eps)) / (2.0 * eps));
    }
    assert_close(&g, &fd, 2e-2, "fire input gradient");
}

/// A small CNN with every form applied to its middle convolution (CReLU also to its hidden
/// dense layer): the runtime (transformed filters expanded once, concatenations, CReLU)
/// gives Burn's outputs.
#[test]
fn runtime_matches_burn_on_every_rewrite() {
    let arch = Arch {
        name: "small".into(),
        input: [1, 8, 8],
        classes: 10,
        layers: vec![
            conv(1, 8, 3, 1, 1, false),
            bn(8),
            LayerSpec::Relu,
            conv(8, 8, 3, 1, 1, false),
            bn(8),
            LayerSpec::Relu,
            maxpool(2),
            LayerSpec::Flatten,
            linear(128, 16),
            LayerSpec::Relu,
            linear(16, 10),
        ],
    };
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    for form in [
        Form::Separable,
        Form::Fire,
        Form::Crelu,
        Form::Rotations,
        Form::Dihedral,
    ] {
        let mut paths = vec!["layers.3".to_string()];
        if form == Form::Crelu {
            paths.push("layers.8".into());
        }
        let r = compact::rewrite(&arch, None, &paths, options(form)).unwrap();
        let net = Network::seeded(&r.arch, &device, 7).unwrap();
        let file = dir.path().join(format!("{}.safetensors", form.name()));
        convpress::checkpoint::save(&file, &net, &common::meta()).unwrap();
        let runtime = convpress::runtime::model::SparseModel::load(&file).unwrap();
        let x = values(4 * 64, 13);
        let burn: Vec<f32> = net
            .valid()
            .forward(Tensor::<1>::from_floats(x.as_slice(), &device).reshape([4, 1, 8, 8]))
            .into_data()
            .try_to_vec()
            .unwrap();
        assert_close(&runtime.forward(&x, 4), &burn, 1e-4, form.name());
        // The file holds the compact form: transformed layers store only their learned filters.
        let (loaded, _) = convpress::checkpoint::load(&file, &device).unwrap();
        assert_eq!(loaded.arch.num_params(), r.arch.num_params());
    }
}
