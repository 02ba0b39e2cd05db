//! The `qat` stage: quantization-aware training (`compress::qat`) from a trained float model:
//! batch norms folded, input ranges calibrated as `quantize` does, then `epochs` of training
//! with weights and inputs fake-quantized at `bits` (straight-through gradients; a pruned
//! model keeps its masks), and the trained model written as `quantize` writes it: a
//! version-2 `.cpz` that `eval` runs on the int8 kernels. With `step-sizes = "learned"` the
//! quantizers' steps train too (`compress::lsq`) and the file is quantized on them.

use super::quantize::{CalibrationKind, LayerQuant, Quantize, QuantizeParams};
use super::{check_retrain, retrain_config, train_keeping};
use crate::compress::fold::fold_batch_norms;
use crate::compress::lsq;
use crate::compress::ptq;
use crate::compress::qat::QatHook;
use crate::pipeline::layers::LayerRules;
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Constraints, Context, Model, Outcome, Plan, Stage, State, required};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `convpress qat`'s flags and the `qat` stage's keys: those of `quantize`, and the training.
/// The quantization keys are repeated rather than flattened in: serde's `flatten` does not work
/// with `deny_unknown_fields`, which is what refuses a misspelt recipe key.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct QatParams {
    /// Bits of weights and activations, 2 to 8.
    #[arg(long, default_value_t = 8)]
    pub bits: u32,
    /// Training images the input ranges are calibrated on before training (the first N).
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
    /// The quantizers' steps: `calibrated` keeps them as calibrated (inputs) and from each
    /// channel's largest magnitude (weights); `learned` trains them with the weights (LSQ,
    /// Esser et al. 2020), and the file is quantized on the learned steps.
    #[arg(long, value_enum, default_value_t = StepSizes::Calibrated)]
    pub step_sizes: StepSizes,
    /// Epochs of quantization-aware training.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0.001, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Train on the first N training images only.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub test_limit: Option<usize>,
}

/// Where the quantizers' steps come from during QAT.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepSizes {
    /// Fixed: inputs' as calibrated, weights' from each channel's largest magnitude.
    Calibrated,
    /// Trained with the weights (`compress::lsq`).
    Learned,
}

impl Default for QatParams {
    fn default() -> Self {
        table::clap_defaults()
    }
}

/// The learned steps of a run with `step-sizes = "learned"`, in its folder (by the folded
/// model's layer paths).
pub const LEARNED_STEPS: &str = "learned-steps.json";

pub struct Qat {
    pub params: QatParams,
    pub layers: LayerRules<LayerQuant>,
    /// Where the file goes (default: `model.cpz` in the stage's folder).
    pub out: Option<PathBuf>,
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    Ok(Box::new(Qat {
        params: t.params()?,
        layers: t.layers()?,
        out: None,
    }))
}

impl Qat {
    /// The quantization half of the settings, as the `quantize` stage takes them.
    fn quantize(&self) -> Quantize {
        let p = &self.params;
        Quantize {
            params: QuantizeParams {
                bits: p.bits,
                calibrate: p.calibrate,
                calibration: p.calibration,
                percentile: p.percentile,
                float_layers: p.float_layers.clone(),
                targets: p.targets.clone(),
                weight_bits: p.weight_bits,
            },
            layers: self.layers.clone(),
            out: self.out.clone(),
        }
    }
}

