//! Width multipliers: the same architecture with every hidden layer `w` times as wide
//! (MobileNet's α, Howard et al. 2017, §3.3). Used to make thin students for distillation and
//! thinner rewrites; the input channels and the class scores stay as they are.

use super::arch::{Arch, LayerSpec, Shape};

/// `arch` with every channel and hidden-feature count `c` replaced by `max(1, round(c·w))`.
/// One rule for every count, so a residual block's branches still agree and a concatenation's
/// parts still add up; a linear layer's input is recomputed from the shape it receives. The
/// input and the classifier's output keep their sizes. Errors if `w` is not a positive
/// number or the result is not a valid network (a circulant layer cannot change its width).
pub fn scale(arch: &Arch, w: f64) -> Result<Arch, String> {
    if !(w.is_finite() && w > 0.0) {
        return Err(format!("width must be a positive number, got {w}"));
    }
    let c = |n: usize| ((n as f64 * w).round() as usize).max(1);
    let mut layers = arch.layers.clone();
    let last = arch.classifier();
    scale_list(
        &mut layers,
        "layers",
        Shape::Map(arch.input),
        &c,
        last.as_deref(),
    )?;
    let out = Arch {
        layers,
        ..arch.clone()
    };
    out.validate()
        .map_err(|e| format!("{} at width {w}: {e}", arch.name))?;
    Ok(out)
}

/// Scales `layers` (under `prefix`, seeing `shape`) in place; returns the output shape.
fn scale_list(
    layers: &mut [LayerSpec],
    prefix: &str,
    mut shape: Shape,
    c: &dyn Fn(usize) -> usize,
    classifier: Option<&str>,
) -> Result<Shape, String> {
    for (i, l) in layers.iter_mut().enumerate() {
        let path = format!("{prefix}.{i}");
        let channels = match shape {
            Shape::Map([ch, _, _]) => ch,
            Shape::Flat(f) => f,
        };
        match l {
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                groups,
                ..
            } => {
                let depthwise = *groups == *in_channels && *groups > 1;
                *in_channels = channels;
                *out_channels = c(*out_channels);
                if depthwise {
                    *groups = channels;
                } else if *groups > 1 {
                    return Err(format!(
                        "{path}: a grouped convolution ({groups} groups) has no width rule"
                    ));
                }
            }
            LayerSpec::TransformedConv {
                in_channels,
                base_filters,
                ..
            } => {
                *in_channels = channels;
                *base_filters = c(*base_filters);
            }
            LayerSpec::BatchNorm { features } => *features = channels,
            LayerSpec::Linear {
                in_features,
                out_features,
                ..
            } => {
                *in_features = channels;
                if classifier != Some(path.as_str()) {
                    *out_features = c(*out_features);
                }
            }
            LayerSpec::Circulant { .. } => {
                return Err(format!(
                    "{path}: a circulant layer's size is fixed by its vector; scale the model before making it circulant"
                ));
            }
            LayerSpec::Residual { .. } | LayerSpec::Concat { .. } => {
                for (name, list) in l.nested_mut() {
                    scale_list(list, &format!("{path}.{name}"), shape, c, None)?;
                }
            }
            LayerSpec::Relu
            | LayerSpec::CRelu
            | LayerSpec::MaxPool { .. }
            | LayerSpec::AvgPool { .. }
            | LayerSpec::GlobalAvgPool
            | LayerSpec::Flatten => {}
        }
        shape = l.output_shape(shape).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelKind;

    #[test]
    fn thin_lenet5_and_resnet20() {
        let a = ModelKind::Lenet5.arch([1, 28, 28], 10).unwrap();
        let t = scale(&a, 0.5).unwrap();
        assert_eq!(t.classes, 10);
        let s = t.layer_specs();
        assert!(matches!(
            s["layers.0"],
            LayerSpec::Conv2d {
                in_channels: 1,
                out_channels: 10,
                ..
            }
        ));
        assert!(matches!(
            s["layers.5"],
            LayerSpec::Linear {
                in_features: 400,
                out_features: 250,
                ..
            }
        ));
        let r = ModelKind::Resnet20.arch([1, 32, 32], 10).unwrap();
        assert!(scale(&r, 0.25).unwrap().num_params() < r.num_params() / 10);
        assert!(scale(&a, 0.0).is_err());
        assert!(scale(&a, f64::NAN).is_err());
    }
}
