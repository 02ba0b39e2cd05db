//! The training loop. One epoch: seeded shuffle, steps with hooks, evaluation on the test set,
//! a JSON line of metrics, and a checkpoint that `--resume` continues from.
//!
//! Run folder layout:
//! - `config.json`: the [`TrainConfig`];
//! - `metrics.jsonl`: one [`EpochMetrics`] per finished epoch;
//! - `checkpoints/epoch-NNNN/{model.safetensors, optimizer.bpk, state.json}` and
//!   `checkpoints/latest` naming the newest complete one;
//! - `model.safetensors`: the final model.

use super::{EpochMetrics, Progress, TrainConfig, TrainHook};
use crate::atomic_file::write_atomic;
use crate::checkpoint::{self, ModelMeta};
use crate::data::{self, Batcher, ImageSet, Preprocess};
use crate::models::Network;
use anyhow::{Context, bail};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Data ready for a model: preprocessed splits and the preprocessing used.
pub struct Prepared {
    pub train: ImageSet,
    pub test: ImageSet,
    pub preprocess: Preprocess,
    /// Per-channel value of a black pixel after normalisation (what augmentation shifts in).
    pub fill: Vec<f32>,
}

/// Loads the dataset of `config` and preprocesses it for its model.
pub fn prepare(config: &TrainConfig) -> anyhow::Result<Prepared> {
    let splits = data::load(config.dataset, &config.data_dir)?;
    let mut train = splits.train;
    let mut test = splits.test;
    if let Some(n) = config.train_limit {
        train = train.take(n);
    }
    if let Some(n) = config.test_limit {
        test = test.take(n);
    }
    let pad = config
        .pad
        .unwrap_or_else(|| config.model.default_pad([train.height, train.width]));
    let preprocess = Preprocess::fit(&train, pad, config.resize);
    prepared_with(&train, &test, preprocess)
}

/// Applies a known preprocessing (from a checkpoint) to raw splits.
pub fn prepared_with(
    train: &ImageSet,
    test: &ImageSet,
    preprocess: Preprocess,
) -> anyhow::Result<Prepared> {
    let fill = preprocess
        .mean
        .iter()
        .zip(&preprocess.std)
        .map(|(m, s)| -m / s)
        .collect();
    Ok(Prepared {
        train: preprocess.try_apply(train)?,
        test: preprocess.try_apply(test)?,
        preprocess,
        fill,
    })
}

/// How a run is shown and where it goes; nothing here changes the result.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub run_dir: PathBuf,
    /// The plain device to train on (autodiff is added here).
    pub device: Device,
    pub resume: bool,
    pub progress_bar: bool,
    /// Print one line per epoch on standard error.
    pub verbose: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub model: Network,
    pub metrics: Vec<EpochMetrics>,
    pub model_path: PathBuf,
}

/// Saved with each checkpoint: where training stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainState {
    epochs_done: usize,
    steps: usize,
    cumulative_train_seconds: f64,
}

/// Mean cross-entropy and accuracy of `model` on a preprocessed set.
pub fn evaluate(model: &Network, set: &ImageSet, batch: usize, device: &Device) -> (f64, f64) {
    let model = model.valid();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let batcher = Batcher::new(set, batch, Default::default(), vec![]);
    let (mut loss_sum, mut correct) = (0f64, 0i64);
    for b in batcher.sequential(device) {
        let logits = model.forward(b.images);
        let loss: f32 = loss_fn
            .forward(logits.clone(), b.labels.clone())
            .into_scalar();
        loss_sum += loss as f64 * b.len as f64;
        correct += count_correct(logits, b.labels);
    }
    let n = set.n.max(1) as f64;
    (loss_sum / n, correct as f64 / n)
}

fn count_correct(logits: Tensor<2>, labels: Tensor<1, Int>) -> i64 {
    let pred = logits.argmax(1).flatten::<1>(0, 1);
    pred.equal(labels).int().sum().into_scalar()
}

/// What a training run writes in its folder; any of them means the folder holds a run.
pub const RUN_FILES: [&str; 4] = [
    "config.json",
    "metrics.jsonl",
    "checkpoints",
    "model.safetensors",
];

/// The newest complete checkpoint folder of a run (model, optimizer state, progress).
/// `latest` must name a checkpoint folder of this run (`epoch-NNNN`), nothing else: a damaged
/// or edited file could otherwise send a resume, or the clean-up of an old checkpoint, to any
/// folder on disk.
pub fn latest_checkpoint(run_dir: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(run_dir.join("checkpoints/latest")).ok()?;
    let name = checkpoint_name(&name)?;
    let dir = run_dir.join("checkpoints").join(name);
    dir.join("state.json").is_file().then_some(dir)
}

