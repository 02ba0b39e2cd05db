//! The commands of the stages that rewrite a model's architecture (`prune-filters`,
//! `decompose`, `circulant`, `rewrite`): each runs its stage then `finetune` in one run folder
//! ([`RewriteCommand`]), and reports about the whole model ([`Rewrite`]): test accuracy
//! before, right after and after fine-tuning, and latency before and after at batch 1 and 64,
//! measured in turns.

use crate::checkpoint;
use crate::data::ImageSet;
use crate::models::{Arch, LayerSpec, Shape};
use crate::pipeline::stages::finetune::{Finetune, FinetuneParams};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage, measure};
use crate::{bench, train};
use anyhow::bail;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default of the rewriting stages' `layer-seconds` in recipes (their flags default to
/// the same second).
pub fn one_second() -> f64 {
    1.0
}

/// One rewritten layer's latency before and after, in milliseconds, at batch 1 and 64.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerLatency {
    pub b1_ms: [f64; 2],
    pub b64_ms: [f64; 2],
}

/// Layers of one model by path, with the tensors they hold: one side of [`layer_latency`].
pub struct Layers<'a> {
    pub specs: Vec<LayerSpec>,
    pub paths: &'a [String],
    pub tensors: &'a checkpoint::Tensors,
}

/// The latency of the layers a rewrite replaced (`before`) and of those replacing them
/// (`after`), each as a probe network on the input they see, timed in turns at batch 1 and 64.
pub fn layer_latency(
    input: Shape,
    before: Layers,
    after: Layers,
    budget: Duration,
    cx: &Context,
) -> anyhow::Result<LayerLatency> {
    let probe = |side: Layers| {
        let mut t = checkpoint::Tensors::new();
        for (i, p) in side.paths.iter().enumerate() {
            for (name, v) in side.tensors {
                // Nested fields too: a concatenation's branches hold its tensors.
                if let Some(field) = name.strip_prefix(&format!("{p}.")) {
                    t.insert(format!("layers.{i}.{field}"), v.clone());
                }
            }
        }
        bench::layer_probe(&side.specs, &t, input, &cx.device).map_err(anyhow::Error::msg)
    };
    let (before, after) = (probe(before)?, probe(after)?);
    let b1 = bench::interleaved_latency(&[&before, &after], 1, budget, &cx.device);
    let b64 = bench::interleaved_latency(&[&before, &after], 64, budget, &cx.device);
    Ok(LayerLatency {
        b1_ms: [b1[0], b1[1]],
        b64_ms: [b64[0], b64[1]],
    })
}

/// A rewriting stage's result: its architecture and tensors saved as `cx.dir/<file>`, with
/// `info` (what it was made from and how) and the input's data folder in the file's metadata.
#[allow(clippy::too_many_arguments)]
pub fn save_outcome(
    input: &Model,
    info: serde_json::Value,
    file: &str,
    arch: &Arch,
    tensors: checkpoint::Tensors,
    details: serde_json::Value,
    cx: &Context,
) -> anyhow::Result<Outcome> {
    let meta = checkpoint::ModelMeta {
        info,
        ..input.meta().clone()
    };
    let meta = match input.meta().data_dir() {
        Some(dir) => meta.with_data_dir(&dir),
        None => meta,
    };
    let model = Model::save_tensors(
        &cx.dir.join(file),
        arch,
        tensors,
        &meta,
        &Default::default(),
        &cx.device,
    )?;
    Ok(Outcome {
        model,
        details,
        curve: vec![],
    })
}

/// The flags every rewriting command (`prune-filters`, `decompose`, `circulant`) shares.
#[derive(clap::Args, Debug, Clone)]
pub struct RewriteArgs {
    /// The trained model to rewrite.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub finetune: FinetuneParams,
    /// Seconds spent measuring each whole-model latency figure.
    #[arg(long, default_value_t = 2.0)]
    pub latency_seconds: f64,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Run folder (default: `runs/<a name from the model and the settings>`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Replace the run in --run-dir (a folder convpress made) instead of refusing.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub no_progress: bool,
}

/// One run of a rewriting stage's command: what every such command shares.
pub struct RewriteCommand<'a> {
    pub stage: &'a dyn Stage,
    /// The input's and the output's names in the table and the report (`dense`, `pruned`).
    pub names: [&'a str; 2],
    pub args: &'a RewriteArgs,
}

impl RewriteCommand<'_> {
    /// Checks everything that can fail on input (the stage's and fine-tuning's plans, then
    /// `check`) before anything is written; runs the stage in the run folder (by default
    /// `runs/<default_name(input)>`); `show` prints the stage's details and returns what the
    /// report adds to the common figures; measures both models and fine-tunes; writes
    /// `report.json` and returns it.
    pub fn run(
        self,
        cx: Context,
        default_name: impl FnOnce(&Model) -> String,
        check: impl FnOnce(&Model) -> Result<(), String>,
        show: impl FnOnce(&Outcome) -> serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let RewriteArgs {
            checkpoint,
            finetune,
            latency_seconds,
            run_dir,
            force,
            ..
        } = self.args;
        let (checkpoint, latency_seconds) = (checkpoint.as_path(), *latency_seconds);
        crate::resources::check_seconds("--latency-seconds", latency_seconds)
            .map_err(anyhow::Error::msg)?;
        if finetune.train_limit == Some(0) || finetune.test_limit == Some(0) {
            bail!("--train-limit and --test-limit must be at least 1");
        }
        let input = Model::open(checkpoint)?;
        let at = |e: String| anyhow::anyhow!("{}: {e}", checkpoint.display());
        let planned = self.stage.plan(&Plan::of(&input), &cx).map_err(at)?;
        if finetune.epochs > 0 {
            Finetune {
                params: finetune.clone(),
            }
            .plan(&planned, &cx)
            .map_err(anyhow::Error::msg)?;
        }
        check(&input).map_err(at)?;
        let test = measure::test_set(&input, &cx.data_dir_for(input.meta()), finetune.test_limit)?;
        let dir = run_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(default_name(&input)));
        let cx = &Context { dir, ..cx };
        let reuse = crate::run_folder::Reuse::from_flags(false, *force);
        let data_dir = cx.data_dir_for(input.meta());
        let _folder = crate::run_folder::RunFolder::open(
            &cx.dir,
            reuse,
            "--run-dir",
            false,
            &[checkpoint, &data_dir],
        )?;
        let out = self.stage.run(Some(input.clone()), cx)?;
        let extra = show(&out);
        let r = Rewrite::measure(
            checkpoint,
            &out,
            self.names,
            finetune,
            &test,
            latency_seconds,
            cx,
        )?;
        let (a, b) = (input.arch(), out.model.arch());
        r.print(self.names, [a, b], finetune.epochs);
        let [x, y] = self.names;
        let mut report = serde_json::json!({
            "checkpoint": checkpoint,
            "settings": self.stage.settings(),
            "params": [a.num_params(), b.num_params()],
            "flops": [a.flops(), b.flops()],
            "latency": r.latency,
            "threads": rayon::current_num_threads(),
            "test_images": test.n,
            format!("accuracy_{x}"): r.accuracy[0],
            format!("accuracy_{y}"): r.accuracy[1],
            "accuracy_finetuned": r.tuned,
            "finetune_epochs": finetune.epochs,
            "model": r.model,
        });
        if let (Some(map), serde_json::Value::Object(more)) = (report.as_object_mut(), extra) {
            map.extend(more);
        }
        crate::atomic_file::write_atomic(
            &cx.dir.join("report.json"),
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
        Ok(report)
    }
}

