//! The figures of a model file that every report gives: test accuracy, bytes on disk,
//! parameters, non-zero parameters, FLOPs, and latency measured on the runtime that would
//! serve it (the sparse runtime for a model that is mostly zeros, the int8 runtime for a
//! quantized one, whichever is faster of those and convpress's dense kernels through Burn).

use super::layers::weighted_layers;
use super::{Context, Model};
use crate::checkpoint::{self, floats};
use crate::data::ImageSet;
use crate::runtime::model::SparseModel;
use crate::{bench, train};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// How the report measures every stage's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ReportSettings {
    /// Seconds spent measuring each latency figure.
    pub latency_seconds: f64,
    /// Batch sizes whose latency is measured.
    pub batches: Vec<usize>,
    /// Evaluate on the first N test images only (quick runs); all of them if absent.
    pub test_limit: Option<usize>,
}

impl ReportSettings {
    /// Refuses settings that cannot be measured.
    pub fn check(&self) -> Result<(), String> {
        crate::resources::check_seconds("latency-seconds", self.latency_seconds)?;
        if self.batches.is_empty() || self.batches.contains(&0) {
            return Err("batches must list batch sizes of at least 1".into());
        }
        if self.test_limit == Some(0) {
            return Err("test-limit must be at least 1".into());
        }
        Ok(())
    }
}

impl Default for ReportSettings {
    fn default() -> Self {
        ReportSettings {
            latency_seconds: 1.0,
            batches: vec![1, 64],
            test_limit: None,
        }
    }
}

/// A model's figures, as measured from its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub test_acc: f64,
    pub test_loss: f64,
    pub test_images: usize,
    /// Bytes of the file on disk (what `ls -l` says).
    pub file_bytes: u64,
    /// Parameters of the architecture (batch-norm statistics are not parameters).
    pub params: usize,
    /// Parameters that are not exactly zero.
    pub nonzero: usize,
    /// FLOPs per image of the dense architecture (a multiply-add is 2).
    pub flops: u64,
    /// FLOPs per image when the zero weights of conv and linear layers are skipped.
    pub flops_nonzero: u64,
    pub latency: Vec<Latency>,
}

/// Latency at one batch size on the runtime that would serve the model: the faster of
/// convpress's dense kernels (through Burn) and, for a model that is mostly zeros, its sparse
/// runtime (CSR linear layers, sparse im2col convolutions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub batch: usize,
    /// Milliseconds per forward pass of the whole batch, on `runtime`.
    pub ms: f64,
    /// `dense`, `sparse` or `int8`.
    pub runtime: String,
    /// Milliseconds on the dense runtime (equal to `ms` when it is the one chosen).
    pub dense_ms: f64,
}

/// One conv or linear layer: how much of it is left, and how many bits a weight takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerFigures {
    pub layer: String,
    pub kind: String,
    pub weights: usize,
    pub kept: usize,
    /// Bits per weight: the codebook's index width, the quantized width, or 32 for f32.
    pub bits: u32,
}

/// The test split of `model`'s dataset in `dir` (see [`checkpoint::test_split`]).
pub fn test_set(model: &Model, dir: &Path, limit: Option<usize>) -> anyhow::Result<ImageSet> {
    checkpoint::test_split(&model.file, model.arch(), model.meta(), dir, limit)
}

/// Kept weights and bits of every conv and linear layer: bits from the codebooks, or for a
/// compressed file from the file itself.
pub fn layer_figures(model: &Model) -> anyhow::Result<Vec<LayerFigures>> {
    use crate::compress::format::{self, Encoding};
    let mut stored = std::collections::HashMap::new();
    if model.is_encoded() {
        let bytes = fs_err::read(&model.file)?;
        for e in format::entries(&bytes).map_err(anyhow::Error::msg)? {
            if let Encoding::Shared { bits, .. } | Encoding::Quantized { bits, .. } = e.encoding {
                stored.insert(e.path, bits);
            }
        }
    }
    let mut out = Vec::new();
    for (layer, kind) in weighted_layers(model.arch()) {
        let param = format!("{layer}.weight");
        let (w, _) = floats(&model.loaded.tensors, &param).map_err(anyhow::Error::msg)?;
        let bits = match (model.constraints.codebooks.get(&param), stored.get(&param)) {
            (Some(b), _) => b.bits(),
            (None, Some(&b)) => b,
            (None, None) => 32,
        };
        out.push(LayerFigures {
            layer,
            kind: kind.into(),
            weights: w.len(),
            kept: w.iter().filter(|&&v| v != 0.0).count(),
            bits,
        });
    }
    Ok(out)
}

