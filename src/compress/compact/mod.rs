//! Compact and transferred convolutional filters: rewrites that replace a layer by a cheaper
//! form with the same input and output shapes (the survey's fourth family). The rewritten
//! model is then fine-tuned (or trained from scratch); the `rewrite` stage decides which
//! layers and when.
//!
//! - [`Form::Separable`]: a `k×k` convolution as a `k×k` depthwise one and a `1×1` pointwise
//!   one (MobileNet, Howard et al. 2017, §3.1: eq. 5 against eq. 2 is `1/N + 1/k²` of the
//!   cost), with a batch norm and ReLU between them where the model has them after its
//!   convolutions.
//! - [`Form::Fire`]: SqueezeNet's fire module (Iandola et al. 2016, §3.2): a `1×1` squeeze to
//!   `s` channels and ReLU, then `1×1` and `k×k` expands side by side, concatenated.
//! - [`Form::Crelu`]: half the filters and the concatenated ReLU `[relu(x), relu(−x)]` (Shang
//!   et al. 2016, §3), since early filters come in pairs of opposite phase.
//! - [`Form::Rotations`] and [`Form::Dihedral`]: each filter learned once and used under its
//!   4 rotations, or its 4 rotations and their mirror images ([`transformed`]).
//!
//! Every layer the rewrite leaves keeps its trained weights (with [`Init::Keep`]); the new
//! layers start from the old ones where there is a natural projection (CReLU keeps the first
//! half of the filters; transformed filters average each group back through its transforms)
//! and fresh otherwise.

pub mod transformed;

use crate::checkpoint::Tensors;
use crate::models::{Arch, LayerSpec, Shape};
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a convolution becomes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    /// k×k depthwise then 1×1 pointwise (MobileNet).
    Separable,
    /// 1×1 squeeze, then 1×1 and k×k expands concatenated (SqueezeNet).
    Fire,
    /// Half the filters, and [relu(x), relu(−x)] (Shang et al. 2016).
    Crelu,
    /// Each filter also used rotated by 90°, 180° and 270°: 1/4 of the filters learned.
    Rotations,
    /// Rotations and mirror images: 1/8 of the filters learned.
    Dihedral,
}

impl Form {
    pub fn name(self) -> &'static str {
        match self {
            Form::Separable => "separable",
            Form::Fire => "fire",
            Form::Crelu => "crelu",
            Form::Rotations => "rotations",
            Form::Dihedral => "dihedral",
        }
    }

    fn transforms(self) -> usize {
        match self {
            Form::Rotations => 4,
            Form::Dihedral => 8,
            _ => 1,
        }
    }
}

/// How the rewritten model's weights start.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// Untouched layers keep their trained weights; new ones start from the old where they can.
    #[default]
    Keep,
    /// Every weight fresh (seeded): the rewritten architecture trained from scratch.
    Scratch,
}

/// The rewrite's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    pub form: Form,
    /// Fire: squeeze channels as a fraction of the layer's outputs (SqueezeNet's squeeze ratio
    /// is 1/8 of the expands).
    pub squeeze: f64,
    /// Fire: the fraction of the expands that are k×k (SqueezeNet: 1/2).
    pub expand_kxk: f64,
}

/// One rewritten layer, for the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerReport {
    /// The old layer (its path before the rewrite).
    pub path: String,
    /// The old layers replaced (the layer, and the batch norm and ReLU a CReLU takes in).
    pub old_paths: Vec<String>,
    /// The layers that replace them, by their paths after the rewrite.
    pub new_paths: Vec<String>,
    pub input: Shape,
    pub params: [usize; 2],
    pub flops: [u64; 2],
}

/// A rewritten model: its architecture, its tensors (kept ones and the projections; fresh
/// layers are absent, for the caller to initialise) and what changed.
pub struct Rewritten {
    pub arch: Arch,
    pub tensors: Tensors,
    pub layers: Vec<LayerReport>,
}

/// The layers `form` takes by default: every convolution it can take except one reading the
/// image itself (few channels: a separable or fire form saves nothing there) for separable and
/// fire, every convolution or hidden dense layer followed by a ReLU for CReLU, every `k×k`
/// convolution (k > 1) for transformed filters.
pub fn default_layers(arch: &Arch, form: Form) -> Vec<String> {
    let mut out = Vec::new();
    walk(&arch.layers, "layers", &mut |path, list, i| {
        let spec = &list[i];
        if check_at(list, i, form).is_err() {
            return;
        }
        let ok = match (form, spec) {
            (Form::Separable | Form::Fire, LayerSpec::Conv2d { in_channels, .. }) => {
                *in_channels > 3
            }
            (Form::Crelu, _) => relu_after(list, i).is_some(),
            (Form::Rotations | Form::Dihedral, LayerSpec::Conv2d { kernel, .. }) => kernel[0] > 1,
            _ => false,
        };
        if ok {
            out.push(path.to_string());
        }
    });
    // The classifier keeps its outputs.
    if let Some(last) = arch.classifier() {
        out.retain(|p| *p != last);
    }
    out
}

