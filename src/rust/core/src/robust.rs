//! Byzantine-robust aggregation: coordinate-wise median and trimmed mean,
//! Krum / Multi-Krum, and the geometric median (smoothed Weiszfeld, as in RFA).

use crate::aggregate::{normalize_weights, weighted_mean, weighted_sum_into};
use crate::error::{invalid, CoreResult};
use crate::norms::layer_sq_distances;
use crate::parallel::{block_sums, reduction_block};
use crate::updates::UpdateSet;
use rayon::prelude::*;

/// Coordinates per parallel task of the coordinate-wise rules: one block of
/// every client stays in L2 while its coordinates are gathered.
const COORD_BLOCK: usize = 256;

/// Applies `stat` to the K values of every coordinate of every layer.
fn coordinate_wise<F>(set: &UpdateSet, stat: F) -> Vec<Vec<f64>>
where
    F: Fn(&mut [f64]) -> f64 + Sync,
{
    let k = set.n_clients();
    (0..set.n_layers())
        .map(|l| {
            let layer = set.layer(l);
            let mut out = vec![0.0; set.layer_len(l)];
            out.par_chunks_mut(COORD_BLOCK).enumerate().for_each(|(b, block)| {
                let start = b * COORD_BLOCK;
                let mut values = vec![0.0; k];
                for (j, o) in block.iter_mut().enumerate() {
                    for (v, x) in values.iter_mut().zip(layer) {
                        *v = x[start + j];
                    }
                    *o = stat(&mut values);
                }
            });
            out
        })
        .collect()
}

fn sort_values(v: &mut [f64]) {
    v.sort_unstable_by(|a, b| a.partial_cmp(b).expect("non-finite values are rejected before sorting"));
}

/// Median of a small buffer (mean of the two middle values when even).
fn median_of(v: &mut [f64]) -> f64 {
    let n = v.len();
    let cmp = |a: &f64, b: &f64| a.partial_cmp(b).expect("finite values");
    let (_, hi, _) = v.select_nth_unstable_by(n / 2, cmp);
    let hi = *hi;
    if n % 2 == 1 {
        hi
    } else {
        let lo = v[..n / 2].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo + hi) / 2.0
    }
}

/// Coordinate-wise median.
pub fn coordinate_median(set: &UpdateSet) -> CoreResult<Vec<Vec<f64>>> {
    set.require_finite()?;
    Ok(coordinate_wise(set, median_of))
}

/// Number of values cut from each end by a trim fraction, as `mean(x, trim)` in R.
pub fn trim_count(n_clients: usize, trim: f64) -> CoreResult<usize> {
    if !(0.0..0.5).contains(&trim) {
        return invalid("trim", "must be in [0, 0.5)");
    }
    Ok((n_clients as f64 * trim).floor() as usize)
}

/// Coordinate-wise trimmed mean: drops the `floor(K * trim)` smallest and
/// largest values of each coordinate and averages the rest.
pub fn trimmed_mean(set: &UpdateSet, trim: f64) -> CoreResult<Vec<Vec<f64>>> {
    set.require_finite()?;
    let g = trim_count(set.n_clients(), trim)?;
    let kept = (set.n_clients() - 2 * g) as f64;
    Ok(coordinate_wise(set, |v| {
        sort_values(v);
        v[g..v.len() - g].iter().sum::<f64>() / kept
    }))
}

/// Squared Euclidean distances between all clients over all layers, as a
/// K x K row-major matrix.
pub fn pairwise_sq_distances(set: &UpdateSet) -> Vec<f64> {
    let k = set.n_clients();
    let mut dist = vec![0.0; k * k];
    for l in 0..set.n_layers() {
        let layer = set.layer(l);
        let sums = block_sums(set.layer_len(l), reduction_block(k), k * k, |r, acc| {
            for i in 0..k {
                let xi = &layer[i][r.clone()];
                for j in (i + 1)..k {
                    let xj = &layer[j][r.clone()];
                    acc[i * k + j] = xi.iter().zip(xj).map(|(a, b)| (a - b) * (a - b)).sum();
                }
            }
        });
        for i in 0..k {
            for j in (i + 1)..k {
                dist[i * k + j] += sums[i * k + j];
                dist[j * k + i] = dist[i * k + j];
            }
        }
    }
    dist
}

