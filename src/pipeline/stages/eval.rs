//! The `eval` stage: test accuracy and loss of the model so far, decoded from its file, on its
//! dataset's test split (a quantized model on the int8 kernels). The model passes through
//! unchanged.

use crate::checkpoint;
use crate::pipeline::measure::test_set;
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage, required};
use crate::runtime::model::SparseModel;
use crate::train;
use serde::{Deserialize, Serialize};

/// `convpress eval`'s flags and the `eval` stage's keys.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct EvalParams {
    /// Evaluate only the first N test images.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
}

impl Default for EvalParams {
    fn default() -> Self {
        table::clap_defaults()
    }
}

pub struct Eval {
    pub params: EvalParams,
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    t.no_layers()?;
    Ok(Box::new(Eval {
        params: t.params()?,
    }))
}

impl Eval {
    /// Refuses settings that cannot evaluate.
    pub fn check(&self) -> Result<(), String> {
        if self.params.batch_size == 0 {
            return Err("--batch-size must be at least 1".into());
        }
        if self.params.limit == Some(0) {
            return Err("--limit must be at least 1".into());
        }
        Ok(())
    }
}

impl Stage for Eval {
    fn kind(&self) -> &'static str {
        "eval"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.params).expect("settings serialise")
    }

    fn plan(&self, before: &Plan, _cx: &Context) -> Result<Plan, String> {
        before.arch()?;
        self.check()?;
        Ok(before.clone())
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let model = required(input, self.kind())?;
        self.check().map_err(anyhow::Error::msg)?;
        let test = test_set(&model, &cx.data_dir_for(model.meta()), self.params.limit)?;
        // A quantized model runs on the int8 kernels, as it would be served.
        let (loss, acc) = if model.loaded.quant.is_some() {
            let runtime = SparseModel::from_loaded(&model.loaded).map_err(anyhow::Error::msg)?;
            crate::runtime::model::evaluate(&runtime, &test, self.params.batch_size)
        } else {
            let (network, _) = checkpoint::load(&model.file, &cx.device)?;
            train::evaluate(&network, &test, self.params.batch_size, &cx.device)
        };
        let details = serde_json::json!({
            "test_acc": acc,
            "test_loss": loss,
            "test_images": test.n,
        });
        Ok(Outcome {
            model,
            details,
            curve: vec![],
        })
    }
}

/// The line `convpress eval` prints.
pub fn summary(out: &Outcome) -> String {
    let d = &out.details;
    let acc = d["test_acc"].as_f64().unwrap_or(f64::NAN);
    format!(
        "{}: {} on {} test split ({} images): accuracy {:.2}% (error {:.2}%), loss {:.4}",
        out.model.file.display(),
        out.model.arch().name,
        out.model.meta().dataset.name(),
        d["test_images"],
        100.0 * acc,
        100.0 * (1.0 - acc),
        d["test_loss"].as_f64().unwrap_or(f64::NAN)
    )
}
