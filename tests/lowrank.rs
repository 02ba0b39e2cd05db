//! Low-rank factorization: each method reproduces the layer at full rank, truncation costs
//! what the discarded singular values say, the factor sequence computes the convolution with
//! the rebuilt kernel, CP-ALS descends and recovers a known low-rank tensor, VBMF finds a
//! planted rank, and a decomposed model is an ordinary model (same outputs, saved and loaded).

mod common;

use burn::prelude::*;
use convpress::checkpoint::{Tensors, load_tensors, tensor_map};
use convpress::compress::lowrank::{
    self, Factor, LayerWeights, Method, RankRule, cp, linalg, reconstruct, relative_error, vbmf,
};
use convpress::models::{Arch, LayerSpec, ModelKind, Network};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

fn conv(
    cin: usize,
    cout: usize,
    k: [usize; 2],
    stride: usize,
    pad: usize,
    bias: bool,
) -> LayerSpec {
    LayerSpec::Conv2d {
        in_channels: cin,
        out_channels: cout,
        kernel: k,
        stride: [stride; 2],
        padding: [pad; 2],
        pad_extra: [0, 0],
        dilation: [1, 1],
        groups: 1,
        bias,
    }
}

fn weights_of(spec: &LayerSpec, seed: u64) -> (Vec<f32>, Option<Vec<f32>>) {
    let n: usize = lowrank::weight_shape(spec).iter().product();
    let bias = match *spec {
        LayerSpec::Conv2d {
            out_channels,
            bias: true,
            ..
        } => Some(common::uniform(out_channels, seed + 1, -1.0, 1.0)),
        LayerSpec::Linear {
            out_features,
            bias: true,
            ..
        } => Some(common::uniform(out_features, seed + 1, -1.0, 1.0)),
        _ => None,
    };
    (common::uniform(n, seed, -1.0, 1.0), bias)
}

fn factors(
    method: Method,
    spec: &LayerSpec,
    w: &[f32],
    b: Option<&[f32]>,
    rank: &[usize],
) -> Vec<Factor> {
    let layer = LayerWeights {
        spec,
        weight: w,
        bias: b,
    };
    let rank = lowrank::choose_rank(method, &layer, &RankRule::Rank(rank.to_vec())).unwrap();
    method.factorization().factorize(&layer, &rank).unwrap()
}

#[test]
fn full_rank_reproduces_the_kernel() {
    let cases: Vec<(Method, LayerSpec)> = vec![
        (
            Method::Svd,
            LayerSpec::Linear {
                in_features: 30,
                out_features: 12,
                bias: true,
            },
        ),
        (Method::Separable, conv(6, 8, [3, 3], 1, 1, true)),
        (Method::Separable, conv(4, 5, [5, 3], 2, 0, false)),
        (Method::Tucker2, conv(6, 8, [3, 3], 1, 1, true)),
        (Method::Tucker2, conv(1, 20, [5, 5], 1, 0, true)),
    ];
    for (method, spec) in cases {
        let (w, b) = weights_of(&spec, 7);
        let max = method.factorization().max_rank(&spec);
        let fs = factors(method, &spec, &w, b.as_deref(), &max);
        let rebuilt = reconstruct(&spec, &fs).unwrap();
        let err = relative_error(&w, &rebuilt);
        assert!(
            err < 1e-5,
            "{method:?} {spec:?}: relative error {err} at full rank"
        );
    }
}

#[test]
fn truncated_svd_error_is_the_discarded_singular_values() {
    let spec = LayerSpec::Linear {
        in_features: 40,
        out_features: 25,
        bias: false,
    };
    let (w, _) = weights_of(&spec, 3);
    let s = linalg::singular_values(&linalg::matrix(&w, 40, 25)).unwrap();
    let total: f64 = s.iter().map(|x| x * x).sum();
    for r in [1, 5, 12, 24] {
        let fs = factors(Method::Svd, &spec, &w, None, &[r]);
        let rebuilt = reconstruct(&spec, &fs).unwrap();
        let err = relative_error(&w, &rebuilt);
        let expect = (s[r..].iter().map(|x| x * x).sum::<f64>() / total).sqrt();
        assert!((err - expect).abs() < 1e-5, "rank {r}: {err} vs {expect}");
    }
}

