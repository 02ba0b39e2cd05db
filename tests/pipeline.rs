//! The compression pipeline: recipes (valid and invalid), stages chained without undoing each
//! other, a recipe run on real MNIST with its report checked against direct measurements, and
//! `--resume`.

mod common;

use burn::prelude::Device;
use convpress::checkpoint;
use convpress::pipeline::layers::LayerRules;
use convpress::pipeline::recipe::Recipe;
use convpress::pipeline::report::Report;
use convpress::pipeline::stages::finetune::{Finetune, FinetuneParams};
use convpress::pipeline::stages::prune::{LayerSparsity, Prune, PruneParams};
use convpress::pipeline::stages::share::{Share, ShareParams};
use convpress::pipeline::stages::train::{Train, TrainParams};
use convpress::pipeline::{Constraints, Context, Model, Stage};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn convpress(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_convpress"))
        .args(args)
        .output()
        .unwrap()
}

fn cx(dir: &Path) -> Context {
    Context {
        dir: dir.to_path_buf(),
        device: Device::flex(),
        data_dir: None,
        progress_bar: false,
        verbose: false,
    }
}

fn parse(text: &str) -> anyhow::Result<Recipe> {
    Recipe::parse(Path::new("r.toml"), text.to_string())
}

fn parse_error(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("should be refused:\n{text}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn shipped_recipes_and_every_stage_kind_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    for f in std::fs::read_dir(&dir).unwrap() {
        let path = f.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let r = Recipe::read(&path).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(!r.stages.is_empty() && r.description.is_some(), "{path:?}");
            n += 1;
        }
    }
    assert!(n >= 4, "{n} recipes in {dir:?}");
    let r = parse(
        r#"
description = "all of them"
[report]
latency-seconds = 0.5
batches = [1, 8]

[[stage]]
kind = "train"
model = "lenet300"
epochs = 2
resize = [28, 28]

[[stage]]
kind = "prune-filters"
ratio = 0.25

[[stage]]
kind = "prune"
sparsity = 0.8
[stage.layers]
"layers.*" = { sparsity = 0.9 }
"layers.5" = { sparsity = 0.0 }

[[stage]]
kind = "share"
fc-bits = 4
[stage.layers]
"layers.1" = { bits = 6 }

[[stage]]
kind = "finetune"
epochs = 1

[[stage]]
kind = "encode"
[stage.layers]
"layers.1" = { gap-bits = 4 }

[[stage]]
kind = "eval"
limit = 100
"#,
    )
    .unwrap();
    let kinds: Vec<&str> = r.stages.iter().map(|e| e.stage.kind()).collect();
    assert_eq!(
        kinds,
        [
            "train",
            "prune-filters",
            "prune",
            "share",
            "finetune",
            "encode",
            "eval"
        ]
    );
    assert_eq!(r.stages[2].line, 17);
    assert_eq!(r.report.batches, vec![1, 8]);
    // Settings keep what the file says and fill in the rest from the command's defaults.
    let s = r.stages[0].stage.settings();
    assert_eq!(s["epochs"], 2);
    assert_eq!(s["model"], "lenet300");
    assert_eq!(s["seed"], 1);
    assert_eq!(s["rescale-interp"], "bicubic");
    let s = r.stages[2].stage.settings();
    assert_eq!(s["params"]["epochs"], 4, "prune's --epochs default");
    let rescale = parse("[[stage]]\nkind = \"rescale\"\nrescale-at = 2\n").unwrap();
    assert_eq!(rescale.stages[0].stage.settings()["rescale-from"], 0.5);
}

