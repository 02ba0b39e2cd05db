//! The `distill` stage: a student trained with a teacher's soft targets
//! (`compress::distill`, Hinton et al. 2015). At the start of a recipe it trains the model
//! that `student` names (optionally `width` times as wide) from scratch; after other stages it
//! trains the model so far further, keeping its masks and codebooks like `finetune`, so a
//! pruned, shared or rewritten student learns from a full-precision teacher.
//! `convpress distill` runs it on its own.

use crate::checkpoint;
use crate::compress::distill::{self, Distill, Hint, HintSpec, Settings};
use crate::models::{ModelKind, Network};
use crate::pipeline::stages::train::TrainParams;
use crate::pipeline::stages::{check_retrain, reopen, retrain_config, train_keeping};
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage};
use crate::train::{self, TrainConfig, TrainHook};
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `convpress distill`'s flags and the `distill` stage's keys.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DistillParams {
    /// The teacher: a trained convpress checkpoint (.safetensors) for the same data.
    #[arg(long)]
    pub teacher: PathBuf,
    /// The student to train from scratch, at the start of a recipe (the command takes a model
    /// name or a checkpoint in --student).
    #[arg(skip)]
    #[serde(default)]
    pub student: Option<ModelKind>,
    /// A fresh student with every hidden layer this many times as wide (0.25: a quarter).
    #[arg(long)]
    #[serde(default)]
    pub width: Option<f64>,
    /// Softmax temperature T of the soft targets.
    #[arg(long, default_value_t = 4.0, allow_negative_numbers = true)]
    #[serde(default = "four")]
    pub temperature: f64,
    /// Weight α of the soft loss (times T²); the labels get 1 − α.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    #[serde(default = "point_nine")]
    pub alpha: f64,
    /// Training epochs (default: the student model's own from scratch, 2 for a trained one).
    #[arg(long)]
    #[serde(default)]
    pub epochs: Option<usize>,
    /// Learning rate (default: the model's own from scratch, 0.01 for a trained one).
    #[arg(long, allow_negative_numbers = true)]
    #[serde(default)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 1)]
    #[serde(default = "one")]
    pub seed: u64,
    /// FitNets: the student's guided layer (a top-level layer, `layers.2`), trained first to
    /// match the teacher's hint layer through a 1x1 regressor.
    #[arg(long, requires = "hint_teacher")]
    #[serde(default)]
    pub hint_student: Option<String>,
    /// FitNets: the teacher's hint layer (`layers.2`).
    #[arg(long, requires = "hint_student")]
    #[serde(default)]
    pub hint_teacher: Option<String>,
    /// FitNets: the epochs of hint training, counted in --epochs (KD takes the rest).
    #[arg(long, default_value_t = 1)]
    #[serde(default = "one_usize")]
    pub hint_epochs: usize,
    #[arg(long)]
    #[serde(default)]
    pub train_limit: Option<usize>,
    #[arg(long)]
    #[serde(default)]
    pub test_limit: Option<usize>,
}

fn four() -> f64 {
    4.0
}
fn point_nine() -> f64 {
    0.9
}
fn one() -> u64 {
    1
}
fn one_usize() -> usize {
    1
}

/// `layers.N` as N: a hint joins top-level layers.
fn top_level(path: &str, key: &str) -> Result<usize, String> {
    path.strip_prefix("layers.")
        .and_then(|i| i.parse().ok())
        .ok_or_else(|| format!("{key} must name a top-level layer (layers.N), got {path:?}"))
}

pub struct DistillStage {
    pub params: DistillParams,
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    t.no_layers()?;
    Ok(Box::new(DistillStage {
        params: t.params()?,
    }))
}

impl DistillParams {
    /// The FitNets hint, if one is asked for, checked against `epochs` of training.
    fn hint(&self, epochs: usize) -> Result<Option<HintSpec>, String> {
        let (Some(s), Some(t)) = (&self.hint_student, &self.hint_teacher) else {
            if self.hint_student.is_some() || self.hint_teacher.is_some() {
                return Err("a hint needs both hint-student and hint-teacher".into());
            }
            return Ok(None);
        };
        if self.hint_epochs == 0 || self.hint_epochs >= epochs {
            return Err(format!(
                "hint-epochs must be at least 1 and fewer than the {epochs} epochs (KD takes the rest), got {}",
                self.hint_epochs
            ));
        }
        Ok(Some(HintSpec {
            student: top_level(s, "hint-student")?,
            teacher: top_level(t, "hint-teacher")?,
            epochs: self.hint_epochs,
        }))
    }

