//! XNOR-Net end to end (issue #13): the runtime's binary layers against the float computation
//! on every instruction path, the sign activation's straight-through gradient, the batch norms
//! put in front of binarized layers, and binarized files (1-bit and ternary weights, binary
//! inputs): bit-exact round trips at their real size, the runtime equal to the trained
//! network's forward pass, damaged files refused without a panic.

mod common;

use burn::prelude::*;
use common::{meta, reseal, uniform};
use convpress::checkpoint::{self, Loaded, Tensors};
use convpress::compress::binarize::{Method, binarize_weight};
use convpress::compress::fold::fold_batch_norms;
use convpress::compress::format::{self, Encoding};
use convpress::compress::ptq;
use convpress::compress::qat::FakeQuantInputs;
use convpress::compress::quantize::Quantizer;
use convpress::compress::xnor::{Inserted, insert_batch_norms, sign_activation};
use convpress::kernels::binary::Path;
use convpress::kernels::binary::lookup::TablePath;
use convpress::models::arch::build;
use convpress::models::{Arch, LayerSpec, Network};
use convpress::runtime::binary::{BinaryConv, BinaryLinear};
use convpress::runtime::conv::{Conv2dKernel, ConvGeometry, DirectConv};
use convpress::runtime::model::SparseModel;
use convpress::runtime::signed::{SignedConv, SignedLinear};
use convpress::runtime::{DenseReference, LinearKernel};
use std::collections::{BTreeMap, BTreeSet};

fn signs(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| if x >= 0.0 { 1.0 } else { -1.0 })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn scale_of(v: &[f32]) -> f32 {
    v.iter().fold(1f32, |m, x| m.max(x.abs()))
}

fn paths() -> Vec<Path> {
    Path::ALL.into_iter().filter(|p| p.runs_here()).collect()
}

/// A binary convolution with binary inputs equals the float convolution of the inputs' signs
/// with weights `±α_o` (plus bias, and ReLU), on every path: padding, stride, channel counts on
/// both sides of a 64-bit word, inputs of exactly ±0 taken as +1.
#[test]
fn xnor_convolutions_match_the_float_computation_on_every_path() {
    let cases = [
        (3, 5, [3, 3], [1, 1], [1, 1], [7, 6]),
        (70, 9, [3, 3], [2, 2], [1, 1], [9, 9]),
        (130, 4, [1, 1], [1, 1], [0, 0], [5, 5]),
        (20, 50, [5, 5], [1, 1], [0, 0], [12, 12]),
    ];
    for (n, (c, o, kernel, stride, padding, hw)) in cases.into_iter().enumerate() {
        let g = ConvGeometry {
            in_channels: c,
            out_channels: o,
            kernel,
            stride,
            padding,
            dilation: [1, 1],
            groups: 1,
        };
        let seed = 10 * n as u64;
        let scales = uniform(o, seed + 1, 0.1, 2.0);
        let patch = g.patch_len();
        let w: Vec<f32> = signs(&uniform(g.weight_len(), seed + 2, -1.0, 1.0))
            .iter()
            .enumerate()
            .map(|(i, s)| s * scales[i / patch])
            .collect();
        let bias = uniform(o, seed + 3, -1.0, 1.0);
        let batch = 3;
        let mut x = uniform(batch * c * hw[0] * hw[1], seed + 4, -1.0, 1.0);
        x[0] = 0.0;
        x[1] = -0.0;
        let [oh, ow] = g.output_hw(hw).unwrap();
        let mut want = vec![0f32; batch * o * oh * ow];
        DirectConv::new(g, w.clone(), Some(bias.clone()))
            .unwrap()
            .forward(&signs(&x), batch, hw, &mut want);
        for path in paths() {
            for relu in [false, true] {
                let k = BinaryConv::new(g, &w, scales.clone(), Some(bias.clone()))
                    .unwrap()
                    .with_path(path)
                    .unwrap();
                let k = if relu { k.with_relu() } else { k };
                let mut y = vec![f32::NAN; want.len()];
                k.forward(&x, batch, hw, &mut y);
                let want: Vec<f32> = if relu {
                    want.iter().map(|v| v.max(0.0)).collect()
                } else {
                    want.clone()
                };
                let d = max_abs_diff(&y, &want);
                assert!(
                    d <= 1e-5 * scale_of(&want),
                    "case {n} {} relu {relu}: {d}",
                    path.name()
                );
            }
        }
        assert!(BinaryConv::new(g, &w[1..], scales.clone(), None).is_err());
    }
}

