//! Structured pruning: whole filters (and hidden neurons) are removed, so the result is a
//! smaller *dense* model that is faster on any backend, not a dense tensor full of zeros.
//!
//! Removing output channel `c` of a convolution also removes channel `c` from everything that
//! reads it: the batch-norm entries that follow, the input channels of the next convolution and
//! the rows of a dense layer that reads the flattened map. Residual additions tie channels
//! together: `body(x) + shortcut(x)` needs both branches to keep the *same* channels, and with an
//! identity shortcut those are the block input's channels, produced by an earlier layer. So the
//! unit of pruning is a **channel group**: the set of layers whose output channels are added
//! together (found with union-find over the architecture), pruned with one shared ranking.
//!
//! Criteria: the L1 norm of a filter (Li et al. 2017, "Pruning Filters for Efficient ConvNets",
//! §3.1), its L2 norm, and the magnitude of the batch-norm scale γ that follows it (Liu et al.
//! 2017, "Learning Efficient Convolutional Networks through Network Slimming", §3). In a group
//! with several producers the scores are summed, each producer's norm divided by its fan-in so
//! a 1x1 projection shortcut and a 3x3 convolution weigh alike.
//!
//! The pass works on checkpoint data (architecture plus named tensors), so its result is saved,
//! evaluated and fine-tuned like any other model.

use crate::checkpoint::{Tensors, floats};
use crate::models::{Arch, LayerSpec, Shape};
use burn::prelude::TensorData;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// How filters are ranked inside a channel group; the lowest-ranked are removed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// Mean absolute weight of the filter (Li et al. 2017).
    #[default]
    L1,
    /// Root mean square of the filter's weights.
    L2,
    /// |γ| of the batch norm after the filter (Liu et al. 2017, network slimming).
    BnGamma,
}

/// A set of channels that must be kept or removed together.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ChannelGroup {
    /// Channels (or neurons) before pruning.
    pub channels: usize,
    /// Channels kept.
    pub kept: usize,
    /// Layers whose outputs form the group (convolutions, dense layers).
    pub producers: Vec<String>,
    /// Why the group cannot be pruned (model input, class scores, grouped convolution), if so.
    pub fixed: Option<String>,
}

impl ChannelGroup {
    /// True when several producers are added together (a residual dependency).
    pub fn coupled(&self) -> bool {
        self.producers.len() > 1
    }
}

/// Where a layer reads and writes channel groups.
#[derive(Debug, Clone)]
enum Site {
    /// `in_g` / `out_g` index groups; a depthwise convolution has `in_g == out_g`.
    Conv {
        path: String,
        in_g: usize,
        out_g: usize,
        depthwise: bool,
        grouped: bool,
    },
    /// Batch norm over features `(g, spatial)`.
    Bn {
        path: String,
        g: usize,
        spatial: usize,
    },
    /// Dense layer reading features `(in_g, spatial)` (channel-major after a flatten).
    Linear {
        path: String,
        in_g: usize,
        spatial: usize,
        out_g: usize,
    },
}

/// The channel groups of an architecture and where each layer meets them.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub groups: Vec<ChannelGroup>,
    sites: Vec<Site>,
}

/// Features flowing between layers: channels of group `g`, each repeated `spatial` times when a
/// feature map has been flattened.
#[derive(Debug, Clone, Copy)]
struct Act {
    g: usize,
    spatial: usize,
    shape: Shape,
}

struct Builder {
    parent: Vec<usize>,
    size: Vec<usize>,
    producers: Vec<Vec<String>>,
    fixed: Vec<Option<String>>,
    sites: Vec<Site>,
}

impl Builder {
    fn new_group(&mut self, size: usize, producer: Option<String>, fixed: Option<String>) -> usize {
        self.parent.push(self.parent.len());
        self.size.push(size);
        self.producers.push(producer.into_iter().collect());
        self.fixed.push(fixed);
        self.parent.len() - 1
    }

