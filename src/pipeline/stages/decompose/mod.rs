//! The `decompose` stage: low-rank factorization (`compress::lowrank`) of a model's dense or
//! convolutional layers into sequences of smaller ones, a new architecture of ordinary layers.
//! Each factorized layer is reported with its rank, parameters, FLOPs, weight error and
//! measured latency before and after. Fine-tuning is a `finetune` stage after it;
//! `convpress decompose` runs both, and `convpress decompose-tradeoff` ([`tradeoff`]) runs
//! it for several methods and compressions.

pub mod tradeoff;

use crate::checkpoint::Tensors;
use crate::compress::lowrank::{self, LayerReport, LayerWeights, Method, RankRule};
use crate::models::Arch;
use crate::pipeline::layers::{LayerRules, weighted_layer_paths};
use crate::pipeline::stages::rewrite::{
    LayerLatency, Layers, RewriteArgs, RewriteCommand, layer_latency, save_outcome,
};
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage, required};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// `convpress decompose`'s flags and the `decompose` stage's keys. One rank rule (`rank`,
/// `energy`, `compression` or `vbmf`) is the default of every layer; `[stage.layers]`
/// (recipes) or `--layers` (the command) choose the layers, each pattern's table may give its
/// own rule.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DecomposeParams {
    /// The factorization: svd (dense layers), separable, cp or tucker2 (convolutions).
    #[arg(long, value_enum)]
    pub method: Method,
    #[command(flatten)]
    #[serde(flatten)]
    pub rule: RuleParams,
    /// Seconds spent timing each layer before and after, per batch size (1 and 64).
    #[arg(long, default_value_t = 1.0)]
    #[serde(default = "crate::pipeline::stages::rewrite::one_second")]
    pub layer_seconds: f64,
}

/// A rank rule as flags and recipe keys: exactly one of them (see [`RankRule`]).
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RuleParams {
    /// Explicit rank; tucker2 takes IN,OUT (one number sets both).
    #[arg(long, value_delimiter = ',')]
    #[serde(
        default,
        deserialize_with = "one_or_two",
        skip_serializing_if = "Option::is_none"
    )]
    pub rank: Option<Vec<usize>>,
    /// Smallest rank keeping this fraction of the squared singular values, in (0, 1].
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    /// Largest rank whose layers keep at most 1/this of the layer's parameters.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<f64>,
    /// Ranks by empirical variational Bayesian matrix factorization (Kim et al. 2016).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vbmf: bool,
}

/// `rank = 8` or `rank = [4, 8]`.
fn one_or_two<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<usize>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum R {
        One(usize),
        Many(Vec<usize>),
    }
    Ok(Some(match R::deserialize(d)? {
        R::One(r) => vec![r],
        R::Many(r) => r,
    }))
}

impl RuleParams {
    /// The rule given, `None` if none is; refuses two.
    pub fn rule(&self) -> Result<Option<RankRule>, String> {
        let mut given = Vec::new();
        if let Some(r) = &self.rank {
            given.push(RankRule::Rank(r.clone()));
        }
        if let Some(e) = self.energy {
            given.push(RankRule::Energy(e));
        }
        if let Some(c) = self.compression {
            given.push(RankRule::Compression(c));
        }
        if self.vbmf {
            given.push(RankRule::Vbmf);
        }
        match given.len() {
            0 => Ok(None),
            1 => {
                let r = given.pop().expect("one");
                r.check()?;
                Ok(Some(r))
            }
            _ => Err("give one of rank, energy, compression and vbmf, not several".into()),
        }
    }
}

/// A per-layer table: `"layers.3" = { rank = 8 }`, or `{}` for the stage's rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LayerRule {
    #[serde(
        default,
        deserialize_with = "one_or_two",
        skip_serializing_if = "Option::is_none"
    )]
    pub rank: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<f64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vbmf: bool,
}

impl LayerRule {
    fn rule(&self) -> Result<Option<RankRule>, String> {
        RuleParams {
            rank: self.rank.clone(),
            energy: self.energy,
            compression: self.compression,
            vbmf: self.vbmf,
        }
        .rule()
    }
}

pub struct Decompose {
    pub params: DecomposeParams,
    /// The layers to factorize; empty: every layer the method takes where it saves FLOPs.
    pub layers: LayerRules<LayerRule>,
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    Ok(Box::new(Decompose {
        params: t.params()?,
        layers: t.layers()?,
    }))
}

/// Layers the default choice leaves as they are, each with why.
pub type Left = BTreeMap<String, String>;

/// What the stage will do to each layer it looks at.
struct Selection {
    /// Layers to factorize, with their rules.
    chosen: BTreeMap<String, RankRule>,
    /// Whether `chosen` is the method's default choice (then layers whose rank would not
    /// lower their FLOPs are left alone) rather than layers named by the user.
    by_default: bool,
}

impl Decompose {
    fn method(&self) -> Method {
        self.params.method
    }

