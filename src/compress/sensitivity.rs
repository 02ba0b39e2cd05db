//! Pruning sensitivity analysis: how test accuracy falls as one layer at a time is pruned by
//! magnitude, with no retraining (Han et al. 2015, "Learning both Weights and Connections",
//! Fig. 5; Intel Distiller's `sensitivity_analysis`), and per-layer sparsity targets read off
//! those curves for an allowed accuracy drop.
//!
//! Han et al. chose each layer's pruning threshold from such curves: the most sensitive layer
//! (the first convolution) is pruned least. Curves are measured one layer at a time, so the
//! drops of several layers pruned together add up; the targets are a starting point for
//! pruning with retraining (`convpress prune --targets`), not a promise about the combined
//! model.

use super::prune::level_mask;
use crate::checkpoint::{map_params_by_path, named_tensors};
use crate::data::ImageSet;
use crate::models::Network;
use crate::train::evaluate;
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Sparsities tested when none are given: dense, then ever finer steps where curves bend.
pub const DEFAULT_SPARSITIES: [f64; 9] = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98];

/// A prunable weight tensor: a conv or linear weight (rank >= 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunableWeight {
    /// The layer's path (`layers.2`): what `--layers` and `--layer-sparsity` name.
    pub layer: String,
    /// The parameter's path (`layers.2.weight`).
    pub param: String,
    /// `conv` (rank 4) or `linear`: Han et al. found conv layers the more sensitive.
    pub kind: String,
    pub weights: usize,
}

/// The prunable weights among `(path, shape)` pairs (in their order): those named `*weight`
/// with at least two dimensions, as [`super::prune::PruneHook`] chooses them.
pub fn prunable_weights<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> Vec<PrunableWeight> {
    tensors
        .into_iter()
        .filter(|(path, shape)| path.ends_with("weight") && shape.len() >= 2)
        .map(|(path, shape)| PrunableWeight {
            layer: path
                .strip_suffix(".weight")
                .unwrap_or(path)
                .trim_end_matches('.')
                .to_string(),
            param: path.to_string(),
            kind: if shape.len() == 4 { "conv" } else { "linear" }.to_string(),
            weights: shape.iter().product(),
        })
        .collect()
}

/// Whether parameter path `param` lies under layer path `layer`.
fn under(param: &str, layer: &str) -> bool {
    param == layer || param.starts_with(&format!("{layer}."))
}

/// The weights under the requested layer paths (all of them if none), in model order. A path
/// that names no prunable weight is an error listing the ones that exist.
pub fn select_layers(
    all: &[PrunableWeight],
    requested: &[String],
) -> Result<Vec<PrunableWeight>, String> {
    for r in requested {
        if !all.iter().any(|w| under(&w.param, r)) {
            let known: Vec<&str> = all.iter().map(|w| w.layer.as_str()).collect();
            return Err(format!(
                "unknown layer {r:?}: the prunable layers are {}",
                known.join(", ")
            ));
        }
    }
    Ok(all
        .iter()
        .filter(|w| requested.is_empty() || requested.iter().any(|r| under(&w.param, r)))
        .cloned()
        .collect())
}

/// Sparsities to test, sorted and without repeats; refuses an empty list and values outside
/// `[0, 1)` (pruning every weight is not a sparsity level).
pub fn check_sparsities(sparsities: &[f64]) -> Result<Vec<f64>, String> {
    if sparsities.is_empty() {
        return Err("the list of sparsities is empty".into());
    }
    if let Some(s) = sparsities.iter().find(|s| !(0.0..1.0).contains(*s)) {
        return Err(format!("sparsity must be in [0, 1), got {s}"));
    }
    let mut v = sparsities.to_vec();
    v.sort_by(f64::total_cmp);
    v.dedup();
    Ok(v)
}

/// Accuracy and loss with one layer pruned to `sparsity`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub sparsity: f64,
    /// Fraction of test images classified correctly (0..1).
    pub accuracy: f64,
    pub loss: f64,
}

/// One layer's curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCurve {
    #[serde(flatten)]
    pub weight: PrunableWeight,
    /// In increasing sparsity.
    pub points: Vec<Point>,
}

