//! Binary and ternary weights (`compress::binarize`): each method's forward values on
//! hand-checked examples, the clipped straight-through gradient, stochastic binarization's
//! expectation, the written weights against the training ones, and the refusals of the
//! `binarize` command before any work.

mod common;

use burn::prelude::*;
use convpress::compress::binarize::{
    Method, binarize_conv, binarize_linear, binarize_weight, loss_aware_scale,
};
use std::process::Command;

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec().unwrap()
}

/// Two filters of 4 weights (`[2, 1, 2, 2]`).
const W: [f32; 8] = [0.5, -0.1, 0.0, -0.3, 2.0, -0.2, 0.1, -0.1];

#[test]
fn each_method_gives_the_papers_values() {
    let d = Device::flex();
    let w = || Tensor::<4>::from_data(TensorData::new(W.to_vec(), [2, 1, 2, 2]), &d);
    // BinaryConnect: H·sign, with sign(0) = +1, H = √(1.5 / (fan_in + fan_out)) = √(1.5 / 12).
    let h = convpress::compress::binarize::glorot_scale(&[2, 1, 2, 2], false);
    assert!((h - (1.5f32 / 12.0).sqrt()).abs() < 1e-7);
    let bc = values(binarize_conv(Method::BinaryConnect, w(), None));
    let signs = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0];
    assert_eq!(bc, signs.map(|s| s * h).to_vec());
    // BWN: mean |w| per filter, 0.225 and 0.6.
    let bwn = values(binarize_conv(Method::Bwn, w(), None));
    let want = [0.225, -0.225, 0.225, -0.225, 0.6, -0.6, 0.6, -0.6];
    for (a, b) in bwn.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{bwn:?}");
    }
    // TWN: Δ = 0.7 mean |w| (0.1575 and 0.42); kept 0.5, -0.3 (α 0.4) and 2.0 (α 2).
    let twn = values(binarize_conv(Method::Twn, w(), None));
    let want = [0.4, 0.0, 0.0, -0.4, 2.0, 0.0, 0.0, 0.0];
    for (a, b) in twn.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{twn:?}");
    }
    // LAB's closed form: α = ‖d ⊙ w‖₁ / ‖d‖₁ = (1·0.5 + 3·0.1 + 0 + 1·0.3) / 5 = 0.22.
    let a = loss_aware_scale(&[0.5, -0.1, 0.0, -0.3], &[1.0, 3.0, 0.0, 1.0]);
    assert!((a - 0.22).abs() < 1e-6, "{a}");
    let lab = values(binarize_conv(Method::LossAware, w(), Some(a)));
    assert!(lab.iter().all(|v| (v.abs() - 0.22).abs() < 1e-6), "{lab:?}");

    // The written weights are the trained ones (deterministic methods), for conv weights
    // (channels first) and linear ones (Burn's `[in, out]`, channels last).
    for m in [Method::BinaryConnect, Method::Bwn, Method::Twn] {
        // (The forward value is `c + (b − c)` in f32: within an ulp or two of `b`.)
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-6);
        let trained = values(binarize_conv(m, w(), None));
        let written = binarize_weight(m, &W, &[2, 1, 2, 2], false, None);
        assert!(close(&trained, &written), "{m:?}: {trained:?} {written:?}");
        let lw = Tensor::<2>::from_data(TensorData::new(W.to_vec(), [4, 2]), &d);
        let trained = values(binarize_linear(m, lw, None));
        let written = binarize_weight(m, &W, &[4, 2], true, None);
        assert!(
            close(&trained, &written),
            "{m:?} linear: {trained:?} {written:?}"
        );
    }
    // Few multiplications: written rounded to the nearest of {−H, 0, H}.
    let few = binarize_weight(Method::FewMultiplications, &W, &[2, 1, 2, 2], false, None);
    assert_eq!(few, [h, 0.0, 0.0, -h, h, -h, 0.0, 0.0].to_vec());
    // Stochastic binarization is written with the deterministic sign.
    assert_eq!(
        binarize_weight(Method::Stochastic, &W, &[2, 1, 2, 2], false, None),
        bc
    );
}

