//! Seeded shuffling and batching, with optional augmentation, producing Burn tensors.
//!
//! The order of epoch `e` depends only on `(seed, e)`, so a run resumed at epoch `e` sees the
//! same batches as an uninterrupted one.

use super::ImageSet;
use burn::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// Per-batch augmentation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    /// Random crop after padding by this many pixels (0 = off), as in ResNet's CIFAR recipe.
    pub crop_pad: usize,
    /// Random horizontal flip (off for digits, where it changes the class's look).
    pub hflip: bool,
}

impl Augment {
    pub fn is_off(&self) -> bool {
        self.crop_pad == 0 && !self.hflip
    }
}

/// Cuts a preprocessed image set into batches.
pub struct Batcher<'a> {
    set: &'a ImageSet,
    batch: usize,
    augment: Augment,
    /// Value of an empty (black) pixel after normalisation, per channel: what a crop shifts in.
    fill: Vec<f32>,
}

/// One batch, already on the device.
pub struct Batch {
    pub images: Tensor<4>,
    pub labels: Tensor<1, Int>,
    pub len: usize,
    /// The images' indices in the set, in batch order.
    pub indices: Vec<usize>,
    /// Whether augmentation changed the images (else each is the set's image at its index).
    pub augmented: bool,
}

impl<'a> Batcher<'a> {
    pub fn new(set: &'a ImageSet, batch: usize, augment: Augment, fill: Vec<f32>) -> Self {
        assert!(batch > 0, "batch size must be positive");
        Batcher {
            set,
            batch,
            augment,
            fill,
        }
    }

    pub fn num_batches(&self) -> usize {
        self.set.n.div_ceil(self.batch)
    }

    /// Shuffled order of epoch `epoch` for `seed`.
    pub fn order(&self, seed: u64, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.set.n).collect();
        let mut rng =
            StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        idx.shuffle(&mut rng);
        idx
    }

    /// Builds the batch of the given image indices; augmentation uses `rng`.
    pub fn batch(&self, indices: &[usize], rng: Option<&mut StdRng>, device: &Device) -> Batch {
        let s = self.set;
        let len = s.image_len();
        let mut pixels = Vec::with_capacity(indices.len() * len);
        let augmented = rng.is_some() && !self.augment.is_off();
        match rng {
            Some(rng) if augmented => {
                for &i in indices {
                    let img = &s.pixels[i * len..(i + 1) * len];
                    self.augmented(img, rng, &mut pixels);
                }
            }
            _ => {
                for &i in indices {
                    pixels.extend_from_slice(&s.pixels[i * len..(i + 1) * len]);
                }
            }
        }
        let labels: Vec<i64> = indices.iter().map(|&i| s.labels[i] as i64).collect();
        let n = indices.len();
        Batch {
            images: Tensor::from_data(
                TensorData::new(pixels, [n, s.channels, s.height, s.width]),
                device,
            ),
            labels: Tensor::from_data(TensorData::new(labels, [n]), device),
            len: n,
            indices: indices.to_vec(),
            augmented,
        }
    }

    fn augmented(&self, img: &[f32], rng: &mut StdRng, out: &mut Vec<f32>) {
        use rand::Rng;
        let (c, h, w) = (self.set.channels, self.set.height, self.set.width);
        let p = self.augment.crop_pad as i64;
        let (dy, dx) = if p > 0 {
            (
                rng.random_range(-p..=p) as isize,
                rng.random_range(-p..=p) as isize,
            )
        } else {
            (0, 0)
        };
        let flip = self.augment.hflip && rng.random_bool(0.5);
        for ch in 0..c {
            let plane = &img[ch * h * w..(ch + 1) * h * w];
            for y in 0..h as isize {
                for x in 0..w as isize {
                    let sx = if flip { w as isize - 1 - x } else { x } + dx;
                    let sy = y + dy;
                    let v = if sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize {
                        plane[sy as usize * w + sx as usize]
                    } else {
                        self.fill[ch]
                    };
                    out.push(v);
                }
            }
        }
    }

    /// All batches of one shuffled epoch, with the augmentation stream seeded by `(seed, epoch)`.
    pub fn epoch<'b>(
        &'b self,
        seed: u64,
        epoch: usize,
        device: &'b Device,
    ) -> impl Iterator<Item = Batch> + 'b {
        let order = self.order(seed, epoch);
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1) ^ (epoch as u64) << 32);
        let batch = self.batch;
        (0..self.num_batches()).map(move |b| {
            let end = ((b + 1) * batch).min(order.len());
            self.batch(&order[b * batch..end], Some(&mut rng), device)
        })
    }

    /// Batches in dataset order, without augmentation (for evaluation).
    pub fn sequential<'b>(&'b self, device: &'b Device) -> impl Iterator<Item = Batch> + 'b {
        let n = self.set.n;
        let batch = self.batch;
        (0..self.num_batches()).map(move |b| {
            let idx: Vec<usize> = (b * batch..((b + 1) * batch).min(n)).collect();
            self.batch(&idx, None, device)
        })
    }
}
