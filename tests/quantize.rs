//! Uniform quantization (`compress::quantize`): round trips within half a step, zero exact,
//! per-channel scales, and calibration by min-max, percentile and MSE.

mod common;

use convpress::compress::quantize::{
    Calibration, Observer, Quantizer, check_bits, quantize_per_channel,
};

#[test]
fn round_trips_are_within_half_a_step() {
    let x = common::uniform(10_000, 1, -3.0, 5.0);
    for bits in 2..=8 {
        let q = Quantizer::asymmetric(-3.0, 5.0, bits);
        for &v in &x {
            let err = (q.round_trip(v) - v).abs();
            assert!(err <= q.scale / 2.0 + 1e-6, "{bits} bits: {v} -> {err}");
        }
        let s = Quantizer::symmetric(5.0, bits);
        for &v in &x {
            let err = (s.round_trip(v) - v).abs();
            assert!(
                err <= s.scale / 2.0 + 1e-6,
                "{bits} bits symmetric: {v} -> {err}"
            );
        }
    }
}

#[test]
fn zero_is_exact_and_ranges_contain_it() {
    for (lo, hi) in [(0.3, 5.0), (-2.0, -0.5), (-1.0, 1.0), (0.0, 0.0)] {
        let q = Quantizer::asymmetric(lo, hi, 8);
        assert_eq!(q.round_trip(0.0), 0.0, "[{lo}, {hi}]");
        let (a, b) = q.range();
        assert!(a <= 0.0 && b >= 0.0, "[{lo}, {hi}] -> [{a}, {b}]");
        assert!(q.scale > 0.0);
    }
    // Unsigned codes: 0 ..= 255.
    let q = Quantizer::asymmetric(-1.0, 3.0, 8);
    assert_eq!((q.lo, q.hi), (0, 255));
    assert_eq!(q.quantize(-100.0), 0);
    assert_eq!(q.quantize(100.0), 255);
}

#[test]
fn weights_get_one_scale_per_output_channel() {
    // Channel c holds values up to 10^c: one scale for all would flatten channel 0 to zeros.
    let per = 50;
    let mut w = Vec::new();
    for c in 0..4 {
        w.extend(
            common::uniform(per, c as u64 + 3, -1.0, 1.0)
                .iter()
                .map(|v| v * 10f32.powi(c)),
        );
    }
    let (quant, q) = quantize_per_channel(&w, 4, 8);
    assert_eq!(quant.len(), 4);
    for c in 0..4 {
        let row = &w[c * per..(c + 1) * per];
        let max_abs = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!((quant[c].scale - max_abs / 127.0).abs() <= 1e-6 * max_abs);
        assert_eq!(quant[c].zero_point, 0);
        let codes = &q[c * per..(c + 1) * per];
        // The largest weight of each channel uses the whole range, and none reaches -128.
        assert_eq!(codes.iter().map(|v| v.unsigned_abs()).max(), Some(127));
        assert!(codes.iter().all(|&v| v != i8::MIN));
        for (&x, &k) in row.iter().zip(codes) {
            assert!((quant[c].dequantize(k as i32) - x).abs() <= quant[c].scale / 2.0 + 1e-6);
        }
    }
}

#[test]
fn observers_see_every_batch() {
    let mut o = Observer::default();
    o.observe(&[0.5, 1.0]).unwrap();
    o.observe(&[-2.0, 0.0]).unwrap();
    o.observe(&[7.0]).unwrap();
    o.observe(&[]).unwrap();
    assert_eq!(o.count(), 5);
    let q = o.quantizer(Calibration::MinMax, 8).unwrap();
    let (lo, hi) = q.range();
    assert!(
        (lo + 2.0).abs() <= q.scale && (hi - 7.0).abs() <= q.scale,
        "[{lo}, {hi}]"
    );
}

#[test]
fn percentile_clips_outliers_and_mse_beats_min_max_on_heavy_tails() {
    // ReLU-like activations in [0, 1] with a few huge outliers.
    let mut x = common::uniform(20_000, 9, 0.0, 1.0);
    x.extend([400.0, 900.0, 1000.0]);
    let mut o = Observer::default();
    for chunk in x.chunks(1000) {
        o.observe(chunk).unwrap();
    }
    let minmax = o.quantizer(Calibration::MinMax, 8).unwrap();
    assert!(minmax.range().1 >= 999.0);
    let pct = o.quantizer(Calibration::Percentile(99.9), 8).unwrap();
    let (_, hi) = pct.range();
    assert!(hi < 2.0, "99.9th percentile range ends at {hi}");
    let mse = o.quantizer(Calibration::Mse, 8).unwrap();
    let error = |q: &Quantizer| -> f64 {
        x.iter()
            .map(|&v| ((q.round_trip(v) - v) as f64).powi(2))
            .sum::<f64>()
    };
    assert!(
        error(&mse) <= error(&minmax),
        "MSE calibration {} > min-max {}",
        error(&mse),
        error(&minmax)
    );
}