/// Measures `model` from its file: accuracy on the test split (`settings.test_limit` images),
/// sizes, FLOPs and latency at each of `settings.batches`.
pub fn measure(
    model: &Model,
    cx: &Context,
    settings: &ReportSettings,
) -> anyhow::Result<(Figures, Vec<LayerFigures>)> {
    let (network, _) = checkpoint::load(&model.file, &cx.device)?;
    let test = test_set(model, &cx.data_dir_for(model.meta()), settings.test_limit)?;
    // A quantized model is measured on the int8 runtime, which serves it.
    let int8 = match model.loaded.quant {
        Some(_) => Some(SparseModel::from_loaded(&model.loaded).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let (test_loss, test_acc) = match &int8 {
        Some(m) => crate::runtime::model::evaluate(m, &test, 256),
        None => train::evaluate(&network, &test, 256, &cx.device),
    };
    let layers = layer_figures(model)?;
    let arch = model.arch();
    let params = arch.num_params();
    let nonzero = model
        .loaded
        .tensors
        .iter()
        .filter(|(name, _)| !name.ends_with("running_mean") && !name.ends_with("running_var"))
        .map(|(_, (d, _))| {
            d.as_slice::<f32>()
                .map_or(0, |v| v.iter().filter(|&&x| x != 0.0).count())
        })
        .sum();
    let flops = arch.flops();
    let flops_nonzero = arch
        .layer_stats()
        .iter()
        .map(|s| match layers.iter().find(|l| l.layer == s.path) {
            Some(l) => (s.flops as f64 * l.kept as f64 / l.weights.max(1) as f64) as u64,
            None => s.flops,
        })
        .sum();
    let (weights, kept) = layers
        .iter()
        .fold((0, 0), |(w, k), l| (w + l.weights, k + l.kept));
    // The sparse runtime is timed for models that are mostly zeros (it refuses a few layer
    // kinds, asymmetric padding, which then run dense only).
    let quantized = int8.is_some();
    let (sparse, kind) = match int8 {
        Some(m) => (
            Some(m),
            model
                .loaded
                .quant
                .as_ref()
                .map_or("int8".into(), |q| q.runtime_label()),
        ),
        None if 2 * kept < weights => (
            SparseModel::from_loaded(&model.loaded).ok(),
            "sparse".into(),
        ),
        None => (None, "sparse".into()),
    };
    let budget = Duration::from_secs_f64(settings.latency_seconds);
    let latency = settings
        .batches
        .iter()
        .map(|&batch| {
            let dense_ms = bench::infer_latency(&network, batch, budget, &cx.device);
            let sparse_ms = sparse
                .as_ref()
                .map_or(f64::INFINITY, |s| bench::sparse_latency(s, batch, budget));
            // A quantized model is the int8 runtime's: its float twin is another model.
            let (ms, runtime) = if sparse_ms < dense_ms || quantized {
                (sparse_ms, kind.clone())
            } else {
                (dense_ms, "dense".into())
            };
            Latency {
                batch,
                ms,
                runtime,
                dense_ms,
            }
        })
        .collect();
    let figures = Figures {
        test_acc,
        test_loss,
        test_images: test.n,
        file_bytes: fs_err::metadata(&model.file)?.len(),
        params,
        nonzero,
        flops,
        flops_nonzero,
        latency,
    };
    Ok((figures, layers))
}
