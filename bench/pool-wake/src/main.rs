//! How long a rayon pool takes to start a round's parallel work after the
//! caller (R) has been busy for a while: the workers spin for a moment, then
//! sleep, and a sleeping worker must be woken. The round is shaped like a
//! small federated round: 10 clients of 0.3 ms in chunks of 4 x threads.
//! With a second argument the pool is built with the caller as one of its
//! threads (`use_current_thread`), as fedagg's all-cores and one-thread
//! calls now run.
//!
//!   cargo run --release -- 2          # threads, work handed to the pool
//!   cargo run --release -- 2 caller   # threads, the caller takes part
use rayon::prelude::*;
use std::time::{Duration, Instant};
fn busy(d: Duration) { let t = Instant::now(); while t.elapsed() < d { std::hint::spin_loop(); } }
fn main() {
    let threads: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let current = std::env::args().nth(2).is_some();
    let mut b = rayon::ThreadPoolBuilder::new().num_threads(threads);
    if current { b = b.use_current_thread(); }
    let pool = b.build().unwrap();
    for gap_us in [0u64, 100, 300, 600, 1000, 2000] {
        let n = 400;
        let mut work = Duration::ZERO;
        for _ in 0..n {
            busy(Duration::from_micros(gap_us));
            let t = Instant::now();
            pool.install(|| {
                let idx: Vec<usize> = (0..10).collect();
                for chunk in idx.chunks(4 * threads) {
                    let _r: Vec<usize> = chunk.par_iter().map(|&k| { busy(Duration::from_micros(300)); k }).collect();
                }
            });
            work += t.elapsed();
        }
        println!("threads {threads} current {current} gap {gap_us:>5} us: parallel part {:.3} ms (ideal {:.3})", work.as_secs_f64() * 1000.0 / n as f64,
                 0.3 * (10.0 / threads as f64).ceil());
    }
}
