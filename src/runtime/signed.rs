//! Layers with binary or ternary weights on real-valued inputs (BWN, TWN, BinaryConnect,
//! loss-aware binarization, few multiplications: issue #13): `y[o] = α_o · Σ_k s_ok · x_k + b_o`
//! with `s ∈ {−1, +1}` or `{−1, 0, +1}`, the sums made by additions only on the table-lookup
//! kernel ([`crate::kernels::binary::lookup`]); the inputs stay in float, as the layers were
//! trained. Weights are held as bit planes (1 bit a weight, 2 for ternary) plus a scale per
//! output channel.
//!
//! A batch spreads over the threads by images; one image by ranges of output channels.

use super::LinearKernel;
use super::conv::{Conv2dKernel, ConvGeometry, with_cols};
use crate::kernels::binary::lookup::{self, COLUMN_BLOCK, Columns, Scaling, SignPlanes, TablePath};
use crate::kernels::conv as kernels;
use rayon::prelude::*;

/// Bytes of one block of a convolution's im2col columns: a block stays in cache while its
/// tables are built (a whole ResNet-20 image's columns, 590 KB, made memory traffic the
/// bottleneck at batch 64).
const COLUMN_BYTES: usize = 256 * 1024;

/// The fewest columns in a block (im2col of narrower blocks costs more than it saves: at 16
/// columns the XNOR-Net shape ran 1.6x slower).
const MIN_COLUMNS: usize = 64;

/// Work below this many weight-column products runs on the calling thread.
const PARALLEL_MIN: usize = 64 * 1024;

/// What both layers hold: the weights `[out, k]` as bit planes, a scale and bias per output,
/// and how they run.
#[derive(Debug, Clone)]
struct Weights {
    planes: SignPlanes,
    scales: Vec<f32>,
    bias: Option<Vec<f32>>,
    relu: bool,
    path: TablePath,
}

impl Weights {
    /// From weights `[out, k]` whose values are `s · scales[o]`: their signs (and, if
    /// `ternary`, their zeros) are kept.
    fn new(
        w: &[f32],
        outputs: usize,
        k: usize,
        ternary: bool,
        scales: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Result<Self, String> {
        if w.len() != outputs * k
            || scales.len() != outputs
            || bias.as_ref().is_some_and(|b| b.len() != outputs)
        {
            return Err("binary-weight layer: weights, scales or bias do not fit".into());
        }
        let planes = if ternary {
            SignPlanes::ternary(w, outputs, k)
        } else {
            SignPlanes::binary(w, outputs, k)
        };
        Ok(Weights {
            planes,
            scales,
            bias,
            relu: false,
            path: TablePath::best(),
        })
    }

    fn outputs(&self) -> usize {
        self.planes.outputs()
    }

    fn k(&self) -> usize {
        self.planes.len()
    }

    fn with_path(mut self, path: TablePath) -> Result<Self, String> {
        if !path.runs_here() {
            return Err(format!("this CPU cannot run the {} path", path.name()));
        }
        self.path = path;
        Ok(self)
    }

    /// `y = [out][y_stride]` from the columns `x`. With `parallel`, the outputs are split into
    /// one range per thread: each builds the tables of every column again, so the ranges are
    /// as few as the threads.
    fn run(&self, x: &Columns, y: &mut [f32], y_stride: usize, parallel: bool) {
        let s = Scaling {
            scales: &self.scales,
            bias: self.bias.as_deref(),
            relu: self.relu,
        };
        let outs = self.outputs();
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        // Ranges in whole tiles of 4 outputs, at least 16.
        let per = outs.div_ceil(threads).next_multiple_of(4).max(16);
        let range = |(i, y): (usize, &mut [f32])| {
            let o0 = i * per;
            lookup::signed_sums(
                self.path,
                &self.planes,
                o0..outs.min(o0 + per),
                x,
                &s,
                y,
                y_stride,
            );
        };
        if per < outs {
            y.par_chunks_mut(per * y_stride).enumerate().for_each(range);
        } else {
            range((0, y));
        }
    }

    fn bytes(&self) -> usize {
        self.planes.bytes() + 4 * (self.scales.len() + self.bias.as_ref().map_or(0, Vec::len))
    }
}

/// A convolution with binary or ternary weights on real inputs.
#[derive(Debug, Clone)]
pub struct SignedConv {
    geometry: ConvGeometry,
    w: Weights,
}

impl SignedConv {
    /// From the layer's weight `[out, in, kh, kw]` (values `s · scales[o]`), one scale per
    /// output channel, and its bias; `ternary` keeps the zero weights. One group.
    pub fn new(
        geometry: ConvGeometry,
        weight: &[f32],
        ternary: bool,
        scales: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Result<Self, String> {
        geometry.validate()?;
        if geometry.groups != 1 {
            return Err(format!(
                "a binary-weight convolution needs one group, not {}",
                geometry.groups
            ));
        }
        let (o, k) = (geometry.out_channels, geometry.patch_len());
        let w = Weights::new(weight, o, k, ternary, scales, bias)?;
        Ok(SignedConv { geometry, w })
    }

    /// A ReLU applied to the output as it is written.
    pub fn with_relu(mut self) -> Self {
        self.w.relu = true;
        self
    }

    /// Sums on `path` instead of the fastest one here (tests force each path).
    pub fn with_path(mut self, path: TablePath) -> Result<Self, String> {
        self.w = self.w.with_path(path)?;
        Ok(self)
    }

    pub fn path_name(&self) -> &'static str {
        self.w.path.name()
    }

