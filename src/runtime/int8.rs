//! Int8 layers of the compressed-inference runtime (issue #12): weights quantized
//! symmetrically per output channel, the input per tensor (unsigned, with a zero point), the
//! product in exact 32-bit integers on [`crate::kernels::int8`], then one multiply-add per
//! output with the bias, and ReLU when one follows:
//!
//! `y[o] = s_x · s_w[o] · (Σ_k q_x[k] · q_w[o][k] − z_x · Σ_k q_w[o][k]) + b[o]`
//!
//! (Jacob et al. 2018, eq. 7: the zero point leaves the inner loop through the weights' row
//! sums, which are computed once). A convolution is the same product on the patches of its
//! u8 input padded with the zero point (the code of 0.0): on AVX2 read straight from the
//! padded input (`Blocked::gemm_gathered_with`), elsewhere from im2col rows.
//!
//! A layer whose output goes (through max-pooling, ReLU or flattening) to another int8 layer
//! requantizes `y` to that layer's input codes in the same epilogue ([`Int8Conv::emit_codes`]):
//! between int8 layers the activations are u8, channels last, and never written as floats.
//! Otherwise it gives `f32` values, and the layers also drop into [`super::LinearKernel`] and
//! [`super::conv::Conv2dKernel`].

use super::conv::{Conv2dKernel, ConvGeometry};
use super::{Activations, LinearKernel};
use crate::compress::quantize::{Quantizer, check_bits, quantize_per_channel};
use crate::kernels::int8::{self, Dequant, Int8Gemm, PANEL, Rounding, Sums};
use rayon::prelude::*;
use std::borrow::Cow;
use std::cell::Cell;

/// Element counts below this run on the calling thread.
const PARALLEL_MIN: usize = 32 * 1024;

