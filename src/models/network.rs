//! The Burn module for an [`Arch`]: one [`Layer`] per layer specification.

use super::arch::{Arch, LayerSpec};
use crate::kernels::{self, PoolParams, extension::Signs};
use burn::backend::ops::ConvOptions;
use burn::module::Module;
use burn::module::Param;
use burn::nn::Initializer;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{
    AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, AvgPool2d, AvgPool2dConfig, MaxPool2d,
    MaxPool2dConfig,
};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::prelude::*;

/// `[N, C, H, W]` to `[N, C*H*W]`.
#[derive(Module, Debug, Default)]
pub struct Flatten;

/// `body(x) + shortcut(x)`.
#[derive(Module, Debug)]
pub struct Residual {
    pub body: Vec<Layer>,
    pub shortcut: Vec<Layer>,
}

/// A circulant projection layer (Cheng et al. 2015, `kernels::circulant`): `weight` is the
/// vector `r` of `max(in, out)` values, the input signs come from the spec's seed.
#[derive(Module, Debug)]
pub struct Circulant {
    pub weight: Param<Tensor<1>>,
    pub bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub out_features: usize,
    #[module(skip)]
    pub signs: Signs,
}

impl Circulant {
    /// Initialised as Burn initialises a linear layer of the same fan-in (uniform in
    /// ±1/√in): each output sums `in` products, as a dense layer's does.
    pub fn new(
        in_features: usize,
        out_features: usize,
        bias: bool,
        seed: u64,
        device: &Device,
    ) -> Self {
        let bound = 1.0 / (in_features as f64).sqrt();
        let init = Initializer::Uniform {
            min: -bound,
            max: bound,
        };
        Circulant {
            weight: init.init([in_features.max(out_features)], device),
            bias: bias.then(|| init.init([out_features], device)),
            out_features,
            signs: Signs(std::sync::Arc::new(kernels::circulant::signs(
                seed,
                in_features,
            ))),
        }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let bias = match &self.bias {
            Some(b) => b.val(),
            None => Tensor::zeros([self.out_features], &x.device()),
        };
        kernels::extension::circulant(x, self.weight.val(), bias, &self.signs)
    }
}

/// Concatenated ReLU: `[relu(x), relu(−x)]` along dimension 1 (`LayerSpec::CRelu`).
#[derive(Module, Debug, Default)]
pub struct CRelu;

/// Branches on one input, concatenated along dimension 1 (`LayerSpec::Concat`).
#[derive(Module, Debug)]
pub struct Concat {
    pub branches: Vec<Vec<Layer>>,
}

/// A convolution of learned filters and their rotations and mirror images
/// (`LayerSpec::TransformedConv`, `compress::compact::transformed`).
#[derive(Module, Debug)]
pub struct TransformedConv {
    /// The learned filters `[base, in, k, k]`.
    pub weight: Param<Tensor<4>>,
    /// One per learned filter, shared by its transforms.
    pub bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub transforms: usize,
    #[module(skip)]
    pub stride: usize,
    #[module(skip)]
    pub padding: usize,
}

impl TransformedConv {
    /// Initialised as Burn initialises a convolution with as many outputs.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_channels: usize,
        base: usize,
        transforms: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        device: &Device,
    ) -> Self {
        let init = Initializer::KaimingUniform {
            gain: 1.0 / 3f64.sqrt(),
            fan_out_only: false,
        };
        let fan_in = in_channels * kernel * kernel;
        let fan_out = base * transforms * kernel * kernel;
        TransformedConv {
            weight: init.init_with(
                [base, in_channels, kernel, kernel],
                Some(fan_in),
                Some(fan_out),
                device,
            ),
            bias: bias.then(|| init.init_with([base], Some(fan_in), Some(fan_out), device)),
            transforms,
            stride,
            padding,
        }
    }

    /// The plain convolution's weight `[base·G, in, k, k]` and bias: through Burn's ops (so
    /// gradients reach the learned filters) when training, expanded on the host otherwise
    /// (one copy instead of a chain of small tensor operations per call).
    pub fn plain(&self) -> (Tensor<4>, Option<Tensor<1>>) {
        use crate::compress::compact::transformed::{expand, expand_bias, expand_tensor};
        let g = self.transforms;
        let w = self.weight.val();
        if w.device().is_autodiff() {
            let bias = self.bias.as_ref().map(|b| expand_bias(b.val(), g));
            return (expand_tensor(w, g), bias);
        }
        let [base, cin, k, _] = w.dims();
        let device = w.device();
        let host = |t: Tensor<1>| -> Vec<f32> {
            t.into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .expect("f32 weights")
        };
        let wv = host(w.reshape([base * cin * k * k]));
        let bv = self.bias.as_ref().map(|b| host(b.val()));
        let (ew, eb) = expand(&wv, bv.as_deref(), base, cin, k, g);
        (
            Tensor::<1>::from_floats(ew.as_slice(), &device).reshape([base * g, cin, k, k]),
            eb.map(|b| Tensor::<1>::from_floats(b.as_slice(), &device)),
        )
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let (weight, bias) = self.plain();
        let p = self.padding;
        let options = ConvOptions::new_with_padding([self.stride; 2], [(p, p), (p, p)], [1, 1], 1);
        kernels::extension::conv2d(x, weight, bias, options)
    }
}

