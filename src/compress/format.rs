//! The compressed model file (`.cpz`): a pruned, weight-shared model with Huffman-coded
//! indices, which decodes to exactly the model that was evaluated.
//!
//! Byte layout, version 1 (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `CVPZ` |
//! | 4 | 2 | format version (1) |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 8 | `body_len`: bytes of the body |
//! | 16 | `body_len` | body |
//! | 16 + `body_len` | 4 | CRC-32 (IEEE) of every byte before it |
//!
//! Body: a u32 length and a UTF-8 JSON header (`arch`, `meta`, and one entry per tensor in
//! file order: path, shape, encoding and section sizes), then each tensor's section:
//! - `raw`: the values as f32.
//! - `shared` (Deep Compression, sections 2-4): `2^bits` f32 centroids; `2^bits` code lengths
//!   (u8) of the Huffman code of cluster indices; `2^gap_bits` code lengths of the code of
//!   position gaps; the gap stream; the index stream. Walking the tensor in storage order,
//!   each non-zero entry is preceded by its gap (zeros skipped since the previous entry). A
//!   gap of `2^gap_bits - 1` or more is written as escape symbols (`2^gap_bits - 1`, each
//!   skipping that many zeros with no entry) followed by the remainder; the paper writes
//!   filler zero entries instead, which costs an index as well.
//!
//!
//! Version 2 adds quantized models (issue #12): the header gains `quant`, each quantized layer's
//! bits and input quantizer, and a tensor may be stored
//! - `quantized`: one f32 step per output channel (`axis` of the shape), then the codes as
//!   two's complement `bits`-bit fields, packed little-endian from the lowest bit. Dense, every
//!   entry's code; or, with `gaps`, only the non-zero codes, after the code lengths and the
//!   Huffman-coded stream of their position gaps as in `shared` (a pruned model stays sparse).
//!
//! Version 3 adds binarized models (issue #13): a quantized tensor of `bits` 1 holds binary
//! weights, one bit each, a set bit for −1 and a clear one for +1 (there is no 0, so no
//! `gaps`), and a layer may take its input as its signs (`sign_input`, XNOR-Net) or keep it in
//! float (`float_input`, BWN and TWN on the table-lookup kernels). Ternary weights are 2-bit
//! codes in {−1, 0, +1}, with `gaps` where that is smaller.
//!
//! A file is written at the oldest version that holds it: with no quantized tensor as version
//! 1, byte for byte as before; with no 1-bit tensor, no binary input and no float input to a
//! bit layer as version 2.
//!
//! The reader checks the magic, version, length and checksum before it parses anything, and
//! bounds every count by the architecture and the bytes present (the values of all tensors
//! together by the architecture's parameters and batch-norm statistics), so a damaged file is
//! refused with a message, never a panic or a huge allocation. `fuzz/` fuzzes it.

use super::huffman;
use super::quantize::{QuantSpec, check_weight_bits, max_code};
use crate::checkpoint::{Loaded, ModelMeta};
use crate::models::Arch;
use burn::tensor::{DType, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub const MAGIC: &[u8; 4] = b"CVPZ";
/// The newest version this convpress writes and reads; it reads version 1 too.
pub const VERSION: u16 = 3;
/// Largest model the reader accepts: 1 GiB of f32 values (parameters plus batch-norm
/// statistics).
pub const MAX_PARAMS: usize = 1 << 28;

/// How one tensor is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "encoding", rename_all = "lowercase")]
pub enum Encoding {
    Raw,
    Shared {
        bits: u32,
        gap_bits: u32,
        nnz: usize,
        gap_symbols: usize,
        gap_stream_bits: u64,
        index_stream_bits: u64,
    },
    Quantized {
        bits: u32,
        /// The output-channel axis of the shape (0 for a conv weight, 1 for Burn's linear
        /// `[in, out]`): one step per entry of it.
        axis: usize,
        /// Codes stored: the non-zero ones with `gaps`, all of them without.
        nnz: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gaps: Option<Gaps>,
    },
}

/// The Huffman-coded positions of a sparse quantized tensor's non-zero codes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gaps {
    pub gap_bits: u32,
    pub gap_symbols: usize,
    pub gap_stream_bits: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub path: String,
    pub shape: Vec<usize>,
    #[serde(flatten)]
    pub encoding: Encoding,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    arch: Arch,
    meta: ModelMeta,
    tensors: Vec<TensorEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quant: Option<QuantSpec>,
}

