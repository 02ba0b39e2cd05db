//! The `convpress` command line: it parses arguments, builds stages and runs them. What each
//! command does lives in the module it names (`pipeline::stages::*`, `compress::sensitivity`,
//! `rescale::compare`, `bench`, `inspect`).

use crate::bench::Mode;
use crate::data::{DatasetKind, fetch};
use crate::device::Backend;
use crate::models::ModelKind;
use crate::pipeline::layers::LayerRules;
use crate::pipeline::recipe::Recipe;
use crate::pipeline::runner::{self, RunOptions};
use crate::pipeline::stages::circulant::{self, Circulant, CirculantParams};
use crate::pipeline::stages::compact::{self, CompactParams};
use crate::pipeline::stages::decompose::{self, Decompose, DecomposeParams};
use crate::pipeline::stages::distill::{self, DistillParams};
use crate::pipeline::stages::encode::{self, EncodeParams};
use crate::pipeline::stages::eval::{self, Eval, EvalParams};
use crate::pipeline::stages::finetune::FinetuneParams;
use crate::pipeline::stages::prune::{self, PruneParams};
use crate::pipeline::stages::prune_filters::{self, FilterParams, PruneFilters};
use crate::pipeline::stages::rewrite::RewriteArgs;
use crate::pipeline::stages::share::ShareParams;
use crate::pipeline::stages::train::{self, TrainParams};
use crate::pipeline::{Context, Model, Stage, report};
use anyhow::{Context as _, bail};
use burn::prelude::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;

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
    /// Run a compression recipe (a TOML list of stages) into a run folder, with a report of
    /// accuracy, bytes on disk, parameters, FLOPs and latency after every stage.
    Compress(CompressArgs),
    /// Print the report of a recipe run, or compare several runs side by side.
    Report(ReportArgs),
    /// Test accuracy of a checkpoint on its dataset's test split.
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Dataset folder (default: the one the checkpoint was trained on, else the dataset's
        /// folder under $CONVPRESS_DATA or data/).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        params: EvalParams,
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
    /// Low-rank factorization: dense layers by truncated SVD, convolutions as separable
    /// filters, CP or Tucker-2 sequences; fine-tunes, and reports per layer rank, parameters,
    /// FLOPs, weight error and measured latency before and after.
    Decompose(DecomposeArgs),
    /// Dense layers as circulant projections (Cheng et al. 2015): one vector per layer, applied
    /// through the FFT; fine-tunes, and reports per layer parameters, FLOPs, weight error and
    /// measured latency before and after.
    Circulant(CirculantArgs),
    /// Compact and transferred filters: convolutions rewritten as depthwise-separable ones
    /// (MobileNet), fire modules (SqueezeNet), half the filters with CReLU, or filters shared
    /// by rotation (and mirroring); fine-tunes, and reports per layer parameters, FLOPs and
    /// measured latency before and after.
    Rewrite(RewriteCompactArgs),
    /// Knowledge distillation (Hinton et al. 2015): a student trained with a teacher's soft
    /// targets at temperature T mixed with the labels; a fresh model (a zoo name, --width to
    /// thin it) or a trained, pruned or rewritten checkpoint.
    Distill(DistillArgs),
    /// Each low-rank method's accuracy against speed at several compressions: decompose and
    /// fine-tune runs in one folder, a table, JSON, CSV and an SVG plot.
    DecomposeTradeoff(decompose::tradeoff::TradeoffArgs),
    /// Pruning sensitivity: test accuracy with one layer at a time pruned by magnitude, no
    /// retraining; a table, JSON, CSV and an SVG chart, and per-layer targets for `prune`.
    Sensitivity(crate::compress::sensitivity::SensitivityArgs),
    /// Kernel rescaling against the baseline: both schedules for each seed, a table of test
    /// accuracy and training time, and an SVG plot of accuracy against time.
    RescaleCompare(crate::rescale::compare::CompareArgs),
    /// Write a compressed model file: k-means weight sharing of every conv and linear weight,
    /// sparse relative indices and Huffman coding (Deep Compression's last two stages).
    Encode(EncodeArgs),
    /// Post-training quantization: batch norms folded, activations calibrated on training
    /// images, weights per output channel at --bits bits; writes a .cpz that eval runs on the
    /// int8 kernels, and prints the accuracy before and after.
    Quantize(QuantizeArgs),
    /// Quantization-aware training at --bits from a float checkpoint (batch norms folded,
    /// inputs calibrated, weights and inputs fake-quantized with straight-through gradients);
    /// writes a .cpz like quantize does.
    Qat(QatArgs),
    /// Binary or ternary weights trained from a float checkpoint (--method binary-connect,
    /// stochastic, bwn, xnor, twn, loss-aware or few-multiplications); writes a .cpz with
    /// binary weights at 1 bit and ternary ones at 2, times one scale per channel (inputs at 8
    /// bits; xnor: their signs, run on the XNOR-popcount kernels).
    Binarize(BinarizeArgs),
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
        /// Replace files of MNIST's names that hold something else.
        #[arg(long)]
        force: bool,
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
    /// Single fully connected layers, convpress's f32 path against the int8 layer (8-bit
    /// weights per channel, 8-bit inputs), interleaved, as medians.
    Quant {
        #[arg(long, value_delimiter = ',', default_values_t = [1, 64])]
        batch: Vec<usize>,
        /// Seconds per layer (or model) and batch (both paths together).
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
        /// A quantized model (`convpress quantize`): the whole model on the int8 runtime
        /// against the float one, instead of single layers.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// The float model to compare with (default: the quantized file's weights in float).
        #[arg(long, requires = "checkpoint")]
        float: Option<PathBuf>,
    },
    /// The XNOR-popcount binary convolution against convpress's f32 convolution at XNOR-Net's
    /// benchmark shape (256 channels, 3x3, 14x14) and ResNet-20's, interleaved, as medians.
    Binary {
        #[arg(long, value_delimiter = ',', default_values_t = [1, 64])]
        batch: Vec<usize>,
        /// Seconds per shape and batch (all three timings together).
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
    },
    /// A circulant layer (FFT, Cheng et al. 2015) against a dense layer of the same size d x d,
    /// forward and forward + backward, interleaved, as medians; says from which size on the
    /// circulant one is faster.
    Circulant {
        #[arg(long, value_delimiter = ',', default_values_t = [32, 64, 128, 256, 1024, 4096, 16384])]
        dims: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_values_t = [1, 64])]
        batch: Vec<usize>,
        /// Seconds per size and batch (all four timings together).
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
        /// Also draw the speed-ups against d into this SVG file.
        #[arg(long)]
        plot: Option<PathBuf>,
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

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub params: TrainParams,
    /// Run folder for config, metrics and checkpoints (default: runs/<model>-<dataset>-<time>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in --run-dir from its last checkpoint, with its saved settings
    /// (only --epochs may change).
    #[arg(long, requires = "run_dir", conflicts_with = "rescale_from")]
    pub resume: bool,
    /// Replace the run in --run-dir (a folder convpress made) instead of refusing.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// No progress bar even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct CompressArgs {
    /// The recipe: a TOML file of [[stage]] tables (see recipes/ and the README).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Start from this checkpoint instead of a train stage.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Run folder (default: runs/<recipe name>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in the run folder: finished stages are skipped, an unfinished one
    /// starts again.
    #[arg(long)]
    pub resume: bool,
    /// Replace the run in the run folder (a folder convpress made) instead of refusing.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Dataset folder for every stage (default: the one the model was trained on).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run folders of `convpress compress`.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// With several runs: folder for compare.md and compare.svg (default: runs/compare). With
    /// one, its report.md and plots are drawn again from its report.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an earlier compare.md and compare.svg in --out.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// The trained model to prune.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub params: PruneParams,
    /// Layers --sparsity applies to, by path (`layers.5`); all conv and linear layers if none.
    #[arg(long, value_delimiter = ',', requires = "sparsity")]
    pub layers: Vec<String>,
    /// Per-layer final sparsities, `layers.2=0.9,layers.5=0.95`; they override --sparsity and
    /// --targets for the layers they name.
    #[arg(long, value_delimiter = ',', value_parser = parse_layer_sparsity)]
    pub layer_sparsity: Vec<(String, f64)>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Replace the run in --run-dir (a folder convpress made) instead of refusing.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct PruneFiltersArgs {
    #[command(flatten)]
    pub filters: FilterParams,
    #[command(flatten)]
    pub run: RewriteArgs,
}