/// One layer of a [`Network`].
#[derive(Module, Debug)]
pub enum Layer {
    Conv2d(Conv2d),
    BatchNorm(BatchNorm),
    Linear(Linear),
    Circulant(Circulant),
    Relu(Relu),
    MaxPool(MaxPool2d),
    AvgPool(AvgPool2d),
    GlobalAvgPool(AdaptiveAvgPool2d),
    Flatten(Flatten),
    CRelu(CRelu),
    Concat(Concat),
    TransformedConv(TransformedConv),
    Residual(Residual),
}

/// An activation between layers: a feature map or a flat vector per image.
#[derive(Debug, Clone)]
pub enum Activation {
    Map(Tensor<4>),
    Flat(Tensor<2>),
}

impl Activation {
    fn map(self) -> Tensor<4> {
        match self {
            Activation::Map(t) => t,
            Activation::Flat(_) => unreachable!("architecture validated: feature map expected"),
        }
    }
    /// The activations concatenated along dimension 1 (channels or features).
    fn cat(parts: Vec<Activation>) -> Activation {
        match parts.first() {
            Some(Activation::Map(_)) => Activation::Map(Tensor::cat(
                parts.into_iter().map(Activation::map).collect(),
                1,
            )),
            _ => Activation::Flat(Tensor::cat(
                parts
                    .into_iter()
                    .map(|p| match p {
                        Activation::Flat(t) => t,
                        Activation::Map(_) => unreachable!("architecture validated: flat parts"),
                    })
                    .collect(),
                1,
            )),
        }
    }

    fn add(self, other: Activation) -> Activation {
        match (self, other) {
            (Activation::Map(a), Activation::Map(b)) => Activation::Map(a + b),
            (Activation::Flat(a), Activation::Flat(b)) => Activation::Flat(a + b),
            _ => unreachable!("architecture validated: residual branches agree"),
        }
    }
}

/// A network built from an architecture description. The description is kept beside the
/// layers (and saved with the weights) as the model's structure.
#[derive(Module, Debug)]
pub struct Network {
    pub layers: Vec<Layer>,
    #[module(skip)]
    pub arch: Arch,
    /// Quantization-aware training: the inputs of these layers are fake-quantized in the
    /// forward pass (`compress::qat`). Not part of the saved model.
    #[module(skip)]
    pub fake_quant: Option<std::sync::Arc<crate::compress::qat::FakeQuantInputs>>,
}

impl Network {
    /// Builds a freshly initialised network; the architecture must be valid.
    pub fn new(arch: &Arch, device: &Device) -> Result<Self, String> {
        arch.validate()?;
        Ok(Network {
            layers: arch.layers.iter().map(|l| Layer::new(l, device)).collect(),
            arch: arch.clone(),
            fake_quant: None,
        })
    }

    /// [`Network::new`] with its initial weights drawn from `device`'s generator seeded with
    /// `seed`. The generator is process-wide and Burn draws a parameter's initial values
    /// lazily (on first use), so two seeded networks built at once in one process (tests, a
    /// library user's threads) could interleave their draws: seeding and drawing every
    /// parameter happen here under one lock.
    pub fn seeded(arch: &Arch, device: &Device, seed: u64) -> Result<Self, String> {
        struct Draw;
        impl burn::module::ModuleVisitor for Draw {
            fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                let _ = param.val();
            }
        }
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        device.seed(seed);
        let network = Network::new(arch, device)?;
        network.visit(&mut Draw);
        Ok(network)
    }

    /// The activation after top-level layer `last` (a FitNets hint or guided layer): the
    /// layers up to it run as in [`Network::forward`].
    pub fn forward_to(&self, images: Tensor<4>, last: usize) -> Activation {
        let end = (last + 1).min(self.layers.len());
        run(&self.layers[..end], Activation::Map(images))
    }

    /// Class scores `[N, classes]` for images `[N, C, H, W]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = Activation::Map(images);
        let out = match &self.fake_quant {
            Some(fq) => run_fake_quant(&self.layers, "layers", x, fq),
            None => run(&self.layers, x),
        };
        match out {
            Activation::Flat(t) => t,
            Activation::Map(t) => t.flatten(1, 3),
        }
    }
}

