//! The training loop: hooks, learning, determinism, and resume after SIGKILL.

mod common;

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use convpress::checkpoint;
use convpress::data::DatasetKind;
use convpress::models::{ModelKind, Network};
use convpress::train::{self, Progress, TrainConfig, TrainHook, TrainOptions};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

fn config(data: &Path, model: ModelKind, epochs: usize) -> TrainConfig {
    let mut c = TrainConfig::defaults(model, DatasetKind::Mnist);
    c.data_dir = data.to_path_buf();
    c.epochs = epochs;
    c.batch_size = 32;
    c
}

fn options(run: &Path) -> TrainOptions {
    TrainOptions {
        run_dir: run.to_path_buf(),
        device: Device::flex(),
        resume: false,
        progress_bar: false,
        verbose: false,
    }
}

/// Multiplies every weight matrix (rank 2) by a fixed mask.
struct MaskMapper<'a> {
    masks: &'a [Tensor<2>],
    next: usize,
}

impl ModuleMapper for MaskMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D != 2 {
            return param;
        }
        let mask: Tensor<D> = self.masks[self.next].clone().reshape(param.shape());
        self.next += 1;
        // Detach and re-enable gradients, or the optimizer would skip the parameter
        // (shared/notes/burn-0.22.md: the Param::map pitfall).
        param.map(|w| {
            let grad = w.is_require_grad();
            let out = (w.clone() * mask.to_device(&w.device())).detach();
            if grad { out.require_grad() } else { out }
        })
    }
}

/// Prunes half of each weight matrix at the start and re-applies the mask after every step.
struct PruneHook {
    masks: Vec<Tensor<2>>,
    reapply: bool,
}

impl TrainHook for PruneHook {
    fn name(&self) -> &str {
        "prune"
    }
    fn on_epoch_begin(&mut self, p: &Progress, model: Network) -> Network {
        if p.epoch == 0 && self.masks.is_empty() {
            let weights: Vec<_> = checkpoint::named_tensors(&model)
                .into_iter()
                .filter(|(_, _, d)| d.rank() == 2)
                .collect();
            let device = Device::flex().autodiff();
            self.masks = weights
                .iter()
                .enumerate()
                .map(|(k, (_, _, d))| {
                    let dims = [d.shape()[0], d.shape()[1]];
                    let n = dims[0] * dims[1];
                    let m: Vec<f32> = (0..n)
                        .map(|i| {
                            (((i as u64 + k as u64).wrapping_mul(2654435761) >> 13) % 2) as f32
                        })
                        .collect();
                    Tensor::from_data(TensorData::new(m, dims), &device)
                })
                .collect();
        }
        if p.epoch == 0 {
            return model.map(&mut MaskMapper {
                masks: &self.masks,
                next: 0,
            });
        }
        model
    }
    fn after_step(&mut self, _p: &Progress, model: Network) -> Network {
        if self.reapply {
            model.map(&mut MaskMapper {
                masks: &self.masks,
                next: 0,
            })
        } else {
            model
        }
    }
}

fn zero_fraction(model: &Network) -> f64 {
    let w: Vec<f32> = checkpoint::named_tensors(model)
        .into_iter()
        .filter(|(_, _, d)| d.rank() == 2)
        .flat_map(|(_, _, d)| d.try_to_vec::<f32>().unwrap())
        .collect();
    w.iter().filter(|&&v| v == 0.0).count() as f64 / w.len() as f64
}

