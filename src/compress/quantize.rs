//! Uniform affine quantization (issue #12): `q = clamp(round(x / scale) + zero_point, lo, hi)`,
//! `x̂ = (q - zero_point) · scale` (Jacob et al. 2018, "Quantization and Training of Neural
//! Networks for Efficient Integer-Arithmetic-Only Inference", eq. 1).
//!
//! Weights are quantized symmetrically per output channel (zero point 0, range ±(2^(b-1) - 1),
//! so the int8 kernels never see -128 and the range is symmetric). Activations are quantized
//! asymmetrically per tensor, unsigned (`0 ..= 2^b - 1`), with a range that always contains 0 so
//! that zero padding and ReLU's zeros are exact. The range comes from calibration: an
//! [`Observer`] sees activations and proposes a range by min-max, a percentile of |x|, or the
//! clipping threshold that minimises the quantization error (MSE) over a histogram.

/// Supported bit widths: 2 to 8 (the integer kernels are 8-bit; fewer bits are stored packed
/// and run on the 8-bit kernels).
pub const BITS: std::ops::RangeInclusive<u32> = 2..=8;

/// Weight widths a quantized layer may have: [`BITS`], and 1 for binary weights (codes ±1 and
/// no 0: BWN's and XNOR-Net's `α·sign(w)`, issue #13), which the calibrated quantizers of
/// `quantize` and `qat` do not produce but `binarize` does.
pub const WEIGHT_BITS: std::ops::RangeInclusive<u32> = 1..=8;

/// Refuses a weight width outside [`WEIGHT_BITS`].
pub fn check_weight_bits(what: &str, bits: u32) -> Result<(), String> {
    if WEIGHT_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(format!("{what} must be between 1 and 8 bits, got {bits}"))
    }
}

/// The largest code of a symmetric grid of `bits` bits, `2^(bits−1) − 1`; 1 for one bit,
/// whose two codes are ±1.
pub fn max_code(bits: u32) -> i32 {
    if bits == 1 {
        1
    } else {
        (1i32 << (bits - 1)) - 1
    }
}

/// Refuses a bit width outside [`BITS`]; `what` names the flag or key.
pub fn check_bits(what: &str, bits: u32) -> Result<(), String> {
    if BITS.contains(&bits) {
        Ok(())
    } else {
        Err(format!(
            "{what} must be between {} and {} bits, got {bits} (1 bit is binarization)",
            BITS.start(),
            BITS.end()
        ))
    }
}

/// The parameters of one quantizer: `x̂ = (q - zero_point) · scale`, `q` in `lo ..= hi`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quantizer {
    pub scale: f32,
    pub zero_point: i32,
    pub lo: i32,
    pub hi: i32,
}

impl Quantizer {
    /// Symmetric signed quantization of values in `[-max_abs, max_abs]` to `bits` bits (at
    /// 1 bit, values of magnitude `max_abs` keep their sign and 0 has no code: see
    /// [`max_code`]).
    pub fn symmetric(max_abs: f32, bits: u32) -> Quantizer {
        let hi = max_code(bits);
        Quantizer {
            scale: step(max_abs / hi as f32),
            zero_point: 0,
            lo: -hi,
            hi,
        }
    }

    /// Symmetric signed quantization on a given step: codes up to `±max_code(bits)`.
    pub fn symmetric_step(scale: f32, bits: u32) -> Quantizer {
        let hi = max_code(bits);
        Quantizer {
            scale,
            zero_point: 0,
            lo: -hi,
            hi,
        }
    }

    /// The grid of an XNOR-Net layer's input, which is taken as its signs: ±1 (and 0 only in a
    /// convolution's zero padding).
    pub fn signs() -> Quantizer {
        Quantizer {
            scale: 1.0,
            zero_point: 0,
            lo: -1,
            hi: 1,
        }
    }

    /// Asymmetric unsigned quantization of values in `[min, max]` (widened to contain 0) to
    /// `bits` bits; 0 is exactly representable.
    pub fn asymmetric(min: f32, max: f32, bits: u32) -> Quantizer {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let hi = (1i32 << bits) - 1;
        let scale = step((max - min) / hi as f32);
        let zero_point = ((-min / scale).round() as i32).clamp(0, hi);
        Quantizer {
            scale,
            zero_point,
            lo: 0,
            hi,
        }
    }