fn run(layers: &[Layer], mut x: Activation) -> Activation {
    let mut i = 0;
    while i < layers.len() {
        if let Some((y, used)) = fused_inference(&layers[i..], &x) {
            x = y;
            i += used;
        } else {
            x = layers[i].forward(x);
            i += 1;
        }
    }
    x
}

/// [`run`] with the inputs of the layers that `fq` names fake-quantized (quantization-aware
/// training, XNOR-Net's signs) or their weight gradients on power-of-two inputs (few
/// multiplications); no fused inference.
fn run_fake_quant(
    layers: &[Layer],
    prefix: &str,
    mut x: Activation,
    fq: &crate::compress::qat::FakeQuantInputs,
) -> Activation {
    for (i, layer) in layers.iter().enumerate() {
        let path = format!("{prefix}.{i}");
        x = fq.apply(&path, x);
        x = match layer {
            Layer::Residual(r) => {
                let body = run_fake_quant(&r.body, &format!("{path}.body"), x.clone(), fq);
                let shortcut = run_fake_quant(&r.shortcut, &format!("{path}.shortcut"), x, fq);
                body.add(shortcut)
            }
            Layer::Concat(c) => Activation::cat(
                (c.branches.iter().enumerate())
                    .map(|(b, l)| run_fake_quant(l, &format!("{path}.branches.{b}"), x.clone(), fq))
                    .collect(),
            ),
            layer => match fq.shift_bits(&path) {
                Some(bits) => crate::compress::few_multiplications::forward(layer, x, bits),
                None => layer.forward(x),
            },
        };
    }
    x
}

/// At inference on convpress's kernels, a convolution followed by batch norm and/or ReLU runs
/// as one convolution: batch norm with its running statistics is an affine map per output
/// channel, folded into the weights and bias (`w γ/σ`, `(b − μ) γ/σ + β`; Jacob et al. 2018,
/// §3.2), and the ReLU is applied as each image's output is written. Saves one or two passes
/// over every such layer's output. Training, autodiff devices and `--ops burn` keep the layers.
fn fused_inference(layers: &[Layer], x: &Activation) -> Option<(Activation, usize)> {
    let Activation::Map(input) = x else {
        return None;
    };
    if !matches!(
        layers.first()?,
        Layer::Conv2d(_) | Layer::TransformedConv(_)
    ) || input.device().is_autodiff()
        || !kernels::extension::routed(input)
    {
        return None;
    }
    let [_, _, h, w] = input.dims();
    // The plain convolution's weight, bias and options (a transformed one's expanded).
    let (mut weight, bias, options) = match &layers[0] {
        Layer::Conv2d(conv) => {
            let padding = padding_pairs(&conv.padding, [h, w], conv.kernel_size, conv.stride);
            let options =
                ConvOptions::new_with_padding(conv.stride, padding, conv.dilation, conv.groups);
            (
                conv.weight.val(),
                conv.bias.as_ref().map(|b| b.val()),
                options,
            )
        }
        Layer::TransformedConv(t) => {
            let p = t.padding;
            let options = ConvOptions::new_with_padding([t.stride; 2], [(p, p), (p, p)], [1, 1], 1);
            let (weight, bias) = t.plain();
            (weight, bias, options)
        }
        _ => unreachable!("matched above"),
    };
    let out = weight.dims()[0];
    let mut bias = bias.unwrap_or_else(|| Tensor::zeros([out], &input.device()));
    let mut used = 1;
    if let Some(Layer::BatchNorm(bn)) = layers.get(1) {
        let device = input.device();
        let var = bn.running_var.value().to_device(&device);
        let mean = bn.running_mean.value().to_device(&device);
        let scale = bn.gamma.val() / var.add_scalar(bn.epsilon).sqrt();
        weight = weight * scale.clone().reshape([out, 1, 1, 1]);
        bias = (bias - mean) * scale + bn.beta.val();
        used = 2;
    }
    let relu = matches!(layers.get(used), Some(Layer::Relu(_)));
    if used == 1 && !relu {
        return None;
    }
    let y = if relu {
        used += 1;
        kernels::extension::conv2d_relu(input.clone(), weight, bias, options)
    } else {
        kernels::extension::conv2d(input.clone(), weight, Some(bias), options)
    };
    Some((Activation::Map(y), used))
}

