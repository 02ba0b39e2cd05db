//! The `quantize` stage: post-training quantization (`compress::ptq`): batch norms folded,
//! activation ranges calibrated on training images, weights per output channel at `bits`
//! bits, written as a version-2 `.cpz` (codes packed at their width, a pruned model's zeros
//! stored sparsely) that `eval` runs on the int8 kernels. Layers can stay in float.

use crate::compress::ptq::{PtqSettings, quantize_model};
use crate::compress::quantize::{Calibration, check_bits};
use crate::models::{Arch, LayerSpec};
use crate::pipeline::layers::{LayerRules, weighted_layer_paths};
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage, State, required};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// How activation ranges are calibrated.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CalibrationKind {
    /// The smallest and largest value seen.
    MinMax,
    /// Clip at `--percentile` of the values seen.
    Percentile,
    /// The range with the least squared quantization error.
    Mse,
}

/// `convpress quantize`'s flags and the `quantize` stage's keys.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct QuantizeParams {
    /// Bits of weights and activations, 2 to 8.
    #[arg(long, default_value_t = 8)]
    pub bits: u32,
    /// Training images the activation ranges are calibrated on (the first N).
    #[arg(long, default_value_t = 1024)]
    pub calibrate: usize,
    #[arg(long, value_enum, default_value_t = CalibrationKind::MinMax)]
    pub calibration: CalibrationKind,
    /// The percentile that `--calibration percentile` clips at.
    #[arg(long, default_value_t = 99.99)]
    pub percentile: f64,
    /// Layers kept in float: `first`, `last` or layer paths and patterns, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub float_layers: Vec<String>,
    /// Bits of the weights, 2 to 8, where they differ from the activations' (`--bits`): 7 with
    /// `--bits 8` runs on the faster `vpmaddubsw` kernel on AVX2.
    #[arg(long)]
    pub weight_bits: Option<u32>,
    /// Per-layer bit widths from a file (`convpress sensitivity --bits ... --max-drop D`
    /// writes one: `bits.json`); `float-layers` and per-layer keys override it.
    #[arg(long)]
    pub targets: Option<PathBuf>,
}

impl Default for QuantizeParams {
    fn default() -> Self {
        table::clap_defaults()
    }
}

/// A per-layer override: `"layers.0" = { bits = 6 }` or `{ float = true }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerQuant {
    #[serde(default)]
    pub bits: Option<u32>,
    #[serde(default)]
    pub float: bool,
}

pub struct Quantize {
    pub params: QuantizeParams,
    pub layers: LayerRules<LayerQuant>,
    /// Where the file goes (default: `model.cpz` in the stage's folder).
    pub out: Option<PathBuf>,
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    Ok(Box::new(Quantize {
        params: t.params()?,
        layers: t.layers()?,
        out: None,
    }))
}

impl Quantize {
    /// The method's settings for `arch`: bits per weighted layer (`None`: float), checked.
    pub fn settings_for(&self, arch: &Arch) -> Result<PtqSettings, String> {
        let p = &self.params;
        check_bits("bits", p.bits)?;
        if p.calibrate == 0 {
            return Err(
                "calibrate must be at least 1 image: calibration on an empty set has no range"
                    .into(),
            );
        }
        let calibration = match p.calibration {
            CalibrationKind::MinMax => Calibration::MinMax,
            CalibrationKind::Mse => Calibration::Mse,
            CalibrationKind::Percentile => {
                if !(p.percentile > 50.0 && p.percentile <= 100.0) {
                    return Err(format!(
                        "percentile must be in (50, 100], got {}",
                        p.percentile
                    ));
                }
                Calibration::Percentile(p.percentile)
            }
        };
        let paths = weighted_layer_paths(arch);
        let mut layer_bits: BTreeMap<String, Option<u32>> = BTreeMap::new();
        if let Some(file) = &p.targets {
            let targets = crate::compress::bit_sensitivity::BitTargetsFile::read(file)?;
            for (layer, bits) in targets.layer_bits {
                if !paths.contains(&layer) {
                    return Err(format!(
                        "{}: {layer} is not a conv or linear layer of the model (those are {})",
                        file.display(),
                        paths.join(", ")
                    ));
                }
                layer_bits.insert(layer, bits);
            }
        }
        for name in &p.float_layers {
            let hits: Vec<String> = match name.as_str() {
                "first" => paths.first().cloned().into_iter().collect(),
                "last" => paths.last().cloned().into_iter().collect(),
                pattern => LayerRules(vec![(pattern.to_string(), ())])
                    .resolve(&paths)
                    .map_err(|e| format!("float-layers: {e}"))?
                    .into_keys()
                    .collect(),
            };
            for h in hits {
                layer_bits.insert(h, None);
            }
        }
        for (layer, rule) in self.layers.resolve(&paths)? {
            let bits = match (rule.float, rule.bits) {
                (true, Some(_)) => {
                    return Err(format!("{layer}: float = true and bits both given"));
                }
                (true, None) => None,
                (false, Some(b)) => {
                    check_bits(&format!("{layer}: bits"), b)?;
                    Some(b)
                }
                (false, None) => Some(p.bits),
            };
            layer_bits.insert(layer, bits);
        }
        if paths.iter().all(|p| layer_bits.get(p) == Some(&None)) {
            return Err(
                "every conv and linear layer is kept in float: there is nothing to quantize".into(),
            );
        }
        // What the int8 kernels cannot run must stay in float, said before any work.
        for (path, spec) in conv_specs(arch) {
            if let LayerSpec::Conv2d {
                groups, pad_extra, ..
            } = spec
                && (groups != 1 || pad_extra != [0, 0])
                && layer_bits.get(&path) != Some(&None)
            {
                return Err(format!(
                    "{path}: a grouped or asymmetrically padded convolution has no int8 kernel; keep it in float (float-layers {path})"
                ));
            }
        }
        if let Some(w) = p.weight_bits {
            check_bits("weight-bits", w)?;
        }
        Ok(PtqSettings {
            bits: p.bits,
            calibration,
            layer_bits,
            weight_bits: p.weight_bits,
        })
    }
}

