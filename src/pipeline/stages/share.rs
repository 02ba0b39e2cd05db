//! The `share` stage: k-means weight sharing of every conv and linear weight
//! (`compress::share`, Deep Compression section 3), `2^bits` shared values per layer. Pruned
//! weights are not clustered and stay zero; the codebooks become constraints that later
//! fine-tuning keeps (training the centroids only) and that `encode` writes.

use crate::checkpoint::floats;
use crate::compress::share::kmeans_linear;
use crate::pipeline::layers::{LayerRules, per_weight};
use crate::pipeline::table::{self, StageTable};
use crate::pipeline::{Constraints, Context, Model, Outcome, Plan, Stage, State, required};
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `convpress encode`'s `--conv-bits` and `--fc-bits`, and the `share` stage's keys.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ShareParams {
    /// Bits per shared conv weight (2^bits clusters).
    #[arg(long, default_value_t = 8)]
    pub conv_bits: u32,
    /// Bits per shared fully connected weight.
    #[arg(long, default_value_t = 5)]
    pub fc_bits: u32,
}

impl Default for ShareParams {
    fn default() -> Self {
        table::clap_defaults()
    }
}

/// A per-layer override: `"layers.0" = { bits = 6 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerBits {
    pub bits: u32,
}

pub struct Share {
    pub params: ShareParams,
    pub layers: LayerRules<LayerBits>,
}

pub fn parse(t: &StageTable) -> Result<Box<dyn Stage>, table::Error> {
    Ok(Box::new(Share {
        params: t.params()?,
        layers: t.layers()?,
    }))
}

/// Refuses a codebook size outside 1..=16 bits; `flag` names the setting as the user wrote it.
pub fn check_bits(flag: &str, bits: u32) -> Result<(), String> {
    if (1..=16).contains(&bits) {
        Ok(())
    } else {
        Err(format!("{flag} must be between 1 and 16, got {bits}"))
    }
}

impl Share {
    /// Bits of every weighted layer's codebook, by weight tensor path.
    fn bits(&self, arch: &crate::models::Arch) -> Result<BTreeMap<String, u32>, String> {
        check_bits("conv-bits", self.params.conv_bits)?;
        check_bits("fc-bits", self.params.fc_bits)?;
        let defaults = (self.params.conv_bits, self.params.fc_bits);
        per_weight(arch, &self.layers, defaults, |o| o.bits, check_bits)
    }
}

impl Stage for Share {
    fn kind(&self) -> &'static str {
        "share"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "params": self.params, "layers": self.layers })
    }

    fn plan(&self, before: &Plan, _cx: &Context) -> Result<Plan, String> {
        before.not_encoded()?;
        if before.state.contains(&State::Codebooks) {
            return Err("the weights are shared already: one share stage per recipe".into());
        }
        self.bits(before.arch()?)?;
        Ok(before.clone().with(State::Codebooks))
    }

    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome> {
        let input = required(input, self.kind())?;
        let bits = self.bits(input.arch()).map_err(anyhow::Error::msg)?;
        let mut tensors = input.loaded.tensors.clone();
        let mut books = BTreeMap::new();
        for (name, &b) in &bits {
            let (values, shape) = floats(&tensors, name).map_err(anyhow::Error::msg)?;
            let book =
                kmeans_linear(&values, b, 100).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            let entry = tensors.get_mut(name).expect("read above");
            entry.0 = TensorData::new(book.decode(), shape);
            books.insert(name.clone(), book);
        }
        let details = serde_json::json!({
            "bits": bits,
            "clusters": books.iter().map(|(p, b)| (p.clone(), b.centroids.len())).collect::<BTreeMap<_, _>>(),
        });
        let constraints = Constraints {
            masks: input.constraints.masks.clone(),
            codebooks: books,
        };
        let file = cx.dir.join("model.safetensors");
        let model = Model::save_tensors(
            &file,
            input.arch(),
            tensors,
            input.meta(),
            &constraints,
            &cx.device,
        )?;
        Ok(Outcome {
            model,
            details,
            curve: vec![],
        })
    }
}
