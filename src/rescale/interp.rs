//! Resampling of small 2-D planes (kernels, and the per-output weight maps of a dense layer
//! that reads a flattened feature map), with the amplitude correction of kernel rescaling.

use serde::{Deserialize, Serialize};

/// Interpolation kernel used to resample a plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Interp {
    Bilinear,
    /// Keys' cubic convolution with a = -0.5 (Keys 1981), the usual "bicubic".
    Bicubic,
}

/// Taps and weights of one output sample along one axis: output `j` of `n_out` reads the
/// input (length `n_in`) around `u = (j + 1/2) n_in / n_out - 1/2`, so sample centres align
/// (pixel `i` covers `[i, i + 1)` on both grids); indices past the border are clamped.
fn taps(j: usize, n_in: usize, n_out: usize, interp: Interp) -> Vec<(usize, f64)> {
    let u = (j as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5;
    let clamp = |i: i64| i.clamp(0, n_in as i64 - 1) as usize;
    let base = u.floor();
    let t = u - base;
    let base = base as i64;
    match interp {
        Interp::Bilinear => vec![(clamp(base), 1.0 - t), (clamp(base + 1), t)],
        Interp::Bicubic => {
            const A: f64 = -0.5;
            let w = |x: f64| {
                let x = x.abs();
                if x <= 1.0 {
                    (A + 2.0) * x.powi(3) - (A + 3.0) * x.powi(2) + 1.0
                } else if x < 2.0 {
                    A * x.powi(3) - 5.0 * A * x.powi(2) + 8.0 * A * x - 4.0 * A
                } else {
                    0.0
                }
            };
            (-1..=2)
                .map(|k| (clamp(base + k), w(t - k as f64)))
                .collect()
        }
    }
}

/// Resamples the row-major plane `src` of shape `from` (`[h, w]`) to shape `to`, separably
/// (rows, then columns). Values are interpolated, not rescaled: see [`rescale_plane`].
pub fn resample(src: &[f32], from: [usize; 2], to: [usize; 2], interp: Interp) -> Vec<f32> {
    let ([h, w], [h2, w2]) = (from, to);
    assert_eq!(src.len(), h * w, "plane size");
    assert!(h > 0 && w > 0 && h2 > 0 && w2 > 0, "empty plane");
    if from == to {
        return src.to_vec();
    }
    let col_taps: Vec<_> = (0..w2).map(|x| taps(x, w, w2, interp)).collect();
    let row_taps: Vec<_> = (0..h2).map(|y| taps(y, h, h2, interp)).collect();
    let mut rows = vec![0f64; h * w2];
    for y in 0..h {
        for (x, t) in col_taps.iter().enumerate() {
            rows[y * w2 + x] = t.iter().map(|&(i, a)| a * src[y * w + i] as f64).sum();
        }
    }
    let mut out = vec![0f32; h2 * w2];
    for (y, t) in row_taps.iter().enumerate() {
        for x in 0..w2 {
            out[y * w2 + x] = t.iter().map(|&(i, a)| a * rows[i * w2 + x]).sum::<f64>() as f32;
        }
    }
    out
}

/// Resamples a kernel plane and corrects its amplitude by `(h w) / (h' w')`.
///
/// Why: a kernel spread over `1/s` times as many taps per axis sums `1/s²` times as many
/// products of the same size, so its response grows by that much (Gusmão et al. 2016, §2: the
/// spatial scaling property holds up to the factor s²). Dividing by the ratio of tap counts
/// keeps the layer's output on the scale the next layers were trained for.
pub fn rescale_plane(src: &[f32], from: [usize; 2], to: [usize; 2], interp: Interp) -> Vec<f32> {
    let gain = (from[0] * from[1]) as f32 / (to[0] * to[1]) as f32;
    let mut out = resample(src, from, to, interp);
    out.iter_mut().for_each(|v| *v *= gain);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_are_partitions_of_unity() {
        for interp in [Interp::Bilinear, Interp::Bicubic] {
            for (n_in, n_out) in [(3, 5), (5, 3), (2, 4), (4, 4), (1, 3)] {
                for j in 0..n_out {
                    let s: f64 = taps(j, n_in, n_out, interp).iter().map(|t| t.1).sum();
                    assert!(
                        (s - 1.0).abs() < 1e-12,
                        "{interp:?} {n_in}->{n_out} j={j}: {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn constant_planes_stay_constant_and_sums_are_kept_by_the_gain() {
        for interp in [Interp::Bilinear, Interp::Bicubic] {
            let up = resample(&[2.0; 9], [3, 3], [5, 5], interp);
            assert!(up.iter().all(|v| (v - 2.0).abs() < 1e-6), "{up:?}");
            let k = rescale_plane(&[2.0; 9], [3, 3], [5, 5], interp);
            let sum: f32 = k.iter().sum();
            assert!((sum - 18.0).abs() < 1e-4, "{sum}");
        }
        // Same size is the identity.
        let v = [1.0, -2.0, 3.0, 0.5];
        assert_eq!(resample(&v, [2, 2], [2, 2], Interp::Bicubic), v);
    }

    #[test]
    fn linear_ramps_are_reproduced_inside_the_plane() {
        // A ramp along x; away from the clamped border both methods are exact on it.
        let src: Vec<f32> = (0..4 * 8).map(|i| (i % 8) as f32).collect();
        for interp in [Interp::Bilinear, Interp::Bicubic] {
            let out = resample(&src, [4, 8], [4, 16], interp);
            for (x, v) in out.iter().enumerate().take(12).skip(3) {
                let want = (x as f32 + 0.5) * 0.5 - 0.5;
                assert!((v - want).abs() < 1e-5, "{interp:?} x={x}: {v}");
            }
        }
    }
}
