//! One conformance suite for every int8 matrix-product path (`kernels::int8`): each must equal
//! the plain reference exactly, on ordinary shapes (every remainder of the 16-wide and 4-wide
//! blocks), on the worst cases for 16-bit intermediate sums (all 255 against all 127 or all
//! -128, where `vpmaddubsw` would saturate), and at the longest reduction that fits in i32.
//! A path this machine cannot run says so and passes.

mod common;

use convpress::kernels::int8::{self, Int8Gemm, MAX_K, Reference};

/// Deterministic bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    common::uniform(n, seed, 0.0, 256.0)
        .into_iter()
        .map(|v| v as u8)
        .collect()
}

fn check(kernel: &dyn Int8Gemm, m: usize, n: usize, k: usize, a: &[u8], b: &[i8]) {
    let mut want = vec![0i32; m * n];
    Reference.gemm(m, n, k, a, b, &mut want);
    let mut got = vec![i32::MIN; m * n];
    kernel.gemm(m, n, k, a, b, &mut got);
    assert_eq!(got, want, "{} on {m}x{n}x{k}", kernel.name());
}

macro_rules! int8_gemm_conformance {
    ($name:ident, $build:expr) => {
        mod $name {
            use super::*;

            fn kernel() -> Option<Box<dyn Int8Gemm>> {
                let k: Option<Box<dyn Int8Gemm>> = $build;
                if k.is_none() {
                    eprintln!("{}: this machine cannot run it; skipped", stringify!($name));
                }
                k
            }

            #[test]
            fn matches_the_reference_on_many_shapes() {
                let Some(kernel) = kernel() else { return };
                for &(m, n, k) in &[
                    (1, 1, 1),
                    (1, 3, 15),
                    (2, 4, 16),
                    (3, 5, 17),
                    (7, 9, 31),
                    (7, 9, 32),
                    (8, 8, 33),
                    (64, 10, 784),
                    (5, 33, 4099),
                    (100, 20, 150),
                    // Many tasks of whole tiles and a ragged last one; narrow last panels.
                    (301, 40, 100),
                    (97, 50, 500),
                    (0, 3, 5),
                    (3, 0, 5),
                    (3, 4, 0),
                ] {
                    let a = bytes(m * k, (m * 131 + k) as u64);
                    let b: Vec<i8> = bytes(n * k, (n * 7 + k) as u64)
                        .into_iter()
                        .map(|v| v as i8)
                        .collect();
                    check(kernel.as_ref(), m, n, k, &a, &b);
                }
            }

            #[test]
            fn is_exact_where_16_bit_sums_would_saturate() {
                let Some(kernel) = kernel() else { return };
                for &(m, n, k) in &[(1, 1, 2), (3, 5, 16), (2, 7, 1000)] {
                    let a = vec![255u8; m * k];
                    for w in [127i8, -128, -1] {
                        let b = vec![w; n * k];
                        check(kernel.as_ref(), m, n, k, &a, &b);
                        let mut c = vec![0; m * n];
                        kernel.gemm(m, n, k, &a, &b, &mut c);
                        assert!(c.iter().all(|&v| v == 255 * w as i32 * k as i32));
                    }
                    // Alternating signs: large partial sums of both signs.
                    let b: Vec<i8> = (0..n * k)
                        .map(|i| if i % 2 == 0 { 127 } else { -128 })
                        .collect();
                    check(kernel.as_ref(), m, n, k, &a, &b);
                }
            }

            #[test]
            fn the_longest_reduction_fits() {
                let Some(kernel) = kernel() else { return };
                let (m, n, k) = (1, 2, MAX_K);
                let a = vec![255u8; m * k];
                let mut b = vec![-128i8; n * k];
                b[k..].fill(127);
                let mut c = vec![0; m * n];
                kernel.gemm(m, n, k, &a, &b, &mut c);
                assert_eq!(c, vec![-255 * 128 * k as i32, 255 * 127 * k as i32]);
            }
        }
    };
}

int8_gemm_conformance!(reference, Some(Box::new(int8::Reference)));
int8_gemm_conformance!(portable, Some(Box::new(int8::Portable)));
int8_gemm_conformance!(
    avx2,
    int8::Avx2::new().map(|k| Box::new(k) as Box<dyn Int8Gemm>)
);

