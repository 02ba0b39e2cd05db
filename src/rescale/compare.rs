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
/// seed, in `options.run_dir/baseline-seed<N>` and `rescaled-<label>-seed<N>`. Every schedule
/// must have passed `phases::plan` (the command plans them before it takes the folder).
pub fn compare(
    config: &TrainConfig,
    schedules: &[RescaleConfig],
    seeds: &[u64],
    options: &TrainOptions,
) -> anyhow::Result<Vec<SeedResult>> {
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
        ..Default::default()
    }
}

/// `convpress rescale-compare`'s flags.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    #[arg(long, value_enum, default_value = "lenet5")]
    pub model: crate::models::ModelKind,
    #[arg(long, value_enum, default_value = "mnist")]
    pub dataset: crate::data::DatasetKind,
    /// Epochs of each run (default: the model's recipe).
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 3])]
    pub seeds: Vec<u64>,
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub rescale_from: f64,
    /// Switch points to compare, each an epoch number or `auto` (e.g. `auto,2,3`).
    #[arg(long, value_delimiter = ',', default_values_t = [String::from("auto")])]
    pub rescale_at: Vec<String>,
    #[arg(long, value_enum, default_value = "bicubic")]
    pub rescale_interp: super::Interp,
    #[arg(long, value_enum, default_value = "round")]
    pub rescale_kernels: super::KernelRule,
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub rescale_min_gain: f64,
    /// Optimizer states at the switch to compare, each `reset` or `carry` (every switch point
    /// runs with each).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [super::phases::OptimizerState::Reset])]
    pub rescale_optimizer: Vec<super::phases::OptimizerState>,
    #[arg(long)]
    pub train_limit: Option<usize>,
    #[arg(long)]
    pub test_limit: Option<usize>,
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Folder for the runs, compare.json and compare.svg (default: runs/rescale-<model>); it
    /// must be new or empty.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Replace what --out holds (a folder convpress made) instead of refusing.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub no_progress: bool,
}

