//! Run reports: one entry per finished stage with the figures measured from its output file,
//! written as `report.json`, `report.md` and charts in `plots/` after every stage; and the
//! side-by-side comparison of several runs (`convpress report RUN...`).

use super::measure::{Figures, LayerFigures};
use crate::plot::{BarChart, LineChart, Series};
use crate::train::EpochMetrics;
use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One finished stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// 1-based position in the recipe.
    pub index: usize,
    pub kind: String,
    /// Line of the recipe the stage starts on.
    pub line: usize,
    pub settings: serde_json::Value,
    /// Wall-clock seconds of the stage's work (measuring it not included).
    pub seconds: f64,
    pub file: PathBuf,
    pub figures: Figures,
    pub layers: Vec<LayerFigures>,
    pub details: serde_json::Value,
    pub curve: Vec<EpochMetrics>,
}

impl Entry {
    /// `2 prune`: how the stage is named in tables and charts.
    pub fn label(&self) -> String {
        format!("{} {}", self.index, self.kind)
    }

    /// `0.189 sparse`: the latency at `batch` and the runtime that gave it.
    fn latency(&self, batch: usize) -> String {
        self.figures
            .latency
            .iter()
            .find(|l| l.batch == batch)
            .map_or(String::new(), |l| format!("{:.3} {}", l.ms, l.runtime))
    }
}

/// A run's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub recipe: PathBuf,
    pub description: Option<String>,
    /// The checkpoint the run started from, if any.
    pub from: Option<PathBuf>,
    pub threads: usize,
    pub stages: Vec<Entry>,
}

impl Report {
    pub fn read(run_dir: &Path) -> anyhow::Result<Report> {
        let path = run_dir.join("report.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} has no report ({})", run_dir.display(), path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
    }

    /// The file size each ratio is taken against: the first stage's file (or the starting
    /// checkpoint's, which the first entry measures when a run starts from one).
    fn base_bytes(&self) -> u64 {
        self.stages
            .first()
            .map_or(1, |e| e.figures.file_bytes.max(1))
    }

    /// The stage table as Markdown (a terminal reads it as well).
    pub fn table(&self) -> String {
        let batches: Vec<usize> = self
            .stages
            .first()
            .map(|e| e.figures.latency.iter().map(|l| l.batch).collect())
            .unwrap_or_default();
        let mut o = String::from(
            "| stage | test accuracy | file bytes | ratio | params | non-zero | FLOPs | non-zero FLOPs |",
        );
        for b in &batches {
            let _ = write!(o, " b{b} ms |");
        }
        o.push_str(" stage s |\n|---|---|---|---|---|---|---|---|");
        o.push_str(&"---|".repeat(batches.len() + 1));
        o.push('\n');
        let base = self.base_bytes() as f64;
        for e in &self.stages {
            let f = &e.figures;
            let _ = write!(
                o,
                "| {} | {:.2}% | {} | {:.1}x | {} | {} | {} | {} |",
                e.label(),
                100.0 * f.test_acc,
                f.file_bytes,
                base / f.file_bytes.max(1) as f64,
                f.params,
                f.nonzero,
                f.flops,
                f.flops_nonzero
            );
            for &b in &batches {
                let _ = write!(o, " {} |", e.latency(b));
            }
            let _ = writeln!(o, " {:.1} |", e.seconds);
        }
        o
    }

    /// The whole report as Markdown: what ran, the table, the charts, and each stage's
    /// per-layer figures.
    pub fn markdown(&self) -> String {
        let mut o = String::from("# convpress run report\n\n");
        if let Some(d) = &self.description {
            let _ = writeln!(o, "{d}\n");
        }
        let _ = writeln!(o, "Recipe: `{}`", self.recipe.display());
        if let Some(f) = &self.from {
            let _ = writeln!(o, "  \nStarted from: `{}`", f.display());
        }
        let _ = writeln!(
            o,
            "  \nMeasured on {} threads; accuracy on {} test images; ratio: the first stage's file bytes over each stage's; latency: milliseconds per batch on the faster of the dense and (for mostly-zero models) sparse runtimes.\n",
            self.threads,
            self.stages.first().map_or(0, |e| e.figures.test_images)
        );
        o.push_str(&self.table());
        o.push_str("\n![accuracy against size](plots/accuracy-size.svg)\n");
        o.push_str("![kept weights per layer](plots/layers-kept.svg)\n");
        o.push_str("![bits per weight](plots/layers-bits.svg)\n");
        if self.stages.iter().any(|e| !e.curve.is_empty()) {
            o.push_str("![training curves](plots/training.svg)\n");
        }
        o.push_str("\n## Stages\n");
        for e in &self.stages {
            let _ = writeln!(
                o,
                "\n### {} (recipe line {})\n\nFile `{}`; settings `{}`.\n",
                e.label(),
                e.line,
                e.file.display(),
                e.settings
            );
            o.push_str(
                "| layer | kind | weights | kept | kept % | bits |\n|---|---|---|---|---|---|\n",
            );
            for l in &e.layers {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {:.2}% | {} |",
                    l.layer,
                    l.kind,
                    l.weights,
                    l.kept,
                    100.0 * l.kept as f64 / l.weights.max(1) as f64,
                    l.bits
                );
            }
        }
        o
    }

