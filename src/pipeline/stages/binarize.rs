//! The `binarize` stage: binary or ternary weights (`compress::binarize`) trained from a float
//! model with Adam (every method alike, as loss-aware binarization needs its second moment),
//! the latent weights then binarized for good, and the model written as a `.cpz` at its real
//! size: binary weights at 1 bit and ternary ones as 2-bit codes, each times one scale per
//! output channel (batch norms folded into those scales). Layers with real-valued inputs keep
//! them in float and run on the table-lookup kernels, additions only (`inputs = "int8"`: the
//! inputs calibrated at 8 bits, on the int8 kernels); XNOR-Net's layers take their inputs'
//! signs (after the batch norm that `compress::xnor` puts in front of each, listed in the
//! report) and run on the XNOR-popcount kernels. The layers named in `float-layers` stay in
//! float (by default the first and the last, as BWN and XNOR-Net keep them); binarizing a
//! layer with one input channel is refused (a binary filter over one channel keeps only
//! single pixels' signs).

use super::quantize::{CalibrationKind, Quantize, QuantizeParams};
use super::{check_retrain, retrain_config, train_keeping};
use crate::checkpoint::{Loaded, floats};
use crate::compress::binarize::{BinarizeHook, Method, binarize_weight};
use crate::compress::fold::fold_batch_norms;
use crate::compress::ptq;
use crate::compress::quantize::Calibration;
use crate::compress::xnor::insert_batch_norms;
use crate::models::LayerSpec;
use crate::models::arch::Shape;
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage, State, required};
use crate::train::OptimizerConfig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Training batches that refresh an XNOR-Net's batch-norm statistics after its last epoch
/// (`TrainConfig::batch_norm_refresh`): 6,400 images at batch 64. Without it, ResNet-20's
/// XNOR file fell to 34% test accuracy (train 96%).
const XNOR_BATCH_NORM_REFRESH: usize = 100;

/// `convpress binarize`'s flags and the `binarize` stage's keys.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct BinarizeParams {
    #[arg(long, value_enum, default_value_t = Method::Bwn)]
    pub method: Method,
    /// Layers kept in float: `first`, `last` or layer paths and patterns, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["first".to_string(), "last".to_string()])]
    pub float_layers: Vec<String>,
    /// Epochs of training with binarized weights.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 0.001, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How binarized layers take real-valued inputs (all methods but XNOR-Net, whose layers
    /// take their inputs' signs): `float` keeps them in float, as the layers were trained, on
    /// the table-lookup kernels (additions only); `int8` quantizes them to 8 bits, on the int8
    /// kernels.
    #[arg(long, value_enum, default_value_t = Inputs::Float)]
    pub inputs: Inputs,
    /// Training images the 8-bit input ranges are calibrated on, after training (the first N;
    /// recorded with `inputs = float` too).
    #[arg(long, default_value_t = 1024)]
    pub calibrate: usize,
    /// Train on the first N training images only.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub test_limit: Option<usize>,
}

/// How binarized layers take real-valued inputs ([`BinarizeParams::inputs`]).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Inputs {
    Float,
    Int8,
}

impl Default for BinarizeParams {
    fn default() -> Self {
        table::clap_defaults()
    }
}

pub struct Binarize {
    pub params: BinarizeParams,
    /// Where the file goes (default: `model.cpz` in the stage's folder).
    pub out: Option<PathBuf>,
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    Ok(Box::new(Binarize {
        params: t.params()?,
        out: None,
    }))
}

impl Binarize {
    /// Which layers stay in float, and how real-valued inputs are calibrated (8 bits,
    /// min-max); the weights' widths are the method's (`write_form`).
    fn quantize(&self) -> Quantize {
        let p = &self.params;
        Quantize {
            params: QuantizeParams {
                bits: 8,
                calibrate: p.calibrate,
                calibration: CalibrationKind::MinMax,
                percentile: 99.99,
                float_layers: p.float_layers.clone(),
                targets: None,
                weight_bits: None,
            },
            layers: Default::default(),
            out: self.out.clone(),
        }
    }