/// `name` if it is a checkpoint folder's name (`epoch-` and digits).
fn checkpoint_name(name: &str) -> Option<&str> {
    let name = name.trim();
    let digits = name.strip_prefix("epoch-")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(name)
}

/// Trains `config` with `hooks`, writing the run folder; continues a run with `resume`.
pub fn train(
    config: &TrainConfig,
    hooks: Vec<Box<dyn TrainHook>>,
    options: &TrainOptions,
) -> anyhow::Result<TrainOutcome> {
    config.check().map_err(anyhow::Error::msg)?;
    let run_dir = &options.run_dir;
    let config_path = run_dir.join("config.json");
    if options.resume {
        let saved: TrainConfig = serde_json::from_str(
            &std::fs::read_to_string(&config_path)
                .with_context(|| format!("cannot resume: {} is missing", config_path.display()))?,
        )
        .with_context(|| format!("{} is damaged", config_path.display()))?;
        // A resume may run for more epochs, on data that moved; nothing else may change.
        let mut same = config.clone();
        same.epochs = saved.epochs;
        same.data_dir = saved.data_dir.clone();
        if saved != same {
            bail!(
                "cannot resume: the settings differ from the run's {}",
                config_path.display()
            );
        }
    }
    let prepared = prepare(config)?;
    let arch = config
        .arch_for(prepared.train.image_shape(), prepared.train.classes)
        .map_err(anyhow::Error::msg)?;
    let side = prepared.train.height.max(prepared.train.width);
    if config.augment.crop_pad >= side {
        bail!(
            "--crop-pad {} shifts {}x{} images entirely out of view: use at most {}",
            config.augment.crop_pad,
            prepared.train.height,
            prepared.train.width,
            side - 1
        );
    }
    crate::resources::check_batch(
        &arch,
        config.batch_size.min(prepared.train.n),
        true,
        "--batch-size",
    )?;
    // Held until training ends: a second process training into this folder is refused here.
    let _folder = crate::run_folder::RunFolder::lock(run_dir)?;
    if !options.resume {
        let found: Vec<&str> = RUN_FILES
            .iter()
            .copied()
            .filter(|f| run_dir.join(f).exists())
            .collect();
        if !found.is_empty() {
            bail!(
                "{} already holds a training run ({}): pass --resume to continue it, --force to replace it, or choose another --run-dir",
                run_dir.display(),
                found.join(", ")
            );
        }
    }

    let device = options.device.clone();
    let ad = device.clone().autodiff();
    let meta = ModelMeta {
        dataset: config.dataset,
        preprocess: prepared.preprocess.clone(),
        info: serde_json::json!({}),
    }
    .with_data_dir(&config.data_dir);

    let mut optim: ModuleOptimizer = config.optimizer.build();
    let existing = latest_checkpoint(run_dir);
    let (mut model, mut state, mut metrics) = match (options.resume, existing) {
        (true, Some(dir)) => {
            let (model, _) = checkpoint::load(&dir.join("model.safetensors"), &ad)?;
            if model.arch != arch {
                bail!(
                    "cannot resume: the architecture of {} differs from {}'s",
                    dir.join("model.safetensors").display(),
                    config_path.display()
                );
            }
            optim = optim
                .load(dir.join("optimizer.bpk"))
                .map_err(|e| anyhow::anyhow!("{}: {e:?}", dir.join("optimizer.bpk").display()))?;
            let state_path = dir.join("state.json");
            let state: TrainState = serde_json::from_str(&fs_err::read_to_string(&state_path)?)
                .with_context(|| format!("cannot resume: {} is damaged", state_path.display()))?;
            let metrics = read_metrics_upto(&run_dir.join("metrics.jsonl"), state.epochs_done)?;
            (model, state, metrics)
        }
        (true, None) => bail!(
            "cannot resume: {} has no complete checkpoint",
            run_dir.display()
        ),
        (false, _) => {
            std::fs::create_dir_all(run_dir)
                .with_context(|| format!("cannot create {}", run_dir.display()))?;
            write_atomic(
                &config_path,
                serde_json::to_string_pretty(config)?.as_bytes(),
            )?;
            let fresh = Network::seeded(&arch, &ad, config.seed).map_err(anyhow::Error::msg)?;
            let model = match &config.init_from {
                Some(path) => checkpoint::load_into(path, fresh)?.0,
                None => fresh,
            };
            if let Some(path) = &config.init_optimizer {
                optim = optim
                    .load(path)
                    .map_err(|e| anyhow::anyhow!("{}: {e:?}", path.display()))?;
            }
            let state = TrainState {
                epochs_done: 0,
                steps: 0,
                cumulative_train_seconds: 0.0,
            };
            (model, state, Vec::new())
        }
    };
    if options.resume {
        // Everything read and checked: record a changed number of epochs or data folder.
        write_atomic(
            &config_path,
            serde_json::to_string_pretty(config)?.as_bytes(),
        )?;
    }
    // Rewrite the log so it holds exactly the epochs the checkpoint holds.
    let metrics_path = run_dir.join("metrics.jsonl");
    write_metrics(&metrics_path, &metrics)?;

    let mut hooks = hooks;
    let loss_fn = CrossEntropyLossConfig::new().init(&ad);
    let batcher = Batcher::new(
        &prepared.train,
        config.batch_size,
        config.augment.clone(),
        prepared.fill.clone(),
    );
    let batches = batcher.num_batches();

    for epoch in state.epochs_done..config.epochs {
        let mut progress = Progress {
            epoch,
            epochs: config.epochs,
            batch: 0,
            batches,
            step: state.steps,
            lr: config.lr_at(epoch, 0, batches),
        };
        for h in hooks.iter_mut() {
            model = h.on_epoch_begin(&progress, model);
        }
        let bar = progress_bar(options.progress_bar, prepared.train.n, epoch, config.epochs);
        let started = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0i64, 0usize);
        for (b, batch) in batcher.epoch(config.seed, epoch, &ad).enumerate() {
            progress.batch = b;
            progress.step = state.steps;
            progress.lr = config.lr_at(epoch, b, batches);
            for h in hooks.iter_mut() {
                h.on_batch_begin(&progress);
            }
            let forward = forward_model(&mut hooks, &progress, &model);
            let logits = forward.forward(batch.images.clone());
            let mut loss = loss_fn.forward(logits.clone(), batch.labels.clone());
            let label_weight: f64 = hooks.iter().map(|h| h.label_weight(&progress)).product();
            if label_weight != 1.0 {
                loss = loss.mul_scalar(label_weight);
            }
            for h in hooks.iter_mut() {
                if let Some(extra) = h.extra_loss(&progress, &model, &batch, &logits) {
                    loss = loss + extra;
                }
            }
            let loss_value: f32 = loss.clone().into_scalar();
            if !loss_value.is_finite() {
                bail!(
                    "training diverged at epoch {} batch {b}: loss is {loss_value} (lower --lr)",
                    epoch + 1
                );
            }
            let mut raw = loss.backward();
            for h in hooks.iter_mut() {
                h.own_gradients(&progress, &mut raw);
            }
            let mut grads = GradientsParams::from_grads(raw, &model);
            for h in hooks.iter_mut() {
                h.before_step(&progress, &model, &mut grads);
            }
            model = optim.step(progress.lr, model, grads);
            for h in hooks.iter_mut() {
                model = h.after_step(&progress, model);
            }
            state.steps += 1;
            correct += count_correct(logits.detach(), batch.labels);
            loss_sum += loss_value as f64 * batch.len as f64;
            seen += batch.len;
            for h in hooks.iter_mut() {
                h.on_batch_end(&progress, loss_value as f64);
            }
            bar.inc(batch.len as u64);
            if b % 20 == 0 {
                bar.set_message(format!("loss {:.4}", loss_sum / seen as f64));
            }
        }
        let train_seconds = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        if epoch + 1 == config.epochs && config.batch_norm_refresh > 0 {
            // Batch-norm adaptation (see `TrainConfig::batch_norm_refresh`): forward passes in
            // training mode update the running statistics; nothing else changes.
            let order = batcher.epoch(config.seed, config.epochs + epoch, &ad);
            for batch in order.take(config.batch_norm_refresh) {
                let forward = forward_model(&mut hooks, &progress, &model);
                drop(forward.forward(batch.images));
            }
        }
        let eval_start = Instant::now();
        let (test_loss, test_acc) = evaluate(&model, &prepared.test, 256, &device);
        state.epochs_done = epoch + 1;
        state.cumulative_train_seconds += train_seconds;
        let m = EpochMetrics {
            epoch: epoch + 1,
            lr: progress.lr,
            train_loss: loss_sum / seen.max(1) as f64,
            train_acc: correct as f64 / seen.max(1) as f64,
            test_loss,
            test_acc,
            train_seconds,
            eval_seconds: eval_start.elapsed().as_secs_f64(),
            cumulative_train_seconds: state.cumulative_train_seconds,
            images_per_sec: seen as f64 / train_seconds.max(1e-9),
        };
        save_checkpoint(run_dir, &model, &optim, &state, &meta)?;
        append_metrics(&metrics_path, &m)?;
        if options.verbose {
            eprintln!(
                "epoch {:>3}/{}  loss {:.4}  train {:6.2}%  test {:6.2}%  {:6.1} s  {:>6.0} img/s",
                m.epoch,
                config.epochs,
                m.train_loss,
                100.0 * m.train_acc,
                100.0 * m.test_acc,
                m.train_seconds,
                m.images_per_sec
            );
        }
        for h in hooks.iter_mut() {
            h.on_epoch_end(&m, &model);
        }
        metrics.push(m);
        if hooks.iter().any(|h| h.should_stop()) {
            break;
        }
    }
    let model_path = run_dir.join("model.safetensors");
    let mut final_meta = meta.clone();
    if let Some(last) = metrics.last() {
        final_meta.info = serde_json::json!({
            "epochs": last.epoch,
            "test_acc": last.test_acc,
            "test_loss": last.test_loss,
            "train_seconds": last.cumulative_train_seconds,
            "seed": config.seed,
        });
        final_meta = final_meta.with_data_dir(&config.data_dir);
    }
    checkpoint::save(&model_path, &model.valid(), &final_meta)?;
    Ok(TrainOutcome {
        model,
        metrics,
        model_path,
    })
}