#[test]
fn invalid_recipes_are_refused_with_the_line_named() {
    for (text, needles) in [
        (
            "[[stage]]\nkind = \"prunee\"\n",
            vec!["r.toml:2:8", "unknown stage \"prunee\"", "prune-filters"],
        ),
        (
            "[[stage]]\nkind = \"prune\"\nsparsty = 0.5\n",
            vec!["r.toml:3:1", "unknown field `sparsty`"],
        ),
        (
            "[[stage]]\nkind = \"train\"\n\nepochs = \"many\"\n",
            vec!["r.toml:4:10", "expected usize"],
        ),
        ("[[stage]\nkind = \"train\"\n", vec!["r.toml:1:"]),
        (
            "[[stage]]\nmodel = \"lenet5\"\n",
            vec!["r.toml:1:", "has no kind"],
        ),
        (
            "[[stage]]\nkind = \"eval\"\n[stage.layers]\n\"x\" = {}\n",
            vec!["r.toml:3:", "no per-layer settings"],
        ),
        (
            "[[stage]]\nkind = \"prune\"\n[stage.layers]\n\"layers.1\" = { sparsity = 0.5, bits = 3 }\n",
            vec!["r.toml:4:", "unknown field `bits`"],
        ),
        (
            "[report]\nlatency = 1\n[[stage]]\nkind = \"eval\"\n",
            vec!["r.toml:2:1", "unknown field `latency`"],
        ),
        ("stages = 3\n", vec!["r.toml:1:1", "unknown key \"stages\""]),
        ("description = \"nothing\"\n", vec!["no [[stage]]"]),
    ] {
        let e = parse_error(text);
        for n in needles {
            assert!(e.contains(n), "{text:?}: {e:?} lacks {n:?}");
        }
    }
}

/// A small dense model on synthetic digits, and its folder.
fn trained_lenet300(root: &Path, data: &Path) -> Model {
    let params = TrainParams {
        model: convpress::models::ModelKind::Lenet300,
        data_dir: Some(data.to_path_buf()),
        epochs: Some(1),
        batch_size: Some(32),
        ..Default::default()
    };
    let dir = root.join("dense");
    Train::new(params).run(None, &cx(&dir)).unwrap().model
}

#[test]
fn recipes_that_cannot_run_are_refused_before_any_stage() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_synthetic_mnist(&data, 128, 32, 28);
    let dense = trained_lenet300(root.path(), &data);
    let d = data.to_str().unwrap();
    let from = dense.file.to_str().unwrap();
    for (recipe, from, needles) in [
        (
            "[[stage]]\nkind = \"share\"\n\n[[stage]]\nkind = \"prune\"\nsparsity = 0.5\n",
            Some(from),
            vec!["r.toml:4: stage 2 (prune)", "put prune before share"],
        ),
        (
            "[[stage]]\nkind = \"prune\"\nsparsity = 0.5\n\n[[stage]]\nkind = \"encode\"\n",
            Some(from),
            vec!["r.toml:5: stage 2 (encode)", "add a share stage before it"],
        ),
        (
            "[[stage]]\nkind = \"prune\"\nsparsity = 0.5\n[stage.layers]\n\"conv*\" = { sparsity = 0.1 }\n",
            Some(from),
            vec![
                "stage 1 (prune)",
                "\"conv*\" matches no layer",
                "layers.1, layers.3, layers.5",
            ],
        ),
        (
            "[[stage]]\nkind = \"finetune\"\n",
            None,
            vec!["stage 1 (finetune)", "pass --from"],
        ),
        (
            "[[stage]]\nkind = \"train\"\n",
            Some(from),
            vec!["stage 1 (train)", "use a finetune stage"],
        ),
        (
            "[[stage]]\nkind = \"prune\"\nsparsity = 1.5\n",
            Some(from),
            vec!["sparsity must be in [0, 1)"],
        ),
        (
            "[[stage]]\nkind = \"prune\"\nsparsity = 0.5\n",
            Some("/no/such/model.safetensors"),
            vec!["--from /no/such/model.safetensors"],
        ),
    ] {
        let path = root.path().join("r.toml");
        std::fs::write(&path, recipe).unwrap();
        let run = root.path().join("run");
        let mut args = vec!["compress", "--recipe", path.to_str().unwrap()];
        args.extend(["--run-dir", run.to_str().unwrap(), "--data-dir", d]);
        if let Some(f) = from {
            args.extend(["--from", f]);
        }
        let out = convpress(&args);
        let err = String::from_utf8_lossy(&out.stderr).replace(path.to_str().unwrap(), "r.toml");
        assert!(!out.status.success(), "{recipe}");
        for n in needles {
            assert!(err.contains(n), "{recipe}: {err:?} lacks {n:?}");
        }
        assert!(!run.exists(), "{recipe}: nothing may be written");
    }
}

