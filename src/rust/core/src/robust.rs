//! Byzantine-robust aggregation: coordinate-wise median and trimmed mean,
//! Krum / Multi-Krum, the geometric median (smoothed Weiszfeld, as in RFA)
//! and Bulyan.

use crate::aggregate::{normalize_weights, weighted_mean, weighted_sum_into};
use crate::alloc::{try_copy, try_zeroed};
use crate::error::{invalid, CoreError, CoreResult};
use crate::norms::layer_sq_distances;
use crate::parallel::{min_len, reduction_block, threads_here};
use crate::updates::UpdateSet;
use rayon::prelude::*;

/// Coordinates per parallel task of the coordinate-wise rules: one block of
/// every client stays in L2 while its coordinates are gathered.
const COORD_BLOCK: usize = 256;

/// Applies `stat` to the K values of every coordinate of every layer.
fn coordinate_wise<F>(set: &UpdateSet, stat: F) -> CoreResult<Vec<Vec<f64>>>
where
    F: Fn(&mut [f64]) -> f64 + Sync,
{
    let k = set.n_clients();
    let mut outputs = set.zeroed_like("the robust aggregate")?;
    for (l, out) in outputs.iter_mut().enumerate() {
        let layer = set.layer(l);
        out.par_chunks_mut(COORD_BLOCK).enumerate().with_min_len(min_len()).for_each(|(b, block)| {
            let start = b * COORD_BLOCK;
            let mut values = vec![0.0; k];
            for (j, o) in block.iter_mut().enumerate() {
                for (v, x) in values.iter_mut().zip(layer) {
                    *v = x[start + j];
                }
                *o = stat(&mut values);
            }
        });
    }
    Ok(outputs)
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
    coordinate_wise(set, median_of)
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
    coordinate_wise(set, |v| {
        sort_values(v);
        v[g..v.len() - g].iter().sum::<f64>() / kept
    })
}

/// Entries summed by one parallel task when filling the distance matrix:
/// its scratch of per-layer totals stays at 2 MiB, and a task reuses each
/// block of every client, read into cache once, for all its rows.
const TILE_ENTRIES: usize = 1 << 18;

/// The squared Euclidean distances between all pairs of K clients over all
/// layers: the strict upper triangle of the symmetric K x K matrix, row
/// after row, in K(K - 1)/2 values (the diagonal is zero).
#[derive(Debug, Clone)]
pub struct PackedDistances {
    k: usize,
    values: Vec<f64>,
}

impl PackedDistances {
    /// Where row `i` (entries `(i, i + 1)` to `(i, k - 1)`) starts.
    fn row_start(k: usize, i: usize) -> usize {
        i * (2 * k - i - 1) / 2
    }

    pub fn n_clients(&self) -> usize {
        self.k
    }

    pub fn get(&self, i: usize, j: usize) -> f64 {
        let (a, b) = if i < j { (i, j) } else { (j, i) };
        if a == b {
            0.0
        } else {
            self.values[Self::row_start(self.k, a) + (b - a - 1)]
        }
    }

    /// Distances from client `i` to every other client, in client order.
    fn row_into(&self, i: usize, out: &mut Vec<f64>) {
        out.clear();
        // Entries (j, i) for j < i sit in earlier rows, one per row.
        out.extend((0..i).map(|j| self.values[Self::row_start(self.k, j) + (i - j - 1)]));
        let start = Self::row_start(self.k, i);
        out.extend_from_slice(&self.values[start..start + (self.k - 1 - i)]);
    }
}

fn too_large_for_distances() -> CoreError {
    CoreError::InvalidArgument(
        "updates",
        "are too large for distance-based rules (Krum, Multi-Krum, geometric median): their squared \
         distances overflow double precision; rescale the updates (e.g. divide them by a constant) and retry"
            .into(),
    )
}

