//! The circulant projection of Cheng et al. 2015 ("An exploration of parameter redundancy in
//! deep networks with circulant projections", eq. 2 and 6-9): `y = (R D x̃)[..out] + b`, where
//! `x̃` is the input zero-padded to `d = max(in, out)`, `D` a fixed diagonal of random signs,
//! and `R = circ(r)` the circulant matrix of one vector `r`, `R[i][j] = r[(i − j) mod d]`.
//!
//! `R z` is the circular convolution `r ⊛ z = ifft(fft(r) ∘ fft(z))`, so a layer costs
//! O(d log d) per image and stores `d` weights instead of `in·out`. The gradients are
//! circular correlations, also through the FFT (eq. 8-9):
//! `∂L/∂z = ifft(conj(fft(r)) ∘ fft(g))` and `∂L/∂r = ifft(Σₙ fft(gₙ) ∘ conj(fft(zₙ)))`.
//!
//! [`CirculantPlan`] runs them on `realfft`'s planned real transforms (planned once per size
//! and kept for the process); [`reference`] is the explicit O(d²) matrix product that the
//! tests hold it to.

use rayon::prelude::*;
use realfft::num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The shapes of one call: `batch` rows of `in_features` values in, `out_features` out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CirculantShape {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
}

impl CirculantShape {
    /// The circulant matrix's size: non-square layers are padded to the larger side (the
    /// paper's section 3.1).
    pub fn d(&self) -> usize {
        self.in_features.max(self.out_features)
    }
}

/// The signs of `D`: `n` values of ±1 drawn from `seed` by SplitMix64 (Steele et al. 2014).
/// A layer stores only the seed, so the signs cost nothing on disk and any reader (the
/// training layer, the runtime, a test) draws the same ones. Hand-written because the
/// sequence is part of the file format: it must never change with a crate's version.
pub fn signs(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if z >> 63 == 0 { 1.0 } else { -1.0 }
        })
        .collect()
}

/// Which gradients a backward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub x: bool,
    pub r: bool,
    pub bias: bool,
}

/// Gradients of one call, each present if it was wanted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grads {
    /// `[batch, in]`
    pub x: Option<Vec<f32>>,
    /// `[d]`
    pub r: Option<Vec<f32>>,
    /// `[out]`
    pub bias: Option<Vec<f32>>,
}

fn check(s: &CirculantShape, x: &[f32], r: &[f32], signs: &[f32]) {
    assert!(
        s.in_features > 0 && s.out_features > 0,
        "circulant: at least one input and one output"
    );
    assert_eq!(x.len(), s.batch * s.in_features, "circulant: input size");
    assert_eq!(r.len(), s.d(), "circulant: r must have max(in, out) values");
    assert_eq!(signs.len(), s.in_features, "circulant: one sign per input");
}

/// Planned forward and inverse real FFTs of one size.
#[derive(Clone)]
pub struct CirculantPlan {
    d: usize,
    forward: Arc<dyn RealToComplex<f32>>,
    inverse: Arc<dyn ComplexToReal<f32>>,
}

impl std::fmt::Debug for CirculantPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CirculantPlan({})", self.d)
    }
}

/// Per-thread buffers of one transform pair.
struct Scratch {
    real: Vec<f32>,
    spectrum: Vec<Complex<f32>>,
    work: Vec<Complex<f32>>,
}

impl CirculantPlan {
    /// The plan for size `d`, made on first use and shared afterwards (planning costs far
    /// more than one transform).
    pub fn new(d: usize) -> Self {
        assert!(d > 0, "circulant: size must be positive");
        static PLANS: OnceLock<Mutex<HashMap<usize, CirculantPlan>>> = OnceLock::new();
        let mut plans = PLANS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        plans
            .entry(d)
            .or_insert_with(|| {
                let mut planner = RealFftPlanner::<f32>::new();
                CirculantPlan {
                    d,
                    forward: planner.plan_fft_forward(d),
                    inverse: planner.plan_fft_inverse(d),
                }
            })
            .clone()
    }

