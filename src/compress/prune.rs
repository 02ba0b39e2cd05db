//! Unstructured magnitude pruning: masks, the methods that compute them, the gradual schedule
//! that decides how much to prune when, and the training hook that keeps pruned weights at
//! zero.
//!
//! - Level pruner: the smallest-magnitude fraction `s` of a tensor's entries is removed.
//! - Threshold pruner (Han et al. 2015, "Learning both Weights and Connections", section 3):
//!   entries with `|w| <= quality * std(w)` are removed, per layer.
//! - AGP (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1): the target sparsity at step
//!   `t` is `s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3` for `t0 <= t <= t0 + n * dt`.
//!
//! Masks are re-applied after every optimizer step, so momentum and weight decay cannot revive
//! a pruned weight; once pruned, a weight stays pruned (a mask only ever loses entries).
//!
//! Per-layer targets come from [`super::sensitivity`] (Han et al. 2015, Fig. 5); sparse storage
//! is [`super::format`], sparse kernels are [`crate::runtime::sparse`].

use crate::checkpoint::{map_params_by_path, named_tensors};
use crate::models::Network;
use crate::train::{Progress, TrainHook};
use burn::module::Module;
use burn::prelude::*;
use std::collections::BTreeMap;

/// Mask of the entries to keep: the `1 - sparsity` fraction of largest magnitude. Ties are
/// broken by position, so the kept count is exact: `round((1 - sparsity) * len)`.
pub fn level_mask(weights: &[f32], sparsity: f64) -> Result<Vec<bool>, String> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(format!("sparsity must be in [0, 1), got {sparsity}"));
    }
    let prune = (sparsity * weights.len() as f64).round() as usize;
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        weights[a]
            .abs()
            .total_cmp(&weights[b].abs())
            .then(a.cmp(&b))
    });
    let mut keep = vec![true; weights.len()];
    for &i in &order[..prune] {
        keep[i] = false;
    }
    Ok(keep)
}