    fn find(&mut self, mut g: usize) -> usize {
        while self.parent[g] != g {
            self.parent[g] = self.parent[self.parent[g]];
            g = self.parent[g];
        }
        g
    }

    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a == b {
            return;
        }
        // The older group stays the root, so producers are listed in network order.
        let (a, b) = (a.min(b), a.max(b));
        self.parent[b] = a;
        let producers = std::mem::take(&mut self.producers[b]);
        self.producers[a].extend(producers);
        if self.fixed[a].is_none() {
            self.fixed[a] = self.fixed[b].take();
        }
    }

    fn fix(&mut self, g: usize, why: &str) {
        let g = self.find(g);
        if self.fixed[g].is_none() {
            self.fixed[g] = Some(why.to_string());
        }
    }

    fn walk(&mut self, layers: &[LayerSpec], prefix: &str, mut x: Act) -> Result<Act, String> {
        for (i, layer) in layers.iter().enumerate() {
            let path = format!("{prefix}.{i}");
            let shape = layer.output_shape(x.shape)?;
            x = match *layer {
                LayerSpec::Conv2d {
                    in_channels,
                    out_channels,
                    groups,
                    ..
                } => {
                    let depthwise = groups > 1 && groups == in_channels && groups == out_channels;
                    let grouped = groups > 1 && !depthwise;
                    let out_g = if depthwise {
                        x.g
                    } else {
                        let g = self.new_group(out_channels, Some(path.clone()), None);
                        if grouped {
                            self.fix(x.g, "read by a grouped convolution");
                            self.fix(g, "written by a grouped convolution");
                        }
                        g
                    };
                    self.sites.push(Site::Conv {
                        path,
                        in_g: x.g,
                        out_g,
                        depthwise,
                        grouped,
                    });
                    Act {
                        g: out_g,
                        spatial: 1,
                        shape,
                    }
                }
                LayerSpec::BatchNorm { .. } => {
                    self.sites.push(Site::Bn {
                        path,
                        g: x.g,
                        spatial: x.spatial,
                    });
                    Act { shape, ..x }
                }
                LayerSpec::Linear { out_features, .. } => {
                    let out_g = self.new_group(out_features, Some(path.clone()), None);
                    self.sites.push(Site::Linear {
                        path,
                        in_g: x.g,
                        spatial: x.spatial,
                        out_g,
                    });
                    Act {
                        g: out_g,
                        spatial: 1,
                        shape,
                    }
                }
                // A circulant layer's weight ties every input to every output: neither side can
                // lose a unit.
                LayerSpec::Circulant { out_features, .. } => {
                    self.fix(x.g, "read by a circulant layer");
                    let why = Some("written by a circulant layer".to_string());
                    Act {
                        g: self.new_group(out_features, None, why),
                        spatial: 1,
                        shape,
                    }
                }
                LayerSpec::CRelu | LayerSpec::Concat { .. } | LayerSpec::TransformedConv { .. } => {
                    return Err(format!(
                        "{path}: filter pruning does not take {} layers (their channels are tied to each other)",
                        layer.kind()
                    ));
                }
                LayerSpec::Flatten => {
                    let spatial = match x.shape {
                        Shape::Map([_, h, w]) => h * w,
                        Shape::Flat(_) => x.spatial,
                    };
                    Act {
                        g: x.g,
                        spatial,
                        shape,
                    }
                }
                LayerSpec::Residual {
                    ref body,
                    ref shortcut,
                } => {
                    let b = self.walk(body, &format!("{path}.body"), x)?;
                    let s = self.walk(shortcut, &format!("{path}.shortcut"), x)?;
                    if b.spatial != s.spatial {
                        return Err(format!("{path}: residual branches flatten differently"));
                    }
                    self.union(b.g, s.g);
                    Act {
                        g: self.find(b.g),
                        spatial: b.spatial,
                        shape,
                    }
                }
                LayerSpec::Relu
                | LayerSpec::MaxPool { .. }
                | LayerSpec::AvgPool { .. }
                | LayerSpec::GlobalAvgPool => Act { shape, ..x },
            };
        }
        Ok(x)
    }
}