    pub fn d(&self) -> usize {
        self.d
    }

    fn scratch(&self) -> Scratch {
        let work = self
            .forward
            .get_scratch_len()
            .max(self.inverse.get_scratch_len());
        Scratch {
            real: vec![0.0; self.d],
            spectrum: vec![Complex::default(); self.d / 2 + 1],
            work: vec![Complex::default(); work],
        }
    }

    /// `fft(s.real)` into `s.spectrum` (`s.real` is overwritten).
    fn fft(&self, s: &mut Scratch) {
        self.forward
            .process_with_scratch(&mut s.real, &mut s.spectrum, &mut s.work)
            .expect("buffer sizes come from the plan");
    }

    /// `ifft(s.spectrum)` into `s.real`, unnormalised (`s.spectrum` is overwritten).
    fn ifft(&self, s: &mut Scratch) {
        // A real signal's spectrum has real first and (even d) last bins; products of such
        // spectra keep them real up to rounding, which the transform would reject.
        s.spectrum[0].im = 0.0;
        if self.d.is_multiple_of(2) {
            s.spectrum[self.d / 2].im = 0.0;
        }
        self.inverse
            .process_with_scratch(&mut s.spectrum, &mut s.real, &mut s.work)
            .expect("buffer sizes come from the plan");
    }

    /// `fft(r)`, which a forward pass multiplies every row by.
    pub fn spectrum(&self, r: &[f32]) -> Vec<Complex<f32>> {
        assert_eq!(r.len(), self.d);
        let mut s = self.scratch();
        s.real.copy_from_slice(r);
        self.fft(&mut s);
        s.spectrum
    }

    /// Loads `(signs ∘ row)` zero-padded into `s.real` and transforms it.
    fn fft_input(&self, s: &mut Scratch, row: &[f32], signs: &[f32]) {
        for ((z, &v), &sg) in s.real.iter_mut().zip(row).zip(signs) {
            *z = v * sg;
        }
        s.real[row.len()..].fill(0.0);
        self.fft(s);
    }

