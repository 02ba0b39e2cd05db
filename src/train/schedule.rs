//! Learning-rate schedules, as pure functions of training progress so a resumed run computes
//! the same rate as an uninterrupted one.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Multiply by `gamma` at each epoch in `milestones`.
    Step { milestones: Vec<usize>, gamma: f64 },
    /// Cosine annealing from the base rate to `min_lr` over the run, per batch
    /// (Loshchilov & Hutter 2017, without restarts).
    Cosine { min_lr: f64 },
}

impl Schedule {
    /// Rate at batch `batch` of `batches` in epoch `epoch` (0-based) of `epochs`.
    pub fn lr(&self, base: f64, epoch: usize, batch: usize, batches: usize, epochs: usize) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::Step { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| epoch >= m).count();
                base * gamma.powi(passed as i32)
            }
            Schedule::Cosine { min_lr } => {
                let total = (epochs * batches).max(1) as f64;
                let t = (epoch * batches + batch) as f64 / total;
                min_lr + 0.5 * (base - min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}
