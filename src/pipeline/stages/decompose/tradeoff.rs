//! `convpress decompose-tradeoff`: each method's accuracy against speed at several ranks.
//!
//! For every method and target compression (the `compression` rank rule: each chosen layer's
//! parameters shrink by that factor), the decompose command runs in its own folder
//! (`<run-dir>/<method>-<c>x`): factorize, time the layers before and after in turns,
//! fine-tune, evaluate. The study gathers the runs into `tradeoff.json`, `tradeoff.csv` and an
//! SVG plot of test accuracy after fine-tuning against the factorized layers' speed-up at
//! batch 64, one line per method, with the dense model's accuracy and one point below it as
//! guides (the bar the low-rank issue sets: at least 2x faster layers, under 1 point lost).

use super::{Decompose, DecomposeParams, LayerEntry, RuleParams};
use crate::compress::lowrank::{self, Method};
use crate::pipeline::layers::LayerRules;
use crate::pipeline::stages::finetune::FinetuneParams;
use crate::pipeline::stages::rewrite::RewriteArgs;
use crate::pipeline::{Context, Model, Plan, Stage};
use crate::plot::{LineChart, Series};
use anyhow::bail;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `convpress decompose-tradeoff`'s flags.
#[derive(clap::Args, Debug)]
pub struct TradeoffArgs {
    /// The trained model to factorize.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Methods to compare (comma separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Method::Separable, Method::Cp, Method::Tucker2])]
    pub methods: Vec<Method>,
    /// Target compressions of each factorized layer's parameters (comma separated, each >= 1).
    #[arg(long, value_delimiter = ',', default_values_t = [2.0, 4.0, 8.0])]
    pub compressions: Vec<f64>,
    /// Layers to factorize (paths or glob patterns, comma separated); default: every layer
    /// each method takes where the rank chosen lowers its FLOPs.
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<String>,
    #[command(flatten)]
    pub finetune: FinetuneParams,
    /// Seconds spent timing each layer before and after, per batch size (1 and 64).
    #[arg(long, default_value_t = 1.0)]
    pub layer_seconds: f64,
    /// Seconds spent measuring each whole-model latency figure.
    #[arg(long, default_value_t = 1.0)]
    pub latency_seconds: f64,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The study's folder (default `runs/<model>-tradeoff`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Replace the study in --run-dir (a folder convpress made) instead of refusing.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub no_progress: bool,
    /// The plot's title.
    #[arg(long)]
    pub title: Option<String>,
}

/// One run of the study.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub method: Method,
    pub compression: f64,
    /// `path: rank` of each factorized layer.
    pub ranks: String,
    /// The factorized layers' parameters and FLOPs, summed, before and after.
    pub layer_params: [usize; 2],
    pub layer_flops: [u64; 2],
    /// The factorized layers' latencies, summed, before and after (ms).
    pub layer_b1_ms: [f64; 2],
    pub layer_b64_ms: [f64; 2],
    /// The whole model's latency at batch 64, before and after (ms).
    pub model_b64_ms: [f64; 2],
    /// Test accuracy of the factorized model before and after fine-tuning.
    pub accuracy_factored: f64,
    pub accuracy_finetuned: Option<f64>,
    /// The run's folder.
    pub dir: PathBuf,
}

impl Point {
    pub fn layer_speedup_b64(&self) -> f64 {
        self.layer_b64_ms[0] / self.layer_b64_ms[1]
    }

    pub fn layer_speedup_b1(&self) -> f64 {
        self.layer_b1_ms[0] / self.layer_b1_ms[1]
    }

    /// The accuracy the plot shows: after fine-tuning if there was any.
    pub fn accuracy(&self) -> f64 {
        self.accuracy_finetuned.unwrap_or(self.accuracy_factored)
    }

