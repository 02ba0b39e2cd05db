//! Low-rank factorization: one dense or convolutional layer rewritten as a short sequence of
//! smaller ordinary layers whose product approximates it. The result is a plain architecture
//! of `conv2d` and `linear` layers, so training, every runtime kernel and the other
//! compression methods (pruning, quantization) run on it unchanged.
//!
//! The methods ([`Method`]), each a [`Factorization`] in its own module:
//! - [`svd`]: a dense layer `W ≈ U_r Σ_r V_rᵀ` as two dense layers (truncated SVD; the
//!   Eckart-Young theorem makes it the best rank-r approximation in the Frobenius norm);
//! - [`separable`]: a k×k convolution as a k×1 then a 1×k one (Jaderberg, Vedaldi, Zisserman
//!   2014, "Speeding up Convolutional Neural Networks with Low Rank Expansions", scheme 2);
//! - [`cp`]: 1×1 → k×1 depthwise → 1×k depthwise → 1×1 (Lebedev et al. 2015,
//!   "Speeding-up Convolutional Neural Networks Using Fine-tuned CP-Decomposition");
//! - [`tucker2`]: 1×1 → k×k core → 1×1 (Kim et al. 2016, "Compression of Deep Convolutional
//!   Neural Networks for Fast and Low Power Mobile Applications"), ranks by energy or [`vbmf`].
//!
//! A layer's rank comes from a [`RankRule`]: explicit, an energy threshold on singular values,
//! a target compression of the layer's parameters, or VBMF. [`decompose`] applies a method to
//! chosen layers of an architecture and renames the tensors of the layers after them.

pub mod cp;
pub mod linalg;
pub mod separable;
pub mod svd;
pub mod tucker2;
pub mod vbmf;

use crate::checkpoint::{Tensors, floats};
use crate::models::{Arch, LayerSpec};
use burn::prelude::TensorData;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The factorizations, by their command-line and recipe names.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, PartialOrd, Ord,
)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Dense layers: truncated SVD into two dense layers.
    Svd,
    /// Convolutions: k×1 to K channels, then 1×k (Jaderberg et al. 2014, scheme 2).
    Separable,
    /// Convolutions: CP decomposition, 1×1 → k×1 and 1×k depthwise → 1×1 (Lebedev et al. 2015).
    Cp,
    /// Convolutions: Tucker-2 by HOSVD, 1×1 → k×k core → 1×1 (Kim et al. 2016).
    Tucker2,
}

impl Method {
    /// The method's implementation: the one registry of factorizations.
    pub fn factorization(self) -> &'static dyn Factorization {
        match self {
            Method::Svd => &svd::TruncatedSvd,
            Method::Separable => &separable::Separable,
            Method::Cp => &cp::CpAls,
            Method::Tucker2 => &tucker2::Tucker2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Svd => "svd",
            Method::Separable => "separable",
            Method::Cp => "cp",
            Method::Tucker2 => "tucker2",
        }
    }
}

/// How a layer's rank is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RankRule {
    /// Explicit: one rank, or Tucker-2's input and output ranks (one number sets both).
    Rank(Vec<usize>),
    /// The smallest rank whose singular values hold this fraction of the squared sum
    /// (of the unfolding the method factorizes), in (0, 1].
    Energy(f64),
    /// The largest rank whose layers have at most 1/this of the original layer's parameters.
    Compression(f64),
    /// Empirical variational Bayesian matrix factorization (Nakajima et al. 2013), as Kim et
    /// al. 2016 choose Tucker-2 ranks.
    Vbmf,
}