/// Which int8 path runs the product. (One per layer: the packed weights stay inline.)
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum Kernel {
    /// One path for every batch (tests force each one).
    Fixed(&'static dyn Int8Gemm),
    /// The best row-by-row path for products of fewer than 4 rows (a matrix-vector product
    /// reads each weight once either way), the register-blocked kernel on packed weights
    /// above: on VNNI quads where the CPU has AVX-512 VNNI, else on `vpmaddubsw` quads where
    /// every weight lies in [-64, 64] (7-bit weights), else on widened pairs.
    Auto {
        rows: &'static dyn Int8Gemm,
        blocked: Option<(int8::Blocked, int8::PackedB)>,
        quads: Option<int8::PackedQuads>,
    },
}

/// The integer product of one layer and its epilogue: `[m, k]` u8 rows times the `[n, k]`
/// int8 weights, then values or the next layer's codes.
#[derive(Clone)]
struct Product {
    n: usize,
    k: usize,
    /// `[n, k]` codes.
    weight: Vec<i8>,
    weight_q: Vec<Quantizer>,
    /// `s_x · s_w[o]` per output channel, padded with zeros to whole panels of 16.
    scales: Vec<f32>,
    /// `b[o] − z_x · Σ_k q_w[o][k] · s_x · s_w[o]` per output channel (the zero point's share
    /// of each sum, taken out through the weights' row sums, and the bias), padded like
    /// `scales`: with them, the epilogue's one multiply-add.
    offsets: Vec<f32>,
    bias: Option<Vec<f32>>,
    input: Quantizer,
    relu: bool,
    kernel: Kernel,
    /// The next int8 layer's input quantizer, when this layer hands it codes.
    emit: Option<Quantizer>,
}

/// What an epilogue writes: `f32` values or `u8` codes, of a task's rows or of one panel of
/// a row.
trait Out: Copy + Default + Send + Sync {
    fn rows(d: &Dequant, next: Option<Rounding>, sums: &Sums, out: &mut [Self]);
    fn panel(d: &Dequant, next: Option<Rounding>, p: usize, lanes: &[i32; PANEL], out: &mut [Self]);
}

impl Out for f32 {
    fn rows(d: &Dequant, _: Option<Rounding>, sums: &Sums, out: &mut [f32]) {
        d.values_rows(sums, out);
    }

    fn panel(d: &Dequant, _: Option<Rounding>, p: usize, lanes: &[i32; PANEL], out: &mut [f32]) {
        d.values(p, lanes, out);
    }
}

impl Out for u8 {
    fn rows(d: &Dequant, next: Option<Rounding>, sums: &Sums, out: &mut [u8]) {
        d.codes_rows(
            sums,
            next.expect("codes need the next layer's rounding"),
            out,
        );
    }

    fn panel(d: &Dequant, next: Option<Rounding>, p: usize, lanes: &[i32; PANEL], out: &mut [u8]) {
        d.codes(
            p,
            lanes,
            next.expect("codes need the next layer's rounding"),
            out,
        );
    }
}

impl Product {
    fn new(
        n: usize,
        k: usize,
        weight: Vec<i8>,
        weight_q: Vec<Quantizer>,
        bias: Option<Vec<f32>>,
        input: Quantizer,
    ) -> Result<Product, String> {
        if n == 0 || k == 0 || weight.len() != n * k || weight_q.len() != n {
            return Err(format!(
                "{} weight codes and {} scales for {n} channels of {k} inputs",
                weight.len(),
                weight_q.len()
            ));
        }
        if k > int8::MAX_K {
            return Err(format!(
                "{k} inputs per output: more than the {} whose int8 sums fit in 32 bits",
                int8::MAX_K
            ));
        }
        check_unsigned(&input)?;
        if weight_q
            .iter()
            .any(|q| !(q.scale.is_finite() && q.scale > 0.0))
        {
            return Err("a weight scale is not a positive number".into());
        }
        if bias.as_ref().is_some_and(|b| b.len() != n) {
            return Err("bias length differs from the output channels".into());
        }
        let zero_sums: Vec<i64> = weight
            .chunks_exact(k)
            .map(|r| input.zero_point as i64 * r.iter().map(|&v| v as i64).sum::<i64>())
            .collect();
        let padded = n.div_ceil(PANEL) * PANEL;
        let mut scales: Vec<f32> = weight_q.iter().map(|q| input.scale * q.scale).collect();
        let mut offsets: Vec<f32> = (0..n)
            .map(|o| {
                let b = bias.as_ref().map_or(0.0, |b| b[o]) as f64;
                (b - zero_sums[o] as f64 * scales[o] as f64) as f32
            })
            .collect();
        scales.resize(padded, 0.0);
        offsets.resize(padded, 0.0);
        let blocked = int8::Blocked::best().map(|kb| (kb, int8::PackedB::new(n, k, &weight)));
        let quads = blocked
            .as_ref()
            .and_then(|(kb, _)| kb.pack_quads(n, k, &weight));
        Ok(Product {
            n,
            k,
            weight,
            weight_q,
            scales,
            offsets,
            bias,
            input,
            relu: false,
            kernel: Kernel::Auto {
                rows: int8::best(),
                blocked,
                quads,
            },
            emit: None,
        })
    }

    /// Quantizes `weight` (`[n, k]` row-major) to `bits` bits per output channel.
    fn quantizing(
        n: usize,
        k: usize,
        weight: &[f32],
        bias: Option<Vec<f32>>,
        bits: u32,
        input: Quantizer,
    ) -> Result<Product, String> {
        check_bits("bits", bits)?;
        if n == 0 || weight.len() != n * k {
            return Err(format!(
                "weight of {} values for {n} channels of {k} inputs",
                weight.len()
            ));
        }
        let (weight_q, codes) = quantize_per_channel(weight, n, bits);
        Product::new(n, k, codes, weight_q, bias, input)
    }

    /// The same product with its columns (inputs) reordered: new column `j` is old column
    /// `from[j]`.
    fn permuted(&self, from: &[usize]) -> Product {
        assert_eq!(from.len(), self.k, "a permutation of every input");
        let weight: Vec<i8> = self
            .weight
            .chunks_exact(self.k)
            .flat_map(|row| from.iter().map(|&j| row[j]))
            .collect();
        let mut p = Product::new(
            self.n,
            self.k,
            weight,
            self.weight_q.clone(),
            self.bias.clone(),
            self.input,
        )
        .expect("a permutation keeps a valid layer valid");
        p.relu = self.relu;
        p.emit = self.emit;
        if let Kernel::Fixed(k) = self.kernel {
            p.kernel = Kernel::Fixed(k);
        }
        p
    }

    fn kernel_name(&self, m: usize) -> &'static str {
        match &self.kernel {
            Kernel::Fixed(k) => k.name(),
            Kernel::Auto {
                blocked: Some((kb, _)),
                quads: Some(_),
                ..
            } if m >= 4 => kb.quads_name(),
            Kernel::Auto {
                blocked: Some((k, _)),
                ..
            } if m >= 4 => k.name(),
            Kernel::Auto { rows, .. } => rows.name(),
        }
    }

    fn dequant(&self) -> Dequant<'_> {
        Dequant {
            scales: &self.scales,
            offsets: &self.offsets,
            relu: self.relu,
        }
    }

    /// The epilogue of one task of the blocked kernel: its rows of sums into `out`.
    fn finish<T: Out>(&self, sums: &Sums, next: Option<Rounding>, out: &mut [T]) {
        T::rows(&self.dequant(), next, sums, out);
    }

    /// The epilogue on row-major sums `[m, n]` (the row-by-row paths).
    fn finish_rows<T: Out>(&self, acc: &[i32], next: Option<Rounding>, out: &mut [T]) {
        let d = self.dequant();
        let run = |(row, o): (&[i32], &mut [T])| {
            for (p, (a, o)) in row.chunks(PANEL).zip(o.chunks_mut(PANEL)).enumerate() {
                let mut lanes = [0i32; PANEL];
                lanes[..a.len()].copy_from_slice(a);
                T::panel(&d, next, p, &lanes, o);
            }
        };
        if acc.len() >= PARALLEL_MIN {
            acc.par_chunks(self.n)
                .zip(out.par_chunks_mut(self.n))
                .for_each(run);
        } else {
            acc.chunks(self.n).zip(out.chunks_mut(self.n)).for_each(run);
        }
    }

    /// `out` (`[m, n]`) from `m` rows of codes `a` (`[m, k]`).
    fn rows<T: Out>(&self, m: usize, a: &[u8], next: Option<Rounding>, out: &mut [T]) {
        let epilogue = |_: usize, sums: &Sums, out: &mut [T]| self.finish(sums, next, out);
        match &self.kernel {
            Kernel::Auto {
                blocked: Some((kb, _)),
                quads: Some(quads),
                ..
            } if m >= 4 => {
                let a4 = match self.k % 4 {
                    0 => Cow::Borrowed(a),
                    _ => Cow::Owned(int8::quads_of(a, self.k, quads.quads())),
                };
                kb.gemm_quads_with(m, quads, &a4, out, self.n, &epilogue);
            }
            Kernel::Auto {
                blocked: Some((kb, packed)),
                ..
            } if m >= 4 => {
                kb.gemm_packed_with(m, packed, a, out, self.n, &epilogue);
            }
            _ => {
                let acc = self.sums(m, a);
                self.finish_rows(&acc, next, out);
            }
        }
    }

    /// The exact i32 sums `[m, n]` of `m` rows of codes `a`, on a row-by-row path.
    fn sums(&self, m: usize, a: &[u8]) -> Vec<i32> {
        let mut acc = vec![0i32; m * self.n];
        let kernel = match &self.kernel {
            Kernel::Fixed(k) => *k,
            Kernel::Auto { rows, .. } => *rows,
        };
        kernel.gemm(m, self.n, self.k, a, &self.weight, &mut acc);
        acc
    }

    /// The codes of this layer's input: quantized from values, or handed over by the int8
    /// layer before (which requantized them to this layer's quantizer).
    fn input_codes<'a>(&self, x: Input<'a>) -> Cow<'a, [u8]> {
        match x {
            Input::Values(v) => {
                let mut codes = vec![0u8; v.len()];
                let quantize = |(x, c): (&[f32], &mut [u8])| self.input.quantize_u8_slice(x, c);
                if v.len() >= 2 * PARALLEL_MIN {
                    v.par_chunks(PARALLEL_MIN)
                        .zip(codes.par_chunks_mut(PARALLEL_MIN))
                        .for_each(quantize);
                } else {
                    quantize((v, &mut codes));
                }
                Cow::Owned(codes)
            }
            Input::Codes(codes, quantizer) => {
                assert_eq!(
                    quantizer, self.input,
                    "int8 layer: codes of another quantizer than its input's"
                );
                Cow::Borrowed(codes)
            }
        }
    }

    fn weight_bytes(&self) -> usize {
        // One byte per weight, a scale per channel, the bias.
        self.weight.len() + 4 * self.weight_q.len() + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }
}

