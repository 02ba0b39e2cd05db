//! Architecture descriptions: a network as a list of layer specifications.
//!
//! The description is the model's structure (Burn's `Module` holds its state). It is stored in
//! every checkpoint, so `eval` and `info` rebuild the network without flags, and compression
//! passes that change structure (filter pruning, kernel rescaling, low-rank factorisation)
//! produce a new description and the tensors that go with it. Parameter counts and FLOPs are
//! computed from it by propagating shapes, never typed in.

use serde::{Deserialize, Serialize};

/// One layer. Tensor layouts follow PyTorch/Burn: conv weights `[out, in/groups, kh, kw]`,
/// linear weights `[in, out]` (Burn's layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LayerSpec {
    Conv2d {
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        /// Extra zero padding after the input (bottom, right), on top of `padding`: the odd
        /// pixel of "same" padding for even kernels, which low-resolution twins have.
        #[serde(default, skip_serializing_if = "is_zero2")]
        pad_extra: [usize; 2],
        #[serde(default = "one2")]
        dilation: [usize; 2],
        #[serde(default = "one")]
        groups: usize,
        bias: bool,
    },
    BatchNorm {
        features: usize,
    },
    Relu,
    MaxPool {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    AvgPool {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    /// Average over the whole feature map: `[N, C, H, W]` to `[N, C, 1, 1]`.
    GlobalAvgPool,
    /// `[N, C, H, W]` to `[N, C*H*W]`.
    Flatten,
    Linear {
        in_features: usize,
        out_features: usize,
        bias: bool,
    },
    /// A dense layer whose weight is a circulant matrix of one vector, applied to the input's
    /// random sign flip through the FFT (Cheng et al. 2015; `kernels::circulant`). Tensors:
    /// `weight` `[max(in, out)]` (the vector) and `bias` `[out]`; the signs are drawn from
    /// `sign_seed`, so they are not stored.
    Circulant {
        in_features: usize,
        out_features: usize,
        bias: bool,
        sign_seed: u64,
    },
    /// Concatenated ReLU (Shang et al. 2016): `[relu(x), relu(−x)]` along the channels (or
    /// features), twice as many as it receives: a layer before it learns half the filters.
    CRelu,
    /// Every branch takes the input; their outputs are concatenated along the channels (or
    /// features): the fire module's expands (Iandola et al. 2016).
    Concat {
        branches: Vec<Vec<LayerSpec>>,
    },
    /// A convolution whose filters are `base_filters` learned ones, each also used under the
    /// rotations by 90° (`transforms` 4) or the rotations and their mirror images (8): output
    /// channel `b·transforms + g` is filter `b` under transform `g` (`compress::compact::
    /// transformed`; Dieleman et al. 2016, Cohen & Welling 2016). Tensors: `weight`
    /// `[base_filters, in, k, k]` and `bias` `[base_filters]`, shared by a filter's transforms.
    TransformedConv {
        in_channels: usize,
        base_filters: usize,
        transforms: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    },
    /// `body(x) + shortcut(x)`; an empty shortcut is the identity.
    Residual {
        body: Vec<LayerSpec>,
        shortcut: Vec<LayerSpec>,
    },
}

fn one() -> usize {
    1
}
fn is_zero2(v: &[usize; 2]) -> bool {
    *v == [0, 0]
}

fn one2() -> [usize; 2] {
    [1, 1]
}

/// Shape of an activation without its batch dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shape {
    /// `[C, H, W]`
    Map([usize; 3]),
    /// `[F]`
    Flat(usize),
}

impl Shape {
    /// Values per image; saturates at `usize::MAX` (shapes from [`LayerSpec::output_shape`]
    /// never do: it refuses them).
    pub fn numel(&self) -> usize {
        self.checked_numel().unwrap_or(usize::MAX)
    }

    /// Values per image, or `None` if the count overflows `usize`.
    pub fn checked_numel(&self) -> Option<usize> {
        match *self {
            Shape::Map([c, h, w]) => c.checked_mul(h)?.checked_mul(w),
            Shape::Flat(f) => Some(f),
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shape::Map([c, h, w]) => write!(f, "{c}x{h}x{w}"),
            Shape::Flat(n) => write!(f, "{n}"),
        }
    }
}

