//! Max and average pooling over `[N, C, H, W]` row-major buffers, one plane per rayon task.
//!
//! Max pooling records, for every output, the index of its maximum inside the input plane
//! (Burn's and PyTorch's convention), and the backward adds each output gradient at that
//! index. Padded positions never win a max (they count as −∞); for average pooling they count
//! as zeros when `count_include_pad`, else the divisor is the number of real inputs.

use rayon::prelude::*;

/// One pooling call (no ceil mode: a window must fit inside the padded input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolProblem {
    /// `batch * channels`: the planes pooled independently.
    pub planes: usize,
    pub in_hw: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
}

impl PoolProblem {
    pub fn validate(&self) -> Result<(), String> {
        if self.kernel.contains(&0) || self.stride.contains(&0) || self.dilation.contains(&0) {
            return Err("pool kernel, stride and dilation must be positive".into());
        }
        for i in 0..2 {
            if self.in_hw[i] + 2 * self.padding[i] < self.span(i) {
                return Err(format!(
                    "a {:?} pooling window does not fit the padded {:?} input",
                    self.kernel, self.in_hw
                ));
            }
        }
        Ok(())
    }

    fn span(&self, i: usize) -> usize {
        self.dilation[i] * (self.kernel[i] - 1) + 1
    }

    pub fn out_hw(&self) -> [usize; 2] {
        [0, 1].map(|i| (self.in_hw[i] + 2 * self.padding[i] - self.span(i)) / self.stride[i] + 1)
    }

    fn in_plane(&self) -> usize {
        self.in_hw[0] * self.in_hw[1]
    }

    fn out_plane(&self) -> usize {
        let [oh, ow] = self.out_hw();
        oh * ow
    }

    pub fn y_len(&self) -> usize {
        self.planes * self.out_plane()
    }

    fn check(&self, x: usize) {
        if let Err(e) = self.validate() {
            panic!("pool2d: {e}");
        }
        assert_eq!(x, self.planes * self.in_plane(), "pool2d: input length");
    }

    /// Calls `f(input_index)` for the taps of output `(i, j)` that lie inside the plane.
    #[inline]
    fn window(&self, i: usize, j: usize, mut f: impl FnMut(usize)) {
        let [h, w] = self.in_hw;
        for ki in 0..self.kernel[0] {
            let r =
                (i * self.stride[0] + ki * self.dilation[0]) as isize - self.padding[0] as isize;
            if r < 0 || r as usize >= h {
                continue;
            }
            for kj in 0..self.kernel[1] {
                let s = (j * self.stride[1] + kj * self.dilation[1]) as isize
                    - self.padding[1] as isize;
                if s < 0 || s as usize >= w {
                    continue;
                }
                f(r as usize * w + s as usize);
            }
        }
    }
}

/// Max pooling: `(y, argmax within each input plane)`.
pub fn max_forward(p: &PoolProblem, x: &[f32]) -> (Vec<f32>, Vec<i64>) {
    p.check(x.len());
    let (ip, op) = (p.in_plane(), p.out_plane());
    let mut y = vec![0f32; p.y_len()];
    let mut idx = vec![0i64; p.y_len()];
    if op == 0 {
        return (y, idx);
    }
    let ow = p.out_hw()[1];
    y.par_chunks_mut(op)
        .zip(idx.par_chunks_mut(op))
        .zip(x.par_chunks(ip))
        .for_each(|((y, idx), x)| {
            if p.kernel == [2, 2]
                && p.stride == [2, 2]
                && p.padding == [0, 0]
                && p.dilation == [1, 1]
            {
                return max_2x2(p.in_hw[1], ow, x, y, idx);
            }
            max_any(p, ow, x, y, idx)
        });
    (y, idx)
}

/// Any window, one input plane.
fn max_any(p: &PoolProblem, ow: usize, x: &[f32], y: &mut [f32], idx: &mut [i64]) {
    for (o, (yv, iv)) in y.iter_mut().zip(idx.iter_mut()).enumerate() {
        // NaN wins, so it propagates as in Burn and PyTorch.
        let (mut best, mut at) = (f32::NEG_INFINITY, -1i64);
        p.window(o / ow, o % ow, |k| {
            let v = x[k];
            if at < 0 || v > best || (v.is_nan() && !best.is_nan()) {
                best = v;
                at = k as i64;
            }
        });
        *yv = best;
        *iv = at;
    }
}