int8_gemm_conformance!(
    avx2_blocked,
    int8::Blocked::new().map(|k| Box::new(k) as Box<dyn Int8Gemm>)
);

int8_gemm_conformance!(
    avx2_quads,
    int8::Quads::avx2().map(|k| Box::new(k) as Box<dyn Int8Gemm>)
);

int8_gemm_conformance!(
    avx512_vnni,
    int8::Quads::vnni().map(|k| Box::new(k) as Box<dyn Int8Gemm>)
);

/// The `vpmaddubsw` path on the weights it takes, [-64, 64]: exact at its own worst cases (all
/// 255 against all 64, all -64, alternating), where a pair of products comes within 127 of
/// the 16-bit limit, on every remainder of quads, panels and tiles; and it refuses to pack a
/// weight outside that range (the suite above shows it then falls back, exactly).
#[test]
fn quads_are_exact_for_7_bit_weights_at_their_worst_case() {
    let Some(kernel) = int8::Quads::avx2() else {
        eprintln!("no AVX2: the quads path is not run here");
        return;
    };
    for &(m, n, k) in &[
        (1, 1, 1),
        (7, 9, 5),
        (13, 33, 4099),
        (200, 50, 500),
        (64, 10, 784),
    ] {
        let a = vec![255u8; m * k];
        for b in [
            vec![64i8; n * k],
            vec![-64i8; n * k],
            (0..n * k)
                .map(|i| if i % 2 == 0 { 64 } else { -64 })
                .collect(),
            bytes(n * k, 5)
                .iter()
                .map(|&v| (v as i8) / 2)
                .collect::<Vec<i8>>(),
        ] {
            assert!(int8::PackedQuads::new(n, k, &b).is_some());
            check(&kernel, m, n, k, &a, &b);
            let a = bytes(m * k, (m + k) as u64);
            check(&kernel, m, n, k, &a, &b);
        }
    }
    assert!(int8::PackedQuads::new(1, 2, &[64, 65]).is_none());
    assert!(int8::PackedQuads::new(1, 2, &[-65, 0]).is_none());
}

/// The blocked kernel's two other entry points, as gemms for the same suite: rows already
/// widened to pairs (`gemm_pairs`), and pairs gathered through offsets from one u16 buffer
/// (`gemm_gathered`, which the int8 convolution uses), here laid out with gaps between the
/// pairs and between the rows, so that both the offsets and the grid are followed.
struct Pairs(int8::Blocked);
struct Gathered(int8::Blocked);

fn widened(m: usize, k: usize, a: &[u8], stride: usize) -> Vec<u16> {
    let mut wide = vec![0u16; m * stride + 2];
    for (i, row) in a.chunks_exact(k.max(1)).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            wide[i * stride + j] = v as u16;
        }
    }
    wide
}

impl Int8Gemm for Pairs {
    fn name(&self) -> &'static str {
        "avx2-blocked pairs"
    }
    fn gemm(&self, m: usize, n: usize, k: usize, a: &[u8], b: &[i8], c: &mut [i32]) {
        let packed = int8::PackedB::new(n, k, b);
        let wide = widened(m, k, a, 2 * packed.pairs());
        let a2: Vec<i32> = wide[..m * 2 * packed.pairs()]
            .chunks_exact(2)
            .map(|p| p[0] as i32 | (p[1] as i32) << 16)
            .collect();
        self.0.gemm_pairs(m, &packed, &a2, c);
    }
}

/// Rows `[m, k]` of `a` laid out as a gathered source: groups of `group` values `gap` apart
/// (as a window's rows are in a padded image), rows `groups · gap + 3` apart, each row "image"
/// `i` of a grid of one position; with the offsets of the groups.
fn spaced<T: From<u8> + Copy + Default>(
    a: &[u8],
    m: usize,
    k: usize,
    group: usize,
    groups: usize,
    gap: usize,
) -> (Vec<T>, int8::Grid, Vec<usize>) {
    let stride = groups * gap + 3;
    let mut out = vec![T::default(); m * stride + gap + group];
    for (i, row) in a.chunks_exact(k.max(1)).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            out[i * stride + (j / group) * gap + j % group] = T::from(v);
        }
    }
    let grid = int8::Grid {
        images: m,
        out_hw: [1, 1],
        image_len: stride,
        step: [0, 0],
    };
    (out, grid, (0..groups).map(|q| q * gap).collect())
}