/// A binary linear layer with binary inputs equals the float product of the inputs' signs with
/// weights `±α_o`, on every path, for input lengths on both sides of a word.
#[test]
fn xnor_linear_layers_match_the_float_computation_on_every_path() {
    for (n, (inputs, outputs)) in [(1, 3), (63, 5), (64, 7), (65, 2), (800, 50)]
        .into_iter()
        .enumerate()
    {
        let seed = 100 + 10 * n as u64;
        let scales = uniform(outputs, seed, 0.1, 2.0);
        // Burn's `[in, out]`.
        let w: Vec<f32> = signs(&uniform(inputs * outputs, seed + 1, -1.0, 1.0))
            .iter()
            .enumerate()
            .map(|(i, s)| s * scales[i % outputs])
            .collect();
        let bias = uniform(outputs, seed + 2, -1.0, 1.0);
        let batch = 4;
        let x = uniform(batch * inputs, seed + 3, -1.0, 1.0);
        let reference = DenseReference::from_burn_layout(inputs, outputs, &w, Some(bias.clone()));
        let mut want = vec![0f32; batch * outputs];
        reference.forward(&signs(&x), batch, &mut want);
        for path in paths() {
            let k = BinaryLinear::from_burn_layout(
                inputs,
                outputs,
                &w,
                scales.clone(),
                Some(bias.clone()),
            )
            .unwrap()
            .with_path(path)
            .unwrap();
            let mut y = vec![f32::NAN; want.len()];
            k.forward(&x, batch, &mut y);
            let d = max_abs_diff(&y, &want);
            assert!(
                d <= 1e-5 * scale_of(&want),
                "{inputs}x{outputs} {}: {d}",
                path.name()
            );
        }
    }
}

/// Weights `s · α_o` (output channel `o` every `inner` values, or every value mod `channels`
/// where the channels are last), `s` the sign of a random value and, if `ternary`, 0 for every
/// fourth.
fn sign_weights(
    n: usize,
    seed: u64,
    ternary: bool,
    scales: &[f32],
    of: impl Fn(usize) -> usize,
) -> Vec<f32> {
    signs(&uniform(n, seed, -1.0, 1.0))
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if ternary && i % 4 == 1 {
                0.0
            } else {
                s * scales[of(i)]
            }
        })
        .collect()
}

