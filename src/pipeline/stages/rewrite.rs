//! What the commands of the stages that rewrite a model's architecture (`prune-filters`,
//! `decompose`) report about the whole model: test accuracy before, right after and after
//! fine-tuning, and latency before and after at batch 1 and 64, measured in turns.

use crate::checkpoint;
use crate::data::ImageSet;
use crate::models::Arch;
use crate::pipeline::stages::finetune::{Finetune, FinetuneParams};
use crate::pipeline::{Context, Outcome, Stage};
use crate::{bench, train};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