    fn selection(&self, arch: &Arch) -> Result<Selection, String> {
        let method = self.method();
        let default = self.params.rule.rule()?;
        let specs = arch.layer_specs();
        let need = |r: Option<RankRule>| {
            r.or_else(|| default.clone()).ok_or_else(|| {
                "give a rank rule: rank, energy, compression or vbmf (--rank, --energy, --compression, --vbmf)"
                    .to_string()
            })
        };
        let mut chosen = BTreeMap::new();
        let by_default = self.layers.0.is_empty();
        if by_default {
            for (path, ok) in lowrank::eligibility(arch, method) {
                if ok.is_ok() {
                    chosen.insert(path, need(None)?);
                }
            }
            if chosen.is_empty() {
                return Err(format!(
                    "{} has no layer that {} factorizes ({})",
                    arch.name,
                    method.name(),
                    match method {
                        Method::Svd => "dense layers",
                        Method::Tucker2 => "ungrouped convolutions with more than one channel",
                        Method::Separable => "ungrouped convolutions with a kernel of at least 2x2",
                        Method::Cp => "ungrouped convolutions with a kernel larger than 1x1",
                    }
                ));
            }
        } else {
            let mut rules = Vec::new();
            for (pattern, r) in &self.layers.0 {
                rules.push((
                    pattern.clone(),
                    r.rule().map_err(|e| format!("{pattern}: {e}"))?,
                ));
            }
            for (path, r) in LayerRules(rules).resolve(&weighted_layer_paths(arch))? {
                chosen.insert(path, need(r)?);
            }
        }
        for (path, rule) in &chosen {
            lowrank::check_rule(method, specs[path], rule).map_err(|e| format!("{path}: {e}"))?;
        }
        Ok(Selection { chosen, by_default })
    }
}

/// A factorized layer in the stage's details.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerEntry {
    #[serde(flatten)]
    pub report: LayerReport,
    pub latency: LayerLatency,
}

impl Stage for Decompose {
    fn kind(&self) -> &'static str {
        "decompose"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "params": self.params, "layers": self.layers })
    }

    fn plan(&self, before: &Plan, _cx: &Context) -> Result<Plan, String> {
        before.not_encoded()?;
        before.before_masks("layers are factorized", "the old shapes", "decompose")?;
        crate::resources::check_seconds("layer-seconds", self.params.layer_seconds)?;
        self.selection(before.arch()?)?;
        Ok(before.clone())
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let input = required(input, self.kind())?;
        let arch = input.arch();
        let at = |e: String| anyhow::anyhow!("{}: {e}", input.file.display());
        let (chosen, left) = self.choose(arch, &input.loaded.tensors).map_err(at)?;
        let d =
            lowrank::decompose(arch, &input.loaded.tensors, self.method(), &chosen).map_err(at)?;
        let budget = Duration::from_secs_f64(self.params.layer_seconds);
        let mut entries = Vec::new();
        for report in &d.layers {
            let latency = factor_latency(arch, &input.loaded.tensors, &d, report, budget, cx)?;
            entries.push(LayerEntry {
                report: report.clone(),
                latency,
            });
        }
        let info = serde_json::json!({
            "decomposed_from": input.file,
            "method": self.method(),
            "layers": d.layers.iter().map(|l| (l.path.clone(), l.rank.clone())).collect::<BTreeMap<_, _>>(),
        });
        let details = serde_json::json!({
            "method": self.method(),
            "layers": entries,
            "left": left,
            "params": [arch.num_params(), d.arch.num_params()],
            "flops": [arch.flops(), d.arch.flops()],
        });
        save_outcome(
            &input,
            info,
            "decomposed.safetensors",
            &d.arch,
            d.tensors,
            details,
            cx,
        )
    }
}

impl Decompose {
    /// The layers to factorize with their rules, and the layers that the default choice
    /// leaves alone, each with why (named layers are never left: their errors are errors).
    pub fn choose(
        &self,
        arch: &Arch,
        tensors: &Tensors,
    ) -> Result<(BTreeMap<String, RankRule>, Left), String> {
        let Selection {
            mut chosen,
            by_default,
        } = self.selection(arch)?;
        let mut left = BTreeMap::new();
        if by_default {
            left = self.unprofitable(arch, tensors, &chosen)?;
            chosen.retain(|p, _| !left.contains_key(p));
            if chosen.is_empty() {
                return Err(format!(
                    "no layer's factorization by this rule has fewer FLOPs than the layer: {}",
                    serde_json::to_string(&left).unwrap_or_default()
                ));
            }
        } else {
            let specs = arch.layer_specs();
            for (path, rule) in &chosen {
                let (weight, _) = crate::checkpoint::floats(tensors, &format!("{path}.weight"))?;
                let layer = LayerWeights {
                    spec: specs[path],
                    weight: &weight,
                    bias: None,
                };
                lowrank::choose_rank(self.method(), &layer, rule)
                    .map_err(|e| format!("{path}: {e}"))?;
            }
        }
        Ok((chosen, left))
    }

