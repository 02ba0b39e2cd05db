//! Training with kernel rescaling: the low-resolution twin first, then the full model, on one
//! learning-rate schedule spanning both phases (the rescaled run has the baseline's epochs;
//! the ones before the switch are cheaper).

use super::{Interp, KernelRule, low_res_twin, rescale_tensors};
use crate::checkpoint::{self, ModelMeta};
use crate::models::Network;
use crate::train::{self, EpochMetrics, ScheduleSpan, TrainConfig, TrainHook, TrainOptions};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

/// When training moves from the low-resolution twin to the full model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Switch {
    /// After this many low-resolution epochs.
    Epoch { epoch: usize },
    /// After the first low-resolution epoch whose training accuracy improved on the previous
    /// epoch's by less than `min_gain` (a fraction: 0.005 is half a point), and at the latest
    /// one epoch before the end. The paper switches when low-resolution training stops paying
    /// off; this rule reads only training figures, never the test set.
    Auto { min_gain: f64 },
}

/// When a rescaled run switches to full resolution: after an epoch, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RescaleAt {
    Auto,
    Epoch(usize),
}

impl std::str::FromStr for RescaleAt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(RescaleAt::Auto),
            n => n
                .parse()
                .map(RescaleAt::Epoch)
                .map_err(|_| format!("expected an epoch number or `auto`, got {n:?}")),
        }
    }
}