/// Runs `layers` (from a spec list with weights) on `x` through Burn, as a network would.
fn run_layers(specs: &[Factor], x: Tensor<4>, device: &Device) -> Vec<f32> {
    let [_, c, h, w] = x.dims();
    let mut layers: Vec<LayerSpec> = specs.iter().map(|f| f.spec.clone()).collect();
    let out = Arch {
        name: "probe".into(),
        input: [c, h, w],
        classes: 1,
        layers: layers.clone(),
    };
    let shape = out.layer_stats().last().map(|s| s.output.numel()).unwrap();
    layers.push(LayerSpec::Flatten);
    let arch = Arch {
        classes: shape,
        layers,
        ..out
    };
    let mut tensors = Tensors::new();
    for (i, f) in specs.iter().enumerate() {
        let shape = lowrank::weight_shape(&f.spec);
        tensors.insert(
            format!("layers.{i}.weight"),
            (TensorData::new(f.weight.clone(), shape), None),
        );
        if let Some(b) = &f.bias {
            tensors.insert(
                format!("layers.{i}.bias"),
                (TensorData::new(b.clone(), [b.len()]), None),
            );
        }
    }
    let net = load_tensors(Network::new(&arch, device).unwrap(), tensors).unwrap();
    net.forward(x).into_data().try_to_vec().unwrap()
}

fn image(shape: [usize; 4], seed: u64, device: &Device) -> Tensor<4> {
    let n = shape.iter().product();
    Tensor::from_data(
        TensorData::new(common::uniform(n, seed, -1.0, 1.0), shape),
        device,
    )
}

#[test]
fn factor_sequence_is_the_convolution_with_the_rebuilt_kernel() {
    let device = Device::default();
    let cases = [
        (Method::Separable, conv(5, 7, [3, 3], 1, 1, true), vec![4]),
        (Method::Separable, conv(5, 7, [3, 3], 2, 1, false), vec![3]),
        (Method::Tucker2, conv(6, 8, [3, 3], 2, 1, true), vec![3, 4]),
        (Method::Tucker2, conv(6, 8, [5, 5], 1, 2, false), vec![6, 2]),
        (Method::Cp, conv(6, 8, [3, 3], 1, 1, true), vec![5]),
        (Method::Cp, conv(4, 6, [5, 5], 2, 2, true), vec![7]),
    ];
    for (method, spec, rank) in cases {
        let (w, b) = weights_of(&spec, 11);
        let fs = factors(method, &spec, &w, b.as_deref(), &rank);
        let rebuilt = reconstruct(&spec, &fs).unwrap();
        let single = Factor {
            spec: spec.clone(),
            weight: rebuilt,
            bias: b.clone(),
        };
        let LayerSpec::Conv2d { in_channels, .. } = spec else {
            unreachable!()
        };
        let x = image([2, in_channels, 11, 9], 5, &device);
        let seq = run_layers(&fs, x.clone(), &device);
        let one = run_layers(&[single], x, &device);
        assert_eq!(seq.len(), one.len(), "{method:?}");
        let scale = one.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (i, (a, c)) in seq.iter().zip(&one).enumerate() {
            assert!(
                (a - c).abs() < 1e-4 * scale,
                "{method:?} output {i}: {a} vs {c}"
            );
        }
    }
}