#[test]
fn prune_share_finetune_keep_the_zeros_and_the_codebooks() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_synthetic_mnist(&data, 640, 200, 28);
    let dense = trained_lenet300(root.path(), &data);
    let c = |name: &str| {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        cx(&dir)
    };
    let prune = Prune {
        params: PruneParams {
            sparsity: Some(0.8),
            epochs: 1,
            ..Default::default()
        },
        layers: LayerRules(vec![("layers.5".into(), LayerSparsity { sparsity: 0.5 })]),
    };
    let pruned = prune.run(Some(dense), &c("prune")).unwrap().model;
    let masks = pruned.constraints.masks.clone();
    assert_eq!(masks.len(), 3);
    for (p, keep) in &masks {
        let kept = keep.iter().filter(|&&k| k).count() as f64 / keep.len() as f64;
        let want = if p == "layers.5.weight" { 0.5 } else { 0.2 };
        assert!((kept - want).abs() < 0.01, "{p}: kept {kept}");
    }
    let share = Share {
        params: ShareParams {
            conv_bits: 4,
            fc_bits: 3,
        },
        layers: Default::default(),
    };
    let shared = share.run(Some(pruned), &c("share")).unwrap().model;
    let before: Vec<Vec<f32>> = shared
        .constraints
        .codebooks
        .values()
        .map(|b| b.centroids.clone())
        .collect();
    let tune = Finetune {
        params: FinetuneParams {
            epochs: 1,
            lr: 1e-3,
            ..Default::default()
        },
    };
    let tuned = tune.run(Some(shared), &c("finetune")).unwrap().model;
    // Read back from disk: what a later stage or a resumed run would see.
    let last = Model::open(&tuned.file).unwrap();
    assert_eq!(last.constraints.masks, masks, "masks are carried unchanged");
    last.constraints.check(&last.loaded.tensors).unwrap();
    for (k, (p, book)) in last.constraints.codebooks.iter().enumerate() {
        let (w, _) = checkpoint::floats(&last.loaded.tensors, p).unwrap();
        for (i, &v) in w.iter().enumerate() {
            if !masks[p][i] {
                assert_eq!(v, 0.0, "{p}[{i}] was pruned and must stay zero");
            }
        }
        let distinct: HashSet<u32> = w
            .iter()
            .filter(|v| **v != 0.0)
            .map(|v| v.to_bits())
            .collect();
        assert!(
            distinct.len() <= 8,
            "{p}: {} values for 3 bits",
            distinct.len()
        );
        for v in &distinct {
            assert!(
                book.centroids.iter().any(|c| c.to_bits() == *v),
                "{p}: {} is no centroid",
                f32::from_bits(*v)
            );
        }
        assert_ne!(book.centroids, before[k], "{p}: the centroids trained");
    }
    // A weight that breaks a constraint is caught.
    let mut broken = last.loaded.tensors.clone();
    let (p, keep) = masks.iter().next().unwrap();
    let i = keep.iter().position(|k| !k).unwrap();
    let (mut w, shape) = checkpoint::floats(&broken, p).unwrap();
    w[i] = 0.5;
    broken.get_mut(p).unwrap().0 = burn::tensor::TensorData::new(w, shape);
    let e = last.constraints.check(&broken).unwrap_err();
    assert!(e.contains("not zero"), "{e}");
    // Constraints survive a save and a load.
    let file = root.path().join("c/model.safetensors");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    last.constraints.save(&file).unwrap();
    assert_eq!(Constraints::load(&file).unwrap(), last.constraints);
}