impl Analysis {
    /// Finds the channel groups of `arch`.
    pub fn new(arch: &Arch) -> Result<Self, String> {
        arch.validate()?;
        let mut b = Builder {
            parent: Vec::new(),
            size: Vec::new(),
            producers: Vec::new(),
            fixed: Vec::new(),
            sites: Vec::new(),
        };
        let input = b.new_group(arch.input[0], None, Some("model input".into()));
        let start = Act {
            g: input,
            spatial: 1,
            shape: Shape::Map(arch.input),
        };
        let out = b.walk(&arch.layers, "layers", start)?;
        b.fix(out.g, "class scores");
        // Renumber the union-find roots densely, in order of first appearance.
        let mut root_index = BTreeMap::new();
        let mut groups = Vec::new();
        for g in 0..b.parent.len() {
            let r = b.find(g);
            if r == g {
                root_index.insert(r, groups.len());
                groups.push(ChannelGroup {
                    channels: b.size[r],
                    kept: b.size[r],
                    producers: b.producers[r].clone(),
                    fixed: b.fixed[r].clone(),
                });
            }
        }
        let raw_sites = std::mem::take(&mut b.sites);
        let mut remap = |g: usize| root_index[&b.find(g)];
        let sites = raw_sites
            .into_iter()
            .map(|s| match s {
                Site::Conv {
                    path,
                    in_g,
                    out_g,
                    depthwise,
                    grouped,
                } => Site::Conv {
                    path,
                    in_g: remap(in_g),
                    out_g: remap(out_g),
                    depthwise,
                    grouped,
                },
                Site::Bn { path, g, spatial } => Site::Bn {
                    path,
                    g: remap(g),
                    spatial,
                },
                Site::Linear {
                    path,
                    in_g,
                    spatial,
                    out_g,
                } => Site::Linear {
                    path,
                    in_g: remap(in_g),
                    spatial,
                    out_g: remap(out_g),
                },
            })
            .collect();
        Ok(Analysis { groups, sites })
    }

    /// Indices of the groups that can be pruned.
    pub fn prunable(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.groups.len()).filter(|&g| self.groups[g].fixed.is_none())
    }
}

/// What to prune: the fraction of channels removed from each prunable group.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Fraction of each group's channels to remove, in [0, 1).
    pub ratio: f64,
    pub criterion: Criterion,
    /// Leave groups tied by residual additions whole (prune only inside residual bodies and
    /// plain chains).
    pub skip_coupled: bool,
}

/// The outcome of [`prune`]: the smaller architecture, its tensors and the groups with their
/// kept counts.
#[derive(Debug)]
pub struct Pruned {
    pub arch: Arch,
    pub tensors: Tensors,
    pub groups: Vec<ChannelGroup>,
}