#[derive(Args, Debug)]
pub struct DecomposeArgs {
    #[command(flatten)]
    pub decompose: DecomposeParams,
    /// Layers to factorize (paths or glob patterns, comma separated); default: every layer
    /// the method takes where the rank chosen lowers its FLOPs.
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<String>,
    #[command(flatten)]
    pub run: RewriteArgs,
}

#[derive(Args, Debug)]
pub struct CirculantArgs {
    #[command(flatten)]
    pub circulant: CirculantParams,
    /// Dense layers to replace (paths or glob patterns, comma separated); default: every dense
    /// layer but the last.
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<String>,
    #[command(flatten)]
    pub run: RewriteArgs,
}

#[derive(Args, Debug)]
pub struct RewriteCompactArgs {
    #[command(flatten)]
    pub compact: CompactParams,
    /// Layers to rewrite (paths or glob patterns, comma separated); default: every layer the
    /// form suits.
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<String>,
    #[command(flatten)]
    pub run: RewriteArgs,
}

#[derive(Args, Debug)]
pub struct DistillArgs {
    /// The student: a model name (lenet300, lenet5, vgg-small, resnet20) to train from
    /// scratch, or a checkpoint to train further (its masks and codebooks kept).
    #[arg(long)]
    pub student: String,
    #[command(flatten)]
    pub distill: DistillParams,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Run folder (default: `runs/<student>-distilled-<time>`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Replace the run in --run-dir (a folder convpress made) instead of refusing.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct EncodeArgs {
    /// The (pruned) model to encode.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output file (default: the checkpoint's name with .cpz). Never the checkpoint itself.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace --out (and its report and fine-tuning folder) if they exist.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub share: ShareParams,
    #[command(flatten)]
    pub encode: EncodeParams,
    /// Epochs of centroid fine-tuning before writing (0: share without retraining).
    #[arg(long, default_value_t = 0)]
    pub finetune_epochs: usize,
    /// Learning rate of the centroids during fine-tuning (default 0.001).
    #[arg(long, allow_negative_numbers = true)]
    pub finetune_lr: Option<f64>,
    /// Run folder of the fine-tuning (default: next to --out).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Dataset folder, to evaluate the decoded model (skipped if the data is missing).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// The float model to quantize (a checkpoint, or a pruned one).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output file (default: the checkpoint's name with .q<bits>.cpz). Never the checkpoint.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub params: crate::pipeline::stages::quantize::QuantizeParams,
    /// Dataset folder (default: the one the checkpoint was trained on).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub test_limit: Option<usize>,
}

/// The files of a command that trains from one float checkpoint and writes a `.cpz`.
#[derive(clap::Args, Debug)]
pub struct TrainedFileArgs {
    /// The trained float model (for qat it may be pruned: its masks are kept).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output file (default: beside the checkpoint, `.qat<bits>.cpz` or `.<method>.cpz`).
    /// Never the checkpoint.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run folder of the training (default: next to --out).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Replace --out and the run folder if they exist.
    #[arg(long)]
    pub force: bool,
    /// Dataset folder (default: the one the checkpoint was trained on).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

impl TrainedFileArgs {
    fn outputs(&self) -> encode::Outputs {
        encode::Outputs {
            out: self.out.clone(),
            run_dir: self.run_dir.clone(),
            force: self.force,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct QatArgs {
    #[command(flatten)]
    pub files: TrainedFileArgs,
    #[command(flatten)]
    pub params: crate::pipeline::stages::qat::QatParams,
}

#[derive(clap::Args, Debug)]
pub struct BinarizeArgs {
    #[command(flatten)]
    pub files: TrainedFileArgs,
    #[command(flatten)]
    pub params: crate::pipeline::stages::binarize::BinarizeParams,
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

/// A context for a command's stage in `dir`.
fn context(dir: PathBuf, device: Device, data_dir: Option<PathBuf>, no_progress: bool) -> Context {
    Context {
        dir,
        device,
        data_dir,
        progress_bar: std::io::stderr().is_terminal() && !no_progress,
        verbose: true,
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    crate::kernels::set_default_ops(cli.ops);
    if let Some(n) = cli.threads {
        crate::resources::check_threads(n)?;
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot set up the thread pool")?;
    }
    let device = || cli.device.device();
    match cli.command {
        Command::Data {
            command:
                DataCommand::Fetch {
                    dataset,
                    data_dir,
                    force,
                },
        } => match dataset {
            FetchDataset::Mnist => {
                let dir = data_dir.unwrap_or_else(|| DatasetKind::Mnist.default_dir());
                println!("{}", fetch::fetch_mnist(&dir, force)?.describe(&dir));
                Ok(())
            }
        },
        Command::Train(args) => run_train(args, device()?),
        Command::Compress(args) => run_compress(args, device()?),
        Command::Report(args) => run_report(args),
        Command::Eval {
            checkpoint,
            data_dir,
            params,
        } => {
            let stage = Eval { params };
            stage.check().map_err(anyhow::Error::msg)?;
            let model = Model::open(&checkpoint)?;
            let cx = context(PathBuf::new(), device()?, data_dir, true);
            let out = stage.run(Some(model), &cx)?;
            println!("{}", eval::summary(&out));
            Ok(())
        }
        Command::Info { checkpoint, json } => crate::inspect::info(&checkpoint, json),
        Command::Prune(args) => run_prune(args, device()?),
        Command::PruneFilters(args) => {
            let cx = context(
                PathBuf::new(),
                device()?,
                args.run.data_dir.clone(),
                args.run.no_progress,
            );
            let stage = PruneFilters {
                params: args.filters,
            };
            prune_filters::command(&stage, &args.run, cx)
        }
        Command::Decompose(args) => {
            let cx = context(
                PathBuf::new(),
                device()?,
                args.run.data_dir.clone(),
                args.run.no_progress,
            );
            let stage = Decompose {
                params: args.decompose,
                layers: LayerRules::named(args.layers),
            };
            decompose::command(&stage, &args.run, cx).map(|_| ())
        }
        Command::Circulant(args) => {
            let cx = context(
                PathBuf::new(),
                device()?,
                args.run.data_dir.clone(),
                args.run.no_progress,
            );
            let stage = Circulant {
                params: args.circulant,
                layers: LayerRules::named(args.layers),
            };
            circulant::command(&stage, &args.run, cx).map(|_| ())
        }
        Command::Rewrite(args) => {
            let cx = context(
                PathBuf::new(),
                device()?,
                args.run.data_dir.clone(),
                args.run.no_progress,
            );
            let stage = compact::Rewrite {
                params: args.compact,
                layers: LayerRules::named(args.layers),
            };
            compact::command(&stage, &args.run, cx).map(|_| ())
        }
        Command::Distill(args) => {
            let cx = context(PathBuf::new(), device()?, args.data_dir, args.no_progress);
            let reuse = crate::run_folder::Reuse::from_flags(false, args.force);
            distill::command(args.distill, &args.student, args.run_dir, reuse, cx)
        }
        Command::DecomposeTradeoff(args) => {
            let cx = context(
                PathBuf::new(),
                device()?,
                args.data_dir.clone(),
                args.no_progress,
            );
            decompose::tradeoff::command(&args, cx)
        }
        Command::Sensitivity(args) => crate::compress::sensitivity::command(&args, device()?),
        Command::RescaleCompare(args) => crate::rescale::compare::command(&args, device()?),
        Command::Encode(args) => run_encode(args, device()?),
        Command::Binarize(args) => crate::pipeline::stages::binarize::command(
            &args.files.checkpoint,
            args.files.outputs(),
            args.params,
            context(
                PathBuf::new(),
                device()?,
                args.files.data_dir,
                args.files.no_progress,
            ),
        ),
        Command::Qat(args) => crate::pipeline::stages::qat::command(
            &args.files.checkpoint,
            args.files.outputs(),
            args.params,
            context(
                PathBuf::new(),
                device()?,
                args.files.data_dir,
                args.files.no_progress,
            ),
        ),
        Command::Quantize(args) => crate::pipeline::stages::quantize::command(
            &args.checkpoint,
            args.out,
            args.force,
            args.params,
            args.test_limit,
            context(PathBuf::new(), device()?, args.data_dir, false),
        ),
        Command::Bench { command } => run_bench(command, device),
    }
}

fn run_bench(
    command: BenchCommand,
    device: impl Fn() -> anyhow::Result<Device>,
) -> anyhow::Result<()> {
    use crate::bench::commands as bench;
    match command {
        BenchCommand::Sparse {
            sparsity,
            batch,
            seconds,
            json,
            checkpoint,
            limit,
            data_dir,
            per_layer,
        } => match checkpoint {
            Some(path) => {
                let cmp = bench::ModelComparison {
                    batch,
                    seconds,
                    json,
                    limit,
                    data_dir,
                    per_layer,
                };
                bench::compare_model(&path, &cmp)
            }
            None => bench::compare_sparse_layers(&sparsity, &batch, seconds, json),
        },
        BenchCommand::Latency {
            checkpoint,
            batch,
            seconds,
        } => bench::compare_latency(&checkpoint, &batch, seconds, &device()?),
        BenchCommand::Quant {
            batch,
            seconds,
            json,
            checkpoint,
            float,
        } => match checkpoint {
            Some(q) => bench::compare_quantized_model(&q, float.as_deref(), &batch, seconds, json),
            None => bench::compare_int8_layers(&batch, seconds, json),
        },
        BenchCommand::Binary {
            batch,
            seconds,
            json,
        } => bench::compare_binary_convs(&batch, seconds, json),
        BenchCommand::Circulant {
            dims,
            batch,
            seconds,
            json,
            plot,
        } => bench::print_circulant(&device()?, &dims, &batch, seconds, json, plot.as_deref()),
        BenchCommand::Ops { seconds, json } => {
            crate::bench::check_bench_args(&[1], seconds)?;
            bench::print_ops(&device()?, seconds, json)
        }
        BenchCommand::Train {
            model,
            batch,
            mode,
            seconds,
            json,
        } => {
            crate::bench::check_bench_args(&batch, seconds)?;
            bench::print_train(&device()?, model, &batch, &mode, seconds, json)
        }
    }
}

fn run_train(args: TrainArgs, device: Device) -> anyhow::Result<()> {
    let cx = context(PathBuf::new(), device, None, args.no_progress);
    let reuse = crate::run_folder::Reuse::from_flags(args.resume, args.force);
    train::command(&args.params, args.run_dir, reuse, cx)
}

fn run_prune(args: PruneArgs, device: Device) -> anyhow::Result<()> {
    let cx = context(PathBuf::new(), device, args.data_dir, args.no_progress);
    prune::command(
        &args.checkpoint,
        args.params,
        &args.layers,
        &args.layer_sparsity,
        args.run_dir,
        args.force,
        cx,
    )
}

fn run_encode(args: EncodeArgs, device: Device) -> anyhow::Result<()> {
    let lr = args.finetune_lr.unwrap_or(1e-3);
    if !(lr.is_finite() && lr > 0.0) {
        bail!("--finetune-lr must be a positive number, got {lr}");
    }
    if args.finetune_lr.is_some() && args.finetune_epochs == 0 {
        bail!("--finetune-lr needs --finetune-epochs of at least 1");
    }
    let finetune = (args.finetune_epochs > 0).then_some(FinetuneParams {
        epochs: args.finetune_epochs,
        lr,
        seed: 1,
        train_limit: None,
        test_limit: None,
    });
    let cx = context(PathBuf::new(), device, args.data_dir, false);
    let outputs = encode::Outputs {
        out: args.out,
        run_dir: args.run_dir,
        force: args.force,
    };
    encode::command(
        &args.checkpoint,
        outputs,
        args.share,
        args.encode,
        finetune,
        cx,
    )
}

fn run_compress(args: CompressArgs, device: Device) -> anyhow::Result<()> {
    let recipe = Recipe::read(&args.recipe)?;
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        let stem = args
            .recipe
            .file_stem()
            .map_or("recipe".into(), |s| s.to_string_lossy().into_owned());
        PathBuf::from("runs").join(stem)
    });
    let cx = context(run_dir.clone(), device, args.data_dir, args.no_progress);
    let opts = RunOptions {
        run_dir: run_dir.clone(),
        from: args.from,
        resume: args.resume,
        force: args.force,
    };
    let report = runner::run(&recipe, &opts, &cx)?;
    println!("{}", report.table());
    println!(
        "report: {} (and report.json, plots/)",
        run_dir.join("report.md").display()
    );
    Ok(())
}

fn run_report(args: ReportArgs) -> anyhow::Result<()> {
    report::command(&args.runs, args.out.as_deref(), args.force)
}
