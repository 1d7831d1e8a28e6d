//! Weighted averaging of client updates (FedAvg's aggregation).

use crate::error::{invalid, CoreError, CoreResult};
use crate::updates::UpdateSet;
use rayon::prelude::*;

/// Output block of the streaming mean: 16 KiB stays in L1 while every client's
/// matching block streams past it once, so no K x d temporary is ever built.
const MEAN_BLOCK: usize = 2048;

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

/// `out = sum_k weights[k] * clients[k]`, summed in client order for every
/// coordinate, whatever the thread count.
pub fn weighted_sum_into(clients: &[&[f64]], weights: &[f64], out: &mut [f64]) {
    debug_assert_eq!(clients.len(), weights.len());
    out.par_chunks_mut(MEAN_BLOCK).enumerate().for_each(|(b, block)| {
        let start = b * MEAN_BLOCK;
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
            for j in 0..block.len() {
                let mut acc = block[j];
                acc += w0 * x0[j];
                acc += w1 * x1[j];
                acc += w2 * x2[j];
                acc += w3 * x3[j];
                block[j] = acc;
            }
            k += 4;
        }
        for (x, &w) in clients[k..].iter().zip(&weights[k..]) {
            for (o, v) in block.iter_mut().zip(&x[start..end]) {
                *o += w * v;
            }
        }
    });
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
    let mut out = set.zeroed_like();
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