    /// Bits of the codes: `log2(hi − lo + 1)`, rounded down.
    pub fn bits(&self) -> u32 {
        ((self.hi - self.lo).max(0) as u32 + 1).ilog2()
    }

    pub fn quantize(&self, x: f32) -> i32 {
        ((x / self.scale).round() as i32)
            .saturating_add(self.zero_point)
            .clamp(self.lo, self.hi)
    }

    /// [`Quantizer::quantize`] for an unsigned 8-bit quantizer, written so that a loop of it
    /// vectorises: after clamping to `[lo, hi]` the value is non-negative, so adding 0.5 and
    /// truncating rounds it (`f32::round` is a library call on baseline x86-64, without
    /// SSE4.1), and it multiplies by `1 / scale` rather than dividing (the int8 epilogues do
    /// this per output: see `kernels::int8::round_u8`). The code is the same as `quantize`'s
    /// but for exact negative ties and values within an ulp of a rounding boundary.
    pub fn quantize_u8(&self, x: f32) -> u8 {
        let (offset, lo, hi) = self.u8_rounding();
        crate::kernels::int8::round_u8(x, 1.0 / self.scale, offset, lo, hi)
    }

    /// [`Quantizer::quantize_u8`] over a whole input, on the vector path where the CPU has one
    /// (`kernels::int8::quantize_u8`); the same bytes.
    pub fn quantize_u8_slice(&self, x: &[f32], out: &mut [u8]) {
        let (offset, lo, hi) = self.u8_rounding();
        crate::kernels::int8::quantize_u8(x, 1.0 / self.scale, offset, lo, hi, out);
    }

    /// The unsigned rounding as the int8 kernels take it, to requantize in an epilogue: the
    /// same codes as [`Quantizer::quantize_u8`].
    pub fn rounding(&self) -> crate::kernels::int8::Rounding {
        let (offset, lo, hi) = self.u8_rounding();
        crate::kernels::int8::Rounding {
            inverse: 1.0 / self.scale,
            offset,
            lo,
            hi,
        }
    }

    /// The offset and bounds of the unsigned rounding: `+ 0.5` then truncation rounds, and the
    /// upper bound stays below `hi + 0.5` so it truncates to `hi`.
    fn u8_rounding(&self) -> (f32, f32, f32) {
        assert!(
            self.lo >= 0 && self.hi <= 255,
            "an unsigned 8-bit quantizer is needed"
        );
        (
            self.zero_point as f32 + 0.5,
            self.lo as f32,
            self.hi as f32 + 0.49,
        )
    }

    pub fn dequantize(&self, q: i32) -> f32 {
        (q - self.zero_point) as f32 * self.scale
    }

    /// `dequantize(quantize(x))`: what the network sees of `x` (fake quantization).
    pub fn round_trip(&self, x: f32) -> f32 {
        self.dequantize(self.quantize(x))
    }

    /// The values represented without clipping: `[dequantize(lo), dequantize(hi)]`.
    pub fn range(&self) -> (f32, f32) {
        (self.dequantize(self.lo), self.dequantize(self.hi))
    }
}

/// A usable step for a range: a range of 0 (all values equal, or all zero) still gets a
/// positive step, so quantization never divides by zero.
fn step(s: f32) -> f32 {
    if s.is_finite() && s > 0.0 {
        s
    } else {
        f32::MIN_POSITIVE.max(1e-8)
    }
}

/// Per-output-channel symmetric quantizers for a weight whose first dimension is the output
/// channel (conv `[out, in, kh, kw]`, or a linear weight transposed to `[out, in]`), and its
/// quantized values.
pub fn quantize_per_channel(
    weights: &[f32],
    channels: usize,
    bits: u32,
) -> (Vec<Quantizer>, Vec<i8>) {
    assert!(channels > 0 && weights.len().is_multiple_of(channels));
    assert!(BITS.contains(&bits));
    let per = weights.len() / channels;
    let mut quantizers = Vec::with_capacity(channels);
    let mut q = Vec::with_capacity(weights.len());
    for row in weights.chunks_exact(per.max(1)).take(channels) {
        let max_abs = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let quant = Quantizer::symmetric(max_abs, bits);
        q.extend(row.iter().map(|&w| quant.quantize(w) as i8));
        quantizers.push(quant);
    }
    (quantizers, q)
}

