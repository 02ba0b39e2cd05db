//! Batch normalization (Ioffe & Szegedy 2015) over `[N, C, rest...]` row-major buffers: the
//! statistics are per channel `c`, over the `N` planes of `rest` values that channel owns.
//!
//! Training forward returns the batch mean and the biased variance (what Burn and PyTorch
//! feed their running averages); the backward is the closed form of the paper's §3 chain rule,
//! `dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy · x̂))`, computed as one affine map per channel
//! after a single reduction pass. Reductions run per channel on the pool; sums of each plane are
//! taken in `f32` lanes and carried across planes in `f64`, which keeps them exact enough for
//! batches of millions of values.

use rayon::prelude::*;

/// Shape of a batch-norm call: `batch` planes of `plane` values per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormShape {
    pub batch: usize,
    pub channels: usize,
    pub plane: usize,
}

impl NormShape {
    pub fn len(&self) -> usize {
        self.batch * self.channels * self.plane
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values each channel's statistics are taken over.
    pub fn count(&self) -> usize {
        self.batch * self.plane
    }

    fn planes<'a>(&self, data: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> {
        let (plane, channels) = (self.plane, self.channels);
        (0..self.batch).map(move |n| &data[(n * channels + c) * plane..][..plane])
    }
}

/// Eight-lane sums, so the compiler keeps them in one vector register.
fn sum(xs: &[f32]) -> f64 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    lanes.iter().map(|&v| v as f64).sum::<f64>() + tail as f64
}

fn sum_sq_dev(xs: &[f32], mean: f32) -> f64 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += (v - mean) * (v - mean);
        }
    }
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&v| (v - mean) * (v - mean))
        .sum();
    lanes.iter().map(|&v| v as f64).sum::<f64>() + tail as f64
}

fn sum_prod_dev(dy: &[f32], xs: &[f32], mean: f32) -> f64 {
    let mut lanes = [0f32; 8];
    let mut a = dy.chunks_exact(8);
    let mut b = xs.chunks_exact(8);
    for (ca, cb) in (&mut a).zip(&mut b) {
        for ((l, &g), &v) in lanes.iter_mut().zip(ca).zip(cb) {
            *l += g * (v - mean);
        }
    }
    let tail: f32 = a
        .remainder()
        .iter()
        .zip(b.remainder())
        .map(|(&g, &v)| g * (v - mean))
        .sum();
    lanes.iter().map(|&v| v as f64).sum::<f64>() + tail as f64
}

/// `y[n, c, ..] = x · scale[c] + shift[c]`, plane by plane on the pool.
fn affine(shape: NormShape, x: &[f32], scale: &[f32], shift: &[f32], y: &mut [f32]) {
    if shape.plane == 0 {
        return;
    }
    y.par_chunks_mut(shape.plane)
        .zip(x.par_chunks(shape.plane))
        .enumerate()
        .for_each(|(i, (out, inp))| {
            let c = i % shape.channels;
            let (a, b) = (scale[c], shift[c]);
            for (o, &v) in out.iter_mut().zip(inp) {
                *o = v * a + b;
            }
        });
}

/// Batch mean and biased variance per channel.
pub fn moments(shape: NormShape, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), shape.len(), "batch norm: input length");
    let count = shape.count().max(1) as f64;
    (0..shape.channels)
        .into_par_iter()
        .map(|c| {
            let mean = (shape.planes(x, c).map(sum).sum::<f64>() / count) as f32;
            let var = shape.planes(x, c).map(|p| sum_sq_dev(p, mean)).sum::<f64>() / count;
            (mean, var as f32)
        })
        .unzip()
}

/// Normalizes with the batch's own statistics; returns `(y, mean, biased variance)`.
pub fn train_forward(
    shape: NormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mean, var) = moments(shape, x);
    let y = eval_forward(shape, x, gamma, beta, &mean, &var, epsilon);
    (y, mean, var)
}

/// Normalizes with given statistics (inference, with the running averages).
pub fn eval_forward(
    shape: NormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
) -> Vec<f32> {
    assert_eq!(x.len(), shape.len(), "batch norm: input length");
    for (v, what) in [
        (gamma, "gamma"),
        (beta, "beta"),
        (mean, "mean"),
        (var, "variance"),
    ] {
        assert_eq!(v.len(), shape.channels, "batch norm: {what} length");
    }
    let scale: Vec<f32> = (0..shape.channels)
        .map(|c| (gamma[c] as f64 / (var[c] as f64 + epsilon).sqrt()) as f32)
        .collect();
    let shift: Vec<f32> = (0..shape.channels)
        .map(|c| beta[c] - mean[c] * scale[c])
        .collect();
    let mut y = vec![0f32; x.len()];
    affine(shape, x, &scale, &shift, &mut y);
    y
}

