//! Fuzzes the checkpoint reader (`convpress::checkpoint::parse`), which takes safetensors
//! checkpoints and `.cpz` files alike.
//!
//! Each input is read twice:
//! 1. as it is, which exercises the safetensors header, the metadata and the checksum;
//! 2. resealed: if the input is a safetensors file, its checksum is recomputed over whatever
//!    it now holds, so mutations reach the architecture and tensor checks instead of stopping
//!    at the checksum.
//!
//! Reading must return `Ok` or `Err`: a panic, an abort, a timeout or an allocation over
//! libFuzzer's limits is a bug. A file that reads is consistent: every tensor the
//! architecture names is there with its shape, and nothing else.
#![no_main]

use convpress::checkpoint;
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;

/// The same safetensors file with a correct `convpress.checksum`, if it parses at all.
fn reseal(bytes: &[u8]) -> Option<Vec<u8>> {
    let st = safetensors::SafeTensors::deserialize(bytes).ok()?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let mut metadata: HashMap<String, String> = header.metadata().clone()?;
    let tensors = st.tensors();
    let shapes: Vec<Vec<usize>> = tensors.iter().map(|(_, v)| v.shape().to_vec()).collect();
    let parts: Vec<(&str, &[usize], &[u8])> = tensors
        .iter()
        .zip(&shapes)
        .map(|((n, v), s)| (n.as_str(), s.as_slice(), v.data()))
        .collect();
    metadata.insert(
        "convpress.checksum".into(),
        checkpoint::checksum(&metadata, &parts),
    );
    safetensors::serialize(tensors, Some(metadata)).ok()
}

fn check(bytes: &[u8]) {
    if let Ok(loaded) = checkpoint::parse(bytes) {
        let want = loaded.arch.tensor_shapes();
        assert_eq!(want.len(), loaded.tensors.len());
        for (name, shape) in want {
            let (data, _) = &loaded.tensors[&name];
            assert_eq!(data.shape().as_slice(), shape.as_slice(), "{name}");
            assert_eq!(data.as_bytes().len(), 4 * data.num_elements(), "{name}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(resealed) = reseal(data) {
        check(&resealed);
    }
});