    /// The layers of `chosen` whose rank (by its rule) would not lower their FLOPs, or that
    /// the rule cannot reach, each with why: the default choice leaves them as they are.
    fn unprofitable(
        &self,
        arch: &Arch,
        tensors: &Tensors,
        chosen: &BTreeMap<String, RankRule>,
    ) -> Result<BTreeMap<String, String>, String> {
        let f = self.method().factorization();
        let stats: BTreeMap<String, _> = arch
            .layer_stats()
            .into_iter()
            .map(|s| (s.path.clone(), s))
            .collect();
        let specs = arch.layer_specs();
        let mut left = BTreeMap::new();
        for (path, rule) in chosen {
            let (weight, _) = crate::checkpoint::floats(tensors, &format!("{path}.weight"))?;
            let layer = LayerWeights {
                spec: specs[path],
                weight: &weight,
                bias: None,
            };
            let rank = match lowrank::choose_rank(self.method(), &layer, rule) {
                Ok(rank) => rank,
                Err(e) => {
                    left.insert(path.clone(), e);
                    continue;
                }
            };
            let after = lowrank::chain_flops(&f.specs(specs[path], &rank), stats[path].input);
            if after >= stats[path].flops {
                left.insert(
                    path.clone(),
                    format!(
                        "rank {} would take {after} FLOPs, not fewer than its {}",
                        lowrank::show_rank(&rank),
                        stats[path].flops
                    ),
                );
            }
        }
        Ok(left)
    }
}

/// The latency of one layer and of the layers that replace it, on its own input shape.
fn factor_latency(
    arch: &Arch,
    tensors: &Tensors,
    d: &lowrank::Decomposed,
    report: &LayerReport,
    budget: Duration,
    cx: &Context,
) -> anyhow::Result<LayerLatency> {
    let input = arch
        .layer_stats()
        .into_iter()
        .find(|s| s.path == report.path)
        .map(|s| s.input)
        .ok_or_else(|| anyhow::anyhow!("internal error: {} has no statistics", report.path))?;
    let new_specs = d.arch.layer_specs();
    let before = Layers {
        specs: vec![arch.layer_specs()[&report.path].clone()],
        paths: std::slice::from_ref(&report.path),
        tensors,
    };
    let after = Layers {
        specs: report
            .new_paths
            .iter()
            .map(|p| new_specs[p].clone())
            .collect(),
        paths: &report.new_paths,
        tensors: &d.tensors,
    };
    layer_latency(input, before, after, budget, cx)
}

/// The per-layer table of a `decompose` stage's details.
pub fn print_layers(details: &serde_json::Value) {
    let entries: Vec<LayerEntry> =
        serde_json::from_value(details["layers"].clone()).unwrap_or_default();
    println!(
        "{:<18} {:>9} {:>9} {:>17} {:>21} {:>8} {:>16} {:>16} {:>8}",
        "layer", "rank", "max", "params", "FLOPs", "w error", "b1 ms", "b64 ms", "b64 x"
    );
    for e in &entries {
        let r = &e.report;
        let l = &e.latency;
        println!(
            "{:<18} {:>9} {:>9} {:>17} {:>21} {:>7.1}% {:>16} {:>16} {:>7.2}x",
            r.path,
            lowrank::show_rank(&r.rank),
            lowrank::show_rank(&r.max_rank),
            format!("{} -> {}", r.params[0], r.params[1]),
            format!("{} -> {}", r.flops[0], r.flops[1]),
            100.0 * r.relative_error,
            format!("{:.3} -> {:.3}", l.b1_ms[0], l.b1_ms[1]),
            format!("{:.3} -> {:.3}", l.b64_ms[0], l.b64_ms[1]),
            l.b64_ms[0] / l.b64_ms[1],
        );
    }
    if let Some(left) = details["left"].as_object() {
        for (path, why) in left {
            println!(
                "{path}: left as it is ({})",
                why.as_str().unwrap_or_default()
            );
        }
    }
}

/// `convpress decompose`: the stage, then `finetune` in the same folder (`run_dir`, by default
/// `runs/<model>-<method>-<rule>`), with the per-layer table and the whole model's accuracy
/// and latency before and after; writes `report.json` and returns it.
pub fn command(
    stage: &Decompose,
    args: &RewriteArgs,
    cx: Context,
) -> anyhow::Result<serde_json::Value> {
    let command = RewriteCommand {
        stage,
        names: ["dense", "factored"],
        args,
    };
    let rule = stage
        .params
        .rule
        .rule()
        .ok()
        .flatten()
        .map_or("layers".into(), |r| r.describe().replace([' ', ','], "-"));
    command.run(
        cx,
        |input| format!("{}-{}-{rule}", input.arch().name, stage.method().name()),
        |_| Ok(()),
        |out| {
            print_layers(&out.details);
            serde_json::json!({
                "layers": out.details["layers"],
                "left": out.details["left"],
            })
        },
    )
}
