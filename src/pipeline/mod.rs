//! The compression pipeline: stages, the model that flows between them, recipes and reports.
//!
//! A [`Stage`] takes a [`Model`] (its file, architecture, weights and the [`Constraints`]
//! earlier stages fixed on it) and returns a new one. Methods compute *what* to do (a mask, a
//! codebook, a smaller architecture: `compress`, `rescale`); a stage decides *when* and with
//! which settings, through the training hooks (Intel Distiller's split of methods and
//! policies). A recipe ([`recipe`]) is an ordered list of stages in a TOML file; the
//! [`runner`] runs it into a run folder, one subfolder per stage, and writes the report
//! ([`report`]) after every stage.
//!
//! Adding a method: write a module in [`stages`] that implements [`Stage`] and a
//! `parse` function for its recipe table ([`table::StageTable`]), and add one line to
//! [`registry::STAGES`].

pub mod constraints;
pub mod layers;
pub mod measure;
pub mod recipe;
pub mod registry;
pub mod report;
pub mod runner;
pub mod stages;
pub mod table;

pub use constraints::Constraints;

use crate::checkpoint::{self, Loaded, ModelMeta};
use crate::models::{Arch, Network};
use crate::train::{EpochMetrics, TrainOptions};
use anyhow::Context as _;
use burn::prelude::Device;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A model between stages: the file a stage wrote, what it holds, and its constraints.
#[derive(Debug, Clone)]
pub struct Model {
    /// The stage's real output file (`.safetensors` or `.cpz`): what the report measures.
    pub file: PathBuf,
    pub loaded: Loaded,
    pub constraints: Constraints,
}

impl Model {
    /// Reads a model file and the constraints stored beside it, which its weights must obey.
    /// A compressed file holds its codebooks itself and takes none from beside it (a
    /// `model.safetensors` next to `model.cpz` would otherwise lend it its own).
    pub fn open(file: &Path) -> anyhow::Result<Model> {
        let loaded = checkpoint::read(file)?;
        let constraints = if is_encoded(file) {
            Constraints::default()
        } else {
            Constraints::load(file).map_err(anyhow::Error::msg)?
        };
        constraints.check(&loaded.tensors).map_err(|e| {
            anyhow::anyhow!(
                "{} does not fit {}: {e}",
                Constraints::path_for(file).display(),
                file.display()
            )
        })?;
        Ok(Model {
            file: file.to_path_buf(),
            loaded,
            constraints,
        })
    }

    /// Writes `network` with `meta` to `file` and `constraints` beside it, then reads both
    /// back, so the model handed on is exactly what is on disk.
    pub fn save(
        file: &Path,
        network: &Network,
        meta: &ModelMeta,
        constraints: &Constraints,
    ) -> anyhow::Result<Model> {
        checkpoint::save(file, network, meta)?;
        constraints.save(file).map_err(anyhow::Error::msg)?;
        Model::open(file)
    }

    /// Writes `tensors` as a model of architecture `arch` (built on `device` to check that
    /// they fit it), like [`Model::save`].
    pub fn save_tensors(
        file: &Path,
        arch: &Arch,
        tensors: checkpoint::Tensors,
        meta: &ModelMeta,
        constraints: &Constraints,
        device: &Device,
    ) -> anyhow::Result<Model> {
        let network = Network::new(arch, device).map_err(anyhow::Error::msg)?;
        let network = checkpoint::load_tensors(network, tensors).map_err(|e| {
            anyhow::anyhow!("internal error: tensors do not fit {}: {e}", arch.name)
        })?;
        Model::save(file, &network, meta, constraints)
    }

    pub fn arch(&self) -> &Arch {
        &self.loaded.arch
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.loaded.meta
    }

    /// Whether the file is a compressed model (`.cpz`), which training stages cannot continue.
    pub fn is_encoded(&self) -> bool {
        is_encoded(&self.file)
    }
}

/// Whether `file` starts like a compressed model (`.cpz`).
fn is_encoded(file: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 4];
    std::fs::File::open(file)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| crate::compress::format::is_compressed(&head))
}

/// Compression state a stage can need, keep or break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Pruning masks.
    Masks,
    /// Weight-sharing codebooks.
    Codebooks,
    /// The model is a compressed file: nothing trains it further.
    Encoded,
}

/// What is known about the model between two stages before anything runs: the recipe is
/// checked stage by stage against it, so a conflict is refused before the first stage.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// `None` before the first training stage of a recipe without `--from`.
    pub arch: Option<Arch>,
    pub state: BTreeSet<State>,
}

