//! The `prune` stage: magnitude pruning while the model retrains (`compress::prune`), the
//! sparsity of each layer rising along Zhu & Gupta's AGP curve over the first half of the
//! epochs. Masks it leaves are intersected with earlier ones and kept by every later stage.

use crate::compress::prune::{PruneHook, Schedule, sparsity_report};
use crate::compress::sensitivity::TargetsFile;
use crate::pipeline::layers::{LayerRules, weighted_layer_paths};
use crate::pipeline::stages::{reopen, retrain_config, train_keeping};
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Constraints, Context, Model, Outcome, Plan, Stage, State, required};
use anyhow::bail;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `convpress prune`'s flags (but those naming layers) and the `prune` stage's keys. The
/// retraining keys repeat [`super::finetune::FinetuneParams`]'s instead of embedding it:
/// serde's `flatten` would lose the line of a mistyped key.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct PruneParams {
    /// Final fraction of conv and linear weights removed, in every chosen layer.
    #[arg(long, allow_negative_numbers = true)]
    pub sparsity: Option<f64>,
    /// Per-layer final sparsities from a JSON file (`{"layer_sparsity": {"layers.2": 0.9}}`,
    /// as `convpress sensitivity --max-drop` writes); they override --sparsity.
    #[arg(long)]
    pub targets: Option<PathBuf>,
    /// Retraining epochs; the sparsity ramps up over the first half of them.
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Retrain on the first N training images only.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub test_limit: Option<usize>,
}

impl Default for PruneParams {
    fn default() -> Self {
        table::clap_defaults()
    }
}

/// A per-layer override: `"layers.5" = { sparsity = 0.95 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSparsity {
    pub sparsity: f64,
}

pub struct Prune {
    pub params: PruneParams,
    /// Overrides after `sparsity` and `targets`: the last pattern matching a layer wins.
    pub layers: LayerRules<LayerSparsity>,
}

/// Refuses a sparsity outside `[0, 1)`; `what` names it as the user wrote it.
fn in_range(what: &str, s: f64) -> Result<(), String> {
    if (0.0..1.0).contains(&s) {
        Ok(())
    } else {
        Err(format!("{what}: sparsity must be in [0, 1), got {s}"))
    }
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    Ok(Box::new(Prune {
        params: t.params()?,
        layers: t.layers()?,
    }))
}

impl Prune {
    /// `--sparsity` alone, checked before the checkpoint is even read.
    pub fn check_sparsity_flag(sparsity: Option<f64>) -> anyhow::Result<()> {
        if let Some(s) = sparsity
            && !(0.0..1.0).contains(&s)
        {
            bail!("--sparsity must be in [0, 1), got {s}");
        }
        Ok(())
    }

    /// The stage `convpress prune` runs on `model`: `--sparsity` over `--layers` (or all),
    /// then `--targets`, then `--layer-sparsity`, each overriding the one before for the
    /// layers it names; every layer named must be one of the model's.
    pub fn from_flags(
        mut params: PruneParams,
        layers: &[String],
        layer_sparsity: &[(String, f64)],
        model: &Model,
    ) -> anyhow::Result<Prune> {
        use crate::compress::sensitivity::{prunable_weights, select_layers};
        Self::check_sparsity_flag(params.sparsity)?;
        let mut shapes: Vec<(&str, Vec<usize>)> = model
            .loaded
            .tensors
            .iter()
            .map(|(name, (data, _))| (name.as_str(), data.shape().to_vec()))
            .collect();
        shapes.sort();
        let prunable = prunable_weights(shapes.iter().map(|(n, s)| (*n, s.as_slice())));
        let mut named = Vec::new();
        if let Some(path) = params.targets.take() {
            let file = TargetsFile::read(&path).map_err(anyhow::Error::msg)?;
            for (layer, s) in file.layer_sparsity {
                in_range(&format!("--targets {} {layer}", path.display()), s)
                    .map_err(anyhow::Error::msg)?;
                named.push((layer, LayerSparsity { sparsity: s }));
            }
        }
        let mut given = std::collections::BTreeSet::new();
        for (layer, s) in layer_sparsity {
            if !given.insert(layer) {
                bail!("--layer-sparsity: {layer} is given twice");
            }
            in_range(&format!("--layer-sparsity {layer}"), *s).map_err(anyhow::Error::msg)?;
            named.push((layer.clone(), LayerSparsity { sparsity: *s }));
        }
        // The command's rule: each weight follows the most specific name it lies under
        // (`layers.3` names a whole residual block), `""` standing for every layer.
        let mut rules: Vec<(String, f64)> = Vec::new();
        if let Some(s) = params.sparsity.take() {
            select_layers(&prunable, layers).map_err(|e| anyhow::anyhow!("--layers: {e}"))?;
            if layers.is_empty() {
                rules.push((String::new(), s));
            }
            let named_here = |l: &String| named.iter().any(|(n, _)| n == l);
            rules.extend(
                layers
                    .iter()
                    .filter(|l| !named_here(l))
                    .map(|l| (l.clone(), s)),
            );
        }
        let names: Vec<String> = named.iter().map(|(l, _)| l.clone()).collect();
        select_layers(&prunable, &names).map_err(|e| anyhow::anyhow!("per-layer sparsity: {e}"))?;
        // The targets file's entries first: the flag overrides it for the layers both name.
        let mut per_layer = BTreeMap::new();
        for (l, v) in named {
            per_layer.insert(l, v.sparsity);
        }
        rules.extend(per_layer);
        if rules.is_empty() {
            bail!("nothing to prune: give --sparsity, --layer-sparsity or --targets");
        }
        // Resolved here into one exact rule per layer, so the stage sees no overlaps.
        let under = |param: &str, rule: &str| {
            rule.is_empty() || param == rule || param.starts_with(&format!("{rule}."))
        };
        let exact = prunable
            .iter()
            .filter_map(|w| {
                let (_, s) = rules
                    .iter()
                    .filter(|(r, _)| under(&w.param, r))
                    .max_by_key(|(r, _)| r.len())?;
                Some((w.layer.clone(), LayerSparsity { sparsity: *s }))
            })
            .collect();
        Ok(Prune {
            params,
            layers: LayerRules(exact),
        })
    }

