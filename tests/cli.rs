//! The command line on bad input: one clear line, a non-zero exit, nothing half-written.

mod common;

use std::process::{Command, Output};

fn convpress(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_convpress"))
        .args(args)
        .output()
        .unwrap()
}

fn fails_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

#[test]
fn unknown_model_and_nonsense_flags_are_refused() {
    fails_with(
        &convpress(&["train", "--model", "alexnet"]),
        "invalid value 'alexnet'",
    );
    fails_with(
        &convpress(&["train", "--epochs", "many"]),
        "invalid value 'many'",
    );
    fails_with(
        &convpress(&["train", "--frobnicate"]),
        "unexpected argument",
    );
    fails_with(&convpress(&["train", "--resize", "14y"]), "--resize");
}

#[test]
fn missing_data_names_the_fetch_command() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    let run = dir.path().join("run");
    let out = convpress(&[
        "train",
        "--data-dir",
        missing.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    fails_with(&out, "convpress data fetch mnist");
    assert!(!run.exists(), "nothing is written when the data is missing");
}

#[test]
fn impossible_settings_are_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 64, 16, 28);
    let d = data.to_str().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    fails_with(
        &convpress(&["train", "--data-dir", d, "--run-dir", r, "--epochs", "0"]),
        "--epochs",
    );
    fails_with(
        &convpress(&["train", "--data-dir", d, "--run-dir", r, "--lr", "-1"]),
        "--lr",
    );
    fails_with(
        &convpress(&["train", "--data-dir", d, "--run-dir", r, "--resize", "4x4"]),
        "cannot take 1x4x4 input",
    );
    fails_with(
        &convpress(&["train", "--run-dir", r, "--resume"]),
        "cannot resume",
    );
}

#[test]
fn bad_checkpoints_give_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage").unwrap();
    for cmd in ["eval", "info"] {
        let out = convpress(&[cmd, "--checkpoint", junk.to_str().unwrap()]);
        fails_with(&out, "junk.safetensors");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    fails_with(
        &convpress(&["info", "--checkpoint", "/no/such/file.safetensors"]),
        "/no/such/file.safetensors",
    );
}