    pub fn is_ternary(&self) -> bool {
        self.w.planes.is_ternary()
    }

    /// Weights the layer holds.
    pub fn weights(&self) -> usize {
        self.geometry.weight_len()
    }
}

impl Conv2dKernel for SignedConv {
    fn geometry(&self) -> &ConvGeometry {
        &self.geometry
    }

    fn forward(&self, x: &[f32], batch: usize, hw: [usize; 2], y: &mut [f32]) {
        let g = &self.geometry;
        let [oh, ow] = g
            .output_hw(hw)
            .unwrap_or_else(|| panic!("conv window larger than the padded {hw:?} input"));
        let (image, plane) = (g.in_channels * hw[0] * hw[1], oh * ow);
        assert_eq!(x.len(), batch * image, "input size");
        assert_eq!(y.len(), batch * g.out_channels * plane, "output size");
        if batch == 0 || plane == 0 {
            return;
        }
        let p = g.problem(1, hw);
        let (k, outs) = (self.w.k(), self.w.outputs());
        // Columns a block: whole vectors, as many as fit in COLUMN_BYTES, at least MIN_COLUMNS.
        let chunk = (COLUMN_BYTES / (4 * k)).max(MIN_COLUMNS) / COLUMN_BLOCK * COLUMN_BLOCK;
        // Columns `c0 .. c0 + n` of image `x`, `[k][n]` in `buf`, into `y` (`[out][y_stride]`).
        let columns = |x: &[f32], c0: usize, n: usize, buf: &mut [f32], y: &mut [f32], stride| {
            kernels::im2col(&p, x, c0..c0 + n, &mut buf[..k * n]);
            self.w.run(&Columns { x: buf, ld: n, n }, y, stride, false);
        };
        let work = outs * k * plane;
        if batch > 1 && batch * work >= PARALLEL_MIN {
            // Images over the threads.
            x.par_chunks(image)
                .zip(y.par_chunks_mut(outs * plane))
                .for_each(|(x, y)| {
                    with_cols(lookup::input_len(k, chunk, chunk), |buf| {
                        for c0 in (0..plane).step_by(chunk) {
                            let n = chunk.min(plane - c0);
                            columns(x, c0, n, buf, &mut y[c0..], plane);
                        }
                    })
                });
        } else if work >= PARALLEL_MIN {
            // One image at a time, its blocks of columns over the threads, each into rows of
            // its own that are then copied into place (every thread sees all the outputs, so no
            // table is built twice).
            let threads = rayon::current_num_threads();
            let chunk = chunk.min(plane.div_ceil(threads).next_multiple_of(COLUMN_BLOCK));
            for (x, y) in x.chunks(image).zip(y.chunks_mut(outs * plane)) {
                let blocks: Vec<(usize, Vec<f32>)> = (0..plane)
                    .step_by(chunk)
                    .collect::<Vec<_>>()
                    .into_par_iter()
                    .map(|c0| {
                        let n = chunk.min(plane - c0);
                        let mut out = vec![0f32; outs * n];
                        with_cols(lookup::input_len(k, n, n), |buf| {
                            columns(x, c0, n, buf, &mut out, n)
                        });
                        (c0, out)
                    })
                    .collect();
                for (c0, out) in blocks {
                    let n = out.len() / outs;
                    for (o, row) in out.chunks_exact(n).enumerate() {
                        y[o * plane + c0..][..n].copy_from_slice(row);
                    }
                }
            }
        } else {
            with_cols(lookup::input_len(k, chunk, chunk), |buf| {
                for (x, y) in x.chunks(image).zip(y.chunks_mut(outs * plane)) {
                    for c0 in (0..plane).step_by(chunk) {
                        let n = chunk.min(plane - c0);
                        columns(x, c0, n, buf, &mut y[c0..], plane);
                    }
                }
            })
        }
    }

