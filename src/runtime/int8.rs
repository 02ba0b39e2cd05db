//! Int8 layers of the compressed-inference runtime (issue #12): weights quantized
//! symmetrically per output channel, the input per tensor (unsigned, with a zero point), the
//! product in exact 32-bit integers on [`crate::kernels::int8`], then one multiply per output
//! back to `f32` with the bias, and ReLU when one follows:
//!
//! `y[o] = s_x · s_w[o] · (Σ_k q_x[k] · q_w[o][k] − z_x · Σ_k q_w[o][k]) + b[o]`
//!
//! (Jacob et al. 2018, eq. 7: the zero point leaves the inner loop through the weights' row
//! sums, which are computed once). A convolution is the same product on the patches of its
//! u8 input padded with the zero point (the code of 0.0): on AVX2 read straight from the
//! padded input (`Avx2Blocked::gemm_gathered`), elsewhere from im2col rows. The layers take and give `f32`, so
//! they drop into [`super::LinearKernel`] and [`super::conv::Conv2dKernel`]; the next layer
//! quantizes its input again (one pass over the activations, not yet fused into this epilogue).

use super::LinearKernel;
use super::conv::{Conv2dKernel, ConvGeometry};
use crate::compress::quantize::{Quantizer, check_bits, quantize_per_channel};
use crate::kernels::int8::{self, Int8Gemm};
use rayon::prelude::*;

/// Element counts below this run on the calling thread.
const PARALLEL_MIN: usize = 32 * 1024;

/// Which int8 path runs the product.
#[derive(Clone)]
enum Kernel {
    /// One path for every batch (tests force each one).
    Fixed(&'static dyn Int8Gemm),
    /// The best row-by-row path for products of fewer than 4 rows (a matrix-vector product
    /// reads each weight once either way), the register-blocked AVX2 kernel on packed weights
    /// above.
    Auto {
        rows: &'static dyn Int8Gemm,
        blocked: Option<(int8::Avx2Blocked, int8::PackedB)>,
    },
}

/// The integer product of one layer and its way back to `f32`: `[m, k]` u8 rows times the
/// `[n, k]` int8 weights, then the epilogue above.
#[derive(Clone)]
struct Product {
    n: usize,
    k: usize,
    /// `[n, k]` codes.
    weight: Vec<i8>,
    weight_q: Vec<Quantizer>,
    /// `s_x · s_w[o]` per output channel.
    scales: Vec<f32>,
    /// `b[o] − z_x · Σ_k q_w[o][k] · s_x · s_w[o]` per output channel (the zero point's share
    /// of each sum, taken out through the weights' row sums, and the bias): with `scales`, the
    /// epilogue's one multiply-add.
    offsets: Vec<f32>,
    bias: Option<Vec<f32>>,
    input: Quantizer,
    relu: bool,
    kernel: Kernel,
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
        if input.lo < 0
            || input.hi > 255
            || input.lo > input.zero_point
            || input.zero_point > input.hi
        {
            return Err(
                "the input quantizer must be unsigned 8-bit at most, its zero point in range"
                    .into(),
            );
        }
        if !(input.scale.is_finite() && input.scale > 0.0) {
            return Err(format!(
                "input scale {} is not a positive number",
                input.scale
            ));
        }
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
        let scales: Vec<f32> = weight_q.iter().map(|q| input.scale * q.scale).collect();
        let offsets = (0..n)
            .map(|o| {
                let b = bias.as_ref().map_or(0.0, |b| b[o]) as f64;
                (b - zero_sums[o] as f64 * scales[o] as f64) as f32
            })
            .collect();
        let blocked = int8::Avx2Blocked::new().map(|kb| (kb, int8::PackedB::new(n, k, &weight)));
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
            },
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