/// Calls `f(path, list, index)` for every layer, nested ones included.
fn walk<'a>(
    layers: &'a [LayerSpec],
    prefix: &str,
    f: &mut dyn FnMut(&str, &'a [LayerSpec], usize),
) {
    for (i, l) in layers.iter().enumerate() {
        let path = format!("{prefix}.{i}");
        f(&path, layers, i);
        for (name, list) in l.nested() {
            walk(list, &format!("{path}.{name}"), f);
        }
    }
}

/// The index of the ReLU after layer `i` (directly, or after its batch norm), if there is one.
fn relu_after(list: &[LayerSpec], i: usize) -> Option<usize> {
    let j = if matches!(list.get(i + 1), Some(LayerSpec::BatchNorm { .. })) {
        i + 2
    } else {
        i + 1
    };
    matches!(list.get(j), Some(LayerSpec::Relu)).then_some(j)
}

/// The list that holds the layer at `path`, and its index there.
fn locate<'a>(arch: &'a Arch, path: &str) -> Result<(&'a [LayerSpec], usize), String> {
    let mut found = None;
    walk(&arch.layers, "layers", &mut |p, list, i| {
        if p == path {
            found = Some((list, i));
        }
    });
    found.ok_or_else(|| format!("{path}: no such layer"))
}

/// Why the layer at `path` cannot take `form`, if it cannot: a message that names it.
pub fn check(arch: &Arch, path: &str, form: Form) -> Result<(), String> {
    let (list, i) = locate(arch, path)?;
    check_at(list, i, form).map_err(|e| format!("{path} {e}"))?;
    if arch.classifier().as_deref() == Some(path) && form == Form::Crelu {
        return Err(format!(
            "{path} is the classifier: its outputs are the class scores"
        ));
    }
    Ok(())
}

fn check_at(list: &[LayerSpec], i: usize, form: Form) -> Result<(), String> {
    let spec = &list[i];
    let plain_conv = |what: &str| -> Result<(), String> {
        match *spec {
            LayerSpec::Conv2d {
                groups,
                dilation,
                pad_extra,
                ..
            } if groups == 1 && dilation == [1, 1] && pad_extra == [0, 0] => Ok(()),
            LayerSpec::Conv2d { .. } => Err(format!(
                "is a grouped, dilated or asymmetrically padded convolution: {what} takes plain ones"
            )),
            _ => Err(format!(
                "is a {} layer: {what} rewrites convolutions",
                spec.kind()
            )),
        }
    };
    match form {
        Form::Separable => {
            plain_conv("the separable form")?;
            if let LayerSpec::Conv2d { kernel, .. } = spec
                && *kernel == [1, 1]
            {
                return Err("is a 1x1 convolution: it is pointwise already".into());
            }
            Ok(())
        }
        Form::Fire => {
            plain_conv("the fire module")?;
            let LayerSpec::Conv2d {
                kernel, padding, ..
            } = spec
            else {
                unreachable!("checked")
            };
            if (0..2).any(|d| 2 * padding[d] + 1 != kernel[d]) {
                return Err(format!(
                    "is {}x{} with padding {:?}: the fire module's 1x1 and {}x{} expands only agree in size on a \"same\" convolution (padding (k-1)/2)",
                    kernel[0], kernel[1], padding, kernel[0], kernel[1]
                ));
            }
            Ok(())
        }
        Form::Crelu => {
            let out = match *spec {
                LayerSpec::Conv2d { out_channels, .. } => {
                    plain_conv("CReLU")?;
                    out_channels
                }
                LayerSpec::Linear { out_features, .. } => out_features,
                _ => {
                    return Err(format!(
                        "is a {} layer: CReLU halves convolutions and dense layers",
                        spec.kind()
                    ));
                }
            };
            if out % 2 != 0 {
                return Err(format!("has {out} outputs: CReLU needs an even number"));
            }
            Ok(())
        }
        Form::Rotations | Form::Dihedral => {
            plain_conv("transformed filters")?;
            let LayerSpec::Conv2d {
                out_channels,
                kernel,
                stride,
                padding,
                ..
            } = *spec
            else {
                unreachable!("checked")
            };
            let g = form.transforms();
            if kernel[0] != kernel[1] || stride[0] != stride[1] || padding[0] != padding[1] {
                return Err(format!(
                    "is {}x{} (stride {stride:?}, padding {padding:?}): rotated filters need a square kernel, stride and padding",
                    kernel[0], kernel[1]
                ));
            }
            if out_channels % g != 0 {
                return Err(format!(
                    "has {out_channels} filters, not a multiple of the {g} transforms"
                ));
            }
            Ok(())
        }
    }
}

