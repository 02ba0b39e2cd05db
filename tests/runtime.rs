//! The whole-model sparse runtime against Burn: pruned zoo models with non-trivial batch-norm
//! statistics must give the same class scores as `Network::forward`.

mod common;

use common::{pruned_checkpoint, uniform};

use burn::module::Module;
use burn::prelude::*;
use convpress::checkpoint;
use convpress::models::{ModelKind, Network};
use convpress::runtime::conv::DenseConv;
use convpress::runtime::model::SparseModel;

fn burn_logits(net: &Network, x: &[f32], batch: usize) -> Vec<f32> {
    let [c, h, w] = net.arch.input;
    let t = Tensor::<4>::from_data(
        TensorData::new(x.to_vec(), [batch, c, h, w]),
        &Device::flex(),
    );
    net.valid().forward(t).into_data().try_to_vec().unwrap()
}

fn assert_same_logits(kind: ModelKind, input: [usize; 3]) {
    same_logits_at(kind, input, 0.85);
    // Half the weights kept: the convolutions run on the dense kernel instead.
    same_logits_at(kind, input, 0.5);
}

fn same_logits_at(kind: ModelKind, input: [usize; 3], sparsity: f64) {
    let dir = tempfile::tempdir().unwrap();
    let (net, path) = pruned_checkpoint(kind, input, sparsity, dir.path());
    let model = SparseModel::load(&path).unwrap();
    for batch in [1, 3, 8] {
        let x = uniform(
            batch * input.iter().product::<usize>(),
            batch as u64,
            -2.0,
            2.0,
        );
        let want = burn_logits(&net, &x, batch);
        let got = model.forward(&x, batch);
        assert_eq!(got.len(), batch * 10, "{kind:?}");
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * scale,
                "{kind:?} batch {batch}: logit {i} = {g}, Burn {w} (scale {scale})"
            );
        }
        let (timed, times) = model.forward_timed(&x, batch);
        assert_eq!(timed, got);
        assert!(
            times
                .iter()
                .any(|t| t.kind.starts_with("conv2d") || t.kind == "linear")
        );
    }
    let layers = model.layers();
    assert!(!layers.is_empty());
    if sparsity < 1.0 - DenseConv::DENSITY {
        // Convolutions that kept enough weights run dense and store them all.
        for l in layers.iter().filter(|l| l.kernel != "csr") {
            assert_eq!(
                (l.kernel, l.stored),
                ("dense", l.weights),
                "{kind:?} {}",
                l.path
            );
        }
        return;
    }
    // Only the survivors are stored: about a seventh of the weights, plus indices.
    for l in &layers {
        assert_ne!(l.kernel, "dense", "{kind:?} {}", l.path);
        assert!(
            l.stored * 4 <= l.weights,
            "{kind:?} {}: {} of {} stored",
            l.path,
            l.stored,
            l.weights
        );
    }
    assert!(model.weight_bytes() < model.dense_bytes() / 2, "{kind:?}");
}

#[test]
fn lenet300_matches_burn() {
    assert_same_logits(ModelKind::Lenet300, [1, 28, 28]);
}

#[test]
fn lenet5_matches_burn() {
    assert_same_logits(ModelKind::Lenet5, [1, 28, 28]);
}

#[test]
fn resnet20_matches_burn() {
    assert_same_logits(ModelKind::Resnet20, [3, 32, 32]);
}

#[test]
fn vgg_small_matches_burn() {
    assert_same_logits(ModelKind::VggSmall, [1, 32, 32]);
}

#[test]
fn a_checkpoint_that_does_not_fit_its_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = pruned_checkpoint(ModelKind::Lenet5, [1, 28, 28], 0.5, dir.path());
    let mut loaded = checkpoint::read(&path).unwrap();
    assert!(SparseModel::from_loaded(&loaded).is_ok());
    let bias = loaded.tensors.remove("layers.0.bias").unwrap();
    let err = SparseModel::from_loaded(&loaded).unwrap_err();
    assert!(err.contains("layers.0.bias"), "{err}");
    loaded.tensors.insert(
        "layers.0.bias".into(),
        (TensorData::new(vec![0f32; 7], [7]), bias.1),
    );
    let err = SparseModel::from_loaded(&loaded).unwrap_err();
    assert!(err.contains("shape"), "{err}");
    loaded.tensors.insert("layers.0.bias".into(), bias);
    loaded.tensors.insert(
        "layers.9.extra".into(),
        (TensorData::new(vec![0f32; 1], [1]), None),
    );
    assert!(SparseModel::from_loaded(&loaded).is_err());
}
