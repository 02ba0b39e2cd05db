//! The `rewrite` stage: chosen convolutions become compact or transferred filters
//! (`compress::compact`: separable, fire, CReLU, rotated or mirrored filters), each reported
//! with its parameters, FLOPs and measured latency before and after. Fine-tuning is a
//! `finetune` (or `distill`) stage after it; `convpress rewrite --to FORM` runs both.

use crate::checkpoint;
use crate::compress::compact::{self, Form, Init, LayerReport, Options};
use crate::models::{Arch, Network};
use crate::pipeline::layers::{LayerRules, NoSettings};
use crate::pipeline::stages::rewrite::{
    LayerLatency, Layers, RewriteArgs, RewriteCommand, layer_latency, save_outcome,
};
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage, required};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `convpress rewrite`'s flags and the `rewrite` stage's keys; `[stage.layers]` (recipes) or
/// `--layers` (the command) name the layers, by default every layer the form suits
/// (`compact::default_layers`).
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CompactParams {
    /// The compact form.
    #[arg(long, value_enum)]
    pub to: Form,
    /// keep (untouched layers keep their weights, new ones start from the old where they
    /// can) or scratch (every weight fresh).
    #[arg(long, value_enum, default_value = "keep")]
    #[serde(default)]
    pub init: Init,
    /// Fire: squeeze channels as a fraction of the layer's outputs.
    #[arg(long, default_value_t = 0.25)]
    #[serde(default = "quarter")]
    pub squeeze: f64,
    /// Fire: the fraction of the expand channels that are kxk (the rest are 1x1).
    #[arg(long, default_value_t = 0.5)]
    #[serde(default = "half")]
    pub expand_kxk: f64,
    /// After the rewrite, every hidden layer this many times as wide (MobileNet's width
    /// multiplier); needs init scratch.
    #[arg(long)]
    #[serde(default)]
    pub width: Option<f64>,
    /// Seed of the fresh weights.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub init_seed: u64,
    /// Seconds spent timing each layer before and after, per batch size (1 and 64).
    #[arg(long, default_value_t = 1.0)]
    #[serde(default = "crate::pipeline::stages::rewrite::one_second")]
    pub layer_seconds: f64,
}

fn quarter() -> f64 {
    0.25
}
fn half() -> f64 {
    0.5
}

pub struct Rewrite {
    pub params: CompactParams,
    /// The layers to rewrite; empty: [`compact::default_layers`].
    pub layers: LayerRules<NoSettings>,
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    Ok(Box::new(Rewrite {
        params: t.params()?,
        layers: t.layers()?,
    }))
}

impl Rewrite {
    fn options(&self) -> Options {
        Options {
            form: self.params.to,
            squeeze: self.params.squeeze,
            expand_kxk: self.params.expand_kxk,
        }
    }

    /// The layers to rewrite, checked: every one named must take the form.
    pub fn chosen(&self, arch: &Arch) -> Result<Vec<String>, String> {
        let form = self.params.to;
        self.layers.chosen(
            arch,
            || compact::default_layers(arch, form),
            || {
                format!(
                    "{} has no layer that {} suits by default; name layers with --layers (or [stage.layers]) to be told why each cannot take it",
                    arch.name,
                    form.name()
                )
            },
            |p| compact::check(arch, p, form),
        )
    }

    /// The architecture after the rewrite (and the width multiplier).
    fn new_arch(&self, arch: &Arch, r: &compact::Rewritten) -> Result<Arch, String> {
        match self.params.width {
            Some(w) if w != 1.0 => crate::models::width::scale(&r.arch, w),
            _ => Ok(r.arch.clone()),
        }
        .map_err(|e| format!("{}: {e}", arch.name))
    }
}

/// One rewritten layer in the stage's details.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerEntry {
    #[serde(flatten)]
    pub report: LayerReport,
    /// Measured when no width multiplier changed the layers around it.
    #[serde(flatten)]
    pub latency: Option<LayerLatency>,
}

