//! Reader for the CIFAR-10 binary format: records of 1 label byte followed by 3072 pixel bytes
//! (1024 red, 1024 green, 1024 blue, each 32x32 row-major).

use super::{DataError, ImageSet};
use std::path::Path;

pub const RECORD: usize = 1 + 3 * 32 * 32;

/// Reads one or more CIFAR-10 binary batch files into one image set (pixels scaled to [0, 1]).
pub fn read_cifar_files(paths: &[std::path::PathBuf]) -> Result<ImageSet, DataError> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        parse_cifar(path, &bytes, &mut pixels, &mut labels)?;
    }
    let n = labels.len();
    Ok(ImageSet {
        n,
        channels: 3,
        height: 32,
        width: 32,
        pixels,
        labels,
        classes: 10,
    })
}

fn parse_cifar(
    path: &Path,
    bytes: &[u8],
    pixels: &mut Vec<f32>,
    labels: &mut Vec<u8>,
) -> Result<(), DataError> {
    if bytes.is_empty() {
        return Err(DataError::corrupt(path, "empty file".into()));
    }
    if !bytes.len().is_multiple_of(RECORD) {
        return Err(DataError::corrupt(
            path,
            format!(
                "truncated: {} bytes is not a whole number of {RECORD}-byte CIFAR-10 records",
                bytes.len()
            ),
        ));
    }
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] >= 10 {
            return Err(DataError::corrupt(
                path,
                format!("record {i}: label {} out of range 0..10", rec[0]),
            ));
        }
        labels.push(rec[0]);
        pixels.extend(rec[1..].iter().map(|&b| b as f32 / 255.0));
    }
    Ok(())
}
