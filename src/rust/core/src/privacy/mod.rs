//! Gaussian mechanism calibration and seeded noise; `rdp` accounts for the
//! privacy of repeated, subsampled releases.

pub mod rdp;

use crate::error::{invalid, CoreResult};
use crate::rng::Rng;
use crate::parallel::min_len;
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

/// `(exp(eps) - 1) * pnorm(x)`: `expm1` keeps the digits of a small `eps`,
/// log space keeps a large `eps` from overflowing.
fn excess_mass(eps: f64, x: f64) -> f64 {
    if eps <= 1.0 {
        libm::expm1(eps) * pnorm(x)
    } else {
        exp_times_pnorm(eps, x) - pnorm(x)
    }
}

/// `pnorm(-a) - pnorm(-b)` for 0 <= a <= b: from `erf` near 0, where the two
/// tails are close to 1/2 and their difference would cancel, else from the
/// tails themselves, which `erfc` gives to full relative precision.
fn mass_between(a: f64, b: f64) -> f64 {
    let (a, b) = (a / std::f64::consts::SQRT_2, b / std::f64::consts::SQRT_2);
    if b < 1.0 {
        0.5 * (libm::erf(b) - libm::erf(a))
    } else {
        0.5 * (libm::erfc(a) - libm::erfc(b))
    }
}

/// Analytic Gaussian mechanism (Balle and Wang 2018, Algorithm 1): the smallest
/// sigma that gives (epsilon, delta)-DP, valid for every epsilon > 0.
///
/// Balle and Wang's B+(v) = pnorm(sqrt(eps v)) - exp(eps) pnorm(-sqrt(eps (v + 2)))
/// and B-(u) = pnorm(-sqrt(eps u)) - exp(eps) pnorm(-sqrt(eps (u + 2))) are
/// evaluated as a mass between two normal quantiles minus (exp(eps) - 1) times a
/// tail: written as printed, both subtract two numbers near 1/2 and lose every
/// digit of delta once epsilon is small.
pub fn analytic_sigma(sensitivity: f64, epsilon: f64, delta: f64) -> CoreResult<f64> {
    check_dp(sensitivity, epsilon, delta)?;
    let eps = epsilon;
    let b_plus = |v: f64| {
        let (t, t2) = ((eps * v).sqrt(), (eps * (v + 2.0)).sqrt());
        0.5 * libm::erf(t / std::f64::consts::SQRT_2) + 0.5 * libm::erf(t2 / std::f64::consts::SQRT_2)
            - excess_mass(eps, -t2)
    };
    let b_minus = |u: f64| {
        let (t, t2) = ((eps * u).sqrt(), (eps * (u + 2.0)).sqrt());
        mass_between(t, t2) - excess_mass(eps, -t2)
    };
    let delta0 = b_plus(0.0);
    let alpha = if delta >= delta0 {
        // v* = sup{v >= 0 : B+(v) <= delta}; B+ increases in v. The printed
        // sqrt(1 + v/2) - sqrt(v/2) cancels to 0 for the huge v* of a tiny epsilon.
        let v = bisect_threshold(|v| b_plus(v) <= delta);
        v.map(|v| 1.0 / ((1.0 + v / 2.0).sqrt() + (v / 2.0).sqrt()))
    } else {
        // u* = inf{u >= 0 : B-(u) <= delta}; B- decreases in u.
        let u = bisect_threshold(|u| b_minus(u) > delta);
        u.map(|u| (1.0 + u / 2.0).sqrt() + (u / 2.0).sqrt())
    };
    let Some(alpha) = alpha else {
        return invalid(
            "epsilon",
            format!("is too small to calibrate the analytic Gaussian mechanism in double precision (epsilon = {eps:e}, delta = {delta:e})"),
        );
    };
    let sigma = alpha * sensitivity / (2.0 * eps).sqrt();
    if !(sigma.is_finite() && sigma > 0.0) {
        return invalid(
            "sensitivity",
            format!("gives a noise standard deviation outside the double range (sensitivity = {sensitivity:e}, epsilon = {eps:e})"),
        );
    }
    Ok(sigma)
}

