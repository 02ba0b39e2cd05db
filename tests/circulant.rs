//! Circulant layers (Cheng et al. 2015): the FFT path equals the explicit circulant matrix
//! product in values and gradients on square, wide, tall and odd sizes; the explicit
//! gradients equal finite differences; through Burn the layer's gradients equal those of the
//! same product written in Burn's ops; the runtime kernel equals its dense equivalent.

mod common;

use burn::prelude::*;
use common::{assert_close, values};
use convpress::kernels::circulant::{self, CirculantPlan, CirculantShape, Wanted, reference};
use convpress::kernels::extension::{self, Signs};
use convpress::kernels::{Ops, with_ops};
use convpress::runtime::LinearKernel;
use convpress::runtime::circulant::CirculantLinear;
use std::sync::Arc;

/// `(batch, in, out)`: square, wide, tall, odd, a power of two, one, and the last two large
/// enough (batch x d of 64K and more) to be split across threads.
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
    (80, 1024, 700),
    (70, 500, 1000),
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

#[test]
fn projection_recovers_a_circulant_weight_and_is_the_least_squares_fit() {
    use convpress::compress::circulant::project;
    for (i, &(n_in, n_out)) in [(13, 5), (5, 13), (8, 8), (1, 1)].iter().enumerate() {
        let d = n_in.max(n_out);
        let r = values(d, 70 + i as u64);
        let s = circulant::signs(i as u64, n_in);
        // Burn's layout [in, out]: w[j][o] = r[(o - j) mod d] * s[j].
        let mut w = vec![0.0; n_in * n_out];
        for j in 0..n_in {
            for o in 0..n_out {
                w[j * n_out + o] = r[(o + d - j) % d] * s[j];
            }
        }
        let back = project(n_in, n_out, &w, &s);
        assert_close(&back, &r, 1e-6, &format!("{n_in}x{n_out} projection"));
    }
    // On any weight, moving the fit makes its error larger.
    let (n_in, n_out) = (12, 7);
    let w = values(n_in * n_out, 3);
    let s = circulant::signs(5, n_in);
    let err = |r: &[f32]| -> f64 {
        let d = r.len();
        let mut e = 0.0;
        for j in 0..n_in {
            for o in 0..n_out {
                let c = (r[(o + d - j) % d] * s[j]) as f64;
                e += (w[j * n_out + o] as f64 - c).powi(2);
            }
        }
        e
    };
    let best = project(n_in, n_out, &w, &s);
    for k in 0..best.len() {
        for delta in [-1e-2f32, 1e-2] {
            let mut moved = best.clone();
            moved[k] += delta;
            assert!(
                err(&moved) > err(&best),
                "moving r[{k}] by {delta} lowers the error"
            );
        }
    }
}

#[test]
fn a_circulant_layer_learns_through_burns_optimizer() {
    use burn::optim::{GradientsParams, SgdConfig};
    use convpress::models::network::Circulant;
    let device = Device::flex().autodiff();
    device.seed(3);
    // Teacher: a random circulant map 24 -> 10; student: a fresh layer of the same shape.
    let teacher = Circulant::new(24, 10, true, 9, &device);
    let mut student = Circulant::new(24, 10, true, 9, &device);
    let mut optim = SgdConfig::new().init();
    let x = tensor(values(64 * 24, 4), [64, 24], &device);
    let target = teacher.forward(x.clone()).detach();
    let loss_of = |m: &Circulant| -> f32 {
        let d = m.forward(x.clone()) - target.clone();
        (d.clone() * d).mean().into_scalar()
    };
    let first = loss_of(&student);
    for _ in 0..200 {
        let d = student.forward(x.clone()) - target.clone();
        let grads = (d.clone() * d).mean().backward();
        let grads = GradientsParams::from_grads(grads, &student);
        student = optim.step(0.05, student, grads);
    }
    let last = loss_of(&student);
    assert!(last < first / 100.0, "loss {first} -> {last}");
}

/// LeNet-300-100 with random weights, its hidden layers circulant (projected).
fn circulant_lenet300() -> (
    convpress::models::Arch,
    convpress::compress::circulant::Replaced,
) {
    use convpress::compress::circulant::{Init, default_layers, replace};
    use convpress::models::{ModelKind, Network};
    let arch = ModelKind::Lenet300.arch([1, 28, 28], 10).unwrap();
    let net = Network::seeded(&arch, &Device::default(), 2).unwrap();
    let tensors = convpress::checkpoint::tensor_map(&net);
    let paths = default_layers(&arch);
    assert_eq!(
        paths,
        ["layers.1", "layers.3"],
        "hidden layers, not the classifier"
    );
    let r = replace(&arch, &tensors, &paths, Init::Project, 11).unwrap();
    (arch, r)
}

