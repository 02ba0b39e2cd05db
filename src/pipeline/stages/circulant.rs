//! The `circulant` stage: chosen dense layers become circulant projections
//! (`compress::circulant`, Cheng et al. 2015), each reported with its parameters, FLOPs,
//! weight error and measured latency before and after. Fine-tuning is a `finetune` stage
//! after it; `convpress circulant` runs both.

use crate::bench;
use crate::checkpoint::Tensors;
use crate::compress::circulant::{self, Init, LayerReport};
use crate::models::{Arch, LayerSpec};
use crate::pipeline::layers::LayerRules;
use crate::pipeline::stages::finetune::FinetuneParams;
use crate::pipeline::stages::rewrite::{RewriteCommand, save_outcome};
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage, State, required};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
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
    #[serde(default = "one_second")]
    pub layer_seconds: f64,
}

fn one_second() -> f64 {
    1.0
}

/// A `[stage.layers]` entry takes no settings: `"layers.1" = {}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

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
        let paths = if self.layers.0.is_empty() {
            let paths = circulant::default_layers(arch);
            if paths.is_empty() {
                return Err(format!(
                    "{} has no dense layer before its last one to make circulant; name layers with --layers",
                    arch.name
                ));
            }
            paths
        } else {
            let all: Vec<String> = specs.keys().cloned().collect();
            self.layers.resolve(&all)?.into_keys().collect()
        };
        for p in &paths {
            circulant::check(specs[p]).map_err(|e| format!("{p} {e}"))?;
        }
        Ok(paths)
    }
}

/// One replaced layer in the stage's details.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerEntry {
    #[serde(flatten)]
    pub report: LayerReport,
    /// Milliseconds before and after.
    pub b1_ms: [f64; 2],
    pub b64_ms: [f64; 2],
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
        if before.state.contains(&State::Masks) || before.state.contains(&State::Codebooks) {
            return Err(
                "dense layers become circulant before weights are pruned or shared (masks and codebooks have the dense shapes): move circulant before prune and share".into(),
            );
        }
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
        for report in &r.layers {
            let [b1_ms, b64_ms] =
                layer_latency(arch, &input.loaded.tensors, &r, report, budget, cx)?;
            entries.push(LayerEntry {
                report: report.clone(),
                b1_ms,
                b64_ms,
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

/// One layer's latency, dense and circulant, on its own input, timed in turns at batch 1
/// and 64.
fn layer_latency(
    arch: &Arch,
    tensors: &Tensors,
    r: &circulant::Replaced,
    report: &LayerReport,
    budget: Duration,
    cx: &Context,
) -> anyhow::Result<[[f64; 2]; 2]> {
    let input = crate::models::Shape::Flat(report.in_features);
    let probe = |spec: &LayerSpec, from: &Tensors| {
        let mut t = Tensors::new();
        for field in ["weight", "bias"] {
            if let Some(v) = from.get(&format!("{}.{field}", report.path)) {
                t.insert(format!("layers.0.{field}"), v.clone());
            }
        }
        bench::layer_probe(std::slice::from_ref(spec), &t, input, &cx.device)
            .map_err(anyhow::Error::msg)
    };
    let before = probe(arch.layer_specs()[&report.path], tensors)?;
    let after = probe(r.arch.layer_specs()[&report.path], &r.tensors)?;
    let b1 = bench::interleaved_latency(&[&before, &after], 1, budget, &cx.device);
    let b64 = bench::interleaved_latency(&[&before, &after], 64, budget, &cx.device);
    Ok([[b1[0], b1[1]], [b64[0], b64[1]]])
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
            format!("{:.3} -> {:.3}", e.b1_ms[0], e.b1_ms[1]),
            format!("{:.3} -> {:.3}", e.b64_ms[0], e.b64_ms[1]),
            e.b64_ms[0] / e.b64_ms[1],
        );
    }
}

/// `convpress circulant`: the stage, then `finetune` in the same folder (`run_dir`, by default
/// `runs/<model>-circulant-<init>`), with the per-layer table and the whole model's accuracy
/// and latency before and after; writes `report.json` and returns it.
pub fn command(
    stage: &Circulant,
    finetune: &FinetuneParams,
    checkpoint_path: &Path,
    latency_seconds: f64,
    run_dir: Option<PathBuf>,
    force: bool,
    cx: Context,
) -> anyhow::Result<serde_json::Value> {
    let init = clap::ValueEnum::to_possible_value(&stage.params.init).expect("a named value");
    RewriteCommand {
        stage,
        names: ["dense", "circulant"],
        finetune,
        checkpoint: checkpoint_path,
        latency_seconds,
        run_dir,
        force,
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