/// One replacement inside a layer list: `len` old layers from the one at the key's path become
/// `layers`; `tensors` are those that start from the old weights, as `(index in layers, field,
/// values, shape)`.
struct Splice {
    len: usize,
    layers: Vec<LayerSpec>,
    tensors: Vec<(usize, &'static str, Vec<f32>, Vec<usize>)>,
}

/// Rewrites the layers at `paths` of `arch` as `options` says. With `tensors` (the model's:
/// [`Init::Keep`]), the result holds the tensors that carry over; without (a fresh start, or a
/// plan), none.
pub fn rewrite(
    arch: &Arch,
    tensors: Option<&Tensors>,
    paths: &[String],
    options: Options,
) -> Result<Rewritten, String> {
    let empty = Tensors::new();
    let mut splices = BTreeMap::new();
    for path in paths {
        check(arch, path, options.form)?;
        let splice = splice_for(arch, path, options, tensors)?;
        splices.insert(path.clone(), splice);
    }
    let mut out = Tensors::new();
    let mut moved = BTreeMap::new();
    let layers = apply(
        &arch.layers,
        "layers",
        "layers",
        &splices,
        tensors.unwrap_or(&empty),
        &mut out,
        &mut moved,
    );
    let new = Arch {
        layers,
        ..arch.clone()
    };
    new.validate()
        .map_err(|e| format!("internal error: the rewritten architecture is invalid: {e}"))?;
    let (before, after) = (stats(arch), stats(&new));
    let mut reports = Vec::new();
    for path in paths {
        let (old_paths, new_paths): (Vec<String>, Vec<String>) = moved.remove(path).unwrap();
        let sum = |m: &BTreeMap<String, (usize, u64, Shape)>, ps: &[String]| {
            ps.iter().fold((0, 0), |(p, f), k| (p + m[k].0, f + m[k].1))
        };
        let (p0, f0) = sum(&before, &old_paths);
        let (p1, f1) = sum(&after, &new_paths);
        reports.push(LayerReport {
            path: path.clone(),
            input: before[path].2,
            old_paths,
            new_paths,
            params: [p0, p1],
            flops: [f0, f1],
        });
    }
    Ok(Rewritten {
        arch: new,
        tensors: out,
        layers: reports,
    })
}

/// Parameters (nested ones included), FLOPs (likewise) and input shape of every layer by path.
fn stats(arch: &Arch) -> BTreeMap<String, (usize, u64, Shape)> {
    let all = arch.layer_stats();
    let mut out = BTreeMap::new();
    for s in &all {
        // A nested layer's path extends its parent's: sum every layer at or under the path.
        let prefix = format!("{}.", s.path);
        let (p, f) = all
            .iter()
            .filter(|t| t.path == s.path || t.path.starts_with(&prefix))
            .fold((0, 0), |(p, f), t| (p + t.params, f + t.flops));
        out.insert(s.path.clone(), (p, f, s.input));
    }
    out
}

fn conv(
    cin: usize,
    cout: usize,
    k: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 2],
    groups: usize,
    bias: bool,
) -> LayerSpec {
    LayerSpec::Conv2d {
        in_channels: cin,
        out_channels: cout,
        kernel: k,
        stride,
        padding: pad,
        pad_extra: [0, 0],
        dilation: [1, 1],
        groups,
        bias,
    }
}

/// The sizes of a plain convolution that a form rewrites.
struct ConvParts {
    cin: usize,
    cout: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    bias: bool,
}

/// [`ConvParts`] of `spec`, which [`check_at`] has found a plain convolution.
fn conv_parts(spec: &LayerSpec) -> ConvParts {
    let LayerSpec::Conv2d {
        in_channels,
        out_channels,
        kernel,
        stride,
        padding,
        bias,
        ..
    } = *spec
    else {
        unreachable!("checked: a convolution")
    };
    ConvParts {
        cin: in_channels,
        cout: out_channels,
        kernel,
        stride,
        padding,
        bias,
    }
}

