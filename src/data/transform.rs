//! Whole-set preprocessing: zero padding, resizing to another resolution, and per-channel
//! normalisation. The [`Preprocess`] a model was trained with is stored in its checkpoint so
//! `eval` applies exactly the same steps.

use super::ImageSet;
use serde::{Deserialize, Serialize};

/// How images are resampled to another resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Box filter over the exact source area each output pixel covers (OpenCV's INTER_AREA).
    /// The right choice for shrinking: it averages instead of aliasing.
    #[default]
    Area,
    /// Bilinear interpolation at pixel centres (align_corners = false).
    Bilinear,
}

/// The preprocessing applied to every image before the network sees it, in this order:
/// pad, resize, normalise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Zero pixels added on every side (MNIST 28x28 + 2 = 32x32 for ResNet-20).
    pub pad: usize,
    /// Target `[H, W]` after padding, if different.
    pub resize: Option<[usize; 2]>,
    #[serde(default)]
    pub resize_mode: ResizeMode,
    /// Per-channel mean and standard deviation of the training pixels (in [0, 1] units).
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Preprocess {
    /// Padding and resizing as asked, normalisation measured on `train` after them.
    pub fn fit(train: &ImageSet, pad: usize, resize: Option<[usize; 2]>) -> Self {
        let mut p = Preprocess {
            pad,
            resize,
            resize_mode: ResizeMode::Area,
            mean: vec![0.0; train.channels],
            std: vec![1.0; train.channels],
        };
        // Statistics are the same before and after padding/resizing up to the border, so they
        // are measured on the raw pixels (cheaper) and shifted for the padding's zeros.
        let (mean, std) = channel_stats(train);
        // In floating point: a huge `pad` is refused later (memory), and must not overflow here.
        let hw = (train.height as f64 * train.width as f64) as f32;
        let padded = ((train.height as f64 + 2.0 * pad as f64)
            * (train.width as f64 + 2.0 * pad as f64)) as f32;
        let frac = hw / padded;
        for c in 0..train.channels {
            let m = mean[c] * frac;
            let ex2 = (std[c] * std[c] + mean[c] * mean[c]) * frac;
            p.mean[c] = m;
            p.std[c] = (ex2 - m * m).max(1e-12).sqrt();
        }
        p
    }

    /// Shape `[C, H, W]` of an image of shape `input` after this preprocessing.
    pub fn output_shape(&self, input: [usize; 3]) -> [usize; 3] {
        let [c, h, w] = input;
        let border = self.pad.saturating_mul(2);
        let (h, w) = (h.saturating_add(border), w.saturating_add(border));
        match self.resize {
            Some([rh, rw]) => [c, rh, rw],
            None => [c, h, w],
        }
    }

    /// Bytes of the padded and resized copies of `set` while [`Preprocess::apply`] runs (both
    /// are alive at once), or `None` if the count overflows.
    pub fn bytes_needed(&self, set: &ImageSet) -> Option<u64> {
        let [c, h, w] = [set.channels, set.height, set.width];
        let padded_h = self.pad.checked_mul(2)?.checked_add(h)?;
        let padded_w = self.pad.checked_mul(2)?.checked_add(w)?;
        let padded = crate::resources::bytes_of(&[set.n, c, padded_h, padded_w], 4)?;
        let resized = match self.resize {
            Some([rh, rw]) => crate::resources::bytes_of(&[set.n, c, rh, rw], 4)?,
            None => 0,
        };
        padded.checked_add(resized)
    }

    /// [`Preprocess::apply`], refused up front if the preprocessed images would not fit in
    /// memory (a mistyped `--pad` or `--resize`), instead of aborting in the allocator.
    pub fn try_apply(&self, set: &ImageSet) -> anyhow::Result<ImageSet> {
        let what = format!(
            "preprocessing {} images of {}x{}x{} (padding {}{})",
            set.n,
            set.channels,
            set.height,
            set.width,
            self.pad,
            self.resize
                .map_or(String::new(), |[h, w]| format!(", resizing to {h}x{w}"))
        );
        crate::resources::check_memory(
            &what,
            self.bytes_needed(set),
            "use a smaller --pad or --resize, or fewer images (--train-limit, --test-limit)",
        )?;
        Ok(self.apply(set))
    }

    /// Applies padding, resizing and normalisation to a whole set.
    pub fn apply(&self, set: &ImageSet) -> ImageSet {
        let mut out = pad(set, self.pad);
        if let Some([h, w]) = self.resize
            && (h, w) != (out.height, out.width)
        {
            out = resize(&out, h, w, self.resize_mode);
        }
        normalise(&mut out, &self.mean, &self.std);
        out
    }
}