impl Int8Gemm for Gathered {
    fn name(&self) -> &'static str {
        "avx2-blocked gathered"
    }
    fn gemm(&self, m: usize, n: usize, k: usize, a: &[u8], b: &[i8], c: &mut [i32]) {
        let packed = int8::PackedB::new(n, k, b);
        let (wide, grid, offsets) = spaced::<u16>(a, m, k, 2, packed.pairs(), 5);
        self.0.gemm_gathered(&grid, &offsets, &wide, &packed, c);
    }
}

int8_gemm_conformance!(
    avx2_pairs,
    int8::Blocked::new().map(|k| Box::new(Pairs(k)) as Box<dyn Int8Gemm>)
);

int8_gemm_conformance!(
    avx2_gathered,
    int8::Blocked::new().map(|k| Box::new(Gathered(k)) as Box<dyn Int8Gemm>)
);

/// Quads gathered through offsets from one u8 buffer (`gemm_gathered_quads_with`, what an
/// int8 convolution with channels in fours runs), laid out by [`spaced`] as [`Gathered`], on
/// the blocked kernel `0`. Without VNNI, weights outside [-64, 64] go to the widening path,
/// as the runtime does.
struct GatheredQuads(int8::Blocked, &'static str);

impl Int8Gemm for GatheredQuads {
    fn name(&self) -> &'static str {
        self.1
    }
    fn gemm(&self, m: usize, n: usize, k: usize, a: &[u8], b: &[i8], c: &mut [i32]) {
        let Some(packed) = self.0.pack_quads(n, k, b) else {
            return self.0.gemm(m, n, k, a, b, c);
        };
        let (codes, grid, offsets) = spaced::<u8>(a, m, k, 4, packed.quads(), 7);
        self.0
            .gemm_gathered_quads_with(&grid, &offsets, &codes, &packed, c, n, &|_, sums, c| {
                for (r, row) in c.chunks_exact_mut(n).enumerate() {
                    sums.row_into(r, row);
                }
            });
    }
}

int8_gemm_conformance!(
    avx2_gathered_quads,
    int8::Blocked::new()
        .map(|k| Box::new(GatheredQuads(k, "avx2-quads gathered")) as Box<dyn Int8Gemm>)
);

int8_gemm_conformance!(
    vnni_gathered,
    int8::Blocked::with_vnni()
        .map(|k| Box::new(GatheredQuads(k, "avx512-vnni gathered")) as Box<dyn Int8Gemm>)
);

/// VNNI packs every int8 weight as quads, `vpmaddubsw` only those in [-64, 64]; where the CPU
/// has VNNI, the layers run on it.
#[test]
fn vnni_takes_every_weight_and_is_what_layers_run_where_present() {
    let Some(kb) = int8::Blocked::with_vnni() else {
        eprintln!("no AVX-512 VNNI here: skipped");
        return;
    };
    assert!(kb.has_vnni() && kb.quads_name() == "avx512-vnni");
    assert!(kb.pack_quads(1, 2, &[127, -128]).is_some());
    let plain = int8::Blocked::new().unwrap();
    assert!(plain.pack_quads(1, 2, &[127, -128]).is_none());
    if std::env::var("CONVPRESS_VNNI").as_deref() != Ok("off") {
        assert!(int8::Blocked::best().unwrap().has_vnni());
    }
}

#[test]
fn best_is_one_of_the_available_paths() {
    let names: Vec<&str> = int8::available().iter().map(|k| k.name()).collect();
    assert_eq!(names[0], "reference");
    assert!(names.contains(&int8::best().name()), "{names:?}");
}

mod linear {
    use convpress::compress::quantize::{Calibration, Observer, Quantizer};
    use convpress::kernels::int8::{self, Int8Gemm};
    use convpress::runtime::LinearKernel;
    use convpress::runtime::int8::Int8Linear;

    use super::common::uniform;