/// A layer's input, borrowed from [`Activations`].
#[derive(Clone, Copy)]
enum Input<'a> {
    /// Channels first.
    Values(&'a [f32]),
    /// Channels last.
    Codes(&'a [u8], Quantizer),
}

impl<'a> Input<'a> {
    fn of(x: &'a Activations) -> Input<'a> {
        match x {
            Activations::Values(v) => Input::Values(v),
            Activations::Codes { codes, quantizer } => Input::Codes(codes, *quantizer),
        }
    }

    fn len(&self) -> usize {
        match self {
            Input::Values(v) => v.len(),
            Input::Codes(c, _) => c.len(),
        }
    }
}

/// An unsigned input quantizer of at most 8 bits, its zero point in range, its step positive.
fn check_unsigned(q: &Quantizer) -> Result<(), String> {
    if q.lo < 0 || q.hi > 255 || q.lo > q.zero_point || q.zero_point > q.hi {
        return Err(
            "the input quantizer must be unsigned 8-bit at most, its zero point in range".into(),
        );
    }
    // Inputs are rounded by `1 / scale`, which must be finite too.
    if !(q.scale.is_finite() && q.scale > 0.0 && (1.0 / q.scale).is_finite()) {
        return Err(format!(
            "input scale {} is not a positive number with a finite inverse",
            q.scale
        ));
    }
    Ok(())
}

/// The methods both int8 layers have, on the [`Product`] each holds as `p`; `$layout` is the
/// layout of its weight codes.
macro_rules! shared_accessors {
    ($layout:literal) => {
        /// The same layer on another int8 path (tests force each one).
        pub fn with_kernel(mut self, kernel: &'static dyn Int8Gemm) -> Self {
            self.p.kernel = Kernel::Fixed(kernel);
            self
        }

        /// The same layer with ReLU applied in its epilogue.
        pub fn with_relu(mut self) -> Self {
            self.p.relu = true;
            self
        }

        #[doc = concat!("The weight codes (`", $layout, "`; a linear layer's inputs channels last after [`Int8Linear::channels_last_input`]) and their per-channel quantizers.")]
        pub fn weights(&self) -> (&[i8], &[Quantizer]) {
            (&self.p.weight, &self.p.weight_q)
        }

        /// The input quantizer.
        pub fn input_quantizer(&self) -> Quantizer {
            self.p.input
        }

        /// The same layer handing its output to the int8 layer after it as codes of that
        /// layer's input quantizer `next` ([`Activations::Codes`], channels last), requantized
        /// in its epilogue, instead of as values.
        pub fn emit_codes(mut self, next: Quantizer) -> Result<Self, String> {
            check_unsigned(&next)?;
            self.p.emit = Some(next);
            Ok(self)
        }

        /// The quantizer of the codes this layer hands on, if it does.
        pub fn emits(&self) -> Option<Quantizer> {
            self.p.emit
        }
    };
}

/// `y = x Wᵀ + b` on int8 weights and u8 inputs.
#[derive(Clone)]
pub struct Int8Linear {
    p: Product,
}

impl Int8Linear {
    /// Quantizes `weight` (`[out, in]` row-major) to `bits` bits per output channel; `input`
    /// quantizes the layer's input (from calibration, 8-bit unsigned at most).
    pub fn new(
        in_features: usize,
        out_features: usize,
        weight: &[f32],
        bias: Option<Vec<f32>>,
        bits: u32,
        input: Quantizer,
    ) -> Result<Int8Linear, String> {
        Ok(Int8Linear {
            p: Product::quantizing(out_features, in_features, weight, bias, bits, input)?,
        })
    }

    /// The layer of weight codes already quantized (`[out, in]`, with their per-channel
    /// quantizers), as a quantized model file holds them.
    pub fn from_codes(
        in_features: usize,
        out_features: usize,
        codes: Vec<i8>,
        weight_q: Vec<Quantizer>,
        bias: Option<Vec<f32>>,
        input: Quantizer,
    ) -> Result<Int8Linear, String> {
        Ok(Int8Linear {
            p: Product::new(out_features, in_features, codes, weight_q, bias, input)?,
        })
    }

    shared_accessors!("[out, in]");

    /// The path that runs a batch of `batch` rows.
    pub fn kernel_name(&self, batch: usize) -> &'static str {
        self.p.kernel_name(batch)
    }

    /// The same layer taking its inputs of a `[C, H, W]` map flattened channels last (the
    /// order of [`Activations::Codes`]) instead of channels first, as flattening gives them.
    pub fn channels_last_input(self, [c, h, w]: [usize; 3]) -> Result<Self, String> {
        if c * h * w != self.p.k {
            return Err(format!(
                "a {c}x{h}x{w} map is not the {} inputs of the layer",
                self.p.k
            ));
        }
        // Input `(pos, ch)` channels last was input `ch · H·W + pos` channels first.
        let from: Vec<usize> = (0..h * w)
            .flat_map(|pos| (0..c).map(move |ch| ch * h * w + pos))
            .collect();
        Ok(Int8Linear {
            p: self.p.permuted(&from),
        })
    }

    /// The layer on a batch of `batch` rows: values, or codes for the next int8 layer.
    pub fn run(&self, x: &Activations, batch: usize) -> Activations {
        let codes = self.p.input_codes(Input::of(x));
        assert_eq!(codes.len(), batch * self.p.k, "input size");
        match self.p.emit {
            Some(next) => {
                let mut out = vec![0u8; batch * self.p.n];
                self.p.rows(batch, &codes, Some(next.rounding()), &mut out);
                Activations::Codes {
                    codes: out,
                    quantizer: next,
                }
            }
            None => {
                let mut out = vec![0f32; batch * self.p.n];
                self.p.rows(batch, &codes, None, &mut out);
                Activations::Values(out)
            }
        }
    }
}

impl std::fmt::Debug for Int8Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Int8Linear")
            .field("in_features", &self.p.k)
            .field("out_features", &self.p.n)
            .field("input", &self.p.input)
            .field("relu", &self.p.relu)
            .field("kernel", &self.kernel_name(64))
            .finish_non_exhaustive()
    }
}