/// The replacement of the layer at `path`.
fn splice_for(
    arch: &Arch,
    path: &str,
    o: Options,
    tensors: Option<&Tensors>,
) -> Result<Splice, String> {
    let (list, i) = locate(arch, path)?;
    let parent = path.rsplit_once('.').map_or("layers", |(p, _)| p);
    let spec = list[i].clone();
    let bn_after = matches!(list.get(i + 1), Some(LayerSpec::BatchNorm { .. }));
    let relu = relu_after(list, i);
    // The old weights, when the new layers start from them.
    type Floats = Option<(Vec<f32>, Vec<usize>)>;
    let get = |name: &str| -> Result<Floats, String> {
        match tensors {
            Some(t) if t.contains_key(&format!("{path}.{name}")) => {
                crate::checkpoint::floats(t, &format!("{path}.{name}")).map(Some)
            }
            Some(_) if name == "bias" => Ok(None),
            Some(_) => Err(format!("{path}: no tensor {name}")),
            None => Ok(None),
        }
    };
    match o.form {
        Form::Separable => {
            let ConvParts {
                cin,
                cout,
                kernel,
                stride,
                padding,
                bias,
            } = conv_parts(&spec);
            let mut layers = vec![conv(cin, cin, kernel, stride, padding, cin, false)];
            if bn_after {
                layers.push(LayerSpec::BatchNorm { features: cin });
            }
            if relu.is_some() {
                layers.push(LayerSpec::Relu);
            }
            layers.push(conv(cin, cout, [1, 1], [1, 1], [0, 0], 1, bias));
            Ok(Splice {
                len: 1,
                layers,
                tensors: vec![],
            })
        }
        Form::Fire => {
            let ConvParts {
                cin,
                cout,
                kernel,
                stride,
                padding,
                bias,
            } = conv_parts(&spec);
            let squeeze_ok = o.squeeze > 0.0 && o.squeeze.is_finite();
            if !squeeze_ok || !(0.0..=1.0).contains(&o.expand_kxk) {
                return Err(format!(
                    "fire: squeeze must be positive and expand-kxk in [0, 1], got {} and {}",
                    o.squeeze, o.expand_kxk
                ));
            }
            let s = ((cout as f64 * o.squeeze).round() as usize).max(1);
            let e3 = ((cout as f64 * o.expand_kxk).round() as usize).min(cout);
            let e1 = cout - e3;
            let mut layers = vec![conv(cin, s, [1, 1], [1, 1], [0, 0], 1, !bn_after)];
            if bn_after {
                layers.push(LayerSpec::BatchNorm { features: s });
            }
            layers.push(LayerSpec::Relu);
            let mut branches = Vec::new();
            if e1 > 0 {
                branches.push(vec![conv(s, e1, [1, 1], stride, [0, 0], 1, bias)]);
            }
            if e3 > 0 {
                branches.push(vec![conv(s, e3, kernel, stride, padding, 1, bias)]);
            }
            layers.push(LayerSpec::Concat { branches });
            Ok(Splice {
                len: 1,
                layers,
                tensors: vec![],
            })
        }
        Form::Crelu => {
            let mut t = Vec::new();
            let w = get("weight")?;
            let (half, first) = match spec {
                LayerSpec::Conv2d { out_channels, .. } => {
                    let half = out_channels / 2;
                    if let Some((w, mut shape)) = w {
                        let per = w.len() / out_channels;
                        shape[0] = half;
                        t.push((0, "weight", w[..half * per].to_vec(), shape));
                    }
                    let mut c = spec.clone();
                    if let LayerSpec::Conv2d { out_channels, .. } = &mut c {
                        *out_channels = half;
                    }
                    (half, c)
                }
                LayerSpec::Linear {
                    in_features,
                    out_features,
                    bias,
                } => {
                    // Burn's layout `[in, out]`: the first half of every row.
                    let half = out_features / 2;
                    if let Some((w, _)) = w {
                        let cols: Vec<f32> = w
                            .chunks_exact(out_features)
                            .flat_map(|row| row[..half].to_vec())
                            .collect();
                        t.push((0, "weight", cols, vec![in_features, half]));
                    }
                    (
                        half,
                        LayerSpec::Linear {
                            in_features,
                            out_features: half,
                            bias,
                        },
                    )
                }
                _ => unreachable!("checked"),
            };
            if let Some((b, _)) = get("bias")? {
                t.push((0, "bias", b[..half].to_vec(), vec![half]));
            }
            let mut layers = vec![first];
            let mut len = 1;
            if bn_after {
                layers.push(LayerSpec::BatchNorm { features: half });
                let bn = format!("{}.{}", parent, i + 1);
                if let Some(tensors) = tensors {
                    for name in ["gamma", "beta", "running_mean", "running_var"] {
                        let (v, _) = crate::checkpoint::floats(tensors, &format!("{bn}.{name}"))?;
                        t.push((1, name, v[..half].to_vec(), vec![half]));
                    }
                }
                len += 1;
            }
            layers.push(LayerSpec::CRelu);
            if relu.is_some() {
                len += 1;
            }
            Ok(Splice {
                len,
                layers,
                tensors: t,
            })
        }
        Form::Rotations | Form::Dihedral => {
            let ConvParts {
                cin: in_channels,
                cout: out_channels,
                kernel,
                stride,
                padding,
                bias,
            } = conv_parts(&spec);
            let g = o.form.transforms();
            let (base, k) = (out_channels / g, kernel[0]);
            let mut t = Vec::new();
            if let Some((w, _)) = get("weight")? {
                // The least-squares projection: each learned filter is the mean of its
                // group's filters mapped back through their transforms.
                let filter = in_channels * k * k;
                let mut learned = vec![0f32; base * filter];
                for b in 0..base {
                    for tr in 0..g {
                        let src = &w[(b * g + tr) * filter..][..filter];
                        for c in 0..in_channels {
                            for y in 0..k {
                                for x in 0..k {
                                    let (sy, sx) = transformed::source(y, x, tr, k);
                                    learned[b * filter + c * k * k + sy * k + sx] +=
                                        src[c * k * k + y * k + x] / g as f32;
                                }
                            }
                        }
                    }
                }
                t.push((0, "weight", learned, vec![base, in_channels, k, k]));
            }
            if let Some((b, _)) = get("bias")? {
                let mean = b
                    .chunks_exact(g)
                    .map(|c| c.iter().sum::<f32>() / g as f32)
                    .collect();
                t.push((0, "bias", mean, vec![base]));
            }
            Ok(Splice {
                len: 1,
                layers: vec![LayerSpec::TransformedConv {
                    in_channels,
                    base_filters: base,
                    transforms: g,
                    kernel: k,
                    stride: stride[0],
                    padding: padding[0],
                    bias,
                }],
                tensors: t,
            })
        }
    }
}