/// A convolution with binary or ternary weights on float inputs equals the float convolution
/// with weights `s · α_o` (plus bias, and ReLU), on every table path: padding, stride,
/// dilation, reduction lengths on both sides of a word, one image and several.
#[test]
fn lookup_convolutions_match_the_float_computation_on_every_path() {
    let cases = [
        (3, 5, [3, 3], [1, 1], [1, 1], [1, 1], [7, 6]),
        (7, 40, [3, 3], [2, 2], [1, 1], [1, 1], [9, 9]),
        (70, 4, [1, 1], [1, 1], [0, 0], [1, 1], [5, 5]),
        (6, 16, [5, 5], [1, 1], [0, 0], [1, 1], [14, 14]),
        (4, 9, [3, 3], [1, 1], [2, 2], [2, 2], [8, 8]),
    ];
    for (n, (c, o, kernel, stride, padding, dilation, hw)) in cases.into_iter().enumerate() {
        let g = ConvGeometry {
            in_channels: c,
            out_channels: o,
            kernel,
            stride,
            padding,
            dilation,
            groups: 1,
        };
        let [oh, ow] = g.output_hw(hw).unwrap();
        for ternary in [false, true] {
            let seed = 20 * n as u64 + ternary as u64;
            let scales = uniform(o, seed + 1, 0.1, 2.0);
            let patch = g.patch_len();
            let w = sign_weights(g.weight_len(), seed + 2, ternary, &scales, |i| i / patch);
            let bias = uniform(o, seed + 3, -1.0, 1.0);
            for batch in [1, 3] {
                let x = uniform(batch * c * hw[0] * hw[1], seed + 4, -1.0, 1.0);
                let mut want = vec![0f32; batch * o * oh * ow];
                DirectConv::new(g, w.clone(), Some(bias.clone()))
                    .unwrap()
                    .forward(&x, batch, hw, &mut want);
                for path in TablePath::ALL.into_iter().filter(|p| p.runs_here()) {
                    let k = SignedConv::new(g, &w, ternary, scales.clone(), Some(bias.clone()))
                        .unwrap()
                        .with_path(path)
                        .unwrap()
                        .with_relu();
                    let mut y = vec![f32::NAN; want.len()];
                    k.forward(&x, batch, hw, &mut y);
                    let relu: Vec<f32> = want.iter().map(|v| v.max(0.0)).collect();
                    let d = max_abs_diff(&y, &relu);
                    assert!(
                        d <= 1e-5 * scale_of(&want),
                        "case {n} ternary {ternary} batch {batch} {}: {d}",
                        path.name()
                    );
                }
            }
        }
        assert!(SignedConv::new(g, &[0.0; 3], false, vec![1.0; o], None).is_err());
        let grouped = ConvGeometry {
            groups: c,
            out_channels: c,
            ..g
        };
        let w = vec![1.0; grouped.weight_len()];
        assert!(SignedConv::new(grouped, &w, false, vec![1.0; c], None).is_err());
    }
}

/// A linear layer with binary or ternary weights on float inputs equals the float product, on
/// every table path, at batch 1 and batches that are not whole vectors.
#[test]
fn lookup_linear_layers_match_the_float_computation_on_every_path() {
    for (n, (inputs, outputs)) in [(1, 3), (63, 5), (64, 33), (65, 2), (400, 120)]
        .into_iter()
        .enumerate()
    {
        for ternary in [false, true] {
            let seed = 200 + 10 * n as u64 + ternary as u64;
            let scales = uniform(outputs, seed, 0.1, 2.0);
            // Burn's `[in, out]`.
            let w = sign_weights(inputs * outputs, seed + 1, ternary, &scales, |i| {
                i % outputs
            });
            let bias = uniform(outputs, seed + 2, -1.0, 1.0);
            let reference =
                DenseReference::from_burn_layout(inputs, outputs, &w, Some(bias.clone()));
            for batch in [1, 5, 17] {
                let x = uniform(batch * inputs, seed + 3, -1.0, 1.0);
                let mut want = vec![0f32; batch * outputs];
                reference.forward(&x, batch, &mut want);
                for path in TablePath::ALL.into_iter().filter(|p| p.runs_here()) {
                    let k = SignedLinear::from_burn_layout(
                        inputs,
                        outputs,
                        &w,
                        ternary,
                        scales.clone(),
                        Some(bias.clone()),
                    )
                    .unwrap()
                    .with_path(path)
                    .unwrap();
                    let mut y = vec![f32::NAN; want.len()];
                    k.forward(&x, batch, &mut y);
                    let d = max_abs_diff(&y, &want);
                    assert!(
                        d <= 1e-5 * scale_of(&want),
                        "{inputs}x{outputs} ternary {ternary} batch {batch} {}: {d}",
                        path.name()
                    );
                }
            }
        }
    }
}

