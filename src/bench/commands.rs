//! The `convpress bench` commands: what they measure is in the parent module; these print
//! it (a table, or one JSON object per line).

use super::{Mode, OP_CASES, check_bench_args, measure, measure_op};
use crate::checkpoint;
use crate::data;
use crate::models::ModelKind;
use anyhow::bail;
use burn::prelude::*;
use std::path::PathBuf;
use std::time::Duration;

/// What `convpress bench sparse --checkpoint` measures.
#[derive(Debug, Clone)]
pub struct ModelComparison {
    pub batch: Vec<usize>,
    pub seconds: f64,
    pub json: bool,
    /// Test images on which the two engines' class scores are compared.
    pub limit: usize,
    pub data_dir: Option<PathBuf>,
    /// Also time the sparse runtime layer by layer.
    pub per_layer: bool,
}

/// `convpress bench ops`: milliseconds per call of each case of [`OP_CASES`].
pub fn print_ops(device: &Device, seconds: f64, json: bool) -> anyhow::Result<()> {
    check_bench_args(&[1], seconds)?;
    if !json {
        println!(
            "{:<34} {:>9} {:>7} {:>12} {:>12}",
            "op (batch 64)", "ops", "threads", "forward ms", "fwd+bwd ms"
        );
    }
    for case in OP_CASES {
        let r = measure_op(device, case, Duration::from_secs_f64(seconds));
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

/// `convpress bench train`: images per second for each batch size and mode.
pub fn print_train(
    device: &Device,
    model: ModelKind,
    batch: &[usize],
    mode: &[Mode],
    seconds: f64,
    json: bool,
) -> anyhow::Result<()> {
    check_bench_args(batch, seconds)?;
    let arch = model
        .arch(super::bench_input(model), 10)
        .map_err(anyhow::Error::msg)?;
    for &b in batch {
        crate::resources::check_batch(&arch, b, mode.contains(&Mode::Train), "--batch")?;
    }
    if !json {
        println!(
            "{:<10} {:>6} {:>7} {:>6} {:>12} {:>10}",
            "model", "batch", "threads", "mode", "images/s", "ms/iter"
        );
    }
    for &b in batch {
        for &m in mode {
            let r = measure(device, model, b, m, Duration::from_secs_f64(seconds));
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

/// `convpress bench latency`: parameters, FLOPs and latency of saved models side by side.
pub fn compare_latency(
    paths: &[PathBuf],
    batch: &[usize],
    seconds: f64,
    device: &Device,
) -> anyhow::Result<()> {
    check_bench_args(batch, seconds)?;
    // Load everything first: a bad file fails before minutes of measuring.
    let models = paths
        .iter()
        .map(|p| checkpoint::load(p, device).map(|(m, _)| m))
        .collect::<Result<Vec<_>, _>>()?;
    for model in &models {
        for &b in batch {
            crate::resources::check_batch(&model.arch, b, false, "--batch")?;
        }
    }
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
            let ms = super::infer_latency(model, b, Duration::from_secs_f64(seconds), device);
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

/// `convpress bench sparse` without a checkpoint: CSR against dense for single layers.
pub fn compare_sparse_layers(
    sparsity: &[f64],
    batch: &[usize],
    seconds: f64,
    json: bool,
) -> anyhow::Result<()> {
    check_bench_args(batch, seconds)?;
    for &b in batch {
        // The largest layer timed is 784 -> 300: its input and output for the batch.
        crate::resources::check_memory(
            &format!("a batch of {b} rows through a 784x300 layer"),
            crate::resources::bytes_of(&[b, 784 + 300], 4),
            "use a smaller --batch",
        )?;
    }
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
                let r = super::measure_sparse_linear(
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

/// Whole-model inference of a pruned checkpoint: Burn dense against the sparse runtime, and
/// how closely their class scores agree on real test images.
pub fn compare_model(path: &std::path::Path, cmp: &ModelComparison) -> anyhow::Result<()> {
    let (batch, seconds, json, limit, per_layer) = (
        &cmp.batch[..],
        cmp.seconds,
        cmp.json,
        cmp.limit,
        cmp.per_layer,
    );
    use crate::runtime::model::SparseModel;
    check_bench_args(batch, seconds)?;
    let device = Device::flex();
    let (dense, meta) = checkpoint::load(path, &device)?;
    let dense = dense.valid();
    let sparse = SparseModel::from_loaded(&checkpoint::read(path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for &b in batch {
        crate::resources::check_batch(&sparse.arch, b, false, "--batch")?;
    }
    let input = sparse.arch.input;
    let len: usize = input.iter().product();
    // Real test images when the checkpoint's dataset is there, else Gaussian noise.
    let dir = meta.data_dir_or(cmp.data_dir.as_deref());
    let (images, labels) = match data::load(meta.dataset, &dir) {
        Ok(splits) if meta.preprocess.output_shape(splits.test.image_shape()) == input => {
            let test = meta.preprocess.try_apply(&splits.test.take(limit.max(1)))?;
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
        let r = super::measure_model(
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
            let times = super::sparse_layer_times(
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
    let a = super::agreement(&dense, &sparse, &images, labels.as_deref());
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

/// `convpress bench quant`: single fully connected layers, convpress's f32 path against the
/// int8 layer (whole int8 models come with the int8 convolutions, issue #12).
pub fn compare_int8_layers(batch: &[usize], seconds: f64, json: bool) -> anyhow::Result<()> {
    check_bench_args(batch, seconds)?;
    let layers = [
        ("lenet5.fc1", 800, 500),
        ("lenet300.fc1", 784, 300),
        ("alexnet.fc7", 4096, 4096),
    ];
    for &b in batch {
        crate::resources::check_memory(
            &format!("a batch of {b} rows through a 4096x4096 layer"),
            crate::resources::bytes_of(&[b, 4096 + 4096], 4),
            "use a smaller --batch",
        )?;
    }
    if !json {
        println!(
            "{:<14} {:>10} {:>5} {:>7} {:>7} {:>10} {:>10} {:>8} {:>10} {:>10}",
            "layer",
            "shape",
            "batch",
            "threads",
            "int8",
            "f32 us",
            "int8 us",
            "speedup",
            "f32 B",
            "int8 B"
        );
    }
    for &(name, i, o) in &layers {
        for &b in batch {
            let r = super::measure_int8_linear(name, i, o, b, Duration::from_secs_f64(seconds))
                .map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{:<14} {:>10} {:>5} {:>7} {:>12} {:>10.1} {:>10.1} {:>7.2}x {:>10} {:>10}",
                    r.layer,
                    format!("{i}x{o}"),
                    r.batch,
                    r.threads,
                    r.kernel,
                    r.f32_us,
                    r.int8_us,
                    r.speedup,
                    r.f32_bytes,
                    r.int8_bytes
                );
            }
        }
    }
    if !json {
        println!("(medians of 10 interleaved rounds; speedup: f32 time over int8 time)");
    }
    Ok(())
}

/// `convpress bench quant --checkpoint Q.cpz [--float F]`: the whole quantized model on the
/// int8 runtime against the float model (`float`, else the file's own weights in float) on
/// convpress's f32 path, at each batch size.
pub fn compare_quantized_model(
    quantized: &std::path::Path,
    float: Option<&std::path::Path>,
    batch: &[usize],
    seconds: f64,
    json: bool,
) -> anyhow::Result<()> {
    check_bench_args(batch, seconds)?;
    let loaded = crate::checkpoint::read(quantized)?;
    if loaded.quant.is_none() {
        anyhow::bail!(
            "{} is not a quantized model: make one with `convpress quantize`",
            quantized.display()
        );
    }
    let runtime = loaded
        .quant
        .as_ref()
        .map_or("int8".into(), |q| q.runtime_label());
    let int8 =
        crate::runtime::model::SparseModel::from_loaded(&loaded).map_err(anyhow::Error::msg)?;
    let device = Device::flex();
    let (network, _) = crate::checkpoint::load(float.unwrap_or(quantized), &device)?;
    if network.arch.input != loaded.arch.input || network.arch.classes != loaded.arch.classes {
        anyhow::bail!("the float model does not take the quantized one's input");
    }
    for &b in batch {
        crate::resources::check_batch(&loaded.arch, b, false, "--batch")?;
    }
    if !json {
        println!(
            "{:<10} {:>5} {:>7} {:>10} {:>10} {:>8}",
            "model",
            "batch",
            "threads",
            "f32 ms",
            format!("{runtime} ms"),
            "speedup"
        );
    }
    for &b in batch {
        let r =
            super::measure_quantized_model(&network, &int8, b, Duration::from_secs_f64(seconds));
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{:<10} {:>5} {:>7} {:>10.3} {:>10.3} {:>7.2}x",
                r.model, r.batch, r.threads, r.f32_ms, r.int8_ms, r.speedup
            );
        }
    }
    if !json {
        println!(
            "(medians of 10 interleaved rounds; f32: {} on convpress's kernels through Burn; {runtime}: {} on the runtime)",
            float.unwrap_or(quantized).display(),
            quantized.display()
        );
    }
    Ok(())
}

/// `convpress bench binary`: the binary convolution against convpress's f32 convolution at
/// XNOR-Net's benchmark shape (256 channels in and out, 3x3, 14x14) and at ResNet-20's three
/// shapes, at each batch size, on each vector path this CPU runs (AVX-512 and AVX2; the best
/// other one where it has neither).
pub fn compare_binary_convs(batch: &[usize], seconds: f64, json: bool) -> anyhow::Result<()> {
    use crate::kernels::binary::Path;
    check_bench_args(batch, seconds)?;
    let mut paths: Vec<Path> = [Path::Avx512, Path::Avx2]
        .into_iter()
        .filter(|p| p.runs_here())
        .collect();
    if paths.is_empty() {
        paths.push(Path::best());
    }
    let shapes = [
        ("xnor-net", [256, 256], [14, 14]),
        ("resnet20.stage1", [16, 16], [32, 32]),
        ("resnet20.stage2", [32, 32], [16, 16]),
        ("resnet20.stage3", [64, 64], [8, 8]),
    ];
    if !json {
        println!(
            "{:<16} {:>9} {:>6} {:>5} {:>7} {:>6} {:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9}",
            "layer",
            "channels",
            "hw",
            "batch",
            "threads",
            "path",
            "f32 us",
            "binary us",
            "packed us",
            "speedup",
            "packed",
            "f32 B",
            "binary B"
        );
    }
    let budget = Duration::from_secs_f64(seconds);
    each_conv_case(
        &shapes,
        batch,
        &paths,
        json,
        |name, channels, hw, b, path| {
            super::measure_binary_conv(name, channels, hw, b, path, budget)
        },
        |r| {
            format!(
                "{} {:>10.1} {:>10.1} {:>10.1} {:>7.2}x {:>7.2}x {:>9} {:>9}",
                case_columns(&r.layer, r.channels, r.hw, r.batch, r.threads, &r.path),
                r.f32_us,
                r.binary_us,
                r.packed_us,
                r.speedup,
                r.packed_speedup,
                r.f32_weight_bytes,
                r.binary_weight_bytes
            )
        },
    )?;
    if !json {
        println!(
            "(3x3, stride 1, padding 1; medians of 5 interleaved rounds; speedup: f32 time over the binary layer's, f32 in to f32 out with the input's binarization and packing; packed: over the packed-input-to-sums time)"
        );
    }
    compare_lookup_convs(&shapes, batch, seconds, json)
}

/// Measures every shape at every batch on every path, and prints each result as a JSON line
/// or as the table row `row` makes of it.
fn each_conv_case<P: Copy, R: serde::Serialize>(
    shapes: &[(&str, [usize; 2], [usize; 2])],
    batch: &[usize],
    paths: &[P],
    json: bool,
    measure: impl Fn(&str, [usize; 2], [usize; 2], usize, P) -> Result<R, String>,
    row: impl Fn(&R) -> String,
) -> anyhow::Result<()> {
    for &(name, channels, hw) in shapes {
        for (&b, &path) in batch.iter().flat_map(|b| paths.iter().map(move |p| (b, p))) {
            let r = measure(name, channels, hw, b, path).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", row(&r));
            }
        }
    }
    Ok(())
}

/// The columns that name a convolution case: layer, channels, image size, batch, threads, path.
fn case_columns(
    layer: &str,
    channels: [usize; 2],
    hw: [usize; 2],
    batch: usize,
    threads: usize,
    path: &str,
) -> String {
    format!(
        "{:<16} {:>9} {:>6} {:>5} {:>7} {:>6}",
        layer,
        format!("{}>{}", channels[0], channels[1]),
        format!("{}x{}", hw[0], hw[1]),
        batch,
        threads,
        path
    )
}

/// The second table of `convpress bench binary`: binary and ternary weights on float inputs
/// (BWN, TWN) on the table-lookup kernels, against the f32 convolution and the int8 layer, on
/// each vector path this CPU runs.
fn compare_lookup_convs(
    shapes: &[(&str, [usize; 2], [usize; 2])],
    batch: &[usize],
    seconds: f64,
    json: bool,
) -> anyhow::Result<()> {
    use crate::kernels::binary::lookup::TablePath;
    let mut paths: Vec<TablePath> = [TablePath::Avx512, TablePath::Avx2]
        .into_iter()
        .filter(|p| p.runs_here())
        .collect();
    if paths.is_empty() {
        paths.push(TablePath::best());
    }
    if !json {
        println!(
            "\nbinary and ternary weights on float inputs (table lookup, additions only):\n{:<16} {:>9} {:>6} {:>5} {:>7} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
            "layer",
            "channels",
            "hw",
            "batch",
            "threads",
            "path",
            "f32 us",
            "binary us",
            "ternary us",
            "int8 us",
            "speedup",
            "ternary",
            "vs int8"
        );
    }
    let budget = Duration::from_secs_f64(seconds);
    each_conv_case(
        shapes,
        batch,
        &paths,
        json,
        |name, channels, hw, b, path| {
            super::measure_lookup_conv(name, channels, hw, b, path, budget)
        },
        |r| {
            format!(
                "{} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>7.2}x {:>7.2}x {:>7.2}x",
                case_columns(&r.layer, r.channels, r.hw, r.batch, r.threads, &r.path),
                r.f32_us,
                r.binary_us,
                r.ternary_us,
                r.int8_us,
                r.speedup,
                r.ternary_speedup,
                r.vs_int8
            )
        },
    )?;
    if !json {
        println!(
            "(3x3, stride 1, padding 1; medians of 5 interleaved rounds; f32 in to f32 out; speedup and ternary: f32 time over the binary and ternary layers'; vs int8: the int8 layer's time (the same binary weights, 8-bit inputs, the runtime's best int8 path) over the binary one's)"
        );
    }
    Ok(())
}

/// `convpress bench circulant`: dense against circulant layers for each size and batch, and
/// the smallest size measured from which the circulant layer is faster (the crossover).
pub fn print_circulant(
    device: &Device,
    dims: &[usize],
    batch: &[usize],
    seconds: f64,
    json: bool,
    plot: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    check_bench_args(batch, seconds)?;
    if let Some(p) = plot
        && p.extension().is_none_or(|e| e != "svg")
    {
        bail!("--plot {}: the chart is an .svg file", p.display());
    }
    if dims.is_empty() || dims.contains(&0) {
        bail!("--dims must be sizes of at least 1");
    }
    if let Some(&big) = dims.iter().find(|&&d| d > 1 << 15) {
        bail!(
            "--dims {big}: a dense layer of that size would hold {} GiB of weights",
            (big * big * 4) >> 30
        );
    }
    if !json {
        println!(
            "{:>6} {:>6} {:>7} {:>12} {:>12} {:>8} {:>13} {:>13} {:>8}",
            "d",
            "batch",
            "threads",
            "dense fwd",
            "circ fwd",
            "fwd x",
            "dense f+b",
            "circ f+b",
            "f+b x"
        );
    }
    let mut all = Vec::new();
    for &b in batch {
        for &d in dims {
            let m = super::measure_circulant(device, d, b, Duration::from_secs_f64(seconds));
            if json {
                println!("{}", serde_json::to_string(&m)?);
            } else {
                let [f, fb] = m.speedup();
                println!(
                    "{:>6} {:>6} {:>7} {:>9.4} ms {:>9.4} ms {:>7.2}x {:>10.4} ms {:>10.4} ms {:>7.2}x",
                    m.d,
                    m.batch,
                    m.threads,
                    m.dense_forward_ms,
                    m.circulant_forward_ms,
                    f,
                    m.dense_forward_backward_ms,
                    m.circulant_forward_backward_ms,
                    fb
                );
            }
            all.push(m);
        }
    }
    if !json {
        for &b in batch {
            for (i, what) in ["forward", "forward+backward"].iter().enumerate() {
                let mut sizes: Vec<&super::CirculantMeasurement> =
                    all.iter().filter(|m| m.batch == b).collect();
                sizes.sort_by_key(|m| m.d);
                // The smallest size from which every larger one measured is faster too.
                let from = sizes
                    .iter()
                    .rposition(|m| m.speedup()[i] < 1.0)
                    .map_or(Some(0), |p| (p + 1 < sizes.len()).then_some(p + 1));
                match from {
                    Some(p) => println!(
                        "batch {b}, {what}: circulant faster from d = {} on (of the sizes measured)",
                        sizes[p].d
                    ),
                    None => println!("batch {b}, {what}: circulant slower at every size measured"),
                }
            }
        }
    }
    if let Some(path) = plot {
        crate::atomic_file::write_atomic(path, circulant_chart(&all).to_svg().as_bytes())?;
        if !json {
            println!("chart: {}", path.display());
        }
    }
    Ok(())
}

/// Speed-up against size, one line per batch and pass; log2 so that 0.5x and 2x sit equally
/// far from the line of equal speed.
fn circulant_chart(all: &[super::CirculantMeasurement]) -> crate::plot::LineChart {
    let mut batches: Vec<usize> = all.iter().map(|m| m.batch).collect();
    batches.sort_unstable();
    batches.dedup();
    let mut series = Vec::new();
    for b in batches {
        for (i, what) in ["forward", "forward+backward"].iter().enumerate() {
            let mut points: Vec<(f64, f64)> = all
                .iter()
                .filter(|m| m.batch == b)
                .map(|m| (m.d as f64, m.speedup()[i].log2()))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            series.push(crate::plot::Series {
                name: format!("batch {b}, {what}"),
                points,
            });
        }
    }
    crate::plot::LineChart {
        title: "circulant layer against a dense layer of the same size".into(),
        x_label: "d (layer is d x d)".into(),
        y_label: "log2 speed-up (dense time / circulant time)".into(),
        series,
        guides: vec![(0.0, "equal speed".into())],
        log_x: true,
        ..Default::default()
    }
}