/// `convpress rescale-compare`: [`compare`] for every schedule the flags list, its table,
/// `compare.json` and `compare.svg`.
pub fn command(args: &CompareArgs, device: burn::prelude::Device) -> anyhow::Result<()> {
    use super::phases::{RescaleAt, rescale_config};
    use crate::train::OptimizerConfig;
    use anyhow::bail;
    use std::io::IsTerminal;
    use std::path::PathBuf;
    let mut config = TrainConfig::defaults(args.model, args.dataset);
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(e) = args.epochs {
        config.epochs = e;
    }
    if let Some(lr) = args.lr {
        match &mut config.optimizer {
            OptimizerConfig::Sgd { lr: l, .. } | OptimizerConfig::Adam { lr: l, .. } => *l = lr,
        }
    }
    config.train_limit = args.train_limit;
    config.test_limit = args.test_limit;
    config.check().map_err(anyhow::Error::msg)?;
    if args.seeds.is_empty() {
        bail!("--seeds needs at least one seed");
    }
    if args.rescale_at.is_empty() {
        bail!("--rescale-at needs at least one switch point");
    }
    if args.rescale_optimizer.is_empty() {
        bail!("--rescale-optimizer needs at least one of reset, carry");
    }
    let schedules = args
        .rescale_at
        .iter()
        .flat_map(|at| args.rescale_optimizer.iter().map(move |&o| (at, o)))
        .map(|(at, optimizer)| {
            let at: RescaleAt = at
                .parse()
                .map_err(|e| anyhow::anyhow!("--rescale-at: {e}"))?;
            Ok(rescale_config(
                args.rescale_from,
                at,
                args.rescale_interp,
                args.rescale_kernels,
                args.rescale_min_gain,
                optimizer,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("rescale-{}", args.model.name())));
    // Every schedule must be able to run, on data that is there (each plan reads it), before
    // --out is touched and hours of baseline training start.
    for rc in &schedules {
        super::phases::plan(&config, rc)?;
    }
    for (flag, n, unique) in [
        ("--seeds", args.seeds.len(), {
            let mut v = args.seeds.clone();
            v.sort_unstable();
            v.dedup();
            v.len()
        }),
        ("--rescale-at", args.rescale_at.len(), {
            let mut v = args.rescale_at.clone();
            v.sort();
            v.dedup();
            v.len()
        }),
    ] {
        if unique != n {
            bail!("{flag} lists a value twice: each run needs its own folder");
        }
    }
    let _out = crate::run_folder::RunFolder::open(
        &out,
        crate::run_folder::Reuse::from_flags(false, args.force),
        "--out",
        false,
        &[config.data_dir.as_path()],
    )?;
    let options = TrainOptions {
        run_dir: out.clone(),
        device,
        resume: false,
        progress_bar: std::io::stderr().is_terminal() && !args.no_progress,
        verbose: true,
    };
    let results = compare(&config, &schedules, &args.seeds, &options)?;

    println!(
        "{:<5} {:<9} {:>9} {:>9} {:>7} {:>7} {:>8}",
        "seed", "schedule", "test acc", "train s", "switch", "saved", "reached"
    );
    for r in &results {
        println!(
            "{:<5} {:<9} {:>8.2}% {:>9.1} {:>7} {:>7} {:>8}",
            r.seed,
            "baseline",
            100.0 * r.baseline_acc(),
            r.baseline_seconds(),
            "-",
            "-",
            "-"
        );
        for (name, run) in &r.rescaled {
            println!(
                "{:<5} {:<9} {:>8.2}% {:>9.1} {:>7} {:>6.1}% {:>8}",
                r.seed,
                name,
                100.0 * run.final_acc(),
                run.train_seconds(),
                run.switch_epoch,
                100.0 * r.saving(run),
                if r.reached(run, 0.001) { "yes" } else { "no" }
            );
        }
    }
    let stat =
        |f: &dyn Fn(&SeedResult) -> f64| mean_std(&results.iter().map(f).collect::<Vec<_>>());
    let (ba, bas) = stat(&|r| 100.0 * r.baseline_acc());
    let (bt, bts) = stat(&|r| r.baseline_seconds());
    println!("mean ± std over {} seeds:", results.len());
    println!("  baseline     {ba:.2} ± {bas:.2}%  {bt:.1} ± {bts:.1} s");
    for (k, rc) in schedules.iter().enumerate() {
        let (ra, ras) = stat(&|r| 100.0 * r.rescaled[k].1.final_acc());
        let (rt, rts) = stat(&|r| r.rescaled[k].1.train_seconds());
        let (sv, svs) = stat(&|r| 100.0 * r.saving(&r.rescaled[k].1));
        let reached = results
            .iter()
            .filter(|r| r.reached(&r.rescaled[k].1, 0.001))
            .count();
        println!(
            "  rescaled {:<4} {ra:.2} ± {ras:.2}%  {rt:.1} ± {rts:.1} s  time saved {sv:.1} ± {svs:.1}%  accuracy {:+.2} points  within 0.1 point of its baseline: {reached}/{}",
            label(rc),
            ra - ba,
            results.len()
        );
    }
    let title = format!(
        "{} on {}: baseline against kernel rescaling from {}",
        args.model.name(),
        args.dataset.name(),
        args.rescale_from
    );
    let svg = chart(&title, &results).to_svg();
    crate::atomic_file::write_atomic(&out.join("compare.svg"), svg.as_bytes())?;
    crate::atomic_file::write_atomic(
        &out.join("compare.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "config": config,
            "rescale": schedules,
            "results": results,
        }))?
        .as_bytes(),
    )?;
    println!(
        "wrote {} and {}",
        out.join("compare.json").display(),
        out.join("compare.svg").display()
    );
    Ok(())
}