#[test]
fn a_circulant_model_saves_loads_and_runs_like_any_other() {
    use convpress::checkpoint::{load_tensors, tensor_map};
    use convpress::models::Network;
    use convpress::runtime::model::SparseModel;
    let (arch, r) = circulant_lenet300();
    let kinds: Vec<&str> = r.arch.layer_stats().iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            "flatten",
            "circulant",
            "relu",
            "circulant",
            "relu",
            "linear"
        ]
    );
    // O(d) per layer: 784 + 300 bias, 300 + 100 bias, and the dense classifier.
    assert_eq!(r.arch.num_params(), 784 + 300 + 300 + 100 + 100 * 10 + 10);
    assert_eq!(r.layers[0].params, [784 * 300 + 300, 784 + 300]);
    assert!(r.arch.flops() < arch.flops() / 5);
    let device = Device::default();
    let net = load_tensors(Network::new(&r.arch, &device).unwrap(), r.tensors.clone()).unwrap();
    let x = values(3 * 784, 12);
    let images = tensor(x.clone(), [3, 1, 28, 28], &device);
    let scores: Vec<f32> = net
        .forward(images.clone())
        .into_data()
        .try_to_vec()
        .unwrap();
    // Burn's ops (the explicit matrix) give the same scores.
    let burn: Vec<f32> = with_ops(Ops::Burn, || {
        net.forward(images.clone())
            .into_data()
            .try_to_vec()
            .unwrap()
    });
    assert_close(&burn, &scores, 1e-4, "burn's ops");
    // Saved and loaded: same architecture, same scores; the runtime agrees.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.safetensors");
    convpress::checkpoint::save(&file, &net, &common::meta()).unwrap();
    let (back, _) = convpress::checkpoint::load(&file, &device).unwrap();
    assert_eq!(back.arch, r.arch);
    assert_eq!(tensor_map(&back).len(), tensor_map(&net).len());
    let again: Vec<f32> = back.forward(images).into_data().try_to_vec().unwrap();
    assert_eq!(again, scores);
    let runtime = SparseModel::load(&file).unwrap();
    assert_close(&runtime.forward(&x, 3), &scores, 1e-4, "runtime");
    let circulant_layers = runtime
        .layers()
        .into_iter()
        .filter(|l| l.kernel == "fft")
        .count();
    assert_eq!(circulant_layers, 2);
}

#[test]
fn circulant_stage_refuses_non_dense_layers_and_unknown_keys() {
    use convpress::models::ModelKind;
    use convpress::pipeline::layers::LayerRules;
    use convpress::pipeline::recipe::Recipe;
    use convpress::pipeline::stages::circulant::{Circulant, CirculantParams};
    let stage = |layers: &[&str]| Circulant {
        params: CirculantParams {
            init: Default::default(),
            sign_seed: 0,
            layer_seconds: 1.0,
        },
        layers: LayerRules(
            layers
                .iter()
                .map(|p| (p.to_string(), Default::default()))
                .collect(),
        ),
    };
    let lenet5 = ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap();
    assert_eq!(stage(&[]).chosen(&lenet5).unwrap(), ["layers.5"]);
    let e = stage(&["layers.0"]).chosen(&lenet5).unwrap_err();
    assert!(
        e.starts_with("layers.0 is a conv2d layer") && e.contains("dense"),
        "{e}"
    );
    let e = stage(&["layers.9"]).chosen(&lenet5).unwrap_err();
    assert!(e.contains("matches no layer"), "{e}");
    let resnet = ModelKind::Resnet20.arch([1, 32, 32], 10).unwrap();
    let e = stage(&[]).chosen(&resnet).unwrap_err();
    assert!(e.contains("no dense layer before its last"), "{e}");
    // Made circulant twice: refused.
    let (_, r) = circulant_lenet300();
    let e = stage(&["layers.1"]).chosen(&r.arch).unwrap_err();
    assert!(e.contains("circulant already"), "{e}");
    // Recipe keys.
    let parse = |t: &str| Recipe::parse(std::path::Path::new("r.toml"), t.to_string());
    let r = parse(
        "[[stage]]\nkind = \"circulant\"\ninit = \"random\"\nsign-seed = 4\n[stage.layers]\n\"layers.1\" = {}\n",
    )
    .unwrap();
    let s = r.stages[0].stage.settings();
    assert_eq!(s["params"]["init"], "random");
    assert_eq!(s["params"]["sign-seed"], 4);
    for bad in [
        "[[stage]]\nkind = \"circulant\"\nseed = 4\n",
        "[[stage]]\nkind = \"circulant\"\n[stage.layers]\n\"layers.1\" = { rank = 3 }\n",
    ] {
        let e = format!("{:#}", parse(bad).err().expect("refused"));
        assert!(e.contains("seed") || e.contains("rank"), "{e}");
    }
}

#[test]
fn the_command_refuses_a_conv_layer_before_writing_anything() {
    use convpress::models::{ModelKind, Network};
    let dir = tempfile::tempdir().unwrap();
    let arch = ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap();
    let net = Network::seeded(&arch, &Device::default(), 1).unwrap();
    let file = dir.path().join("m.safetensors");
    convpress::checkpoint::save(&file, &net, &common::meta()).unwrap();
    let run = dir.path().join("run");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_convpress"))
        .args(["circulant", "--checkpoint", file.to_str().unwrap()])
        .args(["--layers", "layers.2", "--run-dir", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("layers.2 is a conv2d layer"), "{err}");
    assert!(!run.exists(), "nothing is written");
}

#[test]
fn gradients_are_the_same_on_any_number_of_threads_and_at_batch_zero() {
    let c = &(80, 1024, 700);
    let (s, x, r, _, signs) = case(7, c);
    let g = values(s.batch * s.out_features, 90);
    let plan = CirculantPlan::new(s.d());
    let many = plan.backward(&s, &x, &r, &signs, &g, ALL);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| plan.backward(&s, &x, &r, &signs, &g, ALL));
    assert_eq!(many, one, "bit for bit");
    let bias_only = Wanted {
        x: false,
        r: false,
        bias: true,
    };
    let b = plan.backward(&s, &x, &r, &signs, &g, bias_only);
    assert!(b.x.is_none() && b.r.is_none());
    assert_eq!(b.bias, many.bias);
    let empty = CirculantShape { batch: 0, ..s };
    let z = plan.backward(&empty, &[], &r, &signs, &[], ALL);
    assert_eq!(z.x.unwrap().len(), 0);
    assert!(z.r.unwrap().iter().all(|&v| v == 0.0));
    assert!(z.bias.unwrap().iter().all(|&v| v == 0.0));
    assert!(plan.forward(&empty, &[], &r, &signs, None).is_empty());
}
