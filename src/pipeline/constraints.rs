//! What earlier stages fixed, carried to the later ones: pruning masks and weight-sharing
//! codebooks, per tensor.
//!
//! The pipeline owns these constraints instead of re-deriving them from weight values (which
//! loses clusters and lets stored zeros drift: TensorFlow Model Optimization issues #1056 and
//! #979, Distiller PR #55). Every training stage enforces them through [`Enforcer`] hooks, in
//! one fixed order whatever the recipe order: mask, then share (then, later, fake-quantize).
//! [`Constraints::check`] verifies them on a stage's output weights, so a stage that broke
//! them is caught at once, not at export.
//!
//! On disk they sit beside the model file they constrain: `model.safetensors` has
//! `model.constraints.safetensors`, with tensors `mask/<path>` (u8), `centroids/<path>` (f32)
//! and `assignment/<path>` (i32, -1 for a pruned entry).

use crate::checkpoint::{Tensors, floats};
use crate::compress::prune::PruneHook;
use crate::compress::share::Codebook;
use crate::compress::share::finetune::{ShareHook, SharedBooks};
use crate::train::TrainHook;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The compression state attached to a model, by parameter path (`layers.5.weight`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Constraints {
    /// Keep-masks: a `false` entry is pruned and stays exactly zero.
    pub masks: BTreeMap<String, Vec<bool>>,
    /// Shared weights: each entry is its cluster's centroid (pruned entries have none); the
    /// assignment is fixed, the centroids may be trained.
    pub codebooks: BTreeMap<String, Codebook>,
}

impl Constraints {
    pub fn is_empty(&self) -> bool {
        self.masks.is_empty() && self.codebooks.is_empty()
    }

    /// Where the constraints of `model_file` live: `dir/model.safetensors` gives
    /// `dir/model.constraints.safetensors`.
    pub fn path_for(model_file: &Path) -> PathBuf {
        let stem = model_file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        model_file.with_file_name(format!("{stem}.constraints.safetensors"))
    }

    /// The constraints of `model_file`, empty if it has none.
    pub fn load(model_file: &Path) -> Result<Self, String> {
        let path = Self::path_for(model_file);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let bad = |why: String| format!("{}: {why}", path.display());
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let mut out = Constraints::default();
        let mut centroids = BTreeMap::new();
        let mut assignments = BTreeMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            match name.split_once('/') {
                Some(("mask", p)) => {
                    out.masks
                        .insert(p.to_string(), data.iter().map(|&b| b != 0).collect());
                }
                Some(("centroids", p)) => {
                    let v: Vec<f32> = data
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect();
                    centroids.insert(p.to_string(), v);
                }
                Some(("assignment", p)) => {
                    let v: Vec<i32> = data
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect();
                    assignments.insert(p.to_string(), v);
                }
                _ => return Err(bad(format!("unexpected tensor {name}"))),
            }
        }
        for (p, c) in centroids {
            let a = assignments
                .remove(&p)
                .ok_or_else(|| bad(format!("codebook {p} has no assignment")))?;
            let mut assignment = Vec::with_capacity(a.len());
            for k in a {
                assignment.push(match k {
                    -1 => None,
                    k if k >= 0 && (k as usize) < c.len() => Some(k as u16),
                    k => return Err(bad(format!("codebook {p}: cluster {k} out of range"))),
                });
            }
            out.codebooks.insert(
                p,
                Codebook {
                    centroids: c,
                    assignment,
                },
            );
        }
        if let Some(p) = assignments.keys().next() {
            return Err(bad(format!("assignment {p} has no codebook")));
        }
        Ok(out)
    }

    /// Writes the constraints of `model_file` beside it (atomically); with none, removes a
    /// stale file instead.
    pub fn save(&self, model_file: &Path) -> Result<(), String> {
        let path = Self::path_for(model_file);
        if self.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(format!("{}: {e}", path.display()))
                }
                _ => Ok(()),
            };
        }
        use safetensors::{Dtype, tensor::TensorView};
        let mut blobs: Vec<(String, Dtype, Vec<u8>)> = Vec::new();
        for (p, m) in &self.masks {
            blobs.push((
                format!("mask/{p}"),
                Dtype::U8,
                m.iter().map(|&k| k as u8).collect(),
            ));
        }
        for (p, b) in &self.codebooks {
            let c = b.centroids.iter().flat_map(|v| v.to_le_bytes()).collect();
            let a = b
                .assignment
                .iter()
                .flat_map(|k| k.map_or(-1, |k| k as i32).to_le_bytes())
                .collect();
            blobs.push((format!("centroids/{p}"), Dtype::F32, c));
            blobs.push((format!("assignment/{p}"), Dtype::I32, a));
        }
        let views = blobs
            .iter()
            .map(|(name, dtype, bytes)| {
                let n = bytes.len() / if *dtype == Dtype::U8 { 1 } else { 4 };
                TensorView::new(*dtype, vec![n], bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| format!("{name}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bytes = safetensors::serialize(views, None).map_err(|e| e.to_string())?;
        crate::atomic_file::write_atomic(&path, &bytes)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks that `tensors` obey the constraints: every pruned entry is exactly zero, and
    /// every shared weight equals its centroid.
    pub fn check(&self, tensors: &Tensors) -> Result<(), String> {
        for (p, keep) in &self.masks {
            let (w, _) = floats(tensors, p)?;
            if w.len() != keep.len() {
                return Err(format!(
                    "{p}: mask of {} entries for {} weights",
                    keep.len(),
                    w.len()
                ));
            }
            if let Some(i) = (0..w.len()).find(|&i| !keep[i] && w[i] != 0.0) {
                return Err(format!("{p}: pruned entry {i} is {}, not zero", w[i]));
            }
        }
        for (p, book) in &self.codebooks {
            let (w, _) = floats(tensors, p)?;
            let want = book.decode();
            if w.len() != want.len() {
                return Err(format!(
                    "{p}: codebook of {} entries for {} weights",
                    want.len(),
                    w.len()
                ));
            }
            if let Some(i) = (0..w.len()).find(|&i| w[i] != want[i]) {
                return Err(format!(
                    "{p}: entry {i} is {}, not its shared value {}",
                    w[i], want[i]
                ));
            }
        }
        Ok(())
    }

    /// Hooks that keep these constraints through a training run.
    pub fn enforcer(&self) -> Enforcer {
        Enforcer {
            masks: self.masks.clone(),
            books: Arc::new(Mutex::new(self.codebooks.clone())),
        }
    }
}

/// The training hooks that enforce [`Constraints`], and the codebooks they trained.
pub struct Enforcer {
    masks: BTreeMap<String, Vec<bool>>,
    books: SharedBooks,
}

impl Enforcer {
    /// The hooks, mask before share: masked entries are zeroed after every optimizer step,
    /// and shared weights are rewritten from their centroids, which train on the summed
    /// gradients of their members (Deep Compression, section 3.3).
    pub fn hooks(&self) -> Vec<Box<dyn TrainHook>> {
        let mut hooks: Vec<Box<dyn TrainHook>> = Vec::new();
        if !self.masks.is_empty() {
            hooks.push(Box::new(PruneHook::keeping(self.masks.clone())));
        }
        if !self.books.lock().expect("codebooks").is_empty() {
            hooks.push(Box::new(ShareHook::new(self.books.clone())));
        }
        hooks
    }

    /// The constraints after training: the same masks, the trained centroids.
    pub fn finish(self) -> Constraints {
        Constraints {
            masks: self.masks,
            codebooks: std::mem::take(&mut *self.books.lock().expect("codebooks")),
        }
    }
}
