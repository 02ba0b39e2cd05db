//! Kernel rescaling (Gusmão, Francini, Lepsøy, Magli 2016, "Fast Training of Convolutional
//! Neural Networks via Kernel Rescaling", arXiv:1610.03623).
//!
//! Convolution commutes with shrinking, up to discretisation and a factor s² in amplitude: if
//! an image and a kernel are both shrunk by s, their convolution is the shrunk convolution of
//! the originals. So a network is first trained as its *low-resolution twin* (kernels and
//! images shrunk by s, far fewer FLOPs), then its kernels are interpolated back up to full
//! size with an amplitude correction and training continues at full resolution.
//!
//! Choices the paper leaves open, and what convpress does (each a parameter where it matters):
//! - Kernel sizes: `k -> max(1, round(k s))` (half away from zero: 5 -> 3 at s = 0.5), or the
//!   nearest odd size for networks with residual additions ([`KernelRule`]). Strides,
//!   dilations and pooling are kept, so feature maps shrink with the image; a "same" convolution
//!   (2p = d(k - 1)) stays "same": `d(k' - 1)` zeros in all, the odd one after the input when
//!   `k'` is even (so the round rule keeps residual shapes: 3 -> 2 at s = 0.5 with padding
//!   (0, 1)); other padding is `round(p s)`.
//! - A dense layer reading a flattened map is a convolution whose kernel covers the map: its
//!   weights are reshaped to `(out, C, H, W)` and rescaled like kernels ([`rescale_tensors`]).
//! - Amplitude: multiplied by the ratio of tap counts, `(k'_h k'_w) / (k_h k_w)`
//!   ([`interp::rescale_plane`]). Biases and batch-norm statistics are carried unchanged (the
//!   correction keeps activations on the same scale, so the statistics still fit).
//! - Optimizer state: reset at the switch (the default), or carried
//!   ([`phases::OptimizerState`]): each momentum tensor is a weight-space direction, so it is
//!   rescaled exactly like its weight ([`rescale_optimizer_state`]).
//! - When to switch: [`phases::Switch`].

pub mod compare;
pub mod interp;
pub mod phases;

pub use interp::Interp;

use crate::checkpoint::{Tensors, floats};
use crate::models::{Arch, LayerSpec, Shape};
use burn::prelude::TensorData;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// How a kernel size is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KernelRule {
    /// `max(1, round(k s))`, half away from zero (5 -> 3 and 3 -> 2 at s = 0.5).
    #[default]
    Round,
    /// The odd size nearest to `k s`, ties to the larger (3 -> 1, 5 -> 3, 7 -> 3 at s = 0.5):
    /// "same" convolutions stay centred and symmetric (an even kernel keeps a map's size with
    /// one extra row and column of padding after it).
    Odd,
}

impl KernelRule {
    pub fn apply(self, k: usize, scale: f64) -> usize {
        let x = k as f64 * scale;
        match self {
            KernelRule::Round => (x.round() as usize).max(1),
            KernelRule::Odd => {
                // Odd numbers 2m + 1; nearest m to (x - 1) / 2, ties up.
                let m = ((x - 1.0) / 2.0 + 0.5).floor().max(0.0) as usize;
                2 * m + 1
            }
        }
    }
}

/// The low-resolution twin of `arch` for scale factor `scale` in (0, 1): same layers and
/// channels, input `round(H s) x round(W s)`, kernels `max(1, round(k s))`. Fails, naming the
/// layer, when a feature map vanishes or residual branches stop agreeing.
pub fn low_res_twin(arch: &Arch, scale: f64, rule: KernelRule) -> Result<Arch, String> {
    if !(scale.is_finite() && scale > 0.0 && scale < 1.0) {
        return Err(format!(
            "the rescaling factor must be in (0, 1), got {scale}"
        ));
    }
    let [c, h, w] = arch.input;
    let (h2, w2) = (
        (h as f64 * scale).round() as usize,
        (w as f64 * scale).round() as usize,
    );
    if h2 == 0 || w2 == 0 {
        return Err(format!(
            "scale {scale} shrinks the {h}x{w} input to nothing"
        ));
    }
    let input = [c, h2, w2];
    let (layers, _) = twin_layers(&arch.layers, "layers", Shape::Map(input), scale, rule)
        .map_err(|e| format!("{} cannot be rescaled by {scale}: {e}", arch.name))?;
    let twin = Arch {
        name: arch.name.clone(),
        input,
        classes: arch.classes,
        layers,
    };
    twin.validate()
        .map_err(|e| format!("{} cannot be rescaled by {scale}: {e}", arch.name))?;
    Ok(twin)
}