#[test]
fn masks_reapplied_after_each_step_survive_momentum() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 600, 200, 28);
    let mut c = config(&data, ModelKind::Lenet300, 3);
    c.optimizer = train::OptimizerConfig::Sgd {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
    };

    let kept = train::train(
        &c,
        vec![Box::new(PruneHook {
            masks: vec![],
            reapply: true,
        })],
        &options(&dir.path().join("a")),
    )
    .unwrap();
    let z = zero_fraction(&kept.model);
    assert!(
        (0.499..0.51).contains(&z),
        "pruned half stays exactly zero: {z}"
    );
    let acc = kept.metrics.last().unwrap().test_acc;
    assert!(acc > 0.8, "{acc}");

    // Control: the same masks applied once, not after each step, are revived by momentum and
    // weight decay's gradient, so the test above can fail.
    let revived = train::train(
        &c,
        vec![Box::new(PruneHook {
            masks: vec![],
            reapply: false,
        })],
        &options(&dir.path().join("b")),
    )
    .unwrap();
    assert!(zero_fraction(&revived.model) < 0.01);
    let acc_revived = revived.metrics.last().unwrap().test_acc;
    assert!(acc_revived > 0.8, "{acc_revived}");
}

/// Binary-weight forward pass (sign(w) * mean|w| per matrix) with a straight-through
/// gradient, as a forward transform; records the losses it sees.
struct BinaryForward {
    calls: usize,
}

/// `sign(w) * mean|w|` for weight matrices; with `ste`, as `w + (q - w).detach()` so the
/// gradient passes straight through to `w`.
struct Binarise {
    ste: bool,
}

impl ModuleMapper for Binarise {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D < 2 {
            return param;
        }
        let ste = self.ste;
        param.map(|w| {
            let alpha = w.clone().abs().mean();
            let q = w.clone().sign() * alpha.unsqueeze();
            if ste { w.clone() + (q - w).detach() } else { q }
        })
    }
}

impl TrainHook for BinaryForward {
    fn name(&self) -> &str {
        "binary-forward"
    }
    fn forward_model(&mut self, _p: &Progress, model: Network) -> Network {
        self.calls += 1;
        model.map(&mut Binarise { ste: true })
    }
}

#[test]
fn forward_transform_trains_latent_weights_through_a_straight_through_estimator() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 600, 300, 28);
    let c = config(&data, ModelKind::Lenet300, 3);
    let out = train::train(
        &c,
        vec![Box::new(BinaryForward { calls: 0 })],
        &options(&dir.path().join("run")),
    )
    .unwrap();
    // Latent weights are real-valued (they moved), and the binarised network learned.
    let binarised = out.model.clone().valid().map(&mut Binarise { ste: false });
    let distinct: std::collections::HashSet<u32> = checkpoint::named_tensors(&binarised)
        .into_iter()
        .filter(|(p, _, _)| p == "layers.1.weight")
        .flat_map(|(_, _, d)| d.try_to_vec::<f32>().unwrap())
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(distinct.len(), 2, "binarised weights take two values");
    let prepared = train::prepare(&c).unwrap();
    let (_, acc) = train::evaluate(&binarised, &prepared.test, 128, &Device::flex());
    assert!(acc > 0.8, "binary-weight network accuracy {acc}");
}

/// Counts hook calls to check the order and number of calls.
struct Recorder(Arc<Mutex<Vec<String>>>);

impl TrainHook for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn on_epoch_begin(&mut self, p: &Progress, m: Network) -> Network {
        self.0
            .lock()
            .unwrap()
            .push(format!("epoch_begin {}", p.epoch));
        m
    }
    fn on_batch_begin(&mut self, _p: &Progress) {
        self.0.lock().unwrap().push("batch_begin".into());
    }
    fn extra_loss(
        &mut self,
        _p: &Progress,
        _m: &Network,
        _batch: &convpress::data::Batch,
        logits: &Tensor<2>,
    ) -> Option<Tensor<1>> {
        self.0.lock().unwrap().push("extra_loss".into());
        // An L2 penalty on the logits: must not break training.
        Some(logits.clone().powf_scalar(2.0).mean().mul_scalar(1e-3))
    }
    fn before_step(&mut self, _p: &Progress, _m: &Network, _g: &mut burn::optim::GradientsParams) {
        self.0.lock().unwrap().push("before_step".into());
    }
    fn on_batch_end(&mut self, _p: &Progress, loss: f64) {
        assert!(loss.is_finite());
        self.0.lock().unwrap().push("batch_end".into());
    }
    fn on_epoch_end(&mut self, m: &train::EpochMetrics, _model: &Network) {
        self.0
            .lock()
            .unwrap()
            .push(format!("epoch_end {}", m.epoch));
    }
}

