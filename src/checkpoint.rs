//! Checkpoints: a network's weights in a safetensors file, with its architecture and
//! preprocessing in the file's metadata so `eval` and `info` rebuild it with no flags.
//!
//! Tensor names are the parameter paths (`layers.0.weight`, `layers.5.body.1.running_var`).
//! Parameter ids go into the metadata as well, so a resumed run's optimizer state (keyed by
//! id) finds its parameters again. Files are written to a temporary sibling and renamed, so a
//! crash never leaves half a checkpoint.
//!
//! Safetensors has no checksum of its own, so a flipped bit in tensor data would load as a
//! different weight. Format 2 stores a SHA-256 of everything else in the file (metadata and
//! every tensor's name, shape and bytes) under `convpress.checksum`, checked on every read;
//! format 1 files (written before it) are read without one. Every read also checks the
//! tensors against the stored architecture: the same names, shapes and count.

use crate::atomic_file::write_atomic;
use crate::data::{DatasetKind, Preprocess};
use crate::models::{Arch, Network};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const FORMAT_VERSION: &str = "2";
/// The format before checksums, still read.
const FORMAT_UNCHECKED: &str = "1";
const KEY_CHECKSUM: &str = "convpress.checksum";
const KEY_FORMAT: &str = "convpress.format";
const KEY_ARCH: &str = "convpress.arch";
const KEY_META: &str = "convpress.meta";
const KEY_IDS: &str = "convpress.param_ids";

/// What a checkpoint says about its model besides the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub dataset: DatasetKind,
    pub preprocess: Preprocess,
    /// Free-form facts about how it was produced (epoch, accuracy, command).
    #[serde(default)]
    pub info: serde_json::Value,
}

impl ModelMeta {
    /// The dataset folder the model was trained on (`info.data_dir`), which later stages use
    /// unless told otherwise; `None` for files written before it was recorded.
    pub fn data_dir(&self) -> Option<std::path::PathBuf> {
        self.info
            .get("data_dir")
            .and_then(|v| v.as_str())
            .map(std::path::PathBuf::from)
    }

    /// The dataset folder to use: `given`, else the one the model was trained on, else the
    /// dataset's default.
    pub fn data_dir_or(&self, given: Option<&Path>) -> std::path::PathBuf {
        given
            .map(Path::to_path_buf)
            .or_else(|| self.data_dir())
            .unwrap_or_else(|| self.dataset.default_dir())
    }

    /// The same metadata with `info.data_dir` set to `dir`.
    pub fn with_data_dir(mut self, dir: &Path) -> Self {
        if !self.info.is_object() {
            self.info = serde_json::json!({});
        }
        // Absolute, so the model's data is found from any working directory.
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        self.info["data_dir"] = dir.display().to_string().into();
        self
    }
}

/// Why a checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
    /// The reason is part of the message, not a chained source, so `{:#}` says it once.
    #[error("{path}: {reason}")]
    Io {
        path: String,
        reason: std::io::Error,
    },
    /// From [`write_atomic`], whose message names the file.
    #[error("{0}")]
    Write(std::io::Error),
}

fn invalid(path: &Path, why: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid {
        path: path.display().to_string(),
        why: why.into(),
    }
}

/// Tracks the dotted path of the module being visited. Enum variant names are left out, so
/// paths name positions (`layers.3.weight`), not layer types.
#[derive(Default)]
struct PathStack(Vec<String>);

impl PathStack {
    fn enter(&mut self, name: &str, container: &str) {
        self.0.push(if container.starts_with("Enum") {
            String::new()
        } else {
            name.to_string()
        });
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn path(&self) -> String {
        self.0
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(".")
    }
}

/// Every float tensor of a module (parameters and running statistics) with its path and id.
pub struct NamedTensors {
    stack: PathStack,
    pub tensors: Vec<(String, ParamId, TensorData)>,
}

impl ModuleVisitor for NamedTensors {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = param.val().into_data().convert::<f32>();
        self.tensors.push((self.stack.path(), param.id, data));
    }
}

