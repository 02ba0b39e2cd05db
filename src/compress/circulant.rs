//! Circulant projections (Cheng et al. 2015, "An exploration of parameter redundancy in deep
//! networks with circulant projections"): a dense layer `y = W x + b` replaced by
//! `y = (circ(r) D x̃)[..out] + b` ([`crate::kernels::circulant`]), `max(in, out)` weights
//! instead of `in·out`, applied in O(d log d). Non-square layers are padded to the larger
//! side (the paper's section 3.1).
//!
//! [`replace`] rewrites chosen dense layers in place (same paths, same biases). The new
//! vector starts either at random (the paper trains circulant layers from scratch) or as the
//! least-squares fit to the trained dense weight ([`Init::Project`]), which fine-tuning then
//! corrects.

use crate::checkpoint::{Tensors, floats};
use crate::kernels::circulant::signs;
use crate::models::{Arch, LayerSpec};
use burn::prelude::TensorData;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a circulant layer's vector starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// The circulant matrix nearest the dense weight (least squares over its entries).
    #[default]
    Project,
    /// Uniform in ±1/√in, as a fresh dense layer of the same fan-in; the bias is kept.
    Random,
}

/// One replaced layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    pub path: String,
    pub in_features: usize,
    pub out_features: usize,
    /// The circulant size, `max(in, out)`.
    pub d: usize,
    /// Before and after.
    pub params: [usize; 2],
    pub flops: [u64; 2],
    /// `‖W − Ŵ‖_F / ‖W‖_F` between the dense weight and the circulant layer's explicit matrix.
    pub relative_error: f64,
}

/// An architecture with some dense layers made circulant, its tensors, one report per layer.
#[derive(Debug, Clone)]
pub struct Replaced {
    pub arch: Arch,
    pub tensors: Tensors,
    pub layers: Vec<LayerReport>,
}

/// The dense layers the default choice replaces: every one but the last weighted layer (the
/// classifier, whose few outputs a circulant matrix of `max(in, out)` values would mostly
/// pad). Others are named explicitly.
pub fn default_layers(arch: &Arch) -> Vec<String> {
    let weighted: Vec<(String, &'static str)> = arch
        .layer_stats()
        .into_iter()
        .filter(|s| matches!(s.kind, "conv2d" | "linear" | "circulant"))
        .map(|s| (s.path, s.kind))
        .collect();
    let n = weighted.len();
    weighted
        .into_iter()
        .take(n.saturating_sub(1))
        .filter(|(_, kind)| *kind == "linear")
        .map(|(p, _)| p)
        .collect()
}

/// Why `spec` cannot become circulant, if it cannot.
pub fn check(spec: &LayerSpec) -> Result<(), String> {
    match spec {
        LayerSpec::Linear { .. } => Ok(()),
        LayerSpec::Circulant { .. } => Err("is circulant already".into()),
        other => Err(format!(
            "is a {} layer: circulant projections replace dense (linear) layers only",
            other.kind()
        )),
    }
}

/// The architecture with the layers at `paths` circulant (sign seeds `seed + i` in path
/// order); refuses a path that is not a dense layer, naming it.
pub fn rewrite_arch(arch: &Arch, paths: &[String], seed: u64) -> Result<Arch, String> {
    let mut out = arch.clone();
    let specs = arch.layer_specs();
    for (i, path) in paths.iter().enumerate() {
        let spec = specs
            .get(path)
            .ok_or_else(|| format!("{path}: no such layer"))?;
        check(spec).map_err(|e| format!("{path} {e}"))?;
        let &LayerSpec::Linear {
            in_features,
            out_features,
            bias,
        } = *spec
        else {
            unreachable!("checked");
        };
        *out.layer_mut(path)? = LayerSpec::Circulant {
            in_features,
            out_features,
            bias,
            sign_seed: seed.wrapping_add(i as u64),
        };
    }
    out.validate()?;
    Ok(out)
}

/// The least-squares circulant vector for a dense weight in Burn's `[in, out]` layout under
/// input signs `s`: `min Σ (r[(o − i) mod d]·s[i] − W[o][i])²` over the layer's entries, whose
/// solution is the mean of `W[o][i]·s[i]` along each wrapped diagonal `(o − i) mod d`.
pub fn project(in_features: usize, out_features: usize, w_in_out: &[f32], s: &[f32]) -> Vec<f32> {
    let d = in_features.max(out_features);
    let mut sum = vec![0.0f64; d];
    let mut count = vec![0usize; d];
    for (i, &sign) in s.iter().enumerate().take(in_features) {
        for o in 0..out_features {
            let k = (o + d - i) % d;
            sum[k] += (w_in_out[i * out_features + o] * sign) as f64;
            count[k] += 1;
        }
    }
    sum.iter()
        .zip(&count)
        .map(|(&a, &n)| if n == 0 { 0.0 } else { (a / n as f64) as f32 })
        .collect()
}

/// `‖W − circ(r)·D‖_F / ‖W‖_F` over the layer's entries.
fn relative_error(
    in_features: usize,
    out_features: usize,
    w_in_out: &[f32],
    r: &[f32],
    s: &[f32],
) -> f64 {
    let d = r.len();
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (i, &sign) in s.iter().enumerate().take(in_features) {
        for o in 0..out_features {
            let w = w_in_out[i * out_features + o] as f64;
            let c = (r[(o + d - i) % d] * sign) as f64;
            diff += (w - c) * (w - c);
            norm += w * w;
        }
    }
    if norm == 0.0 {
        if diff == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        (diff / norm).sqrt()
    }
}

/// Replaces the dense layers at `paths` with circulant ones, initialised by `init` (random
/// draws seeded by `seed`); every other tensor is kept.
pub fn replace(
    arch: &Arch,
    tensors: &Tensors,
    paths: &[String],
    init: Init,
    seed: u64,
) -> Result<Replaced, String> {
    let new_arch = rewrite_arch(arch, paths, seed)?;
    let old_stats: BTreeMap<String, _> = arch
        .layer_stats()
        .into_iter()
        .map(|s| (s.path.clone(), s))
        .collect();
    let new_stats: BTreeMap<String, _> = new_arch
        .layer_stats()
        .into_iter()
        .map(|s| (s.path.clone(), s))
        .collect();
    let new_specs = new_arch.layer_specs();
    let mut out = tensors.clone();
    let mut layers = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for path in paths {
        let &LayerSpec::Circulant {
            in_features,
            out_features,
            sign_seed,
            ..
        } = new_specs[path]
        else {
            unreachable!("rewritten above");
        };
        let name = format!("{path}.weight");
        let (w, _) = floats(tensors, &name)?;
        if w.len() != in_features * out_features {
            return Err(format!(
                "{name} does not have {in_features}x{out_features} values"
            ));
        }
        let s = signs(sign_seed, in_features);
        let d = in_features.max(out_features);
        let r = match init {
            Init::Project => project(in_features, out_features, &w, &s),
            Init::Random => {
                let bound = 1.0 / (in_features as f32).sqrt();
                (0..d).map(|_| rng.random_range(-bound..=bound)).collect()
            }
        };
        layers.push(LayerReport {
            path: path.clone(),
            in_features,
            out_features,
            d,
            params: [old_stats[path].params, new_stats[path].params],
            flops: [old_stats[path].flops, new_stats[path].flops],
            relative_error: relative_error(in_features, out_features, &w, &r, &s),
        });
        out.insert(name, (TensorData::new(r, [d]), None));
    }
    Ok(Replaced {
        arch: new_arch,
        tensors: out,
        layers,
    })
}