    /// Epochs and rate for a trained student: as given, else `finetune`'s 2 at 0.01.
    fn trained_schedule(&self) -> (usize, f64) {
        (self.epochs.unwrap_or(2), self.lr.unwrap_or(0.01))
    }

    fn settings(&self) -> Settings {
        Settings {
            temperature: self.temperature,
            alpha: self.alpha,
        }
    }

    /// The run that trains a fresh `kind` student on the teacher's data, padded and resized as
    /// the teacher's images were: `convpress train`'s settings with these on top.
    fn fresh_config(
        &self,
        kind: ModelKind,
        teacher: &checkpoint::ModelMeta,
        cx: &Context,
    ) -> TrainConfig {
        TrainParams {
            model: kind,
            dataset: teacher.dataset,
            data_dir: Some(cx.data_dir_for(teacher)),
            width: self.width,
            epochs: self.epochs,
            lr: self.lr,
            seed: self.seed,
            pad: Some(teacher.preprocess.pad),
            resize: teacher.preprocess.resize,
            train_limit: self.train_limit,
            test_limit: self.test_limit,
            ..TrainParams::default()
        }
        .config(None)
    }
}

/// The teacher's file, read and checked: a float checkpoint (an encoded `.cpz` has no
/// network to run forward in training).
fn open_teacher(path: &Path) -> Result<Model, String> {
    let teacher = Model::open(path).map_err(|e| format!("teacher: {e:#}"))?;
    if teacher.is_encoded() {
        return Err(format!(
            "teacher {} is an encoded .cpz file: give the .safetensors checkpoint it was made from",
            path.display()
        ));
    }
    Ok(teacher)
}

impl Stage for DistillStage {
    fn kind(&self) -> &'static str {
        "distill"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.params).expect("settings serialise")
    }

    fn plan(&self, before: &Plan, cx: &Context) -> Result<Plan, String> {
        let p = &self.params;
        p.settings().check()?;
        if p.train_limit == Some(0) || p.test_limit == Some(0) {
            return Err("train-limit and test-limit must be at least 1".into());
        }
        let teacher = open_teacher(&p.teacher)?;
        let (arch, epochs) = match (&before.arch, p.student) {
            (None, None) => {
                return Err(
                    "there is no student yet: name one with student (a model to train from scratch), or start from a trained model (--from or an earlier stage)"
                        .into(),
                );
            }
            (Some(_), Some(_)) => {
                return Err(
                    "student trains a model from scratch, but there is a model already (--from or an earlier stage): leave student out to distill into it"
                        .into(),
                );
            }
            (None, Some(kind)) => {
                let config = p.fresh_config(kind, teacher.meta(), cx);
                config.check()?;
                let prepared = train::prepare(&config).map_err(|e| format!("{e:#}"))?;
                let shape = (prepared.train.image_shape(), prepared.train.classes);
                (config.arch_for(shape.0, shape.1)?, config.epochs)
            }
            (Some(arch), None) => {
                before.not_encoded()?;
                if p.width.is_some() {
                    return Err(
                        "width makes a fresh student; a trained one keeps its layers".into(),
                    );
                }
                let (epochs, lr) = p.trained_schedule();
                check_retrain(arch, epochs, lr, [p.train_limit, p.test_limit])?;
                (arch.clone(), epochs)
            }
        };
        distill::check_shapes(teacher.arch(), &arch)?;
        if let Some(h) = p.hint(epochs)? {
            h.check(teacher.arch(), &arch)?;
        }
        Ok(Plan {
            arch: Some(arch),
            state: before.state.clone(),
        })
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let p = &self.params;
        let teacher = open_teacher(&p.teacher).map_err(anyhow::Error::msg)?;
        let teacher_meta = teacher.meta().clone();
        let network = Network::new(teacher.arch(), &cx.device).map_err(anyhow::Error::msg)?;
        let network = checkpoint::load_tensors(network, teacher.loaded.tensors.clone())
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.teacher.display()))?;
        let (config, keep) = match (&input, p.student) {
            (None, Some(kind)) => (p.fresh_config(kind, &teacher_meta, cx), Default::default()),
            (Some(model), None) => {
                let (epochs, lr) = p.trained_schedule();
                let mut c = retrain_config(model, epochs, lr, p.seed, cx)?;
                c.train_limit = p.train_limit;
                c.test_limit = p.test_limit;
                (c, model.constraints.clone())
            }
            _ => anyhow::bail!("distill needs either a student to train or an input model"),
        };
        let prepared = train::prepare(&config)?;
        let student_meta = checkpoint::ModelMeta {
            dataset: config.dataset,
            preprocess: prepared.preprocess.clone(),
            info: serde_json::Value::Null,
        };
        let arch = config
            .arch_for(prepared.train.image_shape(), prepared.train.classes)
            .map_err(anyhow::Error::msg)?;
        distill::check_pair((teacher.arch(), &teacher_meta), (&arch, &student_meta))
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.teacher.display()))?;
        drop(prepared);
        let hook = Distill::new(
            network,
            &teacher_meta.preprocess,
            &student_meta.preprocess,
            p.settings(),
        )
        .map_err(anyhow::Error::msg)?;
        let hook = match p.hint(config.epochs).map_err(anyhow::Error::msg)? {
            Some(spec) => {
                hook.with_hint(Hint::new(spec, teacher.arch(), &arch).map_err(anyhow::Error::msg)?)
            }
            None => hook,
        };
        let hooks: Vec<Box<dyn TrainHook>> = vec![Box::new(hook)];
        let (outcome, kept) = train_keeping(&config, &keep, hooks, cx)?;
        let last = outcome.metrics.last();
        let details = serde_json::json!({
            "teacher": p.teacher,
            "teacher_accuracy": teacher_meta.info.get("test_acc"),
            "temperature": p.temperature,
            "alpha": p.alpha,
            "hint": p.hint_student.as_ref().map(|s| serde_json::json!({
                "student": s, "teacher": p.hint_teacher, "epochs": p.hint_epochs,
            })),
            "epochs": config.epochs,
            "params": arch.num_params(),
            "train_seconds": last.map(|m| m.cumulative_train_seconds),
        });
        Ok(Outcome {
            model: reopen(&outcome.model_path, &kept)
                .with_context(|| format!("reopening {}", outcome.model_path.display()))?,
            details,
            curve: outcome.metrics,
        })
    }
}