#[test]
fn bad_calibration_and_bit_widths_are_refused() {
    let o = Observer::default();
    let e = o.quantizer(Calibration::MinMax, 8).unwrap_err();
    assert!(e.contains("no values"), "{e}");
    let mut o = Observer::default();
    assert!(o.observe(&[1.0, f32::NAN]).unwrap_err().contains("NaN"));
    o.observe(&[1.0]).unwrap();
    assert!(o.quantizer(Calibration::Percentile(30.0), 8).is_err());
    for bad in [0, 1, 9, 32] {
        let e = check_bits("--bits", bad).unwrap_err();
        assert!(e.contains("--bits") && e.contains("between 2 and 8"), "{e}");
    }
    for good in 2..=8 {
        check_bits("--bits", good).unwrap();
    }
}

/// Fake quantization (`compress::qat`): the forward pass is the quantizer's round trip, the
/// gradient the identity inside the quantizer's range and zero outside it (clipped STE); a
/// fake-quantized weight passes its whole gradient through and sits on its per-channel grid.
#[test]
fn straight_through_gradients_are_the_identity_inside_the_range_and_zero_outside() {
    use burn::prelude::*;
    use convpress::compress::qat::{fake_quant, fake_quant_conv, fake_quant_linear};
    let d = Device::flex().autodiff();
    let q = Quantizer::asymmetric(-1.0, 2.0, 4);
    let (lo, hi) = q.range();
    let xs = vec![-3.0, lo - 0.01, -0.7, 0.0, 0.33, 1.9, hi + 0.01, 5.0];
    let x = Tensor::<1>::from_data(TensorData::new(xs.clone(), [xs.len()]), &d).require_grad();
    let y = fake_quant(x.clone(), &q);
    let got: Vec<f32> = y.clone().into_data().try_to_vec().unwrap();
    for (v, g) in xs.iter().zip(&got) {
        assert!((q.round_trip(*v) - g).abs() <= 1e-6, "{v}: {g}");
    }
    let grads = y.sum().backward();
    let g: Vec<f32> = x.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
    let want: Vec<f32> = xs
        .iter()
        .map(|&v| if (lo..=hi).contains(&v) { 1.0 } else { 0.0 })
        .collect();
    assert_eq!(g, want);

    let w: Vec<f32> = common::uniform(2 * 3 * 2 * 2, 4, -1.0, 1.0);
    let wt = Tensor::<4>::from_data(TensorData::new(w.clone(), [2, 3, 2, 2]), &d).require_grad();
    let fq = fake_quant_conv(wt.clone(), 3);
    let vals: Vec<f32> = fq.clone().into_data().try_to_vec().unwrap();
    let (quantizers, codes) = quantize_per_channel(&w, 2, 3);
    for (i, v) in vals.iter().enumerate() {
        let want = quantizers[i / 12].dequantize(codes[i] as i32);
        assert!((v - want).abs() <= 1e-6, "weight {i}: {v} vs {want}");
    }
    let g: Vec<f32> = wt
        .grad(&fq.sum().backward())
        .unwrap()
        .into_data()
        .try_to_vec()
        .unwrap();
    assert!(g.iter().all(|&v| v == 1.0), "{g:?}");
    // A linear weight is `[in, out]`: its channels are columns. (Burn rounds exact ties to
    // even, the quantizer away from zero: no tie here.)
    let lw = Tensor::<2>::from_data(TensorData::new(vec![1.0, 10.0, -0.6, 4.0], [2, 2]), &d);
    let lq: Vec<f32> = fake_quant_linear(lw, 2).into_data().try_to_vec().unwrap();
    assert_eq!(lq, vec![1.0, 10.0, -1.0, 0.0]);
}