impl RankRule {
    /// Refuses settings no layer could use (checked before any work).
    pub fn check(&self) -> Result<(), String> {
        match self {
            RankRule::Rank(r) if r.is_empty() || r.contains(&0) || r.len() > 2 => Err(format!(
                "rank must be one or two positive numbers, got {r:?}"
            )),
            RankRule::Energy(e) if !(e.is_finite() && *e > 0.0 && *e <= 1.0) => {
                Err(format!("energy must be in (0, 1], got {e}"))
            }
            RankRule::Compression(c) if !(c.is_finite() && *c >= 1.0) => Err(format!(
                "compression must be a number of at least 1, got {c}"
            )),
            _ => Ok(()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            RankRule::Rank(r) => format!("rank {}", show_rank(r)),
            RankRule::Energy(e) => format!("energy {e}"),
            RankRule::Compression(c) => format!("compression {c}x"),
            RankRule::Vbmf => "vbmf".into(),
        }
    }
}

/// A rank: one number, or Tucker-2's (input, output) pair.
pub type Rank = Vec<usize>;

/// `8` or `8,16`.
pub fn show_rank(r: &[usize]) -> String {
    r.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// One layer as a factorization reads it: its spec and its weights in Burn's layout (conv
/// `[out, in/groups, kh, kw]`, linear `[in, out]`).
pub struct LayerWeights<'a> {
    pub spec: &'a LayerSpec,
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
}

/// A spectral rank rule: what [`Factorization::spectral_rank`] is asked for.
#[derive(Debug, Clone, Copy)]
pub enum Spectral {
    Energy(f64),
    Vbmf,
}

/// One layer of a factorization's result: its spec and weights (layout as [`LayerWeights`]).
#[derive(Debug, Clone)]
pub struct Factor {
    pub spec: LayerSpec,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

/// A way to factorize one layer. The method computes *what* replaces the layer; the
/// `decompose` stage decides which layers and when (then fine-tunes).
pub trait Factorization: Sync {
    /// Why `spec` cannot be factorized this way (named by kind and shape), if it cannot.
    fn check(&self, spec: &LayerSpec) -> Result<(), String>;

    /// The largest meaningful rank (per entry of [`Rank`]): factors of that rank reproduce
    /// the layer exactly.
    fn max_rank(&self, spec: &LayerSpec) -> Rank;

    /// The layers that replace `spec` at `rank`, without weights (for costs).
    fn specs(&self, spec: &LayerSpec, rank: &Rank) -> Vec<LayerSpec>;

    /// Whether the spectral rules (energy, VBMF) apply: whether the method factorizes a
    /// matrix with singular values.
    fn has_spectrum(&self) -> bool {
        true
    }

    /// The rank a spectral rule picks from the weights.
    fn spectral_rank(&self, layer: &LayerWeights, rule: Spectral) -> Result<Rank, String>;

    /// The factors at `rank` (each entry in `1..=max_rank`).
    fn factorize(&self, layer: &LayerWeights, rank: &Rank) -> Result<Vec<Factor>, String>;