impl Serialize for RescaleAt {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RescaleAt::Auto => s.serialize_str("auto"),
            RescaleAt::Epoch(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for RescaleAt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(usize),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(RescaleAt::Epoch(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A rescaled run's settings besides the ordinary training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RescaleConfig {
    /// Scale factor of the low-resolution phase, in (0, 1).
    pub scale: f64,
    pub switch: Switch,
    pub interp: Interp,
    #[serde(default)]
    pub kernels: KernelRule,
    #[serde(default)]
    pub optimizer: OptimizerState,
}

/// What the full-resolution phase's optimizer starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerState {
    /// A fresh optimizer (no momentum yet).
    #[default]
    Reset,
    /// The low-resolution phase's state, each tensor rescaled like its weight
    /// ([`super::rescale_optimizer_state`]).
    Carry,
}

/// One point of a run's accuracy-against-time curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// `low` or `full`.
    pub phase: String,
    /// 1-based epoch over the whole run.
    pub epoch: usize,
    /// Training seconds since the run began (steps and the rescaling itself; evaluation is
    /// left out, for the baseline too).
    pub seconds: f64,
    pub test_acc: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RescaledOutcome {
    pub switch_epoch: usize,
    pub rescale_seconds: f64,
    pub timeline: Vec<TimelinePoint>,
    pub model_path: PathBuf,
}

impl RescaledOutcome {
    pub fn final_acc(&self) -> f64 {
        self.timeline.last().map_or(0.0, |p| p.test_acc)
    }
    pub fn train_seconds(&self) -> f64 {
        self.timeline.last().map_or(0.0, |p| p.seconds)
    }
}

/// The kernel-rescaling settings: scale, switch point and how kernels and optimizer move.
pub fn rescale_config(
    scale: f64,
    at: RescaleAt,
    interp: Interp,
    kernels: KernelRule,
    min_gain_points: f64,
    optimizer: OptimizerState,
) -> RescaleConfig {
    let switch = match at {
        RescaleAt::Auto => Switch::Auto {
            min_gain: min_gain_points / 100.0,
        },
        RescaleAt::Epoch(epoch) => Switch::Epoch { epoch },
    };
    RescaleConfig {
        scale,
        switch,
        interp,
        kernels,
        optimizer,
    }
}

/// The [`Switch::Auto`] rule as a training hook that ends the low-resolution phase.
struct PlateauSwitch {
    min_gain: f64,
    last_acc: Option<f64>,
    stop: bool,
}

impl TrainHook for PlateauSwitch {
    fn name(&self) -> &str {
        "rescale-switch"
    }
    fn on_epoch_end(&mut self, m: &EpochMetrics, _model: &Network) {
        if let Some(prev) = self.last_acc
            && m.train_acc - prev < self.min_gain
        {
            self.stop = true;
        }
        self.last_acc = Some(m.train_acc);
    }
    fn should_stop(&self) -> bool {
        self.stop
    }
}

/// Refuses settings that cannot run, before any training.
pub fn check(config: &TrainConfig, rc: &RescaleConfig) -> Result<(), String> {
    if !(rc.scale.is_finite() && rc.scale > 0.0 && rc.scale < 1.0) {
        return Err(format!(
            "--rescale-from must be in (0, 1), got {}",
            rc.scale
        ));
    }
    match rc.switch {
        Switch::Epoch { epoch } if epoch == 0 || epoch >= config.epochs => Err(format!(
            "--rescale-at {epoch} must leave at least one epoch at each resolution of the {} epochs",
            config.epochs
        )),
        Switch::Auto { .. } if config.epochs < 2 => {
            Err("kernel rescaling needs at least 2 epochs".into())
        }
        Switch::Auto { min_gain } if !(min_gain.is_finite() && min_gain >= 0.0) => Err(format!(
            "the switch threshold must be non-negative, got {min_gain}"
        )),
        _ if config.init_from.is_some() => {
            Err("kernel rescaling starts from scratch; it cannot take --init-from".into())
        }
        _ => Ok(()),
    }
}

/// Everything a rescaled run needs settled before it trains: the settings checked, and the full
/// architecture with its low-resolution twin (which fails, naming the layer, for a model that
/// cannot be rescaled). Reads the data once, for its shape.
pub fn plan(
    config: &TrainConfig,
    rc: &RescaleConfig,
) -> anyhow::Result<(crate::models::Arch, crate::models::Arch)> {
    config.check().map_err(anyhow::Error::msg)?;
    check(config, rc).map_err(anyhow::Error::msg)?;
    let prepared = train::prepare(config)?;
    let full = config
        .arch_for(prepared.train.image_shape(), prepared.train.classes)
        .map_err(anyhow::Error::msg)?;
    let twin = low_res_twin(&full, rc.scale, rc.kernels).map_err(anyhow::Error::msg)?;
    Ok((full, twin))
}

/// Trains `config` with kernel rescaling into `options.run_dir`: `low-res/` holds the twin's
/// run, `rescaled.safetensors` its kernels carried to full size, `full-res/` the rest of the
/// run, and `rescale.json` the timeline.
pub fn train_rescaled(
    config: &TrainConfig,
    rc: &RescaleConfig,
    options: &TrainOptions,
) -> anyhow::Result<RescaledOutcome> {
    let (full, twin) = plan(config, rc)?;
    let run_dir = &options.run_dir;
    if run_dir.join("rescale.json").exists() || run_dir.join("low-res").exists() {
        bail!(
            "{} already holds a rescaled run (resuming one is not supported): choose another --run-dir",
            run_dir.display()
        );
    }
    let low_epochs = match rc.switch {
        Switch::Epoch { epoch } => epoch,
        Switch::Auto { .. } => config.epochs - 1,
    };
    let mut low = config.clone();
    low.arch = Some(twin.clone());
    low.resize = Some([twin.input[1], twin.input[2]]);
    low.epochs = low_epochs;
    low.schedule_span = Some(ScheduleSpan {
        offset: 0,
        total: config.epochs,
    });
    let hooks: Vec<Box<dyn TrainHook>> = match rc.switch {
        Switch::Auto { min_gain } => vec![Box::new(PlateauSwitch {
            min_gain,
            last_acc: None,
            stop: false,
        })],
        Switch::Epoch { .. } => vec![],
    };
    if options.verbose {
        eprintln!(
            "phase 1: low-resolution twin at {}x{} ({} FLOPs per image against {}), up to {} epochs",
            twin.input[1],
            twin.input[2],
            twin.flops(),
            full.flops(),
            low_epochs
        );
    }
    let low_run = TrainOptions {
        run_dir: run_dir.join("low-res"),
        ..options.clone()
    };
    let low_out = train::train(&low, hooks, &low_run)?;
    let switch_epoch = low_out.metrics.len();

    let started = Instant::now();
    let loaded = checkpoint::read(&low_out.model_path)?;
    let tensors =
        rescale_tensors(&twin, &full, &loaded.tensors, rc.interp).map_err(anyhow::Error::msg)?;
    let device = options.device.clone();
    let network = Network::new(&full, &device).map_err(anyhow::Error::msg)?;
    let network = checkpoint::load_tensors(network, tensors)
        .map_err(|e| anyhow::anyhow!("internal error: rescaled tensors do not fit: {e}"))?;
    let rescaled_path = run_dir.join("rescaled.safetensors");
    // The rescaled model takes full-resolution images: its preprocessing is the full run's
    // (same padding and normalisation, the run's own resolution instead of the twin's).
    let mut preprocess = loaded.meta.preprocess.clone();
    preprocess.resize = config.resize;
    let meta = ModelMeta {
        preprocess,
        info: serde_json::json!({ "rescaled_from": low_out.model_path, "scale": rc.scale }),
        ..loaded.meta
    }
    .with_data_dir(&config.data_dir);
    checkpoint::save(&rescaled_path, &network, &meta)?;
    let carried = match rc.optimizer {
        OptimizerState::Reset => None,
        OptimizerState::Carry => {
            let state = train::latest_checkpoint(&low_run.run_dir)
                .context("the low-resolution run left no checkpoint")?
                .join("optimizer.bpk");
            let carried = run_dir.join("rescaled-optimizer.bpk");
            let t = &loaded.tensors;
            super::rescale_optimizer_state(&twin, &full, t, &state, &carried, rc.interp)
                .map_err(anyhow::Error::msg)?;
            Some(carried)
        }
    };
    let rescale_seconds = started.elapsed().as_secs_f64();

    let mut high = config.clone();
    high.init_optimizer = carried;
    high.arch = Some(full);
    high.epochs = config.epochs - switch_epoch;
    high.init_from = Some(rescaled_path);
    high.schedule_span = Some(ScheduleSpan {
        offset: switch_epoch,
        total: config.epochs,
    });
    if options.verbose {
        eprintln!(
            "phase 2: kernels rescaled after epoch {switch_epoch} ({:.2} s), {} full-resolution epochs",
            rescale_seconds, high.epochs
        );
    }
    let high_run = TrainOptions {
        run_dir: run_dir.join("full-res"),
        ..options.clone()
    };
    let high_out = train::train(&high, vec![], &high_run)?;

    let low_seconds = low_out
        .metrics
        .last()
        .map_or(0.0, |m| m.cumulative_train_seconds);
    let mut timeline: Vec<TimelinePoint> = low_out
        .metrics
        .iter()
        .map(|m| TimelinePoint {
            phase: "low".into(),
            epoch: m.epoch,
            seconds: m.cumulative_train_seconds,
            test_acc: m.test_acc,
        })
        .collect();
    timeline.extend(high_out.metrics.iter().map(|m| TimelinePoint {
        phase: "full".into(),
        epoch: switch_epoch + m.epoch,
        seconds: low_seconds + rescale_seconds + m.cumulative_train_seconds,
        test_acc: m.test_acc,
    }));
    let outcome = RescaledOutcome {
        switch_epoch,
        rescale_seconds,
        timeline,
        model_path: high_out.model_path,
    };
    crate::atomic_file::write_atomic(
        &run_dir.join("rescale.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "config": config,
            "rescale": rc,
            "outcome": outcome,
        }))?
        .as_bytes(),
    )
    .with_context(|| format!("cannot write {}", run_dir.display()))?;
    Ok(outcome)
}