    fn kernel_name(&self, m: usize) -> &'static str {
        match &self.kernel {
            Kernel::Fixed(k) => k.name(),
            Kernel::Auto {
                blocked: Some((k, _)),
                ..
            } if m >= 4 => k.name(),
            Kernel::Auto { rows, .. } => rows.name(),
        }
    }

    /// The exact i32 sums `[m, n]` of `m` rows of codes `a`.
    fn sums(&self, m: usize, a: &[u8]) -> Vec<i32> {
        let mut acc = vec![0i32; m * self.n];
        match &self.kernel {
            Kernel::Fixed(k) => k.gemm(m, self.n, self.k, a, &self.weight, &mut acc),
            Kernel::Auto {
                blocked: Some((k, packed)),
                ..
            } if m >= 4 => k.gemm_packed(m, packed, a, &mut acc),
            Kernel::Auto { rows, .. } => rows.gemm(m, self.n, self.k, a, &self.weight, &mut acc),
        }
        acc
    }

    /// The epilogue over whole rows of sums (`[rows, n]`, in place as `f32` bits): one
    /// multiply-add per output on the precomputed `scales` and `offsets`, and ReLU, so that it
    /// vectorises.
    fn values_in_place(&self, acc: &mut [i32]) {
        for row in acc.chunks_exact_mut(self.n) {
            for ((v, &s), &off) in row.iter_mut().zip(&self.scales).zip(&self.offsets) {
                let mut y = *v as f32 * s + off;
                if self.relu {
                    y = y.max(0.0);
                }
                *v = y.to_bits() as i32;
            }
        }
    }

    fn weight_bytes(&self) -> usize {
        // One byte per weight, a scale per channel, the bias.
        self.weight.len() + 4 * self.weight_q.len() + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }
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

        #[doc = concat!("The weight codes (`", $layout, "`) and their per-channel quantizers.")]
        pub fn weights(&self) -> (&[i8], &[Quantizer]) {
            (&self.p.weight, &self.p.weight_q)
        }

        /// The input quantizer.
        pub fn input_quantizer(&self) -> Quantizer {
            self.p.input
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
        let (n_in, n_out) = (self.p.k, self.p.n);
        assert_eq!(x.len(), batch * n_in);
        assert_eq!(y.len(), batch * n_out);
        let mut codes = vec![0u8; x.len()];
        self.p.input.quantize_u8_slice(x, &mut codes);
        let mut acc = self.p.sums(batch, &codes);
        self.p.values_in_place(&mut acc);
        for (out, &v) in y.iter_mut().zip(&acc) {
            *out = f32::from_bits(v as u32);
        }
    }
    fn weight_bytes(&self) -> usize {
        self.p.weight_bytes()
    }
}

/// A 2-D convolution (one group) on int8 weights and u8 inputs: one [`Int8Gemm`] product for
/// the whole batch over its patches (read from the padded input on AVX2, from im2col rows
/// otherwise), the epilogue into `[batch, out, H', W']`.
#[derive(Clone)]
pub struct Int8Conv {
    geometry: ConvGeometry,
    p: Product,
    /// For the blocked AVX2 kernel reading patches straight from the input: how the input is
    /// laid out so that every pair of reduction steps is two neighbouring values, and the
    /// weights packed in that order. `None` without AVX2, or where neither layout fits.
    gather: Option<(Gather, int8::PackedB)>,
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
        let gather = layout
            .filter(|_| int8::Avx2Blocked::new().is_some())
            .and_then(|layout| {
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
                Some((layout, int8::PackedB::new(p.n, k2, &padded)))
            });
        Int8Conv {
            geometry,
            p,
            gather,
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
        self.p.kernel_name(usize::MAX)
    }