/// The most values one input image may have (a 16384x16384 RGB image is 2^29.6): a bound on
/// descriptions read from files, so sizes computed from them cannot overflow.
pub const MAX_INPUT: usize = 1 << 30;

/// A whole network: input shape, classes and layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arch {
    /// Name of the model family it was built from (`lenet5`, `resnet20`, ...).
    pub name: String,
    /// Input image shape `[C, H, W]`.
    pub input: [usize; 3],
    pub classes: usize,
    pub layers: Vec<LayerSpec>,
}

/// Cost of one layer, from [`Arch::layer_stats`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerStats {
    /// Dotted path of the layer (`layers.3`, `layers.5.body.0`).
    pub path: String,
    pub kind: &'static str,
    pub input: Shape,
    pub output: Shape,
    pub params: usize,
    /// Floating-point operations for one image, a multiply-add counted as 2.
    pub flops: u64,
}

impl LayerSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            LayerSpec::Conv2d { .. } => "conv2d",
            LayerSpec::BatchNorm { .. } => "batch_norm",
            LayerSpec::Relu => "relu",
            LayerSpec::MaxPool { .. } => "max_pool",
            LayerSpec::AvgPool { .. } => "avg_pool",
            LayerSpec::GlobalAvgPool => "global_avg_pool",
            LayerSpec::Flatten => "flatten",
            LayerSpec::Linear { .. } => "linear",
            LayerSpec::Circulant { .. } => "circulant",
            LayerSpec::CRelu => "crelu",
            LayerSpec::Concat { .. } => "concat",
            LayerSpec::TransformedConv { .. } => "transformed_conv",
            LayerSpec::Residual { .. } => "residual",
        }
    }

    /// Parameters this layer owns (not counting nested layers of a residual block). Saturates
    /// at `usize::MAX` instead of overflowing, so a description read from a file can never
    /// wrap around to a small count.
    pub fn own_params(&self) -> usize {
        match *self {
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                groups,
                bias,
                ..
            } => out_channels
                .saturating_mul(in_channels.checked_div(groups).unwrap_or(0))
                .saturating_mul(kernel[0])
                .saturating_mul(kernel[1])
                .saturating_add(if bias { out_channels } else { 0 }),
            LayerSpec::BatchNorm { features } => features.saturating_mul(2),
            LayerSpec::Linear {
                in_features,
                out_features,
                bias,
            } => in_features
                .saturating_mul(out_features)
                .saturating_add(if bias { out_features } else { 0 }),
            LayerSpec::Circulant {
                in_features,
                out_features,
                bias,
                ..
            } => in_features
                .max(out_features)
                .saturating_add(if bias { out_features } else { 0 }),
            LayerSpec::TransformedConv {
                in_channels,
                base_filters,
                kernel,
                bias,
                ..
            } => base_filters
                .saturating_mul(in_channels)
                .saturating_mul(kernel.saturating_mul(kernel))
                .saturating_add(if bias { base_filters } else { 0 }),
            _ => 0,
        }
    }

    /// The number of output channels of a transformed convolution, or `None` if it overflows.
    pub fn transformed_out(base_filters: usize, transforms: usize) -> Option<usize> {
        base_filters.checked_mul(transforms)
    }

    /// The layer lists nested in this one, by the name of their path part: a residual block's
    /// `body` and `shortcut`, a concatenation's `branches.0`, `branches.1`, ...
    pub fn nested(&self) -> Vec<(String, &[LayerSpec])> {
        match self {
            LayerSpec::Residual { body, shortcut } => {
                vec![
                    ("body".into(), body.as_slice()),
                    ("shortcut".into(), shortcut.as_slice()),
                ]
            }
            LayerSpec::Concat { branches } => branches
                .iter()
                .enumerate()
                .map(|(b, l)| (format!("branches.{b}"), l.as_slice()))
                .collect(),
            _ => vec![],
        }
    }

    /// [`LayerSpec::nested`], to rewrite in place.
    pub fn nested_mut(&mut self) -> Vec<(String, &mut Vec<LayerSpec>)> {
        match self {
            LayerSpec::Residual { body, shortcut } => {
                vec![("body".into(), body), ("shortcut".into(), shortcut)]
            }
            LayerSpec::Concat { branches } => branches
                .iter_mut()
                .enumerate()
                .map(|(b, l)| (format!("branches.{b}"), l))
                .collect(),
            _ => vec![],
        }
    }

    /// Output shape for `input`, or why the layer cannot take it (including an output too
    /// large to count in `usize`).
    pub fn output_shape(&self, input: Shape) -> Result<Shape, String> {
        let out = self.output_shape_unchecked(input)?;
        if out.checked_numel().is_none() {
            return Err(format!("{}: output {out} is too large", self.kind()));
        }
        Ok(out)
    }

    fn output_shape_unchecked(&self, input: Shape) -> Result<Shape, String> {
        let map = |s: Shape| match s {
            Shape::Map(m) => Ok(m),
            Shape::Flat(_) => Err(format!("{} needs a feature map, got {s}", self.kind())),
        };
        let window = |len: usize,
                      k: usize,
                      s: usize,
                      p: usize,
                      extra: usize,
                      d: usize|
         -> Result<usize, String> {
            // k, s and d are checked positive before this is called.
            let too_large = || format!("{}: window or padding too large", self.kind());
            let span = d
                .checked_mul(k - 1)
                .and_then(|x| x.checked_add(1))
                .ok_or_else(too_large)?;
            let padded = p
                .checked_mul(2)
                .and_then(|x| x.checked_add(len))
                .and_then(|x| x.checked_add(extra))
                .ok_or_else(too_large)?;
            if padded < span {
                Err(format!(
                    "{}: window {span} is larger than the padded input {padded}",
                    self.kind(),
                ))
            } else {
                Ok((padded - span) / s + 1)
            }
        };
        match self {
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                pad_extra,
                dilation,
                groups,
                ..
            } => {
                let [c, h, w] = map(input)?;
                if c != *in_channels {
                    return Err(format!(
                        "conv2d expects {in_channels} channels, input has {c}"
                    ));
                }
                if *groups == 0 || in_channels % groups != 0 || out_channels % groups != 0 {
                    return Err(format!(
                        "conv2d groups {groups} must divide {in_channels} and {out_channels}"
                    ));
                }
                if kernel.contains(&0) || stride.contains(&0) || dilation.contains(&0) {
                    return Err("conv2d kernel, stride and dilation must be positive".into());
                }
                Ok(Shape::Map([
                    *out_channels,
                    window(
                        h,
                        kernel[0],
                        stride[0],
                        padding[0],
                        pad_extra[0],
                        dilation[0],
                    )?,
                    window(
                        w,
                        kernel[1],
                        stride[1],
                        padding[1],
                        pad_extra[1],
                        dilation[1],
                    )?,
                ]))
            }
            LayerSpec::BatchNorm { features } => {
                let c = match input {
                    Shape::Map([c, _, _]) => c,
                    Shape::Flat(f) => f,
                };
                if c != *features {
                    return Err(format!("batch_norm has {features} features, input has {c}"));
                }
                Ok(input)
            }
            LayerSpec::Relu => Ok(input),
            LayerSpec::MaxPool { kernel, stride } | LayerSpec::AvgPool { kernel, stride } => {
                let [c, h, w] = map(input)?;
                if kernel.contains(&0) || stride.contains(&0) {
                    return Err(format!(
                        "{}: kernel and stride must be positive",
                        self.kind()
                    ));
                }
                Ok(Shape::Map([
                    c,
                    window(h, kernel[0], stride[0], 0, 0, 1)?,
                    window(w, kernel[1], stride[1], 0, 0, 1)?,
                ]))
            }
            LayerSpec::GlobalAvgPool => {
                let [c, _, _] = map(input)?;
                Ok(Shape::Map([c, 1, 1]))
            }
            LayerSpec::Flatten => input
                .checked_numel()
                .map(Shape::Flat)
                .ok_or_else(|| format!("flatten: input {input} is too large")),
            LayerSpec::Linear {
                in_features,
                out_features,
                ..
            } => match input {
                Shape::Flat(f) if f == *in_features => Ok(Shape::Flat(*out_features)),
                other => Err(format!(
                    "linear expects {in_features} flat features, input is {other}"
                )),
            },
            LayerSpec::Circulant {
                in_features,
                out_features,
                ..
            } => match input {
                Shape::Flat(f) if f == *in_features && *out_features > 0 && f > 0 => {
                    Ok(Shape::Flat(*out_features))
                }
                other => Err(format!(
                    "circulant expects {in_features} flat features and at least one output, input is {other}"
                )),
            },
            LayerSpec::CRelu => match input {
                Shape::Map([c, h, w]) => c
                    .checked_mul(2)
                    .map(|c| Shape::Map([c, h, w]))
                    .ok_or_else(|| "crelu: too many channels".to_string()),
                Shape::Flat(f) => f
                    .checked_mul(2)
                    .map(Shape::Flat)
                    .ok_or_else(|| "crelu: too many features".to_string()),
            },
            LayerSpec::Concat { branches } => {
                if branches.is_empty() {
                    return Err("concat needs at least one branch".into());
                }
                let mut out: Option<Shape> = None;
                for (b, branch) in branches.iter().enumerate() {
                    let s = chain_shape(branch, input, &format!("branches.{b}"))?;
                    out = Some(match (out, s) {
                        (None, s) => s,
                        (Some(Shape::Map([c, h, w])), Shape::Map([c2, h2, w2]))
                            if [h, w] == [h2, w2] =>
                        {
                            Shape::Map([
                                c.checked_add(c2).ok_or("concat: too many channels")?,
                                h,
                                w,
                            ])
                        }
                        (Some(Shape::Flat(f)), Shape::Flat(f2)) => {
                            Shape::Flat(f.checked_add(f2).ok_or("concat: too many features")?)
                        }
                        (Some(o), s) => {
                            return Err(format!(
                                "concat: branch {b} gives {s}, which cannot be concatenated with {o} (the sizes must agree)"
                            ));
                        }
                    });
                }
                Ok(out.expect("at least one branch"))
            }
            LayerSpec::TransformedConv {
                in_channels,
                base_filters,
                transforms,
                kernel,
                stride,
                padding,
                ..
            } => {
                let [c, h, w] = map(input)?;
                if c != *in_channels {
                    return Err(format!(
                        "transformed_conv expects {in_channels} channels, input has {c}"
                    ));
                }
                if ![4, 8].contains(transforms) {
                    return Err(format!(
                        "transformed_conv: transforms must be 4 (rotations) or 8 (rotations and mirror images), got {transforms}"
                    ));
                }
                if *kernel == 0 || *stride == 0 || *base_filters == 0 {
                    return Err(
                        "transformed_conv: kernel, stride and filters must be positive".into(),
                    );
                }
                let out = LayerSpec::transformed_out(*base_filters, *transforms)
                    .ok_or("transformed_conv: too many filters")?;
                Ok(Shape::Map([
                    out,
                    window(h, *kernel, *stride, *padding, 0, 1)?,
                    window(w, *kernel, *stride, *padding, 0, 1)?,
                ]))
            }
            LayerSpec::Residual { body, shortcut } => {
                let b = chain_shape(body, input, "body")?;
                let s = chain_shape(shortcut, input, "shortcut")?;
                if b != s {
                    return Err(format!("residual body gives {b} but shortcut gives {s}"));
                }
                Ok(b)
            }
        }
    }

    /// FLOPs of this layer alone for one image (nested residual layers excluded); saturates
    /// at `u64::MAX`.
    pub fn own_flops(&self, input: Shape, output: Shape) -> u64 {
        let out = output.numel() as u64;
        let bias_adds = |bias: bool| if bias { out } else { 0 };
        match *self {
            LayerSpec::Conv2d {
                in_channels,
                kernel,
                groups,
                bias,
                ..
            } => {
                let per_output = (in_channels.checked_div(groups).unwrap_or(0) as u64)
                    .saturating_mul(kernel[0] as u64)
                    .saturating_mul(kernel[1] as u64);
                out.saturating_mul(per_output)
                    .saturating_mul(2)
                    .saturating_add(bias_adds(bias))
            }
            LayerSpec::Linear {
                in_features, bias, ..
            } => out
                .saturating_mul(in_features as u64)
                .saturating_mul(2)
                .saturating_add(bias_adds(bias)),
            LayerSpec::Circulant {
                in_features,
                out_features,
                bias,
                ..
            } => {
                // Two real FFTs of size d at the usual 2.5·d·log2(d) each, the d/2+1 complex
                // products (6 each), the sign flips and the scaling.
                let d = in_features.max(out_features) as u64;
                let log2 = (u64::BITS - d.saturating_sub(1).leading_zeros()) as u64;
                d.saturating_mul(log2)
                    .saturating_mul(5)
                    .saturating_add(d.saturating_mul(5))
                    .saturating_add(bias_adds(bias))
            }
            // Inference form: a per-channel scale and shift.
            LayerSpec::BatchNorm { .. } => out.saturating_mul(2),
            LayerSpec::Relu => out,
            LayerSpec::MaxPool { kernel, .. } | LayerSpec::AvgPool { kernel, .. } => out
                .saturating_mul(kernel[0] as u64)
                .saturating_mul(kernel[1] as u64),
            LayerSpec::GlobalAvgPool => input.numel() as u64,
            LayerSpec::Flatten => 0,
            LayerSpec::TransformedConv {
                in_channels,
                kernel,
                bias,
                ..
            } => out
                .saturating_mul(in_channels as u64)
                .saturating_mul((kernel * kernel) as u64)
                .saturating_mul(2)
                .saturating_add(bias_adds(bias)),
            // One comparison per output value.
            LayerSpec::CRelu => out,
            // The branches' own layers are counted themselves; the copy is free.
            LayerSpec::Concat { .. } => 0,
            // The addition of the two branches.
            LayerSpec::Residual { .. } => out,
        }
    }
}

