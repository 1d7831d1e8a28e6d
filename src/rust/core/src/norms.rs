//! L2 norms of updates and norm clipping.

use crate::error::{invalid, CoreResult};
use crate::parallel::{block_sums, reduction_block};
use crate::updates::UpdateSet;
use rayon::prelude::*;

/// Sum of squares of `x`, reduced deterministically in fixed blocks.
pub fn sum_squares(x: &[f64]) -> f64 {
    block_sums(x.len(), 65_536, 1, |r, acc| {
        acc[0] = x[r].iter().map(|v| v * v).sum();
    })[0]
}

pub fn l2_norm(x: &[f64]) -> f64 {
    sum_squares(x).sqrt()
}

/// Per-client squared distance of one layer to `reference` (the origin when
/// `None`), reduced deterministically in fixed blocks.
pub fn layer_sq_distances(layer: &[&[f64]], reference: Option<&[f64]>) -> Vec<f64> {
    let k = layer.len();
    let len = layer.first().map_or(0, |x| x.len());
    block_sums(len, reduction_block(k), k, |r, acc| match reference {
        None => {
            for (a, x) in acc.iter_mut().zip(layer) {
                *a = x[r.clone()].iter().map(|v| v * v).sum();
            }
        }
        Some(z) => {
            let zr = &z[r.clone()];
            for (a, x) in acc.iter_mut().zip(layer) {
                *a = x[r.clone()].iter().zip(zr).map(|(p, q)| (p - q) * (p - q)).sum();
            }
        }
    })
}

/// Per-client, per-layer L2 norms: `norms[k][l]`.
pub fn layer_norms(set: &UpdateSet) -> Vec<Vec<f64>> {
    let mut out = vec![vec![0.0; set.n_layers()]; set.n_clients()];
    for l in 0..set.n_layers() {
        for (row, s) in out.iter_mut().zip(layer_sq_distances(set.layer(l), None)) {
            row[l] = s.sqrt();
        }
    }
    out
}

/// Total L2 norm from per-layer norms.
pub fn total_norm(layer_norms: &[f64]) -> f64 {
    layer_norms.iter().map(|n| n * n).sum::<f64>().sqrt()
}

/// Factor that brings a vector of norm `norm` to at most `max_norm`.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if norm > max_norm {
        max_norm / norm
    } else {
        1.0
    }
}

/// Clipped copy of one update given as layers. Returns the clipped layers and
/// the pre-clip norms (one per layer when `per_layer`, else one in total).
pub fn clip_layers(layers: &[&[f64]], max_norm: f64, per_layer: bool) -> CoreResult<(Vec<Vec<f64>>, Vec<f64>)> {
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return invalid("max_norm", "must be a finite number > 0");
    }
    let norms: Vec<f64> = layers.iter().map(|x| l2_norm(x)).collect();
    let factors: Vec<f64> = if per_layer {
        norms.iter().map(|&n| clip_factor(n, max_norm)).collect()
    } else {
        vec![clip_factor(total_norm(&norms), max_norm); layers.len()]
    };
    let clipped = layers
        .iter()
        .zip(&factors)
        .map(|(x, &f)| x.par_iter().with_min_len(4096).map(|v| v * f).collect())
        .collect();
    let reported = if per_layer { norms } else { vec![total_norm(&norms)] };
    Ok((clipped, reported))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_to_max_norm_and_reports_pre_clip_norm() {
        let a = [3.0, 4.0];
        let b = [0.0, 12.0];
        let (c, n) = clip_layers(&[&a, &b], 6.5, false).unwrap();
        assert_eq!(n, vec![13.0]);
        let after = total_norm(&[l2_norm(&c[0]), l2_norm(&c[1])]);
        assert!((after - 6.5).abs() < 1e-12);
        let (c, n) = clip_layers(&[&a, &b], 6.5, true).unwrap();
        assert_eq!(n, vec![5.0, 12.0]);
        assert_eq!(c[0], a.to_vec());
        assert!((l2_norm(&c[1]) - 6.5).abs() < 1e-12);
        assert!(clip_layers(&[&a], 0.0, false).is_err());
        assert!(clip_layers(&[&a], f64::NAN, false).is_err());
    }

    #[test]
    fn layer_norms_match_direct_sums() {
        let a = [3.0, 4.0];
        let b = [1.0, 1.0, 1.0, 1.0];
        let c = [0.0, 0.0];
        let d = [2.0, 2.0, 2.0, 2.0];
        let set = UpdateSet::new(vec![vec![&a, &c], vec![&b, &d]]).unwrap();
        assert_eq!(layer_norms(&set), vec![vec![5.0, 2.0], vec![0.0, 4.0]]);
    }
}
