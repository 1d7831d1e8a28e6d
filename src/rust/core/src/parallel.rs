//! Thread pools and deterministic parallel reductions.

use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::cell::{Cell, OnceCell};
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

thread_local! {
    /// The pool of all cores in which the calling thread is itself a worker
    /// (built on its first request; `None` if it could not be).
    static CALLER_POOL: OnceCell<Option<ThreadPool>> = const { OnceCell::new() };
    /// Set while `with_threads(1, ..)` runs in the caller: no parallel loop
    /// splits its work (see `min_len`).
    static SEQUENTIAL: Cell<bool> = const { Cell::new(false) };
}

/// The least number of items a parallel loop gives one task: every item
/// (so nothing is handed to another thread) while `with_threads(1, ..)`
/// runs in the caller, else 1. Every parallel loop of the crate takes it
/// (`.with_min_len(min_len())`), so that one thread means one thread.
pub fn min_len() -> usize {
    if sequential() {
        usize::MAX
    } else {
        1
    }
}

/// Threads the current work may spread over.
pub fn threads_here() -> usize {
    if sequential() {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Whether the current work must stay on the current thread (for the few
/// parallel calls that are not iterators: sorts, joins).
pub fn sequential() -> bool {
    SEQUENTIAL.with(Cell::get)
}

fn with_sequential<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SEQUENTIAL.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SEQUENTIAL.with(|s| s.replace(on)));
    f()
}

/// Runs `f` in the all-cores pool that includes the calling thread, for a
/// caller that is not yet a worker of any pool: on all cores, or on the
/// caller alone for one thread. `Err(f)` when there is no such pool.
///
/// Why: a small round handed R's thread's work to a pool whose workers fell
/// asleep while R ran its part of the round (about 1 ms), and on a VM waking
/// one takes about 0.5 ms (`bench/pool-wake`: 2.08 ms for a 1.50 ms round
/// handed over, 1.71 ms with the caller taking part; one thread, 3.15 ms
/// handed to a pool of one and 3.01 ms in the caller). A thread can be in
/// one pool only, so only the all-cores size (the default) and one thread
/// get this; other sizes use the cached pools. The pool's workers end with
/// the thread; rayon keeps (leaks) the caller's small worker record.
fn in_caller_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> Result<R, impl FnOnce() -> R + Send> {
    let cores = available_threads();
    if threads != 1 && threads != cores {
        return Err(f);
    }
    CALLER_POOL.with(|cell| {
        let pool = cell.get_or_init(|| {
            if rayon::current_thread_index().is_some() {
                return None;
            }
            ThreadPoolBuilder::new()
                .num_threads(cores)
                .use_current_thread()
                .thread_name(|i| format!("fedagg-{i}"))
                .build()
                .ok()
        });
        match pool {
            // The caller is the pool's worker 0: install() runs `f` here.
            Some(pool) => Ok(pool.install(|| with_sequential(threads == 1 && cores > 1, f))),
            None => Err(f),
        }
    })
}

/// Runs `f` on a pool of `min(threads, cores)` threads (0 = all cores).
/// Results never depend on the count, so when no pool can be started (the
/// process is out of threads) `f` runs in the caller's pool instead.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    let threads = effective_threads(threads);
    let f = match in_caller_pool(threads, f) {
        Ok(result) => return result,
        Err(f) => f,
    };
    match pool_for(threads) {
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
        .with_min_len(min_len())
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
        .with_min_len(min_len())
        .map(|x| x.par_chunks(BLOCK).with_min_len(min_len()).map(sum_unordered).sum::<f64>())
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
        assert_eq!(with_threads(10_000, threads_here), cores);
        assert_eq!(with_threads(1, threads_here), 1);
    }

    #[test]
    fn the_caller_works_in_its_own_pool_on_all_cores_and_alone() {
        let cores = available_threads();
        std::thread::spawn(move || {
            // All cores: the caller is worker 0 of its own pool (with one
            // core there is no pool to join).
            let inside = with_threads(0, || (rayon::current_thread_index(), rayon::current_num_threads()));
            assert_eq!(inside, (if cores > 1 { Some(0) } else { inside.0 }, cores));
            // One thread: in the caller too, marked so that nothing splits.
            let one = with_threads(1, || (rayon::current_thread_index(), threads_here()));
            assert_eq!(one, (inside.0, 1));
            // Nested: a worker asking again stays in its pool.
            let nested = with_threads(0, || with_threads(0, || block_sums(10, 3, 1, |r, acc| acc[0] = r.len() as f64)));
            assert_eq!(nested, vec![10.0]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn one_thread_runs_every_loop_in_the_caller() {
        use std::collections::HashSet;
        std::thread::spawn(|| {
            let seen = Mutex::new(HashSet::new());
            let note = || {
                seen.lock().unwrap().insert(std::thread::current().id());
            };
            let x: Vec<f64> = (0..200_000).map(|i| i as f64).collect();
            let one = with_threads(1, || {
                let s = block_sums(x.len(), 100, 1, |r, acc| {
                    note();
                    acc[0] = x[r].iter().sum();
                });
                x.par_chunks(10).with_min_len(min_len()).for_each(|_| note());
                s
            });
            assert_eq!(*seen.lock().unwrap(), HashSet::from([std::thread::current().id()]));
            assert!(!sequential(), "the one-thread mark ends with its call");
            // All cores again: the same sums, and (with two cores or more) the work is shared.
            seen.lock().unwrap().clear();
            let all = with_threads(0, || {
                block_sums(x.len(), 100, 1, |r, acc| {
                    note();
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    acc[0] = x[r].iter().sum();
                })
            });
            assert_eq!(one, all);
            if available_threads() > 1 {
                assert!(seen.lock().unwrap().len() > 1);
            }
        })
        .join()
        .unwrap();
    }

    /// Every parallel loop of the crate must take `min_len()`, and every
    /// parallel sort or join must ask `sequential()`: otherwise a
    /// one-thread call would still spread over the caller's pool.
    #[test]
    fn every_parallel_loop_honours_one_thread() {
        fn sources(dir: &std::path::Path, out: &mut Vec<(String, String)>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    sources(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
                }
            }
        }
        let mut files = Vec::new();
        sources(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
        let loops = [".par_iter()", ".par_iter_mut()", ".into_par_iter()", ".par_chunks(", ".par_chunks_mut("];
        let mut checked = 0;
        for (path, text) in &files {
            // The code, not its tests (which may run loops as they like).
            let code = text.split("#[cfg(test)]").next().unwrap();
            for statement in code.split(';') {
                let n_loops: usize = loops.iter().map(|l| statement.matches(l).count()).sum();
                let n_zipped = statement.matches(".zip(").count().min(n_loops.saturating_sub(1));
                let n_limited = statement.matches(".with_min_len(min_len())").count();
                assert!(n_limited >= n_loops - n_zipped, "{path}: a parallel loop without with_min_len(min_len()):\n{statement}");
                for call in ["par_sort", "rayon::join"] {
                    if statement.contains(call) {
                        assert!(statement.contains("sequential()"), "{path}: {call} without sequential():\n{statement}");
                    }
                }
                checked += n_loops;
            }
        }
        assert!(checked >= 15, "found only {checked} parallel loops: is the scan still reading the sources?");
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