/// The line `convpress distill` ends with.
pub fn summary(out: &Outcome) -> String {
    let acc = out.curve.last().map_or(0.0, |m| m.test_acc);
    let teacher = out.details["teacher_accuracy"]
        .as_f64()
        .map_or("?".to_string(), |a| format!("{:.2}%", 100.0 * a));
    format!(
        "student ({} parameters) distilled at T = {}, alpha = {}: test accuracy {:.2}% (error {:.2}%, teacher {teacher}) after {} epochs, {:.1} s of training; model saved to {}",
        out.details["params"],
        out.details["temperature"],
        out.details["alpha"],
        100.0 * acc,
        100.0 * (1.0 - acc),
        out.details["epochs"],
        out.details["train_seconds"].as_f64().unwrap_or(0.0),
        out.model.file.display()
    )
}

/// `convpress distill`: `student` is a model name (trained from scratch) or a checkpoint
/// (trained further, keeping its masks and codebooks); the run goes to `run_dir` (default
/// `runs/<student>-distilled-<time>`).
pub fn command(
    mut params: DistillParams,
    student: &str,
    run_dir: Option<PathBuf>,
    reuse: crate::run_folder::Reuse,
    cx: Context,
) -> anyhow::Result<()> {
    let input = match <ModelKind as clap::ValueEnum>::from_str(student, true) {
        Ok(kind) => {
            params.student = Some(kind);
            None
        }
        Err(_) if Path::new(student).exists() => Some(Model::open(Path::new(student))?),
        Err(_) => anyhow::bail!(
            "--student {student:?} is neither a model ({}) nor a checkpoint file",
            <ModelKind as clap::ValueEnum>::value_variants()
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let stage = DistillStage { params };
    let before = input.as_ref().map(Plan::of).unwrap_or_default();
    stage.plan(&before, &cx).map_err(anyhow::Error::msg)?;
    let name = match &input {
        Some(m) => m.arch().name.clone(),
        None => student.to_string(),
    };
    let run_dir = run_dir
        .unwrap_or_else(|| crate::pipeline::timestamped_run_dir(&format!("{name}-distilled")));
    let teacher = stage.params.teacher.clone();
    let mut inputs: Vec<&Path> = vec![&teacher];
    if let Some(m) = &input {
        inputs.push(&m.file);
    }
    let _folder = crate::run_folder::RunFolder::open(&run_dir, reuse, "--run-dir", true, &inputs)?;
    eprintln!(
        "distilling {} into {name} (T = {}, alpha = {}), run folder {}",
        teacher.display(),
        stage.params.temperature,
        stage.params.alpha,
        run_dir.display()
    );
    let cx = Context { dir: run_dir, ..cx };
    let out = stage.run(input, &cx)?;
    println!("{}", summary(&out));
    Ok(())
}
