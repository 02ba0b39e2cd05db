//! Post-training quantization (issue #12): fold batch norms, run the float model on
//! calibration images to observe each conv and linear layer's input, then quantize weights
//! symmetrically per output channel and inputs asymmetrically per tensor (Krishnamoorthi 2018,
//! "Quantizing deep convolutional networks for efficient inference", sections 2 and 3.1).
//! The result is the model with its weights on their quantization grid and a [`QuantSpec`],
//! which the int8 runtime runs and the `.cpz` format stores at `bits` bits per weight.

use super::fold::fold_batch_norms;
use super::quantize::{Calibration, Observer, QuantLayer, QuantSpec, Quantizer, check_bits};
use crate::checkpoint::{Loaded, floats};
use crate::data::ImageSet;
use crate::runtime::model::SparseModel;
use std::collections::BTreeMap;

/// Images per calibration batch.
const CALIBRATION_BATCH: usize = 64;

/// What to quantize, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct PtqSettings {
    /// Bits of weights and inputs of every quantized layer, unless `layer_bits` says otherwise.
    pub bits: u32,
    pub calibration: Calibration,
    /// Bits per layer (paths of the model as given, before folding); `None` keeps the layer
    /// in float.
    pub layer_bits: BTreeMap<String, Option<u32>>,
    /// Bits of the weights of every layer that `layer_bits` does not name, where they differ
    /// from its inputs' (a layer given its own width keeps it for both): 7-bit
    /// weights with 8-bit inputs run on the int8 runtime's faster `vpmaddubsw` kernel on
    /// AVX2, whose 16-bit pair sums overflow for 8-bit weights (`kernels::int8::PackedQuads`).
    pub weight_bits: Option<u32>,
}

/// A quantized model and how it came about.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// The folded model on its quantization grid, with its spec.
    pub model: Loaded,
    /// Each layer path of the model as given, and its path in the folded one.
    pub renamed: BTreeMap<String, String>,
    /// Images the observers saw.
    pub calibration_images: usize,
}

/// Quantizes `model` after calibrating on the images of `calibration` (preprocessed as the
/// model expects). Refuses a model already quantized, and an empty calibration set, before any
/// work.
pub fn quantize_model(
    model: &Loaded,
    settings: &PtqSettings,
    calibration: &ImageSet,
) -> Result<Quantized, String> {
    if model.quant.is_some() {
        return Err("the model is already quantized: quantize its float checkpoint instead".into());
    }
    // `layer_bits` checks the widths and `calibrate` the set, both before any work on the
    // weights; only the fold comes before them.
    let (folded, renamed) = fold_batch_norms(model)?;
    let bits_of = layer_bits(&folded, &renamed, settings)?;
    let inputs = calibrate(&folded, &bits_of, settings.calibration, calibration)?;
    let quantized = finish(
        folded,
        &weight_bits_of(&bits_of, settings, &renamed),
        &inputs,
        &BTreeMap::new(),
        &Default::default(),
    )?;
    Ok(Quantized {
        model: quantized,
        renamed,
        calibration_images: calibration.n,
    })
}

/// Bits of every conv and linear layer of the folded model (`None`: float): `settings.bits`
/// unless `settings.layer_bits` names the layer by its path before folding.
pub fn layer_bits(
    folded: &Loaded,
    renamed: &BTreeMap<String, String>,
    settings: &PtqSettings,
) -> Result<BTreeMap<String, Option<u32>>, String> {
    check_bits("bits", settings.bits)?;
    if let Some(w) = settings.weight_bits {
        check_bits("weight bits", w)?;
    }
    let mut bits_of: BTreeMap<String, Option<u32>> = BTreeMap::new();
    for s in folded.arch.layer_stats() {
        if matches!(s.kind, "conv2d" | "linear") {
            bits_of.insert(s.path, Some(settings.bits));
        }
    }
    for (old, bits) in &settings.layer_bits {
        if let Some(b) = bits {
            check_bits(&format!("{old}: bits"), *b)?;
        }
        let new = renamed
            .get(old)
            .filter(|n| bits_of.contains_key(*n))
            .ok_or_else(|| format!("{old} is not a conv or linear layer of the model"))?;
        bits_of.insert(new.clone(), *bits);
    }
    Ok(bits_of)
}

/// The weights' bits of every layer of `bits_of` (the inputs' bits, on the folded model's
/// paths): `settings.weight_bits` for the layers that `settings.layer_bits` does not name
/// (`renamed` maps those names, the model's as given, to the folded ones), where given.
pub fn weight_bits_of(
    bits_of: &BTreeMap<String, Option<u32>>,
    settings: &PtqSettings,
    renamed: &BTreeMap<String, String>,
) -> BTreeMap<String, Option<u32>> {
    let named: std::collections::BTreeSet<&String> = settings
        .layer_bits
        .keys()
        .map(|old| renamed.get(old).unwrap_or(old))
        .collect();
    bits_of
        .iter()
        .map(|(l, b)| {
            let w = match (b, settings.weight_bits) {
                (Some(_), Some(w)) if !named.contains(l) => Some(w),
                _ => *b,
            };
            (l.clone(), w)
        })
        .collect()
}

