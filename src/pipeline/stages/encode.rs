//! The `encode` stage: the compressed file (`compress::format`, Deep Compression sections
//! 2-4): each shared tensor as its codebook, Huffman-coded relative positions of its non-zero
//! entries and Huffman-coded cluster indices; every other tensor raw. It needs the codebooks
//! of a `share` stage.

use crate::compress::format::{self, StageBytes, TensorPayload};
use crate::pipeline::layers::{LayerRules, weighted_layers};
use crate::pipeline::recipe::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage, State, required};
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `convpress encode`'s index widths, and the `encode` stage's keys.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct EncodeParams {
    /// Bits of a relative position index in conv layers (longer gaps use escapes).
    #[arg(long, default_value_t = 8)]
    pub conv_gap_bits: u32,
    #[arg(long, default_value_t = 5)]
    pub fc_gap_bits: u32,
}

impl Default for EncodeParams {
    fn default() -> Self {
        recipe::clap_defaults()
    }
}

/// A per-layer override: `"layers.5" = { gap-bits = 4 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LayerGapBits {
    pub gap_bits: u32,
}

pub struct Encode {
    pub params: EncodeParams,
    pub layers: LayerRules<LayerGapBits>,
    /// Where the file goes (default: `model.cpz` in the stage's folder).
    pub out: Option<PathBuf>,
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, recipe::Error> {
    Ok(Box::new(Encode {
        params: t.params()?,
        layers: t.layers()?,
        out: None,
    }))
}

/// Refuses a gap width outside 2..=16 bits; `flag` names the setting as the user wrote it.
pub fn check_gap_bits(flag: &str, bits: u32) -> Result<(), String> {
    if (2..=16).contains(&bits) {
        Ok(())
    } else {
        Err(format!("{flag} must be between 2 and 16, got {bits}"))
    }
}

impl Encode {
    /// Gap bits of every weighted layer, by weight tensor path.
    fn gap_bits(&self, arch: &crate::models::Arch) -> Result<BTreeMap<String, u32>, String> {
        check_gap_bits("conv-gap-bits", self.params.conv_gap_bits)?;
        check_gap_bits("fc-gap-bits", self.params.fc_gap_bits)?;
        let layers = weighted_layers(arch);
        let paths: Vec<String> = layers.iter().map(|(p, _)| p.clone()).collect();
        let over = self.layers.resolve(&paths)?;
        let mut out = BTreeMap::new();
        for (path, kind) in layers {
            let bits = match over.get(&path) {
                Some(o) => o.gap_bits,
                None if kind == "conv" => self.params.conv_gap_bits,
                None => self.params.fc_gap_bits,
            };
            check_gap_bits(&path, bits)?;
            out.insert(format!("{path}.weight"), bits);
        }
        Ok(out)
    }
}

impl Stage for Encode {
    fn kind(&self) -> &'static str {
        "encode"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "params": self.params, "layers": self.layers })
    }

    fn plan(&self, before: &Plan, _cx: &Context) -> Result<Plan, String> {
        before.not_encoded()?;
        if !before.state.contains(&State::Codebooks) {
            return Err(
                "encode writes shared weights, and no earlier stage shared them: add a share stage before it".into(),
            );
        }
        self.gap_bits(before.arch()?)?;
        Ok(before.clone().with(State::Encoded))
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let input = required(input, self.kind())?;
        let gaps = self.gap_bits(input.arch()).map_err(anyhow::Error::msg)?;
        let books = &input.constraints.codebooks;
        let mut names: Vec<&String> = input.loaded.tensors.keys().collect();
        names.sort();
        let mut payloads = Vec::new();
        for name in names {
            let (values, shape) = crate::checkpoint::floats(&input.loaded.tensors, name)
                .map_err(anyhow::Error::msg)?;
            let payload = match (books.get(name), gaps.get(name)) {
                (Some(book), Some(&gap_bits)) => TensorPayload::Shared {
                    centroids: book.centroids.clone(),
                    assignment: book.assignment.clone(),
                    bits: book.bits(),
                    gap_bits,
                },
                _ => TensorPayload::Raw(values),
            };
            payloads.push((name.clone(), shape, payload));
        }
        let (bytes, stages) =
            format::encode(input.arch(), input.meta(), payloads).map_err(anyhow::Error::msg)?;
        let out = self.out.clone().unwrap_or_else(|| cx.dir.join("model.cpz"));
        crate::atomic_file::write_atomic(&out, &bytes)
            .with_context(|| format!("cannot write {}", out.display()))?;
        let mut model = Model::open(&out)?;
        // The decoded weights obey the codebooks still; a later eval stage may check them.
        model.constraints = input.constraints.clone();
        let file_bytes = std::fs::metadata(&out)?.len();
        let details = serde_json::json!({
            "file_bytes": file_bytes,
            "dense_bytes": stages.iter().map(|s| s.dense).sum::<usize>(),
            "stages": stages,
        });
        Ok(Outcome {
            model,
            details,
            curve: vec![],
        })
    }
}

/// The per-tensor bytes of each compression step (dense f32, sparse, + shared, + Huffman)
/// and the file's real ratio against dense f32.
pub fn stage_table(stages: &[StageBytes], file_bytes: usize, file: &Path) -> String {
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