fn twin_layers(
    layers: &[LayerSpec],
    prefix: &str,
    mut shape: Shape,
    scale: f64,
    rule: KernelRule,
) -> Result<(Vec<LayerSpec>, Shape), String> {
    let mut out = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let path = format!("{prefix}.{i}");
        let twin = match layer {
            &LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                pad_extra,
                dilation,
                groups,
                bias,
            } => {
                let k2 = [rule.apply(kernel[0], scale), rule.apply(kernel[1], scale)];
                // (before, extra after): a "same" convolution stays "same", its odd pixel of
                // padding after the input when the new kernel is even.
                let pad = |d: usize| {
                    if pad_extra[d] == 0 && 2 * padding[d] == dilation[d] * (kernel[d] - 1) {
                        let total = dilation[d] * (k2[d] - 1);
                        (total / 2, total % 2)
                    } else {
                        let p = |v: usize| (v as f64 * scale).round() as usize;
                        (p(padding[d]), p(padding[d] + pad_extra[d]) - p(padding[d]))
                    }
                };
                let (p0, p1) = (pad(0), pad(1));
                LayerSpec::Conv2d {
                    in_channels,
                    out_channels,
                    kernel: k2,
                    stride,
                    padding: [p0.0, p1.0],
                    pad_extra: [p0.1, p1.1],
                    dilation,
                    groups,
                    bias,
                }
            }
            &LayerSpec::Linear {
                out_features, bias, ..
            } => LayerSpec::Linear {
                in_features: shape.numel(),
                out_features,
                bias,
            },
            LayerSpec::Residual { body, shortcut } => {
                let (b, bs) = twin_layers(body, &format!("{path}.body"), shape, scale, rule)?;
                let (s, ss) =
                    twin_layers(shortcut, &format!("{path}.shortcut"), shape, scale, rule)?;
                if bs != ss {
                    return Err(format!(
                        "{path}: at low resolution the residual body gives {bs} but the shortcut {ss} (try the odd kernel rule)"
                    ));
                }
                LayerSpec::Residual {
                    body: b,
                    shortcut: s,
                }
            }
            other @ (LayerSpec::Concat { .. } | LayerSpec::TransformedConv { .. }) => {
                return Err(format!(
                    "{path}: kernel rescaling does not take {} layers yet",
                    other.kind()
                ));
            }
            other => other.clone(),
        };
        shape = twin
            .output_shape(shape)
            .map_err(|e| format!("{path} ({}): {e}", layer.kind()))?;
        out.push(twin);
    }
    Ok((out, shape))
}

/// Features between layers while walking two architectures side by side: a map, or a flat
/// vector that may be a flattened map.
#[derive(Debug, Clone, Copy)]
enum Feat {
    Map([usize; 3]),
    Flat { n: usize, map: Option<[usize; 3]> },
}

/// Carries the trained tensors of `from` (a twin) to `to` (the full model, or any architecture
/// with the same layers and channels and other kernel or map sizes): conv kernels and the
/// weights of a dense layer reading a flattened map are resampled with `interp` and
/// amplitude-corrected; everything else is copied. Parameter ids are kept.
pub fn rescale_tensors(
    from: &Arch,
    to: &Arch,
    tensors: &Tensors,
    interp: Interp,
) -> Result<Tensors, String> {
    let mut out = tensors.clone();
    walk_pair(
        &from.layers,
        &to.layers,
        "layers",
        Feat::Map(from.input),
        Feat::Map(to.input),
        &mut |path, a, b, fa, fb| rescale_layer(path, a, b, fa, fb, tensors, &mut out, interp),
    )?;
    Ok(out)
}

