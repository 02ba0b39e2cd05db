//! Quantization sensitivity: test accuracy with one conv or linear layer at a time quantized
//! to each bit width by post-training quantization, every other layer in float, run on the
//! int8 runtime; and per-layer bit widths read off those curves for an allowed accuracy drop,
//! for `convpress quantize --targets`. It is the pruning sensitivity analysis
//! ([`super::sensitivity`], Han et al. 2015, Fig. 5) with bit widths for sparsities: the
//! question behind mixed-precision searches such as HAQ (Wang et al. 2019) and HAWQ (Dong et
//! al. 2019), answered here by measurement, one layer at a time. As with pruning, the drops
//! of several layers quantized together add up: the widths are a starting point (for PTQ, or
//! for QAT, which recovers much of it), not a promise about the combined model.

use super::ptq::{PtqSettings, quantize_model};
use super::quantize::{Calibration, check_bits};
use crate::checkpoint::Loaded;
use crate::data::ImageSet;
use crate::runtime::model::{SparseModel, evaluate};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Bit widths tested when none are given.
pub const DEFAULT_BITS: [u32; 5] = [8, 6, 4, 3, 2];

/// Accuracy and loss with one layer quantized to `bits`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitPoint {
    pub bits: u32,
    /// Fraction of test images classified correctly (0..1).
    pub accuracy: f64,
    pub loss: f64,
}

/// One layer's curve, widest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitCurve {
    /// The layer's path in the model as given (before batch norms are folded).
    pub layer: String,
    /// `conv2d` or `linear`.
    pub kind: String,
    pub points: Vec<BitPoint>,
}

/// A whole analysis: the float model's accuracy on the runtime and one curve per layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitSensitivity {
    pub model: String,
    pub test_images: usize,
    pub calibration_images: usize,
    pub baseline_accuracy: f64,
    pub baseline_loss: f64,
    /// Widest first.
    pub bits: Vec<u32>,
    pub layers: Vec<BitCurve>,
}

/// The widths to test, each in 2..=8, widest first, without repeats.
pub fn check_widths(bits: &[u32]) -> Result<Vec<u32>, String> {
    if bits.is_empty() {
        return Err("no bit widths to test".into());
    }
    for &b in bits {
        check_bits("bits", b)?;
    }
    let mut v = bits.to_vec();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v.dedup();
    Ok(v)
}

/// Quantizes each of `layers` (`(path, kind)`, paths of `float`'s conv and linear layers)
/// alone to each of `bits` with `calibration` (ranges calibrated on `calibration_set`), and
/// evaluates the result on the int8 runtime on the preprocessed `test` set. `tick` is called
/// after every evaluation (for a progress bar).
#[allow(clippy::too_many_arguments)]
pub fn analyse(
    float: &Loaded,
    layers: &[(String, String)],
    bits: &[u32],
    calibration: Calibration,
    calibration_set: &ImageSet,
    test: &ImageSet,
    batch: usize,
    mut tick: impl FnMut(),
) -> Result<BitSensitivity, String> {
    let bits = check_widths(bits)?;
    if layers.is_empty() {
        return Err("no conv or linear layer to analyse".into());
    }
    if calibration_set.n == 0 || test.n == 0 {
        return Err("calibration and test sets must not be empty".into());
    }
    let runtime = SparseModel::from_loaded(float)?;
    let (baseline_loss, baseline_accuracy) = evaluate(&runtime, test, batch);
    tick();
    // Every conv and linear layer of the model, analysed or not: all but one stay in float.
    let weighted: Vec<String> = float
        .arch
        .layer_stats()
        .into_iter()
        .filter(|s| matches!(s.kind, "conv2d" | "linear"))
        .map(|s| s.path)
        .collect();
    let mut curves = Vec::with_capacity(layers.len());
    for (layer, kind) in layers {
        if !weighted.contains(layer) {
            return Err(format!(
                "{layer} is not a conv or linear layer of the model"
            ));
        }
        let mut points = Vec::with_capacity(bits.len());
        for &b in &bits {
            // This layer at `b` bits, every other one in float.
            let layer_bits: BTreeMap<String, Option<u32>> = weighted
                .iter()
                .map(|p| (p.clone(), (p == layer).then_some(b)))
                .collect();
            let settings = PtqSettings {
                bits: b,
                calibration,
                layer_bits,
                weight_bits: None,
            };
            let q = quantize_model(float, &settings, calibration_set)
                .map_err(|e| format!("{layer} at {b} bits: {e}"))?;
            let model = SparseModel::from_loaded(&q.model)?;
            let (loss, accuracy) = evaluate(&model, test, batch);
            points.push(BitPoint {
                bits: b,
                accuracy,
                loss,
            });
            tick();
        }
        curves.push(BitCurve {
            layer: layer.clone(),
            kind: kind.clone(),
            points,
        });
    }
    Ok(BitSensitivity {
        model: float.arch.name.clone(),
        test_images: test.n,
        calibration_images: calibration_set.n,
        baseline_accuracy,
        baseline_loss,
        bits,
        layers: curves,
    })
}

