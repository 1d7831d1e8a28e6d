//! Data shared by the unit tests of several modules.

use crate::model::Dataset;
use crate::rng::Rng;

/// Three Gaussian blobs in three features, one per class, shifted by `shift`.
pub fn blobs(n: usize, seed: u64, shift: f64) -> Dataset {
    let mut rng = Rng::new(seed, 0);
    let p = 3;
    let mut x = vec![0.0; n * p];
    let mut y = vec![0.0; n];
    for i in 0..n {
        let class = rng.below(3) as usize;
        y[i] = class as f64;
        for j in 0..p {
            x[j * n + i] = rng.normal() + if j == class { 2.0 + shift } else { 0.0 };
        }
    }
    Dataset::from_col_major(&x, n, p, &y).unwrap()
}