    fn from_report(
        method: Method,
        compression: f64,
        dir: PathBuf,
        r: &serde_json::Value,
    ) -> anyhow::Result<Point> {
        let layers: Vec<LayerEntry> = serde_json::from_value(r["layers"].clone())?;
        let sum2 = |f: &dyn Fn(&LayerEntry) -> [f64; 2]| {
            layers.iter().fold([0.0, 0.0], |a, l| {
                let v = f(l);
                [a[0] + v[0], a[1] + v[1]]
            })
        };
        let sumu = |f: &dyn Fn(&LayerEntry) -> [usize; 2]| {
            layers.iter().fold([0, 0], |a, l| {
                let v = f(l);
                [a[0] + v[0], a[1] + v[1]]
            })
        };
        let ms = |k: &str| r["latency"][k].as_f64().unwrap_or(f64::NAN);
        Ok(Point {
            method,
            compression,
            ranks: layers
                .iter()
                .map(|l| format!("{}:{}", l.report.path, lowrank::show_rank(&l.report.rank)))
                .collect::<Vec<_>>()
                .join(" "),
            layer_params: sumu(&|l| l.report.params),
            layer_flops: summed_flops(&layers),
            layer_b1_ms: sum2(&|l| l.latency.b1_ms),
            layer_b64_ms: sum2(&|l| l.latency.b64_ms),
            model_b64_ms: [ms("dense_b64_ms"), ms("factored_b64_ms")],
            accuracy_factored: r["accuracy_factored"].as_f64().unwrap_or(f64::NAN),
            accuracy_finetuned: r["accuracy_finetuned"].as_f64(),
            dir,
        })
    }
}

/// The layers' FLOPs before and after, summed.
fn summed_flops(layers: &[LayerEntry]) -> [u64; 2] {
    layers.iter().fold([0, 0], |a, l| {
        [a[0] + l.report.flops[0], a[1] + l.report.flops[1]]
    })
}

/// The study's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tradeoff {
    pub model: String,
    pub accuracy_dense: f64,
    pub test_images: usize,
    pub finetune: FinetuneParams,
    pub threads: usize,
    pub points: Vec<Point>,
}

impl Tradeoff {
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<10} {:>6} {:>17} {:>21} {:>9} {:>9} {:>9} {:>10} {:>10}  ranks\n",
            "method",
            "target",
            "layer params",
            "layer FLOPs",
            "b1 x",
            "b64 x",
            "model x",
            "factored",
            "tuned"
        );
        for p in &self.points {
            out.push_str(&format!(
                "{:<10} {:>5}x {:>17} {:>21} {:>8.2}x {:>8.2}x {:>8.2}x {:>9.2}% {:>10}  {}\n",
                p.method.name(),
                p.compression,
                format!("{} -> {}", p.layer_params[0], p.layer_params[1]),
                format!("{} -> {}", p.layer_flops[0], p.layer_flops[1]),
                p.layer_speedup_b1(),
                p.layer_speedup_b64(),
                p.model_b64_ms[0] / p.model_b64_ms[1],
                100.0 * p.accuracy_factored,
                p.accuracy_finetuned
                    .map_or("-".into(), |a| format!("{:.2}%", 100.0 * a)),
                p.ranks
            ));
        }
        out
    }

    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "method,compression,layer_params_before,layer_params_after,layer_flops_before,layer_flops_after,layer_b1_ms_before,layer_b1_ms_after,layer_b64_ms_before,layer_b64_ms_after,model_b64_ms_before,model_b64_ms_after,accuracy_factored,accuracy_finetuned,ranks\n",
        );
        for p in &self.points {
            out.push_str(&format!(
                "{},{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{},\"{}\"\n",
                p.method.name(),
                p.compression,
                p.layer_params[0],
                p.layer_params[1],
                p.layer_flops[0],
                p.layer_flops[1],
                p.layer_b1_ms[0],
                p.layer_b1_ms[1],
                p.layer_b64_ms[0],
                p.layer_b64_ms[1],
                p.model_b64_ms[0],
                p.model_b64_ms[1],
                p.accuracy_factored,
                p.accuracy_finetuned
                    .map_or(String::new(), |a| format!("{a:.4}")),
                p.ranks
            ));
        }
        out
    }

    /// Accuracy (%) against the factorized layers' speed-up at batch 64, one line per method.
    pub fn chart(&self, title: &str) -> LineChart {
        let mut methods: Vec<Method> = self.points.iter().map(|p| p.method).collect();
        methods.dedup();
        let dense = 100.0 * self.accuracy_dense;
        LineChart {
            title: title.to_string(),
            x_label: "speed-up of the factorized layers, batch 64 (x)".into(),
            y_label: "test accuracy after fine-tuning (%)".into(),
            series: methods
                .iter()
                .map(|m| {
                    let mut points: Vec<(f64, f64)> = self
                        .points
                        .iter()
                        .filter(|p| p.method == *m)
                        .map(|p| (p.layer_speedup_b64(), 100.0 * p.accuracy()))
                        .collect();
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    Series {
                        name: m.name().into(),
                        points,
                    }
                })
                .collect(),
            guides: vec![
                (dense, format!("dense {dense:.2}%")),
                (dense - 1.0, "dense - 1 point".into()),
            ],
            ..Default::default()
        }
    }
}