/// Gradients `(dx, dgamma, dbeta)` of [`train_forward`].
pub fn train_backward(
    shape: NormShape,
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), shape.len(), "batch norm: input length");
    assert_eq!(dy.len(), shape.len(), "batch norm: gradient length");
    let count = shape.count().max(1) as f64;
    // Σ dy and Σ dy·(x − μ) per channel.
    let (sum_dy, sum_dy_dev): (Vec<f64>, Vec<f64>) = (0..shape.channels)
        .into_par_iter()
        .map(|c| {
            let s: f64 = shape.planes(dy, c).map(sum).sum();
            let sp: f64 = shape
                .planes(dy, c)
                .zip(shape.planes(x, c))
                .map(|(g, v)| sum_prod_dev(g, v, mean[c]))
                .sum();
            (s, sp)
        })
        .unzip();
    let mut dgamma = vec![0f32; shape.channels];
    let mut dbeta = vec![0f32; shape.channels];
    // dx = a·dy + b·x + c per channel.
    let mut a = vec![0f32; shape.channels];
    let mut b = vec![0f32; shape.channels];
    let mut c0 = vec![0f32; shape.channels];
    for c in 0..shape.channels {
        let inv_std = 1.0 / (var[c] as f64 + epsilon).sqrt();
        dgamma[c] = (sum_dy_dev[c] * inv_std) as f32;
        dbeta[c] = sum_dy[c] as f32;
        let g = gamma[c] as f64 * inv_std;
        let bc = -g * inv_std * inv_std * sum_dy_dev[c] / count;
        a[c] = g as f32;
        b[c] = bc as f32;
        c0[c] = (-g * sum_dy[c] / count - bc * mean[c] as f64) as f32;
    }
    let mut dx = vec![0f32; x.len()];
    if shape.plane > 0 {
        dx.par_chunks_mut(shape.plane)
            .zip(dy.par_chunks(shape.plane).zip(x.par_chunks(shape.plane)))
            .enumerate()
            .for_each(|(i, (out, (g, v)))| {
                let ch = i % shape.channels;
                let (a, b, c) = (a[ch], b[ch], c0[ch]);
                for ((o, &g), &v) in out.iter_mut().zip(g).zip(v) {
                    *o = a * g + b * v + c;
                }
            });
    }
    (dx, dgamma, dbeta)
}

/// The plain loops, in `f64`, for the tests.
pub mod reference {
    use super::NormShape;

    fn index(s: NormShape, n: usize, c: usize, i: usize) -> usize {
        (n * s.channels + c) * s.plane + i
    }

    fn stats(s: NormShape, x: &[f32], c: usize) -> (f64, f64) {
        let vals: Vec<f64> = (0..s.batch)
            .flat_map(|n| (0..s.plane).map(move |i| (n, i)))
            .map(|(n, i)| x[index(s, n, c, i)] as f64)
            .collect();
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        let v = vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / vals.len() as f64;
        (m, v)
    }

    pub fn train_forward(
        s: NormShape,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f64,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut y = vec![0f32; x.len()];
        let (mut means, mut vars) = (vec![], vec![]);
        for c in 0..s.channels {
            let (m, v) = stats(s, x, c);
            for n in 0..s.batch {
                for i in 0..s.plane {
                    let k = index(s, n, c, i);
                    y[k] = ((x[k] as f64 - m) / (v + eps).sqrt() * gamma[c] as f64 + beta[c] as f64)
                        as f32;
                }
            }
            means.push(m as f32);
            vars.push(v as f32);
        }
        (y, means, vars)
    }

    /// Backward by the textbook three-term formula, with the statistics recomputed.
    pub fn train_backward(
        s: NormShape,
        x: &[f32],
        gamma: &[f32],
        eps: f64,
        dy: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut dx = vec![0f32; x.len()];
        let (mut dg, mut db) = (vec![], vec![]);
        let m_count = s.count() as f64;
        #[allow(clippy::needless_range_loop)] // c indexes the data, gamma and the outputs alike
        for c in 0..s.channels {
            let (m, v) = stats(s, x, c);
            let inv = 1.0 / (v + eps).sqrt();
            let idx: Vec<usize> = (0..s.batch)
                .flat_map(|n| (0..s.plane).map(move |i| index(s, n, c, i)))
                .collect();
            let xhat = |k: usize| (x[k] as f64 - m) * inv;
            let sdy: f64 = idx.iter().map(|&k| dy[k] as f64).sum();
            let sdyx: f64 = idx.iter().map(|&k| dy[k] as f64 * xhat(k)).sum();
            for &k in &idx {
                dx[k] = (gamma[c] as f64 * inv / m_count
                    * (m_count * dy[k] as f64 - sdy - xhat(k) * sdyx))
                    as f32;
            }
            dg.push(sdyx as f32);
            db.push(sdy as f32);
        }
        (dx, dg, db)
    }
}