/// The sign activation: +1 for x >= 0, −1 below; its gradient is 1 where |x| <= 1 and 0 outside.
#[test]
fn the_sign_activation_passes_gradients_only_inside_the_clip() {
    let d = Device::flex().autodiff();
    let v = [-2.0f32, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0];
    let x = Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &d).require_grad();
    let y = sign_activation(x.clone());
    let forward: Vec<f32> = y.clone().into_data().try_to_vec().unwrap();
    assert_eq!(forward, vec![-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]);
    let g: Vec<f32> = x
        .grad(&y.sum().backward())
        .unwrap()
        .into_data()
        .try_to_vec()
        .unwrap();
    assert_eq!(g, vec![0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
}

/// A 3x3 convolution with padding 1 and a bias.
fn conv(c: usize, o: usize) -> LayerSpec {
    build::conv(c, o, 3, 1, 1, true)
}

/// A small network with a float first layer, a binarized conv after a ReLU, one after a batch
/// norm already there, and a binarized linear layer after a flatten.
fn tiny() -> (Arch, BTreeSet<String>) {
    let arch = Arch {
        name: "tiny".into(),
        input: [1, 6, 6],
        classes: 10,
        layers: vec![
            conv(1, 4),
            LayerSpec::Relu,
            conv(4, 6),
            LayerSpec::Relu,
            build::bn(6),
            conv(6, 8),
            LayerSpec::Relu,
            build::maxpool(2),
            LayerSpec::Flatten,
            build::linear(72, 10),
        ],
    };
    let binarized = ["layers.2", "layers.5", "layers.9"]
        .map(String::from)
        .into();
    (arch, binarized)
}

fn loaded(arch: &Arch, seed: u64) -> Loaded {
    let network = Network::seeded(arch, &Device::flex(), seed).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    checkpoint::save(&path, &network, &meta()).unwrap();
    checkpoint::read(&path).unwrap()
}

fn network(model: &Loaded) -> Network {
    let n = Network::new(&model.arch, &Device::flex()).unwrap();
    checkpoint::load_tensors(n, model.tensors.clone()).unwrap()
}

fn forward(n: &Network, x: &[f32], batch: usize) -> Vec<f32> {
    let [c, h, w] = n.arch.input;
    let t = Tensor::<4>::from_data(
        TensorData::new(x.to_vec(), [batch, c, h, w]),
        &Device::flex(),
    );
    n.forward(t).into_data().try_to_vec().unwrap()
}

/// XNOR-Net's batch norms go in front of the binarized layers that lack one (not after the one
/// already there), the layers after them are renumbered with their tensors, and at their
/// initial values (γ = 1, β = 0, mean 0, variance 1) the network computes what it did.
#[test]
fn inserted_batch_norms_keep_the_layers_and_the_function() {
    let (arch, binarized) = tiny();
    let model = loaded(&arch, 3);
    let Inserted {
        model: with,
        renamed,
        batch_norms: inserted,
    } = insert_batch_norms(&model, &binarized).unwrap();
    assert_eq!(inserted, ["layers.2", "layers.10"]);
    let want: BTreeMap<String, String> = [
        (0, 0),
        (1, 1),
        (2, 3),
        (3, 4),
        (4, 5),
        (5, 6),
        (6, 7),
        (7, 8),
        (8, 9),
        (9, 11),
    ]
    .into_iter()
    .map(|(a, b)| (format!("layers.{a}"), format!("layers.{b}")))
    .collect();
    assert_eq!(renamed, want);
    assert_eq!(with.arch.layers.len(), 12);
    assert_eq!(
        with.tensors["layers.11.weight"].0,
        model.tensors["layers.9.weight"].0
    );
    assert_eq!(with.tensors["layers.10.gamma"].0.shape().to_vec(), vec![72]);
    let x = uniform(2 * 36, 4, -1.0, 1.0);
    let a = forward(&network(&model), &x, 2);
    let b = forward(&network(&with), &x, 2);
    assert!(max_abs_diff(&a, &b) <= 1e-4 * scale_of(&a));
    let missing: BTreeSet<String> = ["layers.42".to_string()].into();
    assert!(insert_batch_norms(&model, &missing).is_err());
}

/// `model` (batch norms inserted) with every batch norm's statistics set away from the
/// identity, and its `layers` binarized by `method` as `binarize` writes them.
fn binarized(model: &Loaded, layers: &BTreeSet<String>, method: Method) -> Loaded {
    let mut tensors = Tensors::new();
    let mut names: Vec<&String> = model.tensors.keys().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let (data, id) = &model.tensors[name];
        let (v, shape) = checkpoint::floats(&model.tensors, name).unwrap();
        let seed = 1000 + i as u64;
        let v = match name.rsplit('.').next().unwrap() {
            "gamma" => uniform(v.len(), seed, 0.5, 1.5),
            "beta" => uniform(v.len(), seed, -0.5, 0.5),
            "running_mean" => uniform(v.len(), seed, -0.3, 0.3),
            "running_var" => uniform(v.len(), seed, 0.5, 2.0),
            "weight" if layers.contains(name.trim_end_matches(".weight")) => {
                binarize_weight(method, &v, &shape, shape.len() == 2, None)
            }
            _ => v,
        };
        debug_assert_eq!(data.num_elements(), v.len());
        tensors.insert(name.clone(), (TensorData::new(v, shape), *id));
    }
    Loaded {
        tensors,
        ..model.clone()
    }
}