pub fn command(args: &TradeoffArgs, cx: Context) -> anyhow::Result<()> {
    if args.methods.is_empty() || args.compressions.is_empty() {
        bail!("give at least one method (--methods) and one compression (--compressions)");
    }
    let input = Model::open(&args.checkpoint)?;
    let stage = |method: Method, c: f64| Decompose {
        params: DecomposeParams {
            method,
            rule: RuleParams {
                compression: Some(c),
                ..Default::default()
            },
            layer_seconds: args.layer_seconds,
        },
        layers: LayerRules::named(args.layers.clone()),
    };
    // Every run is planned and its ranks chosen before the first one starts.
    for &m in &args.methods {
        for &c in &args.compressions {
            let s = stage(m, c);
            s.plan(&Plan::of(&input), &cx)
                .and_then(|_| s.choose(input.arch(), &input.loaded.tensors).map(|_| ()))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{}: {} at compression {c}: {e}",
                        args.checkpoint.display(),
                        m.name()
                    )
                })?;
        }
    }
    crate::resources::check_seconds("--latency-seconds", args.latency_seconds)
        .map_err(anyhow::Error::msg)?;
    let dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| Path::new("runs").join(format!("{}-tradeoff", input.arch().name)));
    let data_dir = cx.data_dir_for(input.meta());
    let _folder = crate::run_folder::RunFolder::open(
        &dir,
        crate::run_folder::Reuse::from_flags(false, args.force),
        "--run-dir",
        false,
        &[&args.checkpoint, &data_dir],
    )?;
    let mut points = Vec::new();
    let mut dense = (f64::NAN, 0, 0);
    for &m in &args.methods {
        for &c in &args.compressions {
            let sub = dir.join(format!("{}-{c}x", m.name()));
            println!("\n== {} at {c}x -> {}", m.name(), sub.display());
            let run = RewriteArgs {
                checkpoint: args.checkpoint.clone(),
                finetune: args.finetune.clone(),
                latency_seconds: args.latency_seconds,
                data_dir: args.data_dir.clone(),
                run_dir: Some(sub.clone()),
                force: false,
                no_progress: args.no_progress,
            };
            let report = super::command(&stage(m, c), &run, cx.clone())?;
            dense = (
                report["accuracy_dense"].as_f64().unwrap_or(f64::NAN),
                report["test_images"].as_u64().unwrap_or(0) as usize,
                report["threads"].as_u64().unwrap_or(0) as usize,
            );
            points.push(Point::from_report(m, c, sub, &report)?);
        }
    }
    let result = Tradeoff {
        model: input.arch().name.clone(),
        accuracy_dense: dense.0,
        test_images: dense.1,
        finetune: args.finetune.clone(),
        threads: dense.2,
        points,
    };
    let title = args.title.clone().unwrap_or_else(|| {
        format!(
            "Low-rank factorization of {}: accuracy after {} fine-tuning epochs against speed",
            result.model, args.finetune.epochs
        )
    });
    let write = |name: &str, bytes: &[u8]| crate::atomic_file::write_atomic(&dir.join(name), bytes);
    #[derive(Serialize)]
    struct Report<'a> {
        checkpoint: &'a Path,
        #[serde(flatten)]
        result: &'a Tradeoff,
    }
    write(
        "tradeoff.json",
        serde_json::to_string_pretty(&Report {
            checkpoint: &args.checkpoint,
            result: &result,
        })?
        .as_bytes(),
    )?;
    write("tradeoff.csv", result.to_csv().as_bytes())?;
    write("tradeoff.svg", result.chart(&title).to_svg().as_bytes())?;
    println!(
        "\n{}: dense {:.2}% on {} test images; speed-ups are the factorized layers' (b1, b64) and the whole model's (b64), {} threads:",
        result.model,
        100.0 * result.accuracy_dense,
        result.test_images,
        result.threads
    );
    print!("{}", result.table());
    println!(
        "wrote tradeoff.json, tradeoff.csv and tradeoff.svg in {}",
        dir.display()
    );
    Ok(())
}