/// Every convolution of `arch` by path.
fn conv_specs(arch: &Arch) -> Vec<(String, LayerSpec)> {
    fn walk(layers: &[LayerSpec], prefix: &str, out: &mut Vec<(String, LayerSpec)>) {
        for (i, l) in layers.iter().enumerate() {
            let path = format!("{prefix}.{i}");
            match l {
                LayerSpec::Conv2d { .. } => out.push((path, l.clone())),
                _ => {
                    for (name, list) in l.nested() {
                        walk(list, &format!("{path}.{name}"), out);
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&arch.layers, "layers", &mut out);
    out
}

impl Stage for Quantize {
    fn kind(&self) -> &'static str {
        "quantize"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "params": self.params, "layers": self.layers })
    }

    fn plan(&self, before: &Plan, _cx: &Context) -> Result<Plan, String> {
        before.not_encoded()?;
        if before.state.contains(&State::Codebooks) {
            return Err(
                "the weights are shared (a share stage came before): quantize the model instead of sharing it, or encode the shared one".into(),
            );
        }
        self.settings_for(before.arch()?)?;
        Ok(before.clone().with(State::Encoded))
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let input = required(input, self.kind())?;
        let settings = self
            .settings_for(input.arch())
            .map_err(anyhow::Error::msg)?;
        let meta = input.meta();
        let dir = cx.data_dir_for(meta);
        let splits = crate::data::load(meta.dataset, &dir)?;
        let train = splits.train.take(self.params.calibrate);
        let calibration = meta.preprocess.try_apply(&train)?;
        let q = quantize_model(&input.loaded, &settings, &calibration)
            .map_err(|e| anyhow::anyhow!("{}: {e}", input.file.display()))?;
        let mut out = write(&q.model, &q.renamed, &input, cx, &self.out)?;
        out.details["calibration_images"] = q.calibration_images.into();
        Ok(out)
    }
}

/// Writes the quantized model `quantized` (folded from `input`, its layers `renamed`) to `out`
/// (default `model.cpz` in the stage's folder) and reads it back: the stage's outcome, with
/// each layer's bits and input range.
pub fn write(
    quantized: &crate::checkpoint::Loaded,
    renamed: &BTreeMap<String, String>,
    input: &Model,
    cx: &Context,
    out: &Option<PathBuf>,
) -> anyhow::Result<Outcome> {
    let (bytes, stages) =
        crate::compress::format::encode_quantized(quantized).map_err(anyhow::Error::msg)?;
    let out = out.clone().unwrap_or_else(|| cx.dir.join("model.cpz"));
    crate::atomic_file::write_atomic(&out, &bytes)?;
    let model = Model::open(&out)?;
    let spec = model.loaded.quant.clone().unwrap_or_default();
    // Each weighted layer's path in the model as given (folding renumbers them).
    let original = weighted_layer_paths(input.arch());
    let from: BTreeMap<&String, &String> = renamed
        .iter()
        .filter(|(old, _)| original.contains(old))
        .map(|(old, new)| (new, old))
        .collect();
    let layers: Vec<serde_json::Value> = crate::pipeline::layers::weighted_layers(model.arch())
        .into_iter()
        .map(|(path, kind)| {
            let l = spec.layers.get(&path);
            serde_json::json!({
                "layer": path,
                "was": from.get(&path),
                "kind": kind,
                "bits": l.map_or(32, |l| l.bits),
                "input_bits": l.map(|l| l.input_bits()),
                "input_range": l.map(|l| l.input.range()),
                "input_zero_point": l.map(|l| l.input.zero_point),
                "sign_input": l.is_some_and(|l| l.sign_input),
                "float_input": l.is_some_and(|l| l.float_input),
            })
        })
        .collect();
    let details = serde_json::json!({
        "file_bytes": bytes.len(),
        "dense_bytes": stages.iter().map(|s| s.dense).sum::<usize>(),
        "layers": layers,
        "stages": stages,
    });
    Ok(Outcome {
        model,
        details,
        curve: vec![],
    })
}

/// `convpress quantize`: the stage on one checkpoint, written to `out` (never over the
/// checkpoint; an existing file only with `force`); prints each layer's bits and input range,
/// the file's bytes, and the test accuracy of the float model and of the quantized file on
/// the int8 kernels (the first `test_limit` test images).
pub fn command(
    checkpoint: &std::path::Path,
    out: Option<PathBuf>,
    force: bool,
    params: QuantizeParams,
    test_limit: Option<usize>,
    cx: Context,
) -> anyhow::Result<()> {
    use crate::run_folder::claim_output;
    let out = out.unwrap_or_else(|| checkpoint.with_extension(format!("q{}.cpz", params.bits)));
    claim_output(&out, &[checkpoint], force, "--out")?;
    if test_limit == Some(0) {
        anyhow::bail!("--test-limit must be at least 1");
    }
    let source = Model::open(checkpoint)?;
    if source.loaded.quant.is_some() {
        anyhow::bail!(
            "{}: the model is already quantized: quantize its float checkpoint instead",
            checkpoint.display()
        );
    }
    let staged = crate::atomic_file::tmp_sibling(&out);
    let stage = Quantize {
        params,
        layers: Default::default(),
        out: Some(staged.clone()),
    };
    stage
        .plan(&Plan::of(&source), &cx)
        .map_err(|e| anyhow::anyhow!("{}: {e}", checkpoint.display()))?;
    // The test split is read and checked before anything is written.
    let test =
        crate::pipeline::measure::test_set(&source, &cx.data_dir_for(source.meta()), test_limit)?;
    let result = stage.run(Some(source.clone()), &cx).and_then(|q| {
        crate::atomic_file::publish(&staged, &out, force)?;
        Ok(q)
    });
    let _ = std::fs::remove_file(&staged);
    let q = result?;
    print_outcome(checkpoint, &out, &q, &test, &cx)
}

/// What `convpress quantize` and `convpress qat` print: each layer's bits and input range, the
/// file's bytes, and the test accuracy of the float model and of the quantized file on the
/// runtime's int8 (and XNOR-popcount) kernels.
pub fn print_outcome(
    checkpoint: &std::path::Path,
    out: &std::path::Path,
    q: &Outcome,
    test: &crate::data::ImageSet,
    cx: &Context,
) -> anyhow::Result<()> {
    println!(
        "{:<18} {:<18} {:<7} {:>5} {:>8} {:>24} {:>5}",
        "layer", "was", "kind", "bits", "in bits", "input range", "zero"
    );
    for l in q.details["layers"].as_array().into_iter().flatten() {
        let range = match l["input_range"].as_array() {
            _ if l["sign_input"] == true => "signs".into(),
            _ if l["float_input"] == true => "float".into(),
            Some(r) => format!(
                "[{:.4}, {:.4}]",
                r[0].as_f64().unwrap_or(f64::NAN),
                r[1].as_f64().unwrap_or(f64::NAN)
            ),
            None => "float".into(),
        };
        println!(
            "{:<18} {:<18} {:<7} {:>5} {:>8} {:>24} {:>5}",
            l["layer"].as_str().unwrap_or(""),
            l["was"].as_str().unwrap_or(""),
            l["kind"].as_str().unwrap_or(""),
            l["bits"],
            l["input_bits"]
                .as_u64()
                .map_or("".into(), |b| b.to_string()),
            range,
            l["input_zero_point"]
                .as_i64()
                .map_or("".into(), |z| z.to_string())
        );
    }
    let file_bytes = fs_err::metadata(out)?.len();
    let source_bytes = fs_err::metadata(checkpoint)?.len();
    let dense = q.details["dense_bytes"].as_u64().unwrap_or(0);
    println!(
        "{}: {file_bytes} bytes ({:.1}x smaller than {} of {source_bytes} bytes; dense f32 weights {dense} bytes), calibrated on {} training images",
        out.display(),
        source_bytes as f64 / file_bytes.max(1) as f64,
        checkpoint.display(),
        q.details["calibration_images"]
    );
    let (network, _) = crate::checkpoint::load(checkpoint, &cx.device)?;
    let (_, float_acc) = crate::train::evaluate(&network, test, 256, &cx.device);
    let written = Model::open(out)?.loaded;
    let runtime =
        crate::runtime::model::SparseModel::from_loaded(&written).map_err(anyhow::Error::msg)?;
    let (_, int8_acc) = crate::runtime::model::evaluate(&runtime, test, 256);
    println!(
        "test accuracy ({} images): {:.2}% float, {:.2}% quantized on the {} ({:+.2} points)",
        test.n,
        100.0 * float_acc,
        100.0 * int8_acc,
        written
            .quant
            .as_ref()
            .map_or("int8 kernels".into(), |q| q.kernels()),
        100.0 * (int8_acc - float_acc)
    );
    Ok(())
}