impl Layer {
    pub fn new(spec: &LayerSpec, device: &Device) -> Self {
        match spec {
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
            } => Layer::Conv2d(
                Conv2dConfig::new([in_channels, out_channels], kernel)
                    .with_stride(stride)
                    .with_padding(PaddingConfig2d::Explicit(
                        padding[0],
                        padding[1],
                        padding[0] + pad_extra[0],
                        padding[1] + pad_extra[1],
                    ))
                    .with_dilation(dilation)
                    .with_groups(groups)
                    .with_bias(bias)
                    .init(device),
            ),
            &LayerSpec::BatchNorm { features } => {
                Layer::BatchNorm(BatchNormConfig::new(features).init(device))
            }
            &LayerSpec::Linear {
                in_features,
                out_features,
                bias,
            } => Layer::Linear(
                LinearConfig::new(in_features, out_features)
                    .with_bias(bias)
                    .init(device),
            ),
            &LayerSpec::Circulant {
                in_features,
                out_features,
                bias,
                sign_seed,
            } => Layer::Circulant(Circulant::new(
                in_features,
                out_features,
                bias,
                sign_seed,
                device,
            )),
            LayerSpec::Relu => Layer::Relu(Relu::new()),
            &LayerSpec::MaxPool { kernel, stride } => {
                Layer::MaxPool(MaxPool2dConfig::new(kernel).with_strides(stride).init())
            }
            &LayerSpec::AvgPool { kernel, stride } => {
                Layer::AvgPool(AvgPool2dConfig::new(kernel).with_strides(stride).init())
            }
            LayerSpec::GlobalAvgPool => {
                Layer::GlobalAvgPool(AdaptiveAvgPool2dConfig::new([1, 1]).init())
            }
            LayerSpec::Flatten => Layer::Flatten(Flatten),
            LayerSpec::CRelu => Layer::CRelu(CRelu),
            LayerSpec::Concat { branches } => Layer::Concat(Concat {
                branches: branches
                    .iter()
                    .map(|b| b.iter().map(|l| Layer::new(l, device)).collect())
                    .collect(),
            }),
            &LayerSpec::TransformedConv {
                in_channels,
                base_filters,
                transforms,
                kernel,
                stride,
                padding,
                bias,
            } => Layer::TransformedConv(TransformedConv::new(
                in_channels,
                base_filters,
                transforms,
                kernel,
                stride,
                padding,
                bias,
                device,
            )),
            LayerSpec::Residual { body, shortcut } => Layer::Residual(Residual {
                body: body.iter().map(|l| Layer::new(l, device)).collect(),
                shortcut: shortcut.iter().map(|l| Layer::new(l, device)).collect(),
            }),
        }
    }

    pub fn forward(&self, x: Activation) -> Activation {
        match self {
            Layer::Conv2d(m) => Activation::Map(conv2d(m, x.map())),
            Layer::BatchNorm(m) => match x {
                Activation::Map(t) => Activation::Map(batch_norm(m, t)),
                Activation::Flat(t) => Activation::Flat(batch_norm(m, t)),
            },
            Layer::Linear(m) => match x {
                Activation::Flat(t) => Activation::Flat(m.forward(t)),
                Activation::Map(_) => unreachable!("architecture validated: linear needs flat"),
            },
            Layer::Circulant(m) => match x {
                Activation::Flat(t) => Activation::Flat(m.forward(t)),
                Activation::Map(_) => unreachable!("architecture validated: circulant needs flat"),
            },
            Layer::Relu(m) => match x {
                Activation::Map(t) => Activation::Map(m.forward(t)),
                Activation::Flat(t) => Activation::Flat(m.forward(t)),
            },
            Layer::MaxPool(m) => Activation::Map(max_pool2d(m, x.map())),
            Layer::AvgPool(m) => Activation::Map(avg_pool2d(m, x.map())),
            Layer::GlobalAvgPool(m) => Activation::Map(m.forward(x.map())),
            Layer::Flatten(_) => match x {
                Activation::Map(t) => Activation::Flat(t.flatten(1, 3)),
                flat => flat,
            },
            Layer::CRelu(_) => {
                use burn::tensor::activation::relu;
                match x {
                    Activation::Map(t) => {
                        Activation::Map(Tensor::cat(vec![relu(t.clone()), relu(t.neg())], 1))
                    }
                    Activation::Flat(t) => {
                        Activation::Flat(Tensor::cat(vec![relu(t.clone()), relu(t.neg())], 1))
                    }
                }
            }
            Layer::Concat(c) => {
                Activation::cat(c.branches.iter().map(|b| run(b, x.clone())).collect())
            }
            Layer::TransformedConv(m) => Activation::Map(m.forward(x.map())),
            Layer::Residual(r) => {
                let body = run(&r.body, x.clone());
                let shortcut = run(&r.shortcut, x);
                body.add(shortcut)
            }
        }
    }
}