#[test]
fn cp_als_descends_and_recovers_a_low_rank_kernel() {
    let shape = [8, 6, 3, 3];
    let r = 3;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let f: Vec<Vec<f64>> = shape
        .iter()
        .map(|&n| (0..n * r).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let mut t = vec![0f32; shape.iter().product()];
    for (flat, v) in t.iter_mut().enumerate() {
        let idx = [flat / 54, flat / 9 % 6, flat / 3 % 3, flat % 3];
        *v = (0..r)
            .map(|k| (0..4).map(|m| f[m][idx[m] * r + k]).product::<f64>())
            .sum::<f64>() as f32;
    }
    let res = cp::cp_als(&t, shape, r, 0).unwrap();
    for w in res.errors.windows(2) {
        assert!(
            w[1] <= w[0] * (1.0 + 1e-9) + 1e-12,
            "error rose: {:?}",
            res.errors
        );
    }
    let last = *res.errors.last().unwrap();
    assert!(
        last < 1e-4,
        "rank-3 tensor not recovered: error {last} after {} sweeps",
        res.errors.len()
    );

    // On a random (full-rank) kernel the error also never rises, and more rank fits better.
    let w = common::uniform(8 * 6 * 9, 4, -1.0, 1.0);
    let mut finals = Vec::new();
    for r in [2, 6, 12] {
        let res = cp::cp_als(&w, shape, r, 0).unwrap();
        for p in res.errors.windows(2) {
            assert!(
                p[1] <= p[0] * (1.0 + 1e-9) + 1e-12,
                "rank {r}: error rose {p:?}"
            );
        }
        finals.push(*res.errors.last().unwrap());
    }
    assert!(finals[0] > finals[1] && finals[1] > finals[2], "{finals:?}");
}

#[test]
fn vbmf_finds_a_planted_rank() {
    let (l, m, r) = (40, 90, 5);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut normal = || -> f64 {
        // Box-Muller: the test's own noise source.
        let (u, v): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random_range(0.0..1.0));
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    };
    let a: Vec<f64> = (0..l * r).map(|_| normal()).collect();
    let b: Vec<f64> = (0..m * r).map(|_| normal()).collect();
    let y = faer::Mat::from_fn(l, m, |i, j| {
        (0..r).map(|k| a[i * r + k] * b[j * r + k]).sum::<f64>() + 0.3 * normal()
    });
    assert_eq!(vbmf::rank(&y).unwrap(), r);
    assert_eq!(vbmf::rank(&y.transpose().to_owned()).unwrap(), r);
    // Pure noise keeps nothing beyond the minimum of one.
    let noise = faer::Mat::from_fn(l, m, |_, _| normal());
    assert_eq!(vbmf::rank(&noise).unwrap(), 1);
}

#[test]
fn rank_rules_and_bad_ranks() {
    let spec = conv(20, 50, [5, 5], 1, 0, true);
    let (w, b) = weights_of(&spec, 1);
    let layer = LayerWeights {
        spec: &spec,
        weight: &w,
        bias: b.as_deref(),
    };
    // Compression: the factors fit in 1/c of the parameters, and one more rank would not.
    for method in [Method::Separable, Method::Cp, Method::Tucker2] {
        let f = method.factorization();
        let r = lowrank::choose_rank(method, &layer, &RankRule::Compression(4.0)).unwrap();
        let params = |r: &Vec<usize>| {
            f.specs(&spec, r)
                .iter()
                .map(LayerSpec::own_params)
                .sum::<usize>()
        };
        assert!(
            params(&r) as f64 <= spec.own_params() as f64 / 4.0,
            "{method:?} {r:?}"
        );
        let bigger: Vec<usize> = r.iter().map(|x| x + 1).collect();
        assert!(
            params(&bigger) as f64 > spec.own_params() as f64 / 4.0,
            "{method:?} {r:?}"
        );
    }
    // Energy 1 keeps everything; a small energy keeps little.
    let full = lowrank::choose_rank(Method::Separable, &layer, &RankRule::Energy(1.0)).unwrap();
    assert_eq!(full, vec![100]);
    let small = lowrank::choose_rank(Method::Separable, &layer, &RankRule::Energy(0.2)).unwrap();
    assert!(small[0] < 30, "{small:?}");
    // Bad ranks are refused with the reason.
    let e = lowrank::choose_rank(Method::Separable, &layer, &RankRule::Rank(vec![0])).unwrap_err();
    assert!(e.contains("positive"), "{e}");
    let e =
        lowrank::choose_rank(Method::Separable, &layer, &RankRule::Rank(vec![101])).unwrap_err();
    assert!(e.contains("above the largest meaningful rank 100"), "{e}");
    let e = lowrank::choose_rank(Method::Cp, &layer, &RankRule::Energy(0.9)).unwrap_err();
    assert!(e.contains("give a rank or a compression"), "{e}");
    let lin = LayerSpec::Linear {
        in_features: 8,
        out_features: 4,
        bias: true,
    };
    let e = Method::Tucker2.factorization().check(&lin).unwrap_err();
    assert!(e.contains("not a convolution") && e.contains("svd"), "{e}");
    let e = Method::Svd.factorization().check(&spec).unwrap_err();
    assert!(e.contains("not a dense layer"), "{e}");
    let e = Method::Separable
        .factorization()
        .check(&conv(4, 4, [1, 3], 1, 0, true))
        .unwrap_err();
    assert!(e.contains("already separable"), "{e}");
}

