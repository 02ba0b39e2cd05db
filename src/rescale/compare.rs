//! The kernel-rescaling benchmark: the baseline and the rescaled schedule, same seeds, one
//! after the other on the same machine, compared by final test accuracy and training time.

use super::phases::{RescaleConfig, RescaledOutcome, TimelinePoint, train_rescaled};
use crate::plot::{LineChart, Series};
use crate::train::{self, TrainConfig, TrainOptions};
use serde::Serialize;

/// One seed's runs: the baseline and one rescaled run per schedule compared.
#[derive(Debug, Clone, Serialize)]
pub struct SeedResult {
    pub seed: u64,
    pub baseline: Vec<TimelinePoint>,
    /// `(label, outcome)` per rescaling schedule, in the order given.
    pub rescaled: Vec<(String, RescaledOutcome)>,
}

impl SeedResult {
    pub fn baseline_acc(&self) -> f64 {
        self.baseline.last().map_or(0.0, |p| p.test_acc)
    }
    pub fn baseline_seconds(&self) -> f64 {
        self.baseline.last().map_or(0.0, |p| p.seconds)
    }
    /// Fraction of the baseline's training time a rescaled run saved.
    pub fn saving(&self, run: &RescaledOutcome) -> f64 {
        1.0 - run.train_seconds() / self.baseline_seconds()
    }
    /// Whether a rescaled run ended within `tolerance` (a fraction) of the baseline.
    pub fn reached(&self, run: &RescaledOutcome, tolerance: f64) -> bool {
        run.final_acc() >= self.baseline_acc() - tolerance - 1e-12
    }
}

/// Mean and sample standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// A rescaling schedule's label: `auto` or `epoch N`.
pub fn label(rc: &RescaleConfig) -> String {
    let at = match rc.switch {
        super::phases::Switch::Auto { .. } => "auto".into(),
        super::phases::Switch::Epoch { epoch } => format!("at {epoch}"),
    };
    match rc.optimizer {
        super::phases::OptimizerState::Reset => at,
        super::phases::OptimizerState::Carry => format!("{at} carry"),
    }
}

/// Runs the baseline (`config` as it is) and every rescaled schedule of `schedules` for every
/// seed, in `options.run_dir/baseline-seed<N>` and `rescaled-<label>-seed<N>`.
pub fn compare(
    config: &TrainConfig,
    schedules: &[RescaleConfig],
    seeds: &[u64],
    options: &TrainOptions,
) -> anyhow::Result<Vec<SeedResult>> {
    // Every schedule must be able to run before hours of baseline training.
    for rc in schedules {
        super::phases::plan(config, rc)?;
    }
    let mut results = Vec::new();
    for &seed in seeds {
        let mut c = config.clone();
        c.seed = seed;
        let base_opts = TrainOptions {
            run_dir: options.run_dir.join(format!("baseline-seed{seed}")),
            ..options.clone()
        };
        let base = train::train(&c, vec![], &base_opts)?;
        let baseline = base
            .metrics
            .iter()
            .map(|m| TimelinePoint {
                phase: "full".into(),
                epoch: m.epoch,
                seconds: m.cumulative_train_seconds,
                test_acc: m.test_acc,
            })
            .collect();
        let mut rescaled = Vec::new();
        for rc in schedules {
            let name = label(rc);
            let resc_opts = TrainOptions {
                run_dir: options
                    .run_dir
                    .join(format!("rescaled-{}-seed{seed}", name.replace(' ', ""))),
                ..options.clone()
            };
            rescaled.push((name, train_rescaled(&c, rc, &resc_opts)?));
        }
        results.push(SeedResult {
            seed,
            baseline,
            rescaled,
        });
    }
    Ok(results)
}

/// Test accuracy against training time for every run.
pub fn chart(title: &str, results: &[SeedResult]) -> LineChart {
    let pts = |t: &[TimelinePoint]| -> Vec<(f64, f64)> {
        t.iter().map(|p| (p.seconds, 100.0 * p.test_acc)).collect()
    };
    let mut series = Vec::new();
    for r in results {
        series.push(Series {
            name: format!("baseline, seed {}", r.seed),
            points: pts(&r.baseline),
        });
        for (name, run) in &r.rescaled {
            series.push(Series {
                name: format!("rescaled {name}, seed {}", r.seed),
                points: pts(&run.timeline),
            });
        }
    }
    LineChart {
        title: title.into(),
        x_label: "training time (s)".into(),
        y_label: "test accuracy (%)".into(),
        series,
        x_range: None,
        y_range: None,
        guides: vec![],
    }
}