/// The float tensors of `module` in traversal order.
///
/// Read through [`Module::valid`], which folds the batch-norm running statistics that training
/// steps left pending (Burn's `RunningState` keeps per-thread updates until synced; a plain
/// visit would see the value one update old).
pub fn named_tensors<M: Module>(module: &M) -> Vec<(String, ParamId, TensorData)> {
    let mut v = NamedTensors {
        stack: PathStack::default(),
        tensors: Vec::new(),
    };
    module.valid().visit(&mut v);
    v.tensors
}

/// A whole-model pass that replaces parameters by path: `f(path, flat)` sees each float tensor
/// flattened to 1-D and returns a replacement of the same length, or `None` to keep it.
/// Replacements keep the parameter's id and gradient setting and are detached, so the
/// optimizer keeps updating them (a plain `Param::map` would drop `require_grad`, see
/// `shared/notes/burn-0.22.md`). Pruning masks and shared weights are written this way.
pub fn map_params_by_path<M, F>(module: M, f: F) -> M
where
    M: Module,
    F: FnMut(&str, Tensor<1>) -> Option<Tensor<1>>,
{
    module.map(&mut ReplaceByPath {
        stack: PathStack::default(),
        f,
    })
}

struct ReplaceByPath<F> {
    stack: PathStack,
    f: F,
}

impl<F: FnMut(&str, Tensor<1>) -> Option<Tensor<1>>> ModuleMapper for ReplaceByPath<F> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.stack.path();
        let f = &mut self.f;
        param.map(|w| {
            let shape = w.shape();
            let numel = shape.num_elements();
            match f(&path, w.clone().reshape([numel])) {
                Some(new) => {
                    let grad = w.is_require_grad();
                    let out = new.reshape(shape).detach();
                    if grad { out.require_grad() } else { out }
                }
                None => w,
            }
        })
    }
}

/// Replaces every float tensor of a module with the one of the same path.
struct LoadTensors {
    stack: PathStack,
    tensors: HashMap<String, (TensorData, Option<ParamId>)>,
    errors: Vec<String>,
    used: usize,
}

impl ModuleMapper for LoadTensors {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.stack.path();
        let Some((data, id)) = self.tensors.remove(&path) else {
            self.errors.push(format!("no tensor {path}"));
            return param;
        };
        let (old_id, old, mapper) = param.consume();
        let want = old.shape().to_vec();
        if data.shape().to_vec() != want {
            self.errors.push(format!(
                "tensor {path} has shape {:?}, the architecture needs {want:?}",
                data.shape().to_vec()
            ));
            return Param::from_mapped_value(old_id, old, mapper);
        }
        self.used += 1;
        let mut t = Tensor::<D>::from_data(data, &old.device());
        if old.is_require_grad() {
            t = t.require_grad();
        }
        Param::from_mapped_value(id.unwrap_or(old_id), t, mapper)
    }
}

/// Loads `tensors` (by path) into `network`; every tensor must be used and every parameter found.
pub fn load_tensors(network: Network, tensors: Tensors) -> Result<Network, String> {
    let mut loader = LoadTensors {
        stack: PathStack::default(),
        tensors,
        errors: Vec::new(),
        used: 0,
    };
    let network = network.map(&mut loader);
    let mut errors = loader.errors;
    let mut extra: Vec<_> = loader.tensors.keys().cloned().collect();
    extra.sort();
    if !extra.is_empty() {
        errors.push(format!("unexpected tensors {extra:?}"));
    }
    if errors.is_empty() {
        Ok(network)
    } else {
        Err(errors.join("; "))
    }
}