fn progress_bar(
    enabled: bool,
    images: usize,
    epoch: usize,
    epochs: usize,
) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(images as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} img  {rate}  eta {eta}  {msg}",
        )
        .expect("valid template")
        .with_key(
            "rate",
            |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} img/s", s.per_sec());
            },
        )
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("epoch {}/{}", epoch + 1, epochs));
    bar
}

/// Writes the checkpoint of a finished epoch into a temporary folder, renames it into place,
/// then points `latest` at it: a run killed at any moment leaves the previous one intact.
fn save_checkpoint(
    run_dir: &Path,
    model: &Network,
    optim: &ModuleOptimizer,
    state: &TrainState,
    meta: &ModelMeta,
) -> anyhow::Result<()> {
    let root = run_dir.join("checkpoints");
    let name = format!("epoch-{:04}", state.epochs_done);
    let tmp = root.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    fs_err::create_dir_all(&tmp)?;
    checkpoint::save(&tmp.join("model.safetensors"), model, meta)?;
    optim.save(tmp.join("optimizer.bpk")).map_err(|e| {
        anyhow::anyhow!(
            "cannot save the optimizer state to {}: {e:?}",
            tmp.join("optimizer.bpk").display()
        )
    })?;
    fs_err::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)?;
    let dest = root.join(&name);
    let _ = std::fs::remove_dir_all(&dest);
    fs_err::rename(&tmp, &dest)?;
    let previous = std::fs::read_to_string(root.join("latest")).ok();
    write_atomic(&root.join("latest"), name.as_bytes())?;
    if let Some(prev) = previous.as_deref().and_then(checkpoint_name)
        && prev != name
    {
        let _ = std::fs::remove_dir_all(root.join(prev));
    }
    Ok(())
}

