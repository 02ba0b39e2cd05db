//! Weight sharing (Han et al. 2016, "Deep Compression", section 3): the weights of a layer are
//! clustered by 1-D k-means into `2^bits` shared values, and each weight is stored as the index
//! of its cluster. Centroids start evenly spaced between the smallest and largest weight
//! ("linear initialisation", which the paper found best because it keeps the rare large
//! weights represented). Pruned weights (exact zeros) are not clustered: they stay zero.

/// A layer's shared values and the cluster of each weight (`None` for pruned weights).
#[derive(Debug, Clone, PartialEq)]
pub struct Codebook {
    /// Sorted centroids.
    pub centroids: Vec<f32>,
    pub assignment: Vec<Option<u16>>,
}

impl Codebook {
    /// The weights this codebook stands for: each weight replaced by its centroid.
    pub fn decode(&self) -> Vec<f32> {
        self.assignment
            .iter()
            .map(|a| a.map_or(0.0, |k| self.centroids[k as usize]))
            .collect()
    }

    /// Bits of a cluster index: the codebook holds `2^bits` values.
    pub fn bits(&self) -> u32 {
        self.centroids.len().max(1).ilog2()
    }
}

/// Clusters the non-zero entries of `weights` into `2^bits` values with Lloyd's algorithm
/// from linear initialisation, until no assignment changes or `max_iter` passes.
pub fn kmeans_linear(weights: &[f32], bits: u32, max_iter: usize) -> Result<Codebook, String> {
    if bits == 0 || bits > 16 {
        return Err(format!("bits must be between 1 and 16, got {bits}"));
    }
    let k = 1usize << bits;
    let live: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] != 0.0).collect();
    if live.len() < k {
        let fix = if bits > 1 {
            format!("use at most {} bits", live.len().max(2).ilog2())
        } else {
            "1 bit is the fewest: leave this layer out of sharing, or prune it less".to_string()
        };
        return Err(format!(
            "{k} clusters ({bits} bits) for {} non-zero weights: {fix}",
            live.len()
        ));
    }
    if live.iter().any(|&i| !weights[i].is_finite()) {
        return Err("weights contain NaN or infinity".into());
    }
    let (lo, hi) = live
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &i| {
            (lo.min(weights[i]), hi.max(weights[i]))
        });
    let mut centroids: Vec<f32> = (0..k)
        .map(|j| {
            if k == 1 {
                (lo + hi) / 2.0
            } else {
                lo + (hi - lo) * j as f32 / (k - 1) as f32
            }
        })
        .collect();
    let mut assign = vec![0u16; live.len()];
    for iter in 0..max_iter.max(1) {
        let mut changed = false;
        for (a, &i) in assign.iter_mut().zip(&live) {
            let c = nearest(&centroids, weights[i]) as u16;
            if c != *a || iter == 0 {
                changed |= c != *a;
                *a = c;
            }
        }
        // Mean of each cluster; an empty cluster keeps its place.
        let mut sum = vec![0f64; k];
        let mut count = vec![0usize; k];
        for (&a, &i) in assign.iter().zip(&live) {
            sum[a as usize] += weights[i] as f64;
            count[a as usize] += 1;
        }
        for j in 0..k {
            if count[j] > 0 {
                centroids[j] = (sum[j] / count[j] as f64) as f32;
            }
        }
        if !changed && iter > 0 {
            break;
        }
    }
    // Means of clusters of sorted intervals stay sorted; keep the invariant explicit.
    debug_assert!(centroids.windows(2).all(|w| w[0] <= w[1]));
    let mut assignment = vec![None; weights.len()];
    for (&i, &a) in live.iter().zip(&assign) {
        assignment[i] = Some(a);
    }
    Ok(Codebook {
        centroids,
        assignment,
    })
}

/// Index of the centroid nearest to `v` in sorted `centroids` (ties to the lower one).
pub fn nearest(centroids: &[f32], v: f32) -> usize {
    let p = centroids.partition_point(|&c| c < v);
    if p == 0 {
        0
    } else if p == centroids.len() || (v - centroids[p - 1]) <= (centroids[p] - v) {
        p - 1
    } else {
        p
    }
}

/// Centroid fine-tuning (Deep Compression, eq. 3): the gradient of a shared value is the sum
/// of the gradients of the weights that share it. Returns the new centroids after one SGD
/// step of rate `lr`.
pub fn centroid_step(book: &Codebook, grads: &[f32], lr: f32) -> Vec<f32> {
    let mut g = vec![0f32; book.centroids.len()];
    for (a, &gr) in book.assignment.iter().zip(grads) {
        if let Some(k) = a {
            g[*k as usize] += gr;
        }
    }
    book.centroids
        .iter()
        .zip(&g)
        .map(|(c, g)| c - lr * g)
        .collect()
}

/// Trains the shared values of a weight-shared model (Deep Compression, section 3.3): every
/// step, the gradient of each centroid is the sum of its members' gradients and the centroid
/// takes an SGD step; the weights' own gradients are withheld from the optimizer, and the
/// weights are rewritten from the centroids after the step, so each layer keeps exactly
/// `2^bits` values and its pruned entries stay zero.
pub mod finetune {
    use super::{Codebook, centroid_step};
    use crate::checkpoint::{map_params_by_path, named_tensors};
    use crate::models::Network;
    use crate::train::{Progress, TrainHook};
    use burn::module::ParamId;
    use burn::optim::GradientsParams;
    use burn::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    /// Codebooks by parameter path, shared with the caller so the trained ones can be read
    /// after training.
    pub type SharedBooks = Arc<Mutex<BTreeMap<String, Codebook>>>;

    pub struct ShareHook {
        books: SharedBooks,
        ids: BTreeMap<String, (ParamId, usize)>,
    }

    impl ShareHook {
        pub fn new(books: SharedBooks) -> Self {
            ShareHook {
                books,
                ids: BTreeMap::new(),
            }
        }

        fn write_back(&self, model: Network) -> Network {
            let books = self.books.lock().expect("codebooks");
            map_params_by_path(model, |path, w| {
                let values = books.get(path)?.decode();
                let n = values.len();
                Some(Tensor::from_data(TensorData::new(values, [n]), &w.device()))
            })
        }
    }

    impl TrainHook for ShareHook {
        fn name(&self) -> &str {
            "share"
        }

        fn on_epoch_begin(&mut self, _p: &Progress, model: Network) -> Network {
            let books = self.books.lock().expect("codebooks");
            self.ids = named_tensors(&model)
                .into_iter()
                .filter(|(p, _, _)| books.contains_key(p))
                .map(|(p, id, d)| (p, (id, d.rank())))
                .collect();
            drop(books);
            self.write_back(model)
        }

        fn before_step(&mut self, p: &Progress, _model: &Network, grads: &mut GradientsParams) {
            let mut books = self.books.lock().expect("codebooks");
            for (path, &(id, rank)) in &self.ids {
                let g: Option<Vec<f32>> = match rank {
                    2 => grads
                        .remove::<2>(id)
                        .map(|t| t.into_data().try_to_vec().expect("f32")),
                    4 => grads
                        .remove::<4>(id)
                        .map(|t| t.into_data().try_to_vec().expect("f32")),
                    _ => None,
                };
                if let (Some(g), Some(book)) = (g, books.get_mut(path)) {
                    book.centroids = centroid_step(book, &g, p.lr as f32);
                }
            }
        }

        fn after_step(&mut self, _p: &Progress, model: Network) -> Network {
            self.write_back(model)
        }
    }
}