    /// The charts: accuracy against bytes on disk, kept fraction and bits per layer for each
    /// stage, and the test accuracy of every training epoch.
    pub fn charts(&self) -> Vec<(&'static str, String)> {
        let points: Vec<(f64, f64)> = self
            .stages
            .iter()
            .map(|e| (e.figures.file_bytes as f64, 100.0 * e.figures.test_acc))
            .collect();
        let size = LineChart {
            title: "Test accuracy against file size".into(),
            x_label: "bytes on disk (log scale)".into(),
            y_label: "test accuracy (%)".into(),
            series: vec![Series {
                name: "stages in order".into(),
                points: points.clone(),
            }],
            log_x: true,
            notes: notes(
                self.stages
                    .iter()
                    .zip(&points)
                    .map(|(e, &p)| (p, e.label())),
            ),
            ..Default::default()
        };
        let categories: Vec<String> = self
            .stages
            .last()
            .map(|e| e.layers.iter().map(|l| l.layer.clone()).collect())
            .unwrap_or_default();
        let per_layer = |f: &dyn Fn(&LayerFigures) -> f64| -> Vec<(String, Vec<f64>)> {
            self.stages
                .iter()
                .map(|e| {
                    let v = categories
                        .iter()
                        .map(|c| e.layers.iter().find(|l| &l.layer == c).map_or(f64::NAN, f))
                        .collect();
                    (e.label(), v)
                })
                .collect()
        };
        let kept = BarChart {
            title: "Weights kept per layer".into(),
            y_label: "kept (%)".into(),
            categories: categories.clone(),
            series: per_layer(&|l| 100.0 * l.kept as f64 / l.weights.max(1) as f64),
            y_range: Some((0.0, 105.0)),
        };
        let bits = BarChart {
            title: "Bits per weight".into(),
            y_label: "bits (32: f32)".into(),
            series: per_layer(&|l| l.bits as f64),
            categories: categories.clone(),
            y_range: Some((0.0, 34.0)),
        };
        let mut offset = 0;
        let mut series = Vec::new();
        for e in self.stages.iter().filter(|e| !e.curve.is_empty()) {
            series.push(Series {
                name: e.label(),
                points: e
                    .curve
                    .iter()
                    .map(|m| ((offset + m.epoch) as f64, 100.0 * m.test_acc))
                    .collect(),
            });
            offset += e.curve.len();
        }
        let training = LineChart {
            title: "Test accuracy after every training epoch".into(),
            x_label: "epoch (all stages in order)".into(),
            y_label: "test accuracy (%)".into(),
            series,
            ..Default::default()
        };
        let mut charts = vec![
            ("accuracy-size.svg", size.to_svg()),
            ("layers-kept.svg", kept.to_svg()),
            ("layers-bits.svg", bits.to_svg()),
        ];
        if !training.series.is_empty() {
            charts.push(("training.svg", training.to_svg()));
        }
        charts
    }

    /// Writes `report.json`, `report.md` and `plots/*.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        self.draw(dir)?;
        crate::atomic_file::write_atomic(
            &dir.join("report.json"),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )?;
        Ok(())
    }

    /// Writes `report.md` and `plots/*.svg` into `dir`: what `report.json` shows, drawn again
    /// without touching `report.json` itself (which a running recipe may be extending).
    pub fn draw(&self, dir: &Path) -> anyhow::Result<()> {
        use crate::atomic_file::write_atomic;
        let plots = dir.join("plots");
        std::fs::create_dir_all(&plots)
            .with_context(|| format!("cannot create {}", plots.display()))?;
        for (name, svg) in self.charts() {
            write_atomic(&plots.join(name), svg.as_bytes())?;
        }
        write_atomic(&dir.join("report.md"), self.markdown().as_bytes())?;
        Ok(())
    }
}