/// Result of Krum / Multi-Krum.
#[derive(Debug, Clone)]
pub struct KrumResult {
    pub aggregate: Vec<Vec<f64>>,
    /// 0-based clients kept, best score first.
    pub selected: Vec<usize>,
    /// Krum score of every client (sum of squared distances to its nearest
    /// K - f - 2 neighbours).
    pub scores: Vec<f64>,
}

/// Krum scores (Blanchard et al. 2017) with `f` Byzantine clients tolerated.
pub fn krum_scores(set: &UpdateSet, f: usize) -> CoreResult<Vec<f64>> {
    let k = set.n_clients();
    if 2 * f + 2 >= k {
        return invalid("f", format!("must satisfy 2f + 2 < K (K = {k} clients, f = {f})"));
    }
    set.require_finite()?;
    let dist = pairwise_sq_distances(set);
    let neighbours = k - f - 2;
    Ok((0..k)
        .map(|i| {
            let mut d: Vec<f64> = (0..k).filter(|&j| j != i).map(|j| dist[i * k + j]).collect();
            sort_values(&mut d);
            d[..neighbours].iter().sum()
        })
        .collect())
}

/// Multi-Krum: the weighted mean of the `m` clients with the lowest Krum
/// scores (`m = 1` is Krum and returns that client's update unchanged).
pub fn multi_krum(set: &UpdateSet, f: usize, m: usize, weights: Option<&[f64]>) -> CoreResult<KrumResult> {
    let k = set.n_clients();
    if m == 0 || m > k - f.min(k) {
        return invalid("m", format!("must be between 1 and K - f = {}", k.saturating_sub(f)));
    }
    let raw = normalize_weights(weights, k)?;
    let scores = krum_scores(set, f)?;
    let mut order: Vec<usize> = (0..k).collect();
    // Ties go to the lower client index, so the choice is reproducible.
    order.sort_by(|&a, &b| scores[a].partial_cmp(&scores[b]).unwrap().then(a.cmp(&b)));
    let selected: Vec<usize> = order[..m].to_vec();
    let aggregate = if m == 1 {
        (0..set.n_layers()).map(|l| set.layer(l)[selected[0]].to_vec()).collect()
    } else {
        let sub: Vec<f64> = selected.iter().map(|&i| raw[i]).collect();
        let w = normalize_weights(Some(&sub), m)?;
        let layers = (0..set.n_layers())
            .map(|l| selected.iter().map(|&i| set.layer(l)[i]).collect())
            .collect();
        weighted_mean(&UpdateSet::new(layers)?, &w)?
    };
    Ok(KrumResult { aggregate, selected, scores })
}

/// Result of the geometric median.
#[derive(Debug, Clone)]
pub struct GeoMedianResult {
    pub aggregate: Vec<Vec<f64>>,
    pub iterations: usize,
    pub converged: bool,
    /// Weighted sum of distances to the clients at the result.
    pub objective: f64,
}

/// Euclidean distance of every client to `z` (given per layer).
fn distances_to(set: &UpdateSet, z: &[Vec<f64>]) -> Vec<f64> {
    let mut sq = vec![0.0; set.n_clients()];
    for (l, zl) in z.iter().enumerate() {
        for (s, v) in sq.iter_mut().zip(layer_sq_distances(set.layer(l), Some(zl))) {
            *s += v;
        }
    }
    sq.into_iter().map(f64::sqrt).collect()
}

/// Smoothing of the Weiszfeld weights: a client closer than this to the
/// current estimate is treated as at this distance, avoiding division by zero.
pub const WEISZFELD_NU: f64 = 1e-10;