/// A layer's chosen width (`None`: kept in float) and what it cost alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitTarget {
    pub layer: String,
    pub bits: Option<u32>,
    pub accuracy: f64,
    /// Accuracy lost against the float model, in percentage points.
    pub drop_points: f64,
}

/// For each layer, the narrowest tested width reached before the first one whose accuracy
/// drop exceeds `max_drop_points`, walking from the widest down (as
/// [`super::sensitivity::derive_targets`] walks sparsities up: a lucky narrow width past one
/// that already failed is not chosen). A layer whose widest width already fails stays in float.
pub fn derive_bits(s: &BitSensitivity, max_drop_points: f64) -> Vec<BitTarget> {
    let drop = |acc: f64| 100.0 * (s.baseline_accuracy - acc);
    s.layers
        .iter()
        .map(|c| {
            let mut points = c.points.clone();
            points.sort_by_key(|p| std::cmp::Reverse(p.bits));
            let chosen = points
                .iter()
                .take_while(|p| drop(p.accuracy) <= max_drop_points + 1e-9)
                .last();
            match chosen {
                Some(p) => BitTarget {
                    layer: c.layer.clone(),
                    bits: Some(p.bits),
                    accuracy: p.accuracy,
                    drop_points: drop(p.accuracy),
                },
                None => BitTarget {
                    layer: c.layer.clone(),
                    bits: None,
                    accuracy: s.baseline_accuracy,
                    drop_points: 0.0,
                },
            }
        })
        .collect()
}

/// Per-layer bit widths that `convpress quantize --targets` (and a `quantize` or `qat` stage's
/// `targets` key) reads: `null` keeps a layer in float. Only `layer_bits` is required, so a
/// hand-written `{"layer_bits": {"layers.0": 8, "layers.5": 4}}` works too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitTargetsFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_drop_points: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_images: Option<usize>,
    /// Layer path to bits (`null`: float).
    pub layer_bits: BTreeMap<String, Option<u32>>,
}

impl BitTargetsFile {
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: BitTargetsFile = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{}: not a bit-width targets file ({e}); expected {{\"layer_bits\": {{\"layers.0\": 8}}}}",
                path.display()
            )
        })?;
        for (layer, bits) in &file.layer_bits {
            if let Some(b) = bits {
                check_bits(&format!("{}: {layer}", path.display()), *b)?;
            }
        }
        Ok(file)
    }
}

impl BitSensitivity {
    /// One line per (layer, bits): `layer,kind,bits,accuracy,loss`.
    pub fn to_csv(&self) -> String {
        let mut out = String::from("layer,kind,bits,accuracy,loss\n");
        for c in &self.layers {
            for p in &c.points {
                out.push_str(&format!(
                    "{},{},{},{:.6},{:.6}\n",
                    c.layer, c.kind, p.bits, p.accuracy, p.loss
                ));
            }
        }
        out
    }

    /// Test accuracy (%) per layer (rows) and width (columns).
    pub fn table(&self) -> String {
        let mut out = format!("{:<22} {:<7}", "layer", "kind");
        for b in &self.bits {
            out.push_str(&format!(" {:>7}", format!("{b} bits")));
        }
        out.push('\n');
        for c in &self.layers {
            out.push_str(&format!("{:<22} {:<7}", c.layer, c.kind));
            for b in &self.bits {
                match c.points.iter().find(|p| p.bits == *b) {
                    Some(p) => out.push_str(&format!(" {:>7.2}", 100.0 * p.accuracy)),
                    None => out.push_str(&format!(" {:>7}", "-")),
                }
            }
            out.push('\n');
        }
        out
    }

    /// The curves as a line chart: accuracy (%) against bits, one line per layer, the float
    /// accuracy as a guide line.
    pub fn chart(&self, title: &str) -> crate::plot::LineChart {
        let (lo, hi) = (
            *self.bits.last().unwrap_or(&2) as f64,
            *self.bits.first().unwrap_or(&8) as f64,
        );
        crate::plot::LineChart {
            title: title.to_string(),
            x_label: "bits of this layer's weights and input (the others in float)".into(),
            y_label: "test accuracy (%)".into(),
            series: self
                .layers
                .iter()
                .map(|c| crate::plot::Series {
                    name: format!("{} {}", c.layer, c.kind),
                    points: c
                        .points
                        .iter()
                        .map(|p| (p.bits as f64, 100.0 * p.accuracy))
                        .collect(),
                })
                .collect(),
            x_range: Some((lo, hi)),
            y_range: None,
            guides: vec![(
                100.0 * self.baseline_accuracy,
                format!("float {:.2}%", 100.0 * self.baseline_accuracy),
            )],
            ..Default::default()
        }
    }
}

