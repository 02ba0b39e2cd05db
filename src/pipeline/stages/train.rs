//! The `train` stage: a model trained from scratch, with kernel rescaling when `rescale-from`
//! is set (the `rescale` stage is the same with rescaling on by default). Its settings are
//! the flags of `convpress train`, which is this stage run on its own.

use crate::data::{Augment, DatasetKind};
use crate::models::ModelKind;
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage};
use crate::rescale::phases::{self, OptimizerState, RescaleAt, RescaleConfig, rescale_config};
use crate::rescale::{Interp, KernelRule};
use crate::run_folder::{Reuse, RunFolder};
use crate::train::{self, EpochMetrics, OptimizerConfig, Schedule, TrainConfig};
use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adam,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Step,
    Cosine,
}

/// `14x14` (or `14`) as `[14, 14]`.
pub fn parse_hw(s: &str) -> Result<[usize; 2], String> {
    let parts: Vec<&str> = s.split(['x', 'X']).collect();
    let num = |p: &str, what: &str| p.trim().parse().map_err(|_| format!("bad {what} in {s:?}"));
    match parts[..] {
        [h, w] => Ok([num(h, "height")?, num(w, "width")?]),
        [n] => {
            let n = num(n, "size").map_err(|_| format!("expected HxW, got {s:?}"))?;
            Ok([n, n])
        }
        _ => Err(format!("expected HxW, got {s:?}")),
    }
}

/// A training run's settings: `convpress train`'s flags and the `train` stage's keys.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct TrainParams {
    #[arg(long, value_enum, default_value = "lenet5")]
    pub model: ModelKind,
    #[arg(long, value_enum, default_value = "mnist")]
    pub dataset: DatasetKind,
    /// Every hidden layer this many times as wide (0.25: a quarter of the channels and hidden
    /// units; the input and the classes stay).
    #[arg(long)]
    pub width: Option<f64>,
    /// Dataset folder (default: $CONVPRESS_DATA/<dataset>, else data/<dataset>).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerKind>,
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub momentum: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    /// Epochs at which the step schedule multiplies the rate by --gamma.
    #[arg(long, value_delimiter = ',')]
    pub milestones: Option<Vec<usize>>,
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Zero padding around every image (default: 2 for 32x32 models on 28x28 data, else 0).
    #[arg(long)]
    pub pad: Option<usize>,
    /// Train at resolution HxW (e.g. 14x14): images are resampled after padding.
    #[arg(long, value_parser = parse_hw)]
    pub resize: Option<[usize; 2]>,
    /// Augmentation: random crop after padding by this many pixels.
    #[arg(long, default_value_t = 0)]
    pub crop_pad: usize,
    /// Augmentation: random horizontal flips.
    #[arg(long)]
    pub hflip: bool,
    /// Use only the first N training images.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Use only the first N test images.
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Kernel rescaling: train first as the low-resolution twin at this scale (e.g. 0.5), then
    /// rescale the kernels and finish at full resolution.
    #[arg(long, allow_negative_numbers = true)]
    pub rescale_from: Option<f64>,
    /// When to rescale: after this many epochs, or `auto` (default) when an epoch's training
    /// accuracy gains less than --rescale-min-gain points.
    #[arg(long, requires = "rescale_from")]
    pub rescale_at: Option<RescaleAt>,
    #[arg(long, value_enum, default_value = "bicubic")]
    pub rescale_interp: Interp,
    /// How kernel sizes shrink: `round` (k s rounded) or `odd` (nearest odd size, for residual
    /// networks).
    #[arg(long, value_enum, default_value = "round")]
    pub rescale_kernels: KernelRule,
    /// Percentage points of training accuracy below which `auto` switches.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub rescale_min_gain: f64,
    /// The optimizer at the switch: `reset` (fresh) or `carry` (the low-resolution momentum,
    /// rescaled like the weights).
    #[arg(long, value_enum, default_value = "reset")]
    pub rescale_optimizer: OptimizerState,
}

impl Default for TrainParams {
    fn default() -> Self {
        table::clap_defaults()
    }
}