/// How an activation range is chosen from calibration data.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Calibration {
    /// The smallest and largest values seen.
    MinMax,
    /// Clip at this percentile of the values seen (e.g. 99.99): outliers cost the rest less
    /// resolution.
    Percentile(f64),
    /// The clipping range that minimises the mean squared quantization error over the values
    /// seen (a search over a histogram, as in TensorRT's and NNCF's MSE calibration).
    Mse,
}

/// Bins of the histogram an [`Observer`] keeps (over `[min, max]` seen so far).
const BINS: usize = 2048;

/// Sees activations batch by batch and proposes their quantizer. Keeps the running minimum and
/// maximum and a histogram of the values (re-binned when the range grows), so percentile and
/// MSE calibration work on any number of batches in bounded memory.
#[derive(Debug, Clone)]
pub struct Observer {
    min: f32,
    max: f32,
    count: u64,
    hist: Vec<u64>,
    /// The range `hist` covers.
    lo: f32,
    hi: f32,
}

impl Default for Observer {
    fn default() -> Self {
        Observer {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
            hist: vec![0; BINS],
            lo: 0.0,
            hi: 0.0,
        }
    }
}

impl Observer {
    /// Adds `values` (non-finite ones are refused: calibration on a damaged network is an
    /// error, not a range).
    pub fn observe(&mut self, values: &[f32]) -> Result<(), String> {
        if values.iter().any(|v| !v.is_finite()) {
            return Err("calibration saw a NaN or infinite activation".into());
        }
        let Some((lo, hi)) = values
            .iter()
            .fold(None, |acc: Option<(f32, f32)>, &v| match acc {
                None => Some((v, v)),
                Some((a, b)) => Some((a.min(v), b.max(v))),
            })
        else {
            return Ok(());
        };
        self.min = self.min.min(lo);
        self.max = self.max.max(hi);
        // The histogram covers [min(0, min), max(0, max)]: grow it (merging bins) if needed.
        let (new_lo, new_hi) = (self.min.min(0.0), self.max.max(0.0));
        if self.count == 0 {
            self.lo = new_lo;
            self.hi = new_hi;
        } else if new_lo < self.lo || new_hi > self.hi {
            let old = std::mem::replace(&mut self.hist, vec![0; BINS]);
            let (old_lo, old_hi) = (self.lo, self.hi);
            self.lo = new_lo;
            self.hi = new_hi;
            let width = (old_hi - old_lo) / BINS as f32;
            for (i, &c) in old.iter().enumerate() {
                if c > 0 {
                    let centre = old_lo + (i as f32 + 0.5) * width;
                    let b = self.bin(centre);
                    self.hist[b] += c;
                }
            }
        }
        for &v in values {
            let b = self.bin(v);
            self.hist[b] += 1;
        }
        self.count += values.len() as u64;
        Ok(())
    }

    fn bin(&self, v: f32) -> usize {
        let width = (self.hi - self.lo).max(f32::MIN_POSITIVE);
        (((v - self.lo) / width * BINS as f32) as usize).min(BINS - 1)
    }

    /// How many values were seen.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The quantizer for what was seen, at `bits` unsigned bits. Refuses an observer that saw
    /// nothing (an empty calibration set).
    pub fn quantizer(&self, calibration: Calibration, bits: u32) -> Result<Quantizer, String> {
        if self.count == 0 {
            return Err("calibration saw no values: give it at least one image".into());
        }
        let (lo, hi) = match calibration {
            Calibration::MinMax => (self.min, self.max),
            Calibration::Percentile(p) => {
                if !(p > 50.0 && p <= 100.0) {
                    return Err(format!("percentile must be in (50, 100], got {p}"));
                }
                (
                    self.quantile(1.0 - p / 100.0).max(self.min),
                    self.quantile(p / 100.0).min(self.max),
                )
            }
            Calibration::Mse => self.mse_range(bits),
        };
        Ok(Quantizer::asymmetric(lo, hi, bits))
    }

    /// The value below which a fraction `f` of what was seen lies (bin resolution).
    fn quantile(&self, f: f64) -> f32 {
        let target = (f * self.count as f64).ceil() as u64;
        let width = (self.hi - self.lo) / BINS as f32;
        let mut seen = 0u64;
        for (i, &c) in self.hist.iter().enumerate() {
            seen += c;
            if seen >= target.max(1) {
                return self.lo + (i as f32 + 1.0) * width;
            }
        }
        self.hi
    }