impl LinearKernel for Int8Linear {
    fn in_features(&self) -> usize {
        self.p.k
    }
    fn out_features(&self) -> usize {
        self.p.n
    }
    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        assert_eq!(x.len(), batch * self.p.k);
        assert_eq!(y.len(), batch * self.p.n);
        let codes = self.p.input_codes(Input::Values(x));
        self.p.rows(batch, &codes, None, y);
    }
    fn weight_bytes(&self) -> usize {
        self.p.weight_bytes()
    }
}

/// A 2-D convolution (one group) on int8 weights and u8 inputs: one [`Int8Gemm`] product for
/// the whole batch over its patches (read from the padded input on AVX2, from im2col rows
/// otherwise), the epilogue into values `[batch, out, H', W']` or the next layer's codes
/// `[batch, H', W', out]`.
#[derive(Clone)]
pub struct Int8Conv {
    geometry: ConvGeometry,
    p: Product,
    /// For the blocked AVX2 kernel reading patches straight from the input: how the input is
    /// laid out so that every pair of reduction steps is two neighbouring values, and the
    /// weights packed in that order. `None` without AVX2, where neither layout fits, or where
    /// the padded steps would exceed `int8::MAX_K`.
    gather: Option<(Gather, int8::PackedB)>,
    /// With channels a multiple of 4, and VNNI or 7-bit weights: the weights in the
    /// channels-last order as quads for `vpdpbusd` or `vpmaddubsw`, read against the padded
    /// input's codes (no widening).
    quads: Option<int8::PackedQuads>,
}