/// Adds to `totals[j]` the squared distance between `xi` and `others[j]` over
/// one block of coordinates, each summed on its own left to right. Four
/// clients go together so that four independent sums are in flight.
#[inline(always)]
fn add_block_distances(xi: &[f64], others: &[&[f64]], r: std::ops::Range<usize>, totals: &mut [f64]) {
    let mut quads = others.chunks_exact(4);
    let mut t = 0;
    for quad in &mut quads {
        let (a, b, c, d) = (&quad[0][r.clone()], &quad[1][r.clone()], &quad[2][r.clone()], &quad[3][r.clone()]);
        let (mut sa, mut sb, mut sc, mut sd) = (0.0, 0.0, 0.0, 0.0);
        for ((((x, a), b), c), d) in xi.iter().zip(a).zip(b).zip(c).zip(d) {
            sa += (x - a) * (x - a);
            sb += (x - b) * (x - b);
            sc += (x - c) * (x - c);
            sd += (x - d) * (x - d);
        }
        totals[t] += sa;
        totals[t + 1] += sb;
        totals[t + 2] += sc;
        totals[t + 3] += sd;
        t += 4;
    }
    for xj in quads.remainder() {
        totals[t] += xi.iter().zip(&xj[r.clone()]).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
        t += 1;
    }
}

/// Fills rows `rows` of the packed matrix (`out` holds exactly those rows).
/// Every entry is the sum over layers, in layer order, of that layer's
/// total, which is the sum over fixed blocks of coordinates, in block order,
/// of a left-to-right sum within the block: the order depends on the data
/// only, so the matrix is the same on any number of threads.
fn fill_rows(set: &UpdateSet, rows: std::ops::Range<usize>, out: &mut [f64], block: usize) -> bool {
    let k = set.n_clients();
    let mut layer_totals = vec![0.0; out.len()];
    for l in 0..set.n_layers() {
        let layer = set.layer(l);
        let len = set.layer_len(l);
        layer_totals.fill(0.0);
        for start in (0..len).step_by(block) {
            let r = start..(start + block).min(len);
            let mut offset = 0;
            for i in rows.clone() {
                let n = k - 1 - i;
                add_block_distances(&layer[i][r.clone()], &layer[i + 1..], r.clone(), &mut layer_totals[offset..offset + n]);
                offset += n;
            }
        }
        for (d, t) in out.iter_mut().zip(&layer_totals) {
            *d += t;
        }
    }
    out.iter().all(|d| d.is_finite())
}

