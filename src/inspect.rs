//! `convpress info`: what a model file holds, layer by layer: shapes, parameters, FLOPs and
//! bytes; for a compressed file also the bytes of each compression step, and for a quantized
//! one each layer's bits and input quantizer.

use crate::checkpoint;
use anyhow::Context as _;
use std::path::Path;

/// `convpress info`: what the file at `path` holds.
pub fn info(path: &Path, json: bool) -> anyhow::Result<()> {
    let loaded = checkpoint::read(path)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file_bytes = bytes.len() as u64;
    let stats = loaded.arch.layer_stats();
    if json {
        let v = serde_json::json!({
            "checkpoint": path,
            "quantized": loaded.quant.as_ref().map(|q| q.layers.iter().map(|(l, q)| {
                serde_json::json!({ "layer": l, "bits": q.bits, "input": q.input, "weight_scales": q.weight_scales })
            }).collect::<Vec<_>>()),
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
        .fold(0usize, |a, n| a.saturating_add(n))
        .saturating_sub(params);
    println!(
        "total: {} parameters ({} bytes as f32), {} buffer values (batch-norm statistics), {} FLOPs per image; file {} bytes",
        params,
        4 * params,
        buffers,
        loaded.arch.flops(),
        file_bytes
    );
    if crate::compress::format::is_compressed(&bytes) {
        let stages = crate::compress::format::stages(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        println!("compression stages:");
        println!(
            "{}",
            crate::compress::format::stage_table(&stages, file_bytes as usize, path)
        );
    }
    if let Some(q) = &loaded.quant {
        let stages = crate::compress::format::stages(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        println!(
            "quantized layers (the others run in float; eval runs the file on the {}):",
            q.kernels()
        );
        println!(
            "{:<22} {:>5} {:>8} {:>24} {:>5} {:>11} {:>11}",
            "layer", "bits", "in bits", "input range", "zero", "weights", "weight B"
        );
        for (layer, l) in &q.layers {
            let (lo, hi) = l.input.range();
            let range = if l.sign_input {
                "signs".to_string()
            } else if l.float_input {
                "float".to_string()
            } else {
                format!("[{lo:.4}, {hi:.4}]")
            };
            let w = stages.iter().find(|s| s.path == format!("{layer}.weight"));
            println!(
                "{:<22} {:>5} {:>8} {:>24} {:>5} {:>11} {:>11}",
                layer,
                l.bits,
                l.input_bits(),
                range,
                if l.float_input {
                    String::new()
                } else {
                    l.input.zero_point.to_string()
                },
                w.map_or(0, |w| w.numel),
                w.map_or(0, |w| w.huffman)
            );
        }
    }
    if let Some(acc) = loaded.meta.info.get("test_acc").and_then(|v| v.as_f64()) {
        let of = if loaded.quant.is_some() {
            " (of the float model before its last quantization)"
        } else {
            ""
        };
        println!("recorded test accuracy{of}: {:.2}%", 100.0 * acc);
    }
    Ok(())
}
