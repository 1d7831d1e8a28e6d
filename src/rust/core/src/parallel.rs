//! Thread pools and deterministic parallel reductions.

use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::{Arc, Mutex};

/// Number of threads to use when the caller asks for "all cores" (0).
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Threads actually used for a request: more than the cores only adds
/// switching, and every distinct size would be one more pool to keep.
pub fn effective_threads(requested: usize) -> usize {
    let cores = available_threads();
    if requested == 0 {
        cores
    } else {
        requested.min(cores)
    }
}

/// Pools kept for reuse. Building a pool costs far more than a small
/// aggregation, but each keeps its threads alive: two sizes cover a session
/// that alternates between two settings, and an evicted pool's threads end
/// when its last user drops it.
const CACHED_POOLS: usize = 2;

/// Most recently used first.
struct PoolCache<P> {
    pools: Vec<(usize, Arc<P>)>,
    capacity: usize,
}

impl<P> PoolCache<P> {
    const fn new(capacity: usize) -> Self {
        PoolCache { pools: Vec::new(), capacity }
    }

    fn get_or_build<E>(&mut self, threads: usize, build: impl FnOnce() -> Result<P, E>) -> Result<Arc<P>, E> {
        let pool = match self.pools.iter().position(|(n, _)| *n == threads) {
            Some(i) => self.pools.remove(i).1,
            None => Arc::new(build()?),
        };
        self.pools.insert(0, (threads, Arc::clone(&pool)));
        self.pools.truncate(self.capacity);
        Ok(pool)
    }

    #[cfg(test)]
    fn sizes(&self) -> Vec<usize> {
        self.pools.iter().map(|(n, _)| *n).collect()
    }
}

static POOLS: Mutex<PoolCache<ThreadPool>> = Mutex::new(PoolCache::new(CACHED_POOLS));

fn pool_for(threads: usize) -> Option<Arc<ThreadPool>> {
    let mut pools = POOLS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    pools
        .get_or_build(threads, || {
            ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("fedagg-{i}")).build()
        })
        .ok()
}

/// Runs `f` on a pool of `min(threads, cores)` threads (0 = all cores).
/// Results never depend on the count, so when no pool can be started (the
/// process is out of threads) `f` runs in the caller's pool instead.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    match pool_for(effective_threads(threads)) {
        Some(pool) => pool.install(f),
        None => f(),
    }
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
        let all = with_threads(0, || block_sums(x.len(), 1000, 1, f));
        assert_eq!(one, all);
        assert_eq!(one, four);
        assert!((one[0] - x.iter().sum::<f64>()).abs() < 1e-9);
        assert_eq!(sum_all(&[&[1.0, 2.0], &[3.0]]), 6.0);
    }

    #[test]
    fn thread_counts_are_capped_at_the_cores() {
        let cores = available_threads();
        assert_eq!(effective_threads(0), cores);
        assert_eq!(effective_threads(1), 1);
        assert_eq!(effective_threads(10_000), cores);
        assert_eq!(with_threads(10_000, rayon::current_num_threads), cores);
        assert_eq!(with_threads(1, rayon::current_num_threads), 1);
    }

    #[test]
    fn pool_cache_keeps_the_two_most_recent_sizes_and_releases_the_rest() {
        let mut cache = PoolCache::new(2);
        let build = |n: usize| move || Ok::<_, ()>(vec![0u8; n]);
        let one = cache.get_or_build(1, build(1)).unwrap();
        let weak_one = Arc::downgrade(&one);
        drop(one);
        cache.get_or_build(2, build(2)).unwrap();
        // 1 is used again: it is reused, not rebuilt, and becomes the most recent.
        let again = cache.get_or_build(1, || Err(())).unwrap();
        assert_eq!(again.len(), 1);
        drop(again);
        assert_eq!(cache.sizes(), vec![1, 2]);
        cache.get_or_build(3, build(3)).unwrap();
        assert_eq!(cache.sizes(), vec![3, 1]);
        cache.get_or_build(4, build(4)).unwrap();
        assert_eq!(cache.sizes(), vec![4, 3]);
        // Evicted and unused elsewhere: gone (for a pool, its threads end).
        assert!(weak_one.upgrade().is_none());
        assert!(cache.get_or_build(5, || Err(())).is_err());
        assert_eq!(cache.sizes(), vec![4, 3]);
    }

    #[test]
    fn global_pool_cache_never_holds_more_than_two_pools() {
        for n in 1..=6 {
            with_threads(n, || ());
        }
        assert!(POOLS.lock().unwrap().pools.len() <= CACHED_POOLS);
    }
}