fn chain_shape(layers: &[LayerSpec], mut shape: Shape, what: &str) -> Result<Shape, String> {
    for (i, l) in layers.iter().enumerate() {
        shape = l
            .output_shape(shape)
            .map_err(|e| format!("{what}.{i}: {e}"))?;
    }
    Ok(shape)
}

impl Arch {
    /// Checks that every layer accepts the shape before it and that the output has
    /// `classes` values; returns the output shape.
    pub fn validate(&self) -> Result<Shape, String> {
        let input = Shape::Map(self.input);
        match input.checked_numel() {
            Some(n) if n > 0 && n <= MAX_INPUT => {}
            _ => {
                return Err(format!(
                    "input {input} is empty or larger than {MAX_INPUT} values per image"
                ));
            }
        }
        let out = chain_shape(&self.layers, input, "layers")?;
        match out {
            Shape::Flat(c) if c == self.classes => Ok(out),
            other => Err(format!(
                "network output is {other}, expected {} class scores",
                self.classes
            )),
        }
    }

    /// Per-layer statistics in execution order, nested layers included (depth first).
    pub fn layer_stats(&self) -> Vec<LayerStats> {
        let mut out = Vec::new();
        stats_into(&self.layers, "layers", Shape::Map(self.input), &mut out);
        out
    }