impl TrainParams {
    /// The run's configuration: the model's defaults with these settings on top; the data
    /// folder is `data_dir` (the command line's, for every stage), else the one given here,
    /// else the dataset's default.
    pub fn config(&self, data_dir: Option<&Path>) -> TrainConfig {
        let mut c = TrainConfig::defaults(self.model, self.dataset);
        if let Some(d) = data_dir.or(self.data_dir.as_deref()) {
            c.data_dir = d.to_path_buf();
        }
        // Absolute, so a resume from another working directory finds the data.
        if let Ok(d) = std::path::absolute(&c.data_dir) {
            c.data_dir = d;
        }
        if let Some(e) = self.epochs {
            c.epochs = e;
        }
        if let Some(b) = self.batch_size {
            c.batch_size = b;
        }
        let (mut lr, mut momentum, mut wd) = match c.optimizer {
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
            } => (lr, momentum, weight_decay),
            OptimizerConfig::Adam { lr, weight_decay } => (lr, 0.0, weight_decay),
        };
        let kind = self.optimizer.unwrap_or(OptimizerKind::Sgd);
        if kind == OptimizerKind::Adam && self.lr.is_none() {
            lr = 1e-3;
        }
        lr = self.lr.unwrap_or(lr);
        momentum = self.momentum.unwrap_or(momentum);
        wd = self.weight_decay.unwrap_or(wd);
        c.optimizer = match kind {
            OptimizerKind::Sgd => OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay: wd,
            },
            OptimizerKind::Adam => OptimizerConfig::Adam {
                lr,
                weight_decay: wd,
            },
        };
        match self.schedule {
            Some(ScheduleKind::Constant) => c.schedule = Schedule::Constant,
            Some(ScheduleKind::Cosine) => c.schedule = Schedule::Cosine { min_lr: 0.0 },
            Some(ScheduleKind::Step) => {
                let milestones = self
                    .milestones
                    .clone()
                    .unwrap_or_else(|| vec![c.epochs / 2, c.epochs * 3 / 4]);
                c.schedule = Schedule::Step {
                    milestones,
                    gamma: self.gamma,
                }
            }
            None => {}
        }
        c.seed = self.seed;
        c.pad = self.pad;
        c.resize = self.resize;
        c.augment = Augment {
            crop_pad: self.crop_pad,
            hflip: self.hflip,
        };
        c.train_limit = self.train_limit;
        c.test_limit = self.test_limit;
        c.width = self.width;
        c
    }

    /// Refuses settings that would be silently ignored: the kernel-rescaling ones without
    /// `rescale-from`, and `gamma` or `milestones` without the step schedule.
    pub fn check_unused(&self) -> Result<(), String> {
        let default = TrainParams::default();
        if self.rescale_from.is_none() {
            let given = [
                ("rescale-at", self.rescale_at.is_some()),
                (
                    "rescale-interp",
                    self.rescale_interp != default.rescale_interp,
                ),
                (
                    "rescale-kernels",
                    self.rescale_kernels != default.rescale_kernels,
                ),
                (
                    "rescale-min-gain",
                    self.rescale_min_gain != default.rescale_min_gain,
                ),
                (
                    "rescale-optimizer",
                    self.rescale_optimizer != default.rescale_optimizer,
                ),
            ];
            if let Some((name, _)) = given.iter().find(|(_, g)| *g) {
                return Err(format!(
                    "{name} needs rescale-from (the scale of the first phase)"
                ));
            }
        }
        if self.schedule != Some(ScheduleKind::Step) {
            if self.milestones.is_some() {
                return Err("milestones need schedule = step".into());
            }
            if self.gamma != default.gamma {
                return Err("gamma needs schedule = step".into());
            }
        }
        Ok(())
    }

    /// The kernel-rescaling settings, if this run rescales.
    pub fn rescale(&self) -> Option<RescaleConfig> {
        self.rescale_from.map(|scale| {
            rescale_config(
                scale,
                self.rescale_at.unwrap_or(RescaleAt::Auto),
                self.rescale_interp,
                self.rescale_kernels,
                self.rescale_min_gain,
                self.rescale_optimizer,
            )
        })
    }
}

/// Trains a model from scratch (the first stage of a recipe without `--from`).
pub struct Train {
    pub params: TrainParams,
    /// Registered as `rescale`: kernel rescaling from 0.5 unless `rescale-from` says otherwise.
    pub rescale_by_default: bool,
}

impl Train {
    pub fn new(params: TrainParams) -> Self {
        Train {
            params,
            rescale_by_default: false,
        }
    }

