//! A dense layer `y = x W + b` (`W` is `[in, out]`) as two: `W ≈ (U_r Σ_r^½)(Σ_r^½ V_rᵀ)`, the
//! truncated SVD. By the Eckart-Young theorem it is the best rank-r approximation in the
//! Frobenius norm, with error `‖W − W_r‖²_F = Σ_{i>r} σᵢ²`. Parameters go from `in·out` to
//! `r·(in + out)`; the bias stays on the second layer. The square root of Σ is split evenly
//! so both layers start at the same scale, which fine-tuning with one learning rate prefers.

use super::{Factor, Factorization, LayerWeights, Rank, Spectral, describe, linalg, vbmf};
use crate::models::LayerSpec;

pub struct TruncatedSvd;

fn dims(spec: &LayerSpec) -> Result<(usize, usize, bool), String> {
    match *spec {
        LayerSpec::Linear {
            in_features,
            out_features,
            bias,
        } => Ok((in_features, out_features, bias)),
        _ => Err(format!(
            "{} is not a dense layer: svd factorizes linear layers (convolutions: --method separable, cp or tucker2)",
            describe(spec)
        )),
    }
}

impl Factorization for TruncatedSvd {
    fn check(&self, spec: &LayerSpec) -> Result<(), String> {
        dims(spec).map(|_| ())
    }

    fn max_rank(&self, spec: &LayerSpec) -> Rank {
        let (i, o, _) = dims(spec).expect("checked");
        vec![i.min(o)]
    }

    fn specs(&self, spec: &LayerSpec, rank: &Rank) -> Vec<LayerSpec> {
        let (i, o, bias) = dims(spec).expect("checked");
        vec![
            LayerSpec::Linear {
                in_features: i,
                out_features: rank[0],
                bias: false,
            },
            LayerSpec::Linear {
                in_features: rank[0],
                out_features: o,
                bias,
            },
        ]
    }

    fn spectral_rank(&self, layer: &LayerWeights, rule: Spectral) -> Result<Rank, String> {
        let (i, o, _) = dims(layer.spec)?;
        let w = linalg::matrix(layer.weight, i, o);
        Ok(vec![match rule {
            Spectral::Energy(e) => linalg::energy_rank(&linalg::singular_values(&w)?, e),
            Spectral::Vbmf => vbmf::rank(&w)?,
        }])
    }

    fn factorize(&self, layer: &LayerWeights, rank: &Rank) -> Result<Vec<Factor>, String> {
        let (i, o, _) = dims(layer.spec)?;
        let r = rank[0];
        let d = linalg::svd(&linalg::matrix(layer.weight, i, o))?;
        let mut first = vec![0f32; i * r];
        let mut second = vec![0f32; r * o];
        for k in 0..r {
            let root = d.s[k].sqrt();
            for a in 0..i {
                first[a * r + k] = (d.u[(a, k)] * root) as f32;
            }
            for b in 0..o {
                second[k * o + b] = (d.v[(b, k)] * root) as f32;
            }
        }
        let specs = self.specs(layer.spec, rank);
        Ok(vec![
            Factor {
                spec: specs[0].clone(),
                weight: first,
                bias: None,
            },
            Factor {
                spec: specs[1].clone(),
                weight: second,
                bias: layer.bias.map(<[f32]>::to_vec),
            },
        ])
    }
}