    /// Every layer by its path, nested layers included (a residual block and its layers).
    pub fn layer_specs(&self) -> std::collections::BTreeMap<String, &LayerSpec> {
        fn walk<'a>(
            layers: &'a [LayerSpec],
            prefix: &str,
            out: &mut std::collections::BTreeMap<String, &'a LayerSpec>,
        ) {
            for (i, l) in layers.iter().enumerate() {
                let path = format!("{prefix}.{i}");
                for (name, list) in l.nested() {
                    walk(list, &format!("{path}.{name}"), out);
                }
                out.insert(path, l);
            }
        }
        let mut out = std::collections::BTreeMap::new();
        walk(&self.layers, "layers", &mut out);
        out
    }

    /// The layer at a dotted path (`layers.3`, `layers.5.body.0`), to rewrite in place.
    pub fn layer_mut(&mut self, path: &str) -> Result<&mut LayerSpec, String> {
        let bad = || format!("{path}: no such layer");
        let mut parts = path.split('.');
        if parts.next() != Some("layers") {
            return Err(format!("{path}: paths start with layers."));
        }
        let mut list = &mut self.layers[..];
        loop {
            let i: usize = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
            let spec = list.get_mut(i).ok_or_else(bad)?;
            match (parts.next(), spec) {
                (None, spec) => return Ok(spec),
                (Some("body"), LayerSpec::Residual { body, .. }) => list = body,
                (Some("shortcut"), LayerSpec::Residual { shortcut, .. }) => list = shortcut,
                (Some("branches"), LayerSpec::Concat { branches }) => {
                    let b: usize = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
                    list = branches.get_mut(b).ok_or_else(bad)?;
                }
                _ => return Err(bad()),
            }
        }
    }

    /// Every float tensor that a network of this architecture holds (parameters and batch-norm
    /// statistics), by path, with its shape in Burn's layout: what a model file must contain,
    /// checked before the file's tensors are used (`checkpoint::Loaded::check`). A test holds
    /// it equal to what a built `Network` visits.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        tensors_into(&self.layers, "layers", &mut out);
        out
    }

    /// The path of the classifier, the last top-level dense layer: its outputs are the class
    /// scores, which rewrites and width multipliers leave as they are.
    pub fn classifier(&self) -> Option<String> {
        self.layers
            .iter()
            .rposition(|l| matches!(l, LayerSpec::Linear { .. }))
            .map(|i| format!("layers.{i}"))
    }

    /// Parameters of the whole network; saturates at `usize::MAX`.
    pub fn num_params(&self) -> usize {
        self.layer_stats()
            .iter()
            .fold(0usize, |a, s| a.saturating_add(s.params))
    }

    /// FLOPs for one image; saturates at `u64::MAX`.
    pub fn flops(&self) -> u64 {
        self.layer_stats()
            .iter()
            .fold(0u64, |a, s| a.saturating_add(s.flops))
    }
}

