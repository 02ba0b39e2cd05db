//! Transferred convolutional filters by transformation (the survey's "transferred filters";
//! Dieleman, De Fauw & Kavukcuoglu 2016, "Exploiting cyclic symmetry in convolutional neural
//! networks"; Cohen & Welling 2016, "Group equivariant convolutional networks", §6 for the
//! group p4m of rotations by 90° and mirror images): a layer learns `base` filters and uses
//! each under the rotations (4 transforms) or the rotations and their mirror images (8), so it
//! holds 1/4 or 1/8 of the weights of a plain convolution with as many outputs.
//!
//! Output channel `b·G + g` is filter `b` under transform `g`: `g < 4` is the rotation by
//! `g·90°` (counter-clockwise), `g ≥ 4` the rotation by `(g − 4)·90°` of the mirror image
//! (left-right). Rotating the input by 90° then permutes each filter's outputs: the layer is
//! equivariant (Cohen & Welling, eq. 10), exactly so with square kernels and symmetric padding.
//! The same expansion runs in training ([`expand_tensor`], through Burn's autodiff) and at
//! load in the runtime ([`expand`]); a test holds them equal.

use burn::prelude::*;

/// The position in the learned `k×k` filter that transform `g` reads for output position
/// `(i, j)`: rotation `rot(t)[i][j] = t[j][k−1−i]` applied `g mod 4` times, after the mirror
/// `m(t)[i][j] = t[i][k−1−j]` for `g ≥ 4`.
pub fn source(i: usize, j: usize, g: usize, k: usize) -> (usize, usize) {
    let (mut a, mut b) = (i, j);
    for _ in 0..g % 4 {
        (a, b) = (b, k - 1 - a);
    }
    if g >= 4 { (a, k - 1 - b) } else { (a, b) }
}

/// The plain convolution weight `[base·G, in, k, k]` of learned filters `weight`
/// `[base, in, k, k]` (row-major), and its bias repeated per transform.
pub fn expand(
    weight: &[f32],
    bias: Option<&[f32]>,
    base: usize,
    in_channels: usize,
    k: usize,
    transforms: usize,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let plane = k * k;
    let filter = in_channels * plane;
    let mut out = vec![0f32; base * transforms * filter];
    for b in 0..base {
        for g in 0..transforms {
            let dst = &mut out[(b * transforms + g) * filter..][..filter];
            let src = &weight[b * filter..][..filter];
            for c in 0..in_channels {
                for i in 0..k {
                    for j in 0..k {
                        let (si, sj) = source(i, j, g, k);
                        dst[c * plane + i * k + j] = src[c * plane + si * k + sj];
                    }
                }
            }
        }
    }
    let bias = bias.map(|b| {
        b.iter()
            .flat_map(|&v| std::iter::repeat_n(v, transforms))
            .collect()
    });
    (out, bias)
}

/// [`expand`] on a Burn tensor `[base, in, k, k]`, differentiable (the learned filters get
/// the summed gradients of all their transforms): one gather of every transform's plane
/// positions, `[base, in, G·k·k]`, then a reordering to `[base·G, in, k, k]`.
pub fn expand_tensor(weight: Tensor<4>, transforms: usize) -> Tensor<4> {
    let [b, c, k, _] = weight.dims();
    let index: Vec<i64> = (0..transforms)
        .flat_map(|g| {
            (0..k * k).map(move |p| {
                let (si, sj) = source(p / k, p % k, g, k);
                (si * k + sj) as i64
            })
        })
        .collect();
    let index = Tensor::<1, Int>::from_ints(index.as_slice(), &weight.device());
    weight
        .reshape([b, c, k * k])
        .select(2, index)
        .reshape([b, c, transforms, k, k])
        .swap_dims(1, 2)
        .reshape([b * transforms, c, k, k])
}

/// [`expand`]'s bias on a Burn tensor.
pub fn expand_bias(bias: Tensor<1>, transforms: usize) -> Tensor<1> {
    let [b] = bias.dims();
    bias.reshape([b, 1])
        .repeat_dim(1, transforms)
        .reshape([b * transforms])
}