/// One tensor to write: raw values, or a codebook and its assignment (`None` = pruned).
pub enum TensorPayload {
    Raw(Vec<f32>),
    Shared {
        centroids: Vec<f32>,
        assignment: Vec<Option<u16>>,
        bits: u32,
        gap_bits: u32,
    },
    /// Weight codes on per-channel steps `scales` along `axis`.
    Quantized {
        codes: Vec<i8>,
        scales: Vec<f32>,
        axis: usize,
        bits: u32,
    },
}

/// Bytes of each stage of one tensor's compression, for the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageBytes {
    pub path: String,
    pub numel: usize,
    pub nnz: usize,
    /// f32, every entry.
    pub dense: usize,
    /// f32 values of the non-zeros plus fixed-width relative indices.
    pub sparse: usize,
    /// Fixed-width cluster indices plus relative indices, plus the codebook.
    pub shared: usize,
    /// What the file really spends on the tensor (Huffman-coded streams, tables, codebook).
    pub huffman: usize,
}

impl TensorEntry {
    /// Bytes of each stage for a tensor of `numel` entries stored as this entry says (raw
    /// tensors: `nnz` is not known from the entry and is reported as `numel`).
    pub fn stage_bytes(&self, numel: usize) -> StageBytes {
        match self.encoding {
            Encoding::Raw => StageBytes {
                path: self.path.clone(),
                numel,
                nnz: numel,
                dense: 4 * numel,
                sparse: 4 * numel,
                shared: 4 * numel,
                huffman: 4 * numel,
            },
            Encoding::Shared {
                bits,
                gap_bits,
                nnz,
                gap_symbols,
                gap_stream_bits,
                index_stream_bits,
            } => {
                let k = 1usize << bits;
                let fillers = gap_symbols - nnz;
                StageBytes {
                    path: self.path.clone(),
                    numel,
                    nnz,
                    dense: 4 * numel,
                    // f32 values, fixed-width gaps, and a zero value per filler.
                    sparse: (nnz * 32 + gap_symbols * gap_bits as usize + fillers * 32).div_ceil(8),
                    shared: (gap_symbols * (bits + gap_bits) as usize).div_ceil(8) + 4 * k,
                    // Codebook, the two code-length tables, the two streams.
                    huffman: 4 * k
                        + k
                        + (1 << gap_bits)
                        + gap_stream_bits.div_ceil(8) as usize
                        + index_stream_bits.div_ceil(8) as usize,
                }
            }
            Encoding::Quantized {
                bits,
                axis,
                nnz,
                gaps,
            } => {
                let channels = self.shape.get(axis).copied().unwrap_or(0);
                let codes = (nnz * bits as usize).div_ceil(8);
                let (positions, fixed) = match gaps {
                    Some(g) => (
                        (1 << g.gap_bits) + g.gap_stream_bits.div_ceil(8) as usize,
                        (g.gap_symbols * g.gap_bits as usize).div_ceil(8),
                    ),
                    None => (0, 0),
                };
                StageBytes {
                    path: self.path.clone(),
                    numel,
                    nnz,
                    dense: 4 * numel,
                    // f32 values of the non-zeros with fixed-width gaps (dense: all values).
                    sparse: if gaps.is_some() {
                        4 * nnz + fixed
                    } else {
                        4 * numel
                    },
                    // The codes at their width with fixed-width gaps, and the steps.
                    shared: codes + fixed + 4 * channels,
                    // What the file spends: steps, gap table and stream, packed codes.
                    huffman: 4 * channels + positions + codes,
                }
            }
        }
    }
}