/// The tensors of `layers` under `prefix`, by path (see [`Arch::tensor_shapes`]).
fn tensors_into(layers: &[LayerSpec], prefix: &str, out: &mut Vec<(String, Vec<usize>)>) {
    for (i, l) in layers.iter().enumerate() {
        let path = format!("{prefix}.{i}");
        let mut push = |name: &str, shape: Vec<usize>| out.push((format!("{path}.{name}"), shape));
        match *l {
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                groups,
                bias,
                ..
            } => {
                let per_group = in_channels.checked_div(groups).unwrap_or(0);
                push(
                    "weight",
                    vec![out_channels, per_group, kernel[0], kernel[1]],
                );
                if bias {
                    push("bias", vec![out_channels]);
                }
            }
            LayerSpec::Linear {
                in_features,
                out_features,
                bias,
            } => {
                push("weight", vec![in_features, out_features]);
                if bias {
                    push("bias", vec![out_features]);
                }
            }
            LayerSpec::Circulant {
                in_features,
                out_features,
                bias,
                ..
            } => {
                push("weight", vec![in_features.max(out_features)]);
                if bias {
                    push("bias", vec![out_features]);
                }
            }
            LayerSpec::BatchNorm { features } => {
                for name in ["gamma", "beta", "running_mean", "running_var"] {
                    push(name, vec![features]);
                }
            }
            LayerSpec::TransformedConv {
                in_channels,
                base_filters,
                kernel,
                bias,
                ..
            } => {
                push("weight", vec![base_filters, in_channels, kernel, kernel]);
                if bias {
                    push("bias", vec![base_filters]);
                }
            }
            LayerSpec::Residual { .. } | LayerSpec::Concat { .. } => {
                for (name, list) in l.nested() {
                    tensors_into(list, &format!("{path}.{name}"), out);
                }
            }
            _ => {}
        }
    }
}