/// One note per distinct point, naming every stage at it (an eval stage sits on the model
/// before it).
fn notes(labelled: impl Iterator<Item = ((f64, f64), String)>) -> Vec<(f64, f64, String)> {
    let mut out: Vec<(f64, f64, String)> = Vec::new();
    for ((x, y), label) in labelled {
        match out.iter_mut().find(|n| n.0 == x && n.1 == y) {
            Some(n) => n.2 = format!("{}, {label}", n.2),
            None => out.push((x, y, label)),
        }
    }
    out
}

/// Several runs side by side: one row per run with its last stage's figures (and its first
/// stage's, the baseline), as Markdown, and a chart of accuracy against size with one line
/// per run.
pub fn compare(runs: &[(String, Report)]) -> (String, LineChart) {
    let mut o = String::from(
        "| run | stages | first: accuracy | bytes | last: accuracy | bytes | ratio | accuracy change | params | non-zero |",
    );
    let batches: Vec<usize> = runs
        .first()
        .and_then(|(_, r)| r.stages.first())
        .map(|e| e.figures.latency.iter().map(|l| l.batch).collect())
        .unwrap_or_default();
    for b in &batches {
        let _ = write!(o, " b{b} ms |");
    }
    o.push_str("\n|---|---|---|---|---|---|---|---|---|---|");
    o.push_str(&"---|".repeat(batches.len()));
    o.push('\n');
    let mut series = Vec::new();
    for (name, r) in runs {
        let (Some(first), Some(last)) = (r.stages.first(), r.stages.last()) else {
            continue;
        };
        let (a, b) = (&first.figures, &last.figures);
        let kinds: Vec<&str> = r.stages.iter().map(|e| e.kind.as_str()).collect();
        let _ = write!(
            o,
            "| {name} | {} | {:.2}% | {} | {:.2}% | {} | {:.1}x | {:+.2} points | {} | {} |",
            kinds.join(" → "),
            100.0 * a.test_acc,
            a.file_bytes,
            100.0 * b.test_acc,
            b.file_bytes,
            a.file_bytes as f64 / b.file_bytes.max(1) as f64,
            100.0 * (b.test_acc - a.test_acc),
            b.params,
            b.nonzero
        );
        for &batch in &batches {
            let _ = write!(o, " {} |", last.latency(batch));
        }
        o.push('\n');
        series.push(Series {
            name: name.clone(),
            points: r
                .stages
                .iter()
                .map(|e| (e.figures.file_bytes as f64, 100.0 * e.figures.test_acc))
                .collect(),
        });
    }
    let chart = LineChart {
        title: "Test accuracy against file size, by run".into(),
        x_label: "bytes on disk (log scale)".into(),
        y_label: "test accuracy (%)".into(),
        series,
        log_x: true,
        ..Default::default()
    };
    (o, chart)
}

/// `convpress report RUN...`: one run's table (its report.md and charts drawn again from
/// report.json), or several compared, written to `out` (default `runs/compare`).
pub fn command(runs: &[PathBuf], out: Option<&Path>, force: bool) -> anyhow::Result<()> {
    let reports = runs
        .iter()
        .map(|r| Ok((r.display().to_string(), Report::read(r)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let [(_, r)] = &reports[..] {
        if out.is_some() {
            bail!(
                "--out is where several runs are compared: with one run, its own report is redrawn in place"
            );
        }
        // One run: its table, and its report.md and charts drawn again from report.json,
        // unless a recipe is running in the folder (it redraws them itself).
        match crate::run_folder::RunFolder::lock(&runs[0]) {
            Ok(_folder) => r.draw(&runs[0])?,
            Err(e) => eprintln!("(report.md and plots not redrawn: {e:#})"),
        }
        println!("{}", r.table());
        return Ok(());
    }
    let (table, chart) = compare(&reports);
    let out = out.map_or_else(|| PathBuf::from("runs/compare"), Path::to_path_buf);
    for name in ["compare.md", "compare.svg"] {
        crate::run_folder::claim_output(&out.join(name), &[], force, "--out")?;
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::atomic_file::write_new(
        &out.join("compare.md"),
        format!("# convpress runs compared\n\n{table}\n![accuracy against size](compare.svg)\n")
            .as_bytes(),
        force,
    )?;
    crate::atomic_file::write_new(&out.join("compare.svg"), chart.to_svg().as_bytes(), force)?;
    println!("{table}");
    println!("wrote {} and compare.svg", out.join("compare.md").display());
    Ok(())
}