/// Packs `codes` as two's complement `bits`-bit fields, lowest bit first; 1-bit codes (±1) as
/// their sign bit.
fn pack_codes(codes: impl Iterator<Item = i8>, bits: u32, out: &mut Vec<u8>) {
    let (mut acc, mut held) = (0u64, 0u32);
    let mask = (1u64 << bits) - 1;
    for c in codes {
        let field = if bits == 1 {
            (c < 0) as u64
        } else {
            c as i64 as u64 & mask
        };
        acc |= field << held;
        held += bits;
        while held >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            held -= 8;
        }
    }
    if held > 0 {
        out.push(acc as u8);
    }
}

/// The `n` codes of [`pack_codes`], sign-extended (1-bit fields: 1 is −1, 0 is +1).
fn unpack_codes(bytes: &[u8], n: usize, bits: u32) -> Vec<i32> {
    let mut out = Vec::with_capacity(n);
    let (mut acc, mut held, mut next) = (0u64, 0u32, 0usize);
    let shift = 64 - bits;
    while out.len() < n {
        while held < bits {
            acc |= (bytes[next] as u64) << held;
            next += 1;
            held += 8;
        }
        let code = (((acc << shift) as i64) >> shift) as i32;
        out.push(if bits == 1 { 1 + 2 * code } else { code });
        acc >>= bits;
        held -= bits;
    }
    out
}

/// How each tensor of a model file is stored (its header entries, bits included). The file
/// is fully decoded first, so a damaged one is refused.
pub fn entries(bytes: &[u8]) -> Result<Vec<TensorEntry>, String> {
    decode(bytes)?;
    Ok(header_of_decoded(bytes)?.tensors)
}

/// The JSON header of a file that [`decode`] has accepted.
fn header_of_decoded(bytes: &[u8]) -> Result<Header, String> {
    let hlen = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")) as usize;
    serde_json::from_slice(&bytes[20..20 + hlen]).map_err(|e| e.to_string())
}

/// Bytes of each compression stage per tensor of a model file, read back from the file (what
/// `convpress info` shows). The file is fully decoded first, so a damaged one is refused.
pub fn stages(bytes: &[u8]) -> Result<Vec<StageBytes>, String> {
    let loaded = decode(bytes)?;
    let header = header_of_decoded(bytes)?;
    Ok(header
        .tensors
        .iter()
        .map(|t| {
            let data = &loaded.tensors[&t.path].0;
            let mut s = t.stage_bytes(data.num_elements());
            if t.encoding == Encoding::Raw {
                s.nnz = data
                    .as_slice::<f32>()
                    .map_or(s.numel, |v| v.iter().filter(|&&x| x != 0.0).count());
            }
            s
        })
        .collect())
}

/// The per-tensor bytes of each compression step (dense f32, sparse, + shared, + Huffman)
/// and the file's real ratio against dense f32.
pub fn stage_table(stages: &[StageBytes], file_bytes: usize, file: &std::path::Path) -> String {
    let mut o = format!(
        "{:<22} {:>9} {:>8} {:>7} {:>11} {:>11} {:>11} {:>11}\n",
        "tensor", "weights", "kept", "kept %", "dense B", "sparse B", "+shared B", "+huffman B"
    );
    let (mut d, mut sp, mut sh, mut hu) = (0, 0, 0, 0);
    for s in stages {
        o.push_str(&format!(
            "{:<22} {:>9} {:>8} {:>6.2}% {:>11} {:>11} {:>11} {:>11}\n",
            s.path,
            s.numel,
            s.nnz,
            100.0 * s.nnz as f64 / s.numel.max(1) as f64,
            s.dense,
            s.sparse,
            s.shared,
            s.huffman
        ));
        d += s.dense;
        sp += s.sparse;
        sh += s.shared;
        hu += s.huffman;
    }
    o.push_str(&format!(
        "{:<22} {:>9} {:>8} {:>7} {:>11} {:>11} {:>11} {:>11}\n",
        "total", "", "", "", d, sp, sh, hu
    ));
    o.push_str(&format!(
        "{}: {} bytes on disk (header, tables and checksum included); dense f32 {} bytes: {:.1}x smaller",
        file.display(),
        file_bytes,
        d,
        d as f64 / file_bytes as f64
    ));
    o
}