    /// Ranks tried by the compression rule, in increasing size: by default every rank up to
    /// the maximum (Tucker-2 scales both of its ranks together).
    fn candidates(&self, spec: &LayerSpec) -> Vec<Rank> {
        (1..=self.max_rank(spec)[0]).map(|r| vec![r]).collect()
    }
}

/// Refuses `rule` for `spec` under `method` before any weights are read: a layer the method
/// cannot take, a rule out of range, an explicit rank of the wrong length or above the
/// layer's largest meaningful rank, a spectral rule for a method without a spectrum.
pub fn check_rule(method: Method, spec: &LayerSpec, rule: &RankRule) -> Result<(), String> {
    let f = method.factorization();
    f.check(spec)?;
    rule.check()?;
    match rule {
        RankRule::Rank(r) => {
            explicit(method, spec, r)?;
        }
        RankRule::Energy(_) | RankRule::Vbmf if !f.has_spectrum() => {
            return Err(format!(
                "{} has no singular values to threshold: give a rank or a compression",
                method.name()
            ));
        }
        _ => {}
    }
    Ok(())
}

/// An explicit rank as the method takes it (one number sets both of Tucker-2's ranks).
fn explicit(method: Method, spec: &LayerSpec, r: &[usize]) -> Result<Rank, String> {
    let max = method.factorization().max_rank(spec);
    let r = if r.len() == 1 && max.len() == 2 {
        vec![r[0], r[0]]
    } else {
        r.to_vec()
    };
    if r.len() != max.len() {
        return Err(format!(
            "{} takes {} rank(s), got {}",
            method.name(),
            max.len(),
            show_rank(&r)
        ));
    }
    if r.iter().zip(&max).any(|(x, m)| x > m) {
        return Err(format!(
            "rank {} is above the largest meaningful rank {} of this {}",
            show_rank(&r),
            show_rank(&max),
            describe(spec)
        ));
    }
    Ok(r)
}

/// The rank `rule` picks for `layer` under `method`, checked against the layer's maximum.
pub fn choose_rank(method: Method, layer: &LayerWeights, rule: &RankRule) -> Result<Rank, String> {
    check_rule(method, layer.spec, rule)?;
    let f = method.factorization();
    let max = f.max_rank(layer.spec);
    let rank = match rule {
        RankRule::Rank(r) => explicit(method, layer.spec, r)?,
        RankRule::Compression(c) => {
            let limit = layer.spec.own_params() as f64 / c;
            let fits = |r: &Rank| {
                f.specs(layer.spec, r)
                    .iter()
                    .map(LayerSpec::own_params)
                    .sum::<usize>() as f64
                    <= limit
            };
            f.candidates(layer.spec)
                .into_iter()
                .rev()
                .find(fits)
                .ok_or_else(|| {
                    format!(
                        "even rank 1 keeps more than 1/{c} of the {} parameters of this {}",
                        layer.spec.own_params(),
                        describe(layer.spec)
                    )
                })?
        }
        RankRule::Energy(e) => f.spectral_rank(layer, Spectral::Energy(*e))?,
        RankRule::Vbmf => f.spectral_rank(layer, Spectral::Vbmf)?,
    };
    Ok(rank
        .iter()
        .zip(&max)
        .map(|(r, m)| (*r).clamp(1, *m))
        .collect())
}

/// FLOPs for one image of `layers` run in sequence on `input` (0 if they do not fit it).
pub fn chain_flops(layers: &[LayerSpec], mut input: crate::models::Shape) -> u64 {
    let mut total = 0u64;
    for l in layers {
        let Ok(out) = l.output_shape(input) else {
            return 0;
        };
        total = total.saturating_add(l.own_flops(input, out));
        input = out;
    }
    total
}

/// `conv2d 20->50 k5x5` or `linear 800->500`: how errors name a layer.
pub fn describe(spec: &LayerSpec) -> String {
    match spec {
        LayerSpec::Conv2d {
            in_channels,
            out_channels,
            kernel,
            groups,
            ..
        } => {
            let g = if *groups > 1 {
                format!(" groups {groups}")
            } else {
                String::new()
            };
            format!(
                "conv2d {in_channels}->{out_channels} k{}x{}{g}",
                kernel[0], kernel[1]
            )
        }
        LayerSpec::Linear {
            in_features,
            out_features,
            ..
        } => format!("linear {in_features}->{out_features}"),
        other => other.kind().to_string(),
    }
}

/// What [`decompose`] did to one layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerReport {
    /// The layer's path in the original architecture.
    pub path: String,
    /// The paths of the layers that replace it in the new one.
    pub new_paths: Vec<String>,
    pub rank: Rank,
    pub max_rank: Rank,
    /// Before and after.
    pub params: [usize; 2],
    pub flops: [u64; 2],
    /// `‖W − Ŵ‖_F / ‖W‖_F` of the layer's weight (Ŵ rebuilt from the factors).
    pub relative_error: f64,
    /// How the rank was chosen.
    pub rule: String,
}

/// An architecture with some layers factorized, its tensors, and one report per layer.
#[derive(Debug)]
pub struct Decomposed {
    pub arch: Arch,
    pub tensors: Tensors,
    pub layers: Vec<LayerReport>,
}

/// The layers of `arch` that `method` can factorize, by path, each with why not if it cannot.
pub fn eligibility(arch: &Arch, method: Method) -> Vec<(String, Result<(), String>)> {
    let f = method.factorization();
    arch.layer_specs()
        .into_iter()
        .filter(|(_, s)| matches!(s, LayerSpec::Conv2d { .. } | LayerSpec::Linear { .. }))
        .map(|(p, s)| (p, f.check(s)))
        .collect()
}

/// Factorizes the layers of `arch` named in `rules` (path to rule) with `method`; every other
/// layer keeps its weights, renamed to its new path.
pub fn decompose(
    arch: &Arch,
    tensors: &Tensors,
    method: Method,
    rules: &BTreeMap<String, RankRule>,
) -> Result<Decomposed, String> {
    let specs = arch.layer_specs();
    let f = method.factorization();
    let mut factors: BTreeMap<String, (Vec<Factor>, LayerReport)> = BTreeMap::new();
    for (path, rule) in rules {
        let spec = *specs
            .get(path)
            .ok_or_else(|| format!("{path}: there is no such layer"))?;
        f.check(spec).map_err(|e| format!("{path}: {e}"))?;
        let (weight, _) = floats(tensors, &format!("{path}.weight"))?;
        let bias = match tensors.contains_key(&format!("{path}.bias")) {
            true => Some(floats(tensors, &format!("{path}.bias"))?.0),
            false => None,
        };
        let layer = LayerWeights {
            spec,
            weight: &weight,
            bias: bias.as_deref(),
        };
        let rank = choose_rank(method, &layer, rule).map_err(|e| format!("{path}: {e}"))?;
        let fs = f
            .factorize(&layer, &rank)
            .map_err(|e| format!("{path}: {e}"))?;
        let rebuilt = reconstruct(spec, &fs)?;
        let report = LayerReport {
            path: path.clone(),
            new_paths: vec![],
            max_rank: f.max_rank(spec),
            rank,
            params: [
                spec.own_params(),
                fs.iter().map(|x| x.spec.own_params()).sum(),
            ],
            flops: [0, 0],
            relative_error: relative_error(&weight, &rebuilt),
            rule: rule.describe(),
        };
        factors.insert(path.clone(), (fs, report));
    }
    let mut out = Tensors::new();
    let mut moved = BTreeMap::new();
    let layers = rewrite(
        &arch.layers,
        "layers",
        "layers",
        tensors,
        &mut factors,
        &mut out,
        &mut moved,
    )?;
    let new = Arch {
        layers,
        ..arch.clone()
    };
    new.validate()
        .map_err(|e| format!("internal error: the factorized architecture is invalid: {e}"))?;
    let flops_of = |a: &Arch| -> BTreeMap<String, u64> {
        a.layer_stats()
            .into_iter()
            .map(|s| (s.path, s.flops))
            .collect()
    };
    let (before, after) = (flops_of(arch), flops_of(&new));
    let mut reports = Vec::new();
    for (path, (_, mut r)) in factors {
        r.new_paths = moved.remove(&path).unwrap_or_default();
        r.flops = [
            before[&path],
            r.new_paths.iter().map(|p| after[p]).sum::<u64>(),
        ];
        reports.push(r);
    }
    Ok(Decomposed {
        arch: new,
        tensors: out,
        layers: reports,
    })
}

/// Copies `layers` (old paths under `old`) to new paths under `new`, replacing the factorized
/// ones by their factors; records the new paths of each factorized layer in `moved`.
fn rewrite(
    layers: &[LayerSpec],
    old: &str,
    new: &str,
    tensors: &Tensors,
    factors: &mut BTreeMap<String, (Vec<Factor>, LayerReport)>,
    out: &mut Tensors,
    moved: &mut BTreeMap<String, Vec<String>>,
) -> Result<Vec<LayerSpec>, String> {
    let mut specs = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let old_path = format!("{old}.{i}");
        if let Some((fs, _)) = factors.get(&old_path) {
            let mut paths = Vec::new();
            for f in fs {
                let path = format!("{new}.{}", specs.len());
                let shape = weight_shape(&f.spec);
                out.insert(
                    format!("{path}.weight"),
                    (TensorData::new(f.weight.clone(), shape), None),
                );
                if let Some(b) = &f.bias {
                    out.insert(
                        format!("{path}.bias"),
                        (TensorData::new(b.clone(), [b.len()]), None),
                    );
                }
                specs.push(f.spec.clone());
                paths.push(path);
            }
            moved.insert(old_path, paths);
            continue;
        }
        let new_path = format!("{new}.{}", specs.len());
        let spec = match layer {
            LayerSpec::Residual { body, shortcut } => LayerSpec::Residual {
                body: rewrite(
                    body,
                    &format!("{old_path}.body"),
                    &format!("{new_path}.body"),
                    tensors,
                    factors,
                    out,
                    moved,
                )?,
                shortcut: rewrite(
                    shortcut,
                    &format!("{old_path}.shortcut"),
                    &format!("{new_path}.shortcut"),
                    tensors,
                    factors,
                    out,
                    moved,
                )?,
            },
            LayerSpec::Concat { .. } => {
                return Err(format!(
                    "{old_path}: low-rank factorization does not reach into concat layers yet"
                ));
            }
            other => {
                let prefix = format!("{old_path}.");
                for (name, t) in tensors {
                    if let Some(rest) = name.strip_prefix(&prefix)
                        && !rest.contains('.')
                    {
                        out.insert(format!("{new_path}.{rest}"), t.clone());
                    }
                }
                other.clone()
            }
        };
        specs.push(spec);
    }
    Ok(specs)
}