fn stats_into(layers: &[LayerSpec], prefix: &str, mut shape: Shape, out: &mut Vec<LayerStats>) {
    for (i, l) in layers.iter().enumerate() {
        let path = format!("{prefix}.{i}");
        let Ok(next) = l.output_shape(shape) else {
            return;
        };
        out.push(LayerStats {
            path: path.clone(),
            kind: l.kind(),
            input: shape,
            output: next,
            params: l.own_params(),
            flops: l.own_flops(shape, next),
        });
        for (name, list) in l.nested() {
            stats_into(list, &format!("{path}.{name}"), shape, out);
        }
        shape = next;
    }
}

/// Shorthands used by the model zoo.
pub mod build {
    use super::LayerSpec;

    pub fn conv(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> LayerSpec {
        LayerSpec::Conv2d {
            in_channels: cin,
            out_channels: cout,
            kernel: [k, k],
            stride: [stride, stride],
            padding: [pad, pad],
            pad_extra: [0, 0],
            dilation: [1, 1],
            groups: 1,
            bias,
        }
    }
    pub fn bn(c: usize) -> LayerSpec {
        LayerSpec::BatchNorm { features: c }
    }
    pub fn maxpool(k: usize) -> LayerSpec {
        LayerSpec::MaxPool {
            kernel: [k, k],
            stride: [k, k],
        }
    }
    pub fn linear(i: usize, o: usize) -> LayerSpec {
        LayerSpec::Linear {
            in_features: i,
            out_features: o,
            bias: true,
        }
    }
}
