//! Knowledge distillation: at alpha 0 the stage is exactly plain training; the teacher's
//! cached logits equal the ones it computes; bad teachers and settings are refused before
//! training; a recipe distils into a rewritten student.

mod common;

use burn::prelude::*;
use convpress::checkpoint;
use convpress::compress::distill::{Distill, Settings};
use convpress::models::{ModelKind, Network};
use convpress::pipeline::recipe::Recipe;
use convpress::pipeline::stages::distill::{DistillParams, DistillStage};
use convpress::pipeline::stages::train::{Train, TrainParams};
use convpress::pipeline::{Context, Plan, Stage};
use convpress::train::{Progress, TrainHook};
use std::path::{Path, PathBuf};

fn cx(dir: &Path, data: &Path) -> Context {
    Context {
        dir: dir.to_path_buf(),
        device: Device::flex(),
        data_dir: Some(data.to_path_buf()),
        progress_bar: false,
        verbose: false,
    }
}

/// A fresh `kind` for `input` images and `classes` classes saved as a teacher, with the
/// preprocessing of unpadded 28x28 images (or `pad`).
fn teacher(dir: &Path, kind: ModelKind, input: [usize; 3], classes: usize, pad: usize) -> PathBuf {
    let arch = kind.arch(input, classes).unwrap();
    let net = Network::seeded(&arch, &Device::flex(), 5).unwrap();
    let mut meta = common::meta();
    meta.preprocess.pad = pad;
    let file = dir.join(format!("{}-{classes}-{pad}.safetensors", kind.name()));
    checkpoint::save(&file, &net, &meta).unwrap();
    file
}

fn params(teacher: &Path) -> DistillParams {
    DistillParams {
        teacher: teacher.to_path_buf(),
        student: Some(ModelKind::Lenet300),
        width: Some(0.25),
        temperature: 4.0,
        alpha: 0.9,
        epochs: Some(1),
        lr: Some(0.01),
        seed: 1,
        hint_student: None,
        hint_teacher: None,
        hint_epochs: 1,
        train_limit: None,
        test_limit: None,
    }
}

#[test]
fn at_alpha_zero_distillation_is_plain_training() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_synthetic_mnist(&data, 256, 64, 28);
    let t = teacher(root.path(), ModelKind::Lenet300, [1, 28, 28], 10, 0);
    let plain = Train::new(TrainParams {
        model: ModelKind::Lenet300,
        width: Some(0.25),
        data_dir: Some(data.clone()),
        epochs: Some(1),
        lr: Some(0.01),
        ..Default::default()
    })
    .run(None, &cx(&root.path().join("plain"), &data))
    .unwrap();
    let stage = DistillStage {
        params: DistillParams {
            alpha: 0.0,
            ..params(&t)
        },
    };
    let dir = root.path().join("distilled");
    stage.plan(&Plan::default(), &cx(&dir, &data)).unwrap();
    let distilled = stage.run(None, &cx(&dir, &data)).unwrap();
    let (a, b) = (&plain.curve[0], &distilled.curve[0]);
    assert_eq!(
        (a.train_loss, a.test_loss, a.test_acc),
        (b.train_loss, b.test_loss, b.test_acc)
    );
    assert_eq!(plain.model.arch(), distilled.model.arch());
    // With the teacher's term the run differs.
    let dir = root.path().join("soft");
    let soft = DistillStage { params: params(&t) }
        .run(None, &cx(&dir, &data))
        .unwrap();
    assert_ne!(soft.curve[0].train_loss, a.train_loss);
}