#[test]
fn decomposed_lenet5_and_resnet20_are_ordinary_models() {
    let device = Device::default();
    for (kind, input, method, rank) in [
        (ModelKind::Lenet5, [1, 28, 28], Method::Separable, None),
        (ModelKind::Lenet5, [1, 28, 28], Method::Tucker2, None),
        (ModelKind::Lenet5, [1, 28, 28], Method::Cp, Some(vec![500])),
        (ModelKind::Lenet5, [1, 28, 28], Method::Svd, None),
        (ModelKind::Resnet20, [1, 32, 32], Method::Tucker2, None),
    ] {
        let arch = kind.arch(input, 10).unwrap();
        let net = Network::seeded(&arch, &device, 1).unwrap();
        let tensors = tensor_map(&net);
        // Full rank everywhere it applies (CP: a high rank): outputs barely move.
        let mut rules = BTreeMap::new();
        for (path, ok) in lowrank::eligibility(&arch, method) {
            if ok.is_ok() {
                let spec = arch.layer_specs()[&path];
                let max = method.factorization().max_rank(spec);
                let r = rank.clone().map_or(max.clone(), |r| vec![r[0].min(max[0])]);
                rules.insert(path, RankRule::Rank(r));
            }
        }
        assert!(!rules.is_empty(), "{kind:?} {method:?}");
        let d = lowrank::decompose(&arch, &tensors, method, &rules).unwrap();
        assert_eq!(d.layers.len(), rules.len());
        let dnet = load_tensors(Network::new(&d.arch, &device).unwrap(), d.tensors).unwrap();
        let x = image([3, input[0], input[1], input[2]], 8, &device);
        let a: Vec<f32> = net.forward(x.clone()).into_data().try_to_vec().unwrap();
        let b: Vec<f32> = dnet.forward(x).into_data().try_to_vec().unwrap();
        let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let tol = if method == Method::Cp { 0.05 } else { 1e-3 };
        for (p, q) in a.iter().zip(&b) {
            assert!(
                (p - q).abs() < tol * scale,
                "{kind:?} {method:?}: {p} vs {q}"
            );
        }
        // Saved and loaded, the decomposed model gives the same scores.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.safetensors");
        convpress::checkpoint::save(&file, &dnet, &common::meta()).unwrap();
        let (back, _) = convpress::checkpoint::load(&file, &device).unwrap();
        assert_eq!(back.arch, d.arch);
        let x = image([2, input[0], input[1], input[2]], 9, &device);
        let c: Vec<f32> = dnet.forward(x.clone()).into_data().try_to_vec().unwrap();
        let e: Vec<f32> = back.forward(x).into_data().try_to_vec().unwrap();
        assert_eq!(c, e);
    }
}