/// `convpress sensitivity --bits`: the analysis of one float checkpoint, its table, and its
/// files in `args.out` (nothing is written if any argument is wrong).
pub fn command(args: &super::sensitivity::SensitivityArgs) -> anyhow::Result<()> {
    use super::sensitivity::{check_common, progress, write_analysis, write_file};
    use crate::checkpoint;
    use anyhow::bail;
    check_common(args)?;
    if args.calibrate == 0 {
        bail!("--calibrate must be at least 1 image: calibration on an empty set has no range");
    }
    let bits = check_widths(&args.bits).map_err(|e| anyhow::anyhow!("--bits: {e}"))?;
    let float = checkpoint::read(&args.checkpoint)?;
    if float.quant.is_some() {
        bail!(
            "{}: the model is already quantized: analyse its float checkpoint",
            args.checkpoint.display()
        );
    }
    let all: Vec<(String, String)> = float
        .arch
        .layer_stats()
        .into_iter()
        .filter(|s| matches!(s.kind, "conv2d" | "linear"))
        .map(|s| (s.path, s.kind.to_string()))
        .collect();
    let layers: Vec<(String, String)> = if args.layers.is_empty() {
        all.clone()
    } else {
        let mut chosen = Vec::new();
        for name in &args.layers {
            match all.iter().find(|(p, _)| p == name) {
                Some(l) => chosen.push(l.clone()),
                None => bail!(
                    "--layers: {name} is not a conv or linear layer of the model (those are {})",
                    all.iter()
                        .map(|(p, _)| p.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        chosen
    };
    let meta = &float.meta;
    let data_dir = meta.data_dir_or(args.data_dir.as_deref());
    let test = checkpoint::test_split(&args.checkpoint, &float.arch, meta, &data_dir, args.limit)?;
    let splits = crate::data::load(meta.dataset, &data_dir)?;
    let calibration_set = meta
        .preprocess
        .try_apply(&splits.train.take(args.calibrate))?;
    let _out = crate::run_folder::RunFolder::open(
        &args.out,
        crate::run_folder::Reuse::from_flags(false, args.force),
        "--out",
        false,
        &[&args.checkpoint, &data_dir],
    )?;
    let evaluations = layers.len() * bits.len() + 1;
    eprintln!(
        "quantization sensitivity of {} ({}): {} layers x {} widths on {} test images, ranges from {} training images",
        args.checkpoint.display(),
        float.arch.name,
        layers.len(),
        bits.len(),
        test.n,
        calibration_set.n
    );
    let bar = progress(evaluations, args.no_progress);
    let started = std::time::Instant::now();
    let result = analyse(
        &float,
        &layers,
        &bits,
        Calibration::MinMax,
        &calibration_set,
        &test,
        args.batch_size,
        || bar.inc(1),
    )
    .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let title = args.title.clone().unwrap_or_else(|| {
        format!(
            "Quantization sensitivity: {} on {} ({} test images)",
            result.model,
            meta.dataset.name(),
            result.test_images
        )
    });
    write_analysis(
        &args.out,
        "bit-sensitivity",
        &args.checkpoint,
        &result,
        &result.to_csv(),
        &result.chart(&title).to_svg(),
    )?;
    println!(
        "{} on {}, {} test images, float {:.2}% (on the runtime); test accuracy (%) with one layer quantized to each width, the rest in float ({:.0} s):",
        result.model,
        meta.dataset.name(),
        result.test_images,
        100.0 * result.baseline_accuracy,
        seconds
    );
    print!("{}", result.table());
    if let Some(max_drop) = args.max_drop {
        let targets = derive_bits(&result, max_drop);
        println!(
            "per-layer widths: the narrowest before the drop first exceeds {max_drop} points (each layer quantized alone):"
        );
        println!(
            "{:<22} {:>6} {:>9} {:>8}",
            "layer", "bits", "accuracy", "drop"
        );
        for t in &targets {
            println!(
                "{:<22} {:>6} {:>8.2}% {:>8.2}",
                t.layer,
                t.bits.map_or("float".to_string(), |b| b.to_string()),
                100.0 * t.accuracy,
                t.drop_points
            );
        }
        let file = BitTargetsFile {
            checkpoint: Some(args.checkpoint.display().to_string()),
            max_drop_points: Some(max_drop),
            baseline_accuracy: Some(result.baseline_accuracy),
            test_images: Some(result.test_images),
            layer_bits: targets.iter().map(|t| (t.layer.clone(), t.bits)).collect(),
        };
        write_file(
            &args.out,
            "bits.json",
            serde_json::to_string_pretty(&file)?.as_bytes(),
        )?;
        println!(
            "convpress quantize --checkpoint {} --targets {}",
            args.checkpoint.display(),
            args.out.join("bits.json").display()
        );
    }
    println!(
        "wrote bit-sensitivity.json, bit-sensitivity.csv, bit-sensitivity.svg{} to {}",
        if args.max_drop.is_some() {
            ", bits.json"
        } else {
            ""
        },
        args.out.display()
    );
    Ok(())
}