    fn paths() -> Vec<&'static dyn Int8Gemm> {
        int8::available()
            .into_iter()
            .map(|k| &*Box::leak(k))
            .collect()
    }

    /// A 784 -> 300 layer (LeNet-300's first) on ReLU-like inputs, calibrated by min-max.
    fn layer(bits: u32) -> (Int8Linear, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (n_in, n_out) = (784, 300);
        let w = uniform(n_in * n_out, 1, -0.1, 0.1);
        let b = uniform(n_out, 2, -0.5, 0.5);
        let x = uniform(64 * n_in, 3, 0.0, 1.0);
        let mut o = Observer::default();
        o.observe(&x).unwrap();
        let input = o.quantizer(Calibration::MinMax, 8).unwrap();
        let l = Int8Linear::new(n_in, n_out, &w, Some(b.clone()), bits, input).unwrap();
        (l, w, b, x)
    }

    /// Every path computes exactly the layer of the dequantized values (up to f32 rounding).
    #[test]
    fn equals_the_layer_of_its_dequantized_values_on_every_path() {
        let (l, _, b, x) = layer(8);
        let (n_in, n_out) = (784, 300);
        let (codes, wq) = l.weights();
        let input: Quantizer = l.input_quantizer();
        let batch = 64;
        let mut want = vec![0f64; batch * n_out];
        for r in 0..batch {
            for o in 0..n_out {
                let mut acc = b[o] as f64;
                for i in 0..n_in {
                    let xh = input.round_trip(x[r * n_in + i]) as f64;
                    let wh = wq[o].dequantize(codes[o * n_in + i] as i32) as f64;
                    acc += xh * wh;
                }
                want[r * n_out + o] = acc;
            }
        }
        for path in paths() {
            let (l, ..) = layer(8);
            let l = l.with_kernel(path);
            let mut y = vec![f32::NAN; batch * n_out];
            l.forward(&x, batch, &mut y);
            for (i, (&g, &w)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{}: y[{i}] = {g}, dequantized reference {w}",
                    path.name()
                );
            }
        }
    }

    /// Against the float layer, 8-bit quantization costs well under 1% (RMS, relative).
    #[test]
    fn is_close_to_the_float_layer() {
        for (bits, bound) in [(8, 0.01), (4, 0.15)] {
            let (l, w, b, x) = layer(bits);
            let (n_in, n_out, batch) = (784, 300, 64);
            let mut y = vec![0f32; batch * n_out];
            l.forward(&x, batch, &mut y);
            let (mut err, mut norm) = (0f64, 0f64);
            for r in 0..batch {
                for o in 0..n_out {
                    let mut f = b[o] as f64;
                    for i in 0..n_in {
                        f += x[r * n_in + i] as f64 * w[o * n_in + i] as f64;
                    }
                    err += (y[r * n_out + o] as f64 - f).powi(2);
                    norm += f * f;
                }
            }
            let rel = (err / norm).sqrt();
            assert!(rel < bound, "{bits} bits: relative RMS error {rel}");
        }
        let (l, ..) = layer(8);
        // One byte per weight, plus a scale per channel and the bias.
        assert_eq!(l.weight_bytes(), 784 * 300 + 4 * 300 + 4 * 300);
    }

    #[test]
    fn impossible_layers_are_refused() {
        let q = Quantizer::asymmetric(0.0, 1.0, 8);
        let w = vec![0.1; 6];
        assert!(
            Int8Linear::new(3, 2, &w, None, 1, q)
                .unwrap_err()
                .contains("bits")
        );
        assert!(Int8Linear::new(3, 2, &w, None, 9, q).is_err());
        assert!(
            Int8Linear::new(4, 2, &w, None, 8, q)
                .unwrap_err()
                .contains("weight")
        );
        assert!(Int8Linear::new(3, 2, &w, Some(vec![0.0]), 8, q).is_err());
        let signed = Quantizer::symmetric(1.0, 8);
        assert!(Int8Linear::new(3, 2, &w, None, 8, signed).is_err());
        let big = vec![0.0; int8::MAX_K + 1];
        assert!(
            Int8Linear::new(int8::MAX_K + 1, 1, &big, None, 8, q)
                .unwrap_err()
                .contains("32 bits")
        );
    }
}