#[test]
fn decompose_stage_reads_its_recipe_keys_and_refuses_bad_ones() {
    use convpress::pipeline::recipe::Recipe;
    let parse = |t: &str| Recipe::parse(std::path::Path::new("r.toml"), t.to_string());
    let refused = |t: &str| match parse(t) {
        Ok(_) => panic!("should be refused: {t}"),
        Err(e) => format!("{e:#}"),
    };
    let r = parse(
        "[[stage]]\nkind = \"decompose\"\nmethod = \"tucker2\"\nrank = [4, 8]\n[stage.layers]\n\"layers.2\" = {}\n\"layers.0\" = { vbmf = true }\n",
    )
    .unwrap();
    let s = r.stages[0].stage.settings();
    assert_eq!(s["params"]["method"], "tucker2");
    assert_eq!(s["params"]["rank"], serde_json::json!([4, 8]));
    assert_eq!(s["params"]["layer-seconds"], 1.0);
    let r = parse("[[stage]]\nkind = \"decompose\"\nmethod = \"separable\"\nrank = 8\n").unwrap();
    assert_eq!(
        r.stages[0].stage.settings()["params"]["rank"],
        serde_json::json!([8])
    );
    let e = refused("[[stage]]\nkind = \"decompose\"\nmethod = \"cp\"\nrnak = 8\n");
    assert!(e.contains("rnak"), "{e}");
    let e = refused(
        "[[stage]]\nkind = \"decompose\"\nmethod = \"cp\"\n[stage.layers]\n\"layers.2\" = { rnak = 8 }\n",
    );
    assert!(e.contains("rnak"), "{e}");
}

#[test]
fn default_choice_leaves_layers_a_rule_cannot_reach_and_named_ones_are_refused() {
    use convpress::pipeline::layers::LayerRules;
    use convpress::pipeline::stages::decompose::{Decompose, DecomposeParams, RuleParams};
    let device = Device::default();
    let arch = ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap();
    let tensors = tensor_map(&Network::seeded(&arch, &device, 1).unwrap());
    let stage = |layers: &[&str]| Decompose {
        params: DecomposeParams {
            method: Method::Separable,
            rule: RuleParams {
                compression: Some(8.0),
                ..Default::default()
            },
            layer_seconds: 1.0,
        },
        layers: LayerRules(
            layers
                .iter()
                .map(|p| (p.to_string(), Default::default()))
                .collect(),
        ),
    };
    // conv1 (1 -> 20 channels, 5x5) cannot lose 7/8 of its weights at rank 1: the default
    // choice leaves it, with why, and factorizes conv2.
    let (chosen, left) = stage(&[]).choose(&arch, &tensors).unwrap();
    assert_eq!(chosen.keys().collect::<Vec<_>>(), ["layers.2"]);
    assert!(left["layers.0"].contains("1/8"), "{left:?}");
    // Named, it is an error that says which layer.
    let e = stage(&["layers.0"]).choose(&arch, &tensors).unwrap_err();
    assert!(e.starts_with("layers.0: ") && e.contains("1/8"), "{e}");
}

#[test]
fn tradeoff_chart_has_one_sorted_line_per_method_and_the_dense_guides() {
    use convpress::pipeline::stages::decompose::tradeoff::{Point, Tradeoff};
    let point = |method, c: f64, ms: f64, acc| Point {
        method,
        compression: c,
        ranks: "layers.2:8".into(),
        layer_params: [100, 50],
        layer_flops: [1000, 500],
        layer_b1_ms: [1.0, 0.5],
        layer_b64_ms: [ms, 1.0],
        model_b64_ms: [2.0, 1.5],
        accuracy_factored: 0.9,
        accuracy_finetuned: Some(acc),
        dir: "d".into(),
    };
    let t = Tradeoff {
        model: "lenet5".into(),
        accuracy_dense: 0.99,
        test_images: 10,
        finetune: Default::default(),
        threads: 2,
        points: vec![
            point(Method::Separable, 4.0, 3.0, 0.985),
            point(Method::Separable, 2.0, 1.5, 0.99),
            point(Method::Cp, 2.0, 2.0, 0.98),
        ],
    };
    let chart = t.chart("t");
    assert_eq!(chart.series.len(), 2);
    assert_eq!(chart.series[0].name, "separable");
    let xs: Vec<f64> = chart.series[0].points.iter().map(|p| p.0).collect();
    assert_eq!(xs, [1.5, 3.0]);
    assert!((chart.series[0].points[1].1 - 98.5).abs() < 1e-9);
    assert!((chart.guides[1].0 - 98.0).abs() < 1e-9);
    assert_eq!(t.to_csv().lines().count(), 4);
    assert!(t.table().contains("3.00x"), "{}", t.table());
}