#[test]
fn hooks_are_called_in_order_and_training_learns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 320, 200, 28);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut c = config(&data, ModelKind::Lenet5, 2);
    c.optimizer = train::OptimizerConfig::Sgd {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    let out = train::train(
        &c,
        vec![Box::new(Recorder(log.clone()))],
        &options(&dir.path().join("run")),
    )
    .unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log[0], "epoch_begin 0");
    assert_eq!(
        log[1..5],
        ["batch_begin", "extra_loss", "before_step", "batch_end"]
    );
    assert_eq!(log.iter().filter(|s| *s == "batch_end").count(), 20);
    assert_eq!(log.last().unwrap(), "epoch_end 2");
    let m = out.metrics.last().unwrap();
    assert!(
        m.test_acc > 0.9,
        "synthetic digits are easy: {}",
        m.test_acc
    );
    // The run folder holds the log and the final model.
    let lines = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
    assert!(dir.path().join("run/model.safetensors").is_file());
}

#[test]
fn the_same_seed_gives_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 256, 64, 28);
    let c = config(&data, ModelKind::Lenet5, 1);
    let a = train::train(&c, vec![], &options(&dir.path().join("a"))).unwrap();
    let b = train::train(&c, vec![], &options(&dir.path().join("b"))).unwrap();
    let mut c2 = c.clone();
    c2.seed = 2;
    let other = train::train(&c2, vec![], &options(&dir.path().join("c"))).unwrap();
    let bytes = |m: &Network| -> Vec<u8> {
        checkpoint::named_tensors(m)
            .into_iter()
            .flat_map(|(_, _, d)| d.as_bytes().to_vec())
            .collect()
    };
    assert_eq!(bytes(&a.model), bytes(&b.model));
    assert_ne!(bytes(&a.model), bytes(&other.model));
    // A second run into the same folder is refused instead of overwriting it.
    let e = train::train(&c, vec![], &options(&dir.path().join("a"))).unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");
}

#[test]
fn a_run_killed_mid_epoch_resumes_from_its_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_synthetic_mnist(&data, 3000, 300, 28);
    let run = dir.path().join("run");
    let bin = env!("CARGO_BIN_EXE_convpress");
    let args = |extra: &[&str]| {
        let mut cmd = Command::new(bin);
        cmd.args([
            "train",
            "--model",
            "lenet5",
            "--epochs",
            "4",
            "--batch-size",
            "32",
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--run-dir")
        .arg(&run)
        .args(extra);
        cmd
    };
    let mut child = args(&[]).spawn().unwrap();
    // Wait for the first checkpoint, then a little into epoch 2, then SIGKILL.
    let latest = run.join("checkpoints/latest");
    let start = std::time::Instant::now();
    while !latest.is_file() {
        assert!(start.elapsed().as_secs() < 300, "no checkpoint after 300 s");
        assert!(child.try_wait().unwrap().is_none(), "trainer exited early");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let epoch1 = start.elapsed();
    std::thread::sleep(epoch1 / 3);
    child.kill().unwrap();
    child.wait().unwrap();
    let done = std::fs::read_to_string(&latest).unwrap();
    assert!(
        done.trim() == "epoch-0001" || done.trim() == "epoch-0002",
        "{done}"
    );
    assert!(
        !run.join("model.safetensors").exists(),
        "killed before the end"
    );

    let out = args(&["--resume"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let epochs: Vec<u64> = metrics
        .iter()
        .map(|m| m["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, vec![1, 2, 3, 4]);
    let acc = metrics[3]["test_acc"].as_f64().unwrap();
    assert!(acc > 0.9, "resumed run reaches {acc}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("test accuracy"), "{stdout}");
    // The final model loads and evaluates like any other.
    let (model, _) = checkpoint::load(&run.join("model.safetensors"), &Device::flex()).unwrap();
    assert_eq!(model.arch.name, "lenet5");
}
