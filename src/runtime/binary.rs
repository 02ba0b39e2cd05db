//! XNOR-Net layers of the compressed-inference runtime (issue #13): binary weights `α_o ·
//! sign(w)` per output channel, the input taken by its sign (+1 for `x >= 0`, −1 otherwise),
//! and the product counted on the XNOR-popcount kernels ([`crate::kernels::binary`]):
//!
//! `y[o] = α_o · Σ_k sign(x_k) · sign(w_ok) + b[o]`
//!
//! (Rastegari et al. 2016, "XNOR-Net", section 3.2, eq. 11 without the input's scale `K`,
//! as the authors' released code runs it). A convolution's zero padding stays 0, not −1 (the
//! kernel corrects for it). The layer takes f32 activations and gives f32: it binarizes and
//! packs its input itself, so it drops into [`Conv2dKernel`] and [`LinearKernel`], and a ReLU
//! that follows is applied as the output is written.

use super::LinearKernel;
use super::conv::{Conv2dKernel, ConvGeometry};
use crate::kernels::binary::{self, BitRows, PackedFilters, PackedImages, Path};

/// What both layers do after the count: one scale and bias per output, a ReLU if one follows,
/// and the instruction path that counts.
#[derive(Debug, Clone)]
struct Epilogue {
    scales: Vec<f32>,
    bias: Option<Vec<f32>>,
    relu: bool,
    path: Path,
}

impl Epilogue {
    fn new(scales: Vec<f32>, bias: Option<Vec<f32>>) -> Self {
        Epilogue {
            scales,
            bias,
            relu: false,
            path: Path::best(),
        }
    }

    fn with_path(mut self, path: Path) -> Result<Self, String> {
        if !path.runs_here() {
            return Err(format!("this CPU cannot run the {} path", path.name()));
        }
        self.path = path;
        Ok(self)
    }

    fn relu_in_place(&self, y: &mut [f32]) {
        if self.relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }

    /// Bytes of the scales and the bias.
    fn bytes(&self) -> usize {
        4 * (self.scales.len() + self.bias.as_ref().map_or(0, Vec::len))
    }
}

/// A binary convolution with binary inputs.
#[derive(Debug, Clone)]
pub struct BinaryConv {
    geometry: ConvGeometry,
    filters: PackedFilters,
    out: Epilogue,
}

impl BinaryConv {
    /// From the layer's weight `[out, in, kh, kw]` (its signs are kept: the stored values are
    /// `±scales[o]`), one scale per output channel, and its bias. One group and no dilation.
    pub fn new(
        geometry: ConvGeometry,
        weight: &[f32],
        scales: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Result<Self, String> {
        geometry.validate()?;
        if geometry.groups != 1 || geometry.dilation != [1, 1] {
            return Err(format!(
                "a binary convolution needs one group and no dilation, not {} and {:?}",
                geometry.groups, geometry.dilation
            ));
        }
        let g = &geometry;
        if weight.len() != g.weight_len()
            || scales.len() != g.out_channels
            || bias.as_ref().is_some_and(|b| b.len() != g.out_channels)
        {
            return Err("binary convolution: weights, scales or bias do not fit".into());
        }
        let filters = PackedFilters::pack(weight, g.out_channels, g.in_channels, g.kernel);
        Ok(BinaryConv {
            geometry,
            filters,
            out: Epilogue::new(scales, bias),
        })
    }

    /// A ReLU applied to the output as it is written.
    pub fn with_relu(mut self) -> Self {
        self.out.relu = true;
        self
    }

    /// Counts on `path` instead of the fastest one here (tests force each path); the path must
    /// run on this CPU.
    pub fn with_path(mut self, path: Path) -> Result<Self, String> {
        self.out = self.out.with_path(path)?;
        Ok(self)
    }

    pub fn path_name(&self) -> &'static str {
        self.out.path.name()
    }

    /// Weights the layer holds: one bit each.
    pub fn weights(&self) -> usize {
        self.geometry.weight_len()
    }
}

impl Conv2dKernel for BinaryConv {
    fn geometry(&self) -> &ConvGeometry {
        &self.geometry
    }

    fn forward(&self, x: &[f32], batch: usize, hw: [usize; 2], y: &mut [f32]) {
        let g = &self.geometry;
        let packed = PackedImages::pack(x, batch, g.in_channels, hw);
        let p = g.problem(batch, hw);
        let o = &self.out;
        let bias = o.bias.as_deref();
        binary::conv_scaled(o.path, &p, &packed, &self.filters, &o.scales, bias, y);
        o.relu_in_place(y);
    }

    fn weight_bytes(&self) -> usize {
        self.filters.bytes() + self.out.bytes()
    }
}

/// A binary fully connected layer with binary inputs: `y = α ⊙ (sign(x) · sign(W)ᵀ) + b`.
#[derive(Debug, Clone)]
pub struct BinaryLinear {
    /// `[out, in]`.
    rows: BitRows,
    out: Epilogue,
}

impl BinaryLinear {
    /// From Burn's linear weight `[in, out]` (values `±scales[o]`), one scale per output, and
    /// the bias.
    pub fn from_burn_layout(
        in_features: usize,
        out_features: usize,
        w_in_out: &[f32],
        scales: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Result<Self, String> {
        if w_in_out.len() != in_features * out_features
            || scales.len() != out_features
            || bias.as_ref().is_some_and(|b| b.len() != out_features)
        {
            return Err("binary linear layer: weights, scales or bias do not fit".into());
        }
        let mut out_in = vec![0f32; w_in_out.len()];
        for i in 0..in_features {
            for o in 0..out_features {
                out_in[o * in_features + i] = w_in_out[i * out_features + o];
            }
        }
        Ok(BinaryLinear {
            rows: BitRows::pack(&out_in, out_features, in_features),
            out: Epilogue::new(scales, bias),
        })
    }

    pub fn with_relu(mut self) -> Self {
        self.out.relu = true;
        self
    }

    /// See [`BinaryConv::with_path`].
    pub fn with_path(mut self, path: Path) -> Result<Self, String> {
        self.out = self.out.with_path(path)?;
        Ok(self)
    }

    pub fn path_name(&self) -> &'static str {
        self.out.path.name()
    }
}

impl LinearKernel for BinaryLinear {
    fn in_features(&self) -> usize {
        self.rows.len()
    }

    fn out_features(&self) -> usize {
        self.rows.rows()
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        let (n_in, n_out) = (self.rows.len(), self.rows.rows());
        assert_eq!(x.len(), batch * n_in, "binary linear: input size");
        assert_eq!(y.len(), batch * n_out, "binary linear: output size");
        let inputs = BitRows::pack(x, batch, n_in);
        let mut sums = vec![0i32; batch * n_out];
        let e = &self.out;
        binary::gemm(e.path, &inputs, &self.rows, &mut sums);
        for (i, (out, s)) in y.iter_mut().zip(sums).enumerate() {
            let o = i % n_out;
            *out = e.scales[o] * s as f32 + e.bias.as_ref().map_or(0.0, |b| b[o]);
        }
        e.relu_in_place(y);
    }

    fn weight_bytes(&self) -> usize {
        8 * self.rows.data().len() + self.out.bytes()
    }
}