impl Int8Conv {
    /// Quantizes `weight` (`[out, in, kh, kw]`) to `bits` bits per output channel.
    pub fn new(
        geometry: ConvGeometry,
        weight: &[f32],
        bias: Option<Vec<f32>>,
        bits: u32,
        input: Quantizer,
    ) -> Result<Int8Conv, String> {
        Self::check(&geometry)?;
        let p = Product::quantizing(
            geometry.out_channels,
            geometry.patch_len(),
            weight,
            bias,
            bits,
            input,
        )?;
        Ok(Int8Conv::with_product(geometry, p))
    }

    /// The layer of weight codes already quantized (`[out, in, kh, kw]`).
    pub fn from_codes(
        geometry: ConvGeometry,
        codes: Vec<i8>,
        weight_q: Vec<Quantizer>,
        bias: Option<Vec<f32>>,
        input: Quantizer,
    ) -> Result<Int8Conv, String> {
        Self::check(&geometry)?;
        let p = Product::new(
            geometry.out_channels,
            geometry.patch_len(),
            codes,
            weight_q,
            bias,
            input,
        )?;
        Ok(Int8Conv::with_product(geometry, p))
    }

    fn with_product(geometry: ConvGeometry, p: Product) -> Int8Conv {
        let g = &geometry;
        let [kh, kw] = g.kernel;
        // Two or more channels pair up across channels (no padding for an even count, one
        // zero channel otherwise); one channel pairs along window rows, which a window one tap
        // wide or dilated across cannot.
        let layout = if g.in_channels >= 2 {
            Some(Gather::Channels)
        } else if kw > 1 && g.dilation[1] == 1 {
            Some(Gather::Rows)
        } else {
            None
        };
        let kb = match &p.kernel {
            Kernel::Auto { blocked, .. } => blocked.as_ref().map(|(kb, _)| *kb),
            Kernel::Fixed(_) => None,
        };
        let gather = layout.filter(|_| kb.is_some()).and_then(|layout| {
            let k2 = layout.steps(g);
            // Beyond `MAX_K` the padded steps could overflow: those run on im2col rows.
            if k2 > int8::MAX_K {
                return None;
            }
            let mut padded = vec![0i8; p.n * k2];
            for (o, w) in p.weight.chunks_exact(p.k).enumerate() {
                for (t, &v) in w.iter().enumerate() {
                    let (ci, i, j) = (t / (kh * kw), t / kw % kh, t % kw);
                    padded[o * k2 + layout.step(g, ci, i, j)] = v;
                }
            }
            Some((layout, int8::PackedB::new(p.n, k2, &padded), padded))
        });
        let quads = gather
            .as_ref()
            .zip(kb)
            .and_then(|((layout, _, padded), kb)| {
                (*layout == Gather::Channels && g.in_channels.is_multiple_of(4))
                    .then(|| kb.pack_quads(p.n, padded.len() / p.n, padded))
                    .flatten()
            });
        Int8Conv {
            geometry,
            p,
            gather: gather.map(|(layout, packed, _)| (layout, packed)),
            quads,
        }
    }

    fn check(g: &ConvGeometry) -> Result<(), String> {
        g.validate()?;
        if g.groups != 1 {
            return Err(format!(
                "a grouped convolution ({} groups) has no int8 kernel yet: keep it in float",
                g.groups
            ));
        }
        Ok(())
    }

    shared_accessors!("[out, in, kh, kw]");