/// [`tiny`] (weights from `seed`) with XNOR-Net's batch norms inserted, and the paths of its
/// binarized layers in it.
fn tiny_with_batch_norms(seed: u64) -> (Loaded, BTreeSet<String>) {
    let (arch, original) = tiny();
    let Inserted { model, renamed, .. } =
        insert_batch_norms(&loaded(&arch, seed), &original).unwrap();
    let layers = original.iter().map(|l| renamed[l].clone()).collect();
    (model, layers)
}

/// `model` as `binarize` writes it: batch norms folded, `layers` (its paths) at `bits` bits,
/// their inputs on `input` or, with `None`, taken by their signs. Also every layer's path after
/// folding.
fn written(
    model: &Loaded,
    layers: &BTreeSet<String>,
    bits: u32,
    input: Option<Quantizer>,
    float_input: bool,
) -> (Loaded, BTreeMap<String, String>) {
    let (folded, folded_paths) = fold_batch_norms(model).unwrap();
    let layers: BTreeSet<String> = layers.iter().map(|l| folded_paths[l].clone()).collect();
    let bits_of = layers.iter().map(|l| (l.clone(), Some(bits))).collect();
    let (inputs, signs) = match input {
        Some(q) => (
            layers.iter().map(|l| (l.clone(), q)).collect(),
            BTreeSet::new(),
        ),
        None => (BTreeMap::new(), layers),
    };
    let mut q = ptq::finish(folded, &bits_of, &inputs, &BTreeMap::new(), &signs).unwrap();
    if float_input {
        let spec = q.quant.as_mut().unwrap();
        spec.layers.values_mut().for_each(|l| l.float_input = true);
        q.check().unwrap();
    }
    (q, folded_paths)
}