impl Stage for Rewrite {
    fn kind(&self) -> &'static str {
        "rewrite"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "params": self.params, "layers": self.layers })
    }

    fn plan(&self, before: &Plan, _cx: &Context) -> Result<Plan, String> {
        before.not_encoded()?;
        before.before_masks("layers are rewritten", "the old shapes", "rewrite")?;
        crate::resources::check_seconds("layer-seconds", self.params.layer_seconds)?;
        if self.params.width.is_some_and(|w| w != 1.0) && self.params.init != Init::Scratch {
            return Err(
                "a width multiplier changes every layer's shape, so no trained weight fits: set init = scratch (--init scratch)"
                    .into(),
            );
        }
        let arch = before.arch()?;
        let paths = self.chosen(arch)?;
        let r = compact::rewrite(arch, None, &paths, self.options())?;
        Ok(Plan {
            arch: Some(self.new_arch(arch, &r)?),
            ..before.clone()
        })
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let input = required(input, self.kind())?;
        let arch = input.arch();
        let at = |e: String| anyhow::anyhow!("{}: {e}", input.file.display());
        let paths = self.chosen(arch).map_err(at)?;
        let kept = (self.params.init == Init::Keep).then_some(&input.loaded.tensors);
        let r = compact::rewrite(arch, kept, &paths, self.options()).map_err(at)?;
        let new_arch = self.new_arch(arch, &r).map_err(at)?;
        // Fresh weights for every new layer (and every layer, from scratch), then the ones
        // that carry over.
        let fresh = Network::seeded(&new_arch, &cx.device, self.params.init_seed)
            .map_err(anyhow::Error::msg)?;
        let mut tensors = checkpoint::tensor_map(&fresh);
        for (k, v) in &r.tensors {
            tensors.insert(k.clone(), v.clone());
        }
        let budget = Duration::from_secs_f64(self.params.layer_seconds);
        let same_width = new_arch == r.arch;
        let (old_specs, new_specs) = (arch.layer_specs(), new_arch.layer_specs());
        let mut entries = Vec::new();
        for report in &r.layers {
            let latency = if same_width {
                let side =
                    |specs: &std::collections::BTreeMap<String, &crate::models::LayerSpec>,
                     paths: &[String]| {
                        paths.iter().map(|p| specs[p].clone()).collect::<Vec<_>>()
                    };
                Some(layer_latency(
                    report.input,
                    Layers {
                        specs: side(&old_specs, &report.old_paths),
                        paths: &report.old_paths,
                        tensors: &input.loaded.tensors,
                    },
                    Layers {
                        specs: side(&new_specs, &report.new_paths),
                        paths: &report.new_paths,
                        tensors: &tensors,
                    },
                    budget,
                    cx,
                )?)
            } else {
                None
            };
            entries.push(LayerEntry {
                report: report.clone(),
                latency,
            });
        }
        let form = self.params.to.name();
        let info = serde_json::json!({
            "rewritten_from": input.file,
            "form": form,
            "init": self.params.init,
            "layers": paths,
        });
        let details = serde_json::json!({
            "form": form,
            "layers": entries,
            "params": [arch.num_params(), new_arch.num_params()],
            "flops": [arch.flops(), new_arch.flops()],
        });
        save_outcome(
            &input,
            info,
            "rewritten.safetensors",
            &new_arch,
            tensors,
            details,
            cx,
        )
    }
}

/// The per-layer table of a `rewrite` stage's details.
pub fn print_layers(details: &serde_json::Value) {
    let entries: Vec<LayerEntry> =
        serde_json::from_value(details["layers"].clone()).unwrap_or_default();
    println!(
        "{:<18} {:>17} {:>21} {:>16} {:>16} {:>8}",
        "layer", "params", "FLOPs", "b1 ms", "b64 ms", "b64 x"
    );
    for e in &entries {
        let r = &e.report;
        let (b1, b64, x) = match &e.latency {
            Some(l) => (
                format!("{:.3} -> {:.3}", l.b1_ms[0], l.b1_ms[1]),
                format!("{:.3} -> {:.3}", l.b64_ms[0], l.b64_ms[1]),
                format!("{:.2}x", l.b64_ms[0] / l.b64_ms[1]),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<18} {:>17} {:>21} {:>16} {:>16} {:>8}",
            r.path,
            format!("{} -> {}", r.params[0], r.params[1]),
            format!("{} -> {}", r.flops[0], r.flops[1]),
            b1,
            b64,
            x
        );
    }
}

/// `convpress rewrite`: the stage, then `finetune` in the same folder (`run_dir`, by default
/// `runs/<model>-<form>`), with the per-layer table and the whole model's accuracy and latency
/// before and after; writes `report.json` and returns it.
pub fn command(
    stage: &Rewrite,
    args: &RewriteArgs,
    cx: Context,
) -> anyhow::Result<serde_json::Value> {
    let form = stage.params.to.name();
    RewriteCommand {
        stage,
        names: ["before", "after"],
        args,
    }
    .run(
        cx,
        |input| format!("{}-{form}", input.arch().name),
        |_| Ok(()),
        |out| {
            print_layers(&out.details);
            serde_json::json!({ "form": form, "layers": out.details["layers"] })
        },
    )
}
