//! The `finetune` stage: more training of the model as it is, keeping everything earlier
//! stages fixed: pruned weights stay zero, shared weights keep their codebook (only the
//! centroids train: Deep Compression, section 3.3).

use crate::pipeline::stages::{reopen, retrain_config, train_keeping};
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage, required};
use serde::{Deserialize, Serialize};

/// `--epochs`, `--lr`, ... of the commands that fine-tune, and the `finetune` stage's keys.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct FinetuneParams {
    /// Fine-tuning epochs (0: none).
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Fine-tune on the first N training images only.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub test_limit: Option<usize>,
}

impl Default for FinetuneParams {
    fn default() -> Self {
        table::clap_defaults()
    }
}

pub struct Finetune {
    pub params: FinetuneParams,
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    t.no_layers()?;
    Ok(Box::new(Finetune {
        params: t.params()?,
    }))
}

impl Stage for Finetune {
    fn kind(&self) -> &'static str {
        "finetune"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.params).expect("settings serialise")
    }

    fn plan(&self, before: &Plan, _cx: &Context) -> Result<Plan, String> {
        before.arch()?;
        before.not_encoded()?;
        if self.params.epochs == 0 {
            return Err("epochs must be at least 1 (leave the stage out instead)".into());
        }
        let p = &self.params;
        super::check_retrain(
            before.arch()?,
            p.epochs,
            p.lr,
            [p.train_limit, p.test_limit],
        )?;
        Ok(before.clone())
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let input = required(input, self.kind())?;
        let p = &self.params;
        let mut config = retrain_config(&input, p.epochs, p.lr, p.seed, cx)?;
        config.train_limit = p.train_limit;
        config.test_limit = p.test_limit;
        let (outcome, kept) = train_keeping(&config, &input.constraints, vec![], cx)?;
        Ok(Outcome {
            model: reopen(&outcome.model_path, &kept)?,
            details: serde_json::json!({ "epochs": p.epochs }),
            curve: outcome.metrics,
        })
    }
}
