//! Weighted averaging of client updates (FedAvg's aggregation).

use crate::error::{invalid, CoreError, CoreResult};
use crate::updates::UpdateSet;
use crate::parallel::min_len;
use rayon::prelude::*;

/// Output block of the streaming mean: 256 KiB of output stays in L2 while
/// every client's matching block streams past it once (long sequential runs
/// for the prefetcher), so no K x d temporary is ever built.
const MEAN_BLOCK: usize = 32768;

/// Normalises non-negative weights to sum to one (`None`: equal weights).
pub fn normalize_weights(weights: Option<&[f64]>, n_clients: usize) -> CoreResult<Vec<f64>> {
    let Some(w) = weights else {
        return Ok(vec![1.0 / n_clients as f64; n_clients]);
    };
    if w.len() != n_clients {
        return invalid("weights", format!("has length {}, not {n_clients} (one per client)", w.len()));
    }
    if let Some(k) = w.iter().position(|v| !v.is_finite() || *v < 0.0) {
        return Err(CoreError::Client(k, format!("weight {} is not a finite number >= 0", w[k])));
    }
    let total: f64 = w.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return invalid("weights", "must not all be zero");
    }
    Ok(w.iter().map(|v| v / total).collect())
}

/// One output block: `block = sum_k weights[k] * clients[k][start..]`.
#[inline(always)]
fn weighted_block(clients: &[&[f64]], weights: &[f64], start: usize, block: &mut [f64]) {
    let end = start + block.len();
    block.fill(0.0);
    // Four clients per pass over the block: fewer loads and stores of the
    // accumulator, same left-to-right order of additions as one at a time.
    let mut k = 0;
    while k + 4 <= clients.len() {
        let (w0, w1, w2, w3) = (weights[k], weights[k + 1], weights[k + 2], weights[k + 3]);
        let x0 = &clients[k][start..end];
        let x1 = &clients[k + 1][start..end];
        let x2 = &clients[k + 2][start..end];
        let x3 = &clients[k + 3][start..end];
        // Zipped iterators carry no bounds checks, so this loop vectorises.
        for ((((o, a), b), c), d) in block.iter_mut().zip(x0).zip(x1).zip(x2).zip(x3) {
            let mut acc = *o;
            acc += w0 * a;
            acc += w1 * b;
            acc += w2 * c;
            acc += w3 * d;
            *o = acc;
        }
        k += 4;
    }
    for (x, &w) in clients[k..].iter().zip(&weights[k..]) {
        for (o, v) in block.iter_mut().zip(&x[start..end]) {
            *o += w * v;
        }
    }
}

/// The same block compiled for AVX2: twice the vector width. Without FMA the
/// operations and their order are unchanged, so results are bit-identical to
/// the baseline build.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn weighted_block_avx2(clients: &[&[f64]], weights: &[f64], start: usize, block: &mut [f64]) {
    weighted_block(clients, weights, start, block)
}

fn block_kernel() -> fn(&[&[f64]], &[f64], usize, &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return |c, w, s, b| unsafe { weighted_block_avx2(c, w, s, b) };
    }
    weighted_block
}

/// Below this many multiply-adds, thread dispatch costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// `out = sum_k weights[k] * clients[k]`, summed in client order for every
/// coordinate, whatever the thread count or instruction set.
pub fn weighted_sum_into(clients: &[&[f64]], weights: &[f64], out: &mut [f64]) {
    debug_assert_eq!(clients.len(), weights.len());
    let kernel = block_kernel();
    let run = |(b, block): (usize, &mut [f64])| kernel(clients, weights, b * MEAN_BLOCK, block);
    if clients.len() * out.len() < PARALLEL_MIN_WORK {
        out.chunks_mut(MEAN_BLOCK).enumerate().for_each(run);
    } else {
        out.par_chunks_mut(MEAN_BLOCK).enumerate().with_min_len(min_len()).for_each(run);
    }
}