    fn params(&self) -> TrainParams {
        let mut p = self.params.clone();
        if self.rescale_by_default && p.rescale_from.is_none() {
            p.rescale_from = Some(0.5);
        }
        p
    }
}

/// Reads a `train` table.
pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    t.no_layers()?;
    Ok(Box::new(Train::new(t.params()?)))
}

/// Reads a `rescale` table: a `train` table with kernel rescaling on.
pub fn parse_rescale(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    t.no_layers()?;
    Ok(Box::new(Train {
        params: t.params()?,
        rescale_by_default: true,
    }))
}

impl Stage for Train {
    fn kind(&self) -> &'static str {
        if self.rescale_by_default {
            "rescale"
        } else {
            "train"
        }
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(self.params()).expect("settings serialise")
    }

    fn plan(&self, before: &Plan, cx: &Context) -> Result<Plan, String> {
        if before.arch.is_some() {
            return Err(format!(
                "{} trains from scratch, but there is a model already (--from or an earlier stage): use a finetune stage to continue training it",
                self.kind()
            ));
        }
        let p = self.params();
        p.check_unused()?;
        let config = p.config(cx.data_dir.as_deref());
        let full = match p.rescale() {
            Some(rc) => phases::plan(&config, &rc).map_err(|e| format!("{e:#}"))?.0,
            None => {
                config.check()?;
                let prepared = train::prepare(&config).map_err(|e| format!("{e:#}"))?;
                config.arch_for(prepared.train.image_shape(), prepared.train.classes)?
            }
        };
        Ok(Plan {
            arch: Some(full),
            state: Default::default(),
        })
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        if input.is_some() {
            bail!(
                "{} trains from scratch and takes no input model",
                self.kind()
            );
        }
        let p = self.params();
        let config = p.config(cx.data_dir.as_deref());
        let options = cx.train_options(&cx.dir, false);
        let (model_path, curve, details) = match p.rescale() {
            Some(rc) => {
                let out = phases::train_rescaled(&config, &rc, &options)?;
                let mut curve = train::read_metrics(&cx.dir.join("low-res"))?;
                curve.extend(
                    train::read_metrics(&cx.dir.join("full-res"))?
                        .into_iter()
                        .map(|mut m| {
                            m.epoch += out.switch_epoch;
                            m
                        }),
                );
                let details = serde_json::json!({
                    "scale": rc.scale,
                    "switch_epoch": out.switch_epoch,
                    "rescale_seconds": out.rescale_seconds,
                    "train_seconds": out.train_seconds(),
                });
                (out.model_path, curve, details)
            }
            None => {
                let out = train::train(&config, vec![], &options)?;
                let seconds = out
                    .metrics
                    .last()
                    .map_or(0.0, |m| m.cumulative_train_seconds);
                let details = serde_json::json!({ "train_seconds": seconds });
                (out.model_path, out.metrics, details)
            }
        };
        Ok(Outcome {
            model: Model::open(&model_path)?,
            details,
            curve,
        })
    }
}

/// The line `convpress train` prints at the end.
pub fn summary(config: &TrainConfig, outcome: &Outcome) -> String {
    let last: Option<&EpochMetrics> = outcome.curve.last();
    let acc = last.map_or(0.0, |m| m.test_acc);
    let seconds = outcome.details["train_seconds"].as_f64().unwrap_or(0.0);
    let head = format!("{} on {}", config.model.name(), config.dataset.name());
    let tail = format!(
        "test accuracy {:.2}% (error {:.2}%)",
        100.0 * acc,
        100.0 * (1.0 - acc)
    );
    match outcome.details.get("switch_epoch") {
        Some(s) => format!(
            "{head} with kernel rescaling from {} (switched after epoch {s}): {tail}, {seconds:.1} s of training; model saved to {}",
            outcome.details["scale"],
            outcome.model.file.display()
        ),
        None => format!(
            "{head}: {tail} after {} epochs, {seconds:.1} s of training; model saved to {}",
            last.map_or(0, |m| m.epoch),
            outcome.model.file.display()
        ),
    }
}

/// The line `convpress train` starts with.
fn announce(config: &TrainConfig, run_dir: &Path) {
    eprintln!(
        "training {} on {} for {} epochs (seed {}), run folder {}",
        config.model.name(),
        config.dataset.name(),
        config.epochs,
        config.seed,
        run_dir.display()
    );
}

