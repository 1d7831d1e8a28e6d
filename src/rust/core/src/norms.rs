//! L2 norms of updates and norm clipping.
//!
//! A plain sum of squares overflows once values pass about 1e154 and loses
//! digits to underflow below about 1e-154, although the norm itself is an
//! ordinary double in both cases. Every norm here is first computed the
//! plain way; only when that sum is not finite, or too small to trust, is it
//! recomputed on the values scaled by the exact power of two that brings the
//! largest one near 1. Ordinary inputs keep exactly the plain results.

use crate::alloc::try_zeroed;
use crate::error::{invalid, CoreResult};
use crate::parallel::{block_sums, min_len, reduction_block};
use crate::updates::UpdateSet;
use rayon::prelude::*;

/// Block of the sum of squares of a single vector.
const SUM_BLOCK: usize = 65_536;

/// Copies and scalings run in chunks of this many values per task.
const COPY_CHUNK: usize = 4096;

/// A plain sum of squares at least this large lost nothing that matters to
/// underflow: each square that underflowed is off by at most 2^-1075, so even
/// a billion of them move the sum by under 1e-33 of itself.
const TRUSTED_MIN_SUM: f64 = 1e-280;

/// A sum of squares held as `sum * 4^exponent`, representable where the sum
/// itself would overflow or underflow.
#[derive(Clone, Copy, Debug, PartialEq)]
struct ScaledSquares {
    sum: f64,
    exponent: i32,
}

impl ScaledSquares {
    fn norm(self) -> f64 {
        if self.exponent == 0 {
            self.sum.sqrt()
        } else {
            libm::scalbn(self.sum.sqrt(), self.exponent)
        }
    }

    fn squared(self) -> f64 {
        if self.exponent == 0 {
            self.sum
        } else {
            libm::scalbn(self.sum, 2 * self.exponent)
        }
    }
}

/// 2^k for k in the normal exponent range.
fn pow2(k: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&k));
    f64::from_bits(((1023 + k) as u64) << 52)
}

/// Two factors whose product is 2^-exponent: one alone would overflow for
/// the exponents of subnormal maxima. Multiplying by them is exact.
fn unit_scale(exponent: i32) -> (f64, f64) {
    let half = -exponent / 2;
    (pow2(half), pow2(-exponent - half))
}

/// The largest absolute value (0 for an empty slice; NaN is skipped). Exact,
/// so the order the blocks are combined in cannot matter.
fn max_abs(x: &[f64]) -> f64 {
    x.par_chunks(SUM_BLOCK)
        .with_min_len(min_len())
        .map(|c| c.iter().fold(0.0, |m: f64, v| m.max(v.abs())))
        .reduce(|| 0.0, f64::max)
}

/// Sum of `(v * 2^-exponent)^2` over `x` in fixed blocks of `block` values.
fn squares_sum(x: &[f64], block: usize, exponent: i32) -> f64 {
    let (f1, f2) = unit_scale(exponent);
    block_sums(x.len(), block, 1, |r, acc| {
        acc[0] = if exponent == 0 {
            x[r].iter().map(|v| v * v).sum()
        } else {
            x[r].iter()
                .map(|v| {
                    let y = v * f1 * f2;
                    y * y
                })
                .sum()
        };
    })[0]
}

/// The sum of squares of `x` given its plain value, recomputed on scaled
/// values by `scaled(exponent)` when the plain value cannot be trusted.
fn rescued(x: &[f64], plain: f64, scaled: impl Fn(i32) -> f64) -> ScaledSquares {
    let as_is = ScaledSquares { sum: plain, exponent: 0 };
    if plain.is_nan() || (plain.is_finite() && plain >= TRUSTED_MIN_SUM) {
        return as_is;
    }
    let largest = max_abs(x);
    // All zeros, or an infinite value: the plain sum (0 or inf) is right.
    if largest == 0.0 || largest.is_infinite() {
        return as_is;
    }
    let exponent = libm::frexp(largest).1;
    ScaledSquares { sum: scaled(exponent), exponent }
}

fn scaled_squares(x: &[f64], block: usize) -> ScaledSquares {
    rescued(x, squares_sum(x, block, 0), |e| squares_sum(x, block, e))
}

/// Sum of squares of `x`, reduced deterministically in fixed blocks. It is
/// infinite only when the true value exceeds the largest double.
pub fn sum_squares(x: &[f64]) -> f64 {
    scaled_squares(x, SUM_BLOCK).squared()
}

/// Euclidean norm of `x`; does not overflow or underflow before the norm does.
pub fn l2_norm(x: &[f64]) -> f64 {
    scaled_squares(x, SUM_BLOCK).norm()
}