/// The hook's cached teacher logits give the loss the teacher's own forward pass gives; an
/// augmented batch is never served from the cache.
#[test]
fn cached_teacher_logits_equal_computed_ones() {
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let arch = ModelKind::Lenet300.arch([1, 28, 28], 10).unwrap();
    let teacher = Network::seeded(&arch, &device, 1).unwrap();
    let student = Network::seeded(&arch, &ad, 2).unwrap();
    let pre = common::meta().preprocess;
    let settings = Settings {
        temperature: 3.0,
        alpha: 0.5,
    };
    let mut hook = Distill::new(teacher, &pre, &pre, settings).unwrap();
    let images = Tensor::<1>::from_floats(common::values(4 * 784, 3).as_slice(), &ad)
        .reshape([4, 1, 28, 28]);
    let batch = |augmented| convpress::data::Batch {
        images: images.clone(),
        labels: Tensor::from_ints([1, 2, 3, 4], &ad),
        len: 4,
        indices: vec![7, 3, 9, 0],
        augmented,
    };
    let progress = Progress {
        epoch: 0,
        epochs: 1,
        batch: 0,
        batches: 1,
        step: 0,
        lr: 0.1,
    };
    let logits = student.forward(images.clone());
    let mut loss = |augmented| -> f32 {
        hook.extra_loss(&progress, &student, &batch(augmented), &logits)
            .unwrap()
            .into_scalar()
    };
    let first = loss(false);
    let cached = loss(false);
    let fresh = loss(true);
    assert!(first > 0.0);
    assert_eq!(first, cached);
    assert!((first - fresh).abs() <= 1e-6 * first.abs());
    assert_eq!(hook.label_weight(&progress), 0.5);
}

#[test]
fn bad_teachers_and_settings_are_refused_before_training() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_synthetic_mnist(&data, 64, 16, 28);
    let good = teacher(root.path(), ModelKind::Lenet300, [1, 28, 28], 10, 0);
    let five = teacher(root.path(), ModelKind::Lenet300, [1, 28, 28], 5, 0);
    let padded = teacher(root.path(), ModelKind::Resnet20, [1, 32, 32], 10, 2);
    let dir = root.path().join("run");
    let refused = |p: DistillParams| -> String {
        DistillStage { params: p }
            .plan(&Plan::default(), &cx(&dir, &data))
            .unwrap_err()
    };
    let e = refused(params(&five));
    assert!(e.contains("teacher scores 5 classes"), "{e}");
    // A fresh student sees the teacher's images (here padded to 32x32); a trained one has
    // its own input, which must be the teacher's.
    let fresh = DistillStage {
        params: params(&padded),
    }
    .plan(&Plan::default(), &cx(&dir, &data))
    .unwrap();
    assert_eq!(fresh.arch.unwrap().input, [1, 32, 32]);
    let student = convpress::pipeline::Model::open(&good).unwrap();
    let e = DistillStage {
        params: DistillParams {
            student: None,
            width: None,
            ..params(&padded)
        },
    }
    .plan(&Plan::of(&student), &cx(&dir, &data))
    .unwrap_err();
    assert!(e.contains("[1, 32, 32]"), "{e}");
    for t in [0.0, -1.0, f64::NAN] {
        let e = refused(DistillParams {
            temperature: t,
            ..params(&good)
        });
        assert!(e.contains("temperature must be a positive number"), "{e}");
    }
    for a in [-0.1, 1.5] {
        let e = refused(DistillParams {
            alpha: a,
            ..params(&good)
        });
        assert!(e.contains("alpha must be in [0, 1]"), "{e}");
    }
    let e = refused(DistillParams {
        teacher: root.path().join("missing.safetensors"),
        ..params(&good)
    });
    assert!(e.contains("teacher"), "{e}");
    let e = refused(DistillParams {
        student: None,
        ..params(&good)
    });
    assert!(e.contains("no student yet"), "{e}");
    assert!(!dir.exists(), "plans write nothing");
}

#[test]
fn a_recipe_distils_into_a_rewritten_student() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_synthetic_mnist(&data, 128, 32, 28);
    let t = teacher(root.path(), ModelKind::Lenet5, [1, 28, 28], 10, 0);
    let text = format!(
        r#"
description = "a LeNet-5 with half of fc1 and CReLU, distilled"
[report]
latency-seconds = 0.02
batches = [1]

[[stage]]
kind = "train"
model = "lenet5"
epochs = 1
data-dir = {data:?}

[[stage]]
kind = "rewrite"
to = "crelu"
layer-seconds = 0.01

[[stage]]
kind = "distill"
teacher = {t:?}
epochs = 1
"#
    );
    let recipe = Recipe::parse(Path::new("r.toml"), text).unwrap();
    let out = root.path().join("run");
    let report = convpress::pipeline::runner::run(
        &recipe,
        &convpress::pipeline::runner::RunOptions {
            run_dir: out.clone(),
            from: None,
            force: false,
            resume: false,
        },
        &cx(&out, &data),
    );
    let report = report.unwrap_or_else(|e| panic!("{e:#}"));
    let last = report.stages.last().unwrap();
    assert_eq!(last.kind, "distill");
    assert_eq!(last.figures.params, 230_830);
}