/// A whole analysis: the unpruned model's accuracy and one curve per layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sensitivity {
    pub model: String,
    pub test_images: usize,
    pub baseline_accuracy: f64,
    pub baseline_loss: f64,
    pub sparsities: Vec<f64>,
    pub layers: Vec<LayerCurve>,
}

/// Prunes each of `layers` alone to each of `sparsities` (level pruner: the smallest
/// magnitudes go) and evaluates `model` on the preprocessed `test` set. `tick` is called after
/// every evaluation (for a progress bar). Sparsity 0 keeps every weight, so its point is the
/// unpruned model's, evaluated once.
pub fn analyse(
    model: &Network,
    test: &ImageSet,
    layers: &[PrunableWeight],
    sparsities: &[f64],
    batch: usize,
    device: &Device,
    mut tick: impl FnMut(),
) -> Result<Sensitivity, String> {
    let sparsities = check_sparsities(sparsities)?;
    let (baseline_loss, baseline_accuracy) = evaluate(model, test, batch, device);
    let values: BTreeMap<String, Vec<f32>> = named_tensors(model)
        .into_iter()
        .filter(|(p, _, _)| layers.iter().any(|w| &w.param == p))
        .map(|(p, _, d)| (p, d.try_to_vec().expect("f32 weights")))
        .collect();
    let mut curves = Vec::with_capacity(layers.len());
    for w in layers {
        let flat = values
            .get(&w.param)
            .ok_or_else(|| format!("the model has no parameter {}", w.param))?;
        let mut points = Vec::with_capacity(sparsities.len());
        for &s in &sparsities {
            let (loss, accuracy) = if s == 0.0 {
                (baseline_loss, baseline_accuracy)
            } else {
                let keep: Vec<f32> = level_mask(flat, s)?
                    .into_iter()
                    .map(|k| k as u8 as f32)
                    .collect();
                let n = keep.len();
                let mask = Tensor::<1>::from_data(TensorData::new(keep, [n]), device);
                let pruned = map_params_by_path(model.clone(), |path, t| {
                    (path == w.param).then(|| {
                        let m = mask.clone().to_device(&t.device());
                        t * m
                    })
                });
                evaluate(&pruned, test, batch, device)
            };
            points.push(Point {
                sparsity: s,
                accuracy,
                loss,
            });
            tick();
        }
        curves.push(LayerCurve {
            weight: w.clone(),
            points,
        });
    }
    Ok(Sensitivity {
        model: model.arch.name.clone(),
        test_images: test.n,
        baseline_accuracy,
        baseline_loss,
        sparsities,
        layers: curves,
    })
}

/// A layer's chosen sparsity and what it cost when that layer alone was pruned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub layer: String,
    pub sparsity: f64,
    pub accuracy: f64,
    /// Accuracy lost against the unpruned model, in percentage points.
    pub drop_points: f64,
}

/// For each layer, the largest tested sparsity reached before the first one whose accuracy
/// drop exceeds `max_drop_points` (percentage points below the unpruned model). Stopping at
/// the first failure, rather than taking any passing point, keeps a noisy recovery at a high
/// sparsity (a few lucky test images) from being chosen past a level that already failed.
/// A layer whose smallest tested sparsity already fails gets 0 (left dense).
pub fn derive_targets(s: &Sensitivity, max_drop_points: f64) -> Vec<Target> {
    let drop = |acc: f64| 100.0 * (s.baseline_accuracy - acc);
    s.layers
        .iter()
        .map(|c| {
            let mut points = c.points.clone();
            points.sort_by(|a, b| a.sparsity.total_cmp(&b.sparsity));
            let chosen = points
                .iter()
                .take_while(|p| drop(p.accuracy) <= max_drop_points + 1e-9)
                .last();
            match chosen {
                Some(p) => Target {
                    layer: c.weight.layer.clone(),
                    sparsity: p.sparsity,
                    accuracy: p.accuracy,
                    drop_points: drop(p.accuracy),
                },
                None => Target {
                    layer: c.weight.layer.clone(),
                    sparsity: 0.0,
                    accuracy: s.baseline_accuracy,
                    drop_points: 0.0,
                },
            }
        })
        .collect()
}

