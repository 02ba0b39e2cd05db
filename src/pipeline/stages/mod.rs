//! One module per stage. Each holds its settings (the flags of its command and the keys of
//! its recipe table: one struct for both), its `plan` checks, and its `run`, which calls the
//! method in `compress` or `rescale`.

pub mod binarize;
pub mod circulant;
pub mod compact;
pub mod decompose;
pub mod distill;
pub mod encode;
pub mod eval;
pub mod finetune;
pub mod prune;
pub mod prune_filters;
pub mod qat;
pub mod quantize;
pub mod rewrite;
pub mod share;
pub mod train;

use super::{Constraints, Context, Model};
use crate::models::ModelKind;
use crate::train::{OptimizerConfig, TrainConfig, TrainHook, TrainOutcome};
use clap::ValueEnum;

/// The settings to continue training `model` from its weights: its architecture, dataset
/// folder (the one it was trained on unless the command line says otherwise) and
/// preprocessing, for `epochs` at rate `lr`.
pub fn retrain_config(
    model: &Model,
    epochs: usize,
    lr: f64,
    seed: u64,
    cx: &Context,
) -> anyhow::Result<TrainConfig> {
    let loaded = &model.loaded;
    let kind = <ModelKind as ValueEnum>::from_str(&loaded.arch.name, true).map_err(|_| {
        anyhow::anyhow!(
            "{}: model {:?} is not one convpress can retrain",
            model.file.display(),
            loaded.arch.name
        )
    })?;
    let mut config = TrainConfig::defaults(kind, loaded.meta.dataset);
    config.data_dir = cx.data_dir_for(&loaded.meta);
    config.epochs = epochs;
    config.seed = seed;
    config.pad = Some(loaded.meta.preprocess.pad);
    config.resize = loaded.meta.preprocess.resize;
    config.init_from = Some(model.file.clone());
    config.arch = Some(loaded.arch.clone());
    if let OptimizerConfig::Sgd { lr: l, .. } = &mut config.optimizer {
        *l = lr;
    }
    Ok(config)
}

/// What [`retrain_config`] and the trainer would refuse, checked at plan time (before any run
/// folder is touched): a model convpress cannot rebuild for training, no epochs, a learning
/// rate that is not a positive number, a data limit of 0. Errors name the recipe keys (the
/// command's flags are the same words with `--`).
pub fn check_retrain(
    arch: &crate::models::Arch,
    epochs: usize,
    lr: f64,
    limits: [Option<usize>; 2],
) -> Result<(), String> {
    if <ModelKind as ValueEnum>::from_str(&arch.name, true).is_err() {
        return Err(format!(
            "model {:?} is not one convpress can retrain",
            arch.name
        ));
    }
    if epochs == 0 {
        return Err("epochs must be at least 1".into());
    }
    if !(lr.is_finite() && lr > 0.0) {
        return Err(format!("lr must be a positive number, got {lr}"));
    }
    if limits.contains(&Some(0)) {
        return Err("train-limit and test-limit must be at least 1".into());
    }
    Ok(())
}

/// Trains `config` in `cx.dir` keeping `keep` (masks, then codebooks) with `hooks` after
/// them; returns the run and the constraints as they stand after it (trained centroids).
pub fn train_keeping(
    config: &TrainConfig,
    keep: &Constraints,
    hooks: Vec<Box<dyn TrainHook>>,
    cx: &Context,
) -> anyhow::Result<(TrainOutcome, Constraints)> {
    let enforcer = keep.enforcer();
    let mut all = enforcer.hooks();
    all.extend(hooks);
    let outcome = crate::train::train(config, all, &cx.train_options(&cx.dir, false))?;
    Ok((outcome, enforcer.finish()))
}

/// A trained model file reopened with `constraints` saved beside it.
pub fn reopen(file: &std::path::Path, constraints: &Constraints) -> anyhow::Result<Model> {
    constraints.save(file).map_err(anyhow::Error::msg)?;
    Model::open(file)
}
