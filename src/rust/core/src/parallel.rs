//! Thread pools and deterministic parallel reductions.

use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Number of threads to use when the caller asks for "all cores" (0).
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn pool_for(threads: usize) -> Arc<ThreadPool> {
    // Building a pool costs far more than a small aggregation, so pools are
    // kept for the life of the process, one per requested size.
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();
    let pools = POOLS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut pools = pools.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    pools
        .entry(threads)
        .or_insert_with(|| {
            Arc::new(
                ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("fedagg-{i}"))
                    .build()
                    .expect("failed to start a rayon thread pool"),
            )
        })
        .clone()
}

/// Runs `f` on a pool of `threads` threads (0 = all cores).
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    let n = if threads == 0 { available_threads() } else { threads };
    pool_for(n).install(f)
}

/// Sums `n_out` accumulators over `0..len`, split in blocks of `block` indices.
///
/// `fill(range, acc)` adds the contribution of `range` into `acc` (zeroed).
/// Blocks run in parallel and are added in block order, so the result does not
/// depend on the number of threads.
pub fn block_sums<F>(len: usize, block: usize, n_out: usize, fill: F) -> Vec<f64>
where
    F: Fn(std::ops::Range<usize>, &mut [f64]) + Sync,
{
    let block = block.max(1);
    let n_blocks = len.div_ceil(block);
    let partials: Vec<Vec<f64>> = (0..n_blocks)
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![0.0; n_out];
            fill(b * block..((b + 1) * block).min(len), &mut acc);
            acc
        })
        .collect();
    let mut total = vec![0.0; n_out];
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Block length for reductions over `n_series` series, so that one block of
/// every series fits in about a megabyte of cache.
pub fn reduction_block(n_series: usize) -> usize {
    (131_072 / n_series.max(1)).clamp(512, 65_536)
}

/// Sum of every value of every slice, read in parallel blocks: a probe of the
/// memory read bandwidth for data laid out as the slices are (benchmarks).
pub fn sum_all(slices: &[&[f64]]) -> f64 {
    const BLOCK: usize = 1 << 16;
    slices
        .par_iter()
        .map(|x| x.par_chunks(BLOCK).map(sum_unordered).sum::<f64>())
        .sum()
}

/// Sum with eight independent accumulators, so that memory, not the latency
/// of dependent additions, limits its speed.
fn sum_unordered(x: &[f64]) -> f64 {
    let mut acc = [0.0; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sums_are_thread_invariant_and_correct() {
        let x: Vec<f64> = (0..100_001).map(|i| (i as f64).sin()).collect();
        let f = |r: std::ops::Range<usize>, acc: &mut [f64]| acc[0] = x[r].iter().sum();
        let one = with_threads(1, || block_sums(x.len(), 1000, 1, f));
        let four = with_threads(4, || block_sums(x.len(), 1000, 1, f));
        assert_eq!(one, four);
        assert!((one[0] - x.iter().sum::<f64>()).abs() < 1e-9);
        assert_eq!(sum_all(&[&[1.0, 2.0], &[3.0]]), 6.0);
    }
}