/// Per-layer sparsities in a file `convpress prune --targets` reads. Only `layer_sparsity` is
/// required, so a hand-written `{"layer_sparsity": {"layers.2": 0.9}}` works too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetsFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_drop_points: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_images: Option<usize>,
    /// Layer path to final sparsity.
    pub layer_sparsity: BTreeMap<String, f64>,
}

impl TargetsFile {
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| {
            format!(
                "{}: not a targets file ({e}); expected {{\"layer_sparsity\": {{\"layers.2\": 0.9}}}}",
                path.display()
            )
        })
    }
}

impl Sensitivity {
    /// One line per (layer, sparsity): `layer,param,kind,weights,sparsity,accuracy,loss`.
    pub fn to_csv(&self) -> String {
        let mut out = String::from("layer,param,kind,weights,sparsity,accuracy,loss\n");
        for c in &self.layers {
            for p in &c.points {
                out.push_str(&format!(
                    "{},{},{},{},{},{:.6},{:.6}\n",
                    c.weight.layer,
                    c.weight.param,
                    c.weight.kind,
                    c.weight.weights,
                    p.sparsity,
                    p.accuracy,
                    p.loss
                ));
            }
        }
        out
    }

    /// Test accuracy (%) per layer (rows) and sparsity (columns).
    pub fn table(&self) -> String {
        let mut out = format!("{:<22} {:<6} {:>9}", "layer", "kind", "weights");
        for s in &self.sparsities {
            out.push_str(&format!(" {:>7}", format!("{:.0}%", 100.0 * s)));
        }
        out.push('\n');
        for c in &self.layers {
            out.push_str(&format!(
                "{:<22} {:<6} {:>9}",
                c.weight.layer, c.weight.kind, c.weight.weights
            ));
            for s in &self.sparsities {
                match c.points.iter().find(|p| p.sparsity == *s) {
                    Some(p) => out.push_str(&format!(" {:>7.2}", 100.0 * p.accuracy)),
                    None => out.push_str(&format!(" {:>7}", "-")),
                }
            }
            out.push('\n');
        }
        out
    }

    /// The curves as a line chart: accuracy (%) against sparsity (%), one line per layer, the
    /// unpruned accuracy as a guide line.
    pub fn chart(&self, title: &str) -> crate::plot::LineChart {
        crate::plot::LineChart {
            title: title.to_string(),
            x_label: "weights pruned in this layer only (%)".into(),
            y_label: "test accuracy (%)".into(),
            series: self
                .layers
                .iter()
                .map(|c| crate::plot::Series {
                    name: format!(
                        "{} {} ({} weights)",
                        c.weight.layer, c.weight.kind, c.weight.weights
                    ),
                    points: c
                        .points
                        .iter()
                        .map(|p| (100.0 * p.sparsity, 100.0 * p.accuracy))
                        .collect(),
                })
                .collect(),
            x_range: Some((0.0, 100.0)),
            y_range: None,
            guides: vec![(
                100.0 * self.baseline_accuracy,
                format!("unpruned {:.2}%", 100.0 * self.baseline_accuracy),
            )],
            ..Default::default()
        }
    }
}

/// `convpress sensitivity`'s flags.
#[derive(clap::Args, Debug)]
pub struct SensitivityArgs {
    /// The trained model to analyse.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Sparsities to test per layer, comma separated, each in [0, 1).
    #[arg(
        long,
        value_delimiter = ',',
        allow_negative_numbers = true,
        default_values_t = DEFAULT_SPARSITIES
    )]
    pub sparsities: Vec<f64>,
    /// Layers to analyse by path (`layers.5`); all conv and linear layers if none.
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<String>,
    /// Quantization instead of pruning: the bit widths (2 to 8) to quantize each layer to,
    /// alone, by post-training quantization run on the int8 runtime; with --max-drop, writes
    /// `bits.json` for `quantize --targets`.
    #[arg(long, value_delimiter = ',', conflicts_with = "sparsities")]
    pub bits: Vec<u32>,
    /// With --bits: training images the activation ranges are calibrated on (min-max).
    #[arg(long, default_value_t = 1024, requires = "bits")]
    pub calibrate: usize,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Allowed accuracy drop in percentage points: pick each layer's largest sparsity within
    /// it, print the targets and write them to `targets.json` for `prune --targets`.
    #[arg(long, allow_negative_numbers = true)]
    pub max_drop: Option<f64>,
    /// Folder for sensitivity.json, sensitivity.csv, sensitivity.svg (and targets.json); it
    /// must be new or empty.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace what --out holds (a folder convpress made) instead of refusing.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Chart title (default: the model and the number of test images).
    #[arg(long)]
    pub title: Option<String>,
    #[arg(long)]
    pub no_progress: bool,
}