    /// The final sparsity of every layer a setting names (`0`: left alone).
    pub fn targets(&self, layers: &[String]) -> Result<BTreeMap<String, f64>, String> {
        let mut out = BTreeMap::new();
        if let Some(s) = self.params.sparsity {
            in_range("sparsity", s)?;
            out.extend(layers.iter().map(|l| (l.clone(), s)));
        }
        let mut rules = Vec::new();
        if let Some(path) = &self.params.targets {
            let file = TargetsFile::read(path)?;
            rules.extend(
                file.layer_sparsity
                    .into_iter()
                    .map(|(l, sparsity)| (l, LayerSparsity { sparsity })),
            );
        }
        rules.extend(self.layers.0.iter().cloned());
        for (layer, v) in LayerRules(rules).resolve(layers)? {
            in_range(&layer, v.sparsity)?;
            out.insert(layer, v.sparsity);
        }
        if out.is_empty() {
            return Err(
                "nothing to prune: give a sparsity, per-layer sparsities or a targets file".into(),
            );
        }
        if out.values().all(|&s| s == 0.0) {
            return Err(
                "every layer's sparsity is 0: nothing to prune (a finetune stage retrains without pruning)".into(),
            );
        }
        Ok(out)
    }
}

impl Stage for Prune {
    fn kind(&self) -> &'static str {
        "prune"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "params": self.params, "layers": self.layers })
    }

    fn plan(&self, before: &Plan, _cx: &Context) -> Result<Plan, String> {
        before.not_encoded()?;
        if before.state.contains(&State::Codebooks) {
            return Err(
                "pruning after share would break the codebooks (new zeros among shared weights): put prune before share".into(),
            );
        }
        self.targets(&weighted_layer_paths(before.arch()?))?;
        let p = &self.params;
        super::check_retrain(
            before.arch()?,
            p.epochs,
            p.lr,
            [p.train_limit, p.test_limit],
        )?;
        Ok(before.clone().with(State::Masks))
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let input = required(input, self.kind())?;
        let targets = self
            .targets(&weighted_layer_paths(input.arch()))
            .map_err(anyhow::Error::msg)?;
        let p = &self.params;
        let mut config = retrain_config(&input, p.epochs, p.lr, p.seed, cx)?;
        config.train_limit = p.train_limit;
        config.test_limit = p.test_limit;
        let schedule = |s: f64| Schedule::AgpOverRun {
            final_sparsity: s,
            fraction: 0.5,
            events: 10,
        };
        let rules = targets
            .iter()
            .filter(|(_, s)| **s > 0.0)
            .map(|(layer, &s)| (layer.clone(), schedule(s)))
            .collect();
        let hook = PruneHook::per_layer(rules)
            .map_err(anyhow::Error::msg)?
            .with_masks(input.constraints.masks.clone());
        let rest = Constraints {
            masks: Default::default(),
            ..input.constraints.clone()
        };
        let (outcome, mut kept) = train_keeping(&config, &rest, vec![Box::new(hook)], cx)?;
        // The masks are the zeros the hook left: every masked entry is zero after the last
        // step, and an unmasked weight that is exactly zero may as well stay so.
        let report = sparsity_report(&outcome.model);
        let tensors = crate::checkpoint::tensor_map(&outcome.model);
        let mut masks = input.constraints.masks.clone();
        for layer in targets.iter().filter(|(_, s)| **s > 0.0).map(|(l, _)| l) {
            let param = format!("{layer}.weight");
            let (w, _) = crate::checkpoint::floats(&tensors, &param).map_err(anyhow::Error::msg)?;
            masks.insert(param, w.iter().map(|&v| v != 0.0).collect());
        }
        kept.masks = masks;
        let details = serde_json::json!({
            "sparsity": targets,
            "epochs": p.epochs,
            "layers": report
                .iter()
                .map(|(l, n, z)| serde_json::json!({"layer": l, "weights": n, "kept": n - z}))
                .collect::<Vec<_>>(),
        });
        Ok(Outcome {
            model: reopen(&outcome.model_path, &kept)?,
            details,
            curve: outcome.metrics,
        })
    }
}

