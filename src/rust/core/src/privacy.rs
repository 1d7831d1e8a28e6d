//! Gaussian mechanism calibration and seeded noise.

use crate::error::{invalid, CoreResult};
use crate::rng::Rng;
use rayon::prelude::*;

/// Elements per RNG stream: noise block `b` of a layer always uses stream `b`.
const NOISE_BLOCK: usize = 4096;

fn check_dp(sensitivity: f64, epsilon: f64, delta: f64) -> CoreResult<()> {
    if !(sensitivity > 0.0 && sensitivity.is_finite()) {
        return invalid("sensitivity", "must be a finite number > 0");
    }
    if !(epsilon > 0.0 && epsilon.is_finite()) {
        return invalid("epsilon", "must be a finite number > 0");
    }
    if !(delta > 0.0 && delta < 1.0) {
        return invalid("delta", "must be in (0, 1)");
    }
    Ok(())
}

/// Standard normal CDF.
pub fn pnorm(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// `exp(a) * pnorm(b)`, computed in log space so that a large `a` with a tiny
/// `pnorm(b)` neither overflows nor loses the product.
fn exp_times_pnorm(a: f64, b: f64) -> f64 {
    let p = pnorm(b);
    if p == 0.0 {
        0.0
    } else {
        (a + p.ln()).exp()
    }
}

/// Classic calibration (Dwork and Roth 2014, Thm A.1): valid only for epsilon < 1.
pub fn classic_sigma(sensitivity: f64, epsilon: f64, delta: f64) -> CoreResult<f64> {
    check_dp(sensitivity, epsilon, delta)?;
    Ok(sensitivity * (2.0 * (1.25 / delta).ln()).sqrt() / epsilon)
}

/// Analytic Gaussian mechanism (Balle and Wang 2018, Algorithm 1): the smallest
/// sigma that gives (epsilon, delta)-DP, valid for every epsilon > 0.
pub fn analytic_sigma(sensitivity: f64, epsilon: f64, delta: f64) -> CoreResult<f64> {
    check_dp(sensitivity, epsilon, delta)?;
    let eps = epsilon;
    let delta0 = pnorm(0.0) - exp_times_pnorm(eps, -(2.0 * eps).sqrt());
    let b_plus = |v: f64| pnorm((eps * v).sqrt()) - exp_times_pnorm(eps, -(eps * (v + 2.0)).sqrt());
    let b_minus = |u: f64| pnorm(-(eps * u).sqrt()) - exp_times_pnorm(eps, -(eps * (u + 2.0)).sqrt());
    let alpha = if delta >= delta0 {
        // v* = sup{v >= 0 : B+(v) <= delta}; B+ increases in v.
        let v = bisect_threshold(|v| b_plus(v) <= delta);
        (1.0 + v / 2.0).sqrt() - (v / 2.0).sqrt()
    } else {
        // u* = inf{u >= 0 : B-(u) <= delta}; B- decreases in u.
        let u = bisect_threshold(|u| b_minus(u) > delta);
        (1.0 + u / 2.0).sqrt() + (u / 2.0).sqrt()
    };
    Ok(alpha * sensitivity / (2.0 * eps).sqrt())
}

/// The point where `below(t)` turns from true to false on [0, inf), found by
/// doubling then bisection to full double precision.
fn bisect_threshold(below: impl Fn(f64) -> bool) -> f64 {
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while below(hi) {
        lo = hi;
        hi *= 2.0;
        if hi > 1e300 {
            return hi;
        }
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if below(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Adds N(0, sigma^2) noise to `x` in place. Block `b` of layer `layer` draws
/// from stream `(layer, b)` of `seed`, so threads never change the result.
pub fn add_noise_in_place(x: &mut [f64], sigma: f64, seed: u64, layer: u64) -> CoreResult<()> {
    if !(sigma >= 0.0 && sigma.is_finite()) {
        return invalid("sigma", "must be a finite number >= 0");
    }
    x.par_chunks_mut(NOISE_BLOCK).enumerate().for_each(|(b, block)| {
        let mut rng = Rng::new(seed, (layer << 40) ^ b as u64);
        for v in block.iter_mut() {
            *v += sigma * rng.normal();
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Balle and Wang (2018), Theorem 8: the exact delta of the Gaussian mechanism.
    fn exact_delta(sigma: f64, sens: f64, eps: f64) -> f64 {
        let a = sens / (2.0 * sigma);
        let b = eps * sigma / sens;
        pnorm(a - b) - eps.exp() * pnorm(-a - b)
    }

    #[test]
    fn analytic_sigma_attains_the_target_delta() {
        for &(eps, delta) in &[(0.1, 1e-5), (0.5, 1e-6), (1.0, 1e-5), (4.0, 1e-5), (10.0, 1e-8), (0.01, 0.4)] {
            let s = analytic_sigma(1.0, eps, delta).unwrap();
            let got = exact_delta(s, 1.0, eps);
            assert!((got - delta).abs() / delta < 1e-6, "eps {eps}: delta {got} vs {delta}");
        }
    }

    #[test]
    fn analytic_beats_classic_where_classic_is_valid() {
        for eps in [0.05, 0.3, 0.9] {
            assert!(analytic_sigma(2.0, eps, 1e-5).unwrap() < classic_sigma(2.0, eps, 1e-5).unwrap());
        }
    }

    #[test]
    fn classic_matches_closed_form() {
        let s = classic_sigma(2.0, 0.5, 1e-5).unwrap();
        assert!((s - 2.0 * (2.0 * (1.25e5f64).ln()).sqrt() / 0.5).abs() < 1e-12);
        assert!(classic_sigma(1.0, 0.0, 1e-5).is_err());
        assert!(classic_sigma(1.0, 1.0, 1.0).is_err());
        assert!(classic_sigma(-1.0, 1.0, 0.1).is_err());
    }

    #[test]
    fn noise_is_reproducible() {
        let mut a = vec![0.0; 10_000];
        let mut b = vec![0.0; 10_000];
        add_noise_in_place(&mut a, 2.0, 9, 0).unwrap();
        add_noise_in_place(&mut b, 2.0, 9, 0).unwrap();
        assert_eq!(a, b);
        let sd = (a.iter().map(|v| v * v).sum::<f64>() / a.len() as f64).sqrt();
        assert!((sd - 2.0).abs() < 0.1);
    }
}