/// The gradient reaches the latent weight unchanged where |w| <= 1 and not at all outside.
#[test]
fn straight_through_gradients_are_the_identity_inside_the_clip_and_zero_outside() {
    let d = Device::flex().autodiff();
    for m in [
        Method::BinaryConnect,
        Method::Stochastic,
        Method::Bwn,
        Method::Twn,
        Method::LossAware,
        Method::FewMultiplications,
    ] {
        let w =
            Tensor::<4>::from_data(TensorData::new(W.to_vec(), [2, 1, 2, 2]), &d).require_grad();
        let y = binarize_conv(m, w.clone(), Some(0.3));
        let g = values(w.grad(&y.sum().backward()).unwrap());
        // BinaryConnect's bound is its scale H (0.354 here), the others' 1.
        let bound = match m {
            Method::BinaryConnect | Method::Stochastic | Method::FewMultiplications => {
                (1.5f32 / 12.0).sqrt()
            }
            _ => 1.0,
        };
        let want: Vec<f32> = W
            .iter()
            .map(|v| if v.abs() <= bound { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(g, want, "{m:?}");
    }
}

/// E[b] = H·(2·σ(w/H) − 1) = clip(w, −H, H) for stochastic binarization, and
/// H·sign(w)·min(|w|/H, 1) = clip(w, −H, H) for TernaryConnect's (few multiplications): over n
/// draws the mean of b/H is within 5 standard deviations of clip(w/H) (a draw's deviation,
/// `√(1 − (w/H)²)` binary and `√(|w/H| − (w/H)²)` ternary, is at most 1: `1/√n` each).
#[test]
fn stochastic_binarization_is_unbiased_for_the_clipped_weight() {
    let d = Device::flex();
    d.seed(5);
    let n = 20_000;
    // A `[1, n]` linear weight: H = √(1.5 / (1 + n)).
    let h = convpress::compress::binarize::glorot_scale(&[1, n], true);
    for method in [Method::Stochastic, Method::FewMultiplications] {
        for f in [-1.5f32, -0.6, -0.1, 0.0, 0.35, 0.9, 2.0] {
            let t = Tensor::<2>::from_data(TensorData::new(vec![f * h; n], [1, n]), &d);
            let b = values(binarize_linear(method, t, None));
            // Binary: ±H; ternary (few multiplications): 0 or H·sign(w).
            assert!(
                b.iter()
                    .all(|v| (v.abs() - h).abs() < 1e-9 || (method.ternary() && *v == 0.0))
            );
            let mean = b.iter().sum::<f32>() / n as f32 / h;
            let tolerance = 5.0 / (n as f32).sqrt();
            assert!(
                (mean - f.clamp(-1.0, 1.0)).abs() <= tolerance,
                "{method:?} w/H {f}: mean {mean}"
            );
        }
    }
}

fn convpress(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_convpress"))
        .args(args)
        .output()
        .unwrap()
}

/// Bad input is refused with a clear message before any training.
#[test]
fn bad_binarizations_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pruned) = common::pruned_checkpoint(
        convpress::models::ModelKind::Lenet5,
        [1, 28, 28],
        0.5,
        dir.path(),
    );
    let fresh = dir.path().join("fresh.safetensors");
    let f = fresh.to_str().unwrap();
    let out = dir.path().join("b.cpz");
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--float-layers", "last"],
            "layers.0 has one input channel",
        ),
        (
            vec!["--float-layers", "layers.*"],
            "every conv and linear layer is kept in float",
        ),
        (vec!["--method", "dorefa"], "invalid value 'dorefa'"),
        (vec!["--epochs", "0"], "epochs must be at least 1"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["binarize", "--checkpoint", f, "--out", o];
        args.extend(extra);
        let r = convpress(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && err.contains(want), "{args:?}: {err}");
        assert!(!out.exists());
    }
    // A pruned model: its masks beside it.
    let loaded = convpress::checkpoint::read(&pruned).unwrap();
    let (w, _) = convpress::checkpoint::floats(&loaded.tensors, "layers.2.weight").unwrap();
    let mut masks = std::collections::BTreeMap::new();
    masks.insert(
        "layers.2.weight".to_string(),
        w.iter().map(|&v| v != 0.0).collect::<Vec<bool>>(),
    );
    convpress::pipeline::Constraints {
        masks,
        codebooks: Default::default(),
    }
    .save(&pruned)
    .unwrap();
    let r = convpress(&[
        "binarize",
        "--checkpoint",
        pruned.to_str().unwrap(),
        "--out",
        o,
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("the model is pruned"),
        "{err}"
    );
}

/// Power-of-two quantization on a hand-checked example: `sign(x) · 2^round(log2 |x|)`, the
/// exponents within `2^bits` values ending at the largest magnitude's, 0 below.
#[test]
fn inputs_quantize_to_signed_powers_of_two() {
    use convpress::compress::few_multiplications::power_of_two;
    let x = [3.0, -0.7, 0.05, 0.0, 1.5, 0.4];
    // The largest, 3, rounds to 2^2; with 1 bit the exponents are 1 and 2.
    assert_eq!(power_of_two(&x, 1), vec![4.0, 0.0, 0.0, 0.0, 2.0, 0.0]);
    assert_eq!(power_of_two(&x, 3), vec![4.0, -0.5, 0.0625, 0.0, 2.0, 0.5]);
    assert_eq!(power_of_two(&[0.0, 0.0], 3), vec![0.0, 0.0]);
}

