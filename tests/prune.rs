//! Magnitude pruning: the level and threshold methods, the AGP schedule, and masks that stay
//! applied through training with momentum.

mod common;

use burn::prelude::*;
use convpress::checkpoint::named_tensors;
use convpress::compress::prune::{
    PruneHook, Schedule, agp_sparsity, level_mask, sparsity_report, threshold_mask,
};
use convpress::data::DatasetKind;
use convpress::models::{ModelKind, Network};
use convpress::train::{self, Progress, TrainConfig, TrainHook, TrainOptions};
use std::collections::HashSet;

#[test]
fn level_mask_removes_exactly_the_smallest_fraction() {
    let w = [0.5, -0.1, 0.3, -0.7, 0.05];
    assert_eq!(
        level_mask(&w, 0.4).unwrap(),
        [true, false, true, true, false]
    );
    assert_eq!(level_mask(&w, 0.0).unwrap(), [true; 5]);
    // Ties broken by position: the kept count is exact.
    let flat = vec![1.0f32; 10];
    let k = level_mask(&flat, 0.3).unwrap();
    assert_eq!(k.iter().filter(|&&b| !b).count(), 3);
    assert!(level_mask(&w, 1.0).is_err());
    assert!(level_mask(&w, -0.1).is_err());
}

#[test]
fn threshold_mask_uses_quality_times_std() {
    // Mean 0, population std 1: |w| > 1.5 survives at quality 1.5.
    let w = [-2.0f32, -1.0, 0.0, 1.0, 2.0];
    let std = (10.0f64 / 5.0).sqrt();
    let keep = threshold_mask(&w, 1.0).unwrap();
    assert_eq!(
        keep,
        w.iter()
            .map(|&x| (x as f64).abs() > std)
            .collect::<Vec<_>>()
    );
    assert_eq!(keep, [true, false, false, false, true]);
    assert!(threshold_mask(&w, -1.0).is_err());
}

#[test]
fn agp_follows_zhu_and_gupta_equation_1() {
    // s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3
    let (si, sf, t0, n, dt) = (0.0, 0.8, 100, 10, 20);
    assert_eq!(agp_sparsity(50, si, sf, t0, n, dt), 0.0);
    assert_eq!(agp_sparsity(100, si, sf, t0, n, dt), 0.0);
    assert!((agp_sparsity(200, si, sf, t0, n, dt) - (0.8 - 0.8 * 0.125)).abs() < 1e-12);
    assert!((agp_sparsity(300, si, sf, t0, n, dt) - 0.8).abs() < 1e-12);
    assert!((agp_sparsity(1000, si, sf, t0, n, dt) - 0.8).abs() < 1e-12);
    // Pruning events: every dt steps from t0, n + 1 of them (the first at s_i).
    let s = Schedule::Agp {
        start_step: 100,
        every: 20,
        events: 10,
        initial: 0.0,
        final_sparsity: 0.8,
    };
    let events: Vec<usize> = (0..1000).filter(|&t| s.target(t).is_some()).collect();
    assert_eq!(events, (0..=10).map(|k| 100 + 20 * k).collect::<Vec<_>>());
    let mut last = -1.0;
    for t in events {
        let v = s.target(t).unwrap();
        assert!(v >= last);
        last = v;
    }
    assert!(
        PruneHook::new(
            vec![],
            Schedule::OneShot {
                at_step: 0,
                sparsity: 1.0
            }
        )
        .is_err()
    );
}

/// Checks after every step that the set of zero weights only grows.
struct Monotone {
    zeros: HashSet<(String, usize)>,
    checks: usize,
}

impl TrainHook for Monotone {
    fn name(&self) -> &str {
        "monotone"
    }
    fn after_step(&mut self, _p: &Progress, model: Network) -> Network {
        let mut now = HashSet::new();
        for (path, _, d) in named_tensors(&model) {
            if path.ends_with("weight") {
                for (i, v) in d.try_to_vec::<f32>().unwrap().into_iter().enumerate() {
                    if v == 0.0 {
                        now.insert((path.clone(), i));
                    }
                }
            }
        }
        assert!(self.zeros.is_subset(&now), "a pruned weight came back");
        self.zeros = now;
        self.checks += 1;
        model
    }
}

#[test]
fn gradual_pruning_reaches_its_target_and_pruned_weights_stay_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 640, 300, 28);
    let mut c = TrainConfig::defaults(ModelKind::Lenet300, DatasetKind::Mnist);
    c.data_dir = data;
    c.epochs = 4;
    c.batch_size = 32;
    // 20 steps per epoch: prune from 0 to 90% in 5 events, 6 steps apart, from step 10.
    let schedule = Schedule::Agp {
        start_step: 10,
        every: 6,
        events: 5,
        initial: 0.0,
        final_sparsity: 0.9,
    };
    let out = train::train(
        &c,
        vec![
            Box::new(PruneHook::new(vec![], schedule).unwrap()),
            Box::new(Monotone {
                zeros: HashSet::new(),
                checks: 0,
            }),
        ],
        &TrainOptions {
            run_dir: dir.path().join("run"),
            device: Device::flex(),
            resume: false,
            progress_bar: false,
            verbose: false,
        },
    )
    .unwrap();
    for (path, total, zeros) in sparsity_report(&out.model) {
        let s = zeros as f64 / total as f64;
        assert!((s - 0.9).abs() < 1e-3, "{path}: sparsity {s}");
    }
    let acc = out.metrics.last().unwrap().test_acc;
    assert!(acc > 0.8, "90%-sparse LeNet-300 on synthetic digits: {acc}");
}

#[test]
fn one_shot_pruning_of_chosen_layers_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 320, 100, 28);
    let mut c = TrainConfig::defaults(ModelKind::Lenet5, DatasetKind::Mnist);
    c.data_dir = data;
    c.epochs = 1;
    c.batch_size = 32;
    let hook = PruneHook::new(
        vec!["layers.5".into()],
        Schedule::OneShot {
            at_step: 0,
            sparsity: 0.75,
        },
    )
    .unwrap();
    let out = train::train(
        &c,
        vec![Box::new(hook)],
        &TrainOptions {
            run_dir: dir.path().join("run"),
            device: Device::flex(),
            resume: false,
            progress_bar: false,
            verbose: false,
        },
    )
    .unwrap();
    for (path, total, zeros) in sparsity_report(&out.model) {
        let s = zeros as f64 / total as f64;
        if path == "layers.5.weight" {
            assert!((s - 0.75).abs() < 1e-6, "{path}: {s}");
        } else {
            assert!(s < 0.01, "{path} was not chosen but is {s} sparse");
        }
    }
}