/// A conv or linear layer's weight shape in Burn's layout.
pub fn weight_shape(spec: &LayerSpec) -> Vec<usize> {
    match *spec {
        LayerSpec::Conv2d {
            in_channels,
            out_channels,
            kernel,
            groups,
            ..
        } => vec![out_channels, in_channels / groups, kernel[0], kernel[1]],
        LayerSpec::Linear {
            in_features,
            out_features,
            ..
        } => vec![in_features, out_features],
        _ => vec![],
    }
}

/// `‖a − b‖ / ‖a‖` (0 for a zero `a` rebuilt exactly).
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// The single layer that `factors` compute together, as a weight in `spec`'s layout: the
/// product of the factors. Every factorization here is linear in its input (no bias until the
/// last factor, no nonlinearity between), so the sequence is one layer of this weight; the
/// tests hold the sequence's outputs to the convolution with it.
pub fn reconstruct(spec: &LayerSpec, factors: &[Factor]) -> Result<Vec<f32>, String> {
    match *spec {
        LayerSpec::Linear {
            in_features,
            out_features,
            ..
        } => {
            // x W1 W2 ... : multiply the [in, out] matrices.
            let mut acc = linalg::matrix(&identity(in_features), in_features, in_features);
            for f in factors {
                let [i, o] = weight_shape(&f.spec)[..] else {
                    return Err("internal error: a dense factor that is not linear".into());
                };
                acc = &acc * &linalg::matrix(&f.weight, i, o);
            }
            if acc.ncols() != out_features {
                return Err("internal error: factors do not end at the layer's outputs".into());
            }
            Ok(linalg::values(&acc))
        }
        LayerSpec::Conv2d {
            in_channels,
            out_channels,
            kernel,
            ..
        } => {
            // The response of the factor chain to a unit impulse in each input channel, read
            // back at the kernel's taps, is the equivalent kernel. Computed with stride 1, no
            // padding and no dilation on an impulse image of the kernel's size (dilation
            // spreads taps apart but does not change which weights multiply which).
            let [kh, kw] = kernel;
            let mut w = vec![0f32; out_channels * in_channels * kh * kw];
            for c in 0..in_channels {
                // Image [in, 2kh-1, 2kw-1] with a 1 at channel c, centre (kh-1, kw-1).
                let (h, wd) = (2 * kh - 1, 2 * kw - 1);
                let mut x = vec![0f32; in_channels * h * wd];
                x[(c * h + kh - 1) * wd + kw - 1] = 1.0;
                let mut shape = [in_channels, h, wd];
                for f in factors {
                    (x, shape) = correlate(&x, shape, f)?;
                }
                // Output [out, kh, kw]: y[o, i, j] = Σ W[o, c, y, x] δ(i + y = kh-1, j + x = kw-1)
                // = W[o, c, kh-1-i, kw-1-j].
                if shape != [out_channels, kh, kw] {
                    return Err("internal error: factors do not rebuild the kernel's shape".into());
                }
                for o in 0..out_channels {
                    for i in 0..kh {
                        for j in 0..kw {
                            w[((o * in_channels + c) * kh + (kh - 1 - i)) * kw + (kw - 1 - j)] =
                                x[(o * kh + i) * kw + j];
                        }
                    }
                }
            }
            Ok(w)
        }
        _ => Err(format!("{} has no weight to rebuild", spec.kind())),
    }
}