impl Plan {
    pub fn of(model: &Model) -> Plan {
        let mut state = BTreeSet::new();
        if !model.constraints.masks.is_empty() {
            state.insert(State::Masks);
        }
        if !model.constraints.codebooks.is_empty() {
            state.insert(State::Codebooks);
        }
        if model.is_encoded() {
            state.insert(State::Encoded);
        }
        Plan {
            arch: Some(model.arch().clone()),
            state,
        }
    }

    /// The architecture, for a stage that needs a model to work on.
    pub fn arch(&self) -> Result<&Arch, String> {
        self.arch.as_ref().ok_or_else(|| {
            "there is no model yet: start the recipe with a train stage, or pass --from CHECKPOINT"
                .to_string()
        })
    }

    /// Refuses a stage that changes layers' shapes (`what`, e.g. "filters are removed") after
    /// masks or codebooks were made for the old ones (`shapes`), naming `stage` to move.
    pub fn before_masks(&self, what: &str, shapes: &str, stage: &str) -> Result<(), String> {
        if self.state.contains(&State::Masks) || self.state.contains(&State::Codebooks) {
            return Err(format!(
                "{what} before weights are pruned or shared (masks and codebooks have {shapes}): move {stage} before prune and share"
            ));
        }
        Ok(())
    }

    /// Refuses a stage that would continue training (or change) a model already encoded.
    pub fn not_encoded(&self) -> Result<(), String> {
        if self.state.contains(&State::Encoded) {
            return Err(
                "the model is already an encoded file: only eval can follow encode; move this stage before it"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn with(mut self, s: State) -> Plan {
        self.state.insert(s);
        self
    }
}

/// Where a stage runs and how it shows progress; nothing here changes its result.
#[derive(Debug, Clone)]
pub struct Context {
    /// The stage's own folder (created by the caller): its run, checkpoint and files.
    pub dir: PathBuf,
    pub device: Device,
    /// Dataset folder given on the command line; otherwise the model's own (recorded in its
    /// checkpoint), otherwise the dataset's default.
    pub data_dir: Option<PathBuf>,
    pub progress_bar: bool,
    pub verbose: bool,
}

impl Context {
    /// The dataset folder for a model with metadata `meta`.
    pub fn data_dir_for(&self, meta: &ModelMeta) -> PathBuf {
        meta.data_dir_or(self.data_dir.as_deref())
    }

    /// Training options for a run in `dir`.
    pub fn train_options(&self, dir: &Path, resume: bool) -> TrainOptions {
        TrainOptions {
            run_dir: dir.to_path_buf(),
            device: self.device.clone(),
            resume,
            progress_bar: self.progress_bar,
            verbose: self.verbose,
        }
    }
}

/// What a stage returns: the new model and its entry's method-specific part.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub model: Model,
    /// Facts only this method knows (kept fractions, groups, bytes per tensor), as JSON.
    pub details: serde_json::Value,
    /// Per-epoch figures of the stage's training, if it trained.
    pub curve: Vec<EpochMetrics>,
}

/// One step of a recipe.
///
/// `plan` checks the stage against what the stages before it leave (it may read the data, but
/// trains nothing and writes nothing: `cx.dir` may not exist yet) and says what it leaves; `run` does the work in `cx.dir`. A stage that trains keeps the input's
/// constraints through [`Constraints::enforcer`].
pub trait Stage {
    /// The recipe name (`prune`).
    fn kind(&self) -> &'static str;

    /// Every setting, defaults included: recorded in the run folder, compared on resume.
    fn settings(&self) -> serde_json::Value;

    /// What the model is after this stage, or why the stage cannot run after `before` (with
    /// how to fix it).
    fn plan(&self, before: &Plan, cx: &Context) -> Result<Plan, String>;

    /// Runs the stage on `input` (`None` only for a stage that trains from scratch).
    fn run(&self, input: Option<Model>, cx: &Context) -> anyhow::Result<Outcome>;
}

/// `runs/<name>-<unix time>`: a fresh run folder for a command not told where to write.
pub fn timestamped_run_dir(name: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{name}-{secs}"))
}

/// The input model, for a stage that needs one.
pub fn required(input: Option<Model>, kind: &str) -> anyhow::Result<Model> {
    input.with_context(|| format!("the {kind} stage needs a model to work on"))
}