// The arithmetic of Burn's conv, batch-norm and pooling modules, run through
// `kernels::extension` (convpress's CPU kernels on Flex, Burn's op elsewhere). Parameters,
// running statistics and saved files are Burn's, unchanged.

/// `((top, bottom), (left, right))` padding, as Burn's modules compute it.
fn padding_pairs(
    padding: &PaddingConfig2d,
    hw: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
) -> [(usize, usize); 2] {
    let same = |i: usize| {
        let out = hw[i].div_ceil(stride[i]);
        let total = if out > 0 {
            ((out - 1) * stride[i] + kernel[i]).saturating_sub(hw[i])
        } else {
            0
        };
        (total / 2, total - total / 2)
    };
    match *padding {
        PaddingConfig2d::Valid => [(0, 0), (0, 0)],
        PaddingConfig2d::Same => [same(0), same(1)],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [(top, bottom), (left, right)],
    }
}

fn conv2d(m: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let padding = padding_pairs(&m.padding, [h, w], m.kernel_size, m.stride);
    let options = ConvOptions::new_with_padding(m.stride, padding, m.dilation, m.groups);
    kernels::extension::conv2d(x, m.weight.val(), m.bias.as_ref().map(|b| b.val()), options)
}

/// Burn's `BatchNorm::forward`: batch statistics (and a running-average update) when the layer
/// trains on an autodiff device, the running statistics otherwise.
fn batch_norm<const D: usize>(m: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    if !(device.is_autodiff() && m.training.is_enabled()) {
        let mean = m.running_mean.value().to_device(&device);
        let var = m.running_var.value().to_device(&device);
        return kernels::extension::batch_norm(
            x,
            m.gamma.val(),
            m.beta.val(),
            mean,
            var,
            m.epsilon,
        );
    }
    let (y, mean, var) =
        kernels::extension::batch_norm_train(x, m.gamma.val(), m.beta.val(), m.epsilon);
    let running = |state: &burn::module::RunningState<Tensor<1>>, batch: Tensor<1>| {
        let old = state.value_sync().to_device(&device);
        let new = old.mul_scalar(1.0 - m.momentum) + batch.detach().mul_scalar(m.momentum);
        state.update(new.detach());
    };
    running(&m.running_mean, mean);
    running(&m.running_var, var);
    y
}

/// Pooling parameters when the kernels can take the layer (symmetric padding, no ceil mode).
fn pool_params(
    padding: &PaddingConfig2d,
    hw: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
) -> Option<PoolParams> {
    let [(t, b), (l, r)] = padding_pairs(padding, hw, kernel, stride);
    (t == b && l == r && !ceil_mode).then_some(PoolParams {
        kernel,
        stride,
        padding: [t, l],
        dilation,
    })
}

fn max_pool2d(m: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    match pool_params(
        &m.padding,
        [h, w],
        m.kernel_size,
        m.stride,
        m.dilation,
        m.ceil_mode,
    ) {
        Some(p) => kernels::extension::max_pool2d(x, p),
        None => m.forward(x),
    }
}

fn avg_pool2d(m: &AvgPool2d, x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    match pool_params(
        &m.padding,
        [h, w],
        m.kernel_size,
        m.stride,
        [1, 1],
        m.ceil_mode,
    ) {
        Some(p) => kernels::extension::avg_pool2d(x, p, m.count_include_pad),
        None => m.forward(x),
    }
}