/// Writes `network` and `meta` to `path` (atomically).
pub fn save(path: &Path, network: &Network, meta: &ModelMeta) -> Result<(), CheckpointError> {
    let tensors = named_tensors(network);
    let mut ids = BTreeMap::new();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, id, data) in &tensors {
        ids.insert(name.clone(), id.val());
        let shape = data.shape().to_vec();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, data.as_bytes())
                .map_err(|e| invalid(path, format!("tensor {name}: {e}")))?;
        views.push((name.clone(), view));
    }
    let mut metadata = HashMap::new();
    metadata.insert(KEY_FORMAT.to_string(), FORMAT_VERSION.to_string());
    metadata.insert(
        KEY_ARCH.to_string(),
        serde_json::to_string(&network.arch).expect("arch serialises"),
    );
    metadata.insert(
        KEY_META.to_string(),
        serde_json::to_string(meta).expect("meta serialises"),
    );
    metadata.insert(
        KEY_IDS.to_string(),
        serde_json::to_string(&ids).expect("ids serialise"),
    );
    let parts: Vec<(&str, &[usize], &[u8])> = tensors
        .iter()
        .map(|(name, _, data)| (name.as_str(), data.shape().as_slice(), data.as_bytes()))
        .collect();
    metadata.insert(KEY_CHECKSUM.to_string(), checksum(&metadata, &parts));
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| invalid(path, format!("cannot serialise: {e}")))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| CheckpointError::Io {
            path: dir.display().to_string(),
            reason: e,
        })?;
    }
    write_atomic(path, &bytes).map_err(CheckpointError::Write)
}

/// Tensors by parameter path, with their parameter ids when known: a model's state off the
/// device, which compression passes (filter pruning, kernel rescaling) transform.
pub type Tensors = HashMap<String, (TensorData, Option<ParamId>)>;

/// A model's float tensors as [`Tensors`] (see [`named_tensors`]).
pub fn tensor_map<M: Module>(module: &M) -> Tensors {
    named_tensors(module)
        .into_iter()
        .map(|(path, id, data)| (path, (data, Some(id))))
        .collect()
}

/// The values and shape of tensor `name`, or why they cannot be had.
pub fn floats(tensors: &Tensors, name: &str) -> Result<(Vec<f32>, Vec<usize>), String> {
    let (data, _) = tensors
        .get(name)
        .ok_or_else(|| format!("tensor {name} is missing"))?;
    let values = data
        .try_to_vec::<f32>()
        .map_err(|e| format!("tensor {name}: {e:?}"))?;
    Ok((values, data.shape().to_vec()))
}