/// FitNets: during the hint epochs the labels weigh nothing and the loss is the hint's; the
/// regressor trains through `own_gradients` (the hint loss falls with the student held
/// fixed); a hint between layers of different spatial sizes, or one with no epochs left for
/// KD, is refused.
#[test]
fn fitnets_hint_trains_its_regressor_and_bad_hints_are_refused() {
    use convpress::compress::distill::{Hint, HintSpec};
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let arch = ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap();
    let thin = convpress::models::width::scale(&arch, 0.25).unwrap();
    let spec = HintSpec {
        student: 2,
        teacher: 2,
        epochs: 1,
    };
    let teacher = Network::seeded(&arch, &device, 1).unwrap();
    let student = Network::seeded(&thin, &ad, 2).unwrap();
    let pre = common::meta().preprocess;
    let settings = Settings {
        temperature: 4.0,
        alpha: 0.9,
    };
    let mut hook = Distill::new(teacher, &pre, &pre, settings)
        .unwrap()
        .with_hint(Hint::new(spec, &arch, &thin).unwrap());
    let images = Tensor::<1>::from_floats(common::values(8 * 784, 4).as_slice(), &ad)
        .reshape([8, 1, 28, 28]);
    let batch = convpress::data::Batch {
        images: images.clone(),
        labels: Tensor::from_ints([0, 1, 2, 3, 4, 5, 6, 7], &ad),
        len: 8,
        indices: (0..8).collect(),
        augmented: false,
    };
    let progress = Progress {
        epoch: 0,
        epochs: 2,
        batch: 0,
        batches: 1,
        step: 0,
        lr: 0.2,
    };
    assert_eq!(hook.label_weight(&progress), 0.0);
    let logits = student.forward(images.clone());
    let mut losses = Vec::new();
    for _ in 0..60 {
        let loss = hook
            .extra_loss(&progress, &student, &batch, &logits)
            .unwrap();
        losses.push(loss.clone().into_scalar::<f32>());
        let mut grads = loss.backward();
        hook.own_gradients(&progress, &mut grads);
    }
    assert!(
        losses[59] < 0.7 * losses[0],
        "the hint loss should fall as the regressor trains: {losses:?}"
    );
    // After the hint epochs, KD: the labels weigh 1 − α again.
    let kd = Progress {
        epoch: 1,
        ..progress
    };
    assert!((hook.label_weight(&kd) - 0.1).abs() < 1e-12);

    // Refusals, at plan time.
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    common::write_synthetic_mnist(&data, 64, 16, 28);
    let t = teacher_file(root.path(), &arch);
    let dir = root.path().join("run");
    let refused = |p: DistillParams| {
        DistillStage { params: p }
            .plan(&Plan::default(), &cx(&dir, &data))
            .unwrap_err()
    };
    let hinted = |s: &str, t2: &str, e: usize| DistillParams {
        student: Some(ModelKind::Lenet5),
        epochs: Some(3),
        hint_student: Some(s.into()),
        hint_teacher: Some(t2.into()),
        hint_epochs: e,
        ..params(&t)
    };
    assert!(refused(hinted("layers.2", "layers.5", 1)).contains("same spatial size"));
    assert!(refused(hinted("layers.2", "layers.2", 3)).contains("fewer than the 3 epochs"));
    assert!(refused(hinted("layers.2.x", "layers.2", 1)).contains("top-level layer"));
}

fn teacher_file(dir: &Path, arch: &convpress::models::Arch) -> PathBuf {
    let net = Network::seeded(arch, &Device::flex(), 5).unwrap();
    let file = dir.join("teacher-lenet5.safetensors");
    checkpoint::save(&file, &net, &common::meta()).unwrap();
    file
}