    /// The path that runs the product (im2col rows are many, so the blocked one where there).
    pub fn kernel_name(&self) -> &'static str {
        match (&self.p.kernel, &self.quads) {
            (
                Kernel::Auto {
                    blocked: Some((kb, _)),
                    ..
                },
                Some(_),
            ) => kb.quads_name(),
            _ => self.p.kernel_name(usize::MAX),
        }
    }

    /// The layer on a batch of `[C, H, W]` inputs (channels first as values, channels last as
    /// codes): values `[batch, out, H', W']`, or codes `[batch, H', W', out]` for the next int8
    /// layer.
    pub fn run(&self, x: &Activations, batch: usize, hw: [usize; 2]) -> Activations {
        let x = Input::of(x);
        match self.p.emit {
            Some(next) => Activations::Codes {
                codes: self.channels_last(x, batch, hw, Some(next.rounding())),
                quantizer: next,
            },
            None => {
                let nhwc: Vec<f32> = self.channels_last(x, batch, hw, None);
                let mut y = vec![0f32; nhwc.len()];
                self.channels_first(&nhwc, hw, &mut y);
                Activations::Values(y)
            }
        }
    }

    /// The output channels last, `[batch · H'·W', out]`, as values or as `next`'s codes.
    fn channels_last<T: Out>(
        &self,
        x: Input,
        batch: usize,
        hw: [usize; 2],
        next: Option<Rounding>,
    ) -> Vec<T> {
        let g = &self.geometry;
        let out_hw = g
            .output_hw(hw)
            .unwrap_or_else(|| panic!("conv window larger than the padded {hw:?} input"));
        let image = g.in_channels * hw[0] * hw[1];
        let m = batch * out_hw[0] * out_hw[1];
        assert_eq!(x.len(), batch * image, "input size");
        let mut out = vec![T::default(); m * self.p.n];
        let channels_last_in = matches!(x, Input::Codes(..));
        match (&self.p.kernel, &self.gather, &self.quads) {
            (
                Kernel::Auto {
                    blocked: Some((kb, _)),
                    ..
                },
                Some(_),
                Some(quads),
            ) if m >= 4 => {
                let codes = self.p.input_codes(x);
                let mut padded = PADDED.take();
                self.widen(
                    Gather::Channels,
                    &codes,
                    channels_last_in,
                    batch,
                    hw,
                    &mut padded,
                );
                let (grid, offsets) = self.grid(Gather::Channels, 4, batch, hw, out_hw);
                let epilogue =
                    |_: usize, sums: &Sums, out: &mut [T]| self.p.finish(sums, next, out);
                kb.gemm_gathered_quads_with(
                    &grid, &offsets, &padded, quads, &mut out, self.p.n, &epilogue,
                );
                PADDED.set(padded);
            }
            (
                Kernel::Auto {
                    blocked: Some((kb, _)),
                    ..
                },
                Some((layout, packed)),
                _,
            ) if m >= 4 => {
                let codes = self.p.input_codes(x);
                // The widened input is the largest buffer of a call: one per thread, reused.
                let mut wide = WIDE.take();
                self.widen(*layout, &codes, channels_last_in, batch, hw, &mut wide);
                let (grid, offsets) = self.grid(*layout, 2, batch, hw, out_hw);
                let epilogue =
                    |_: usize, sums: &Sums, out: &mut [T]| self.p.finish(sums, next, out);
                kb.gemm_gathered_with(
                    &grid, &offsets, &wide, packed, &mut out, self.p.n, &epilogue,
                );
                WIDE.set(wide);
            }
            _ => {
                let mut codes = self.p.input_codes(x);
                if channels_last_in {
                    codes = Cow::Owned(channels_first_codes(&codes, g.in_channels, hw[0] * hw[1]));
                }
                let (positions, k) = (out_hw[0] * out_hw[1], self.p.k);
                let mut rows = vec![0u8; m * k];
                let patches = |(b, r): (usize, &mut [u8])| {
                    self.im2col(&codes[b * image..(b + 1) * image], hw, out_hw, r)
                };
                if m * k >= PARALLEL_MIN && batch > 1 {
                    rows.par_chunks_mut(positions * k)
                        .enumerate()
                        .for_each(patches);
                } else {
                    rows.chunks_mut(positions * k).enumerate().for_each(patches);
                }
                self.p.rows(m, &rows, next, &mut out);
            }
        }
        out
    }

    /// `[batch · H'·W', out]` values to `[batch, out, H', W']` (`hw` is the input's size).
    fn channels_first(&self, nhwc: &[f32], hw: [usize; 2], y: &mut [f32]) {
        let n = self.p.n;
        let [oh, ow] = self.geometry.output_hw(hw).expect("checked by the product");
        let chunk = n * oh * ow;
        // Blocks of 16 positions: their values are a few KB of `src`, and each channel's 16
        // land in one cache line of `dst` (a store per value down a whole plane misses).
        const BLOCK: usize = 16;
        let image = |(src, dst): (&[f32], &mut [f32])| {
            let positions = src.len() / n;
            for p0 in (0..positions).step_by(BLOCK) {
                let len = BLOCK.min(positions - p0);
                let block = &src[p0 * n..(p0 + len) * n];
                for (o, plane) in dst.chunks_exact_mut(positions).enumerate() {
                    for (d, values) in plane[p0..p0 + len].iter_mut().zip(block.chunks_exact(n)) {
                        *d = values[o];
                    }
                }
            }
        };
        if y.len() >= PARALLEL_MIN && y.len() > chunk {
            nhwc.par_chunks(chunk)
                .zip(y.par_chunks_mut(chunk))
                .for_each(image);
        } else {
            nhwc.chunks(chunk).zip(y.chunks_mut(chunk)).for_each(image);
        }
    }

    /// The input's codes in `layout`, padded with the zero point, into `wide` (reused:
    /// cleared and refilled): widened to u16 for the pairs path, as u8 for the quads path
    /// (channels last, `C' = C`). `codes` are channels last or first as given.
    #[allow(clippy::too_many_arguments)]
    fn widen<T: Copy + From<u8> + Send + Sync>(
        &self,
        layout: Gather,
        codes: &[u8],
        channels_last: bool,
        batch: usize,
        [h, w]: [usize; 2],
        wide: &mut Vec<T>,
    ) {
        let g = &self.geometry;
        let [ph, pw] = g.padding;
        let (hp, wp) = (h + 2 * ph, w + 2 * pw);
        let c = g.in_channels;
        let cp = 2 * c.div_ceil(2);
        let image = layout.image_len(g, [h, w]);
        // Two values of slack: the last pair of a window row with an odd width reads one value
        // past it (times a zero weight).
        wide.clear();
        wide.resize(batch * image + 2, T::from(self.p.input.zero_point as u8));
        let fill = |(b, dst): (usize, &mut [T])| {
            let src = &codes[b * c * h * w..(b + 1) * c * h * w];
            match (layout, channels_last) {
                // One channel: channels first and last are the same.
                (Gather::Rows, false) | (Gather::Rows, true) if c == 1 || !channels_last => {
                    for (ci, plane) in src.chunks_exact(h * w).enumerate() {
                        for (y, line) in plane.chunks_exact(w).enumerate() {
                            let at = ci * hp * wp + (y + ph) * wp + pw;
                            widen_into(&mut dst[at..at + w], line);
                        }
                    }
                }
                (Gather::Rows, _) => {
                    for (pos, px) in src.chunks_exact(c).enumerate() {
                        let (y, x) = (pos / w, pos % w);
                        for (ci, &v) in px.iter().enumerate() {
                            dst[ci * hp * wp + (y + ph) * wp + pw + x] = T::from(v);
                        }
                    }
                }
                (Gather::Channels, false) => {
                    // `[C, H, W]` to `[H + 2p, W + 2p, C']`: a pixel's channels side by side.
                    for (ci, plane) in src.chunks_exact(h * w).enumerate() {
                        for (y, line) in plane.chunks_exact(w).enumerate() {
                            let row = ((y + ph) * wp + pw) * cp + ci;
                            for (x, &v) in line.iter().enumerate() {
                                dst[row + x * cp] = T::from(v);
                            }
                        }
                    }
                }
                (Gather::Channels, true) => {
                    // `[H, W, C]` to `[H + 2p, W + 2p, C']`: whole image rows where `C' = C`.
                    for (y, line) in src.chunks_exact(w * c).enumerate() {
                        let row = ((y + ph) * wp + pw) * cp;
                        if cp == c {
                            widen_into(&mut dst[row..row + w * c], line);
                        } else {
                            for (x, px) in line.chunks_exact(c).enumerate() {
                                widen_into(&mut dst[row + x * cp..row + x * cp + c], px);
                            }
                        }
                    }
                }
            }
        };
        if batch * image >= PARALLEL_MIN && batch > 1 {
            wide[..batch * image]
                .par_chunks_mut(image)
                .enumerate()
                .for_each(fill);
        } else {
            wide[..batch * image]
                .chunks_mut(image)
                .enumerate()
                .for_each(fill);
        }
    }

    /// Where the product's rows start in the laid-out input, and where each group of `group`
    /// reduction steps of a window lies from there: pairs (2) in either layout, quads (4) of
    /// channels in the channels-last one.
    fn grid(
        &self,
        layout: Gather,
        group: usize,
        batch: usize,
        [h, w]: [usize; 2],
        out_hw: [usize; 2],
    ) -> (int8::Grid, Vec<usize>) {
        let g = &self.geometry;
        let [kh, kw] = g.kernel;
        let [dh, dw] = g.dilation;
        let (hp, wp) = (h + 2 * g.padding[0], w + 2 * g.padding[1]);
        let c = g.in_channels;
        let cp = 2 * c.div_ceil(2);
        let mut offsets = Vec::with_capacity(layout.steps(g) / group);
        let pixel = match layout {
            Gather::Rows => {
                assert_eq!(group, 2, "window rows pair up only");
                for ci in 0..c {
                    for i in 0..kh {
                        for p in 0..kw.div_ceil(2) {
                            offsets.push(ci * hp * wp + i * dh * wp + 2 * p);
                        }
                    }
                }
                1
            }
            Gather::Channels => {
                for i in 0..kh {
                    for j in 0..kw {
                        for p in 0..cp / group {
                            offsets.push((i * dh * wp + j * dw) * cp + group * p);
                        }
                    }
                }
                cp
            }
        };
        let grid = int8::Grid {
            images: batch,
            out_hw,
            image_len: layout.image_len(g, [h, w]),
            step: [g.stride[0] * wp * pixel, g.stride[1] * pixel],
        };
        (grid, offsets)
    }

    /// Patches `[H'·W', k]` of one image's codes `[C, H, W]`, out-of-image taps as the zero
    /// point; the patch order is the weight's, `(c, i, j)`. (The path where the input cannot
    /// be read in place: no AVX2, or a window the gathered layouts do not fit.)
    fn im2col(&self, image: &[u8], [h, w]: [usize; 2], [oh, ow]: [usize; 2], rows: &mut [u8]) {
        let stride = self.p.k;
        let g = &self.geometry;
        let [kh, kw] = g.kernel;
        let zp = self.p.input.zero_point as u8;
        let (sw, pw, dw) = (g.stride[1], g.padding[1] as isize, g.dilation[1]);
        // The image row of each output row and tap row is found once, and the window rows of a
        // whole output row copied from it: the inner loop is over output columns.
        for oi in 0..oh {
            let out_row = &mut rows[oi * ow * stride..(oi + 1) * ow * stride];
            for c in 0..g.in_channels {
                let plane = &image[c * h * w..(c + 1) * h * w];
                for ki in 0..kh {
                    let t0 = (c * kh + ki) * kw;
                    let ih =
                        (oi * g.stride[0] + ki * g.dilation[0]) as isize - g.padding[0] as isize;
                    if ih < 0 || ih >= h as isize {
                        for row in out_row.chunks_exact_mut(stride) {
                            row[t0..t0 + kw].fill(zp);
                        }
                        continue;
                    }
                    let line = &plane[ih as usize * w..(ih as usize + 1) * w];
                    for (oj, row) in out_row.chunks_exact_mut(stride).enumerate() {
                        let taps = &mut row[t0..t0 + kw];
                        let iw0 = (oj * sw) as isize - pw;
                        if dw == 1 && iw0 >= 0 && iw0 as usize + kw <= w {
                            // The whole window row is inside the image: one copy.
                            copy_taps(taps, &line[iw0 as usize..iw0 as usize + kw]);
                            continue;
                        }
                        for (kj, t) in taps.iter_mut().enumerate() {
                            let iw = iw0 + (kj * dw) as isize;
                            *t = if iw < 0 || iw >= w as isize {
                                zp
                            } else {
                                line[iw as usize]
                            };
                        }
                    }
                }
            }
        }
    }
}