/// The checksum of a format-2 checkpoint: SHA-256 over every metadata entry but the checksum
/// itself and every tensor's name, shape and bytes, both in name order, as `sha256:<hex>`.
/// Each part is length-prefixed, so no two different files hash the same bytes.
pub fn checksum(metadata: &HashMap<String, String>, tensors: &[(&str, &[usize], &[u8])]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut part = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    let mut keys: Vec<_> = metadata.keys().filter(|k| *k != KEY_CHECKSUM).collect();
    keys.sort();
    for k in keys {
        part(k.as_bytes());
        part(metadata[k].as_bytes());
    }
    let mut sorted: Vec<_> = tensors.iter().collect();
    sorted.sort_by_key(|t| t.0);
    for (name, shape, bytes) in sorted {
        part(name.as_bytes());
        let dims: Vec<u8> = shape
            .iter()
            .flat_map(|&d| (d as u64).to_le_bytes())
            .collect();
        part(&dims);
        part(bytes);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A checkpoint read from disk: architecture, metadata and tensors, not yet on a device.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub arch: Arch,
    pub meta: ModelMeta,
    pub tensors: Tensors,
    /// For a quantized model (a version-2 `.cpz`): how each quantized layer's weights and input
    /// are quantized; its tensors hold the dequantized weights, `code · scale`.
    pub quant: Option<crate::compress::quantize::QuantSpec>,
}

impl Loaded {
    /// Checks that the tensors are exactly those the architecture needs ([`Arch::tensor_shapes`]):
    /// no tensor missing, none extra, every shape as stored, and every value finite (a NaN
    /// weight is a damaged model, not a reason to lower a learning rate later).
    pub fn check(&self) -> Result<(), String> {
        let p = &self.meta.preprocess;
        let channels = self.arch.input[0];
        if p.mean.len() != channels || p.std.len() != channels {
            return Err(format!(
                "the preprocessing holds {} means and {} deviations for {channels}-channel input",
                p.mean.len(),
                p.std.len()
            ));
        }
        if p.mean.iter().any(|m| !m.is_finite())
            || p.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(
                "the preprocessing's means or deviations are not finite and positive".into(),
            );
        }
        let want = self.arch.tensor_shapes();
        let mut problems = Vec::new();
        let mut damaged = Vec::new();
        for (name, shape) in &want {
            match self.tensors.get(name) {
                None => problems.push(format!("tensor {name} is missing")),
                Some((data, _)) if data.shape().as_slice() != shape.as_slice() => {
                    problems.push(format!(
                        "tensor {name} has shape {:?}, the architecture needs {shape:?}",
                        data.shape().as_slice()
                    ))
                }
                Some((data, _)) => {
                    let bad = data.iter::<f32>().filter(|x| !x.is_finite()).count();
                    if bad > 0 {
                        damaged.push(format!("tensor {name} holds {bad} NaN or infinite values"));
                    }
                }
            }
        }
        let mut extra: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| !want.iter().any(|(n, _)| n == *k))
            .collect();
        extra.sort();
        if !extra.is_empty() {
            problems.push(format!(
                "{} tensors the {} architecture does not have ({})",
                extra.len(),
                self.arch.name,
                extra
                    .iter()
                    .take(3)
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if problems.is_empty() {
            if damaged.is_empty() {
                return match &self.quant {
                    Some(q) => q.check(&self.arch, |name| floats(&self.tensors, name)),
                    None => Ok(()),
                };
            }
            return Err(format!(
                "the weights are damaged: {}; use another copy of the model, or retrain it",
                damaged.join("; ")
            ));
        }
        let n = problems.len();
        problems.truncate(3);
        let more = if n > 3 {
            format!(" (and {} more)", n - 3)
        } else {
            String::new()
        };
        Err(format!(
            "the weights do not match the stored architecture: {}{more}",
            problems.join("; ")
        ))
    }
}

/// Reads and checks a checkpoint file: safetensors, or a compressed model (`.cpz`, see
/// [`crate::compress::format`]), told apart by their first bytes.
pub fn read(path: &Path) -> Result<Loaded, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e,
    })?;
    parse(&bytes).map_err(|e| invalid(path, e))
}

/// [`read`] on the bytes of a file: everything is checked (format, checksum, architecture,
/// tensors against it) before a `Loaded` is returned.
pub fn parse(bytes: &[u8]) -> Result<Loaded, String> {
    let loaded = if crate::compress::format::is_compressed(bytes) {
        crate::compress::format::decode(bytes)?
    } else {
        parse_safetensors(bytes)?
    };
    loaded.check()?;
    Ok(loaded)
}