/// The vector rounding of a layer's input gives the same bytes as the scalar quantizer, for
/// ordinary values, ties, values beyond the range, infinities and NaN.
#[test]
fn input_quantization_matches_the_scalar_quantizer() {
    use convpress::compress::quantize::Quantizer;
    let q = Quantizer::asymmetric(-1.5, 4.0, 8);
    let mut x: Vec<f32> = bytes(1000, 4)
        .iter()
        .zip(bytes(1000, 5))
        .map(|(&a, b)| (a as f32 - 100.0) / 37.0 + b as f32 / 4096.0)
        .collect();
    // Exact ties and the special values, spread across vector and scalar positions.
    for (i, v) in [
        0.0,
        q.scale * 0.5,
        -q.scale * 0.5,
        1e30,
        -1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -0.0,
        4.0,
        -1.5,
    ]
    .into_iter()
    .enumerate()
    {
        x[i * 97] = v;
        x[999 - i] = v;
    }
    let mut got = vec![0u8; x.len()];
    q.quantize_u8_slice(&x, &mut got);
    let want: Vec<u8> = x.iter().map(|&v| q.quantize_u8(v)).collect();
    assert_eq!(got, want);
}

/// The int8 layers' epilogue, requantizing each task's sums to the next layer's codes on the
/// blocked kernel (AVX2, whole panels stored 16 bytes at a time), gives exactly the codes of
/// the scalar epilogue on the reference sums: every panel width, with and without ReLU, sums
/// far outside the code range, and a rounding that clamps at both ends.
#[test]
fn the_requantizing_epilogue_matches_the_scalar_one() {
    use convpress::kernels::int8::{Dequant, PANEL, Rounding};
    let Some(kb) = int8::Blocked::new() else {
        eprintln!("no AVX2: the blocked kernel's epilogue is not run here");
        return;
    };
    let next = Rounding {
        inverse: 1.0 / 0.37,
        offset: 12.5,
        lo: 0.0,
        hi: 255.49,
    };
    for &(m, n, k) in &[
        (7, 20, 30),
        (13, 1, 5),
        (40, 33, 64),
        (200, 50, 100),
        (6, 8, 16),
        (9, 9, 9),
    ] {
        let a = bytes(m * k, (m + 3 * n) as u64);
        let b: Vec<i8> = bytes(n * k, (k + n) as u64)
            .into_iter()
            .map(|v| v as i8)
            .collect();
        let padded = n.div_ceil(PANEL) * PANEL;
        let mut scales = common::uniform(n, 7, 2e-3, 2e-2);
        let mut offsets = common::uniform(n, 8, -40.0, 40.0);
        scales.resize(padded, 0.0);
        offsets.resize(padded, 0.0);
        let mut sums = vec![0i32; m * n];
        Reference.gemm(m, n, k, &a, &b, &mut sums);
        let packed = int8::PackedB::new(n, k, &b);
        for relu in [false, true] {
            let d = Dequant {
                scales: &scales,
                offsets: &offsets,
                relu,
            };
            let mut want = vec![0u8; m * n];
            for (row, out) in sums.chunks_exact(n).zip(want.chunks_exact_mut(n)) {
                for (p, (s, o)) in row.chunks(PANEL).zip(out.chunks_mut(PANEL)).enumerate() {
                    let mut lanes = [0i32; PANEL];
                    lanes[..s.len()].copy_from_slice(s);
                    d.codes_scalar(p, &lanes, next, o);
                }
            }
            // Both ends clamp (with ReLU the lowest code is the zero point's).
            let low = if relu { 12 } else { 0 };
            assert!(
                want.contains(&low) && want.contains(&255) && want.iter().all(|&c| c >= low),
                "{m}x{n}x{k}: no clamping"
            );
            let mut got = vec![7u8; m * n];
            kb.gemm_packed_with(m, &packed, &a, &mut got, n, &|_, s, out| {
                d.codes_rows(s, next, out)
            });
            assert_eq!(got, want, "{m}x{n}x{k}, relu {relu}");
            // One panel at a time on the dispatching path.
            let mut one = vec![0u8; n];
            for (row, w) in sums.chunks_exact(n).zip(want.chunks_exact(n)).take(3) {
                for (p, (s, o)) in row.chunks(PANEL).zip(one.chunks_mut(PANEL)).enumerate() {
                    let mut lanes = [0i32; PANEL];
                    lanes[..s.len()].copy_from_slice(s);
                    d.codes(p, &lanes, next, o);
                }
                assert_eq!(one, w);
            }
        }
    }
}