impl Stage for Qat {
    fn kind(&self) -> &'static str {
        "qat"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "params": self.params, "layers": self.layers })
    }

    fn plan(&self, before: &Plan, cx: &Context) -> Result<Plan, String> {
        let after = self.quantize().plan(before, cx)?;
        let p = &self.params;
        check_retrain(
            before.arch()?,
            p.epochs,
            p.lr,
            [p.train_limit, p.test_limit],
        )?;
        Ok(after.with(State::Encoded))
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let input = required(input, self.kind())?;
        let p = &self.params;
        let quantize = self.quantize();
        let settings = quantize
            .settings_for(input.arch())
            .map_err(anyhow::Error::msg)?;
        let (folded, renamed) = fold_batch_norms(&input.loaded).map_err(anyhow::Error::msg)?;
        let bits_of = ptq::layer_bits(&folded, &renamed, &settings).map_err(anyhow::Error::msg)?;
        let meta = input.meta();
        let splits = crate::data::load(meta.dataset, &cx.data_dir_for(meta))?;
        let calibration = meta.preprocess.try_apply(&splits.train.take(p.calibrate))?;
        let inputs = ptq::calibrate(&folded, &bits_of, settings.calibration, &calibration)
            .map_err(|e| anyhow::anyhow!("{}: {e}", input.file.display()))?;
        // A pruned model's masks, on the folded model's paths.
        let mut masks = BTreeMap::new();
        for (param, keep) in &input.constraints.masks {
            let layer = param.strip_suffix(".weight").unwrap_or(param);
            let new = renamed.get(layer).cloned().unwrap_or_else(|| layer.into());
            masks.insert(format!("{new}.weight"), keep.clone());
        }
        let keep = Constraints {
            masks,
            codebooks: Default::default(),
        };
        let start = Model::save_tensors(
            &cx.dir.join("folded.safetensors"),
            &folded.arch,
            folded.tensors.clone(),
            &folded.meta,
            &keep,
            &cx.device,
        )?;
        let mut config = retrain_config(&start, p.epochs, p.lr, p.seed, cx)?;
        config.train_limit = p.train_limit;
        config.test_limit = p.test_limit;
        let weight_bits_of = ptq::weight_bits_of(&bits_of, &settings, &renamed);
        let weight_bits = weight_bits_of
            .iter()
            .filter_map(|(l, b)| b.map(|b| (l.clone(), b)))
            .collect();
        let hook = match p.step_sizes {
            StepSizes::Calibrated => QatHook::new(weight_bits, inputs.clone()),
            StepSizes::Learned => {
                let start = lsq::initial_steps(&folded, &weight_bits, &inputs)
                    .map_err(anyhow::Error::msg)?;
                QatHook::learning(start, config.optimizer.without_weight_decay().build())
            }
        };
        let learned = hook.learned_steps();
        let (outcome, _) = train_keeping(&config, &keep, vec![Box::new(hook)], cx)?;
        let trained = crate::checkpoint::read(&outcome.model_path)?;
        let learned = learned.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (inputs, weight_steps) = match learned {
            None => (inputs, BTreeMap::new()),
            Some(steps) => {
                crate::atomic_file::write_atomic(
                    &cx.dir.join(LEARNED_STEPS),
                    serde_json::to_string_pretty(&steps)?.as_bytes(),
                )?;
                let inputs = steps.iter().map(|(l, s)| (l.clone(), s.input)).collect();
                let weights = steps.into_iter().map(|(l, s)| (l, s.weights)).collect();
                (inputs, weights)
            }
        };
        let quantized = ptq::finish(
            trained,
            &weight_bits_of,
            &inputs,
            &weight_steps,
            &Default::default(),
        )
        .map_err(anyhow::Error::msg)?;
        let mut out = super::quantize::write(&quantized, &renamed, &input, cx, &self.out)?;
        out.details["step_sizes"] = serde_json::to_value(p.step_sizes)?;
        out.details["epochs"] = p.epochs.into();
        out.details["calibration_images"] = calibration.n.into();
        out.curve = outcome.metrics;
        Ok(out)
    }
}

/// `convpress qat`: the stage on one checkpoint, its training in `run_dir` (default: next to
/// `out`), written to `out`; prints what `convpress quantize` prints.
pub fn command(
    checkpoint: &std::path::Path,
    outputs: super::encode::Outputs,
    params: QatParams,
    cx: Context,
) -> anyhow::Result<()> {
    let out = outputs
        .out
        .clone()
        .unwrap_or_else(|| checkpoint.with_extension(format!("qat{}.cpz", params.bits)));
    let banner = format!(
        "quantization-aware training for {} epochs at {} bits",
        params.epochs, params.bits
    );
    let test_limit = params.test_limit;
    let stage = |staged| Qat {
        params,
        layers: Default::default(),
        out: Some(staged),
    };
    train_and_write(checkpoint, out, outputs, test_limit, &banner, stage, cx)
}

/// A stage that trains a float model and writes a `.cpz` (`qat`, `binarize`), run as a
/// command on one checkpoint: the stage (made by `stage` to write to a staged file) is
/// planned before any work, trains in the run folder (default: next to `out`), and its file
/// is published to `out`; prints what `convpress quantize` prints.
pub fn train_and_write<S: Stage>(
    checkpoint: &std::path::Path,
    out: PathBuf,
    outputs: super::encode::Outputs,
    test_limit: Option<usize>,
    banner: &str,
    stage: impl FnOnce(PathBuf) -> S,
    cx: Context,
) -> anyhow::Result<()> {
    use crate::run_folder::{Reuse, RunFolder, claim_output};
    let force = outputs.force;
    claim_output(&out, &[checkpoint], force, "--out")?;
    let source = Model::open(checkpoint)?;
    if source.loaded.quant.is_some() {
        anyhow::bail!(
            "{}: the model is already quantized: train its float checkpoint instead",
            checkpoint.display()
        );
    }
    let staged = crate::atomic_file::tmp_sibling(&out);
    let stage = stage(staged.clone());
    stage
        .plan(&Plan::of(&source), &cx)
        .map_err(|e| anyhow::anyhow!("{}: {e}", checkpoint.display()))?;
    let test =
        crate::pipeline::measure::test_set(&source, &cx.data_dir_for(source.meta()), test_limit)?;
    let work = outputs.run_dir.unwrap_or_else(|| out.with_extension("run"));
    let _work = RunFolder::open(
        &work,
        Reuse::from_flags(false, force),
        "--run-dir",
        false,
        &[checkpoint],
    )?;
    let cx = Context {
        dir: work.clone(),
        ..cx
    };
    eprintln!("{banner}, run folder {}", work.display());
    let result = stage.run(Some(source.clone()), &cx).and_then(|q| {
        crate::atomic_file::publish(&staged, &out, force)?;
        Ok(q)
    });
    let _ = std::fs::remove_file(&staged);
    let q = result?;
    super::quantize::print_outcome(checkpoint, &out, &q, &test, &cx)
}