/// Rescales a saved optimizer state (`optimizer.bpk` of the low-resolution phase) for the
/// full model. Each per-parameter state tensor (SGD's velocity, Adam's moments) is a direction
/// in weight space, so it is resampled exactly like the weight it belongs to (kernels
/// interpolated with the amplitude correction, the rest carried unchanged); parameters are
/// matched by id, which the rescaled checkpoint keeps. `weights` are the twin's tensors.
pub fn rescale_optimizer_state(
    from: &Arch,
    to: &Arch,
    weights: &Tensors,
    state: &std::path::Path,
    out: &std::path::Path,
    interp: Interp,
) -> Result<(), String> {
    let reader =
        burn_pack::Reader::from_file(state).map_err(|e| format!("{}: {e}", state.display()))?;
    let scalars = reader.scalars().clone();
    let metadata = reader.metadata().clone();
    let entries = reader
        .into_tensors()
        .map_err(|e| format!("{}: {e}", state.display()))?
        .into_iter()
        .map(|t| {
            t.into_parts()
                .map_err(|e| format!("{}: {e}", state.display()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let path_of: HashMap<u64, &String> = weights
        .iter()
        .filter_map(|(path, (_, id))| id.map(|id| (id.val(), path)))
        .collect();
    // One rescaling pass per state field ("velocity", "moment_1", ...): the twin's tensors with
    // that field's values in place of the weights they belong to.
    let field = |name: &str| {
        name.split_once('.')
            .map_or(String::new(), |(_, f)| f.to_string())
    };
    let mut fields: Vec<String> = entries.iter().map(|e| field(&e.0)).collect();
    fields.sort();
    fields.dedup();
    let mut rescaled: HashMap<String, TensorData> = HashMap::new();
    for f in &fields {
        let mut map = weights.clone();
        for (name, dtype, shape, id, bytes) in &entries {
            let Some(path) = id.and_then(|id| path_of.get(&id)) else {
                continue;
            };
            if field(name) != *f || *map[*path].0.shape() != *shape {
                continue;
            }
            let data = TensorData::from_bytes(bytes.clone(), shape.clone(), *dtype);
            map.get_mut(*path).expect("known path").0 = data;
        }
        let out_map = rescale_tensors(from, to, &map, interp)?;
        for (name, _, shape, id, _) in &entries {
            let Some(path) = id.and_then(|id| path_of.get(&id)) else {
                continue;
            };
            if field(name) == *f && *weights[*path].0.shape() == *shape {
                rescaled.insert(name.clone(), out_map[*path].0.clone());
            }
        }
    }
    let tensors = entries
        .into_iter()
        .map(
            |(name, dtype, shape, id, bytes)| match rescaled.remove(&name) {
                Some(data) => {
                    let (bytes, shape, dtype) = data.into_parts();
                    burn_pack::Tensor::new(name, dtype, shape, id, bytes)
                }
                None => burn_pack::Tensor::new(name, dtype, shape, id, bytes),
            },
        )
        .collect();
    let mut writer = burn_pack::Writer::new(tensors);
    for (k, v) in &scalars {
        writer = writer.with_scalar(k, *v);
    }
    for (k, v) in &metadata {
        writer = writer.with_metadata(k, v);
    }
    writer
        .overwrite(true)
        .write_to_file(out)
        .map_err(|e| format!("{}: {e}", out.display()))
}

type Visit<'a> = dyn FnMut(&str, &LayerSpec, &LayerSpec, Feat, Feat) -> Result<(), String> + 'a;

fn walk_pair(
    a: &[LayerSpec],
    b: &[LayerSpec],
    prefix: &str,
    mut fa: Feat,
    mut fb: Feat,
    visit: &mut Visit<'_>,
) -> Result<(Feat, Feat), String> {
    if a.len() != b.len() {
        return Err(format!("{prefix}: {} layers against {}", a.len(), b.len()));
    }
    for (i, (la, lb)) in a.iter().zip(b).enumerate() {
        let path = format!("{prefix}.{i}");
        if la.kind() != lb.kind() {
            return Err(format!("{path}: {} against {}", la.kind(), lb.kind()));
        }
        visit(&path, la, lb, fa, fb)?;
        if let (
            LayerSpec::Residual {
                body: ba,
                shortcut: sa,
            },
            LayerSpec::Residual {
                body: bb,
                shortcut: sb,
            },
        ) = (la, lb)
        {
            walk_pair(ba, bb, &format!("{path}.body"), fa, fb, visit)?;
            walk_pair(sa, sb, &format!("{path}.shortcut"), fa, fb, visit)?;
        }
        let next = |l: &LayerSpec, f: Feat| -> Result<Feat, String> {
            let shape = match f {
                Feat::Map(m) => Shape::Map(m),
                Feat::Flat { n, .. } => Shape::Flat(n),
            };
            Ok(match l.output_shape(shape)? {
                Shape::Map(m) => Feat::Map(m),
                Shape::Flat(n) => match (l, f) {
                    (LayerSpec::Flatten, Feat::Map(m)) => Feat::Flat { n, map: Some(m) },
                    (LayerSpec::Linear { .. }, _) | (_, Feat::Map(_)) => {
                        Feat::Flat { n, map: None }
                    }
                    (_, Feat::Flat { map, .. }) => Feat::Flat { n, map },
                },
            })
        };
        fa = next(la, fa).map_err(|e| format!("{path}: {e}"))?;
        fb = next(lb, fb).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok((fa, fb))
}

#[allow(clippy::too_many_arguments)]
fn rescale_layer(
    path: &str,
    a: &LayerSpec,
    b: &LayerSpec,
    fa: Feat,
    fb: Feat,
    tensors: &Tensors,
    out: &mut Tensors,
    interp: Interp,
) -> Result<(), String> {
    let weight = format!("{path}.weight");
    let id = tensors.get(&weight).and_then(|(_, id)| *id);
    match (a, b) {
        (
            LayerSpec::Conv2d {
                in_channels: ia,
                out_channels: oa,
                kernel: ka,
                groups: ga,
                ..
            },
            LayerSpec::Conv2d {
                in_channels: ib,
                out_channels: ob,
                kernel: kb,
                groups: gb,
                ..
            },
        ) => {
            if (ia, oa, ga) != (ib, ob, gb) {
                return Err(format!("{path}: channels differ, only kernel sizes may"));
            }
            let (w, shape) = floats(tensors, &weight)?;
            let planes = shape[0] * shape[1];
            let (pa, pb) = (ka[0] * ka[1], kb[0] * kb[1]);
            let mut new = Vec::with_capacity(planes * pb);
            for p in 0..planes {
                new.extend(interp::rescale_plane(
                    &w[p * pa..(p + 1) * pa],
                    *ka,
                    *kb,
                    interp,
                ));
            }
            out.insert(
                weight,
                (TensorData::new(new, [shape[0], shape[1], kb[0], kb[1]]), id),
            );
        }
        (
            LayerSpec::Linear {
                in_features: na,
                out_features: oa,
                ..
            },
            LayerSpec::Linear {
                in_features: nb,
                out_features: ob,
                ..
            },
        ) => {
            if oa != ob {
                return Err(format!("{path}: output sizes differ"));
            }
            if na == nb {
                return Ok(());
            }
            let (
                Feat::Flat {
                    map: Some([ca, ha, wa]),
                    ..
                },
                Feat::Flat {
                    map: Some([cb, hb, wb]),
                    ..
                },
            ) = (fa, fb)
            else {
                return Err(format!(
                    "{path}: input sizes differ ({na} against {nb}) but it does not read a flattened map"
                ));
            };
            if ca != cb {
                return Err(format!("{path}: reads {ca} channels against {cb}"));
            }
            // Burn's dense layout is [in, out]; input feature c*H*W + y*W + x.
            let (w, _) = floats(tensors, &weight)?;
            let n_out = *oa;
            let mut new = vec![0f32; nb * n_out];
            let mut plane = vec![0f32; ha * wa];
            for o in 0..n_out {
                for c in 0..ca {
                    for (k, v) in plane.iter_mut().enumerate() {
                        *v = w[(c * ha * wa + k) * n_out + o];
                    }
                    let up = interp::rescale_plane(&plane, [ha, wa], [hb, wb], interp);
                    for (k, v) in up.into_iter().enumerate() {
                        new[(c * hb * wb + k) * n_out + o] = v;
                    }
                }
            }
            out.insert(weight, (TensorData::new(new, [*nb, n_out]), id));
        }
        (LayerSpec::BatchNorm { features: x }, LayerSpec::BatchNorm { features: y }) if x != y => {
            return Err(format!("{path}: batch norm over {x} features against {y}"));
        }
        _ => {}
    }
    Ok(())
}
