//! The training-hooks interface: how compression methods take part in training without
//! editing the loop (after Intel Distiller's scheduler callbacks).
//!
//! A hook is called at fixed points of every step. Methods compute *what* to do (a mask, a
//! codebook, a quantiser); the hook decides *when*. Every method has a default that does
//! nothing, so a hook implements only what it needs.
//!
//! Order within one step, for hooks `h1, h2, ...` in the order they were added:
//! `on_batch_begin` → `forward_model` (chained) → forward → cross-entropy times every
//! `label_weight` → `extra_loss` (summed) → backward
//! → `own_gradients` → `before_step` → optimizer step → `after_step` (chained) → `on_batch_end`.

use crate::data::Batch;
use crate::models::Network;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Gradients;

/// Where training is, handed to every hook call.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// 0-based epoch.
    pub epoch: usize,
    pub epochs: usize,
    /// 0-based batch within the epoch.
    pub batch: usize,
    pub batches: usize,
    /// Optimizer steps taken since the run began (continues across a resume).
    pub step: usize,
    pub lr: f64,
}

/// Figures of one finished epoch.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    /// Wall-clock seconds of this epoch's training steps (no evaluation).
    pub train_seconds: f64,
    pub eval_seconds: f64,
    /// Training seconds of all epochs so far, this one included.
    pub cumulative_train_seconds: f64,
    pub images_per_sec: f64,
}

pub trait TrainHook {
    /// A short name for logs.
    fn name(&self) -> &str;

    /// Before the first batch of every epoch; may replace the model (a schedule that prunes or
    /// rebuilds at epoch boundaries).
    fn on_epoch_begin(&mut self, _progress: &Progress, model: Network) -> Network {
        model
    }

    fn on_batch_begin(&mut self, _progress: &Progress) {}

    /// The model used for this step's forward pass, derived from the trained one. Gradients
    /// flow back to the trained model's parameters, so a transform written as
    /// `w + (q(w) - w).detach()` is a straight-through estimator (fake quantisation,
    /// binarisation). Called on a clone; return it unchanged to do nothing.
    fn forward_model(&mut self, _progress: &Progress, model: Network) -> Network {
        model
    }

    /// The weight of the cross-entropy against the labels (the weights of all hooks multiply):
    /// distillation gives `1 − α` of the loss to the labels and `α` to the teacher.
    fn label_weight(&self, _progress: &Progress) -> f64 {
        1.0
    }

    /// An extra term added to the cross-entropy loss (regularisers, distillation): `batch` is
    /// this step's images, labels and their indices, `logits` the model's outputs.
    fn extra_loss(
        &mut self,
        _progress: &Progress,
        _model: &Network,
        _batch: &Batch,
        _logits: &Tensor<2>,
    ) -> Option<Tensor<1>> {
        None
    }

    /// After backward, before the model's gradients are taken from `grads`: a hook that trains
    /// parameters of its own, outside the model (learned quantizer step sizes), takes theirs
    /// here and updates them.
    fn own_gradients(&mut self, _progress: &Progress, _grads: &mut Gradients) {}

    /// After backward, before the optimizer step: gradients may be changed (zeroed for pruned
    /// weights, summed per centroid for weight sharing, preconditioned).
    fn before_step(
        &mut self,
        _progress: &Progress,
        _model: &Network,
        _grads: &mut GradientsParams,
    ) {
    }

    /// After the optimizer step; may replace the parameters (re-apply pruning masks, so that
    /// momentum cannot revive pruned weights; clip latent weights).
    fn after_step(&mut self, _progress: &Progress, model: Network) -> Network {
        model
    }

    fn on_batch_end(&mut self, _progress: &Progress, _loss: f64) {}

    /// After evaluation at the end of every epoch.
    fn on_epoch_end(&mut self, _metrics: &EpochMetrics, _model: &Network) {}

    /// Asked after every epoch (and its checkpoint): true ends the run there (a switching rule
    /// that decides when a phase has done its work).
    fn should_stop(&self) -> bool {
        false
    }
}