#[test]
fn layer_rules_last_match_wins_and_a_pattern_must_match() {
    let layers: Vec<String> = ["layers.0", "layers.2", "layers.5", "layers.7"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let rules = LayerRules(vec![
        ("layers.*".to_string(), 1),
        ("layers.5".to_string(), 2),
        ("layers.[57]".to_string(), 3),
    ]);
    let got = rules.resolve(&layers).unwrap();
    assert_eq!(got["layers.0"], 1);
    assert_eq!(got["layers.5"], 3, "the last match wins");
    assert_eq!(got["layers.7"], 3);
    let e = LayerRules(vec![("fc*".to_string(), 1)])
        .resolve(&layers)
        .unwrap_err();
    assert!(
        e.contains("matches no layer") && e.contains("layers.7"),
        "{e}"
    );
}

/// Needs the real MNIST (CI runs it): a two-stage recipe run by the command, its report
/// against direct measurements, then `--resume` after an interruption.
#[test]
fn a_recipe_runs_on_real_mnist_reports_what_is_on_disk_and_resumes() {
    let mnist = common::real_mnist();
    let root = tempfile::tempdir().unwrap();
    let recipe = root.path().join("two.toml");
    std::fs::write(
        &recipe,
        r#"description = "two short stages"
[report]
latency-seconds = 0.05
test-limit = 1000

[[stage]]
kind = "train"
model = "lenet5"
epochs = 1
train-limit = 3000
test-limit = 1000

[[stage]]
kind = "prune"
sparsity = 0.8
epochs = 1
train-limit = 3000
test-limit = 1000
"#,
    )
    .unwrap();
    let run = root.path().join("run");
    let args = |resume: bool| {
        let mut a = vec![
            "compress".to_string(),
            "--recipe".into(),
            recipe.display().to_string(),
            "--run-dir".into(),
            run.display().to_string(),
            "--data-dir".into(),
            mnist.display().to_string(),
        ];
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let call = |a: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_convpress"))
            .args(a)
            .output()
            .unwrap()
    };
    let out = call(args(false));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| 2 prune |"), "{stdout}");
    for f in [
        "report.md",
        "report.json",
        "resolved.json",
        "recipe.toml",
        "metrics.jsonl",
    ] {
        assert!(run.join(f).is_file(), "{f}");
    }
    for f in [
        "accuracy-size.svg",
        "layers-kept.svg",
        "layers-bits.svg",
        "training.svg",
    ] {
        let svg = std::fs::read_to_string(run.join("plots").join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{f}");
    }
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(md.contains("| 1 train |") && md.contains("plots/accuracy-size.svg"));

    // Every figure is what a direct measurement of the stage's file gives.
    let report = Report::read(&run).unwrap();
    assert_eq!(report.stages.len(), 2);
    let device = Device::flex();
    for e in &report.stages {
        let f = &e.figures;
        assert_eq!(
            f.file_bytes,
            std::fs::metadata(&e.file).unwrap().len(),
            "{}",
            e.kind
        );
        let loaded = checkpoint::read(&e.file).unwrap();
        assert_eq!(f.params, loaded.arch.num_params());
        assert_eq!(f.flops, loaded.arch.flops());
        let nonzero: usize = loaded
            .tensors
            .values()
            .map(|(d, _)| {
                d.as_slice::<f32>()
                    .unwrap()
                    .iter()
                    .filter(|v| **v != 0.0)
                    .count()
            })
            .sum();
        assert_eq!(f.nonzero, nonzero, "{}", e.kind);
        let (net, meta) = checkpoint::load(&e.file, &device).unwrap();
        let test = checkpoint::test_split(&e.file, &net.arch, &meta, &mnist, Some(1000)).unwrap();
        let (_, acc) = convpress::train::evaluate(&net, &test, 256, &device);
        assert_eq!(f.test_acc, acc, "{}", e.kind);
        assert_eq!(f.latency.len(), 2);
    }
    let (a, b) = (&report.stages[0].figures, &report.stages[1].figures);
    assert!(a.test_acc > 0.5, "it learned: {}", a.test_acc);
    assert!(b.nonzero * 4 < a.nonzero, "{} of {}", b.nonzero, a.nonzero);
    for l in &b.latency {
        assert!(l.ms <= l.dense_ms && ["dense", "sparse"].contains(&l.runtime.as_str()));
    }
    let curve = &report.stages[1].curve;
    assert_eq!(curve.len(), 1);
    assert!(curve[0].images_per_sec > 0.0);

    // A second run into the same folder is refused; an interrupted one resumes: the
    // finished first stage is skipped (its files untouched), the second runs again.
    let again = call(args(false));
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let first = report.stages[0].file.clone();
    let second = report.stages[1].file.clone();
    let mtime = |p: &PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    let (t1, t2) = (mtime(&first), mtime(&second));
    std::fs::remove_file(run.join("stages/02-prune/stage.json")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = call(args(true));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("stage 1/2: train finished already"));
    assert_eq!(
        mtime(&first),
        t1,
        "the finished stage's checkpoint is not rewritten"
    );
    assert!(mtime(&second) > t2, "the unfinished stage ran again");
    let resumed = Report::read(&run).unwrap();
    assert_eq!(resumed.stages.len(), 2);
    assert_eq!(resumed.stages[0].figures, report.stages[0].figures);

    // `report` prints the run, and compares two.
    let out = convpress(&["report", run.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("| 2 prune |"));
    let cmp = root.path().join("cmp");
    let out = convpress(&[
        "report",
        run.to_str().unwrap(),
        run.to_str().unwrap(),
        "--out",
        cmp.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cmp.join("compare.md").is_file() && cmp.join("compare.svg").is_file());
}

/// A checkpoint remembers the data folder it was trained on: `prune` and `encode` use it
/// without `--data-dir`, even when the default folder does not exist.
#[test]
fn later_commands_use_the_checkpoints_data_folder() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("digits");
    common::write_synthetic_mnist(&data, 256, 64, 28);
    let nowhere = root.path().join("no-default-data");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_convpress"))
            .args(args)
            .env("CONVPRESS_DATA", &nowhere)
            .output()
            .unwrap()
    };
    let dense = root.path().join("dense");
    let out = run(&[
        "train",
        "--model",
        "lenet300",
        "--epochs",
        "1",
        "--data-dir",
        data.to_str().unwrap(),
        "--run-dir",
        dense.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ckpt = dense.join("model.safetensors");
    let pruned = root.path().join("pruned");
    let out = run(&[
        "prune",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--sparsity",
        "0.5",
        "--epochs",
        "1",
        "--run-dir",
        pruned.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cpz = root.path().join("m.cpz");
    let out = run(&[
        "encode",
        "--checkpoint",
        pruned.join("model.safetensors").to_str().unwrap(),
        "--out",
        cpz.to_str().unwrap(),
        "--fc-bits",
        "3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("decoded from"),
        "{stdout}"
    );
    let out = run(&["eval", "--checkpoint", cpz.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A stage that fails midway (here k-means asked for more clusters than a pruned layer has
/// weights, which only running it finds out) leaves the finished stages intact; the recipe,
/// mended, resumes from the failed stage.
#[test]
fn a_failed_stage_leaves_the_finished_ones_to_resume_from() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_synthetic_mnist(&data, 256, 64, 28);
    let recipe = root.path().join("r.toml");
    let write = |fc_bits: u32| {
        std::fs::write(
            &recipe,
            format!(
                "[report]\nlatency-seconds = 0.01\nbatches = [1]\n\n\
                 [[stage]]\nkind = \"train\"\nmodel = \"lenet300\"\nepochs = 1\n\n\
                 [[stage]]\nkind = \"prune\"\nsparsity = 0.9\nepochs = 1\n\n\
                 [[stage]]\nkind = \"share\"\nfc-bits = {fc_bits}\n"
            ),
        )
        .unwrap()
    };
    let run = root.path().join("run");
    let go = |resume: bool| {
        let mut args = vec!["compress", "--recipe", recipe.to_str().unwrap()];
        args.extend([
            "--run-dir",
            run.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        if resume {
            args.push("--resume");
        }
        convpress(&args)
    };
    write(10);
    let out = go(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("stage 3 (share") && err.contains("1024 clusters"),
        "{err}"
    );
    let done = |i: &str| run.join("stages").join(i).join("stage.json");
    assert!(done("01-train").is_file() && done("02-prune").is_file());
    assert!(!done("03-share").exists());
    assert_eq!(
        Report::read(&run).unwrap().stages.len(),
        2,
        "the report holds what finished"
    );
    let pruned = run.join("stages/02-prune/model.safetensors");
    let before = std::fs::metadata(&pruned).unwrap().modified().unwrap();
    write(3);
    let out = go(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(&pruned).unwrap().modified().unwrap(),
        before
    );
    let report = Report::read(&run).unwrap();
    assert_eq!(report.stages.len(), 3);
    assert!(
        report.stages[2].layers.iter().all(|l| l.bits == 3),
        "{:?}",
        report.stages[2].layers
    );
}