    fn weight_bytes(&self) -> usize {
        self.w.bytes()
    }
}

/// A fully connected layer with binary or ternary weights on real inputs.
#[derive(Debug, Clone)]
pub struct SignedLinear {
    w: Weights,
}

impl SignedLinear {
    /// From Burn's linear weight `[in, out]` (values `s · scales[o]`), one scale per output,
    /// and the bias; `ternary` keeps the zero weights.
    pub fn from_burn_layout(
        in_features: usize,
        out_features: usize,
        w_in_out: &[f32],
        ternary: bool,
        scales: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Result<Self, String> {
        if w_in_out.len() != in_features * out_features {
            return Err("binary-weight linear layer: weights do not fit".into());
        }
        let mut out_in = vec![0f32; w_in_out.len()];
        for i in 0..in_features {
            for o in 0..out_features {
                out_in[o * in_features + i] = w_in_out[i * out_features + o];
            }
        }
        let w = Weights::new(&out_in, out_features, in_features, ternary, scales, bias)?;
        Ok(SignedLinear { w })
    }

    pub fn with_relu(mut self) -> Self {
        self.w.relu = true;
        self
    }

    /// See [`SignedConv::with_path`].
    pub fn with_path(mut self, path: TablePath) -> Result<Self, String> {
        self.w = self.w.with_path(path)?;
        Ok(self)
    }

    pub fn path_name(&self) -> &'static str {
        self.w.path.name()
    }

    pub fn is_ternary(&self) -> bool {
        self.w.planes.is_ternary()
    }
}

impl LinearKernel for SignedLinear {
    fn in_features(&self) -> usize {
        self.w.k()
    }

    fn out_features(&self) -> usize {
        self.w.outputs()
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        let (k, outs) = (self.w.k(), self.w.outputs());
        assert_eq!(x.len(), batch * k, "linear: input size");
        assert_eq!(y.len(), batch * outs, "linear: output size");
        if batch == 0 || outs == 0 {
            return;
        }
        // The images as columns, `[in][batch]`, and the output as rows, `[out][batch]`.
        let mut xt = vec![0f32; lookup::input_len(k, batch, batch)];
        for (b, row) in x.chunks_exact(k).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                xt[i * batch + b] = v;
            }
        }
        let mut yt = vec![0f32; outs * batch];
        let parallel = outs * k * batch >= PARALLEL_MIN;
        let cols = Columns {
            x: &xt,
            ld: batch,
            n: batch,
        };
        self.w.run(&cols, &mut yt, batch, parallel);
        for (o, row) in yt.chunks_exact(batch).enumerate() {
            for (b, &v) in row.iter().enumerate() {
                y[b * outs + o] = v;
            }
        }
    }

    fn weight_bytes(&self) -> usize {
        self.w.bytes()
    }
}