    /// The forward pass into `y` (`[batch, out]`), given `spectrum = self.spectrum(r)`;
    /// `relu` clamps the output at zero as it is written (the runtime's fused epilogue).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into(
        &self,
        s: &CirculantShape,
        x: &[f32],
        spectrum: &[Complex<f32>],
        signs: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        y: &mut [f32],
    ) {
        let d = self.d;
        assert_eq!(d, s.d(), "circulant: plan of the wrong size");
        assert_eq!(x.len(), s.batch * s.in_features, "circulant: input size");
        assert_eq!(y.len(), s.batch * s.out_features, "circulant: output size");
        assert_eq!(signs.len(), s.in_features, "circulant: one sign per input");
        assert_eq!(spectrum.len(), d / 2 + 1, "circulant: spectrum size");
        assert!(
            s.in_features > 0 && s.out_features > 0,
            "circulant: at least one input and one output"
        );
        if let Some(b) = bias {
            assert_eq!(b.len(), s.out_features, "circulant: one bias per output");
        }
        if s.batch == 0 {
            return;
        }
        let scale = 1.0 / d as f32;
        let row = |sc: &mut Scratch, xr: &[f32], yr: &mut [f32]| {
            self.fft_input(sc, xr, signs);
            for (z, &w) in sc.spectrum.iter_mut().zip(spectrum) {
                *z *= w;
            }
            self.ifft(sc);
            for (o, yv) in yr.iter_mut().enumerate() {
                let v = sc.real[o] * scale + bias.map_or(0.0, |b| b[o]);
                *yv = if relu { v.max(0.0) } else { v };
            }
        };
        if serial(s.batch, d) {
            let mut sc = self.scratch();
            for (xr, yr) in x.chunks(s.in_features).zip(y.chunks_mut(s.out_features)) {
                row(&mut sc, xr, yr);
            }
            return;
        }
        x.par_chunks(s.in_features)
            .zip(y.par_chunks_mut(s.out_features))
            .with_min_len(rows_per_task(d))
            .for_each_init(|| self.scratch(), |sc, (xr, yr)| row(sc, xr, yr));
    }

    /// The forward pass: `[batch, out]`.
    pub fn forward(
        &self,
        s: &CirculantShape,
        x: &[f32],
        r: &[f32],
        signs: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        check(s, x, r, signs);
        let mut y = vec![0.0; s.batch * s.out_features];
        self.forward_into(s, x, &self.spectrum(r), signs, bias, false, &mut y);
        y
    }

    /// The backward pass for the output gradient `g` (`[batch, out]`).
    pub fn backward(
        &self,
        s: &CirculantShape,
        x: &[f32],
        r: &[f32],
        signs: &[f32],
        g: &[f32],
        wanted: Wanted,
    ) -> Grads {
        check(s, x, r, signs);
        assert_eq!(
            g.len(),
            s.batch * s.out_features,
            "circulant: gradient size"
        );
        let d = self.d;
        let (n_in, n_out) = (s.in_features, s.out_features);
        let scale = 1.0 / d as f32;
        let bins = d / 2 + 1;
        let mut grads = Grads::default();
        if wanted.bias {
            let mut db = vec![0.0f32; n_out];
            for gr in g.chunks(n_out) {
                for (a, &v) in db.iter_mut().zip(gr) {
                    *a += v;
                }
            }
            grads.bias = Some(db);
        }
        if s.batch == 0 || !(wanted.x || wanted.r) {
            grads.x = wanted.x.then(|| vec![0.0; s.batch * n_in]);
            grads.r = wanted.r.then(|| vec![0.0; d]);
            return grads;
        }
        let spectrum = if wanted.x {
            self.spectrum(r)
        } else {
            Vec::new()
        };
        let mut dx = vec![0.0f32; if wanted.x { s.batch * n_in } else { 0 }];
        // Each row: fft(g), its dx through conj(fft(r)), and its term of Σ fft(g) ∘ conj(fft(z)).
        struct Task {
            sc: Scratch,
            /// This task's share of `Σ fft(g) ∘ conj(fft(z))`.
            acc: Vec<Complex<f32>>,
            /// `fft(g)` of the current row.
            gs: Vec<Complex<f32>>,
        }
        let row = |t: &mut Task, xr: &[f32], gr: &[f32], dxr: &mut [f32]| {
            let Task { sc, acc, gs } = t;
            sc.real[..n_out].copy_from_slice(gr);
            sc.real[n_out..].fill(0.0);
            self.fft(sc);
            gs.copy_from_slice(&sc.spectrum);
            if wanted.r {
                self.fft_input(sc, xr, signs);
                for ((a, &gv), &zv) in acc.iter_mut().zip(gs.iter()).zip(&sc.spectrum) {
                    *a += gv * zv.conj();
                }
            }
            if wanted.x {
                for ((z, &gv), &w) in sc.spectrum.iter_mut().zip(gs.iter()).zip(&spectrum) {
                    *z = gv * w.conj();
                }
                self.ifft(sc);
                for ((o, &v), &sg) in dxr.iter_mut().zip(&sc.real).zip(signs) {
                    *o = v * scale * sg;
                }
            }
        };
        // Rows in fixed blocks, whose partial sums are added in block order: the same `dr` on
        // any number of threads and in every run.
        let rows = if serial(s.batch, d) {
            s.batch.max(1)
        } else {
            rows_per_task(d)
        };
        let block = |xb: &[f32], gb: &[f32], dxb: &mut [f32]| {
            let mut t = Task {
                sc: self.scratch(),
                acc: vec![Complex::default(); bins],
                gs: vec![Complex::default(); bins],
            };
            for (k, (xr, gr)) in xb.chunks(n_in).zip(gb.chunks(n_out)).enumerate() {
                let dxr = if wanted.x {
                    &mut dxb[k * n_in..(k + 1) * n_in]
                } else {
                    &mut [][..]
                };
                row(&mut t, xr, gr, dxr);
            }
            t.acc
        };
        let blocks = s.batch.div_ceil(rows);
        let dx_blocks: Vec<&mut [f32]> = if wanted.x {
            dx.chunks_mut(rows * n_in).collect()
        } else {
            (0..blocks).map(|_| &mut [][..]).collect()
        };
        let parts: Vec<Vec<Complex<f32>>> = x
            .par_chunks(rows * n_in)
            .zip(g.par_chunks(rows * n_out))
            .zip(dx_blocks)
            .map(|((xb, gb), dxb)| block(xb, gb, dxb))
            .collect();
        let mut acc = vec![Complex::<f32>::default(); bins];
        for part in parts {
            for (a, v) in acc.iter_mut().zip(part) {
                *a += v;
            }
        }
        if wanted.r {
            let mut sc = self.scratch();
            sc.spectrum.copy_from_slice(&acc);
            self.ifft(&mut sc);
            grads.r = Some(sc.real.iter().map(|v| v * scale).collect());
        }
        if wanted.x {
            grads.x = Some(dx);
        }
        grads
    }
}