/// The whole-model figures of one rewrite.
pub struct Rewrite {
    /// Test accuracy of the input and of the rewritten model before fine-tuning.
    pub accuracy: [f64; 2],
    /// After fine-tuning, if it ran.
    pub tuned: Option<f64>,
    /// `<name>_b<batch>_ms` for both names and batches 1 and 64.
    pub latency: serde_json::Map<String, serde_json::Value>,
    /// The final model: fine-tuned if it was.
    pub model: PathBuf,
}

impl Rewrite {
    /// Measures the input at `checkpoint` and the stage's output `out` (named `names`), then
    /// fine-tunes the output in `cx.dir` if `finetune.epochs > 0`.
    pub fn measure(
        checkpoint_path: &Path,
        out: &Outcome,
        names: [&str; 2],
        finetune: &FinetuneParams,
        test: &ImageSet,
        latency_seconds: f64,
        cx: &Context,
    ) -> anyhow::Result<Rewrite> {
        let device = &cx.device;
        let (before, _) = checkpoint::load(checkpoint_path, device)?;
        let (after, _) = checkpoint::load(&out.model.file, device)?;
        let (_, acc_before) = train::evaluate(&before, test, 256, device);
        let (_, acc_after) = train::evaluate(&after, test, 256, device);
        let budget = Duration::from_secs_f64(latency_seconds);
        let mut latency = serde_json::Map::new();
        for batch in [1usize, 64] {
            let ms = bench::interleaved_latency(&[&before, &after], batch, budget, device);
            for (name, ms) in names.iter().zip(ms) {
                latency.insert(format!("{name}_b{batch}_ms"), ms.into());
            }
        }
        let (tuned, model) = if finetune.epochs > 0 {
            let t = Finetune {
                params: finetune.clone(),
            }
            .run(Some(out.model.clone()), cx)?;
            (t.curve.last().map(|m| m.test_acc), t.model.file)
        } else {
            (None, out.model.file.clone())
        };
        Ok(Rewrite {
            accuracy: [acc_before, acc_after],
            tuned,
            latency,
            model,
        })
    }

    fn ms(&self, key: &str) -> f64 {
        self.latency[key].as_f64().unwrap_or(f64::NAN)
    }

    /// The table of both models, and a line of ratios.
    pub fn print(&self, names: [&str; 2], archs: [&Arch; 2], epochs: usize) {
        println!(
            "{:<8} {:>10} {:>13} {:>10} {:>10} {:>9}",
            "model", "params", "FLOPs", "b1 ms", "b64 ms", "accuracy"
        );
        for (i, (name, arch)) in names.iter().zip(archs).enumerate() {
            let tail = match (i, self.tuned) {
                (1, Some(t)) => format!(" -> {:.2}% after {epochs} fine-tuning epochs", 100.0 * t),
                _ => String::new(),
            };
            println!(
                "{:<8} {:>10} {:>13} {:>10.3} {:>10.2} {:>8.2}%{tail}",
                name,
                arch.num_params(),
                arch.flops(),
                self.ms(&format!("{name}_b1_ms")),
                self.ms(&format!("{name}_b64_ms")),
                100.0 * self.accuracy[i]
            );
        }
        let [a, b] = archs;
        let [x, y] = names;
        println!(
            "params {:.2}x fewer, FLOPs {:.2}x fewer, latency {:.2}x (batch 1) and {:.2}x (batch 64) lower; saved to {}",
            a.num_params() as f64 / b.num_params() as f64,
            a.flops() as f64 / b.flops() as f64,
            self.ms(&format!("{x}_b1_ms")) / self.ms(&format!("{y}_b1_ms")),
            self.ms(&format!("{x}_b64_ms")) / self.ms(&format!("{y}_b64_ms")),
            self.model.display()
        );
    }
}