/// Binarized files: XNOR-Net's (1-bit weights, binary inputs), BWN's (1-bit weights, 8-bit or
/// float inputs) and TWN's with float inputs are version 3, TWN's with 8-bit inputs (2-bit
/// ternary codes) version 2. Each decodes to exactly the model written and re-encodes to the
/// same bytes; binary weights take one bit each plus a scale per channel; the runtime from the
/// file equals the one from memory and runs the layers on the XNOR, table-lookup or int8
/// kernels; for XNOR-Net it gives the class scores of the trained network's forward pass with
/// sign activations, and with float inputs those of the file's network in Burn.
#[test]
fn binarized_files_round_trip_at_their_real_size_and_run_as_trained() {
    let (with, trained_layers) = tiny_with_batch_norms(7);
    let x = uniform(3 * 36, 8, -1.0, 1.0);
    for (method, bits, version, float_input) in [
        (Method::Xnor, 1, 3u16, false),
        (Method::Bwn, 1, 3, false),
        (Method::Twn, 2, 2, false),
        (Method::Bwn, 1, 3, true),
        (Method::Twn, 2, 3, true),
    ] {
        let model = binarized(&with, &trained_layers, method);
        let input = match method.binary_inputs() {
            true => None,
            false => Some(Quantizer::asymmetric(-4.0, 4.0, 8)),
        };
        let (q, folded_paths) = written(&model, &trained_layers, bits, input, float_input);
        let layers: BTreeSet<String> = trained_layers
            .iter()
            .map(|l| folded_paths[l].clone())
            .collect();
        let (bytes, stages) = format::encode_quantized(&q).unwrap();
        assert_eq!(
            u16::from_le_bytes([bytes[4], bytes[5]]),
            version,
            "{method:?}"
        );
        let back = format::decode(&bytes).unwrap();
        back.check().unwrap();
        assert_eq!(back.quant, q.quant, "{method:?}");
        for (name, (data, _)) in &q.tensors {
            assert_eq!(back.tensors[name].0, *data, "{method:?} {name}");
        }
        let (again, _) = format::encode_quantized(&back).unwrap();
        assert!(again == bytes, "{method:?}: re-encoding changed the bytes");
        let mut seen = 0;
        for e in format::entries(&bytes).unwrap() {
            let layer = e.path.trim_end_matches(".weight");
            if !layers.contains(layer) || !e.path.ends_with(".weight") {
                continue;
            }
            let Encoding::Quantized { bits: b, .. } = e.encoding else {
                panic!("{method:?} {}: not quantized", e.path)
            };
            assert_eq!(b, bits);
            seen += 1;
            let numel: usize = e.shape.iter().product();
            let channels = e.shape[usize::from(e.shape.len() == 2)];
            let stage = stages.iter().find(|s| s.path == e.path).unwrap();
            if bits == 1 {
                assert_eq!(
                    stage.huffman,
                    numel.div_ceil(8) + 4 * channels,
                    "{}",
                    e.path
                );
            }
        }
        assert_eq!(seen, 3, "{method:?}: the three binarized weights");
        let runtime = SparseModel::from_loaded(&back).unwrap();
        let from_file = runtime.forward(&x, 3);
        assert_eq!(
            from_file,
            SparseModel::from_loaded(&q).unwrap().forward(&x, 3)
        );
        let kernel = match (method.binary_inputs(), float_input) {
            (true, _) => "xnor",
            (false, true) => "lookup",
            (false, false) => "int8",
        };
        let infos = runtime.layers();
        let binary: Vec<_> = infos.iter().filter(|l| layers.contains(&l.path)).collect();
        assert_eq!(binary.len(), 3);
        for l in binary {
            assert_eq!((l.kernel, l.bits), (kernel, bits), "{method:?} {}", l.path);
        }
        if method.binary_inputs() {
            // The network as trained: batch norms in place, sign activations.
            let mut trained = network(&model);
            let signs = FakeQuantInputs::signs(&trained_layers);
            trained.fake_quant = Some(std::sync::Arc::new(signs));
            let want = forward(&trained, &x, 3);
            let d = max_abs_diff(&from_file, &want);
            assert!(
                d <= 1e-4 * scale_of(&want),
                "XNOR runtime vs training forward: {d}"
            );
            // The file loaded into Burn takes the signs too.
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("x.cpz");
            std::fs::write(&file, &bytes).unwrap();
            let (burn, _) = checkpoint::load(&file, &Device::flex()).unwrap();
            let d = max_abs_diff(&forward(&burn, &x, 3), &from_file);
            assert!(
                d <= 1e-4 * scale_of(&want),
                "the file in Burn vs the runtime: {d}"
            );
        } else {
            // A version-2 file cannot hold 1-bit weights, nor float inputs to bit layers.
            let mut v2 = bytes.clone();
            v2[4] = 2;
            let refused = format::decode(&reseal(v2));
            assert_eq!(refused.is_err(), bits == 1 || float_input, "{method:?}");
        }
        if float_input {
            // A layer cannot both take its inputs' signs and keep them in float, nor keep
            // float inputs with weights wider than ternary.
            for (sign, bits) in [(true, 1), (false, 4)] {
                let mut bad = q.clone();
                let l = bad
                    .quant
                    .as_mut()
                    .unwrap()
                    .layers
                    .values_mut()
                    .next()
                    .unwrap();
                (l.sign_input, l.bits) = (sign, bits);
                let e = bad.check().unwrap_err();
                assert!(e.contains("float inputs need"), "{e}");
            }
            // The file in Burn: the same weights, float inputs.
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("x.cpz");
            std::fs::write(&file, &bytes).unwrap();
            let (burn, _) = checkpoint::load(&file, &Device::flex()).unwrap();
            let want = forward(&burn, &x, 3);
            let d = max_abs_diff(&from_file, &want);
            assert!(
                d <= 1e-4 * scale_of(&want),
                "{method:?}: the lookup runtime vs the file in Burn: {d}"
            );
        }
    }
}

