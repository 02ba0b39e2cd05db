//! Everything that defines a training run. Saved as `config.json` in the run folder, so
//! `--resume` continues exactly the run that was started.

use super::Schedule;
use crate::data::{Augment, DatasetKind};
use crate::models::{Arch, ModelKind};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// SGD with (heavy-ball) momentum and L2 weight decay.
    Sgd {
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    },
    /// Adam (Kingma & Ba 2015) with L2 weight decay.
    Adam { lr: f64, weight_decay: f64 },
}

impl OptimizerConfig {
    pub fn lr(&self) -> f64 {
        match *self {
            OptimizerConfig::Sgd { lr, .. } | OptimizerConfig::Adam { lr, .. } => lr,
        }
    }

    /// The same optimizer without weight decay (for parameters that must not shrink, such as
    /// learned quantizer steps).
    pub fn without_weight_decay(&self) -> OptimizerConfig {
        let mut o = self.clone();
        match &mut o {
            OptimizerConfig::Sgd { weight_decay, .. }
            | OptimizerConfig::Adam { weight_decay, .. } => *weight_decay = 0.0,
        }
        o
    }

    pub fn build(&self) -> burn::optim::ModuleOptimizer {
        use burn::optim::decay::WeightDecayConfig;
        use burn::optim::momentum::MomentumConfig;
        use burn::optim::{AdamConfig, SgdConfig};
        match *self {
            OptimizerConfig::Sgd {
                momentum,
                weight_decay,
                ..
            } => SgdConfig::new()
                .with_momentum((momentum > 0.0).then(|| {
                    MomentumConfig::new()
                        .with_momentum(momentum)
                        .with_dampening(0.0)
                }))
                .with_weight_decay(
                    (weight_decay > 0.0).then(|| WeightDecayConfig::new(weight_decay as f32)),
                )
                .init(),
            OptimizerConfig::Adam { weight_decay, .. } => AdamConfig::new()
                .with_weight_decay(
                    (weight_decay > 0.0).then(|| WeightDecayConfig::new(weight_decay as f32)),
                )
                .init(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: ModelKind,
    pub dataset: DatasetKind,
    pub data_dir: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
    pub seed: u64,
    /// Zero padding around each image (None: the model's default, 2 for 32x32 nets on MNIST).
    pub pad: Option<usize>,
    /// Train at this resolution `[H, W]` instead of the data's own (images are resampled).
    pub resize: Option<[usize; 2]>,
    pub augment: Augment,
    /// Use only the first N training / test images (quick runs and tests).
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// Start from this checkpoint's weights instead of a fresh initialisation (fine-tuning,
    /// retraining after pruning). Its architecture must be the one `model` builds.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Start the optimizer from this saved state (`optimizer.bpk`, keyed by parameter id)
    /// instead of a fresh one: a rescaled run's full-resolution phase carrying the
    /// low-resolution phase's momentum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_optimizer: Option<PathBuf>,
    /// Train this architecture instead of the one `model` builds: a model whose structure a
    /// compression pass changed (filter pruning). Its input and classes must fit the data.
    #[serde(default)]
    pub arch: Option<Arch>,
    /// This run is one phase of a longer schedule (kernel rescaling trains at low resolution,
    /// then at full): the learning rate follows the schedule over `total` epochs from epoch
    /// `offset`. None: the schedule spans this run's own epochs.
    #[serde(default)]
    pub schedule_span: Option<ScheduleSpan>,
    /// After the last epoch, this many training batches run forward once more, through the
    /// hooks' forward models and with no update, so that the batch norms' running statistics
    /// are those of the final weights rather than an average over weights that moved during
    /// the epoch (NNCF's "batch-norm adaptation"). XNOR-Net needs it: its layers take the
    /// signs of batch-normalized inputs, and a stale mean flips them. 0: none.
    #[serde(default)]
    pub batch_norm_refresh: usize,
    /// Build `model` with every hidden layer this many times as wide (`models::width`): thin
    /// students for distillation. None: the model as the zoo defines it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<f64>,
}

/// Which part of a longer learning-rate schedule a run covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpan {
    pub offset: usize,
    pub total: usize,
}

impl TrainConfig {
    /// The defaults of `convpress train` for a model: the recipe that reaches the README's
    /// accuracy on MNIST.
    pub fn defaults(model: ModelKind, dataset: DatasetKind) -> Self {
        let (epochs, optimizer) = match model {
            // Caffe's LeNet recipe rate (no batch norm: 0.05 diverges); the perceptron needs
            // more, cheaper epochs.
            ModelKind::Lenet5 => (
                6,
                OptimizerConfig::Sgd {
                    lr: 0.01,
                    momentum: 0.9,
                    weight_decay: 5e-4,
                },
            ),
            ModelKind::Lenet300 => (
                20,
                OptimizerConfig::Sgd {
                    lr: 0.05,
                    momentum: 0.9,
                    weight_decay: 5e-4,
                },
            ),
            ModelKind::VggSmall | ModelKind::Resnet20 => (
                10,
                OptimizerConfig::Sgd {
                    lr: 0.1,
                    momentum: 0.9,
                    weight_decay: 5e-4,
                },
            ),
        };
        TrainConfig {
            model,
            dataset,
            data_dir: dataset.default_dir(),
            epochs,
            batch_size: 64,
            optimizer,
            schedule: Schedule::Cosine { min_lr: 0.0 },
            seed: 1,
            pad: None,
            resize: None,
            augment: Augment::default(),
            train_limit: None,
            test_limit: None,
            init_from: None,
            init_optimizer: None,
            arch: None,
            schedule_span: None,
            batch_norm_refresh: 0,
            width: None,
        }
    }

    /// Refuses settings that cannot train, before any work is done.
    /// The architecture this run trains for data of `input` shape and `classes` classes: the
    /// given one (checked against the data) or the one `model` builds.
    pub fn arch_for(&self, input: [usize; 3], classes: usize) -> Result<Arch, String> {
        match &self.arch {
            Some(arch) if arch.input != input || arch.classes != classes => Err(format!(
                "the model takes {:?} images in {} classes; the data gives {input:?} in {classes}",
                arch.input, arch.classes
            )),
            Some(arch) => Ok(arch.clone()),
            None => {
                let arch = self.model.arch(input, classes)?;
                match self.width {
                    Some(w) if w != 1.0 => crate::models::width::scale(&arch, w),
                    _ => Ok(arch),
                }
            }
        }
    }

    /// Learning rate at `batch` of `batches` in (0-based) `epoch` of this run.
    pub fn lr_at(&self, epoch: usize, batch: usize, batches: usize) -> f64 {
        let (offset, total) = self
            .schedule_span
            .map_or((0, self.epochs), |s| (s.offset, s.total));
        self.schedule
            .lr(self.optimizer.lr(), offset + epoch, batch, batches, total)
    }

    pub fn check(&self) -> Result<(), String> {
        if self.epochs == 0 {
            return Err("--epochs must be at least 1".into());
        }
        if self.batch_size == 0 {
            return Err("--batch-size must be at least 1".into());
        }
        let lr = self.optimizer.lr();
        if !(lr.is_finite() && lr > 0.0) {
            return Err(format!("--lr must be a positive number, got {lr}"));
        }
        let (momentum, wd) = match self.optimizer {
            OptimizerConfig::Sgd {
                momentum,
                weight_decay,
                ..
            } => (momentum, weight_decay),
            OptimizerConfig::Adam { weight_decay, .. } => (0.0, weight_decay),
        };
        if !(0.0..1.0).contains(&momentum) {
            return Err(format!("--momentum must be in [0, 1), got {momentum}"));
        }
        if !(wd.is_finite() && wd >= 0.0) {
            return Err(format!("--weight-decay must be non-negative, got {wd}"));
        }
        if let Some([h, w]) = self.resize
            && (h == 0 || w == 0)
        {
            return Err("--resize must be positive".into());
        }
        if let Some(span) = self.schedule_span
            && span.offset + self.epochs > span.total
        {
            return Err(format!(
                "schedule span: epochs {}..{} run past its {} epochs",
                span.offset,
                span.offset + self.epochs,
                span.total
            ));
        }
        if self.train_limit == Some(0) || self.test_limit == Some(0) {
            return Err("--train-limit and --test-limit must be at least 1".into());
        }
        if let Schedule::Step { gamma, .. } = self.schedule
            && !(gamma.is_finite() && gamma > 0.0)
        {
            return Err(format!("step schedule gamma must be positive, got {gamma}"));
        }
        Ok(())
    }
}