fn identity(n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    v
}

/// A plain cross-correlation of one image `[C, H, W]` with a factor's weights (stride 1, no
/// padding, no dilation, groups honoured, no bias): the reference that [`reconstruct`] uses.
fn correlate(
    x: &[f32],
    [c, h, w]: [usize; 3],
    f: &Factor,
) -> Result<(Vec<f32>, [usize; 3]), String> {
    let LayerSpec::Conv2d {
        in_channels,
        out_channels,
        kernel: [kh, kw],
        groups,
        ..
    } = f.spec
    else {
        return Err("internal error: a conv factor that is not a convolution".into());
    };
    if in_channels != c || h < kh || w < kw {
        return Err("internal error: factor shapes do not chain".into());
    }
    let (oh, ow) = (h - kh + 1, w - kw + 1);
    let (cin_g, cout_g) = (in_channels / groups, out_channels / groups);
    let mut y = vec![0f32; out_channels * oh * ow];
    for o in 0..out_channels {
        let g = o / cout_g;
        for ci in 0..cin_g {
            let cin = g * cin_g + ci;
            for a in 0..kh {
                for b in 0..kw {
                    let wt = f.weight[((o * cin_g + ci) * kh + a) * kw + b];
                    if wt == 0.0 {
                        continue;
                    }
                    for i in 0..oh {
                        for j in 0..ow {
                            y[(o * oh + i) * ow + j] += wt * x[(cin * h + i + a) * w + j + b];
                        }
                    }
                }
            }
        }
    }
    Ok((y, [out_channels, oh, ow]))
}