/// Squared Euclidean distances between all clients over all layers. The
/// packed matrix is the only buffer whose size grows as K^2; it is allocated
/// with a check, so that too many clients give a `Memory` error. Updates so
/// large that a squared distance overflows are an `InvalidArgument` error.
pub fn pairwise_sq_distances(set: &UpdateSet) -> CoreResult<PackedDistances> {
    let k = set.n_clients();
    let n_pairs = k.checked_mul(k - 1).map(|n| n / 2).ok_or_else(|| {
        CoreError::Memory(format!("the distance matrix of {k} clients has more entries than can be addressed"))
    })?;
    let what = format!("the distance matrix of Krum ({k} clients, {n_pairs} pairs)");
    let mut values = try_zeroed(n_pairs, &what)?;
    // Tiles of consecutive rows with about the same number of entries. Only
    // speed depends on the tiling: each entry is summed in the same order.
    let target = n_pairs.div_ceil(4 * threads_here()).clamp(1, TILE_ENTRIES);
    let mut tiles = Vec::new();
    let mut rest = values.as_mut_slice();
    let mut first = 0;
    while first + 1 < k {
        let mut last = first;
        let mut entries = 0;
        while last + 1 < k && (entries == 0 || entries + (k - 1 - last) <= target) {
            entries += k - 1 - last;
            last += 1;
        }
        let (tile, tail) = rest.split_at_mut(entries);
        tiles.push((first..last, tile));
        rest = tail;
        first = last;
    }
    let block = reduction_block(k);
    let finite = tiles.into_par_iter().with_min_len(min_len()).map(|(rows, tile)| fill_rows(set, rows, tile, block)).reduce(|| true, |a, b| a && b);
    if !finite {
        return Err(too_large_for_distances());
    }
    Ok(PackedDistances { k, values })
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
    let too_many_tolerated = match f.checked_mul(2).and_then(|n| n.checked_add(2)) {
        Some(n) => n >= k,
        None => true,
    };
    if too_many_tolerated {
        return invalid("f", format!("must satisfy 2f + 2 < K (K = {k} clients, f = {f})"));
    }
    set.require_finite()?;
    let dist = pairwise_sq_distances(set)?;
    let neighbours = k - f - 2;
    let scores: Vec<f64> = (0..k)
        .into_par_iter()
        .with_min_len(min_len())
        .map_init(
            || Vec::with_capacity(k - 1),
            |row, i| {
                dist.row_into(i, row);
                // The nearest neighbours, summed from the nearest out.
                let cmp = |a: &f64, b: &f64| a.partial_cmp(b).expect("distances are finite");
                row.select_nth_unstable_by(neighbours - 1, cmp);
                let nearest = &mut row[..neighbours];
                sort_values(nearest);
                nearest.iter().sum()
            },
        )
        .collect();
    if scores.iter().any(|s: &f64| !s.is_finite()) {
        return Err(too_large_for_distances());
    }
    Ok(scores)
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
        (0..set.n_layers()).map(|l| try_copy(set.layer(l)[selected[0]], "the Krum aggregate")).collect::<CoreResult<_>>()?
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
fn distances_to(set: &UpdateSet, z: &[Vec<f64>]) -> CoreResult<Vec<f64>> {
    let mut sq = vec![0.0; set.n_clients()];
    for (l, zl) in z.iter().enumerate() {
        for (s, v) in sq.iter_mut().zip(layer_sq_distances(set.layer(l), Some(zl))) {
            *s += v;
        }
    }
    // An overflowing distance would turn the Weiszfeld weights into zeros
    // and NaN, and the "median" into garbage.
    if sq.iter().any(|s| !s.is_finite()) {
        return Err(too_large_for_distances());
    }
    Ok(sq.into_iter().map(f64::sqrt).collect())
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
    let mut dist = distances_to(set, &z)?;
    let mut objective = objective_at(&dist);
    if !objective.is_finite() {
        return Err(too_large_for_distances());
    }
    let mut converged = false;
    let mut iterations = 0;
    while iterations < max_iter {
        iterations += 1;
        let beta: Vec<f64> = w.iter().zip(&dist).map(|(w, d)| w / d.max(WEISZFELD_NU)).collect();
        let beta = normalize_weights(Some(&beta), beta.len())?;
        for (l, zl) in z.iter_mut().enumerate() {
            weighted_sum_into(set.layer(l), &beta, zl);
        }
        dist = distances_to(set, &z)?;
        let next = objective_at(&dist);
        if !next.is_finite() {
            return Err(too_large_for_distances());
        }
        let change = (objective - next).abs();
        objective = next;
        if change <= tol * objective.max(f64::MIN_POSITIVE) {
            converged = true;
            break;
        }
    }
    Ok(GeoMedianResult { aggregate: z, iterations, converged, objective })
}

/// Result of Bulyan.
#[derive(Debug, Clone)]
pub struct BulyanResult {
    pub aggregate: Vec<Vec<f64>>,
    /// The theta = K - 2f clients picked by repeated Krum, 0-based, in the
    /// order they were picked.
    pub selected: Vec<usize>,
}

/// Whether Bulyan can run on `k` clients with `f` Byzantine: `K >= 4f + 3`.
pub fn bulyan_fits(k: usize, f: usize) -> bool {
    f.checked_mul(4).and_then(|n| n.checked_add(3)).is_some_and(|n| n <= k)
}

/// The largest `f` Bulyan tolerates among `k` clients, `(K - 3) / 4`
/// rounded down (`None` below 3 clients).
pub fn bulyan_max_f(k: usize) -> Option<usize> {
    k.checked_sub(3).map(|n| n / 4)
}

/// Bulyan's selection: theta = K - 2f clients, picked one at a time by Krum
/// on the clients not picked yet. With r clients left, Krum runs with the
/// largest tolerance it allows up to f, `f_r = min(f, (r - 3) / 2)` (its
/// condition 2 f_r + 2 < r fails for f itself in the last picks, where only
/// 2f + 1 clients may be left): a client's score is the sum of its squared
/// distances to its r - f_r - 2 nearest remaining clients (all others when
/// r < 3), summed from the nearest out; the lowest score is picked, ties
/// going to the lower client index. The first pick is Krum's
/// (`multi_krum(set, f, 1)`). The squared distances are computed once, as
/// Krum computes them.
pub fn bulyan_selection(set: &UpdateSet, f: usize) -> CoreResult<Vec<usize>> {
    let k = set.n_clients();
    if !bulyan_fits(k, f) {
        return invalid("f", format!("Bulyan needs K >= 4f + 3 clients (K = {k}, f = {f})"));
    }
    set.require_finite()?;
    let dist = pairwise_sq_distances(set)?;
    let theta = k - 2 * f;
    let mut remaining: Vec<usize> = (0..k).collect();
    let mut selected = Vec::with_capacity(theta);
    for _ in 0..theta {
        let r = remaining.len();
        let pick = if r == 1 {
            0
        } else {
            let neighbours = if r >= 3 { r - f.min((r - 3) / 2) - 2 } else { r - 1 };
            let scores: Vec<f64> = remaining
                .par_iter()
                .with_min_len(min_len())
                .map_init(
                    || Vec::with_capacity(r - 1),
                    |row: &mut Vec<f64>, &i| {
                        row.clear();
                        row.extend(remaining.iter().filter(|&&j| j != i).map(|&j| dist.get(i, j)));
                        sort_values(row);
                        row[..neighbours].iter().sum::<f64>()
                    },
                )
                .collect();
            if scores.iter().any(|s| !s.is_finite()) {
                return Err(too_large_for_distances());
            }
            // The first lowest score: the lowest client index among ties.
            let mut best = 0;
            for (p, s) in scores.iter().enumerate() {
                if *s < scores[best] {
                    best = p;
                }
            }
            best
        };
        selected.push(remaining.remove(pick));
    }
    Ok(selected)
}

/// The mean of the `beta` values of `v` closest to their median (the mean of
/// the two middle values when their number is even). Of two values equally
/// far from the median the smaller is taken first. `v` is sorted in place;
/// the chosen values are contiguous in sorted order and summed in it.
pub fn mean_around_median(v: &mut [f64], beta: usize) -> f64 {
    let n = v.len();
    debug_assert!(beta >= 1 && beta <= n);
    sort_values(v);
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    // Values below the median on the left of `split`, the others from it on.
    let split = v.partition_point(|x| *x < median);
    let (mut lo, mut hi) = (split, split);
    while hi - lo < beta {
        let take_left = lo > 0 && (hi == n || median - v[lo - 1] <= v[hi] - median);
        if take_left {
            lo -= 1;
        } else {
            hi += 1;
        }
    }
    v[lo..hi].iter().sum::<f64>() / beta as f64
}

/// Bulyan (El Mhamdi, Guerraoui and Rouault 2018, "The hidden vulnerability
/// of distributed learning in Byzantium"): `bulyan_selection` picks theta =
/// K - 2f updates, then every coordinate is the mean of the beta = theta - 2f
/// of their theta values closest to the median (`mean_around_median`).
/// Needs K >= 4f + 3. Weights play no part.
pub fn bulyan(set: &UpdateSet, f: usize) -> CoreResult<BulyanResult> {
    let selected = bulyan_selection(set, f)?;
    let beta = selected.len() - 2 * f;
    let layers = (0..set.n_layers()).map(|l| selected.iter().map(|&i| set.layer(l)[i]).collect()).collect();
    let chosen = UpdateSet::new(layers)?;
    let aggregate = coordinate_wise(&chosen, |v| mean_around_median(v, beta))?;
    Ok(BulyanResult { aggregate, selected })
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

    use crate::parallel::{block_sums, with_threads};
    use crate::rng::Rng;

    /// The K x K matrix as the previous implementation built it (one K x K
    /// partial per block): the reference for bit-for-bit equality.
    fn previous_full_matrix(set: &UpdateSet) -> Vec<f64> {
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

    /// K clients with layers of the given lengths, as owned buffers.
    fn random_layers(k: usize, lens: &[usize], seed: u64) -> Vec<Vec<Vec<f64>>> {
        let mut rng = Rng::new(seed, 0);
        lens.iter().map(|&n| (0..k).map(|c| (0..n).map(|_| rng.normal() + c as f64 * 0.01).collect()).collect()).collect()
    }

    fn set_of_layers(layers: &[Vec<Vec<f64>>]) -> UpdateSet<'_> {
        UpdateSet::new(layers.iter().map(|l| l.iter().map(|v| v.as_slice()).collect()).collect()).unwrap()
    }

    #[test]
    fn krum_matches_brute_force_and_the_previous_matrix_bit_for_bit() {
        // 23 clients: reduction_block(23) = 5698, so the 12,000-long layer has
        // three blocks; the empty layer adds nothing.
        let k = 23;
        let layers = random_layers(k, &[7, 12_000, 0, 3], 11);
        let set = set_of_layers(&layers);
        let packed = pairwise_sq_distances(&set).unwrap();
        let previous = previous_full_matrix(&set);
        for i in 0..k {
            for j in 0..k {
                let brute: f64 = layers.iter().map(|l| l[i].iter().zip(&l[j]).map(|(a, b)| (a - b) * (a - b)).sum::<f64>()).sum();
                let got = packed.get(i, j);
                assert_eq!(got.to_bits(), previous[i * k + j].to_bits(), "({i}, {j})");
                assert!((got - brute).abs() <= 1e-12 * brute, "({i}, {j}): {got} vs {brute}");
            }
        }
        for f in [0, 3, 10] {
            let scores = krum_scores(&set, f).unwrap();
            for (i, &score) in scores.iter().enumerate() {
                let mut row: Vec<f64> = (0..k).filter(|&j| j != i).map(|j| previous[i * k + j]).collect();
                sort_values(&mut row);
                let expected: f64 = row[..k - f - 2].iter().sum();
                assert_eq!(score.to_bits(), expected.to_bits(), "f {f}, client {i}");
            }
        }
    }

    #[test]
    fn krum_is_the_same_on_one_and_two_threads() {
        let layers = random_layers(67, &[300, 1, 9000], 5);
        let set = set_of_layers(&layers);
        let run = |threads| with_threads(threads, || multi_krum(&set, 5, 10, None).unwrap());
        let (one, two) = (run(1), run(2));
        assert_eq!(one.scores, two.scores);
        assert_eq!(one.selected, two.selected);
        assert_eq!(one.aggregate, two.aggregate);
        let d1 = with_threads(1, || pairwise_sq_distances(&set).unwrap());
        let d2 = with_threads(2, || pairwise_sq_distances(&set).unwrap());
        assert_eq!(d1.values, d2.values);
    }

    #[test]
    fn many_scalar_updates_need_only_the_packed_matrix() {
        // 3000 updates of length 1: 4.5 million pairs, 36 MB packed, where
        // the previous code needed three 72 MB matrices.
        let k = 3000;
        let x: Vec<f64> = (0..k).map(|i| ((i * 7919) % k) as f64).collect();
        let set = UpdateSet::from_vectors(x.chunks(1).collect()).unwrap();
        let d = pairwise_sq_distances(&set).unwrap();
        assert_eq!(d.values.len(), k * (k - 1) / 2);
        assert_eq!(d.get(5, 17), (x[5] - x[17]).powi(2));
        assert_eq!(d.get(2999, 0), (x[2999] - x[0]).powi(2));
        let f = 10;
        let scores = krum_scores(&set, f).unwrap();
        // The values are a permutation of 0..k: the nearest k - f - 2 to v
        // are a window of consecutive integers around it.
        let brute = |i: usize| {
            let mut row: Vec<f64> = (0..k).filter(|&j| j != i).map(|j| (x[i] - x[j]).powi(2)).collect();
            sort_values(&mut row);
            row[..k - f - 2].iter().sum::<f64>()
        };
        for i in [0, 1, 1234, 2999] {
            assert_eq!(scores[i], brute(i));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn too_many_clients_for_memory_is_a_memory_error() {
        // 300,000 clients: 45 billion pairs, 360 GB.
        let x = vec![0.0; 300_000];
        let set = UpdateSet::from_vectors(x.chunks(1).collect()).unwrap();
        let err = krum_scores(&set, 1).unwrap_err();
        let CoreError::Memory(msg) = &err else { panic!("{err:?}") };
        assert!(msg.contains("distance matrix") && msg.contains("359998800000 bytes"), "{msg}");
    }

    #[test]
    fn overflowing_distances_are_an_error_not_garbage() {
        let data: Vec<Vec<f64>> = [1e200, -1e200, 0.0, 1.0, 2.0].iter().map(|&v| vec![v]).collect();
        let set = set_of(&data);
        assert!(matches!(krum_scores(&set, 1), Err(CoreError::InvalidArgument("updates", m)) if m.contains("rescale")));
        assert!(matches!(multi_krum(&set, 1, 2, None), Err(CoreError::InvalidArgument("updates", _))));
        assert!(matches!(geometric_median(&set, None, 1e-8, 100), Err(CoreError::InvalidArgument("updates", _))));
        // Rescaled, the same updates work.
        let scaled: Vec<Vec<f64>> = data.iter().map(|v| vec![v[0] * 1e-190]).collect();
        assert!(krum_scores(&set_of(&scaled), 1).is_ok());
        assert!(geometric_median(&set_of(&scaled), None, 1e-8, 100).is_ok());
    }

    /// K = 15,000 updates of length 1 (the case that needed > 5 GB before).
    /// Run alone, in release: `cargo test --release -p fedagg-core -- --ignored krum_15000`.
    #[test]
    #[ignore]
    fn krum_15000_scalar_updates_in_under_a_gigabyte() {
        let k = 15_000;
        let x: Vec<f64> = (0..k).map(|i| (i as f64 * 0.618).fract()).collect();
        let set = UpdateSet::from_vectors(x.chunks(1).collect()).unwrap();
        let start = std::time::Instant::now();
        let r = multi_krum(&set, 100, 1, None).unwrap();
        let elapsed = start.elapsed();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let peak_kib: usize = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        eprintln!("K = {k}: {elapsed:?}, peak RSS {:.2} GB, selected {:?}", peak_kib as f64 * 1024.0 / 1e9, r.selected);
        assert!(peak_kib as f64 * 1024.0 < 0.95e9, "peak RSS {peak_kib} KiB");
    }

    #[test]
    fn mean_around_median_by_hand() {
        // Median 3; distances 2, 1, 0, 7, 8: the three closest are 3, 2, 1.
        assert_eq!(mean_around_median(&mut [10.0, 3.0, 1.0, 11.0, 2.0], 3), 2.0);
        // 0 and 4 are equally far from the median 2: the smaller goes first.
        assert_eq!(mean_around_median(&mut [4.0, 0.0, 2.0], 2), 1.0);
        // Even: median 3; 2 and 4 at distance 1, then 1 (2) before 8 (5).
        assert_eq!(mean_around_median(&mut [8.0, 1.0, 4.0, 2.0], 2), 3.0);
        assert_eq!(mean_around_median(&mut [8.0, 1.0, 4.0, 2.0], 3), 7.0 / 3.0);
        assert_eq!(mean_around_median(&mut [8.0, 1.0, 4.0, 2.0], 4), 15.0 / 4.0);
    }

    /// Bulyan written out from its definition: distances summed coordinate
    /// by coordinate, Krum scores recomputed on the remaining clients at
    /// every pick, and per coordinate the beta values closest to the median.
    fn brute_force_bulyan(clients: &[Vec<f64>], f: usize) -> (Vec<f64>, Vec<usize>) {
        let k = clients.len();
        let d = clients[0].len();
        let dist = |i: usize, j: usize| clients[i].iter().zip(&clients[j]).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
        let theta = k - 2 * f;
        let beta = theta - 2 * f;
        let mut remaining: Vec<usize> = (0..k).collect();
        let mut selected = Vec::new();
        while selected.len() < theta {
            let r = remaining.len();
            // Krum on the r remaining clients with the largest f' <= f it
            // allows (2f' + 2 < r); all other clients below 3.
            let mut f_r = f;
            while f_r > 0 && 2 * f_r + 2 >= r {
                f_r -= 1;
            }
            let nb = if 2 * f_r + 2 < r { r - f_r - 2 } else { r - 1 };
            let mut best: Option<(f64, usize)> = None;
            for &i in &remaining {
                let mut row: Vec<f64> = remaining.iter().filter(|&&j| j != i).map(|&j| dist(i, j)).collect();
                row.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let score: f64 = row[..nb.min(row.len())].iter().sum();
                if !matches!(best, Some((s, _)) if score >= s) {
                    best = Some((score, i));
                }
            }
            let pick = best.unwrap().1;
            remaining.retain(|&j| j != pick);
            selected.push(pick);
        }
        let aggregate = (0..d)
            .map(|c| {
                let mut values: Vec<f64> = selected.iter().map(|&i| clients[i][c]).collect();
                values.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let n = values.len();
                let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
                let mut by_distance = values.clone();
                by_distance.sort_by(|a, b| (a - median).abs().partial_cmp(&(b - median).abs()).unwrap().then(a.partial_cmp(b).unwrap()));
                by_distance[..beta].iter().sum::<f64>() / beta as f64
            })
            .collect();
        (aggregate, selected)
    }

    #[test]
    fn bulyan_matches_its_definition_by_brute_force() {
        for (k, f) in [(11, 2), (7, 1), (8, 1), (15, 3), (4, 0)] {
            let mut rng = Rng::new(k as u64, 3);
            let mut clients: Vec<Vec<f64>> = (0..k).map(|c| (0..25).map(|_| rng.normal() + 0.1 * c as f64).collect()).collect();
            // f Byzantine clients far away, and far from each other.
            for c in clients.iter_mut().take(f) {
                c.iter_mut().for_each(|v| *v = 40.0 * rng.normal());
            }
            // Two layers of 20 and 5 values.
            let (a, b): (Vec<&[f64]>, Vec<&[f64]>) = clients.iter().map(|c| (&c[..20], &c[20..])).unzip();
            let set = UpdateSet::new(vec![a, b]).unwrap();
            let got = bulyan(&set, f).unwrap();
            let (expected, selected) = brute_force_bulyan(&clients, f);
            assert_eq!(got.selected, selected, "K = {k}, f = {f}");
            assert!(selected.iter().all(|&i| i >= f), "an outlier was selected");
            let flat: Vec<f64> = got.aggregate.concat();
            for (g, e) in flat.iter().zip(&expected) {
                assert!((g - e).abs() <= 1e-13 * (1.0 + e.abs()), "K = {k}, f = {f}: {g} vs {e}");
            }
            // The first pick is Krum's.
            assert_eq!(got.selected[0], multi_krum(&set, f, 1, None).unwrap().selected[0]);
            let two = with_threads(2, || bulyan(&set, f).unwrap());
            assert_eq!(two.aggregate, got.aggregate);
            assert_eq!(two.selected, got.selected);
        }
    }

    #[test]
    fn bulyan_needs_four_f_plus_three_clients() {
        let data: Vec<Vec<f64>> = (0..10).map(|i| vec![i as f64, 1.0]).collect();
        let set = set_of(&data);
        let err = bulyan(&set, 2).unwrap_err();
        assert!(matches!(&err, CoreError::InvalidArgument("f", m) if m.contains("4f + 3") && m.contains("K = 10")), "{err:?}");
        assert!(bulyan(&set, 1).is_ok());
        let eleven: Vec<Vec<f64>> = (0..11).map(|i| vec![i as f64, 1.0]).collect();
        assert!(bulyan(&set_of(&eleven), 2).is_ok());
        assert_eq!((bulyan_max_f(11), bulyan_max_f(10), bulyan_max_f(2)), (Some(2), Some(1), None));
        assert!(bulyan_fits(3, 0) && !bulyan_fits(2, 0) && !bulyan_fits(usize::MAX, usize::MAX / 2));
        // f = 0: every client selected, and the mean of all of them.
        let r = bulyan(&set_of(&data[..3]), 0).unwrap();
        assert_eq!(r.aggregate[0], vec![1.0, 1.0]);
    }
}