/// Whether a call is too small to pay for splitting it across threads (below about 64K
/// values, a thread hand-off costs more than the transforms it would share). It depends on the
/// sizes only, so results do not depend on the number of threads.
fn serial(batch: usize, d: usize) -> bool {
    batch * d < 1 << 16
}

/// Rows per rayon task: enough transforms that a task outweighs its scheduling.
fn rows_per_task(d: usize) -> usize {
    (4096 / d.max(1)).max(1)
}

/// The explicit O(d²) computation: obviously right, and what the FFT path must match.
pub mod reference {
    use super::{CirculantShape, Grads, Wanted, check};

    /// `R[i][j] = r[(i − j) mod d]`.
    fn at(r: &[f32], i: usize, j: usize) -> f32 {
        let d = r.len();
        r[(i + d - j) % d]
    }

    /// `[batch, out]`.
    pub fn forward(
        s: &CirculantShape,
        x: &[f32],
        r: &[f32],
        signs: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        check(s, x, r, signs);
        let mut y = Vec::with_capacity(s.batch * s.out_features);
        for xr in x.chunks(s.in_features.max(1)).take(s.batch) {
            for i in 0..s.out_features {
                let mut acc = 0.0f64;
                for j in 0..s.in_features {
                    acc += (at(r, i, j) * signs[j] * xr[j]) as f64;
                }
                y.push(acc as f32 + bias.map_or(0.0, |b| b[i]));
            }
        }
        y
    }

    /// Gradients by the chain rule on the explicit matrix.
    pub fn backward(
        s: &CirculantShape,
        x: &[f32],
        r: &[f32],
        signs: &[f32],
        g: &[f32],
        wanted: Wanted,
    ) -> Grads {
        check(s, x, r, signs);
        let d = s.d();
        let (n_in, n_out) = (s.in_features, s.out_features);
        let mut dx = vec![0.0f64; s.batch * n_in];
        let mut dr = vec![0.0f64; d];
        let mut db = vec![0.0f64; n_out];
        for n in 0..s.batch {
            for i in 0..n_out {
                let gv = g[n * n_out + i] as f64;
                db[i] += gv;
                for j in 0..n_in {
                    let z = (signs[j] * x[n * n_in + j]) as f64;
                    dr[(i + d - j) % d] += gv * z;
                    dx[n * n_in + j] += gv * (at(r, i, j) * signs[j]) as f64;
                }
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
        Grads {
            x: wanted.x.then(|| f(dx)),
            r: wanted.r.then(|| f(dr)),
            bias: wanted.bias.then(|| f(db)),
        }
    }
}