/// A convolution spec like `like` (its stride, padding and dilation on the axes `axes` keeps:
/// `[true, false]` keeps the vertical ones) with new channels, kernel, groups and bias.
pub fn conv_like(
    like: &LayerSpec,
    channels: [usize; 2],
    kernel: [usize; 2],
    groups: usize,
    axes: [bool; 2],
    bias: bool,
) -> LayerSpec {
    let LayerSpec::Conv2d {
        stride,
        padding,
        pad_extra,
        dilation,
        ..
    } = *like
    else {
        unreachable!("conv_like takes a convolution (checked by the factorization)")
    };
    let pick = |v: [usize; 2], default: usize| {
        [
            if axes[0] { v[0] } else { default },
            if axes[1] { v[1] } else { default },
        ]
    };
    LayerSpec::Conv2d {
        in_channels: channels[0],
        out_channels: channels[1],
        kernel,
        stride: pick(stride, 1),
        padding: pick(padding, 0),
        pad_extra: pick(pad_extra, 0),
        dilation: pick(dilation, 1),
        groups,
        bias,
    }
}

/// Refuses anything but an ungrouped convolution (what the conv factorizations take).
pub fn plain_conv(spec: &LayerSpec, method: &str) -> Result<(usize, usize, [usize; 2]), String> {
    match *spec {
        LayerSpec::Conv2d {
            in_channels,
            out_channels,
            kernel,
            groups: 1,
            ..
        } => Ok((in_channels, out_channels, kernel)),
        LayerSpec::Conv2d { .. } => Err(format!(
            "{} is a grouped convolution: {method} factorizes ungrouped ones",
            describe(spec)
        )),
        _ => Err(format!(
            "{} is not a convolution: {method} factorizes conv2d layers{}",
            describe(spec),
            if matches!(spec, LayerSpec::Linear { .. }) {
                " (dense layers: --method svd)"
            } else {
                ""
            }
        )),
    }
}