/// Han et al.'s per-layer threshold: keep entries with `|w| > quality * std(w)`.
pub fn threshold_mask(weights: &[f32], quality: f64) -> Result<Vec<bool>, String> {
    if !(quality.is_finite() && quality >= 0.0) {
        return Err(format!(
            "quality must be a non-negative number, got {quality}"
        ));
    }
    let n = weights.len().max(1) as f64;
    let mean = weights.iter().map(|&w| w as f64).sum::<f64>() / n;
    let var = weights
        .iter()
        .map(|&w| (w as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let t = quality * var.sqrt();
    Ok(weights.iter().map(|&w| (w as f64).abs() > t).collect())
}

/// Zhu & Gupta's gradual schedule: sparsity at step `t` when pruning from `s_i` to `s_f` in
/// `n` pruning events `dt` steps apart starting at `t0`.
pub fn agp_sparsity(t: usize, s_i: f64, s_f: f64, t0: usize, n: usize, dt: usize) -> f64 {
    if t <= t0 {
        return s_i;
    }
    let span = (n * dt).max(1) as f64;
    let frac = ((t - t0) as f64 / span).min(1.0);
    s_f + (s_i - s_f) * (1.0 - frac).powi(3)
}

/// When the hook prunes, and to what sparsity.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Prune to `sparsity` once, before step `at_step`, then keep the mask.
    OneShot { at_step: usize, sparsity: f64 },
    /// Gradual pruning (AGP): every `every` steps from `start_step`, `events` times, from
    /// `initial` to `final_sparsity`.
    Agp {
        start_step: usize,
        every: usize,
        events: usize,
        initial: f64,
        final_sparsity: f64,
    },
    /// AGP from 0 to `final_sparsity` in `events` steps spread over the first `fraction` of
    /// the run's optimizer steps (resolved into [`Schedule::Agp`] when training starts); the
    /// rest of the run retrains with the final mask.
    AgpOverRun {
        final_sparsity: f64,
        fraction: f64,
        events: usize,
    },
}

impl Schedule {
    /// This schedule with run-relative settings made absolute for a run of `total_steps`.
    pub fn resolve(&self, total_steps: usize) -> Schedule {
        match *self {
            Schedule::AgpOverRun {
                final_sparsity,
                fraction,
                events,
            } => {
                let events = events.max(1);
                let span = ((total_steps as f64 * fraction) as usize).max(events);
                Schedule::Agp {
                    start_step: 0,
                    every: (span / events).max(1),
                    events,
                    initial: 0.0,
                    final_sparsity,
                }
            }
            ref other => other.clone(),
        }
    }

    /// The target sparsity if the hook should prune before step `step`, else `None`.
    pub fn target(&self, step: usize) -> Option<f64> {
        match *self {
            Schedule::AgpOverRun { .. } => None,
            Schedule::OneShot { at_step, sparsity } => (step == at_step).then_some(sparsity),
            Schedule::Agp {
                start_step,
                every,
                events,
                initial,
                final_sparsity,
            } => {
                let every = every.max(1);
                let due = step >= start_step
                    && (step - start_step).is_multiple_of(every)
                    && (step - start_step) / every <= events;
                due.then(|| agp_sparsity(step, initial, final_sparsity, start_step, events, every))
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        let ok = |s: f64| (0.0..1.0).contains(&s);
        match *self {
            Schedule::OneShot { sparsity, .. } if !ok(sparsity) => {
                Err(format!("sparsity must be in [0, 1), got {sparsity}"))
            }
            Schedule::Agp {
                initial,
                final_sparsity,
                ..
            } if !ok(initial) || !ok(final_sparsity) || initial > final_sparsity => Err(format!(
                "AGP needs 0 <= initial <= final < 1, got {initial} and {final_sparsity}"
            )),
            Schedule::AgpOverRun {
                final_sparsity,
                fraction,
                ..
            } if !(ok(final_sparsity) && fraction > 0.0 && fraction <= 1.0) => Err(format!(
                "sparsity must be in [0, 1) and the pruning fraction in (0, 1], got {final_sparsity} and {fraction}"
            )),
            _ => Ok(()),
        }
    }
}

/// Keep-masks of the pruned tensors, by parameter path, flattened, on the training device.
#[derive(Debug, Clone, Default)]
pub struct Masks {
    masks: BTreeMap<String, Tensor<1>>,
}

impl Masks {
    /// Builds masks from `keep` vectors; the device is the model's.
    pub fn from_keep(keep: BTreeMap<String, Vec<bool>>, device: &Device) -> Self {
        let masks = keep
            .into_iter()
            .map(|(path, k)| {
                let n = k.len();
                let v: Vec<f32> = k.into_iter().map(|b| b as u8 as f32).collect();
                (path, Tensor::from_data(TensorData::new(v, [n]), device))
            })
            .collect();
        Masks { masks }
    }

    /// Replaces (or adds) the masks of the paths in `keep`, leaving the others.
    pub fn update(&mut self, keep: BTreeMap<String, Vec<bool>>, device: &Device) {
        self.masks.extend(Self::from_keep(keep, device).masks);
    }

    pub fn paths(&self) -> impl Iterator<Item = &String> {
        self.masks.keys()
    }

    /// The keep-mask of `path` read back from the device, if it has one.
    fn keep_of(&self, path: &str) -> Option<Vec<bool>> {
        let m: Vec<f32> = self.masks.get(path)?.to_data().try_to_vec().ok()?;
        Some(m.into_iter().map(|v| v != 0.0).collect())
    }

    /// `model` with every masked parameter multiplied by its mask.
    pub fn apply(&self, model: Network) -> Network {
        map_params_by_path(model, |path, w| {
            let mask = self.masks.get(path)?;
            Some(w.clone() * mask.clone().to_device(&w.device()))
        })
    }
}

/// The device `model`'s parameters live on.
fn device_of(model: &Network) -> Device {
    model
        .devices()
        .into_iter()
        .next()
        .unwrap_or_else(Device::flex)
}

/// Fraction of exactly-zero entries of each weight tensor (conv and linear weights).
pub fn sparsity_report(model: &Network) -> Vec<(String, usize, usize)> {
    named_tensors(model)
        .into_iter()
        .filter(|(p, _, d)| p.ends_with("weight") && d.rank() >= 2)
        .map(|(p, _, d)| {
            let v: Vec<f32> = d.try_to_vec().expect("f32 weights");
            let zeros = v.iter().filter(|&&x| x == 0.0).count();
            (p, v.len(), zeros)
        })
        .collect()
}

/// Whether `path` (a parameter, `layers.5.weight`) lies under `layer` (`layers.5`); the
/// empty layer names every parameter.
fn under(path: &str, layer: &str) -> bool {
    layer.is_empty() || path == layer || path.starts_with(&format!("{layer}."))
}

/// Prunes conv and linear weights on per-layer schedules, and keeps them pruned.
///
/// Each rule is a layer path (`layers.5`; `""` for every layer) with its schedule; a weight
/// follows the most specific rule that names it, so `("", 0.9)` plus `("layers.0", 0.5)` means
/// "0.9 everywhere but conv1". Per-layer targets are what sensitivity analysis yields (Han et
/// al. 2015, Fig. 5 and the per-layer thresholds chosen from it; Distiller does the same).
pub struct PruneHook {
    rules: Vec<(String, Schedule)>,
    masks: Masks,
    /// Masks fixed before this run (an earlier pruning stage), put on the device when training
    /// starts; new masks are intersected with them, so no pruned weight comes back.
    initial: BTreeMap<String, Vec<bool>>,
}

impl PruneHook {
    /// One schedule for the layers named by `layers` (all conv and linear weights if empty).
    pub fn new(layers: Vec<String>, schedule: Schedule) -> Result<Self, String> {
        let rules = if layers.is_empty() {
            vec![(String::new(), schedule)]
        } else {
            layers.into_iter().map(|l| (l, schedule.clone())).collect()
        };
        Self::per_layer(rules)
    }

    /// One schedule per layer path.
    pub fn per_layer(rules: Vec<(String, Schedule)>) -> Result<Self, String> {
        for (layer, schedule) in &rules {
            schedule.check().map_err(|e| {
                if layer.is_empty() {
                    e
                } else {
                    format!("{layer}: {e}")
                }
            })?;
        }
        Ok(PruneHook {
            rules,
            masks: Masks::default(),
            initial: BTreeMap::new(),
        })
    }

    /// A hook that only keeps the given masks applied (no rule prunes anything new): what
    /// fine-tuning a pruned model needs.
    pub fn keeping(masks: BTreeMap<String, Vec<bool>>) -> Self {
        PruneHook {
            rules: Vec::new(),
            masks: Masks::default(),
            initial: masks,
        }
    }

    /// Starts from masks fixed earlier: entries they pruned stay pruned whatever the rules do.
    pub fn with_masks(mut self, masks: BTreeMap<String, Vec<bool>>) -> Self {
        self.initial = masks;
        self
    }

    pub fn masks(&self) -> &Masks {
        &self.masks
    }

    /// The rule that governs parameter `path`: the longest layer path it lies under.
    fn rule_of(&self, path: &str) -> Option<usize> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, (layer, _))| under(path, layer))
            .max_by_key(|(_, (layer, _))| layer.len())
            .map(|(i, _)| i)
    }

    /// Prunes, from the current weights, every weight whose rule is due at `step`; entries
    /// already pruned stay pruned (they are zero, hence smallest). Returns the model with all
    /// masks applied.
    fn prune_due(&mut self, model: Network, step: usize) -> Network {
        let due: Vec<Option<f64>> = self.rules.iter().map(|(_, s)| s.target(step)).collect();
        if due.iter().all(Option::is_none) {
            return self.masks.apply(model);
        }
        let mut keep = BTreeMap::new();
        for (path, _, data) in named_tensors(&model) {
            if !(path.ends_with("weight") && data.rank() >= 2) {
                continue;
            }
            if let Some(s) = self.rule_of(&path).and_then(|i| due[i]) {
                let w: Vec<f32> = data.try_to_vec().expect("f32 weights");
                let mut k = level_mask(&w, s).expect("checked sparsity");
                if let Some(old) = self.masks.keep_of(&path) {
                    k.iter_mut().zip(old).for_each(|(k, o)| *k &= o);
                }
                keep.insert(path, k);
            }
        }
        self.masks.update(keep, &device_of(&model));
        self.masks.apply(model)
    }
}

impl TrainHook for PruneHook {
    fn name(&self) -> &str {
        "prune"
    }

    fn on_epoch_begin(&mut self, progress: &Progress, model: Network) -> Network {
        if !self.initial.is_empty() {
            self.masks
                .update(std::mem::take(&mut self.initial), &device_of(&model));
        }
        let remaining = (progress.epochs - progress.epoch) * progress.batches;
        for (_, schedule) in &mut self.rules {
            if matches!(schedule, Schedule::AgpOverRun { .. }) {
                *schedule = schedule.resolve(progress.step + remaining);
            }
        }
        // A schedule that prunes before the very first step; later pruning events happen in
        // `after_step`, for the step that follows.
        if progress.step == 0 {
            return self.prune_due(model, 0);
        }
        model
    }

    fn after_step(&mut self, progress: &Progress, model: Network) -> Network {
        self.prune_due(model, progress.step + 1)
    }
}
