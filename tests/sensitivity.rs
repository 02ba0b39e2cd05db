//! `convpress sensitivity` and per-layer `prune` on a small synthetic model: the files it
//! writes, its agreement with `eval`, targets that `prune --targets` consumes, and bad input.

mod common;

use convpress::checkpoint;
use convpress::compress::prune::sparsity_report;
use std::path::Path;
use std::process::{Command, Output};

fn convpress(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_convpress"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails with one line naming `needle`, and without a panic.
fn fails_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A LeNet-300-100 trained `epochs` on the data in `data`, in `dir/run`: its checkpoint.
fn lenet300(dir: &Path, data: &str, epochs: usize) -> std::path::PathBuf {
    let run = dir.join("run");
    let epochs = epochs.to_string();
    ok(&convpress(&[
        "train",
        "--model",
        "lenet300",
        "--epochs",
        &epochs,
        "--data-dir",
        data,
        "--run-dir",
        run.to_str().unwrap(),
    ]));
    run.join("model.safetensors")
}

/// Fraction of zeros per conv/linear weight of a saved model.
fn sparsities(path: &Path) -> Vec<(String, f64)> {
    let (model, _) = checkpoint::load(path, &burn::prelude::Device::flex()).unwrap();
    sparsity_report(&model)
        .into_iter()
        .map(|(p, n, z)| (p, z as f64 / n as f64))
        .collect()
}

#[test]
fn sensitivity_files_agree_with_eval_and_targets_drive_prune() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 1000, 200, 28);
    let d = data.to_str().unwrap();
    let dense = lenet300(dir.path(), d, 2);
    let c = dense.to_str().unwrap();

    let out_dir = dir.path().join("sens");
    let text = ok(&convpress(&[
        "sensitivity",
        "--checkpoint",
        c,
        "--data-dir",
        d,
        "--sparsities",
        "0.99,0,0.5",
        "--max-drop",
        "1",
        "--out",
        out_dir.to_str().unwrap(),
    ]));
    for f in [
        "sensitivity.json",
        "sensitivity.csv",
        "sensitivity.svg",
        "targets.json",
    ] {
        assert!(out_dir.join(f).is_file(), "{f} missing; stdout: {text}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("sensitivity.json")).unwrap()).unwrap();
    assert_eq!(json["test_images"], 200);
    let layers = json["layers"].as_array().unwrap();
    let names: Vec<&str> = layers
        .iter()
        .map(|l| l["layer"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["layers.1", "layers.3", "layers.5"]);

    // Accuracy at sparsity 0 is what `eval` reports for the same checkpoint and data.
    let eval = ok(&convpress(&["eval", "--checkpoint", c, "--data-dir", d]));
    let baseline = json["baseline_accuracy"].as_f64().unwrap();
    assert!(
        eval.contains(&format!("accuracy {:.2}%", 100.0 * baseline)),
        "eval says {eval}, sensitivity {baseline}"
    );
    for l in layers {
        let points = l["points"].as_array().unwrap();
        let s: Vec<f64> = points
            .iter()
            .map(|p| p["sparsity"].as_f64().unwrap())
            .collect();
        assert_eq!(s, vec![0.0, 0.5, 0.99], "sorted");
        assert_eq!(points[0]["accuracy"].as_f64().unwrap(), baseline);
    }
    // 99% of the output layer (10 of 1000 weights left) cannot keep the accuracy.
    let out_layer = layers[2]["points"][2]["accuracy"].as_f64().unwrap();
    assert!(out_layer < baseline - 0.2, "{out_layer} vs {baseline}");

    // The table, the CSV and the chart carry every layer.
    let csv = std::fs::read_to_string(out_dir.join("sensitivity.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * 3);
    let svg = std::fs::read_to_string(out_dir.join("sensitivity.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 3);
    for n in &names {
        assert!(text.contains(n) && svg.contains(n), "{n}");
    }

    // targets.json feeds prune; --layer-sparsity overrides one layer of it.
    let targets: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("targets.json")).unwrap()).unwrap();
    let mut want: Vec<(String, f64)> = targets["layer_sparsity"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (format!("{k}.weight"), v.as_f64().unwrap()))
        .collect();
    assert_eq!(want.len(), 3);
    want[2].1 = 0.7;
    let pruned_run = dir.path().join("pruned");
    let text = ok(&convpress(&[
        "prune",
        "--checkpoint",
        c,
        "--targets",
        out_dir.join("targets.json").to_str().unwrap(),
        "--layer-sparsity",
        "layers.5=0.7",
        "--epochs",
        "1",
        "--data-dir",
        d,
        "--run-dir",
        pruned_run.to_str().unwrap(),
    ]));
    assert!(text.contains("30.00%"), "{text}");
    let got = sparsities(&pruned_run.join("model.safetensors"));
    assert_eq!(got.len(), 3);
    for ((p, s), (wp, ws)) in got.iter().zip(&want) {
        assert_eq!(p, wp);
        assert!((s - ws).abs() < 1e-3, "{p}: {s}, asked {ws}");
    }

    // --layer-sparsity alone, on top of a --sparsity for the rest.
    let mixed = dir.path().join("mixed");
    ok(&convpress(&[
        "prune",
        "--checkpoint",
        c,
        "--sparsity",
        "0.5",
        "--layer-sparsity",
        "layers.1=0.9,layers.5=0",
        "--epochs",
        "1",
        "--data-dir",
        d,
        "--run-dir",
        mixed.to_str().unwrap(),
    ]));
    let got: Vec<f64> = sparsities(&mixed.join("model.safetensors"))
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    assert!((got[0] - 0.9).abs() < 1e-3, "{got:?}");
    assert!((got[1] - 0.5).abs() < 1e-3, "{got:?}");
    assert!(got[2] < 0.01, "{got:?}");
}

#[test]
fn bad_input_is_refused_before_any_work_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 64, 32, 28);
    let d = data.to_str().unwrap();
    let c = lenet300(dir.path(), d, 1);
    let c = c.to_str().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let sens = |extra: &[&str]| {
        let mut args = vec!["sensitivity", "--data-dir", d, "--out", o];
        args.extend_from_slice(extra);
        convpress(&args)
    };
    fails_with(
        &sens(&["--checkpoint", "/no/such/model.safetensors"]),
        "/no/such/model.safetensors",
    );
    fails_with(
        &sens(&["--checkpoint", c, "--sparsities", "0.5,1.0"]),
        "--sparsities: sparsity must be in [0, 1), got 1",
    );
    fails_with(
        &sens(&["--checkpoint", c, "--sparsities", "-0.1"]),
        "got -0.1",
    );
    fails_with(
        &sens(&["--checkpoint", c, "--sparsities", ""]),
        "--sparsities",
    );
    fails_with(
        &sens(&["--checkpoint", c, "--layers", "layers.1,layers.9"]),
        "unknown layer \"layers.9\": the prunable layers are layers.1, layers.3, layers.5",
    );
    fails_with(
        &sens(&["--checkpoint", c, "--max-drop", "-1"]),
        "--max-drop",
    );
    fails_with(&sens(&["--checkpoint", c, "--limit", "0"]), "--limit");
    assert!(!out.exists(), "nothing may be written on bad input");

    let prune = |extra: &[&str]| {
        let mut args = vec!["prune", "--checkpoint", c, "--data-dir", d, "--run-dir", o];
        args.extend_from_slice(extra);
        convpress(&args)
    };
    fails_with(&prune(&[]), "nothing to prune");
    fails_with(
        &prune(&["--layer-sparsity", "layers.2=0.5"]),
        "unknown layer \"layers.2\"",
    );
    fails_with(
        &prune(&["--layer-sparsity", "layers.1=1"]),
        "--layer-sparsity layers.1: sparsity must be in [0, 1), got 1",
    );
    fails_with(
        &prune(&["--layer-sparsity", "layers.1"]),
        "expected LAYER=SPARSITY",
    );
    fails_with(
        &prune(&["--layer-sparsity", "layers.1=0.5,layers.1=0.6"]),
        "given twice",
    );
    fails_with(
        &prune(&["--sparsity", "0.5", "--layers", "layers.7"]),
        "--layers: unknown layer",
    );
    fails_with(&prune(&["--layers", "layers.1"]), "--sparsity");
    let bad_targets = dir.path().join("t.json");
    std::fs::write(&bad_targets, r#"{"layer_sparsity": {"layers.3": 1.5}}"#).unwrap();
    fails_with(
        &prune(&["--targets", bad_targets.to_str().unwrap()]),
        "layers.3: sparsity must be in [0, 1), got 1.5",
    );
    std::fs::write(&bad_targets, "[1, 2]").unwrap();
    fails_with(
        &prune(&["--targets", bad_targets.to_str().unwrap()]),
        "not a targets file",
    );
    assert!(!out.exists(), "prune must not start on bad input");
}

/// `sensitivity --bits`: one layer at a time quantized to each width on the int8 runtime; its
/// files, a widest width that costs nothing, widths that `quantize --targets` applies (and
/// that a per-layer flag overrides), and its refusals before any work.
#[test]
fn bit_sensitivity_writes_widths_that_quantize_applies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 600, 200, 28);
    let d = data.to_str().unwrap();
    let c = lenet300(dir.path(), d, 2);
    let c = c.to_str().unwrap();
    let out_dir = dir.path().join("bits");
    let text = ok(&convpress(&[
        "sensitivity",
        "--checkpoint",
        c,
        "--data-dir",
        d,
        "--bits",
        "2,8,4",
        "--calibrate",
        "128",
        "--max-drop",
        "1",
        "--out",
        out_dir.to_str().unwrap(),
    ]));
    assert!(text.contains("8 bits") && text.contains("2 bits"), "{text}");
    for f in [
        "bit-sensitivity.json",
        "bit-sensitivity.csv",
        "bit-sensitivity.svg",
        "bits.json",
    ] {
        assert!(out_dir.join(f).is_file(), "{f} missing");
    }
    let s: convpress::compress::bit_sensitivity::BitSensitivity =
        serde_json::from_slice(&std::fs::read(out_dir.join("bit-sensitivity.json")).unwrap())
            .unwrap();
    assert_eq!(s.bits, vec![8, 4, 2]);
    assert_eq!(s.layers.len(), 3);
    for c in &s.layers {
        assert_eq!(c.points.len(), 3);
        // 8 bits of one layer costs at most a few of the 200 test images.
        assert!(
            (c.points[0].accuracy - s.baseline_accuracy).abs() <= 0.02,
            "{c:?}"
        );
    }
    let targets =
        convpress::compress::bit_sensitivity::BitTargetsFile::read(&out_dir.join("bits.json"))
            .unwrap();
    assert_eq!(targets.layer_bits.len(), 3);
    assert!(targets.layer_bits.values().all(|b| b.is_some()));
    // A hand-written file: the widths land in the quantized model; float-layers wins.
    let file = dir.path().join("mine.json");
    std::fs::write(
        &file,
        r#"{"layer_bits": {"layers.1": 6, "layers.3": 4, "layers.5": null}}"#,
    )
    .unwrap();
    let q = dir.path().join("mixed.cpz");
    ok(&convpress(&[
        "quantize",
        "--checkpoint",
        c,
        "--data-dir",
        d,
        "--calibrate",
        "64",
        "--targets",
        file.to_str().unwrap(),
        "--float-layers",
        "layers.3",
        "--out",
        q.to_str().unwrap(),
    ]));
    let spec = checkpoint::read(&q).unwrap().quant.unwrap();
    let bits: Vec<(String, u32)> = spec
        .layers
        .iter()
        .map(|(p, l)| (p.clone(), l.bits))
        .collect();
    assert_eq!(bits, vec![("layers.1".to_string(), 6)]);
    // Refusals, before any work.
    let sens = |extra: &[&str]| {
        let o = dir.path().join("never");
        let mut args = vec![
            "sensitivity",
            "--checkpoint",
            c,
            "--data-dir",
            d,
            "--out",
            o.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = convpress(&args);
        assert!(!o.exists(), "nothing may be written on bad input");
        out
    };
    fails_with(&sens(&["--bits", "8,1"]), "must be between 2 and 8 bits");
    fails_with(&sens(&["--bits", "9"]), "got 9");
    fails_with(&sens(&["--bits", "8", "--calibrate", "0"]), "--calibrate");
    fails_with(&sens(&["--bits", "8", "--layers", "layers.9"]), "layers.9");
    fails_with(
        &sens(&["--bits", "8", "--sparsities", "0.5"]),
        "cannot be used with",
    );
    std::fs::write(&file, r#"{"layer_bits": {"layers.9": 4}}"#).unwrap();
    fails_with(
        &convpress(&[
            "quantize",
            "--checkpoint",
            c,
            "--data-dir",
            d,
            "--targets",
            file.to_str().unwrap(),
            "--out",
            q.to_str().unwrap(),
            "--force",
        ]),
        "layers.9 is not a conv or linear layer",
    );
    std::fs::write(&file, r#"{"layer_bits": {"layers.1": 12}}"#).unwrap();
    fails_with(
        &convpress(&[
            "quantize",
            "--checkpoint",
            c,
            "--data-dir",
            d,
            "--targets",
            file.to_str().unwrap(),
            "--out",
            q.to_str().unwrap(),
            "--force",
        ]),
        "12",
    );
}