fn parse_safetensors(bytes: &[u8]) -> Result<Loaded, String> {
    let not_a_model = |e: &dyn std::fmt::Display| {
        format!(
            "not a convpress model file (neither a safetensors checkpoint nor a .cpz compressed model): {e}"
        )
    };
    if bytes.len() < 8 {
        return Err(format!(
            "not a convpress model file: {} bytes, too short for a checkpoint or a compressed model",
            bytes.len()
        ));
    }
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| not_a_model(&e))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| not_a_model(&e))?;
    let md = header
        .metadata()
        .clone()
        .ok_or("a safetensors file without convpress metadata: not a convpress checkpoint")?;
    let get = |k: &str| {
        md.get(k)
            .ok_or_else(|| format!("metadata {k} missing: not a convpress checkpoint"))
    };
    let version = get(KEY_FORMAT)?;
    if version != FORMAT_VERSION && version != FORMAT_UNCHECKED {
        return Err(format!(
            "checkpoint format {version}, this convpress reads {FORMAT_UNCHECKED} and {FORMAT_VERSION}"
        ));
    }
    if version == FORMAT_VERSION {
        let stored = get(KEY_CHECKSUM)?;
        let parts: Vec<(String, Vec<usize>, &[u8])> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec(), view.data()))
            .collect();
        let parts: Vec<(&str, &[usize], &[u8])> = parts
            .iter()
            .map(|(n, s, d)| (n.as_str(), s.as_slice(), *d))
            .collect();
        if checksum(&md, &parts) != *stored {
            return Err(
                "checksum mismatch: the file is damaged (a changed byte in its weights or metadata); use another copy or retrain"
                    .into(),
            );
        }
    }
    let arch: Arch = serde_json::from_str(get(KEY_ARCH)?)
        .map_err(|e| format!("architecture metadata is damaged: {e}"))?;
    arch.validate()
        .map_err(|e| format!("architecture is inconsistent: {e}"))?;
    let meta: ModelMeta = serde_json::from_str(get(KEY_META)?)
        .map_err(|e| format!("model metadata is damaged: {e}"))?;
    let ids: BTreeMap<String, u64> = match md.get(KEY_IDS) {
        Some(s) => {
            serde_json::from_str(s).map_err(|e| format!("parameter ids are damaged: {e}"))?
        }
        None => BTreeMap::new(),
    };
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(format!("tensor {name} is {:?}, not F32", view.dtype()));
        }
        let data = TensorData::from_bytes_vec(
            view.data().to_vec(),
            view.shape().to_vec(),
            burn::tensor::DType::F32,
        );
        let id = ids.get(&name).map(|&v| ParamId::from(v));
        tensors.insert(name, (data, id));
    }
    Ok(Loaded {
        arch,
        meta,
        tensors,
        quant: None,
    })
}

/// Reads a checkpoint and builds its network on `device`. A binarized file's XNOR-Net layers
/// take their inputs' signs, as the file's runtime does (other quantized layers see their
/// dequantized weights and float inputs).
pub fn load(path: &Path, device: &Device) -> Result<(Network, ModelMeta), CheckpointError> {
    let loaded = read(path)?;
    let network = Network::new(&loaded.arch, device).map_err(|e| invalid(path, e))?;
    let mut network = load_tensors(network, loaded.tensors)
        .map_err(|e| invalid(path, format!("weights do not fit the architecture: {e}")))?;
    let signs: std::collections::BTreeSet<String> = loaded
        .quant
        .iter()
        .flat_map(|q| q.layers.iter())
        .filter(|(_, l)| l.sign_input)
        .map(|(p, _)| p.clone())
        .collect();
    if !signs.is_empty() {
        let inputs = crate::compress::qat::FakeQuantInputs::signs(&signs);
        network.fake_quant = Some(std::sync::Arc::new(inputs));
    }
    Ok((network, loaded.meta))
}

/// Reads a checkpoint into an existing network of the same architecture (for `--init-from`
/// style use, and to check a file against an expected model).
pub fn load_into(path: &Path, network: Network) -> Result<(Network, ModelMeta), CheckpointError> {
    let loaded = read(path)?;
    if loaded.arch != network.arch {
        return Err(invalid(
            path,
            format!(
                "checkpoint holds a {} ({} parameters), not the expected {} ({} parameters)",
                loaded.arch.name,
                loaded.arch.num_params(),
                network.arch.name,
                network.arch.num_params()
            ),
        ));
    }
    let network = load_tensors(network, loaded.tensors).map_err(|e| invalid(path, e))?;
    Ok((network, loaded.meta))
}

/// The test split in `dir` of the dataset of the model in `path` (first `limit` images),
/// preprocessed as it was trained, checked against the input its architecture takes.
pub fn test_split(
    path: &Path,
    arch: &Arch,
    meta: &ModelMeta,
    dir: &Path,
    limit: Option<usize>,
) -> anyhow::Result<crate::data::ImageSet> {
    let splits = crate::data::load(meta.dataset, dir)?;
    let mut test = splits.test;
    if let Some(n) = limit {
        test = test.take(n);
    }
    let got = meta.preprocess.output_shape(test.image_shape());
    if arch.input != got {
        anyhow::bail!(
            "{} expects {:?} input but {} images preprocess to {:?}",
            path.display(),
            arch.input,
            dir.display(),
            got
        );
    }
    meta.preprocess.try_apply(&test)
}