/// Per-client sums of squares of one layer, rescued one client at a time.
fn client_squares(layer: &[&[f64]]) -> Vec<ScaledSquares> {
    let len = layer.first().map_or(0, |x| x.len());
    let block = reduction_block(layer.len());
    let plain = block_sums(len, block, layer.len(), |r, acc| {
        for (a, x) in acc.iter_mut().zip(layer) {
            *a = x[r.clone()].iter().map(|v| v * v).sum();
        }
    });
    plain.into_iter().zip(layer).map(|(s, x)| rescued(x, s, |e| squares_sum(x, block, e))).collect()
}

/// Per-client squared distance of one layer to `reference` (the origin when
/// `None`), reduced deterministically in fixed blocks. Distances to the
/// origin are rescued from overflow and underflow like `sum_squares`.
pub fn layer_sq_distances(layer: &[&[f64]], reference: Option<&[f64]>) -> Vec<f64> {
    let Some(z) = reference else {
        return client_squares(layer).into_iter().map(ScaledSquares::squared).collect();
    };
    let k = layer.len();
    let len = layer.first().map_or(0, |x| x.len());
    block_sums(len, reduction_block(k), k, |r, acc| {
        let zr = &z[r.clone()];
        for (a, x) in acc.iter_mut().zip(layer) {
            *a = x[r.clone()].iter().zip(zr).map(|(p, q)| (p - q) * (p - q)).sum();
        }
    })
}

/// Per-client, per-layer L2 norms: `norms[k][l]`.
pub fn layer_norms(set: &UpdateSet) -> Vec<Vec<f64>> {
    let mut out = vec![vec![0.0; set.n_layers()]; set.n_clients()];
    for l in 0..set.n_layers() {
        for (row, s) in out.iter_mut().zip(client_squares(set.layer(l))) {
            row[l] = s.norm();
        }
    }
    out
}

/// Total L2 norm from per-layer norms, as `hypot` does for two: the norms
/// are rescaled when their squares would overflow or underflow.
pub fn total_norm(layer_norms: &[f64]) -> f64 {
    let plain = layer_norms.iter().map(|n| n * n).sum::<f64>();
    rescued(layer_norms, plain, |e| {
        let (f1, f2) = unit_scale(e);
        layer_norms
            .iter()
            .map(|n| {
                let y = n * f1 * f2;
                y * y
            })
            .sum()
    })
    .norm()
}

/// Factor that brings a vector of norm `norm` to at most `max_norm`.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if norm > max_norm {
        max_norm / norm
    } else {
        1.0
    }
}

/// `x` with every value mapped by `f`, in a checked allocation.
fn mapped_copy(x: &[f64], f: impl Fn(f64) -> f64 + Sync) -> CoreResult<Vec<f64>> {
    let mut out = try_zeroed(x.len(), "the clipped update")?;
    out.par_chunks_mut(COPY_CHUNK).zip(x.par_chunks(COPY_CHUNK)).with_min_len(min_len()).for_each(|(o, x)| {
        for (o, v) in o.iter_mut().zip(x) {
            *o = f(*v);
        }
    });
    Ok(out)
}

/// Copies of `layers` scaled together so that their joint norm `norm`
/// becomes at most `max_norm`.
fn clip_group(layers: &[&[f64]], norm: f64, max_norm: f64) -> CoreResult<Vec<Vec<f64>>> {
    let factor = clip_factor(norm, max_norm);
    let largest = if factor >= f64::MIN_POSITIVE {
        None
    } else {
        Some(layers.iter().map(|x| max_abs(x)).fold(0.0, f64::max)).filter(|m| m.is_finite() && *m > 0.0)
    };
    let Some(largest) = largest else {
        return layers.iter().map(|x| mapped_copy(x, |v| v * factor)).collect();
    };
    // The norm is beyond the double range (factor 0) or the factor is
    // subnormal and would cost digits: bring the values near 1 by an exact
    // power of two first, where the norm and the factor are ordinary numbers.
    let exponent = libm::frexp(largest).1;
    let (f1, f2) = unit_scale(exponent);
    let scaled_norm = layers.iter().map(|x| squares_sum(x, SUM_BLOCK, exponent)).sum::<f64>().sqrt();
    let factor = max_norm / scaled_norm;
    layers.iter().map(|x| mapped_copy(x, |v| v * f1 * f2 * factor)).collect()
}

