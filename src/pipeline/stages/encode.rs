//! The `encode` stage: the compressed file (`compress::format`, Deep Compression sections
//! 2-4): each shared tensor as its codebook, Huffman-coded relative positions of its non-zero
//! entries and Huffman-coded cluster indices; every other tensor raw. It needs the codebooks
//! of a `share` stage.

use crate::compress::format::{self, StageBytes, TensorPayload, stage_table};
use crate::pipeline::layers::{LayerRules, per_weight};
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Context, Model, Outcome, Plan, Stage, State, required};
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
        table::clap_defaults()
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

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
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
        let defaults = (self.params.conv_gap_bits, self.params.fc_gap_bits);
        per_weight(arch, &self.layers, defaults, |o| o.gap_bits, check_gap_bits)
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
        let (bytes, stages) = format::encode(input.arch(), input.meta(), payloads, None)
            .map_err(anyhow::Error::msg)?;
        let out = self.out.clone().unwrap_or_else(|| cx.dir.join("model.cpz"));
        crate::atomic_file::write_atomic(&out, &bytes)?;
        let mut model = Model::open(&out)?;
        // The decoded weights obey the codebooks still; a later eval stage may check them.
        model.constraints = input.constraints.clone();
        let file_bytes = fs_err::metadata(&out)?.len();
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

/// Where `convpress encode` writes: `out` (default: the checkpoint with `.cpz`) and
/// `<out>.report.json`, the fine-tuning in `run_dir` (default `<out>.finetune/`); `force`
/// replaces what is there.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    pub out: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub force: bool,
}

/// `convpress encode`: the `share` stage, `finetune` of the centroids if asked, then this
/// stage, writing [`Outputs`]; prints the bytes of each step and the accuracy before and
/// after (decoded from the file), if the data is there.
pub fn command(
    checkpoint: &Path,
    outputs: Outputs,
    share: super::share::ShareParams,
    params: EncodeParams,
    finetune: Option<super::finetune::FinetuneParams>,
    cx: Context,
) -> anyhow::Result<()> {
    use super::finetune::Finetune;
    use super::share::{Share, check_bits};
    use crate::run_folder::{Reuse, RunFolder, claim_output};
    let Outputs {
        out,
        run_dir,
        force,
    } = outputs;
    // Impossible settings are refused before the checkpoint is read.
    for (flag, v) in [
        ("--conv-bits", share.conv_bits),
        ("--fc-bits", share.fc_bits),
    ] {
        check_bits(flag, v).map_err(anyhow::Error::msg)?;
    }
    for (flag, v) in [
        ("--conv-gap-bits", params.conv_gap_bits),
        ("--fc-gap-bits", params.fc_gap_bits),
    ] {
        check_gap_bits(flag, v).map_err(anyhow::Error::msg)?;
    }
    let out = out.unwrap_or_else(|| checkpoint.with_extension("cpz"));
    let report_path = out.with_extension("report.json");
    claim_output(&out, &[checkpoint], force, "--out")?;
    claim_output(&report_path, &[checkpoint], force, "--out")?;
    let source = Model::open(checkpoint)?;
    if finetune.is_none() && run_dir.is_some() {
        anyhow::bail!(
            "--run-dir is the folder of the centroid fine-tuning: it needs --finetune-epochs"
        );
    }
    if let Some(params) = &finetune {
        // Fine-tuning needs the data: it is read and checked before anything is written.
        let plan = Plan::of(&source).with(State::Codebooks);
        Finetune {
            params: params.clone(),
        }
        .plan(&plan, &cx)
        .map_err(anyhow::Error::msg)?;
        crate::pipeline::measure::test_set(&source, &cx.data_dir_for(source.meta()), None)?;
    }
    let work = run_dir.unwrap_or_else(|| out.with_extension("finetune"));
    let _work = finetune
        .as_ref()
        .map(|_| {
            RunFolder::open(
                &work,
                Reuse::from_flags(false, force),
                "--run-dir",
                false,
                &[checkpoint],
            )
        })
        .transpose()?;
    // Without fine-tuning the shared model is only a step on the way: it goes to a scratch
    // folder that is removed at the end.
    let scratch = std::env::temp_dir().join(format!("convpress-encode-{}", std::process::id()));
    let staged = crate::atomic_file::tmp_sibling(&out);
    let share_dir = match &finetune {
        Some(f) => {
            eprintln!(
                "fine-tuning the shared weights for {} epochs, run folder {}",
                f.epochs,
                work.display()
            );
            work.join("shared")
        }
        None => scratch.clone(),
    };
    fs_err::create_dir_all(&share_dir)?;
    let cx = Context {
        dir: share_dir,
        ..cx
    };
    let result = (|| -> anyhow::Result<Outcome> {
        let share = Share {
            params: share,
            layers: Default::default(),
        };
        let mut model = share.run(Some(source.clone()), &cx)?.model;
        if let Some(params) = finetune.clone() {
            let tune_cx = Context {
                dir: work.clone(),
                ..cx.clone()
            };
            model = Finetune { params }.run(Some(model), &tune_cx)?.model;
        }
        let stage = Encode {
            params,
            layers: Default::default(),
            out: Some(staged.clone()),
        };
        let encoded = stage.run(Some(model), &cx)?;
        // Published under its name only now, whole; never over a file that appeared since.
        crate::atomic_file::publish(&staged, &out, force)?;
        Ok(encoded)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_file(&staged);
    let encoded = result?;
    let d = &encoded.details;
    let file_bytes = d["file_bytes"].as_u64().unwrap_or(0) as usize;
    crate::atomic_file::write_new(
        &report_path,
        serde_json::to_string_pretty(&serde_json::json!({
            "checkpoint": checkpoint,
            "file": out,
            "file_bytes": file_bytes,
            "dense_bytes": d["dense_bytes"],
            "stages": d["stages"],
            "finetune_epochs": finetune.map_or(0, |f| f.epochs),
        }))?
        .as_bytes(),
        force,
    )?;
    let stages: Vec<StageBytes> = serde_json::from_value(d["stages"].clone())?;
    println!("{}", stage_table(&stages, file_bytes, &out));
    // The decoded file is the model that counts: evaluate it, and the source, if data is here.
    // The data is read once for both.
    let dir = cx.data_dir_for(source.meta());
    let test = match crate::data::load(source.meta().dataset, &dir) {
        Ok(splits) => source.meta().preprocess.try_apply(&splits.test)?,
        Err(e) => {
            println!("(not evaluated: {e})");
            return Ok(());
        }
    };
    let acc = |file: &Path| -> anyhow::Result<f64> {
        let (network, _) = crate::checkpoint::load(file, &cx.device)?;
        Ok(crate::train::evaluate(&network, &test, 256, &cx.device).1)
    };
    println!(
        "test accuracy: {:.2}% before encoding, {:.2}% decoded from {}",
        100.0 * acc(checkpoint)?,
        100.0 * acc(&out)?,
        out.display()
    );
    Ok(())
}