/// Weighted mean of every layer into `out` (one buffer per layer).
/// `weights` must already be normalised.
pub fn weighted_mean_into(set: &UpdateSet, weights: &[f64], out: &mut [&mut [f64]]) -> CoreResult<()> {
    if weights.len() != set.n_clients() {
        return invalid("weights", "length differs from the number of clients");
    }
    if out.len() != set.n_layers() {
        return invalid("out", "needs one buffer per layer");
    }
    for (l, o) in out.iter_mut().enumerate() {
        if o.len() != set.layer_len(l) {
            return invalid("out", format!("buffer {} has the wrong length", l + 1));
        }
        weighted_sum_into(set.layer(l), weights, o);
    }
    Ok(())
}

/// Weighted mean of every layer, allocating the result.
pub fn weighted_mean(set: &UpdateSet, weights: &[f64]) -> CoreResult<Vec<Vec<f64>>> {
    let mut out = set.zeroed_like("the aggregated update")?;
    let mut views: Vec<&mut [f64]> = out.iter_mut().map(|v| v.as_mut_slice()).collect();
    weighted_mean_into(set, weights, &mut views)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::with_threads;
    use crate::rng::Rng;

    fn random_clients(k: usize, d: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = Rng::new(seed, 0);
        (0..k).map(|_| (0..d).map(|_| rng.normal()).collect()).collect()
    }

    #[test]
    fn matches_naive_loop_exactly() {
        for k in [1, 3, 4, 7, 9] {
            let data = random_clients(k, 5000, k as u64);
            let slices: Vec<&[f64]> = data.iter().map(|v| v.as_slice()).collect();
            let raw: Vec<f64> = (1..=k).map(|i| i as f64).collect();
            let w = normalize_weights(Some(&raw), k).unwrap();
            let mut naive = vec![0.0; 5000];
            for (x, wk) in data.iter().zip(&w) {
                for (o, v) in naive.iter_mut().zip(x) {
                    *o += wk * v;
                }
            }
            let set = UpdateSet::from_vectors(slices).unwrap();
            let got = weighted_mean(&set, &w).unwrap();
            assert_eq!(got[0], naive);
        }
    }

    #[test]
    fn identical_across_thread_counts() {
        let data = random_clients(13, 100_003, 7);
        let slices: Vec<&[f64]> = data.iter().map(|v| v.as_slice()).collect();
        let set = UpdateSet::from_vectors(slices).unwrap();
        let w = normalize_weights(None, 13).unwrap();
        let one = with_threads(1, || weighted_mean(&set, &w).unwrap());
        let three = with_threads(3, || weighted_mean(&set, &w).unwrap());
        assert_eq!(one, three);
    }

    #[test]
    fn avx2_and_baseline_kernels_agree_bitwise() {
        let data = random_clients(11, 4099, 5);
        let slices: Vec<&[f64]> = data.iter().map(|v| v.as_slice()).collect();
        let w = normalize_weights(Some(&(1..=11).map(|i| i as f64).collect::<Vec<_>>()), 11).unwrap();
        let mut base = vec![0.0; 4099];
        weighted_block(&slices, &w, 0, &mut base);
        let mut dispatched = vec![0.0; 4099];
        block_kernel()(&slices, &w, 0, &mut dispatched);
        assert_eq!(base, dispatched);
    }

    #[test]
    fn weights_are_validated() {
        assert!(normalize_weights(Some(&[1.0]), 2).is_err());
        assert_eq!(
            normalize_weights(Some(&[1.0, -1.0]), 2).unwrap_err(),
            CoreError::Client(1, "weight -1 is not a finite number >= 0".into())
        );
        assert!(normalize_weights(Some(&[0.0, 0.0]), 2).is_err());
        assert_eq!(normalize_weights(Some(&[1.0, 3.0]), 2).unwrap(), vec![0.25, 0.75]);
    }
}