/// `convpress train --resume`: the run in `run_dir` continued with its saved settings. Only
/// the number of epochs may change, and `data_dir` points the run at data that moved.
pub fn resume(
    run_dir: &Path,
    epochs: Option<usize>,
    data_dir: Option<&Path>,
    cx: &Context,
) -> anyhow::Result<String> {
    let path = run_dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot resume: {} is missing", path.display()))?;
    let mut config: TrainConfig =
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    // The trainer records these in config.json once it has checked the run.
    if let Some(e) = epochs {
        config.epochs = e;
    }
    if let Some(d) = data_dir {
        config.data_dir =
            std::path::absolute(d).with_context(|| format!("--data-dir {}", d.display()))?;
    }
    announce(&config, run_dir);
    let out = train::train(&config, vec![], &cx.train_options(run_dir, true))?;
    let seconds = out
        .metrics
        .last()
        .map_or(0.0, |m| m.cumulative_train_seconds);
    let outcome = Outcome {
        model: Model::open(&out.model_path)?,
        details: serde_json::json!({ "train_seconds": seconds }),
        curve: out.metrics,
    };
    Ok(summary(&config, &outcome))
}

/// The flags of `p` that differ from their defaults, other than `allowed`: what a resume
/// would silently ignore, so it refuses them instead.
fn changed_flags(p: &TrainParams, allowed: &[&str]) -> Vec<String> {
    let given = serde_json::to_value(p).expect("settings serialise");
    let default = serde_json::to_value(TrainParams::default()).expect("settings serialise");
    let mut out = Vec::new();
    if let (Some(given), Some(default)) = (given.as_object(), default.as_object()) {
        for (key, value) in given {
            if !allowed.contains(&key.as_str()) && default.get(key) != Some(value) {
                out.push(format!("--{key}"));
            }
        }
    }
    out
}

/// Whether the settings `p` gives are the ones the run in `run_dir` was started with (apart
/// from its epochs and data folder): repeating the run's own command with `--resume` is fine.
fn restates_run(p: &TrainParams, run_dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(run_dir.join("config.json")) else {
        return true; // `resume` says that the config is missing
    };
    let Ok(saved) = serde_json::from_str::<TrainConfig>(&text) else {
        return true; // `resume` says that it is damaged
    };
    let mut given = p.config(None);
    given.epochs = saved.epochs;
    given.data_dir = saved.data_dir.clone();
    given == saved
}

/// `convpress train`: the stage in `run_dir` (default `runs/<model>-<dataset>-<time>`), or
/// with [`Reuse::Resume`] the run there continued.
pub fn command(
    p: &TrainParams,
    run_dir: Option<PathBuf>,
    reuse: Reuse,
    cx: Context,
) -> anyhow::Result<()> {
    if reuse == Reuse::Resume {
        let run_dir = run_dir.context("--resume needs --run-dir")?;
        p.check_unused().map_err(|e| anyhow::anyhow!("--{e}"))?;
        let given = changed_flags(p, &["epochs", "data-dir"]);
        if !given.is_empty() && !restates_run(p, &run_dir) {
            bail!(
                "--resume continues the run in {} with its own settings (its config.json), so {} cannot be given: only --epochs and --data-dir can change, and other flags only repeat the run's own values",
                run_dir.display(),
                given.join(", ")
            );
        }
        let _folder = RunFolder::open(&run_dir, reuse, "--run-dir", true, &[])?;
        println!(
            "{}",
            self::resume(&run_dir, p.epochs, p.data_dir.as_deref(), &cx)?
        );
        return Ok(());
    }
    let config = p.config(None);
    let stage = Train::new(p.clone());
    // Settings and data are checked before the run folder is taken (and, with --force,
    // emptied).
    stage
        .plan(&Plan::default(), &cx)
        .map_err(anyhow::Error::msg)?;
    let run_dir = run_dir.unwrap_or_else(|| {
        crate::pipeline::timestamped_run_dir(&format!(
            "{}-{}",
            config.model.name(),
            config.dataset.name()
        ))
    });
    let _folder = RunFolder::open(&run_dir, reuse, "--run-dir", true, &[&config.data_dir])?;
    announce(&config, &run_dir);
    let cx = Context { dir: run_dir, ..cx };
    let out = stage.run(None, &cx)?;
    println!("{}", summary(&config, &out));
    Ok(())
}
