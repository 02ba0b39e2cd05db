//! Per-layer settings: a stage's default, overridden for the layers a pattern names.
//!
//! Patterns are layer paths (`layers.5`, `layers.3.body.0`) or glob patterns over them
//! (`layers.*`, `layers.?.body.*`). One rule decides: **the last pattern that matches a layer
//! wins**, in recipe order, so a recipe reads from general to specific. A pattern that matches
//! no layer is an error (a typo must not silently leave a layer alone).

use crate::models::Arch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `(pattern, value)` pairs in recipe order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRules<T>(pub Vec<(String, T)>);

/// A `[stage.layers]` entry of a stage whose layers take no settings: `"layers.1" = {}`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

impl<T> Default for LayerRules<T> {
    fn default() -> Self {
        LayerRules(Vec::new())
    }
}

impl<T: Default> LayerRules<T> {
    /// The layers a command line names (`--layers a,b`), each with the default settings.
    pub fn named(patterns: Vec<String>) -> Self {
        LayerRules(patterns.into_iter().map(|p| (p, T::default())).collect())
    }
}

impl<T: Clone> LayerRules<T> {
    /// The layers of `arch` a rewriting stage works on: those the patterns name (among every
    /// layer, nested ones included), or with no patterns `default()`, refused with `none()`
    /// if it is empty; every one must pass `check`, whose message names the layer.
    pub fn chosen(
        &self,
        arch: &Arch,
        default: impl FnOnce() -> Vec<String>,
        none: impl FnOnce() -> String,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Vec<String>, String> {
        let paths: Vec<String> = if self.0.is_empty() {
            let paths = default();
            if paths.is_empty() {
                return Err(none());
            }
            paths
        } else {
            let all: Vec<String> = arch.layer_specs().into_keys().collect();
            self.resolve(&all)?.into_keys().collect()
        };
        for p in &paths {
            check(p)?;
        }
        Ok(paths)
    }

    /// The value of every layer of `layers` that some pattern names (the last match wins);
    /// refuses a pattern that names none of them, listing the ones that exist.
    pub fn resolve(&self, layers: &[String]) -> Result<BTreeMap<String, T>, String> {
        let mut out = BTreeMap::new();
        for (pattern, value) in &self.0 {
            let glob = glob::Pattern::new(pattern)
                .map_err(|e| format!("layer pattern {pattern:?} is not a glob pattern: {e}"))?;
            let hits: Vec<&String> = layers.iter().filter(|l| glob.matches(l)).collect();
            if hits.is_empty() {
                return Err(format!(
                    "layer pattern {pattern:?} matches no layer; the layers are {}",
                    layers.join(", ")
                ));
            }
            for l in hits {
                out.insert(l.clone(), value.clone());
            }
        }
        Ok(out)
    }
}

/// A number for the weight of every conv and linear layer of `arch`, by tensor path
/// (`layers.5.weight`): the last rule naming the layer (its value through `pick`), else
/// `conv` or `linear` by the layer's kind; each value is checked by `check` (named by layer).
pub fn per_weight<T: Clone>(
    arch: &Arch,
    rules: &LayerRules<T>,
    (conv, linear): (u32, u32),
    pick: impl Fn(&T) -> u32,
    check: impl Fn(&str, u32) -> Result<(), String>,
) -> Result<BTreeMap<String, u32>, String> {
    let layers = weighted_layers(arch);
    let paths: Vec<String> = layers.iter().map(|(p, _)| p.clone()).collect();
    let over = rules.resolve(&paths)?;
    let mut out = BTreeMap::new();
    for (path, kind) in layers {
        let v = match over.get(&path) {
            Some(o) => pick(o),
            None if kind == "conv" => conv,
            None => linear,
        };
        check(&path, v)?;
        out.insert(format!("{path}.weight"), v);
    }
    Ok(out)
}

/// The layers of `arch` that hold weights (convolutions, transformed ones included, and dense
/// layers), by path, with `conv` or `linear`: what pruning, sharing and encoding work on.
/// Their weight tensor is `<path>.weight`.
pub fn weighted_layers(arch: &Arch) -> Vec<(String, &'static str)> {
    arch.layer_stats()
        .into_iter()
        .filter_map(|s| match s.kind {
            "conv2d" | "transformed_conv" => Some((s.path, "conv")),
            "linear" => Some((s.path, "linear")),
            _ => None,
        })
        .collect()
}

/// Just the paths of [`weighted_layers`].
pub fn weighted_layer_paths(arch: &Arch) -> Vec<String> {
    weighted_layers(arch).into_iter().map(|(p, _)| p).collect()
}
