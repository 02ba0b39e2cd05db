//! The model zoo and the Burn network built from an architecture description.

pub mod arch;
pub mod network;
pub mod width;

pub use arch::{Arch, LayerSpec, LayerStats, Shape};
pub use network::Network;

use arch::build::{bn, conv, linear, maxpool};
use serde::{Deserialize, Serialize};

/// Models convpress can build by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// LeNet-300-100: a 784-300-100-10 perceptron (LeCun et al. 1998; Han et al. 2015).
    Lenet300,
    /// LeNet-5 in Caffe's form, as in Deep Compression: conv 20@5x5, pool, conv 50@5x5, pool,
    /// fc 500, ReLU, fc 10 (431K parameters on 28x28 input).
    Lenet5,
    /// A small VGG-style net: three stages of two 3x3 conv + batch-norm + ReLU (32, 64, 128
    /// channels), max-pooling, then fc 256 and fc 10.
    VggSmall,
    /// ResNet-20 for 32x32 input (He et al. 2016, section 4.2), with 1x1 projection shortcuts
    /// where the shape changes.
    Resnet20,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Lenet300 => "lenet300",
            ModelKind::Lenet5 => "lenet5",
            ModelKind::VggSmall => "vgg-small",
            ModelKind::Resnet20 => "resnet20",
        }
    }

    /// Zero padding that brings an image of `hw` to the size this model is designed for
    /// (MNIST's 28x28 to 32x32 for the CIFAR-style nets).
    pub fn default_pad(self, hw: [usize; 2]) -> usize {
        match self {
            ModelKind::VggSmall | ModelKind::Resnet20 if hw[0] < 32 && hw[0] == hw[1] => {
                (32 - hw[0]) / 2
            }
            _ => 0,
        }
    }

    /// The architecture for images of shape `input` (`[C, H, W]`) and `classes` classes.
    pub fn arch(self, input: [usize; 3], classes: usize) -> Result<Arch, String> {
        let [c, h, w] = input;
        self.build(input, classes)
            .map_err(|e| format!("{} cannot take {c}x{h}x{w} input: {e}", self.name()))
    }

    fn build(self, input: [usize; 3], classes: usize) -> Result<Arch, String> {
        let [c, h, w] = input;
        let layers = match self {
            ModelKind::Lenet300 => vec![
                LayerSpec::Flatten,
                linear(c * h * w, 300),
                LayerSpec::Relu,
                linear(300, 100),
                LayerSpec::Relu,
                linear(100, classes),
            ],
            ModelKind::Lenet5 => {
                let features = vec![
                    conv(c, 20, 5, 1, 0, true),
                    maxpool(2),
                    conv(20, 50, 5, 1, 0, true),
                    maxpool(2),
                    LayerSpec::Flatten,
                ];
                let flat = flat_size(&features, input)?;
                let mut layers = features;
                layers.extend([linear(flat, 500), LayerSpec::Relu, linear(500, classes)]);
                layers
            }
            ModelKind::VggSmall => {
                let mut layers = Vec::new();
                let mut cin = c;
                for cout in [32, 64, 128] {
                    for _ in 0..2 {
                        layers.extend([conv(cin, cout, 3, 1, 1, false), bn(cout), LayerSpec::Relu]);
                        cin = cout;
                    }
                    layers.push(maxpool(2));
                }
                layers.push(LayerSpec::Flatten);
                let flat = flat_size(&layers, input)?;
                layers.extend([linear(flat, 256), LayerSpec::Relu, linear(256, classes)]);
                layers
            }
            ModelKind::Resnet20 => {
                let mut layers = vec![conv(c, 16, 3, 1, 1, false), bn(16), LayerSpec::Relu];
                let mut cin = 16;
                for (stage, cout) in [16, 32, 64].into_iter().enumerate() {
                    for block in 0..3 {
                        let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                        let shortcut = if stride != 1 || cin != cout {
                            vec![conv(cin, cout, 1, stride, 0, false), bn(cout)]
                        } else {
                            vec![]
                        };
                        layers.push(LayerSpec::Residual {
                            body: vec![
                                conv(cin, cout, 3, stride, 1, false),
                                bn(cout),
                                LayerSpec::Relu,
                                conv(cout, cout, 3, 1, 1, false),
                                bn(cout),
                            ],
                            shortcut,
                        });
                        layers.push(LayerSpec::Relu);
                        cin = cout;
                    }
                }
                layers.extend([
                    LayerSpec::GlobalAvgPool,
                    LayerSpec::Flatten,
                    linear(64, classes),
                ]);
                layers
            }
        };
        let arch = Arch {
            name: self.name().to_string(),
            input,
            classes,
            layers,
        };
        arch.validate()?;
        Ok(arch)
    }
}

fn flat_size(layers: &[LayerSpec], input: [usize; 3]) -> Result<usize, String> {
    let mut s = Shape::Map(input);
    for l in layers {
        s = l.output_shape(s)?;
    }
    Ok(s.numel())
}