fn gap_symbols(assignment: &[Option<u16>], gap_bits: u32) -> (Vec<u32>, Vec<u32>) {
    let esc = (1u32 << gap_bits) - 1;
    let (mut gaps, mut indices) = (Vec::new(), Vec::new());
    let mut run = 0u64;
    for a in assignment {
        match a {
            None => run += 1,
            Some(k) => {
                while run >= esc as u64 {
                    gaps.push(esc);
                    run -= esc as u64;
                }
                gaps.push(run as u32);
                indices.push(*k as u32);
                run = 0;
            }
        }
    }
    (gaps, indices)
}

fn freqs(symbols: &[u32], alphabet: usize) -> Vec<u64> {
    let mut f = vec![0u64; alphabet];
    for &s in symbols {
        f[s as usize] += 1;
    }
    f
}

/// Writes a model file: `tensors` in the order given, each with its path and shape, and for a
/// quantized model the spec of its layers (whose weights must be `Quantized` payloads).
pub fn encode(
    arch: &Arch,
    meta: &ModelMeta,
    tensors: Vec<(String, Vec<usize>, TensorPayload)>,
    quant: Option<&QuantSpec>,
) -> Result<(Vec<u8>, Vec<StageBytes>), String> {
    let mut entries = Vec::new();
    let mut sections: Vec<Vec<u8>> = Vec::new();
    let mut stages = Vec::new();
    for (path, shape, payload) in tensors {
        let numel: usize = shape.iter().product();
        let mut sec = Vec::new();
        match payload {
            TensorPayload::Raw(v) => {
                if v.len() != numel {
                    return Err(format!("{path}: {} values for shape {shape:?}", v.len()));
                }
                for x in &v {
                    sec.extend_from_slice(&x.to_le_bytes());
                }
                stages.push(StageBytes {
                    path: path.clone(),
                    numel,
                    nnz: v.iter().filter(|&&x| x != 0.0).count(),
                    dense: 4 * numel,
                    sparse: 4 * numel,
                    shared: 4 * numel,
                    huffman: sec.len(),
                });
                entries.push(TensorEntry {
                    path,
                    shape,
                    encoding: Encoding::Raw,
                });
            }
            TensorPayload::Shared {
                centroids,
                assignment,
                bits,
                gap_bits,
            } => {
                if !(1..=16).contains(&bits) || !(2..=16).contains(&gap_bits) {
                    return Err(format!(
                        "{path}: bits {bits} / gap bits {gap_bits} out of range"
                    ));
                }
                let k = 1usize << bits;
                if centroids.len() != k || assignment.len() != numel {
                    return Err(format!("{path}: codebook or assignment does not fit"));
                }
                if assignment.iter().flatten().any(|&a| a as usize >= k) {
                    return Err(format!("{path}: cluster index out of range"));
                }
                let (gaps, indices) = gap_symbols(&assignment, gap_bits);
                let gap_lens = huffman::code_lengths(&freqs(&gaps, 1 << gap_bits));
                let idx_lens = huffman::code_lengths(&freqs(&indices, k));
                let (gap_stream, gap_bits_used) = huffman::encode(&gaps, &gap_lens)?;
                let (idx_stream, idx_bits_used) = huffman::encode(&indices, &idx_lens)?;
                for c in &centroids {
                    sec.extend_from_slice(&c.to_le_bytes());
                }
                sec.extend_from_slice(&idx_lens);
                sec.extend_from_slice(&gap_lens);
                sec.extend_from_slice(&gap_stream);
                sec.extend_from_slice(&idx_stream);
                let entry = TensorEntry {
                    path,
                    shape,
                    encoding: Encoding::Shared {
                        bits,
                        gap_bits,
                        nnz: indices.len(),
                        gap_symbols: gaps.len(),
                        gap_stream_bits: gap_bits_used,
                        index_stream_bits: idx_bits_used,
                    },
                };
                let stage = entry.stage_bytes(numel);
                debug_assert_eq!(stage.huffman, sec.len());
                stages.push(stage);
                entries.push(entry);
            }
            TensorPayload::Quantized {
                codes,
                scales,
                axis,
                bits,
            } => {
                check_weight_bits(&path, bits)?;
                let channels = *shape
                    .get(axis)
                    .ok_or_else(|| format!("{path}: no axis {axis} in shape {shape:?}"))?;
                if codes.len() != numel || scales.len() != channels {
                    return Err(format!("{path}: codes or steps do not fit shape {shape:?}"));
                }
                let hi = max_code(bits);
                if codes.iter().any(|&c| (c as i32).abs() > hi) {
                    return Err(format!("{path}: a code outside ±{hi}"));
                }
                if bits == 1 && codes.contains(&0) {
                    return Err(format!("{path}: a 1-bit (binary) weight code of 0"));
                }
                for s in &scales {
                    sec.extend_from_slice(&s.to_le_bytes());
                }
                let nnz = codes.iter().filter(|&&c| c != 0).count();
                // Dense codes, or the non-zero ones with their gaps at whichever gap width
                // makes the smallest section.
                let code_bytes = |n: usize| (n * bits as usize).div_ceil(8);
                let mut best: Option<(usize, Gaps, Vec<u8>, Vec<u8>)> = None;
                if nnz > 0 && nnz < numel {
                    let present: Vec<Option<u16>> =
                        codes.iter().map(|&c| (c != 0).then_some(0)).collect();
                    for gap_bits in 2..=8 {
                        let (gaps, _) = gap_symbols(&present, gap_bits);
                        let lens = huffman::code_lengths(&freqs(&gaps, 1 << gap_bits));
                        let (stream, used) = huffman::encode(&gaps, &lens)?;
                        let total = lens.len() + stream.len() + code_bytes(nnz);
                        if total < best.as_ref().map_or(code_bytes(numel), |b| b.0) {
                            let g = Gaps {
                                gap_bits,
                                gap_symbols: gaps.len(),
                                gap_stream_bits: used,
                            };
                            best = Some((total, g, lens, stream));
                        }
                    }
                }
                let gaps = match best {
                    Some((_, g, lens, stream)) => {
                        sec.extend_from_slice(&lens);
                        sec.extend_from_slice(&stream);
                        pack_codes(codes.iter().copied().filter(|&c| c != 0), bits, &mut sec);
                        Some(g)
                    }
                    None => {
                        pack_codes(codes.iter().copied(), bits, &mut sec);
                        None
                    }
                };
                let entry = TensorEntry {
                    path,
                    shape,
                    encoding: Encoding::Quantized {
                        bits,
                        axis,
                        nnz: if gaps.is_some() { nnz } else { numel },
                        gaps,
                    },
                };
                let stage = entry.stage_bytes(numel);
                debug_assert_eq!(stage.huffman, sec.len());
                stages.push(stage);
                entries.push(entry);
            }
        }
        sections.push(sec);
    }
    let quantized = entries
        .iter()
        .any(|e| matches!(e.encoding, Encoding::Quantized { .. }));
    if quantized != quant.is_some() {
        return Err("quantized tensors need the quantization spec, and it needs them".into());
    }
    let binary = entries
        .iter()
        .any(|e| matches!(e.encoding, Encoding::Quantized { bits: 1, .. }))
        || quant.is_some_and(|q| q.layers.values().any(|l| l.sign_input || l.float_input));
    let version: u16 = match (quantized, binary) {
        (_, true) => 3,
        (true, false) => 2,
        (false, false) => 1,
    };
    let header = serde_json::to_vec(&Header {
        arch: arch.clone(),
        meta: meta.clone(),
        tensors: entries,
        quant: quant.cloned(),
    })
    .map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    body.extend_from_slice(&(header.len() as u32).to_le_bytes());
    body.extend_from_slice(&header);
    for s in sections {
        body.extend_from_slice(&s);
    }
    let mut out = Vec::with_capacity(body.len() + 20);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok((out, stages))
}