#[test]
fn train_then_info_and_eval_need_no_model_flags() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 256, 64, 28);
    let run = dir.path().join("run");
    let out = convpress(&[
        "train",
        "--model",
        "resnet20",
        "--epochs",
        "1",
        "--data-dir",
        data.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ckpt = run.join("model.safetensors");
    let info = convpress(&["info", "--checkpoint", ckpt.to_str().unwrap()]);
    assert!(info.status.success());
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.contains("resnet20") && text.contains("1x32x32"),
        "{text}"
    );
    assert!(text.contains("layers.3.body.0"), "{text}");
    let eval = convpress(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    assert!(String::from_utf8_lossy(&eval.stdout).contains("64 images"));
}

#[test]
fn cuda_without_the_feature_says_how_to_build_it() {
    if cfg!(feature = "cuda") {
        return;
    }
    let out = convpress(&["--device", "cuda", "bench", "train", "--batch", "1"]);
    fails_with(&out, "--features cuda");
}

#[test]
fn train_prune_encode_then_eval_and_info_read_the_compressed_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 1000, 200, 28);
    let d = data.to_str().unwrap();
    let run = dir.path().join("run");
    let out = convpress(&[
        "train",
        "--model",
        "lenet300",
        "--epochs",
        "2",
        "--data-dir",
        d,
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dense = run.join("model.safetensors");
    let pruned_run = dir.path().join("pruned");
    let out = convpress(&[
        "prune",
        "--checkpoint",
        dense.to_str().unwrap(),
        "--sparsity",
        "0.9",
        "--epochs",
        "2",
        "--data-dir",
        d,
        "--run-dir",
        pruned_run.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("layers.1.weight") && text.contains("10.00%"),
        "{text}"
    );
    let pruned = pruned_run.join("model.safetensors");
    let cpz = dir.path().join("model.cpz");
    let out = convpress(&[
        "encode",
        "--checkpoint",
        pruned.to_str().unwrap(),
        "--out",
        cpz.to_str().unwrap(),
        "--data-dir",
        d,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("smaller") && text.contains("decoded from"),
        "{text}"
    );
    let dense_bytes = std::fs::metadata(&dense).unwrap().len();
    let cpz_bytes = std::fs::metadata(&cpz).unwrap().len();
    // Each stage leaves a report beside what it wrote.
    let prune_report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pruned_run.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(prune_report["layers"].as_array().unwrap().len(), 3);
    let encode_report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("model.report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(encode_report["file_bytes"].as_u64(), Some(cpz_bytes));
    assert!(cpz_bytes * 10 < dense_bytes, "{cpz_bytes} vs {dense_bytes}");
    for cmd in ["eval", "info"] {
        let mut args = vec![cmd, "--checkpoint", cpz.to_str().unwrap()];
        if cmd == "eval" {
            args.extend(["--data-dir", d]);
        }
        let out = convpress(&args);
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Impossible settings are refused up front.
    fails_with(
        &convpress(&[
            "prune",
            "--checkpoint",
            dense.to_str().unwrap(),
            "--sparsity",
            "1.0",
            "--data-dir",
            d,
        ]),
        "--sparsity",
    );
    fails_with(
        &convpress(&[
            "encode",
            "--checkpoint",
            pruned.to_str().unwrap(),
            "--fc-bits",
            "0",
        ]),
        "--fc-bits",
    );
    // More clusters than weights: layers.5 keeps 100 of its 1000 weights, fewer than the
    // 1024 clusters of 10 bits. Refused with the layer named, and nothing is written.
    let too_many = dir.path().join("too-many.cpz");
    let out = convpress(&[
        "encode",
        "--checkpoint",
        pruned.to_str().unwrap(),
        "--out",
        too_many.to_str().unwrap(),
        "--fc-bits",
        "10",
    ]);
    fails_with(
        &out,
        "layers.5.weight: 1024 clusters (10 bits) for 100 non-zero weights",
    );
    assert!(!too_many.exists());
    let mut damaged = std::fs::read(&cpz).unwrap();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0xff;
    std::fs::write(&cpz, damaged).unwrap();
    fails_with(
        &convpress(&["info", "--checkpoint", cpz.to_str().unwrap()]),
        "checksum",
    );
}

/// Impossible compression targets are refused before anything is read or computed: the
/// checkpoint named here does not exist, so an error about the flag (not the file) shows the
/// check comes first.
#[test]
fn impossible_targets_are_refused_before_reading_the_checkpoint() {
    let missing = "/no/such/model.safetensors";
    for s in ["1", "1.0", "1.5", "-0.1", "NaN", "inf"] {
        let out = convpress(&["prune", "--checkpoint", missing, "--sparsity", s]);
        fails_with(&out, "--sparsity");
        fails_with(&out, "[0, 1)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains(missing) && !err.contains("panicked"),
            "{s}: {err}"
        );
    }
    for (flag, v) in [
        ("--conv-bits", "0"),
        ("--conv-bits", "17"),
        ("--fc-bits", "0"),
        ("--fc-bits", "17"),
        ("--conv-gap-bits", "1"),
        ("--conv-gap-bits", "17"),
        ("--fc-gap-bits", "1"),
        ("--fc-gap-bits", "32"),
    ] {
        let out = convpress(&["encode", "--checkpoint", missing, flag, v]);
        fails_with(&out, &format!("{flag} must be between"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains(missing) && !err.contains("panicked"),
            "{flag} {v}: {err}"
        );
    }
    // The benchmark checks every sparsity before it measures the first one.
    let out = convpress(&["bench", "sparse", "--sparsity", "0.5,1.0", "--seconds", "5"]);
    fails_with(&out, "--sparsity");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Output piped into a reader that stops early (`convpress ... | head`) ends the process
/// quietly instead of panicking on the write.
#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_the_output_without_a_panic() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_convpress"))
        .args(["bench", "ops", "--seconds", "0.01"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before anything is read
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