/// The flags both analyses (pruning, and quantization with `--bits`) check alike, before any
/// work.
pub(super) fn check_common(args: &SensitivityArgs) -> anyhow::Result<()> {
    use anyhow::bail;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if let Some(d) = args.max_drop
        && !(d.is_finite() && d >= 0.0)
    {
        bail!("--max-drop must be a non-negative number of percentage points, got {d}");
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out {} exists and is not a folder", args.out.display());
    }
    Ok(())
}

/// A bar of `evaluations` steps on a terminal; hidden elsewhere or with `--no-progress`.
pub(super) fn progress(evaluations: usize, no_progress: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() || no_progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(evaluations as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "sensitivity [{bar:30}] {pos}/{len} evaluations  {elapsed} elapsed  eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Writes `bytes` to `name` in `dir` (created if need be), atomically.
pub(super) fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(crate::atomic_file::write_atomic(&dir.join(name), bytes)?)
}

/// Writes an analysis into `dir`: `{stem}.json` (the file it analysed, then the result's
/// fields), `{stem}.csv` and `{stem}.svg`.
pub(super) fn write_analysis<T: Serialize>(
    dir: &Path,
    stem: &str,
    checkpoint: &Path,
    result: &T,
    csv: &str,
    svg: &str,
) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct Report<'a, T> {
        checkpoint: String,
        #[serde(flatten)]
        result: &'a T,
    }
    let json = Report {
        checkpoint: checkpoint.display().to_string(),
        result,
    };
    write_file(
        dir,
        &format!("{stem}.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    write_file(dir, &format!("{stem}.csv"), csv.as_bytes())?;
    write_file(dir, &format!("{stem}.svg"), svg.as_bytes())
}

/// `convpress sensitivity`: the analysis of one checkpoint, its table, and its files in
/// `args.out` (nothing is written if any argument is wrong).
pub fn command(args: &SensitivityArgs, device: Device) -> anyhow::Result<()> {
    if !args.bits.is_empty() {
        return super::bit_sensitivity::command(args);
    }
    use crate::checkpoint;
    // Every argument is checked before the (long) evaluations, and nothing is written if any
    // is wrong.
    check_common(args)?;
    let sparsities =
        check_sparsities(&args.sparsities).map_err(|e| anyhow::anyhow!("--sparsities: {e}"))?;
    let (model, meta) = checkpoint::load(&args.checkpoint, &device)?;
    let shapes: Vec<(String, Vec<usize>)> = checkpoint::named_tensors(&model)
        .into_iter()
        .map(|(p, _, d)| (p, d.shape().to_vec()))
        .collect();
    let all = prunable_weights(shapes.iter().map(|(p, s)| (p.as_str(), s.as_slice())));
    let layers = select_layers(&all, &args.layers).map_err(|e| anyhow::anyhow!("--layers: {e}"))?;
    let test = checkpoint::test_split(
        &args.checkpoint,
        &model.arch,
        &meta,
        &meta.data_dir_or(args.data_dir.as_deref()),
        args.limit,
    )?;
    // Taken now (every input is good), held until the files are written.
    let data_dir = meta.data_dir_or(args.data_dir.as_deref());
    let _out = crate::run_folder::RunFolder::open(
        &args.out,
        crate::run_folder::Reuse::from_flags(false, args.force),
        "--out",
        false,
        &[&args.checkpoint, &data_dir],
    )?;
    let evaluations = layers.len() * sparsities.iter().filter(|&&s| s > 0.0).count() + 1;
    eprintln!(
        "sensitivity of {} ({}): {} layers x {} sparsities on {} test images",
        args.checkpoint.display(),
        model.arch.name,
        layers.len(),
        sparsities.len(),
        test.n
    );
    let bar = progress(evaluations, args.no_progress);
    bar.inc(1); // the unpruned model's evaluation comes first
    let started = std::time::Instant::now();
    let result = analyse(
        &model,
        &test,
        &layers,
        &sparsities,
        args.batch_size,
        &device,
        || bar.inc(1),
    )
    .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    let title = args.title.clone().unwrap_or_else(|| {
        format!(
            "Pruning sensitivity: {} on {} ({} test images)",
            result.model,
            meta.dataset.name(),
            result.test_images
        )
    });
    write_analysis(
        &args.out,
        "sensitivity",
        &args.checkpoint,
        &result,
        &result.to_csv(),
        &result.chart(&title).to_svg(),
    )?;
    let write = |name: &str, bytes: &[u8]| write_file(&args.out, name, bytes);

    println!(
        "{} on {}, {} test images, unpruned {:.2}%; test accuracy (%) with one layer pruned to each sparsity, no retraining ({:.0} s):",
        result.model,
        meta.dataset.name(),
        result.test_images,
        100.0 * result.baseline_accuracy,
        seconds
    );
    print!("{}", result.table());
    if let Some(max_drop) = args.max_drop {
        let targets = derive_targets(&result, max_drop);
        println!(
            "per-layer targets: the largest sparsity before the drop first exceeds {max_drop} points (each layer pruned alone):"
        );
        println!(
            "{:<22} {:>9} {:>9} {:>8}",
            "layer", "sparsity", "accuracy", "drop"
        );
        for t in &targets {
            println!(
                "{:<22} {:>8.0}% {:>8.2}% {:>8.2}",
                t.layer,
                100.0 * t.sparsity,
                100.0 * t.accuracy,
                t.drop_points
            );
        }
        let flag: Vec<String> = targets
            .iter()
            .map(|t| format!("{}={}", t.layer, t.sparsity))
            .collect();
        println!("--layer-sparsity {}", flag.join(","));
        let file = TargetsFile {
            checkpoint: Some(args.checkpoint.display().to_string()),
            max_drop_points: Some(max_drop),
            baseline_accuracy: Some(result.baseline_accuracy),
            test_images: Some(result.test_images),
            layer_sparsity: targets
                .iter()
                .map(|t| (t.layer.clone(), t.sparsity))
                .collect(),
        };
        write(
            "targets.json",
            serde_json::to_string_pretty(&file)?.as_bytes(),
        )?;
    }
    println!(
        "wrote sensitivity.json, sensitivity.csv, sensitivity.svg{} to {}",
        if args.max_drop.is_some() {
            ", targets.json"
        } else {
            ""
        },
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(layer: &str, points: &[(f64, f64)]) -> LayerCurve {
        LayerCurve {
            weight: PrunableWeight {
                layer: layer.into(),
                param: format!("{layer}.weight"),
                kind: "conv".into(),
                weights: 100,
            },
            points: points
                .iter()
                .map(|&(sparsity, accuracy)| Point {
                    sparsity,
                    accuracy,
                    loss: 0.0,
                })
                .collect(),
        }
    }

    fn table() -> Sensitivity {
        Sensitivity {
            model: "m".into(),
            test_images: 10_000,
            baseline_accuracy: 0.99,
            baseline_loss: 0.0,
            sparsities: vec![0.0, 0.5, 0.8, 0.9, 0.95],
            layers: vec![
                // Falls steadily: 0.5 costs 0.3 points, 0.8 costs 0.9.
                curve(
                    "conv1",
                    &[
                        (0.0, 0.99),
                        (0.5, 0.987),
                        (0.8, 0.981),
                        (0.9, 0.95),
                        (0.95, 0.80),
                    ],
                ),
                // Flat until 0.95 (exactly 0.5 points at 0.9).
                curve(
                    "fc1",
                    &[
                        (0.0, 0.99),
                        (0.5, 0.9905),
                        (0.8, 0.989),
                        (0.9, 0.985),
                        (0.95, 0.97),
                    ],
                ),
                // Fails at 0.5 but "recovers" by noise at 0.8: must not be chosen.
                curve(
                    "conv2",
                    &[
                        (0.0, 0.99),
                        (0.5, 0.98),
                        (0.8, 0.99),
                        (0.9, 0.90),
                        (0.95, 0.5),
                    ],
                ),
                // Points out of order in the file are sorted first.
                curve("fc2", &[(0.95, 0.99), (0.0, 0.99), (0.9, 0.99)]),
            ],
        }
    }

    #[test]
    fn targets_are_the_last_sparsity_within_budget() {
        let t = derive_targets(&table(), 0.5);
        let got: Vec<(&str, f64)> = t.iter().map(|t| (t.layer.as_str(), t.sparsity)).collect();
        assert_eq!(
            got,
            vec![("conv1", 0.5), ("fc1", 0.9), ("conv2", 0.0), ("fc2", 0.95)]
        );
        assert!((t[0].drop_points - 0.3).abs() < 1e-9);
        assert!((t[1].accuracy - 0.985).abs() < 1e-12);
        // A wider budget moves each target along its curve.
        let wide = derive_targets(&table(), 1.0);
        let s: Vec<f64> = wide.iter().map(|t| t.sparsity).collect();
        assert_eq!(s, vec![0.8, 0.9, 0.8, 0.95]);
        // No budget at all keeps only the levels that cost nothing.
        let none = derive_targets(&table(), 0.0);
        let s: Vec<f64> = none.iter().map(|t| t.sparsity).collect();
        assert_eq!(s, vec![0.0, 0.5, 0.0, 0.95]);
    }

    #[test]
    fn a_layer_failing_at_its_first_point_stays_dense() {
        let mut s = table();
        s.layers = vec![curve("conv1", &[(0.5, 0.90), (0.9, 0.5)])];
        let t = derive_targets(&s, 1.0);
        assert_eq!(t[0].sparsity, 0.0);
        assert_eq!(t[0].accuracy, 0.99);
    }

    #[test]
    fn sparsity_lists_are_checked_sorted_and_deduplicated() {
        assert_eq!(
            check_sparsities(&[0.9, 0.0, 0.5, 0.9]).unwrap(),
            vec![0.0, 0.5, 0.9]
        );
        assert!(check_sparsities(&[]).unwrap_err().contains("empty"));
        assert!(
            check_sparsities(&[0.5, 1.0])
                .unwrap_err()
                .contains("[0, 1)")
        );
        assert!(check_sparsities(&[-0.1]).is_err());
        assert!(check_sparsities(&[f64::NAN]).is_err());
    }

    #[test]
    fn layers_are_chosen_by_path_and_unknown_ones_refused() {
        let shapes: Vec<(String, Vec<usize>)> = vec![
            ("layers.0.weight".into(), vec![20, 1, 5, 5]),
            ("layers.0.bias".into(), vec![20]),
            ("layers.12.weight".into(), vec![800, 500]),
            ("layers.1.body.0.weight".into(), vec![4, 4, 3, 3]),
            ("layers.1.body.1.weight".into(), vec![4]),
        ];
        let all = prunable_weights(shapes.iter().map(|(p, s)| (p.as_str(), s.as_slice())));
        let layers: Vec<&str> = all.iter().map(|w| w.layer.as_str()).collect();
        assert_eq!(layers, vec!["layers.0", "layers.12", "layers.1.body.0"]);
        assert_eq!(all[1].weights, 400_000);
        let kinds: Vec<&str> = all.iter().map(|w| w.kind.as_str()).collect();
        assert_eq!(kinds, vec!["conv", "linear", "conv"]);
        let one = select_layers(&all, &["layers.1".into()]).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].param, "layers.1.body.0.weight");
        assert_eq!(select_layers(&all, &[]).unwrap().len(), 3);
        let err = select_layers(&all, &["layers.9".into()]).unwrap_err();
        assert!(
            err.contains("layers.9") && err.contains("layers.12"),
            "{err}"
        );
    }

    #[test]
    fn targets_file_round_trips_and_accepts_the_bare_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, r#"{"layer_sparsity": {"layers.2": 0.9}}"#).unwrap();
        let t = TargetsFile::read(&path).unwrap();
        assert_eq!(t.layer_sparsity["layers.2"], 0.9);
        std::fs::write(&path, r#"{"layers.2": 0.9}"#).unwrap();
        assert!(
            TargetsFile::read(&path)
                .unwrap_err()
                .contains("layer_sparsity")
        );
    }
}