/// How the int8 convolution lays out its widened, padded input so that every pair of
/// reduction steps the AVX2 kernel reads is two neighbouring values (one `i32` load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gather {
    /// `[C, H', W']` planes; taps `(j, j + 1)` of a window row pair up, and an odd-width row
    /// gets a zero-weight tap (one input channel: LeNet-5's first layer).
    Rows,
    /// `[H', W', C']`, `C'` the channels rounded up to even; channels `(c, c + 1)` of a tap pair
    /// up: no padding for an even channel count, any window width and dilation.
    Channels,
}

impl Gather {
    /// Values per image of the widened, padded input of `[h, w]` images.
    fn image_len(self, g: &ConvGeometry, [h, w]: [usize; 2]) -> usize {
        let (hp, wp) = (h + 2 * g.padding[0], w + 2 * g.padding[1]);
        match self {
            Gather::Rows => g.in_channels * hp * wp,
            Gather::Channels => hp * wp * 2 * g.in_channels.div_ceil(2),
        }
    }

    /// Reduction steps of the packed weights.
    fn steps(self, g: &ConvGeometry) -> usize {
        let [kh, kw] = g.kernel;
        match self {
            Gather::Rows => g.in_channels * kh * 2 * kw.div_ceil(2),
            Gather::Channels => kh * kw * 2 * g.in_channels.div_ceil(2),
        }
    }