/// A damaged XNOR file with a valid checksum is refused or decodes to a model the runtime runs,
/// never a panic; a version-2 header cannot hold binary layers. Also writes the fuzz seed
/// (`CONVPRESS_WRITE_SEEDS=1`).
#[test]
fn damaged_binarized_files_are_refused_never_a_panic() {
    let (with, layers) = tiny_with_batch_norms(11);
    let model = binarized(&with, &layers, Method::Xnor);
    let (q, folded_paths) = written(&model, &layers, 1, None, false);
    let (bytes, _) = format::encode_quantized(&q).unwrap();
    assert!(bytes.len() < 8192, "{} bytes", bytes.len());
    if std::env::var_os("CONVPRESS_WRITE_SEEDS").is_some() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        std::fs::write(seeds.join("xnor-tiny.cpz"), &bytes).unwrap();
    }
    let refused = common::resealed_damages(&bytes, 777, 2000, 2);
    assert!(
        refused > 100,
        "only {refused} of 2000 resealed damages refused"
    );
    let mut v2 = bytes.clone();
    v2[4] = 2;
    let e = format::decode(&reseal(v2)).unwrap_err();
    assert!(e.contains("version-2"), "{e}");
    // A binary weight cannot be 0.
    let mut zero = q.clone();
    let name = format!("{}.weight", folded_paths["layers.3"]);
    let (mut w, shape) = checkpoint::floats(&zero.tensors, &name).unwrap();
    w[0] = 0.0;
    zero.tensors.insert(name, (TensorData::new(w, shape), None));
    assert!(zero.check().is_err());
    assert!(format::encode_quantized(&zero).is_err());
}

/// A batch norm inserted right after a convolution (float here) is folded into it when the
/// file is written, and one inserted at the head of a residual block stays: the paths follow,
/// and the XNOR file still computes what the trained network does.
#[test]
fn inserted_batch_norms_after_a_conv_and_in_a_residual_block() {
    let arch = Arch {
        name: "tiny".into(),
        input: [1, 6, 6],
        classes: 10,
        layers: vec![
            conv(1, 4),
            conv(4, 6),
            LayerSpec::Relu,
            LayerSpec::Residual {
                body: vec![conv(6, 6), LayerSpec::Relu],
                shortcut: vec![],
            },
            LayerSpec::Flatten,
            build::linear(216, 10),
        ],
    };
    let original: BTreeSet<String> = ["layers.1", "layers.3.body.0"].map(String::from).into();
    let Inserted {
        model: with,
        renamed,
        batch_norms: inserted,
    } = insert_batch_norms(&loaded(&arch, 21), &original).unwrap();
    assert_eq!(inserted, ["layers.1", "layers.4.body.0"]);
    assert_eq!(renamed["layers.1"], "layers.2");
    assert_eq!(renamed["layers.3.body.0"], "layers.4.body.1");
    assert_eq!(renamed["layers.3.body.1"], "layers.4.body.2");
    let trained_layers: BTreeSet<String> = original.iter().map(|l| renamed[l].clone()).collect();
    let model = binarized(&with, &trained_layers, Method::Xnor);
    let (q, folded_paths) = written(&model, &trained_layers, 1, None, false);
    // The first inserted batch norm went into the float convolution before it.
    assert_eq!(folded_paths["layers.1"], "layers.0");
    assert_eq!(folded_paths["layers.4.body.0"], "layers.3.body.0");
    let (bytes, _) = format::encode_quantized(&q).unwrap();
    let runtime = SparseModel::from_loaded(&format::decode(&bytes).unwrap()).unwrap();
    let x = uniform(4 * 36, 22, -1.0, 1.0);
    let mut trained = network(&model);
    trained.fake_quant = Some(std::sync::Arc::new(FakeQuantInputs::signs(&trained_layers)));
    let want = forward(&trained, &x, 4);
    let d = max_abs_diff(&runtime.forward(&x, 4), &want);
    assert!(d <= 1e-4 * scale_of(&want), "{d}");
    let kernels: Vec<&str> = runtime.layers().iter().map(|l| l.kernel).collect();
    assert_eq!(
        kernels.iter().filter(|k| **k == "xnor").count(),
        2,
        "{kernels:?}"
    );
}
