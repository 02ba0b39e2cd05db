//! Fuzzes the compressed model file reader (`convpress::compress::format::decode`).
//!
//! Each input is decoded twice:
//! 1. as it is, which exercises the magic, version, length and checksum checks;
//! 2. resealed: the input (or, if it is itself a `.cpz` file, its body) is wrapped in a
//!    valid frame with the right length and CRC-32, so mutations reach the body parser
//!    (JSON header, sections, Huffman tables and streams) instead of stopping at the
//!    checksum.
//!
//! Decoding must return `Ok` or `Err`: a panic, an abort, a timeout or an allocation over
//! libFuzzer's limits is a bug. A quantized model that decodes and passes `Loaded::check` is
//! also built by the int8 runtime and run on a small batch (if it is small enough to run
//! quickly): a file the reader accepts must not panic the runtime either.
#![no_main]

use convpress::compress::format::{self, MAGIC, VERSION};
use libfuzzer_sys::fuzz_target;

/// A file around `body`: magic, version, reserved, length, body, CRC-32.
fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 20);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn check(bytes: &[u8]) {
    if let Ok(loaded) = format::decode(bytes) {
        // A decoded model is internally consistent: every tensor holds as many f32 values
        // as its shape says.
        for (path, (data, _)) in &loaded.tensors {
            assert_eq!(data.as_bytes().len(), 4 * data.num_elements(), "{path}");
        }
        let small = loaded.arch.input.iter().product::<usize>() <= 1 << 12
            && loaded.arch.flops() <= 1 << 24;
        if loaded.quant.is_some()
            && small
            && loaded.check().is_ok()
            && let Ok(model) = convpress::runtime::model::SparseModel::from_loaded(&loaded)
        {
            let n: usize = model.arch.input.iter().product();
            let out = model.forward(&vec![0.5; 4 * n], 4);
            assert_eq!(out.len(), 4 * model.arch.classes);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let body = if data.len() >= 20 && data.starts_with(MAGIC) {
        &data[16..data.len() - 4]
    } else {
        data
    };
    check(&seal(body));
});