/// Learned step sizes (`compress::lsq`, Esser et al. 2020): the forward pass is the
/// quantizer's round trip on the step; the gradient reaches an input as the clipped identity
/// and the step as eq. 3 (`round(v/s) − v/s` inside the range, the range's bound outside),
/// times the gradient scale.
#[test]
fn learned_step_gradients_follow_eq_3() {
    use burn::prelude::*;
    use convpress::compress::lsq::{gradient_scale, lsq, lsq_input, scale_gradient};
    let d = Device::flex().autodiff();
    let q = Quantizer {
        scale: 0.25,
        zero_point: 3,
        lo: 0,
        hi: 15,
    };
    let (lo, hi) = q.range();
    let xs = vec![-2.0, lo - 0.01, -0.6, 0.0, 0.3, 1.1, 2.9, hi + 0.01, 7.0];
    let x = Tensor::<1>::from_data(TensorData::new(xs.clone(), [xs.len()]), &d).require_grad();
    let s = Tensor::<1>::from_data(TensorData::new(vec![q.scale], [1]), &d).require_grad();
    let g = 0.5;
    let y = lsq(
        x.clone(),
        scale_gradient(s.clone(), g),
        q.zero_point,
        q.lo,
        q.hi,
    );
    let got: Vec<f32> = y.clone().into_data().try_to_vec().unwrap();
    for (v, y) in xs.iter().zip(&got) {
        assert!((q.round_trip(*v) - y).abs() <= 1e-6, "{v}: {y}");
    }
    let grads = y.sum().backward();
    let gx: Vec<f32> = x.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
    let inside = |v: f32| (lo..=hi).contains(&v);
    let want: Vec<f32> = xs
        .iter()
        .map(|&v| if inside(v) { 1.0 } else { 0.0 })
        .collect();
    assert_eq!(gx, want);
    let gs: Vec<f32> = s.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
    let eq3: f32 = xs
        .iter()
        .map(|&v| {
            let r = v / q.scale;
            if v < lo {
                (q.lo - q.zero_point) as f32
            } else if v > hi {
                (q.hi - q.zero_point) as f32
            } else {
                r.round() - r
            }
        })
        .sum();
    assert!((gs[0] - g * eq3).abs() <= 1e-5, "{} vs {}", gs[0], g * eq3);

    // An input's step is shared by an image's values, N of them: g = 1/sqrt(N Qp), Qp the
    // codes above the zero point (15 - 3 = 12 here). 0.3 / 0.25 = 1.2 on the grid (+3): its
    // eq. 3 term is round(1.2) - 1.2 = -0.2, for each of the 8 values.
    assert_eq!(gradient_scale(16, 4), 0.125);
    let x = Tensor::<2>::from_data(TensorData::new(vec![0.3f32; 8], [2, 4]), &d);
    let s = Tensor::<1>::from_data(TensorData::new(vec![q.scale], [1]), &d).require_grad();
    let grads = lsq_input(x, s.clone(), &q).sum().backward();
    let gs: f32 = s
        .grad(&grads)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()[0];
    let want = 8.0 * -0.2 / (4.0f32 * 12.0).sqrt();
    assert!((gs - want).abs() < 1e-5, "{gs} vs {want}");

    // A conv weight's steps, one per output channel, each shared by in·kh·kw = 2 weights at 3
    // bits (Qp = 3): channel 0 holds 0.3 and 0.6 on step 0.25, channel 1 holds 5.0 (clipped at
    // 3 codes) and -0.1 on step 1.0.
    let w = Tensor::<4>::from_data(
        TensorData::new(vec![0.3f32, 0.6, 5.0, -0.1], [2, 2, 1, 1]),
        &d,
    )
    .require_grad();
    let s = Tensor::<1>::from_data(TensorData::new(vec![0.25f32, 1.0], [2]), &d).require_grad();
    let y = convpress::compress::lsq::lsq_conv(w.clone(), s.clone(), 3);
    let got: Vec<f32> = y.clone().into_data().try_to_vec().unwrap();
    assert_eq!(got, vec![0.25, 0.5, 3.0, 0.0]);
    let grads = y.sum().backward();
    let gs: Vec<f32> = s.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
    let g = 1.0 / (2.0f32 * 3.0).sqrt();
    // round(1.2) - 1.2 + round(2.4) - 2.4; the clipped bound 3 + round(-0.1) + 0.1.
    let want = [g * (-0.2 - 0.4), g * (3.0 + 0.1)];
    for (a, b) in gs.iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{gs:?} vs {want:?}");
    }
    let gw: Vec<f32> = w.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
    assert_eq!(gw, vec![1.0, 1.0, 0.0, 1.0]);
}

/// The learned steps' starting point and the file's: the step with the least squared error
/// clips an outlier rather than spread the grid over it, and a weight quantized on given steps
/// is clipped to their range.
#[test]
fn least_error_steps_clip_outliers_and_given_steps_clip_weights() {
    use convpress::compress::lsq::least_error_step;
    use convpress::compress::ptq::quantize_in_place;
    let mut values = common::uniform(1000, 9, -1.0, 1.0);
    values[0] = 20.0;
    let step = least_error_step(&values, 4);
    assert!(step < 20.0 / 7.0 / 2.0, "{step}");
    // Without outliers at 8 bits the largest magnitude is (nearly) the best.
    let flat = common::uniform(1000, 9, -1.0, 1.0);
    let max = flat.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(least_error_step(&flat, 8) >= 0.9 * max / 127.0);

    // `[out = 2, in = 3]` conv-like rows; steps 0.1 and 1.0 at 3 bits (codes ±3).
    let mut w = vec![0.06, 0.26, -1.0, 0.4, -2.6, 9.0];
    let steps = quantize_in_place(&mut w, &[2, 3], false, 3, Some(&[0.1, 1.0])).unwrap();
    assert_eq!(steps, vec![0.1, 1.0]);
    let want = [0.1, 0.3, -0.3, 0.0, -3.0, 3.0];
    for (a, b) in w.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{w:?}");
    }
    let e = quantize_in_place(&mut w, &[2, 3], false, 3, Some(&[0.1])).unwrap_err();
    assert!(e.contains("1 weight steps for 2 output channels"), "{e}");
    let e = quantize_in_place(&mut w, &[2, 3], false, 3, Some(&[0.1, 0.0])).unwrap_err();
    assert!(e.contains("not a positive number"), "{e}");
}
