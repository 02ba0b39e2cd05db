//! Batch-norm folding: a convolution followed by a batch norm in evaluation form is one
//! convolution with scaled weights and a shifted bias, `w' = w · γ/σ`, `b' = (b − μ) · γ/σ + β`
//! per output channel, `σ = sqrt(var + ε)` (Jacob et al. 2018, section 3.2; Krishnamoorthi
//! 2018, section 2.5). Quantization folds before it quantizes, so the integer kernels see the
//! weights the network really applies and no batch norm is left to run in float.

use crate::checkpoint::{Loaded, Tensors, floats};
use crate::models::{Arch, LayerSpec};
use burn::tensor::TensorData;
use std::collections::BTreeMap;

/// Burn's `BatchNormConfig` default; checkpoints do not store epsilon.
pub const BATCH_NORM_EPSILON: f64 = 1e-5;

/// `scale` and `shift` of a batch norm in evaluation form, `y = x · scale + shift`.
pub fn batch_norm_affine(
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = gamma
        .iter()
        .zip(var)
        .map(|(&g, &v)| (g as f64 / (v as f64 + BATCH_NORM_EPSILON).sqrt()) as f32)
        .collect();
    let shift = beta
        .iter()
        .zip(mean)
        .zip(&scale)
        .map(|((&b, &m), &s)| b - m * s)
        .collect();
    (scale, shift)
}

/// The model with every batch norm that directly follows a convolution folded into it: the
/// convolution gains a bias, the batch norm leaves the architecture, and the layers after it
/// are renumbered (`layers.2` becomes `layers.1`). Other batch norms stay. Zero weights stay
/// zero, so a pruned model keeps its sparsity. Also returns every old layer path's new one (a
/// folded batch norm's is its convolution's).
pub fn fold_batch_norms(model: &Loaded) -> Result<(Loaded, BTreeMap<String, String>), String> {
    let mut tensors = Tensors::new();
    let mut renamed = BTreeMap::new();
    let layers = fold_seq(
        &model.arch.layers,
        ["layers", "layers"],
        &model.tensors,
        &mut tensors,
        &mut renamed,
    )?;
    let arch = Arch {
        layers,
        ..model.arch.clone()
    };
    arch.validate()?;
    let folded = Loaded {
        arch,
        meta: model.meta.clone(),
        tensors,
        quant: None,
    };
    Ok((folded, renamed))
}

fn fold_seq(
    layers: &[LayerSpec],
    [from, to]: [&str; 2],
    src: &Tensors,
    dst: &mut Tensors,
    renamed: &mut BTreeMap<String, String>,
) -> Result<Vec<LayerSpec>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let (old, new) = (format!("{from}.{i}"), format!("{to}.{}", out.len()));
        renamed.insert(old.clone(), new.clone());
        let mut put = |name: &str, values: Vec<f32>, shape: Vec<usize>| {
            dst.insert(
                format!("{new}.{name}"),
                (TensorData::new(values, shape), None),
            );
        };
        let get = |path: &str| floats(src, path);
        match (&layers[i], layers.get(i + 1)) {
            (
                &LayerSpec::Conv2d {
                    out_channels, bias, ..
                },
                Some(&LayerSpec::BatchNorm { features }),
            ) if features == out_channels => {
                let bn = format!("{from}.{}", i + 1);
                renamed.insert(bn.clone(), new.clone());
                let t = |n: &str| get(&format!("{bn}.{n}")).map(|v| v.0);
                let (scale, shift) = batch_norm_affine(
                    &t("gamma")?,
                    &t("beta")?,
                    &t("running_mean")?,
                    &t("running_var")?,
                );
                let (mut w, shape) = get(&format!("{old}.weight"))?;
                let per = w.len() / out_channels.max(1);
                for (o, row) in w.chunks_exact_mut(per.max(1)).enumerate() {
                    row.iter_mut().for_each(|v| *v *= scale[o]);
                }
                let b0 = if bias {
                    get(&format!("{old}.bias"))?.0
                } else {
                    vec![0.0; out_channels]
                };
                let b = (0..out_channels)
                    .map(|o| b0[o] * scale[o] + shift[o])
                    .collect();
                put("weight", w, shape);
                put("bias", b, vec![out_channels]);
                let mut conv = layers[i].clone();
                if let LayerSpec::Conv2d { bias, .. } = &mut conv {
                    *bias = true;
                }
                out.push(conv);
                i += 2;
                continue;
            }
            (LayerSpec::Residual { body, shortcut }, _) => {
                let (ob, nb) = (format!("{old}.body"), format!("{new}.body"));
                let body = fold_seq(body, [&ob, &nb], src, dst, renamed)?;
                let (os, ns) = (format!("{old}.shortcut"), format!("{new}.shortcut"));
                let shortcut = fold_seq(shortcut, [&os, &ns], src, dst, renamed)?;
                out.push(LayerSpec::Residual { body, shortcut });
            }
            (layer @ (LayerSpec::Concat { .. } | LayerSpec::TransformedConv { .. }), _) => {
                return Err(format!(
                    "{old}: batch-norm folding (quantization, binarization) does not take {} layers yet",
                    layer.kind()
                ));
            }
            (layer, _) => {
                // Any other layer keeps its tensors under its new path.
                let prefix = format!("{old}.");
                for (name, (data, _)) in src.iter().filter(|(n, _)| {
                    n.strip_prefix(&prefix)
                        .is_some_and(|rest| !rest.contains('.'))
                }) {
                    let rest = &name[prefix.len()..];
                    dst.insert(format!("{new}.{rest}"), (data.clone(), None));
                }
                out.push(layer.clone());
            }
        }
        i += 1;
    }
    Ok(out)
}