    /// The sums `[batch · H'·W', n]` on the blocked AVX2 kernel, its pairs read straight from
    /// the input widened to u16 and padded with the zero point, in `layout` (see [`Gather`]).
    #[allow(clippy::too_many_arguments)]
    fn gathered(
        &self,
        kb: &int8::Avx2Blocked,
        layout: Gather,
        packed: &int8::PackedB,
        codes: &[u8],
        batch: usize,
        [h, w]: [usize; 2],
        [oh, ow]: [usize; 2],
    ) -> Vec<i32> {
        let g = &self.geometry;
        let [kh, kw] = g.kernel;
        let [ph, pw] = g.padding;
        let (hp, wp) = (h + 2 * ph, w + 2 * pw);
        let c = g.in_channels;
        let cp = 2 * c.div_ceil(2);
        let image = match layout {
            Gather::Rows => c * hp * wp,
            Gather::Channels => hp * wp * cp,
        };
        // Two values of slack: the last pair of a window row with an odd width reads one value
        // past it (times a zero weight).
        let zp = self.p.input.zero_point as u16;
        let mut padded = vec![zp; batch * image + 2];
        let widen = |(b, dst): (usize, &mut [u16])| {
            let src = &codes[b * c * h * w..(b + 1) * c * h * w];
            match layout {
                Gather::Rows => {
                    for (ci, plane) in src.chunks_exact(h * w).enumerate() {
                        for (y, line) in plane.chunks_exact(w).enumerate() {
                            let at = ci * hp * wp + (y + ph) * wp + pw;
                            for (d, &v) in dst[at..at + w].iter_mut().zip(line) {
                                *d = v as u16;
                            }
                        }
                    }
                }
                Gather::Channels => {
                    // `[C, H, W]` to `[H + 2p, W + 2p, C']`: a pixel's channels side by side.
                    for (ci, plane) in src.chunks_exact(h * w).enumerate() {
                        for (y, line) in plane.chunks_exact(w).enumerate() {
                            let row = ((y + ph) * wp + pw) * cp + ci;
                            for (x, &v) in line.iter().enumerate() {
                                dst[row + x * cp] = v as u16;
                            }
                        }
                    }
                }
            }
        };
        if padded.len() >= PARALLEL_MIN && batch > 1 {
            padded[..batch * image]
                .par_chunks_mut(image)
                .enumerate()
                .for_each(widen);
        } else {
            padded[..batch * image]
                .chunks_mut(image)
                .enumerate()
                .for_each(widen);
        }
        let [dh, dw] = g.dilation;
        let mut offsets = Vec::with_capacity(packed.pairs());
        match layout {
            Gather::Rows => {
                for ci in 0..c {
                    for i in 0..kh {
                        for p in 0..kw.div_ceil(2) {
                            offsets.push(ci * hp * wp + i * dh * wp + 2 * p);
                        }
                    }
                }
            }
            Gather::Channels => {
                for i in 0..kh {
                    for j in 0..kw {
                        for p in 0..cp / 2 {
                            offsets.push((i * dh * wp + j * dw) * cp + 2 * p);
                        }
                    }
                }
            }
        }
        let pixel = match layout {
            Gather::Rows => 1,
            Gather::Channels => cp,
        };
        let mut bases = Vec::with_capacity(batch * oh * ow);
        for b in 0..batch {
            for y in 0..oh {
                for x in 0..ow {
                    bases.push(b * image + (y * g.stride[0] * wp + x * g.stride[1]) * pixel);
                }
            }
        }
        let mut acc = vec![0i32; bases.len() * self.p.n];
        kb.gemm_gathered(&bases, &offsets, &padded, packed, &mut acc);
        acc
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
        let g = &self.geometry;
        let out_hw = g
            .output_hw(hw)
            .unwrap_or_else(|| panic!("conv window larger than the padded {hw:?} input"));
        let image = g.in_channels * hw[0] * hw[1];
        let positions = out_hw[0] * out_hw[1];
        let (n, k) = (self.p.n, self.p.k);
        assert_eq!(x.len(), batch * image, "input size");
        assert_eq!(y.len(), batch * n * positions, "output size");
        let mut codes = vec![0u8; x.len()];
        let quantize = |(x, c): (&[f32], &mut [u8])| self.p.input.quantize_u8_slice(x, c);
        if x.len() >= PARALLEL_MIN && batch > 1 {
            x.par_chunks(image)
                .zip(codes.par_chunks_mut(image))
                .for_each(quantize);
        } else {
            quantize((x, &mut codes));
        }
        let m = batch * positions;
        let parallel = m * k >= PARALLEL_MIN && batch > 1;
        let mut acc = match (&self.p.kernel, &self.gather) {
            (
                Kernel::Auto {
                    blocked: Some((kb, _)),
                    ..
                },
                Some((layout, packed)),
            ) if m >= 4 => self.gathered(kb, *layout, packed, &codes, batch, hw, out_hw),
            _ => {
                let mut rows = vec![0u8; m * k];
                let patches = |(b, r): (usize, &mut [u8])| {
                    self.im2col(&codes[b * image..(b + 1) * image], hw, out_hw, r)
                };
                if parallel {
                    rows.par_chunks_mut(positions * k)
                        .enumerate()
                        .for_each(patches);
                } else {
                    rows.chunks_mut(positions * k).enumerate().for_each(patches);
                }
                self.p.sums(m, &rows)
            }
        };
        let epilogue = |(out, acc): (&mut [f32], &mut [i32])| {
            // Sums to values in place (contiguous, vectorised), then `[H'·W', n]` to `[n, H'·W']`.
            self.p.values_in_place(acc);
            for (pos, values) in acc.chunks_exact(n).enumerate() {
                for (o, &v) in values.iter().enumerate() {
                    out[o * positions + pos] = f32::from_bits(v as u32);
                }
            }
        };
        let chunk = n * positions;
        if y.len() >= PARALLEL_MIN && batch > 1 {
            y.par_chunks_mut(chunk)
                .zip(acc.par_chunks_mut(chunk))
                .for_each(epilogue);
        } else {
            y.chunks_mut(chunk)
                .zip(acc.chunks_mut(chunk))
                .for_each(epilogue);
        }
    }

    fn weight_bytes(&self) -> usize {
        self.p.weight_bytes()
    }
}