/// The point where `below(t)` turns from true to false on [0, inf), found by
/// doubling then bisection to full double precision; `None` when `below`
/// still holds past 1e300, where no threshold can be located.
fn bisect_threshold(below: impl Fn(f64) -> bool) -> Option<f64> {
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while below(hi) {
        lo = hi;
        hi *= 2.0;
        if hi > 1e300 {
            return None;
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
    Some(0.5 * (lo + hi))
}

/// Adds N(0, sigma^2) noise to `x` in place. Block `b` of layer `layer` draws
/// from stream `(layer, b)` of `seed`, so threads never change the result.
pub fn add_noise_in_place(x: &mut [f64], sigma: f64, seed: u64, layer: u64) -> CoreResult<()> {
    if !(sigma >= 0.0 && sigma.is_finite()) {
        return invalid("sigma", "must be a finite number >= 0");
    }
    x.par_chunks_mut(NOISE_BLOCK).enumerate().with_min_len(min_len()).for_each(|(b, block)| {
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
    use crate::error::CoreError;

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

    /// 10^-30, 10^-29, ..., 10^1.
    fn epsilon_grid() -> Vec<f64> {
        (-30..=1).map(|e| 10f64.powi(e)).collect()
    }

    #[test]
    fn analytic_sigma_over_thirty_decades_of_epsilon() {
        for delta in [1e-5, 1e-8, 0.4] {
            let sigmas: Vec<f64> = epsilon_grid().iter().map(|&eps| analytic_sigma(1.0, eps, delta).unwrap()).collect();
            for (&eps, &s) in epsilon_grid().iter().zip(&sigmas) {
                assert!(s.is_finite() && s > 0.0, "eps {eps}, delta {delta}: sigma {s}");
                let got = exact_delta(s, 1.0, eps);
                assert!((got - delta).abs() / delta < 1e-6, "eps {eps}, delta {delta}: exact delta {got}");
            }
            // sigma falls as epsilon grows, except where the two values are
            // both the epsilon -> 0 limit to double precision: there the true
            // change, about epsilon / delta relative, is below one ulp.
            let limit = sigmas[0];
            for w in sigmas.windows(2).zip(epsilon_grid().windows(2)) {
                let ((s0, s1), (e0, e1)) = ((w.0[0], w.0[1]), (w.1[0], w.1[1]));
                let at_limit = (s0 - limit).abs() <= 4.0 * f64::EPSILON * limit && (s1 - limit).abs() <= 4.0 * f64::EPSILON * limit;
                assert!(s1 < s0 || at_limit, "delta {delta}: sigma({e1}) = {s1} vs sigma({e0}) = {s0}");
            }
            // The plateau (about 1e-30 to 1e-16, depending on delta) ends
            // before 1e-12, the 19th value: from there on every step is strict.
            let plateau = sigmas.iter().take_while(|&&s| (s - limit).abs() <= 4.0 * f64::EPSILON * limit).count();
            assert!(plateau < 19, "delta {delta}: {plateau} values on the plateau");
        }
        // The total-variation limit: N(0, s^2) and N(1, s^2) are delta apart.
        for delta in [1e-5, 1e-8] {
            let s = analytic_sigma(1.0, 1e-30, delta).unwrap();
            let tv = 1.0 / (delta * (2.0 * std::f64::consts::PI).sqrt());
            assert!((s - tv).abs() / tv < 1e-6, "delta {delta}: {s} vs {tv}");
        }
    }

    #[test]
    fn analytic_sigma_errors_where_it_cannot_be_computed() {
        assert!(matches!(analytic_sigma(1.0, 1e-310, 1e-5), Err(CoreError::InvalidArgument("epsilon", _))));
        assert!(matches!(analytic_sigma(1e307, 1e-10, 1e-5), Err(CoreError::InvalidArgument("sensitivity", _))));
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