/// Clipped copy of one update given as layers. Returns the clipped layers and
/// the pre-clip norms (one per layer when `per_layer`, else one in total).
pub fn clip_layers(layers: &[&[f64]], max_norm: f64, per_layer: bool) -> CoreResult<(Vec<Vec<f64>>, Vec<f64>)> {
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return invalid("max_norm", "must be a finite number > 0");
    }
    let norms: Vec<f64> = layers.iter().map(|x| l2_norm(x)).collect();
    if per_layer {
        let mut clipped = Vec::with_capacity(layers.len());
        for (x, &norm) in layers.iter().zip(&norms) {
            clipped.extend(clip_group(&[*x], norm, max_norm)?);
        }
        Ok((clipped, norms))
    } else {
        let total = total_norm(&norms);
        Ok((clip_group(layers, total, max_norm)?, vec![total]))
    }
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

    fn rel(a: f64, b: f64) -> f64 {
        ((a - b) / b).abs()
    }

    #[test]
    fn clipping_huge_values_keeps_their_direction() {
        let x = [1e200, 1e200];
        for per_layer in [false, true] {
            let (c, n) = clip_layers(&[&x], 1.0, per_layer).unwrap();
            assert!(rel(n[0], 2f64.sqrt() * 1e200) < 1e-15, "{}", n[0]);
            for v in &c[0] {
                assert!(rel(*v, std::f64::consts::FRAC_1_SQRT_2) < 1e-15, "{v}");
            }
        }
        // Two layers whose joint norm passes the largest double: still clipped right.
        let (a, b) = ([1.5e308, 0.0], [-1.5e308]);
        let (c, n) = clip_layers(&[&a, &b], 2.0, false).unwrap();
        assert_eq!(n, vec![f64::INFINITY]);
        assert!(rel(c[0][0], 2f64.sqrt()) < 1e-15 && c[0][1] == 0.0 && rel(c[1][0], -(2f64.sqrt())) < 1e-15);
        // A factor that would be subnormal.
        let (c, _) = clip_layers(&[&[3e300, 4e300]], 1e-20, false).unwrap();
        assert!(rel(c[0][0], 6e-21) < 1e-15 && rel(c[0][1], 8e-21) < 1e-15, "{:?}", c[0]);
    }

    #[test]
    fn tiny_norms_do_not_underflow() {
        let x = [1e-200, 1e-200];
        assert!(rel(l2_norm(&x), 2f64.sqrt() * 1e-200) < 1e-15);
        let (c, n) = clip_layers(&[&x], 1.0, false).unwrap();
        assert!(rel(n[0], 2f64.sqrt() * 1e-200) < 1e-15);
        assert_eq!(c[0], x.to_vec());
        assert!(rel(total_norm(&[3e-200, 4e-200]), 5e-200) < 1e-15);
        assert!(rel(total_norm(&[3e200, 4e200]), 5e200) < 1e-15);
        assert!(rel(sum_squares(&[3e-100, 4e-100]), 25e-200) < 1e-15);
        assert_eq!(sum_squares(&[1e200]), f64::INFINITY);
        assert_eq!(l2_norm(&[0.0, 0.0]), 0.0);
        assert!(l2_norm(&[1.0, f64::NAN]).is_nan());
        assert_eq!(l2_norm(&[1.0, f64::INFINITY]), f64::INFINITY);
        // Subnormal values, and a long vector of them (several blocks).
        assert!(rel(l2_norm(&[3e-320, 4e-320]), 5e-320) < 1e-3);
        let long = vec![1e-170; 200_000];
        assert!(rel(l2_norm(&long), 1e-170 * 200_000f64.sqrt()) < 1e-10, "{}", l2_norm(&long));
    }

    #[test]
    fn per_client_norms_of_huge_and_tiny_vectors_are_finite_and_right() {
        let a = [1e200, 1e200, 1e200];
        let b = [3e-200, 4e-200, 0.0];
        let c = [3.0, 4.0, 12.0];
        let set = UpdateSet::from_vectors(vec![&a, &b, &c]).unwrap();
        let n = layer_norms(&set);
        assert!(rel(n[0][0], 3f64.sqrt() * 1e200) < 1e-15, "{}", n[0][0]);
        assert!(rel(n[1][0], 5e-200) < 1e-15, "{}", n[1][0]);
        assert_eq!(n[2][0], 13.0);
        let sq = layer_sq_distances(set.layer(0), None);
        assert_eq!(sq[0], f64::INFINITY);
        assert_eq!(sq[2], 169.0);
        let small = [3e-100, 4e-100];
        let sq = layer_sq_distances(&[&small], None);
        assert!(rel(sq[0], 25e-200) < 1e-15, "{}", sq[0]);
    }

    #[test]
    fn ordinary_inputs_keep_the_plain_formula_bit_for_bit() {
        let mut rng = crate::rng::Rng::new(3, 0);
        let x: Vec<f64> = (0..150_001).map(|_| rng.normal()).collect();
        let plain = block_sums(x.len(), 65_536, 1, |r, acc| acc[0] = x[r].iter().map(|v| v * v).sum())[0];
        assert_eq!(l2_norm(&x), plain.sqrt());
        assert_eq!(sum_squares(&x), plain);
        let norms = [0.5, 3.0, 1e-3];
        assert_eq!(total_norm(&norms), norms.iter().map(|n| n * n).sum::<f64>().sqrt());
    }
}
