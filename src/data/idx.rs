//! Reader for the IDX format of LeCun's MNIST distribution (raw or gzip-compressed).
//!
//! Layout: a 4-byte magic `00 00 <type> <ndims>`, `ndims` big-endian u32 sizes, then the
//! values in row-major order. convpress reads unsigned-byte files (type `0x08`), which is what
//! MNIST and Fashion-MNIST use.

use super::DataError;
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::Path;

/// One decoded IDX file: its dimensions and its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file, decompressing it first if it starts with the gzip magic.
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::corrupt(path, format!("gzip stream is damaged: {e}")))?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|why| DataError::corrupt(path, why))
}

/// Parses IDX bytes; the error says what is wrong, without the file name.
pub fn parse_idx(bytes: &[u8]) -> Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!("truncated: {} bytes, no IDX header", bytes.len()));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!(
            "bad magic {:02x} {:02x} {:02x} {:02x}: not an IDX file",
            bytes[0], bytes[1], bytes[2], bytes[3]
        ));
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
            bytes[2]
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims == 0 {
        return Err("bad magic: zero dimensions".into());
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(format!(
            "truncated header: {ndims} dimensions need {header} bytes"
        ));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("dimensions overflow")?;
    let have = bytes.len() - header;
    if have < count {
        return Err(format!(
            "truncated: dimensions {dims:?} need {count} bytes of data, file has {have}"
        ));
    }
    if have > count {
        return Err(format!(
            "{} trailing bytes after the {count} that dimensions {dims:?} describe",
            have - count
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Encodes bytes as an IDX unsigned-byte file (used by tests and by tools that write subsets).
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}