    /// The range `[lo, hi]` (shrunk from the observed one in 1/128 steps at either end) whose
    /// quantizer gives the smallest squared error over the histogram, clipping included.
    fn mse_range(&self, bits: u32) -> (f32, f32) {
        let width = (self.hi - self.lo) / BINS as f32;
        let centres: Vec<(f32, f64)> = self
            .hist
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, &c)| (self.lo + (i as f32 + 0.5) * width, c as f64))
            .collect();
        let error = |lo: f32, hi: f32| -> f64 {
            let q = Quantizer::asymmetric(lo, hi, bits);
            centres
                .iter()
                .map(|&(x, c)| {
                    let d = (q.round_trip(x) - x) as f64;
                    d * d * c
                })
                .sum()
        };
        let mut best = (self.min, self.max, error(self.min, self.max));
        for s in 1..128 {
            let f = 1.0 - s as f32 / 128.0;
            let (lo, hi) = (self.min * f, self.max * f);
            let e = error(lo, hi);
            if e < best.2 {
                best = (lo, hi, e);
            }
        }
        (best.0, best.1)
    }
}

/// How a model's conv and linear layers are quantized: what the int8 runtime builds its layers
/// from, and what a version-2 `.cpz` file records (`compress::format`). Layers not listed stay
/// in float (the first and last, often: Jacob et al. 2018, section 3.1, keep them wider).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct QuantSpec {
    /// By layer path (`layers.0`).
    pub layers: std::collections::BTreeMap<String, QuantLayer>,
}

/// One quantized layer: its weights are `code · weight_scales[o]` with `code` in
/// `±max_code(bits)` (at 1 bit exactly ±1), and its input is quantized by `input`, or, with
/// `sign_input`, taken as its signs (XNOR-Net, issue #13; `input` is then
/// [`Quantizer::signs`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuantLayer {
    pub bits: u32,
    pub input: Quantizer,
    /// Binary activations: the layer sees `sign(x)`, +1 for `x >= 0`, and runs on the
    /// XNOR-popcount kernels (`kernels::binary`). Absent in files before version 3.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sign_input: bool,
    /// Real-valued inputs kept in float: a layer of 1-bit weights, or 2-bit ternary codes
    /// (±1 and 0), that runs on the table-lookup kernels (`kernels::binary::lookup`), additions
    /// only, as BWN and TWN train it. `input` then records the range calibrated, for the int8
    /// kernels that `binarize --inputs int8` picks instead. Absent in files before it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub float_input: bool,
    /// One step per output channel. Kept in the tensor's section of the file (4 bytes each),
    /// not in its JSON header.
    #[serde(skip)]
    pub weight_scales: Vec<f32>,
}

impl QuantLayer {
    /// The largest weight code.
    pub fn max_code(&self) -> i32 {
        max_code(self.bits)
    }

    /// Bits of the layer's input as the runtime takes it: 32 where it stays in float.
    pub fn input_bits(&self) -> u32 {
        if self.float_input {
            32
        } else {
            self.input.bits()
        }
    }

    /// The codes of the layer's dequantized weights `w`, whose output channel is the first
    /// axis (conv `[out, in, kh, kw]`) or the last (Burn's linear `[in, out]`).
    pub fn codes(&self, w: &[f32], channel_last: bool) -> Vec<i8> {
        let channels = self.weight_scales.len().max(1);
        let inner = if channel_last { 1 } else { w.len() / channels };
        let hi = self.max_code();
        w.iter()
            .enumerate()
            .map(|(i, &v)| {
                let s = self.weight_scales[(i / inner.max(1)) % channels];
                code_of(v, s).clamp(-hi, hi) as i8
            })
            .collect()
    }

    /// The per-channel quantizers of the weights.
    pub fn weight_quantizers(&self) -> Vec<Quantizer> {
        let hi = self.max_code();
        self.weight_scales
            .iter()
            .map(|&scale| Quantizer {
                scale,
                zero_point: 0,
                lo: -hi,
                hi,
            })
            .collect()
    }
}

/// The code of weight `w` on step `scale`. Weights written as `code · scale` in f32 come back to
/// their code exactly (the product's relative error is 2^-24, far below half a step for codes of
/// 8 bits), so a quantized model can be held as its dequantized floats plus its scales.
pub fn code_of(w: f32, scale: f32) -> i32 {
    (w / scale).round() as i32
}