/// Per-channel importance of the channels of each group under `criterion`.
fn scores(
    analysis: &Analysis,
    tensors: &Tensors,
    criterion: Criterion,
) -> Result<Vec<Vec<f64>>, String> {
    let mut score: Vec<Vec<f64>> = analysis
        .groups
        .iter()
        .map(|g| vec![0.0; g.channels])
        .collect();
    let mut seen = vec![false; analysis.groups.len()];
    let norm = |v: &mut dyn Iterator<Item = f32>, n: usize| -> f64 {
        match criterion {
            Criterion::L2 => (v.map(|w| (w as f64).powi(2)).sum::<f64>() / n as f64).sqrt(),
            _ => v.map(|w| (w as f64).abs()).sum::<f64>() / n as f64,
        }
    };
    for site in &analysis.sites {
        match (criterion, site) {
            (Criterion::L1 | Criterion::L2, Site::Conv { path, out_g, .. }) => {
                let (w, shape) = floats(tensors, &format!("{path}.weight"))?;
                let fan_in: usize = shape[1..].iter().product();
                for (c, s) in score[*out_g].iter_mut().enumerate() {
                    *s += norm(&mut w[c * fan_in..(c + 1) * fan_in].iter().copied(), fan_in);
                }
                seen[*out_g] = true;
            }
            (Criterion::L1 | Criterion::L2, Site::Linear { path, out_g, .. }) => {
                // Burn's dense layout is [in, out]: a neuron's weights are a column.
                let (w, shape) = floats(tensors, &format!("{path}.weight"))?;
                let (n_in, n_out) = (shape[0], shape[1]);
                for (o, s) in score[*out_g].iter_mut().enumerate() {
                    *s += norm(&mut (0..n_in).map(|i| w[i * n_out + o]), n_in);
                }
                seen[*out_g] = true;
            }
            (Criterion::BnGamma, Site::Bn { path, g, spatial }) if *spatial == 1 => {
                let (gamma, _) = floats(tensors, &format!("{path}.gamma"))?;
                for (s, v) in score[*g].iter_mut().zip(gamma) {
                    *s += (v as f64).abs();
                }
                seen[*g] = true;
            }
            _ => {}
        }
    }
    for g in analysis.prunable() {
        if !seen[g] {
            return Err(format!(
                "criterion {criterion:?} cannot rank the channels of {}: no {} follows it",
                analysis.groups[g].producers.join(", "),
                if criterion == Criterion::BnGamma {
                    "batch norm"
                } else {
                    "weight"
                }
            ));
        }
    }
    Ok(score)
}

/// Sorted indices of the `keep` highest-scoring channels (ties broken by index, so the
/// outcome is deterministic).
fn top(scores: &[f64], keep: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(keep);
    idx.sort_unstable();
    idx
}

/// Expands channel indices to feature indices of a flattened map (`c * spatial + k`).
fn features(kept: &[usize], spatial: usize) -> Vec<usize> {
    kept.iter()
        .flat_map(|&c| c * spatial..(c + 1) * spatial)
        .collect()
}

/// Keeps entries `idx` along `dim` of a row-major tensor of `shape`.
fn select(values: &[f32], shape: &[usize], dim: usize, idx: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let n = shape[dim];
    let mut out = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in idx {
            let start = (o * n + i) * inner;
            out.extend_from_slice(&values[start..start + inner]);
        }
    }
    let mut new_shape = shape.to_vec();
    new_shape[dim] = idx.len();
    (out, new_shape)
}