/// `loaded` with every transformed convolution replaced by the plain convolution it expands
/// to (its architecture and tensors), for the runtime; `None` if it has none.
pub fn expand_model(
    loaded: &crate::checkpoint::Loaded,
) -> Result<Option<crate::checkpoint::Loaded>, String> {
    use crate::models::LayerSpec;
    let paths: Vec<String> = loaded
        .arch
        .layer_specs()
        .into_iter()
        .filter(|(_, l)| matches!(l, LayerSpec::TransformedConv { .. }))
        .map(|(p, _)| p)
        .collect();
    if paths.is_empty() {
        return Ok(None);
    }
    let mut out = loaded.clone();
    for path in paths {
        if out
            .quant
            .as_ref()
            .is_some_and(|q| q.layers.contains_key(&path))
        {
            return Err(format!(
                "{path}: quantized transformed convolutions are not supported by the runtime"
            ));
        }
        let spec = out.arch.layer_mut(&path)?;
        let LayerSpec::TransformedConv {
            in_channels,
            base_filters,
            transforms,
            kernel,
            stride,
            padding,
            bias,
        } = *spec
        else {
            unreachable!("chosen by kind");
        };
        let out_channels = base_filters * transforms;
        *spec = LayerSpec::Conv2d {
            in_channels,
            out_channels,
            kernel: [kernel; 2],
            stride: [stride; 2],
            padding: [padding; 2],
            pad_extra: [0, 0],
            dilation: [1, 1],
            groups: 1,
            bias,
        };
        type Taken = Option<(Vec<f32>, Option<burn::module::ParamId>)>;
        let mut take = |name: &str| -> Result<Taken, String> {
            match out.tensors.remove(&format!("{path}.{name}")) {
                Some((d, id)) => Ok(Some((
                    d.try_to_vec::<f32>()
                        .map_err(|e| format!("{path}.{name} is not f32: {e:?}"))?,
                    id,
                ))),
                None => Ok(None),
            }
        };
        let (w, wid) = take("weight")?.ok_or_else(|| format!("no tensor {path}.weight"))?;
        let b = take("bias")?;
        if w.len() != base_filters * in_channels * kernel * kernel {
            return Err(format!("{path}.weight does not fit the layer"));
        }
        let (ew, eb) = expand(
            &w,
            b.as_ref().map(|(v, _)| v.as_slice()),
            base_filters,
            in_channels,
            kernel,
            transforms,
        );
        out.tensors.insert(
            format!("{path}.weight"),
            (
                burn::tensor::TensorData::new(ew, [out_channels, in_channels, kernel, kernel]),
                wid,
            ),
        );
        if let (Some(eb), Some((_, bid))) = (eb, b) {
            out.tensors.insert(
                format!("{path}.bias"),
                (burn::tensor::TensorData::new(eb, [out_channels]), bid),
            );
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_expansion_matches_the_plain_one() {
        let device = Device::flex();
        let (base, cin, k) = (2, 3, 3);
        let w: Vec<f32> = (0..base * cin * k * k)
            .map(|v| v as f32 * 0.37 - 3.0)
            .collect();
        for g in [4, 8] {
            let (plain, bias) = expand(&w, Some(&[1.0, 2.0]), base, cin, k, g);
            let t = Tensor::<1>::from_floats(w.as_slice(), &device).reshape([base, cin, k, k]);
            let burn: Vec<f32> = expand_tensor(t, g).into_data().try_to_vec().unwrap();
            assert_eq!(plain, burn);
            let b = Tensor::<1>::from_floats([1.0, 2.0], &device);
            let burn_bias: Vec<f32> = expand_bias(b, g).into_data().try_to_vec().unwrap();
            assert_eq!(bias.unwrap(), burn_bias);
        }
    }

    /// The 8 transforms of an asymmetric filter are 8 different filters, and rotating four
    /// times comes back to the start.
    #[test]
    fn the_transforms_form_the_group() {
        let k = 3;
        let w: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let (all, _) = expand(&w, None, 1, 1, k, 8);
        let filters: Vec<&[f32]> = all.chunks(9).collect();
        for a in 0..8 {
            for b in 0..a {
                assert_ne!(filters[a], filters[b], "transforms {a} and {b} agree");
            }
        }
        for i in 0..k {
            for j in 0..k {
                let mut p = (i, j);
                for _ in 0..4 {
                    p = source(p.0, p.1, 1, k);
                }
                assert_eq!(p, (i, j));
            }
        }
    }
}