/// Copies `layers` (paths under `old`) to new paths under `new`, applying `splices`; moves the
/// tensors of the layers it keeps (all of `src`'s; `src` is empty for a fresh start) and puts
/// the splices' own; records each splice's old and new paths in `moved`.
fn apply(
    layers: &[LayerSpec],
    old: &str,
    new: &str,
    splices: &BTreeMap<String, Splice>,
    src: &Tensors,
    dst: &mut Tensors,
    moved: &mut BTreeMap<String, (Vec<String>, Vec<String>)>,
) -> Vec<LayerSpec> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let old_path = format!("{old}.{i}");
        if let Some(s) = splices.get(&old_path) {
            let first = out.len();
            let new_paths = (0..s.layers.len())
                .map(|k| format!("{new}.{}", first + k))
                .collect();
            for (k, field, v, shape) in &s.tensors {
                dst.insert(
                    format!("{new}.{}.{field}", first + k),
                    (TensorData::new(v.clone(), shape.clone()), None),
                );
            }
            let old_paths = (i..i + s.len).map(|k| format!("{old}.{k}")).collect();
            moved.insert(old_path, (old_paths, new_paths));
            out.extend(s.layers.iter().cloned());
            i += s.len;
            continue;
        }
        let new_path = format!("{new}.{}", out.len());
        let mut layer = layers[i].clone();
        let nested = layer.nested_mut();
        if nested.is_empty() {
            let prefix = format!("{old_path}.");
            for (name, t) in src {
                if let Some(rest) = name.strip_prefix(&prefix)
                    && !rest.contains('.')
                {
                    dst.insert(format!("{new_path}.{rest}"), t.clone());
                }
            }
        }
        for (name, list) in nested {
            *list = apply(
                list,
                &format!("{old_path}.{name}"),
                &format!("{new_path}.{name}"),
                splices,
                src,
                dst,
                moved,
            );
        }
        out.push(layer);
        i += 1;
    }
    out
}