    /// The layers to binarize (conv and linear, not kept in float), refused where one has a
    /// single input channel (and, by `settings_for`, where none is left).
    fn binarized(&self, arch: &crate::models::Arch) -> Result<BTreeSet<String>, String> {
        let settings = self.quantize().settings_for(arch)?;
        let specs = arch.layer_specs();
        let mut out = BTreeSet::new();
        for s in arch.layer_stats() {
            let path = s.path;
            if !matches!(s.kind, "conv2d" | "linear")
                || matches!(settings.layer_bits.get(&path), Some(None))
            {
                continue;
            }
            if let Some(LayerSpec::Conv2d {
                groups, dilation, ..
            }) = specs.get(&path)
                && self.params.method.binary_inputs()
                && (*groups != 1 || *dilation != [1, 1])
            {
                return Err(format!(
                    "{path}: the XNOR-popcount convolution runs one group and no dilation, not {groups} and {dilation:?}; keep it in float"
                ));
            }
            if s.kind == "conv2d" && matches!(s.input, Shape::Map([1, _, _])) {
                return Err(format!(
                    "{path} has one input channel: binarizing it keeps only the signs of single pixels; keep it in float (float-layers = first, or its path)"
                ));
            }
            out.insert(path);
        }
        Ok(out)
    }
}

impl Stage for Binarize {
    fn kind(&self) -> &'static str {
        "binarize"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "params": self.params })
    }

    fn plan(&self, before: &Plan, cx: &Context) -> Result<Plan, String> {
        if before.state.contains(&State::Masks) {
            return Err(
                "the model is pruned: binarization sets every weight to ±α, so its zeros would not survive; binarize the unpruned model".into(),
            );
        }
        let p = &self.params;
        let arch = before.arch()?;
        check_retrain(arch, p.epochs, p.lr, [p.train_limit, p.test_limit])?;
        self.binarized(arch)?;
        let after = self.quantize().plan(before, cx)?;
        Ok(after.with(State::Encoded))
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let input = required(input, self.kind())?;
        let p = &self.params;
        let mut layers = self.binarized(input.arch()).map_err(anyhow::Error::msg)?;
        // XNOR-Net: a batch norm in front of every binarized layer that lacks one, trained
        // from the start of the run.
        let (xnor_start, inserted, mut renamed) = if p.method.binary_inputs() {
            let crate::compress::xnor::Inserted {
                model: with,
                renamed,
                batch_norms: inserted,
            } = insert_batch_norms(&input.loaded, &layers)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.file.display()))?;
            let start = Model::save_tensors(
                &cx.dir.join("xnor-blocks.safetensors"),
                &with.arch,
                with.tensors,
                &with.meta,
                &Default::default(),
                &cx.device,
            )?;
            layers = layers.iter().map(|l| renamed[l].clone()).collect();
            (Some(start), inserted, renamed)
        } else {
            (None, Vec::new(), BTreeMap::new())
        };
        let start = xnor_start.as_ref().unwrap_or(&input);
        let mut config = retrain_config(start, p.epochs, p.lr, p.seed, cx)?;
        config.optimizer = OptimizerConfig::Adam {
            lr: p.lr,
            weight_decay: 0.0,
        };
        config.train_limit = p.train_limit;
        config.test_limit = p.test_limit;
        if p.method == Method::Xnor {
            config.batch_norm_refresh = XNOR_BATCH_NORM_REFRESH;
        }
        let hook = BinarizeHook::new(p.method, layers.clone());
        let scales = hook.scales();
        let keep = crate::pipeline::Constraints::default();
        let (outcome, _) = train_keeping(&config, &keep, vec![Box::new(hook)], cx)?;
        // The latent weights binarized for good.
        let mut trained = crate::checkpoint::read(&outcome.model_path)?;
        let scales = scales.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let linear = ptq::channels_last_layers(&trained.arch);
        for layer in &layers {
            let name = format!("{layer}.weight");
            let (w, shape) = floats(&trained.tensors, &name).map_err(anyhow::Error::msg)?;
            let channels_last = linear.get(layer).copied().unwrap_or(false);
            let b = binarize_weight(
                p.method,
                &w,
                &shape,
                channels_last,
                scales.get(layer).copied(),
            );
            let id = trained.tensors.get(&name).and_then(|(_, id)| *id);
            trained
                .tensors
                .insert(name, (burn::tensor::TensorData::new(b, shape), id));
        }
        let meta = input.meta();
        let splits = crate::data::load(meta.dataset, &cx.data_dir_for(meta))?;
        let calibration = meta.preprocess.try_apply(&splits.train.take(p.calibrate))?;
        let (quantized, folded_paths) = self
            .write_form(&trained, &layers, &calibration)
            .map_err(|e| anyhow::anyhow!("{}: {e}", input.file.display()))?;
        // Each layer path of the model as given, and its path in the written one.
        if renamed.is_empty() {
            renamed = folded_paths.clone();
        } else {
            for new in renamed.values_mut() {
                *new = folded_paths
                    .get(new)
                    .cloned()
                    .unwrap_or_else(|| new.clone());
            }
        }
        // The inserted batch norms in the written model; one right after a convolution is
        // folded into it (the signs of the folded convolution's outputs are the same).
        let kinds: BTreeMap<String, &str> = quantized
            .arch
            .layer_stats()
            .into_iter()
            .map(|s| (s.path, s.kind))
            .collect();
        let (kept, folded): (Vec<String>, Vec<String>) = inserted
            .iter()
            .map(|bn| folded_paths.get(bn).cloned().unwrap_or_else(|| bn.clone()))
            .partition(|p| kinds.get(p) == Some(&"batch_norm"));
        let mut out = super::quantize::write(&quantized, &renamed, &input, cx, &self.out)?;
        out.details["calibration_images"] = calibration.n.into();
        out.details["method"] = p.method.name().into();
        out.details["binarized_layers"] = layers.len().into();
        out.details["inserted_batch_norms"] = kept.into();
        out.details["inserted_batch_norms_folded_into"] = folded.into();
        out.details["epochs"] = p.epochs.into();
        out.curve = outcome.metrics;
        Ok(out)
    }
}