    /// The packed step of weight `(c, i, j)`.
    fn step(self, g: &ConvGeometry, c: usize, i: usize, j: usize) -> usize {
        let [kh, kw] = g.kernel;
        match self {
            Gather::Rows => (c * kh + i) * 2 * kw.div_ceil(2) + j,
            Gather::Channels => (i * kw + j) * 2 * g.in_channels.div_ceil(2) + c,
        }
    }
}

/// `dst.copy_from_slice(src)` for a window row of a few taps: the common widths are copied as
/// fixed-size arrays (inline moves), since a `memcpy` call for 3 or 5 bytes costs more than
/// the copy.
#[inline]
fn copy_taps(dst: &mut [u8], src: &[u8]) {
    fn fixed<const K: usize>(dst: &mut [u8], src: &[u8]) {
        let s: &[u8; K] = src.try_into().expect("K taps");
        let d: &mut [u8; K] = dst.try_into().expect("K taps");
        *d = *s;
    }
    match dst.len() {
        1 => dst[0] = src[0],
        3 => fixed::<3>(dst, src),
        5 => fixed::<5>(dst, src),
        7 => fixed::<7>(dst, src),
        _ => dst.copy_from_slice(src),
    }
}

impl std::fmt::Debug for Int8Conv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Int8Conv")
            .field("geometry", &self.geometry)
            .field("input", &self.p.input)
            .field("relu", &self.p.relu)
            .field("kernel", &self.kernel_name())
            .finish_non_exhaustive()
    }
}

impl Conv2dKernel for Int8Conv {
    fn geometry(&self) -> &ConvGeometry {
        &self.geometry
    }

    fn forward(&self, x: &[f32], batch: usize, hw: [usize; 2], y: &mut [f32]) {
        let nhwc: Vec<f32> = self.channels_last(Input::Values(x), batch, hw, None);
        assert_eq!(y.len(), nhwc.len(), "output size");
        self.channels_first(&nhwc, hw, y);
    }

    fn weight_bytes(&self) -> usize {
        self.p.weight_bytes()
    }
}

thread_local! {
    /// The widened input of the last int8 convolution run on this thread, kept for the next.
    static WIDE: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
    /// The padded codes of the last convolution on the quads path, likewise.
    static PADDED: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// `dst[i] = src[i]`, widened where `T` is wider.
fn widen_into<T: From<u8>>(dst: &mut [T], src: &[u8]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = T::from(v);
    }
}

/// Codes `[batch, H·W, C]` channels last to `[batch, C, H·W]` (the im2col path's order).
fn channels_first_codes(codes: &[u8], c: usize, plane: usize) -> Vec<u8> {
    let mut out = vec![0u8; codes.len()];
    for (src, dst) in codes
        .chunks_exact(c * plane)
        .zip(out.chunks_exact_mut(c * plane))
    {
        for (pos, px) in src.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                dst[ch * plane + pos] = v;
            }
        }
    }
    out
}