/// Few multiplications (Lin et al. 2016): the forward value of a layer is its product on the
/// real input, and in back-propagation the weight gradient is `δ ⊗ x_q` with `x_q` signed powers
/// of two (each product a shift of `δ`'s exponent), the input gradient `δ · W_bᵀ` with `W_b` in
/// {0, ±H} (sign changes, times one factor `H`).
#[test]
fn few_multiplications_back_propagate_with_shifts_and_sign_changes_only() {
    use burn::module::{Param, ParamId};
    use burn::nn::LinearConfig;
    use convpress::compress::few_multiplications::{EXPONENT_BITS, forward, power_of_two};
    use convpress::models::network::{Activation, Layer};
    let d = Device::flex().autodiff();
    d.seed(3);
    let (n_in, n_out, batch) = (6, 3, 4);
    let h = convpress::compress::binarize::glorot_scale(&[n_in, n_out], true);
    let xs = common::uniform(batch * n_in, 1, -3.0, 3.0);
    // Latent weights inside the clip (|w| <= H), where the straight-through gradient is 1.
    let ws = common::uniform(n_in * n_out, 2, -0.95 * h, 0.95 * h);
    let upstream = common::uniform(batch * n_out, 3, -1.0, 1.0);
    let latent = Tensor::<2>::from_data(TensorData::new(ws, [n_in, n_out]), &d).require_grad();
    let mut linear = LinearConfig::new(n_in, n_out).init(&d);
    let ternary = binarize_linear(Method::FewMultiplications, latent.clone(), None);
    linear.weight = Param::initialized(ParamId::new(), ternary.clone());
    let bias_param = linear.bias.as_ref().unwrap().val();
    let bias: Vec<f32> = values(bias_param.clone());
    let wb: Vec<f32> = values(ternary);
    assert!(
        wb.iter().all(|&v| v == 0.0 || (v.abs() - h).abs() < 1e-6),
        "{wb:?}"
    );
    assert!(wb.contains(&0.0) && wb.iter().any(|&v| v != 0.0));
    let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [batch, n_in]), &d).require_grad();
    let Activation::Flat(y) = forward(
        &Layer::Linear(linear),
        Activation::Flat(x.clone()),
        EXPONENT_BITS,
    ) else {
        panic!("a linear layer gives a flat output")
    };
    let c = Tensor::<2>::from_data(TensorData::new(upstream.clone(), [batch, n_out]), &d);
    let grads = (y.clone() * c).sum().backward();
    let (gx, gw) = (
        values(x.grad(&grads).unwrap()),
        values(latent.grad(&grads).unwrap()),
    );
    // The bias gradient is Σ δ over the batch, once (not doubled by the second product).
    let gb = values(bias_param.grad(&grads).unwrap());
    for o in 0..n_out {
        let want: f32 = (0..batch).map(|b| upstream[b * n_out + o]).sum();
        assert!((gb[o] - want).abs() < 1e-5, "bias gradient {gb:?}");
    }
    // The forward value: x · W_b + b, on the real x.
    let y = values(y);
    for b in 0..batch {
        for o in 0..n_out {
            let want: f64 = bias[o] as f64
                + (0..n_in)
                    .map(|i| xs[b * n_in + i] as f64 * wb[i * n_out + o] as f64)
                    .sum::<f64>();
            assert!((y[b * n_out + o] as f64 - want).abs() < 1e-5);
        }
    }
    // The weight gradient on x_q: every x_q is 0 or ±2^k (no mantissa bits), so each product
    // with δ is exact, a shift of δ's exponent.
    let xq = power_of_two(&xs, EXPONENT_BITS);
    assert!(
        xq.iter()
            .all(|v| *v == 0.0 || v.to_bits() & 0x007f_ffff == 0),
        "{xq:?}"
    );
    assert!(xq.iter().zip(&xs).any(|(q, x)| q != x));
    let (mut off_real, mut off_shifted) = (0f64, 0f64);
    for i in 0..n_in {
        for o in 0..n_out {
            let dot = |v: &[f32]| -> f64 {
                (0..batch)
                    .map(|b| v[b * n_in + i] as f64 * upstream[b * n_out + o] as f64)
                    .sum()
            };
            let g = gw[i * n_out + o] as f64;
            off_shifted = off_shifted.max((g - dot(&xq)).abs());
            off_real = off_real.max((g - dot(&xs)).abs());
        }
    }
    assert!(
        off_shifted < 1e-5,
        "weight gradient is not δ ⊗ x_q: {off_shifted}"
    );
    assert!(off_real > 1e-2, "the weight gradient used the real input");
    // The input gradient: δ · W_bᵀ = H · (signed sums of δ).
    for b in 0..batch {
        for i in 0..n_in {
            let signed: f64 = (0..n_out)
                .map(|o| {
                    let w = wb[i * n_out + o];
                    let s = if w == 0.0 { 0.0 } else { w.signum() as f64 };
                    s * upstream[b * n_out + o] as f64
                })
                .sum();
            assert!((gx[b * n_in + i] as f64 - h as f64 * signed).abs() < 1e-5);
        }
    }
}