/// Removes the lowest-ranked channels of every prunable group: returns the smaller
/// architecture and its tensors (the kept weights unchanged; parameter ids kept).
pub fn prune(arch: &Arch, tensors: &Tensors, target: &Target) -> Result<Pruned, String> {
    if !(target.ratio.is_finite() && (0.0..1.0).contains(&target.ratio)) {
        return Err(format!(
            "pruning ratio must be in [0, 1), got {}",
            target.ratio
        ));
    }
    let mut analysis = Analysis::new(arch)?;
    let score = scores(&analysis, tensors, target.criterion)?;
    let mut kept: Vec<Vec<usize>> = Vec::with_capacity(analysis.groups.len());
    for (g, group) in analysis.groups.iter_mut().enumerate() {
        let whole = group.fixed.is_some() || (target.skip_coupled && group.coupled());
        let keep = if whole {
            group.channels
        } else {
            ((group.channels as f64 * (1.0 - target.ratio)).round() as usize).max(1)
        };
        group.kept = keep;
        kept.push(if whole {
            (0..group.channels).collect()
        } else {
            top(&score[g], keep)
        });
    }

    let mut out: Tensors = tensors.clone();
    let mut put = |name: String, (v, shape): (Vec<f32>, Vec<usize>)| {
        let id = tensors.get(&name).and_then(|(_, id)| *id);
        out.insert(name, (TensorData::new(v, shape), id));
    };
    let mut new_sizes: HashMap<String, (usize, usize)> = HashMap::new();
    for site in &analysis.sites {
        match site {
            Site::Conv {
                path,
                in_g,
                out_g,
                depthwise,
                grouped,
            } => {
                let name = format!("{path}.weight");
                let (w, shape) = floats(tensors, &name)?;
                let (w, shape) = if *grouped {
                    (w, shape)
                } else if *depthwise {
                    select(&w, &shape, 0, &kept[*out_g])
                } else {
                    let (w, s) = select(&w, &shape, 0, &kept[*out_g]);
                    select(&w, &s, 1, &kept[*in_g])
                };
                let ins = if *depthwise {
                    shape[0]
                } else if *grouped {
                    analysis.groups[*in_g].channels
                } else {
                    shape[1]
                };
                new_sizes.insert(path.clone(), (ins, shape[0]));
                put(name, (w, shape));
                let bias = format!("{path}.bias");
                if tensors.contains_key(&bias) {
                    let (b, s) = floats(tensors, &bias)?;
                    put(bias, select(&b, &s, 0, &kept[*out_g]));
                }
            }
            Site::Bn { path, g, spatial } => {
                let idx = features(&kept[*g], *spatial);
                for field in ["gamma", "beta", "running_mean", "running_var"] {
                    let name = format!("{path}.{field}");
                    let (v, s) = floats(tensors, &name)?;
                    put(name, select(&v, &s, 0, &idx));
                }
                new_sizes.insert(path.clone(), (idx.len(), idx.len()));
            }
            Site::Linear {
                path,
                in_g,
                spatial,
                out_g,
            } => {
                let name = format!("{path}.weight");
                let (w, shape) = floats(tensors, &name)?;
                let (w, s) = select(&w, &shape, 0, &features(&kept[*in_g], *spatial));
                let (w, s) = select(&w, &s, 1, &kept[*out_g]);
                new_sizes.insert(path.clone(), (s[0], s[1]));
                put(name, (w, s));
                let bias = format!("{path}.bias");
                if tensors.contains_key(&bias) {
                    let (b, s) = floats(tensors, &bias)?;
                    put(bias, select(&b, &s, 0, &kept[*out_g]));
                }
            }
        }
    }
    let new_arch = Arch {
        layers: resize_layers(&arch.layers, "layers", &new_sizes),
        ..arch.clone()
    };
    new_arch
        .validate()
        .map_err(|e| format!("internal error: pruned architecture is inconsistent: {e}"))?;
    Ok(Pruned {
        arch: new_arch,
        tensors: out,
        groups: analysis.groups,
    })
}

/// The layer list with the channel counts of `sizes` (`path -> (in, out)`).
fn resize_layers(
    layers: &[LayerSpec],
    prefix: &str,
    sizes: &HashMap<String, (usize, usize)>,
) -> Vec<LayerSpec> {
    layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let path = format!("{prefix}.{i}");
            let mut layer = layer.clone();
            match &mut layer {
                LayerSpec::Conv2d {
                    in_channels,
                    out_channels,
                    groups,
                    ..
                } => {
                    let depthwise =
                        *groups > 1 && *groups == *in_channels && *groups == *out_channels;
                    (*in_channels, *out_channels) = sizes[&path];
                    if depthwise {
                        *groups = *out_channels;
                    }
                }
                LayerSpec::BatchNorm { features } => *features = sizes[&path].0,
                LayerSpec::Linear {
                    in_features,
                    out_features,
                    ..
                } => (*in_features, *out_features) = sizes[&path],
                LayerSpec::Residual { body, shortcut } => {
                    *body = resize_layers(body, &format!("{path}.body"), sizes);
                    *shortcut = resize_layers(shortcut, &format!("{path}.shortcut"), sizes);
                }
                _ => {}
            }
            layer
        })
        .collect()
}