/// The per-epoch figures a run folder has logged so far.
/// The model a training batch runs forward: `model` through every hook's `forward_model`.
fn forward_model(
    hooks: &mut [Box<dyn TrainHook>],
    progress: &Progress,
    model: &Network,
) -> Network {
    hooks
        .iter_mut()
        .fold(model.clone(), |m, h| h.forward_model(progress, m))
}

pub fn read_metrics(run_dir: &Path) -> anyhow::Result<Vec<EpochMetrics>> {
    read_metrics_upto(&run_dir.join("metrics.jsonl"), usize::MAX)
}

fn read_metrics_upto(path: &Path, epochs: usize) -> anyhow::Result<Vec<EpochMetrics>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let m: EpochMetrics = serde_json::from_str(line)
            .with_context(|| format!("{} has a damaged line", path.display()))?;
        if m.epoch <= epochs {
            out.push(m);
        }
    }
    Ok(out)
}

fn write_metrics(path: &Path, metrics: &[EpochMetrics]) -> anyhow::Result<()> {
    let mut text = String::new();
    for m in metrics {
        text.push_str(&serde_json::to_string(m)?);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())?;
    Ok(())
}

fn append_metrics(path: &Path, m: &EpochMetrics) -> anyhow::Result<()> {
    let mut f = fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{}", serde_json::to_string(m)?)?;
    Ok(())
}