/// The input quantizer of every quantized layer (`bits_of`) of the float model `folded`, from
/// what its inputs are on the calibration images.
pub fn calibrate(
    folded: &Loaded,
    bits_of: &BTreeMap<String, Option<u32>>,
    calibration: Calibration,
    images: &ImageSet,
) -> Result<BTreeMap<String, Quantizer>, String> {
    if images.n == 0 {
        return Err("calibration needs at least one image, and the set is empty".into());
    }
    let float = SparseModel::from_loaded(folded)?;
    let mut observers: BTreeMap<String, Observer> = BTreeMap::new();
    let mut failed: Option<String> = None;
    let len = images.image_len();
    for start in (0..images.n).step_by(CALIBRATION_BATCH) {
        let batch = CALIBRATION_BATCH.min(images.n - start);
        let x = &images.pixels[start * len..(start + batch) * len];
        float.forward_observed(x, batch, &mut |path, x| {
            if failed.is_none()
                && matches!(bits_of.get(path), Some(Some(_)))
                && let Err(e) = observers.entry(path.to_string()).or_default().observe(x)
            {
                failed = Some(format!("{path}: {e}"));
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
    }
    let mut out = BTreeMap::new();
    for (path, bits) in bits_of {
        let Some(bits) = *bits else { continue };
        let observer = observers
            .get(path)
            .ok_or_else(|| format!("{path}: calibration never reached the layer"))?;
        out.insert(path.clone(), observer.quantizer(calibration, bits)?);
    }
    Ok(out)
}

/// `folded` (a float model without foldable batch norms) with the weights of every layer of
/// `bits_of` on their per-channel grid, its inputs quantized by `inputs`: the quantized model
/// with its spec, checked. The layers of `sign_inputs` take their inputs' signs (XNOR-Net:
/// 1-bit weights, input grid [`Quantizer::signs`]) and need no entry in `inputs`. At 1 bit a
/// weight of 0 (a channel that is all 0) takes the code +1. A layer's weight steps are its entry in `weight_steps` (one per
/// output channel: learned steps, which clip) or else from each channel's largest magnitude.
pub fn finish(
    folded: Loaded,
    bits_of: &BTreeMap<String, Option<u32>>,
    inputs: &BTreeMap<String, Quantizer>,
    weight_steps: &BTreeMap<String, Vec<f32>>,
    sign_inputs: &std::collections::BTreeSet<String>,
) -> Result<Loaded, String> {
    let mut tensors = folded.tensors.clone();
    let mut spec = QuantSpec::default();
    let linear = channels_last_layers(&folded.arch);
    for (path, bits) in bits_of {
        let Some(bits) = *bits else { continue };
        let sign_input = sign_inputs.contains(path);
        let input = match sign_input {
            true => Quantizer::signs(),
            false => *inputs
                .get(path)
                .ok_or_else(|| format!("{path}: no input quantizer"))?,
        };
        let name = format!("{path}.weight");
        let (mut w, shape) = floats(&tensors, &name)?;
        let channel_last = *linear
            .get(path)
            .ok_or_else(|| format!("{path} is not a layer of the model"))?;
        let steps = weight_steps.get(path).map(Vec::as_slice);
        let scales = quantize_in_place(&mut w, &shape, channel_last, bits, steps)
            .map_err(|e| format!("{path}: {e}"))?;
        tensors.insert(name, (burn::tensor::TensorData::new(w, shape), None));
        spec.layers.insert(
            path.clone(),
            QuantLayer {
                bits,
                input,
                sign_input,
                float_input: false,
                weight_scales: scales,
            },
        );
    }
    if spec.layers.is_empty() {
        return Err(
            "every conv and linear layer is kept in float: there is nothing to quantize".into(),
        );
    }
    let quantized = Loaded {
        quant: Some(spec),
        tensors,
        ..folded
    };
    quantized.check()?;
    Ok(quantized)
}

/// Every layer's path, and whether its weight has its output channels last (Burn's linear
/// `[in, out]`) rather than first (conv `[out, in, kh, kw]`).
pub fn channels_last_layers(arch: &crate::models::Arch) -> BTreeMap<String, bool> {
    arch.layer_stats()
        .into_iter()
        .map(|s| (s.path, s.kind == "linear"))
        .collect()
}

/// The output channels of a weight of `shape`, last or first.
pub fn output_channels(shape: &[usize], channels_last: bool) -> usize {
    if channels_last {
        shape[shape.len() - 1]
    } else {
        shape[0]
    }
}

/// Puts weight `w` (output channel first, or last for Burn's linear `[in, out]`) on its
/// symmetric per-channel grid of `bits` bits, `w = code · step`; returns the steps. They are
/// `steps` where given (one per channel, positive; values beyond the range are clipped), else
/// each channel's largest magnitude over the largest code.
pub fn quantize_in_place(
    w: &mut [f32],
    shape: &[usize],
    channel_last: bool,
    bits: u32,
    steps: Option<&[f32]>,
) -> Result<Vec<f32>, String> {
    let channels = output_channels(shape, channel_last);
    let inner = if channel_last {
        1
    } else {
        w.len() / channels.max(1)
    };
    let channel = |i: usize| (i / inner) % channels;
    let quantizers: Vec<Quantizer> = match steps {
        Some(steps) => {
            if steps.len() != channels {
                return Err(format!(
                    "{} weight steps for {channels} output channels",
                    steps.len()
                ));
            }
            if let Some(bad) = steps.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                return Err(format!("weight step {bad} is not a positive number"));
            }
            steps
                .iter()
                .map(|&scale| Quantizer::symmetric_step(scale, bits))
                .collect()
        }
        None => {
            let mut max_abs = vec![0f32; channels];
            for (i, v) in w.iter().enumerate() {
                max_abs[channel(i)] = max_abs[channel(i)].max(v.abs());
            }
            max_abs
                .iter()
                .map(|&m| Quantizer::symmetric(m, bits))
                .collect()
        }
    };
    for (i, v) in w.iter_mut().enumerate() {
        let q = &quantizers[channel(i)];
        // One bit has no 0: the sign, +1 for 0.
        *v = match bits {
            1 => q.scale.copysign(*v + 0.0),
            _ => q.round_trip(*v),
        };
    }
    Ok(quantizers.iter().map(|q| q.scale).collect())
}
