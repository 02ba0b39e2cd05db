//! The Burn module for an [`Arch`]: one [`Layer`] per layer specification.

use super::arch::{Arch, LayerSpec};
use burn::module::Module;
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

/// One layer of a [`Network`].
#[derive(Module, Debug)]
pub enum Layer {
    Conv2d(Conv2d),
    BatchNorm(BatchNorm),
    Linear(Linear),
    Relu(Relu),
    MaxPool(MaxPool2d),
    AvgPool(AvgPool2d),
    GlobalAvgPool(AdaptiveAvgPool2d),
    Flatten(Flatten),
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
}

impl Network {
    /// Builds a freshly initialised network; the architecture must be valid.
    pub fn new(arch: &Arch, device: &Device) -> Result<Self, String> {
        arch.validate()?;
        Ok(Network {
            layers: arch.layers.iter().map(|l| Layer::new(l, device)).collect(),
            arch: arch.clone(),
        })
    }

    /// Class scores `[N, classes]` for images `[N, C, H, W]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match run(&self.layers, Activation::Map(images)) {
            Activation::Flat(t) => t,
            Activation::Map(t) => t.flatten(1, 3),
        }
    }
}

fn run(layers: &[Layer], mut x: Activation) -> Activation {
    for layer in layers {
        x = layer.forward(x);
    }
    x
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
                dilation,
                groups,
                bias,
            } => Layer::Conv2d(
                Conv2dConfig::new([in_channels, out_channels], kernel)
                    .with_stride(stride)
                    .with_padding(PaddingConfig2d::Explicit(
                        padding[0], padding[1], padding[0], padding[1],
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
            LayerSpec::Residual { body, shortcut } => Layer::Residual(Residual {
                body: body.iter().map(|l| Layer::new(l, device)).collect(),
                shortcut: shortcut.iter().map(|l| Layer::new(l, device)).collect(),
            }),
        }
    }

    pub fn forward(&self, x: Activation) -> Activation {
        match self {
            Layer::Conv2d(m) => Activation::Map(m.forward(x.map())),
            Layer::BatchNorm(m) => match x {
                Activation::Map(t) => Activation::Map(m.forward(t)),
                Activation::Flat(t) => Activation::Flat(m.forward(t)),
            },
            Layer::Linear(m) => match x {
                Activation::Flat(t) => Activation::Flat(m.forward(t)),
                Activation::Map(_) => unreachable!("architecture validated: linear needs flat"),
            },
            Layer::Relu(m) => match x {
                Activation::Map(t) => Activation::Map(m.forward(t)),
                Activation::Flat(t) => Activation::Flat(m.forward(t)),
            },
            Layer::MaxPool(m) => Activation::Map(m.forward(x.map())),
            Layer::AvgPool(m) => Activation::Map(m.forward(x.map())),
            Layer::GlobalAvgPool(m) => Activation::Map(m.forward(x.map())),
            Layer::Flatten(_) => match x {
                Activation::Map(t) => Activation::Flat(t.flatten(1, 3)),
                flat => flat,
            },
            Layer::Residual(r) => {
                let body = run(&r.body, x.clone());
                let shortcut = run(&r.shortcut, x);
                body.add(shortcut)
            }
        }
    }
}