impl QuantSpec {
    /// The kinds of the runtime's kernels that run the quantized layers, each as its label for
    /// tables and its name in words: int8, XNOR-popcount (layers with binary inputs),
    /// table-lookup (binary or ternary weights on float inputs).
    fn runtime_kinds(&self) -> Vec<(&'static str, &'static str)> {
        let has = |f: fn(&QuantLayer) -> bool| self.layers.values().any(f);
        [
            (("int8", "int8"), has(|l| !l.sign_input && !l.float_input)),
            (("xnor", "XNOR-popcount"), has(|l| l.sign_input)),
            (("lookup", "table-lookup"), has(|l| l.float_input)),
        ]
        .into_iter()
        .filter_map(|(kind, on)| on.then_some(kind))
        .collect()
    }

    /// [`QuantSpec::runtime_kinds`] as a short label for tables: `int8`, `xnor`, `lookup`, or
    /// those joined by `+` (`int8+xnor`).
    pub fn runtime_label(&self) -> String {
        let labels: Vec<&str> = self.runtime_kinds().iter().map(|k| k.0).collect();
        labels.join("+")
    }

    /// [`QuantSpec::runtime_kinds`] in words, for messages.
    pub fn kernels(&self) -> String {
        let words: Vec<&str> = self.runtime_kinds().iter().map(|k| k.1).collect();
        match words.as_slice() {
            [one] => format!("{one} kernels"),
            [rest @ .., last] => format!("{} and {last} kernels", rest.join(", ")),
            [] => "float kernels".into(),
        }
    }

    /// Checks the spec against the model: every path a conv or linear layer, weight bits in
    /// [`WEIGHT_BITS`], a valid unsigned input quantizer of 2 to 8 bits (or, for a layer with
    /// binary inputs, 1-bit weights and the sign grid), one positive step per output channel,
    /// and every weight a whole number of steps within the layer's codes (at 1 bit, ±1). `weight` gives a layer's
    /// weight values and its output-channel count.
    pub fn check(
        &self,
        arch: &crate::models::Arch,
        weight: impl Fn(&str) -> Result<(Vec<f32>, Vec<usize>), String>,
    ) -> Result<(), String> {
        let stats = arch.layer_stats();
        for (path, l) in &self.layers {
            let kind = stats
                .iter()
                .find(|s| &s.path == path)
                .map(|s| s.kind)
                .ok_or_else(|| format!("quantized layer {path} is not a layer of the model"))?;
            let axis = match kind {
                "conv2d" => 0,
                "linear" => 1,
                other => return Err(format!("quantized layer {path} is a {other} layer")),
            };
            check_weight_bits(&format!("{path}: bits"), l.bits)?;
            if l.float_input && (l.sign_input || l.bits > 2) {
                return Err(format!(
                    "{path}: float inputs need 1-bit or 2-bit (ternary) weights and no sign input"
                ));
            }
            let q = l.input;
            if l.sign_input && (q != Quantizer::signs() || l.bits != 1) {
                return Err(format!(
                    "{path}: a layer with binary inputs needs 1-bit weights and the sign grid as its input quantizer"
                ));
            }
            // The runtime rounds by `1 / scale`, which must be finite too.
            let ok = l.sign_input
                || q.scale.is_finite()
                    && q.scale > 0.0
                    && (1.0 / q.scale).is_finite()
                    && q.lo == 0
                    && (3..=255).contains(&q.hi)
                    && (q.hi + 1).count_ones() == 1
                    && (q.lo..=q.hi).contains(&q.zero_point);
            if !ok {
                return Err(format!(
                    "{path}: input quantizer {q:?} is not an unsigned one of 2 to 8 bits"
                ));
            }
            let (w, shape) = weight(&format!("{path}.weight"))?;
            let channels = shape[axis];
            if l.weight_scales.len() != channels {
                return Err(format!(
                    "{path}: {} weight scales for {channels} output channels",
                    l.weight_scales.len()
                ));
            }
            if l.weight_scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                return Err(format!("{path}: a weight scale is not a positive number"));
            }
            let inner: usize = shape[axis + 1..].iter().product();
            let hi = l.max_code();
            for (i, &v) in w.iter().enumerate() {
                let s = l.weight_scales[(i / inner) % channels];
                let c = v / s;
                let off_grid = (c - c.round()).abs() > 1e-3 || c.round().abs() > hi as f32;
                if off_grid || (l.bits == 1 && c.round() == 0.0) {
                    return Err(format!(
                        "{path}: weight {i} ({v}) is not a code of {} bits on step {s}",
                        l.bits
                    ));
                }
            }
        }
        Ok(())
    }
}
