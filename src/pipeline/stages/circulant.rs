//! The `circulant` stage: chosen dense layers become circulant projections
//! (`compress::circulant`, Cheng et al. 2015), each reported with its parameters, FLOPs,
//! weight error and measured latency before and after. Fine-tuning is a `finetune` stage
//! after it; `convpress circulant` runs both.

use crate::compress::circulant::{self, Init, LayerReport};
use crate::models::{Arch, LayerSpec};
use crate::pipeline::layers::LayerRules;
use crate::pipeline::stages::rewrite::{
    LayerLatency, Layers, RewriteArgs, RewriteCommand, layer_latency, save_outcome,
};
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage, required};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `convpress circulant`'s flags and the `circulant` stage's keys; `[stage.layers]` (recipes)
/// or `--layers` (the command) name the layers, by default every dense layer but the last.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CirculantParams {
    /// How each circulant vector starts: project (the circulant matrix nearest the dense
    /// weight) or random (as a fresh layer).
    #[arg(long, value_enum, default_value = "project")]
    #[serde(default)]
    pub init: Init,
    /// Seed of the input signs (layer i takes seed + i) and of random starts.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub sign_seed: u64,
    /// Seconds spent timing each layer before and after, per batch size (1 and 64).
    #[arg(long, default_value_t = 1.0)]
    #[serde(default = "crate::pipeline::stages::rewrite::one_second")]
    pub layer_seconds: f64,
}

pub use crate::pipeline::layers::NoSettings;

pub struct Circulant {
    pub params: CirculantParams,
    /// The layers to replace; empty: [`circulant::default_layers`].
    pub layers: LayerRules<NoSettings>,
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    Ok(Box::new(Circulant {
        params: t.params()?,
        layers: t.layers()?,
    }))
}

impl Circulant {
    /// The layers to replace, checked: every one named must be dense.
    pub fn chosen(&self, arch: &Arch) -> Result<Vec<String>, String> {
        let specs = arch.layer_specs();
        self.layers.chosen(
            arch,
            || circulant::default_layers(arch),
            || {
                format!(
                    "{} has no dense layer before its last one to make circulant; name layers with --layers",
                    arch.name
                )
            },
            |p| circulant::check(specs[p]).map_err(|e| format!("{p} {e}")),
        )
    }
}

/// One replaced layer in the stage's details.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerEntry {
    #[serde(flatten)]
    pub report: LayerReport,
    #[serde(flatten)]
    pub latency: LayerLatency,
}

impl Stage for Circulant {
    fn kind(&self) -> &'static str {
        "circulant"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "params": self.params, "layers": self.layers })
    }

    fn plan(&self, before: &Plan, _cx: &Context) -> Result<Plan, String> {
        before.not_encoded()?;
        before.before_masks(
            "dense layers become circulant",
            "the dense shapes",
            "circulant",
        )?;
        crate::resources::check_seconds("layer-seconds", self.params.layer_seconds)?;
        let arch = before.arch()?;
        let paths = self.chosen(arch)?;
        Ok(Plan {
            arch: Some(circulant::rewrite_arch(
                arch,
                &paths,
                self.params.sign_seed,
            )?),
            ..before.clone()
        })
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let input = required(input, self.kind())?;
        let arch = input.arch();
        let at = |e: String| anyhow::anyhow!("{}: {e}", input.file.display());
        let paths = self.chosen(arch).map_err(at)?;
        let r = circulant::replace(
            arch,
            &input.loaded.tensors,
            &paths,
            self.params.init,
            self.params.sign_seed,
        )
        .map_err(at)?;
        let budget = Duration::from_secs_f64(self.params.layer_seconds);
        let mut entries = Vec::new();
        let (old_specs, new_specs) = (arch.layer_specs(), r.arch.layer_specs());
        for report in &r.layers {
            let path = std::slice::from_ref(&report.path);
            let side = |specs: &std::collections::BTreeMap<String, &LayerSpec>, tensors| Layers {
                specs: vec![specs[&report.path].clone()],
                paths: path,
                tensors,
            };
            let latency = layer_latency(
                crate::models::Shape::Flat(report.in_features),
                side(&old_specs, &input.loaded.tensors),
                side(&new_specs, &r.tensors),
                budget,
                cx,
            )?;
            entries.push(LayerEntry {
                report: report.clone(),
                latency,
            });
        }
        let info = serde_json::json!({
            "circulant_from": input.file,
            "init": self.params.init,
            "layers": paths,
        });
        let details = serde_json::json!({
            "init": self.params.init,
            "layers": entries,
            "params": [arch.num_params(), r.arch.num_params()],
            "flops": [arch.flops(), r.arch.flops()],
        });
        save_outcome(
            &input,
            info,
            "circulant.safetensors",
            &r.arch,
            r.tensors,
            details,
            cx,
        )
    }
}

/// The per-layer table of a `circulant` stage's details.
pub fn print_layers(details: &serde_json::Value) {
    let entries: Vec<LayerEntry> =
        serde_json::from_value(details["layers"].clone()).unwrap_or_default();
    println!(
        "{:<12} {:>11} {:>6} {:>17} {:>19} {:>8} {:>16} {:>16} {:>8}",
        "layer", "in x out", "d", "params", "FLOPs", "w error", "b1 ms", "b64 ms", "b64 x"
    );
    for e in &entries {
        let r = &e.report;
        println!(
            "{:<12} {:>11} {:>6} {:>17} {:>19} {:>7.1}% {:>16} {:>16} {:>7.2}x",
            r.path,
            format!("{}x{}", r.in_features, r.out_features),
            r.d,
            format!("{} -> {}", r.params[0], r.params[1]),
            format!("{} -> {}", r.flops[0], r.flops[1]),
            100.0 * r.relative_error,
            format!("{:.3} -> {:.3}", e.latency.b1_ms[0], e.latency.b1_ms[1]),
            format!("{:.3} -> {:.3}", e.latency.b64_ms[0], e.latency.b64_ms[1]),
            e.latency.b64_ms[0] / e.latency.b64_ms[1],
        );
    }
}

/// `convpress circulant`: the stage, then `finetune` in the same folder (`run_dir`, by default
/// `runs/<model>-circulant-<init>`), with the per-layer table and the whole model's accuracy
/// and latency before and after; writes `report.json` and returns it.
pub fn command(
    stage: &Circulant,
    args: &RewriteArgs,
    cx: Context,
) -> anyhow::Result<serde_json::Value> {
    let init = clap::ValueEnum::to_possible_value(&stage.params.init).expect("a named value");
    RewriteCommand {
        stage,
        names: ["dense", "circulant"],
        args,
    }
    .run(
        cx,
        |input| format!("{}-circulant-{}", input.arch().name, init.get_name()),
        |_| Ok(()),
        |out| {
            print_layers(&out.details);
            serde_json::json!({ "layers": out.details["layers"] })
        },
    )
}