impl Binarize {
    /// The trained model with its binarized `layers` (its paths), as it is written: batch norms
    /// folded, binary weights at 1 bit and ternary ones at 2, every other layer in float; the
    /// real-valued inputs of binarized layers calibrated at 8 bits (min-max) and, with
    /// `inputs = float`, kept in float; XNOR-Net's taken by their signs. Also returns every layer's path after folding.
    fn write_form(
        &self,
        trained: &Loaded,
        layers: &BTreeSet<String>,
        calibration: &crate::data::ImageSet,
    ) -> Result<(Loaded, BTreeMap<String, String>), String> {
        let method = self.params.method;
        let (folded, renamed) = fold_batch_norms(trained)?;
        let binarized: BTreeSet<String> = layers.iter().map(|l| renamed[l].clone()).collect();
        let bits = if method.ternary() { 2 } else { 1 };
        let mut bits_of = BTreeMap::new();
        let mut calibrated = BTreeMap::new();
        for s in folded.arch.layer_stats() {
            if matches!(s.kind, "conv2d" | "linear") {
                let on = binarized.contains(&s.path);
                bits_of.insert(s.path.clone(), on.then_some(bits));
                calibrated.insert(s.path, (on && !method.binary_inputs()).then_some(8));
            }
        }
        let inputs = if calibrated.values().any(Option::is_some) {
            ptq::calibrate(&folded, &calibrated, Calibration::MinMax, calibration)?
        } else {
            BTreeMap::new()
        };
        let signs = match method.binary_inputs() {
            true => binarized,
            false => BTreeSet::new(),
        };
        let mut quantized = ptq::finish(folded, &bits_of, &inputs, &BTreeMap::new(), &signs)?;
        if !method.binary_inputs() && self.params.inputs == Inputs::Float {
            let spec = quantized.quant.as_mut().expect("finish writes the spec");
            spec.layers.values_mut().for_each(|l| l.float_input = true);
            quantized.check()?;
        }
        Ok((quantized, renamed))
    }
}

/// `convpress binarize`: the stage on one checkpoint, its training in `run_dir` (default:
/// next to `out`), written to `out`; prints what `convpress quantize` prints.
pub fn command(
    checkpoint: &std::path::Path,
    outputs: super::encode::Outputs,
    params: BinarizeParams,
    cx: Context,
) -> anyhow::Result<()> {
    let out = outputs
        .out
        .clone()
        .unwrap_or_else(|| checkpoint.with_extension(format!("{}.cpz", params.method.name())));
    let banner = format!(
        "training with {} weights for {} epochs",
        params.method.name(),
        params.epochs
    );
    let test_limit = params.test_limit;
    let stage = |staged| Binarize {
        params,
        out: Some(staged),
    };
    super::qat::train_and_write(checkpoint, out, outputs, test_limit, &banner, stage, cx)
}