/// Writes a quantized model (`model.quant` set): each quantized layer's weight as its codes and
/// steps, every other tensor raw.
pub fn encode_quantized(model: &Loaded) -> Result<(Vec<u8>, Vec<StageBytes>), String> {
    let spec = model.quant.as_ref().ok_or("the model is not quantized")?;
    let mut names: Vec<&String> = model.tensors.keys().collect();
    names.sort();
    let mut payloads = Vec::new();
    for name in names {
        let (values, shape) = crate::checkpoint::floats(&model.tensors, name)?;
        let layer = name
            .strip_suffix(".weight")
            .and_then(|l| spec.layers.get(l));
        let payload = match layer {
            Some(l) => {
                let channel_last = shape.len() == 2;
                TensorPayload::Quantized {
                    codes: l.codes(&values, channel_last),
                    scales: l.weight_scales.clone(),
                    axis: if channel_last { 1 } else { 0 },
                    bits: l.bits,
                }
            }
            None => TensorPayload::Raw(values),
        };
        payloads.push((name.clone(), shape, payload));
    }
    encode(&model.arch, &model.meta, payloads, Some(spec))
}

/// A bounds-checked reader over the body.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("truncated: {what} needs {n} bytes"))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// True if `bytes` start like a compressed model file.
pub fn is_compressed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Decodes a model file into its architecture, metadata and dense tensors.
pub fn decode(bytes: &[u8]) -> Result<Loaded, String> {
    if bytes.len() < 20 || !is_compressed(bytes) {
        return Err("not a convpress compressed model (bad magic or too short)".into());
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if !(1..=VERSION).contains(&version) {
        return Err(format!(
            "format version {version}, this convpress reads 1 to {VERSION}"
        ));
    }
    let body_len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if body_len.checked_add(20) != Some(bytes.len() as u64) {
        return Err(format!(
            "truncated or padded: header says {} bytes, file has {}",
            body_len.saturating_add(20),
            bytes.len()
        ));
    }
    let (content, tail) = bytes.split_at(bytes.len() - 4);
    let want = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
    if crc32fast::hash(content) != want {
        return Err("checksum mismatch: the file is damaged".into());
    }
    let mut c = Cursor {
        bytes: &content[16..],
        pos: 0,
    };
    let hlen = u32::from_le_bytes(c.take(4, "header length")?.try_into().expect("4"));
    let mut header: Header = serde_json::from_slice(c.take(hlen as usize, "header")?)
        .map_err(|e| format!("header is damaged: {e}"))?;
    if version < 2 && header.quant.is_some() {
        return Err("a version-1 file cannot hold a quantized model".into());
    }
    if version < 3
        && header
            .quant
            .as_ref()
            .is_some_and(|q| q.layers.values().any(|l| l.sign_input || l.float_input))
    {
        return Err(format!(
            "a version-{version} file cannot hold binary activations or float inputs to bit layers"
        ));
    }
    let mut steps_of: HashMap<String, (u32, Vec<f32>)> = HashMap::new();
    header
        .arch
        .validate()
        .map_err(|e| format!("architecture is inconsistent: {e}"))?;
    // The values of all tensors together are bounded by the architecture (its parameters
    // plus the running mean and variance of each batch norm), and that by MAX_PARAMS, so no
    // header can ask for more memory than the model it describes needs, nor for more than
    // MAX_PARAMS values.
    let stats = header.arch.layer_stats();
    let limit = stats.iter().fold(0usize, |a, s| {
        let bn_stats = if s.kind == "batch_norm" { s.params } else { 0 };
        a.saturating_add(s.params).saturating_add(bn_stats)
    });
    if limit > MAX_PARAMS {
        return Err(format!(
            "the architecture needs {limit} values, more than the {MAX_PARAMS} this reader accepts"
        ));
    }
    let mut left = limit;
    let mut tensors = HashMap::new();
    for t in &header.tensors {
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= left)
            .ok_or_else(|| {
                format!(
                    "{}: shape {:?} does not fit the architecture ({left} of its {limit} values left)",
                    t.path, t.shape
                )
            })?;
        left -= numel;
        let values = match &t.encoding {
            Encoding::Raw => f32s(c.take(4 * numel, &t.path)?),
            &Encoding::Shared {
                bits,
                gap_bits,
                nnz,
                gap_symbols,
                gap_stream_bits,
                index_stream_bits,
            } => {
                if !(1..=16).contains(&bits) || !(2..=16).contains(&gap_bits) {
                    return Err(format!("{}: bits out of range", t.path));
                }
                if nnz > numel || gap_symbols < nnz || gap_symbols > numel + nnz {
                    return Err(format!("{}: entry counts do not fit the shape", t.path));
                }
                let k = 1usize << bits;
                let centroids = f32s(c.take(4 * k, &t.path)?);
                let idx_lens = c.take(k, &t.path)?.to_vec();
                let gap_lens = c.take(1 << gap_bits, &t.path)?.to_vec();
                let gb = gap_stream_bits.div_ceil(8) as usize;
                let gap_stream = c.take(gb, &t.path)?;
                let ib = index_stream_bits.div_ceil(8) as usize;
                let idx_stream = c.take(ib, &t.path)?;
                let gaps = huffman::decode(gap_stream, gap_stream_bits, gap_symbols, &gap_lens)
                    .map_err(|e| format!("{}: gap stream: {e}", t.path))?;
                let idx = huffman::decode(idx_stream, index_stream_bits, nnz, &idx_lens)
                    .map_err(|e| format!("{}: index stream: {e}", t.path))?;
                let esc = (1u32 << gap_bits) - 1;
                let mut out = vec![0f32; numel];
                let (mut pos, mut next) = (0usize, 0usize);
                for g in gaps {
                    pos += g as usize;
                    if g == esc {
                        continue;
                    }
                    let k = *idx
                        .get(next)
                        .ok_or_else(|| format!("{}: index stream too short", t.path))?;
                    let slot = out
                        .get_mut(pos)
                        .ok_or_else(|| format!("{}: an entry falls outside the tensor", t.path))?;
                    *slot = centroids[k as usize];
                    pos += 1;
                    next += 1;
                }
                if next != nnz {
                    return Err(format!(
                        "{}: {next} entries decoded, {nnz} expected",
                        t.path
                    ));
                }
                out
            }
            &Encoding::Quantized {
                bits,
                axis,
                nnz,
                gaps,
            } => {
                if version < 2 {
                    return Err(format!("{}: quantized tensor in a version-1 file", t.path));
                }
                check_weight_bits(&t.path, bits)?;
                if bits == 1 && (version < 3 || gaps.is_some()) {
                    return Err(format!(
                        "{}: 1-bit weights need version 3 and have no zeros to skip",
                        t.path
                    ));
                }
                // The output channel is the first axis of a conv weight and the last of a
                // linear one (Burn's `[in, out]`); an empty tensor is no layer's weight.
                let want_axis = usize::from(t.shape.len() == 2);
                if axis != want_axis || numel == 0 {
                    return Err(format!(
                        "{}: quantized along axis {axis} of shape {:?}",
                        t.path, t.shape
                    ));
                }
                // Every dimension is at most `numel` here, so no product below overflows.
                let channels = t.shape[axis];
                let scales = f32s(c.take(4 * channels, &t.path)?);
                if scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                    return Err(format!("{}: a step is not a positive number", t.path));
                }
                let positions = match gaps {
                    None if nnz == numel => None,
                    None => return Err(format!("{}: dense codes but {nnz} of {numel}", t.path)),
                    Some(g) => {
                        if !(2..=16).contains(&g.gap_bits)
                            || nnz > numel
                            || g.gap_symbols < nnz
                            || g.gap_symbols > numel + nnz
                        {
                            return Err(format!("{}: entry counts do not fit the shape", t.path));
                        }
                        let lens = c.take(1 << g.gap_bits, &t.path)?.to_vec();
                        let stream = c.take(g.gap_stream_bits.div_ceil(8) as usize, &t.path)?;
                        let gaps = huffman::decode(stream, g.gap_stream_bits, g.gap_symbols, &lens)
                            .map_err(|e| format!("{}: gap stream: {e}", t.path))?;
                        Some((gaps, (1u32 << g.gap_bits) - 1))
                    }
                };
                let packed = c.take((nnz * bits as usize).div_ceil(8), &t.path)?;
                let codes = unpack_codes(packed, nnz, bits);
                let hi = max_code(bits);
                if codes.iter().any(|c| c.abs() > hi) {
                    return Err(format!("{}: a code outside ±{hi}", t.path));
                }
                let inner: usize = t.shape[axis + 1..].iter().product();
                let value = |i: usize, code: i32| code as f32 * scales[(i / inner) % channels];
                let mut out = vec![0f32; numel];
                match positions {
                    None => {
                        for (i, &code) in codes.iter().enumerate() {
                            out[i] = value(i, code);
                        }
                    }
                    Some((gaps, esc)) => {
                        let (mut pos, mut next) = (0usize, 0usize);
                        for g in gaps {
                            pos += g as usize;
                            if g == esc {
                                continue;
                            }
                            let &code = codes
                                .get(next)
                                .ok_or_else(|| format!("{}: more positions than codes", t.path))?;
                            if pos >= numel {
                                return Err(format!(
                                    "{}: an entry falls outside the tensor",
                                    t.path
                                ));
                            }
                            out[pos] = value(pos, code);
                            pos += 1;
                            next += 1;
                        }
                        if next != nnz {
                            return Err(format!(
                                "{}: {next} entries decoded, {nnz} expected",
                                t.path
                            ));
                        }
                    }
                }
                steps_of.insert(t.path.clone(), (bits, scales));
                out
            }
        };
        let data = TensorData::new(values, t.shape.clone()).convert_dtype(DType::F32);
        if tensors.insert(t.path.clone(), (data, None)).is_some() {
            return Err(format!("{} appears twice", t.path));
        }
    }
    if c.pos != c.bytes.len() {
        return Err(format!(
            "{} unexplained bytes after the last tensor",
            c.bytes.len() - c.pos
        ));
    }
    // Each quantized layer takes the steps of its weight, stored at its bits; no quantized
    // tensor is left over.
    if let Some(q) = &mut header.quant {
        for (layer, l) in q.layers.iter_mut() {
            let (bits, scales) = steps_of
                .remove(&format!("{layer}.weight"))
                .ok_or_else(|| format!("quantized layer {layer} has no quantized weight"))?;
            if bits != l.bits {
                return Err(format!(
                    "{layer}: weight stored at {bits} bits, header says {}",
                    l.bits
                ));
            }
            l.weight_scales = scales;
        }
    }
    if let Some(path) = steps_of.keys().next() {
        return Err(format!(
            "{path} is quantized but no quantized layer names it"
        ));
    }
    Ok(Loaded {
        arch: header.arch,
        meta: header.meta,
        tensors,
        quant: header.quant,
    })
}