/// Weighted geometric median by the smoothed Weiszfeld algorithm, started at
/// the weighted mean; stops when the objective changes by less than
/// `tol` (relative) or after `max_iter` iterations.
pub fn geometric_median(
    set: &UpdateSet,
    weights: Option<&[f64]>,
    tol: f64,
    max_iter: usize,
) -> CoreResult<GeoMedianResult> {
    if !(tol > 0.0 && tol.is_finite()) {
        return invalid("tol", "must be a finite number > 0");
    }
    if max_iter == 0 {
        return invalid("max_iter", "must be at least 1");
    }
    set.require_finite()?;
    let w = normalize_weights(weights, set.n_clients())?;
    let mut z = weighted_mean(set, &w)?;
    let objective_at = |d: &[f64]| d.iter().zip(&w).map(|(d, w)| d * w).sum::<f64>();
    let mut dist = distances_to(set, &z);
    let mut objective = objective_at(&dist);
    let mut converged = false;
    let mut iterations = 0;
    while iterations < max_iter {
        iterations += 1;
        let beta: Vec<f64> = w.iter().zip(&dist).map(|(w, d)| w / d.max(WEISZFELD_NU)).collect();
        let beta = normalize_weights(Some(&beta), beta.len())?;
        for (l, zl) in z.iter_mut().enumerate() {
            weighted_sum_into(set.layer(l), &beta, zl);
        }
        dist = distances_to(set, &z);
        let next = objective_at(&dist);
        let change = (objective - next).abs();
        objective = next;
        if change <= tol * objective.max(f64::MIN_POSITIVE) {
            converged = true;
            break;
        }
    }
    Ok(GeoMedianResult { aggregate: z, iterations, converged, objective })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(data: &[Vec<f64>]) -> UpdateSet<'_> {
        UpdateSet::from_vectors(data.iter().map(|v| v.as_slice()).collect()).unwrap()
    }

    #[test]
    fn median_and_trimmed_mean_by_hand() {
        let data = vec![vec![1.0, 10.0], vec![2.0, -5.0], vec![100.0, 0.0], vec![3.0, 1.0]];
        let set = set_of(&data);
        assert_eq!(coordinate_median(&set).unwrap()[0], vec![2.5, 0.5]);
        // trim 0.25 of 4 drops one value at each end.
        assert_eq!(trimmed_mean(&set, 0.25).unwrap()[0], vec![2.5, 0.5]);
        assert_eq!(trimmed_mean(&set, 0.0).unwrap()[0], vec![26.5, 1.5]);
        assert!(trimmed_mean(&set, 0.5).is_err());
    }

    #[test]
    fn krum_rejects_the_outlier() {
        let data = vec![
            vec![0.0, 0.0],
            vec![0.1, 0.0],
            vec![0.0, 0.1],
            vec![0.1, 0.1],
            vec![50.0, 50.0],
        ];
        let set = set_of(&data);
        let r = multi_krum(&set, 1, 1, None).unwrap();
        assert_ne!(r.selected[0], 4);
        assert!(r.scores[4] > r.scores[0]);
        let r = multi_krum(&set, 1, 4, None).unwrap();
        assert!(!r.selected.contains(&4));
        assert!((r.aggregate[0][0] - 0.05).abs() < 1e-12);
        assert!(krum_scores(&set, 2).is_err());
    }

    #[test]
    fn geometric_median_in_one_dimension_is_the_median() {
        let data: Vec<Vec<f64>> = [1.0, 2.0, 7.0, 100.0, 3.0].iter().map(|&v| vec![v]).collect();
        let r = geometric_median(&set_of(&data), None, 1e-12, 1000).unwrap();
        assert!(r.converged);
        assert!((r.aggregate[0][0] - 3.0).abs() < 1e-6, "{}", r.aggregate[0][0]);
    }
}