/// `convpress prune`'s table: weights kept per layer, and the closing line.
pub fn table(out: &Outcome) -> String {
    let mut s = format!(
        "{:<22} {:>10} {:>10} {:>9}\n",
        "layer", "weights", "kept", "kept %"
    );
    let (mut total, mut kept) = (0u64, 0u64);
    for l in out.details["layers"].as_array().into_iter().flatten() {
        let (n, k) = (
            l["weights"].as_u64().unwrap_or(0),
            l["kept"].as_u64().unwrap_or(0),
        );
        total += n;
        kept += k;
        s.push_str(&format!(
            "{:<22} {:>10} {:>10} {:>8.2}%\n",
            l["layer"].as_str().unwrap_or(""),
            n,
            k,
            100.0 * k as f64 / n.max(1) as f64
        ));
    }
    let acc = out.curve.last().map_or(0.0, |m| m.test_acc);
    s.push_str(&format!(
        "pruned {}: {} of {} weights kept ({:.2}%), test accuracy {:.2}%; saved to {}",
        out.model.arch().name,
        kept,
        total,
        100.0 * kept as f64 / total.max(1) as f64,
        100.0 * acc,
        out.model.file.display()
    ));
    s
}

/// `convpress prune`: the stage on `checkpoint` in `run_dir` (default
/// `runs/<model>-pruned-<percent>` or `-per-layer`), its `report.json` and its table.
pub fn command(
    checkpoint: &std::path::Path,
    params: PruneParams,
    layers: &[String],
    layer_sparsity: &[(String, f64)],
    run_dir: Option<PathBuf>,
    force: bool,
    cx: Context,
) -> anyhow::Result<()> {
    // The target first: an impossible one is refused before anything is read.
    Prune::check_sparsity_flag(params.sparsity)?;
    let input = Model::open(checkpoint)?;
    let epochs = params.epochs;
    let targets_file = params.targets.clone();
    let stage = Prune::from_flags(params, layers, layer_sparsity, &input)?;
    let targets = stage
        .targets(&weighted_layer_paths(input.arch()))
        .map_err(anyhow::Error::msg)?;
    let name = &input.arch().name;
    let first = targets.values().next().copied().unwrap_or(0.0);
    let uniform = targets.values().all(|&s| s == first);
    let run_dir = run_dir.unwrap_or_else(|| {
        PathBuf::from("runs").join(if uniform {
            format!("{name}-pruned-{}", (first * 100.0).round())
        } else {
            format!("{name}-pruned-per-layer")
        })
    });
    let what = if uniform {
        format!("{:.1}% sparsity", 100.0 * first)
    } else {
        let per: Vec<String> = targets
            .iter()
            .map(|(l, s)| format!("{l} {:.1}%", 100.0 * s))
            .collect();
        format!("per-layer sparsity ({})", per.join(", "))
    };
    eprintln!(
        "pruning {} to {what} over {} retraining epochs, run folder {}",
        checkpoint.display(),
        epochs,
        run_dir.display()
    );
    let cx = Context {
        dir: run_dir.clone(),
        ..cx
    };
    stage
        .plan(&Plan::of(&input), &cx)
        .map_err(anyhow::Error::msg)?;
    // The data is read and checked before the run folder is taken.
    let data_dir = cx.data_dir_for(input.meta());
    crate::pipeline::measure::test_set(&input, &data_dir, None)?;
    let reuse = crate::run_folder::Reuse::from_flags(false, force);
    let _folder = crate::run_folder::RunFolder::open(
        &run_dir,
        reuse,
        "--run-dir",
        false,
        &[
            Some(checkpoint),
            Some(data_dir.as_path()),
            targets_file.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>(),
    )?;
    let out = stage.run(Some(input), &cx)?;
    crate::atomic_file::write_atomic(
        &run_dir.join("report.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "checkpoint": checkpoint,
            "rules": targets.iter().collect::<Vec<_>>(),
            "epochs": epochs,
            "layers": out.details["layers"],
            "test_acc": out.curve.last().map(|m| m.test_acc),
            "model": out.model.file,
        }))?
        .as_bytes(),
    )?;
    println!("{}", table(&out));
    Ok(())
}
