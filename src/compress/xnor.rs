//! XNOR-Net's binary activations (Rastegari et al. 2016, section 3.2): besides BWN's binary
//! weights ([`super::binarize::Method::Xnor`]), each binarized layer takes the signs of its
//! input, so that its products are XNOR-popcounts. The paper's block (its Figure 3) is
//! batch norm → binarize → binary convolution → pool: the batch norm centres the input before
//! its sign is taken (after a ReLU every input would be +1). [`insert_batch_norms`] adds that
//! batch norm in front of every binarized layer that lacks one; [`sign_activation`] is the
//! binarization, with the straight-through estimator of Hubara et al. 2016 (eq. 4).
//!
//! The paper also scales each input window by `K`, the mean of its |x|; the authors' released
//! code leaves it out, and so does convpress. That is an approximation, not an equivalence (`K`
//! varies per window and image); computing it costs a full-precision pass over the input.
//!
//! A batch norm goes in front of a binarized layer unless the layer right before it in the
//! same sequence is one: at the head of a residual block's body or shortcut it is always
//! inserted (even if a batch norm precedes the block), and a block whose body and shortcut
//! both start with a binarized layer gets one in each. One inserted right after a convolution
//! is folded into it when the file is written (`compress::fold`): the signs of the folded
//! convolution's outputs are those of the batch norm's.

use crate::checkpoint::{Loaded, Tensors};
use crate::models::{Arch, LayerSpec};
use burn::prelude::*;
use burn::tensor::TensorData;
use std::collections::{BTreeMap, BTreeSet};

/// `sign(x)` in the forward pass (+1 for `x >= 0`, as the XNOR kernels pack it), the clipped
/// identity backward: the gradient passes where `|x| <= 1` and is 0 elsewhere.
pub fn sign_activation<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let clipped = x.clone().clamp(-1.0, 1.0);
    let sign = x
        .greater_equal_elem(0.0)
        .float()
        .mul_scalar(2.0)
        .sub_scalar(1.0);
    clipped.clone() + (sign - clipped).detach()
}

/// A model with XNOR-Net's batch norm in front of each of `layers` (paths of the model as
/// given) whose preceding layer in its sequence is not already one: `features` its input channels, `γ = 1`,
/// `β = 0`, running mean 0 and variance 1, to be trained. The layers after each are renumbered.
pub fn insert_batch_norms(model: &Loaded, layers: &BTreeSet<String>) -> Result<Inserted, String> {
    let mut tensors = Tensors::new();
    let mut renamed = BTreeMap::new();
    let mut inserted = Vec::new();
    let mut out = Inserter {
        layers,
        src: &model.tensors,
        dst: &mut tensors,
        renamed: &mut renamed,
        inserted: &mut inserted,
    };
    let specs = out.seq(&model.arch.layers, ["layers", "layers"])?;
    if let Some(missing) = layers.iter().find(|l| !renamed.contains_key(*l)) {
        return Err(format!("{missing} is not a layer of the model"));
    }
    let arch = Arch {
        layers: specs,
        ..model.arch.clone()
    };
    arch.validate()?;
    let with = Loaded {
        arch,
        meta: model.meta.clone(),
        tensors,
        quant: None,
    };
    Ok(Inserted {
        model: with,
        renamed,
        batch_norms: inserted,
    })
}

/// What [`insert_batch_norms`] gives.
#[derive(Debug, Clone)]
pub struct Inserted {
    pub model: Loaded,
    /// Every old layer path's new one.
    pub renamed: BTreeMap<String, String>,
    /// The inserted batch norms' paths.
    pub batch_norms: Vec<String>,
}

struct Inserter<'a> {
    layers: &'a BTreeSet<String>,
    src: &'a Tensors,
    dst: &'a mut Tensors,
    renamed: &'a mut BTreeMap<String, String>,
    inserted: &'a mut Vec<String>,
}

impl Inserter<'_> {
    fn seq(
        &mut self,
        layers: &[LayerSpec],
        [from, to]: [&str; 2],
    ) -> Result<Vec<LayerSpec>, String> {
        let mut out = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            let old = format!("{from}.{i}");
            let after_bn = i > 0 && matches!(layers[i - 1], LayerSpec::BatchNorm { .. });
            if self.layers.contains(&old) && !after_bn {
                let features = match *layer {
                    LayerSpec::Conv2d { in_channels, .. } => in_channels,
                    LayerSpec::Linear { in_features, .. } => in_features,
                    _ => return Err(format!("{old} is not a conv or linear layer")),
                };
                let bn = format!("{to}.{}", out.len());
                for (name, value) in [
                    ("gamma", 1.0f32),
                    ("beta", 0.0),
                    ("running_mean", 0.0),
                    ("running_var", 1.0),
                ] {
                    let data = TensorData::new(vec![value; features], vec![features]);
                    self.dst.insert(format!("{bn}.{name}"), (data, None));
                }
                out.push(LayerSpec::BatchNorm { features });
                self.inserted.push(bn);
            }
            let new = format!("{to}.{}", out.len());
            self.renamed.insert(old.clone(), new.clone());
            if let LayerSpec::Residual { body, shortcut } = layer {
                let body = self.seq(body, [&format!("{old}.body"), &format!("{new}.body")])?;
                let shortcut = self.seq(
                    shortcut,
                    [&format!("{old}.shortcut"), &format!("{new}.shortcut")],
                )?;
                out.push(LayerSpec::Residual { body, shortcut });
                continue;
            }
            // The layer's own tensors under its new path.
            let prefix = format!("{old}.");
            for (name, (data, _)) in self.src.iter() {
                if let Some(rest) = name.strip_prefix(&prefix)
                    && !rest.contains('.')
                {
                    self.dst
                        .insert(format!("{new}.{rest}"), (data.clone(), None));
                }
            }
            out.push(layer.clone());
        }
        Ok(out)
    }
}