/// The common 2x2, stride-2 window, unrolled and branch-free: which of four values is largest
/// is a coin toss on real activations, so compare-and-branch code mispredicts about every other
/// comparison; selects (`cmov`/blends) do not.
fn max_2x2(w: usize, ow: usize, x: &[f32], y: &mut [f32], idx: &mut [i64]) {
    for (i, (yrow, irow)) in y
        .chunks_exact_mut(ow)
        .zip(idx.chunks_exact_mut(ow))
        .enumerate()
    {
        let (r0, r1) = (2 * i * w, (2 * i + 1) * w);
        let (top, bottom) = (&x[r0..r0 + 2 * ow], &x[r1..r1 + 2 * ow]);
        let pairs = top.chunks_exact(2).zip(bottom.chunks_exact(2));
        for (j, ((yv, iv), (t, b))) in yrow.iter_mut().zip(irow.iter_mut()).zip(pairs).enumerate() {
            let (mut best, mut at) = (t[0], r0 + 2 * j);
            for (v, k) in [
                (t[1], r0 + 2 * j + 1),
                (b[0], r1 + 2 * j),
                (b[1], r1 + 2 * j + 1),
            ] {
                // `v > best`, except that a NaN wins (it propagates as in Burn and PyTorch)
                // and the first NaN stays; `&` rather than `&&` keeps it free of branches.
                #[allow(clippy::neg_cmp_op_on_partial_ord, clippy::eq_op)]
                let take = !(v <= best) & (best == best);
                let mask = (take as usize).wrapping_neg();
                at ^= (at ^ k) & mask;
                best =
                    f32::from_bits(best.to_bits() ^ ((best.to_bits() ^ v.to_bits()) & mask as u32));
            }
            *yv = best;
            *iv = at as i64;
        }
    }
}

/// Gradient of max pooling with respect to its input.
pub fn max_backward(p: &PoolProblem, dy: &[f32], idx: &[i64]) -> Vec<f32> {
    let (ip, op) = (p.in_plane(), p.out_plane());
    assert_eq!(dy.len(), p.y_len(), "pool2d: gradient length");
    assert_eq!(idx.len(), p.y_len(), "pool2d: index length");
    let mut dx = vec![0f32; p.planes * ip];
    if op == 0 || ip == 0 {
        return dx;
    }
    dx.par_chunks_mut(ip)
        .zip(dy.par_chunks(op).zip(idx.par_chunks(op)))
        .for_each(|(dx, (dy, idx))| {
            for (&g, &k) in dy.iter().zip(idx) {
                if let Some(slot) = usize::try_from(k).ok().and_then(|k| dx.get_mut(k)) {
                    *slot += g;
                }
            }
        });
    dx
}

fn divisor(p: &PoolProblem, i: usize, j: usize, count_include_pad: bool) -> f32 {
    if count_include_pad {
        (p.kernel[0] * p.kernel[1]) as f32
    } else {
        let mut n = 0usize;
        p.window(i, j, |_| n += 1);
        n.max(1) as f32
    }
}

/// Average pooling (no dilation).
pub fn avg_forward(p: &PoolProblem, x: &[f32], count_include_pad: bool) -> Vec<f32> {
    p.check(x.len());
    let (ip, op) = (p.in_plane(), p.out_plane());
    let mut y = vec![0f32; p.y_len()];
    if op == 0 {
        return y;
    }
    let ow = p.out_hw()[1];
    y.par_chunks_mut(op)
        .zip(x.par_chunks(ip))
        .for_each(|(y, x)| {
            for (o, yv) in y.iter_mut().enumerate() {
                let (i, j) = (o / ow, o % ow);
                let mut s = 0f32;
                p.window(i, j, |k| s += x[k]);
                *yv = s / divisor(p, i, j, count_include_pad);
            }
        });
    y
}

/// Gradient of average pooling with respect to its input.
pub fn avg_backward(p: &PoolProblem, dy: &[f32], count_include_pad: bool) -> Vec<f32> {
    let (ip, op) = (p.in_plane(), p.out_plane());
    assert_eq!(dy.len(), p.y_len(), "pool2d: gradient length");
    let mut dx = vec![0f32; p.planes * ip];
    if op == 0 || ip == 0 {
        return dx;
    }
    let ow = p.out_hw()[1];
    dx.par_chunks_mut(ip)
        .zip(dy.par_chunks(op))
        .for_each(|(dx, dy)| {
            for (o, &g) in dy.iter().enumerate() {
                let (i, j) = (o / ow, o % ow);
                let g = g / divisor(p, i, j, count_include_pad);
                p.window(i, j, |k| dx[k] += g);
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free 2x2 path picks the same value and index as the general loop, with
    /// ties, infinities and NaNs (first NaN wins) in every position of the window.
    #[test]
    fn unrolled_2x2_equals_the_general_window() {
        let p = PoolProblem {
            planes: 1,
            in_hw: [6, 9],
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
            dilation: [1, 1],
        };
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.0,
            1.0,
            -0.0,
            0.0,
        ];
        for seed in 0..64usize {
            let x: Vec<f32> = (0..54)
                .map(|i| {
                    let h = (i * 7 + seed * 13) % 23;
                    if h < specials.len() && (i + seed) % 3 == 0 {
                        specials[h]
                    } else {
                        (h as f32 - 11.0) * 0.5
                    }
                })
                .collect();
            let [_, ow] = p.out_hw();
            let (mut y1, mut i1) = (vec![0f32; p.y_len()], vec![0i64; p.y_len()]);
            let (mut y2, mut i2) = (y1.clone(), i1.clone());
            max_2x2(9, ow, &x, &mut y1, &mut i1);
            max_any(&p, ow, &x, &mut y2, &mut i2);
            assert_eq!(i1, i2, "seed {seed}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y1), bits(&y2), "seed {seed}");
        }
    }
}