/// Per-channel mean and standard deviation of a set's pixels.
pub fn channel_stats(set: &ImageSet) -> (Vec<f32>, Vec<f32>) {
    let hw = set.height * set.width;
    let mut sum = vec![0f64; set.channels];
    let mut sq = vec![0f64; set.channels];
    for img in set.pixels.chunks_exact(set.image_len()) {
        for c in 0..set.channels {
            for &v in &img[c * hw..(c + 1) * hw] {
                sum[c] += v as f64;
                sq[c] += (v as f64) * (v as f64);
            }
        }
    }
    let count = (set.n * hw).max(1) as f64;
    let mean: Vec<f32> = sum.iter().map(|s| (s / count) as f32).collect();
    let std = sq
        .iter()
        .zip(&sum)
        .map(|(q, s)| {
            let m = s / count;
            ((q / count - m * m).max(1e-12)).sqrt() as f32
        })
        .collect();
    (mean, std)
}

/// Adds `p` zero pixels on every side.
pub fn pad(set: &ImageSet, p: usize) -> ImageSet {
    if p == 0 {
        return set.clone();
    }
    let (h, w) = (set.height + 2 * p, set.width + 2 * p);
    let mut pixels = vec![0f32; set.n * set.channels * h * w];
    for (plane_in, plane_out) in set
        .pixels
        .chunks_exact(set.height * set.width)
        .zip(pixels.chunks_exact_mut(h * w))
    {
        for y in 0..set.height {
            let dst = (y + p) * w + p;
            plane_out[dst..dst + set.width]
                .copy_from_slice(&plane_in[y * set.width..(y + 1) * set.width]);
        }
    }
    ImageSet {
        height: h,
        width: w,
        pixels,
        ..set.clone()
    }
}

/// Resamples every image to `h` x `w`.
pub fn resize(set: &ImageSet, h: usize, w: usize, mode: ResizeMode) -> ImageSet {
    let mut pixels = vec![0f32; set.n * set.channels * h * w];
    for (src, dst) in set
        .pixels
        .chunks_exact(set.height * set.width)
        .zip(pixels.chunks_exact_mut(h * w))
    {
        match mode {
            ResizeMode::Area => resize_plane_area(src, set.height, set.width, dst, h, w),
            ResizeMode::Bilinear => resize_plane_bilinear(src, set.height, set.width, dst, h, w),
        }
    }
    ImageSet {
        height: h,
        width: w,
        pixels,
        ..set.clone()
    }
}

/// 1-D weights of the box filter: for each output index, the (source index, overlap) pairs,
/// normalised to sum to one.
fn area_weights(src: usize, dst: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|o| {
            let (a, b) = (o as f64 * scale, (o + 1) as f64 * scale);
            let mut ws = Vec::new();
            let mut i = a.floor() as usize;
            while (i as f64) < b && i < src {
                let overlap = (b.min(i as f64 + 1.0) - a.max(i as f64)).max(0.0);
                if overlap > 0.0 {
                    ws.push((i, (overlap / scale) as f32));
                }
                i += 1;
            }
            ws
        })
        .collect()
}

/// Box-filter resampling of one plane (separable: rows, then columns).
pub fn resize_plane_area(src: &[f32], sh: usize, sw: usize, dst: &mut [f32], dh: usize, dw: usize) {
    let wy = area_weights(sh, dh);
    let wx = area_weights(sw, dw);
    let mut tmp = vec![0f32; sh * dw];
    for y in 0..sh {
        for (x, ws) in wx.iter().enumerate() {
            tmp[y * dw + x] = ws.iter().map(|&(i, k)| src[y * sw + i] * k).sum();
        }
    }
    for (y, ws) in wy.iter().enumerate() {
        for x in 0..dw {
            dst[y * dw + x] = ws.iter().map(|&(i, k)| tmp[i * dw + x] * k).sum();
        }
    }
}

/// Bilinear resampling of one plane at pixel centres, edges clamped.
pub fn resize_plane_bilinear(
    src: &[f32],
    sh: usize,
    sw: usize,
    dst: &mut [f32],
    dh: usize,
    dw: usize,
) {
    let coord = |o: usize, s: usize, d: usize| {
        let x = ((o as f32 + 0.5) * s as f32 / d as f32 - 0.5).clamp(0.0, (s - 1) as f32);
        let i0 = x.floor() as usize;
        let i1 = (i0 + 1).min(s - 1);
        (i0, i1, x - i0 as f32)
    };
    for y in 0..dh {
        let (y0, y1, fy) = coord(y, sh, dh);
        for x in 0..dw {
            let (x0, x1, fx) = coord(x, sw, dw);
            let top = src[y0 * sw + x0] * (1.0 - fx) + src[y0 * sw + x1] * fx;
            let bot = src[y1 * sw + x0] * (1.0 - fx) + src[y1 * sw + x1] * fx;
            dst[y * dw + x] = top * (1.0 - fy) + bot * fy;
        }
    }
}

/// `(x - mean[c]) / std[c]` for every pixel.
pub fn normalise(set: &mut ImageSet, mean: &[f32], std: &[f32]) {
    let hw = set.height * set.width;
    let c_total = set.channels;
    for (i, plane) in set.pixels.chunks_exact_mut(hw).enumerate() {
        let c = i % c_total;
        let (m, s) = (mean[c], std[c]);
        for v in plane {
            *v = (*v - m) / s;
        }
    }
}
