//! The `prune-filters` stage: structured pruning (`compress::structured`). Whole filters are
//! removed from every prunable channel group (residual additions tie groups together), so the
//! result is a smaller dense model with a new architecture. Fine-tuning is a `finetune` stage
//! after it; `convpress prune-filters` runs both.

use crate::compress::structured::{self, Analysis, Criterion, Target};
use crate::pipeline::stages::rewrite::{RewriteArgs, RewriteCommand, save_outcome};
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage, required};
use serde::{Deserialize, Serialize};

/// `convpress prune-filters`'s pruning flags, and the `prune-filters` stage's keys.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FilterParams {
    /// Fraction of the channels removed from every prunable channel group, in [0, 1).
    #[arg(long, allow_negative_numbers = true)]
    pub ratio: f64,
    /// How filters are ranked.
    #[arg(long, value_enum, default_value = "l1")]
    #[serde(default)]
    pub criterion: Criterion,
    /// Keep channel groups tied together by residual additions whole.
    #[arg(long)]
    #[serde(default)]
    pub skip_coupled: bool,
}

pub struct PruneFilters {
    pub params: FilterParams,
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    t.no_layers()?;
    Ok(Box::new(PruneFilters {
        params: t.params()?,
    }))
}

impl PruneFilters {
    fn target(&self) -> Result<Target, String> {
        let r = self.params.ratio;
        if !(r.is_finite() && (0.0..1.0).contains(&r)) {
            return Err(format!("--ratio must be in [0, 1), got {r}"));
        }
        Ok(Target {
            ratio: r,
            criterion: self.params.criterion,
            skip_coupled: self.params.skip_coupled,
        })
    }
}

impl Stage for PruneFilters {
    fn kind(&self) -> &'static str {
        "prune-filters"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.params).expect("settings serialise")
    }

    fn plan(&self, before: &Plan, _cx: &Context) -> Result<Plan, String> {
        before.not_encoded()?;
        before.before_masks("filters are removed", "the old shapes", "prune-filters")?;
        self.target()?;
        Analysis::new(before.arch()?)?;
        Ok(before.clone())
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let input = required(input, self.kind())?;
        let target = self.target().map_err(anyhow::Error::msg)?;
        let pruned = structured::prune(input.arch(), &input.loaded.tensors, &target)
            .map_err(|e| anyhow::anyhow!("{}: {e}", input.file.display()))?;
        let info = serde_json::json!({
            "pruned_from": input.file,
            "ratio": target.ratio,
            "criterion": target.criterion,
            "skip_coupled": target.skip_coupled,
        });
        let (a, b) = (input.arch(), &pruned.arch);
        let details = serde_json::json!({
            "groups": pruned.groups,
            "params": [a.num_params(), b.num_params()],
            "flops": [a.flops(), b.flops()],
        });
        save_outcome(
            &input,
            info,
            "pruned.safetensors",
            &pruned.arch,
            pruned.tensors,
            details,
            cx,
        )
    }
}

/// `convpress prune-filters`: the stage, then `finetune` in the same folder (`run_dir`, by
/// default `runs/<model>-filters-<percent>-<criterion>`), with accuracy and latency of the
/// dense, pruned and fine-tuned models; prints its tables and writes `report.json`.
pub fn command(stage: &PruneFilters, args: &RewriteArgs, cx: Context) -> anyhow::Result<()> {
    let target = stage.target().map_err(anyhow::Error::msg)?;
    let command = RewriteCommand {
        stage,
        names: ["dense", "pruned"],
        args,
    };
    let default_name = |input: &Model| {
        let criterion =
            clap::ValueEnum::to_possible_value(&stage.params.criterion).expect("a named value");
        format!(
            "{}-filters-{}-{}",
            input.arch().name,
            (stage.params.ratio * 100.0).round(),
            criterion.get_name()
        )
    };
    let check =
        |input: &Model| structured::prune(input.arch(), &input.loaded.tensors, &target).map(|_| ());
    command.run(cx, default_name, check, |out| {
        println!("{:<6} {:>9} {:>7}  producers", "group", "channels", "kept");
        let groups: Vec<structured::ChannelGroup> =
            serde_json::from_value(out.details["groups"].clone()).unwrap_or_default();
        for (i, g) in groups.iter().enumerate() {
            if g.producers.is_empty() {
                continue;
            }
            let note = g
                .fixed
                .as_deref()
                .map_or(String::new(), |f| format!(" (fixed: {f})"));
            println!(
                "{:<6} {:>9} {:>7}  {}{}",
                i,
                g.channels,
                g.kept,
                g.producers.join(" + "),
                note
            );
        }
        serde_json::json!({
            "ratio": stage.params.ratio,
            "criterion": stage.params.criterion,
            "skip_coupled": stage.params.skip_coupled,
            "groups": out.details["groups"],
        })
    })?;
    Ok(())
}
