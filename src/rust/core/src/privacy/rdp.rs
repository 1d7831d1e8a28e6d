//! Rényi differential privacy (RDP) accounting for the Poisson-subsampled
//! Gaussian mechanism, the accountant of DP-SGD and DP-FedAvg.
//!
//! One step releases `f(batch) + N(0, sigma^2)` for an L2-sensitivity-1 `f`,
//! where every record joins the batch independently with probability `q`.
//! Its RDP at order `alpha` is `log(A_alpha) / (alpha - 1)`, with `A_alpha`
//! from Mironov, Talwar and Zhang (2019), "Rényi Differential Privacy of the
//! Sampled Gaussian Mechanism" (arXiv:1908.10530), Section 3.3; `steps`
//! releases compose by adding their RDP. The (epsilon, delta) guarantee is
//! the conversion of Balle et al. (2020), "Hypothesis testing
//! interpretations and Rényi differential privacy", Theorem 21, minimised
//! over a list of orders.
//!
//! The numbers follow Opacus (`opacus/accountants/analysis/rdp.py`) and TF
//! Privacy (`tensorflow_privacy/privacy/analysis/rdp_accountant.py`, before
//! it moved to Google's `dp_accounting`): the fractional-order series keeps
//! the signs of its binomial coefficients, which gives `A_alpha` itself.
//! Google's `dp_accounting` has summed their absolute values since April
//! 2024 (commit 0b109e9), a larger upper bound: at fractional orders its
//! RDP is slightly above these, at integer orders the two agree.

use crate::error::{invalid, CoreResult};

/// Largest order accepted, to bound the cost: the integer closed form sums
/// `order + 1` terms and the fractional series needs more than `order`
/// before its terms shrink.
pub const MAX_ORDER: f64 = 1e5;

/// Relative tolerance of `noise_multiplier`: it stops bisecting when the
/// bracket is this narrow relative to its upper end.
pub const CALIBRATION_RTOL: f64 = 1e-10;

/// Most terms of the fractional-order series before it is cut short (with a
/// bound on the rest, see `log_a_frac`). The terms decay like a power of
/// their index, slowest for orders just above 1.
const MAX_SERIES_TERMS: usize = 2_000_000;

/// Orders below this are left out of the conversion to (epsilon, delta),
/// as in `dp_accounting`: its `log(delta) / (alpha - 1)` blows up, and such
/// orders never give the best epsilon.
const MIN_CONVERSION_ORDER: f64 = 1.01;

/// Noise multipliers tried by `noise_multiplier` before it gives up.
const SIGMA_RANGE: (f64, f64) = (1e-150, 1e150);

/// The default orders: `1 + x / 10` for x = 1, ..., 99 and 12, ..., 63, as
/// Opacus' `RDPAccountant.DEFAULT_ALPHAS`, then 128, 256 and 512 as TF
/// Privacy's `compute_dp_sgd_privacy` (whose list `dp_accounting`'s
/// `DEFAULT_RDP_ORDERS` extends to 1024): large orders give the best
/// epsilon when the privacy loss is small and delta tiny.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    orders.extend((12..64).map(f64::from));
    orders.extend([128.0, 256.0, 512.0]);
    orders
}

/// (epsilon, delta) from an RDP curve: the smallest epsilon over the orders
/// and the order that gives it (`None` when epsilon is infinite).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacySpent {
    pub epsilon: f64,
    pub order: Option<f64>,
}

fn check_q(q: f64) -> CoreResult<()> {
    if !(0.0..=1.0).contains(&q) {
        return invalid("q", "must be a sampling rate in [0, 1]");
    }
    Ok(())
}

fn check_sigma(sigma: f64) -> CoreResult<()> {
    if !(sigma >= 0.0 && sigma.is_finite()) {
        return invalid("noise_multiplier", "must be a finite number >= 0");
    }
    Ok(())
}

fn check_delta(delta: f64) -> CoreResult<()> {
    if !(delta > 0.0 && delta < 1.0) {
        return invalid("delta", "must be in (0, 1)");
    }
    Ok(())
}

fn check_orders(orders: &[f64]) -> CoreResult<()> {
    if orders.is_empty() {
        return invalid("orders", "must hold at least one order");
    }
    if let Some(bad) = orders.iter().find(|&&a| !(a > 1.0 && a <= MAX_ORDER)) {
        return invalid("orders", format!("must be in (1, {MAX_ORDER:e}]; {bad} is not"));
    }
    Ok(())
}

/// `log(exp(a) + exp(b))`.
fn log_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY || hi == f64::INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `log(exp(x) - 1)` for x > 0: `expm1` keeps a small x, the rewrite keeps a
/// large one from overflowing.
fn log_expm1(x: f64) -> f64 {
    if x > 1.0 {
        x + (-(-x).exp()).ln_1p()
    } else {
        x.exp_m1().ln()
    }
}

/// `log(1 + exp(x))`, without overflow for a large x.
fn log1p_exp(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// `log(erfc(x))`, finite far into the tail where `erfc` itself underflows.
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        // libm's erfc keeps full relative precision down to 1e-300.
        return libm::erfc(x).ln();
    }
    // erfc(x) = exp(-x^2) / (x sqrt(pi)) * (1 - 1/(2x^2) + 3/(2x^2)^2 - ...),
    // the asymptotic series (Abramowitz and Stegun 7.1.23). At x >= 25 the
    // seventh term is below 1e-16, and the series is still shrinking there.
    let u = 1.0 / (2.0 * x * x);
    let (mut term, mut sum) = (1.0, 1.0);
    for n in 1..=7 {
        term *= -((2 * n - 1) as f64) * u;
        sum += term;
    }
    -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln() + sum.ln()
}

/// Running `log(sum(exp(x_i)))`.
#[derive(Clone, Copy)]
struct LogSum(f64);

impl LogSum {
    fn new() -> Self {
        LogSum(f64::NEG_INFINITY)
    }
    fn add(&mut self, x: f64) {
        self.0 = log_add(self.0, x);
    }
}

/// `log(A_alpha)` at an integer order alpha >= 2, for 0 < q < 1, sigma > 0:
/// `A_alpha = E[exp((K^2 - K) / (2 sigma^2))]` for K ~ Binomial(alpha, q)
/// (Mironov, Talwar and Zhang 2019, Section 3.3).
///
/// TF Privacy sums the terms for K = 0, ..., alpha in log space. For a small
/// q, though, A is 1 + O(q^2) while the K = 0 and K = 1 terms are 1 - O(q)
/// and O(q): their sum cancels to the last digits, and log(A) keeps only
/// about 1e-16 / q^2 relative precision. Here `A - 1` is summed instead, as
/// `E[expm1((K^2 - K) / (2 sigma^2))]`: the K = 0 and K = 1 terms are then
/// exactly 0 and every other term is positive, so nothing cancels.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let a = alpha as f64;
    let inv_2s2 = 1.0 / (2.0 * sigma * sigma);
    let ln_fact_a = libm::lgamma(a + 1.0);
    let mut a_minus_1 = LogSum::new();
    for k in 2..=alpha {
        let k = k as f64;
        let ln_binom = ln_fact_a - libm::lgamma(k + 1.0) - libm::lgamma(a - k + 1.0);
        a_minus_1.add(ln_binom + k * ln_q + (a - k) * ln_1mq + log_expm1((k * k - k) * inv_2s2));
    }
    log1p_exp(a_minus_1.0)
}

/// `log(A_alpha)` at a fractional order alpha > 1, for 0 < q < 1, sigma > 0:
/// the two series of Mironov, Talwar and Zhang (2019), Section 3.3, for the
/// integrals of A over (-inf, z0] and [z0, inf), computed as TF Privacy's
/// `_compute_log_a_frac`: generalised binomial coefficients, whose signs
/// alternate once the index passes alpha, times Gaussian tail masses.
///
/// Positive and negative terms are summed apart and subtracted once. The
/// series stops when both its parts shrink (so the rest, an alternating
/// series, is smaller than the last term) and that term is below exp(-30),
/// about 1e-13, of log(A) (TF Privacy stops at exp(-30) of A, which leaves
/// fewer digits in a small log(A)). Should the subtraction lose everything
/// to rounding, or the series not settle within `MAX_SERIES_TERMS`, the
/// result is an upper bound instead: the sum of absolute values (as
/// `dp_accounting` computes it), or the partial sum plus the last term.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let inv_2s2 = 1.0 / (2.0 * sigma * sigma);
    // The point where the two Gaussians' densities, weighted 1 - q and q,
    // cross: sigma^2 log(1/q - 1) + 1/2, with log(1/q - 1) = log((1 - q) / q).
    let z0 = sigma * sigma * (ln_1mq - ln_q) + 0.5;
    let scale = 1.0 / (std::f64::consts::SQRT_2 * sigma);
    let ln_half = -std::f64::consts::LN_2;

    let (mut pos, mut neg) = (LogSum::new(), LogSum::new());
    // log|binom(alpha, i)| and its sign, updated from one i to the next.
    let (mut ln_coef, mut negative) = (0.0_f64, false);
    let (mut last0, mut last1) = (f64::INFINITY, f64::INFINITY);
    for i in 0..MAX_SERIES_TERMS {
        let fi = i as f64;
        let j = alpha - fi;
        let s0 = ln_coef + fi * ln_q + j * ln_1mq + (fi * fi - fi) * inv_2s2 + ln_half + log_erfc((fi - z0) * scale);
        let s1 = ln_coef + j * ln_q + fi * ln_1mq + (j * j - j) * inv_2s2 + ln_half + log_erfc((z0 - j) * scale);
        let term = log_add(s0, s1);
        if negative {
            neg.add(term);
        } else {
            pos.add(term);
        }
        if pos.0 == f64::INFINITY {
            return f64::INFINITY;
        }
        let shrinking = fi > alpha && s0 < last0 && s1 < last1;
        let last = i + 1 == MAX_SERIES_TERMS;
        if shrinking || last {
            if pos.0 <= neg.0 {
                // A >= 1, so the signed sum has lost all its digits.
                return log_add(pos.0, neg.0);
            }
            let total = pos.0 + (-(neg.0 - pos.0).exp()).ln_1p();
            // The relative precision wanted is in log(A), not only in A:
            // near A = 1 (small q) log(A) is much smaller than A.
            let resolution = if total > 0.0 { total + total.ln().clamp(-40.0, 0.0) } else { pos.0 - 40.0 };
            if term < resolution - 30.0 {
                return total;
            }
            if last {
                return if shrinking { log_add(total, term) } else { log_add(pos.0, neg.0) };
            }
        }
        last0 = s0;
        last1 = s1;
        ln_coef += (alpha - fi).abs().ln() - (fi + 1.0).ln();
        if alpha - fi < 0.0 {
            negative = !negative;
        }
    }
    unreachable!("the loop returns at its last term")
}

/// RDP of one step at one order. Checked inputs: 0 <= q <= 1, sigma >= 0,
/// 1 < alpha <= MAX_ORDER.
fn rdp_step(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    // No noise, or so little that 1 / sigma^2 overflows (and the series
    // would meet 0 * inf): no privacy.
    if !(1.0 / (sigma * sigma)).is_finite() {
        return f64::INFINITY;
    }
    if q == 1.0 {
        // Without subsampling: the Gaussian mechanism (Mironov 2017, Prop. 7).
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 { log_a_int(q, sigma, alpha as u64) } else { log_a_frac(q, sigma, alpha) };
    // RDP is >= 0; a fractional series can round to a hair below. NaN would
    // be a failed computation, which must not pass for privacy.
    let rdp = log_a / (alpha - 1.0);
    if rdp.is_nan() {
        f64::INFINITY
    } else {
        rdp.max(0.0)
    }
}

fn rdp_unchecked(q: f64, sigma: f64, steps: u64, orders: &[f64]) -> Vec<f64> {
    if steps == 0 {
        return vec![0.0; orders.len()];
    }
    orders.iter().map(|&a| rdp_step(q, sigma, a) * steps as f64).collect()
}

/// RDP of `steps` compositions of the sampled Gaussian mechanism (sampling
/// rate `q`, noise multiplier `sigma`) at each order; `inf` when sigma = 0
/// and q > 0.
pub fn compute_rdp(q: f64, sigma: f64, steps: u64, orders: &[f64]) -> CoreResult<Vec<f64>> {
    check_q(q)?;
    check_sigma(sigma)?;
    check_orders(orders)?;
    Ok(rdp_unchecked(q, sigma, steps, orders))
}

fn epsilon_unchecked(orders: &[f64], rdp: &[f64], delta: f64) -> PrivacySpent {
    let mut best = PrivacySpent { epsilon: f64::INFINITY, order: None };
    for (&a, &r) in orders.iter().zip(rdp) {
        // RDP is >= 0; NaN would mean a failed computation: no guarantee.
        let r = if r.is_nan() { f64::INFINITY } else { r.max(0.0) };
        let eps = if delta * delta + (-r).exp_m1() > 0.0 {
            // delta >= sqrt(1 - exp(-KL)) >= total variation (the
            // Bretagnolle-Huber bound), KL <= RDP at any order >= 1: then
            // (0, delta)-DP holds. Guard as in dp_accounting's compute_epsilon.
            0.0
        } else if a > MIN_CONVERSION_ORDER {
            // Balle et al. (2020), Theorem 21.
            r + (-1.0 / a).ln_1p() - (delta.ln() + a.ln()) / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.epsilon {
            best = PrivacySpent { epsilon: eps, order: Some(a) };
        }
    }
    best.epsilon = best.epsilon.max(0.0);
    best
}

/// The smallest epsilon, over the orders, for which an RDP curve gives
/// (epsilon, delta)-DP (Balle et al. 2020, Theorem 21):
/// `rdp - (log(delta) + log(alpha)) / (alpha - 1) + log((alpha - 1) / alpha)`,
/// at least 0. Orders up to 1.01 are skipped, and an order whose RDP already
/// gives delta through the KL bound gives epsilon = 0 (both as
/// `dp_accounting`'s `compute_epsilon`). The first best order wins a tie.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> CoreResult<PrivacySpent> {
    check_orders(orders)?;
    check_delta(delta)?;
    if rdp.len() != orders.len() {
        return invalid("rdp", format!("must have one value per order ({}), not {}", orders.len(), rdp.len()));
    }
    Ok(epsilon_unchecked(orders, rdp, delta))
}

/// (epsilon, delta) after `steps` steps of the sampled Gaussian mechanism.
pub fn epsilon(q: f64, sigma: f64, steps: u64, delta: f64, orders: &[f64]) -> CoreResult<PrivacySpent> {
    check_delta(delta)?;
    let rdp = compute_rdp(q, sigma, steps, orders)?;
    Ok(epsilon_unchecked(orders, &rdp, delta))
}

/// (epsilon, delta) after rounds whose sampling rates were `qs`, one per
/// round: RDP composes additively, order by order, so the rounds of each
/// distinct rate are accounted together and summed. With a single rate this
/// is `epsilon()`, bit for bit.
pub fn epsilon_of_rounds(qs: &[f64], sigma: f64, delta: f64, orders: &[f64]) -> CoreResult<PrivacySpent> {
    check_delta(delta)?;
    let mut rates: Vec<(f64, u64)> = Vec::new();
    for &q in qs {
        match rates.iter_mut().find(|(r, _)| r.to_bits() == q.to_bits()) {
            Some((_, n)) => *n += 1,
            None => rates.push((q, 1)),
        }
    }
    let mut total = vec![0.0; orders.len()];
    for (q, n) in rates {
        for (t, r) in total.iter_mut().zip(compute_rdp(q, sigma, n, orders)?) {
            *t += r;
        }
    }
    Ok(epsilon_unchecked(orders, &total, delta))
}

/// The smallest noise multiplier for which `steps` steps at sampling rate
/// `q` are (target_epsilon, delta)-DP by `epsilon()`.
///
/// Epsilon falls as the noise grows, so a bracket is found by doubling or
/// halving from 1, then bisected until it is narrower than
/// `CALIBRATION_RTOL` times its upper end, which is returned: its epsilon is
/// at most the target, and 1e-10 less noise would exceed it. With q = 0 or
/// no steps nothing is revealed and the answer is 0.
pub fn noise_multiplier(target_epsilon: f64, delta: f64, q: f64, steps: u64, orders: &[f64]) -> CoreResult<f64> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return invalid("epsilon", "must be a finite number > 0");
    }
    check_delta(delta)?;
    check_q(q)?;
    check_orders(orders)?;
    if q == 0.0 || steps == 0 {
        return Ok(0.0);
    }
    let ok = |sigma: f64| epsilon_unchecked(orders, &rdp_unchecked(q, sigma, steps, orders), delta).epsilon <= target_epsilon;
    let (mut lo, mut hi) = (1.0_f64, 1.0_f64);
    if ok(hi) {
        while ok(lo) {
            // Epsilon is infinite as the noise vanishes (q > 0), so this ends.
            hi = lo;
            lo /= 2.0;
            if lo < SIGMA_RANGE.0 {
                return Ok(0.0);
            }
        }
    } else {
        while !ok(hi) {
            lo = hi;
            hi *= 2.0;
            if hi > SIGMA_RANGE.1 {
                return invalid(
                    "epsilon",
                    format!("cannot be reached with a noise multiplier up to {:e} (epsilon = {target_epsilon:e}, delta = {delta:e})", SIGMA_RANGE.1),
                );
            }
        }
    }
    while hi - lo > CALIBRATION_RTOL * hi {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if ok(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}


#[cfg(test)]
mod tests {

    #[test]
    fn rounds_of_one_rate_are_epsilon_and_rates_compose_additively() {
        let orders = default_orders();
        let one = epsilon(0.1, 1.1, 30, 1e-5, &orders).unwrap();
        assert_eq!(epsilon_of_rounds(&[0.1; 30], 1.1, 1e-5, &orders).unwrap().epsilon, one.epsilon);
        let mixed = epsilon_of_rounds(&[0.5, 0.1, 0.5, 0.1, 0.1], 1.1, 1e-5, &orders).unwrap();
        let a = compute_rdp(0.5, 1.1, 2, &orders).unwrap();
        let b = compute_rdp(0.1, 1.1, 3, &orders).unwrap();
        let sum: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(mixed.epsilon, epsilon_from_rdp(&orders, &sum, 1e-5).unwrap().epsilon);
        assert!(mixed.epsilon > epsilon(0.1, 1.1, 5, 1e-5, &orders).unwrap().epsilon);
    }

    use super::*;
    use crate::error::CoreError;

    fn close(got: f64, want: f64, rtol: f64) -> bool {
        (got - want).abs() <= rtol * want.abs()
    }

    /// TF Privacy's `compute_dp_sgd_privacy` orders.
    fn tf_orders() -> Vec<f64> {
        [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5].into_iter().chain((5..64).map(f64::from)).chain([128.0, 256.0, 512.0]).collect()
    }

    /// log(A_alpha) by the trapezoid rule on the integral that defines it,
    /// A = E_{z ~ N(0, s^2)} [((1 - q) + q exp((2z - 1) / (2 s^2)))^alpha]:
    /// independent of both series. The trapezoid rule converges
    /// geometrically for such smooth, fast-decaying integrands. Near A = 1
    /// it integrates A - 1 (whose first-order part integrates to 0) so that
    /// a small log(A) keeps its digits.
    fn log_a_quadrature(q: f64, s: f64, alpha: f64) -> f64 {
        let ln_phi = |z: f64| -z * z / (2.0 * s * s) - (s * (2.0 * std::f64::consts::PI).sqrt()).ln();
        let u = |z: f64| (2.0 * z - 1.0) / (2.0 * s * s);
        // alpha * log((1 - q) + q exp(u)), and that minus its value at q = 0.
        let g = |z: f64| alpha * log_add((-q).ln_1p(), q.ln() + u(z));
        let (lo, hi) = (-40.0 * s - 1.0, alpha + 40.0 * s + 1.0);
        let h = s / 32.0;
        let n = ((hi - lo) / h).ceil() as usize;
        let zs: Vec<f64> = (0..=n).map(|k| lo + k as f64 * h).collect();
        let logs: Vec<f64> = zs.iter().map(|&z| ln_phi(z) + g(z)).collect();
        let m = logs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let a = m + (h * logs.iter().map(|l| (l - m).exp()).sum::<f64>()).ln();
        if a > 1e-3 {
            return a;
        }
        let a_minus_1: f64 = h * zs
            .iter()
            .map(|&z| {
                let gz = alpha * (q * u(z).exp_m1()).ln_1p();
                let mag = if gz > 0.0 { log_expm1(gz) } else { (-gz.exp_m1()).ln() };
                gz.signum() * (ln_phi(z) + mag).exp()
            })
            .sum::<f64>();
        a_minus_1.ln_1p()
    }

    #[test]
    fn log_erfc_is_continuous_where_the_asymptotic_series_takes_over() {
        let (below, above) = (log_erfc(25.0 - 1e-9), log_erfc(25.0));
        assert!((below - above).abs() < 1e-7 * 2.0 * 25.0, "{below} vs {above}");
        // exp(-x^2) / (x sqrt(pi)) to leading order, far beyond erfc's range.
        let x = 1e4;
        assert!(close(log_erfc(x), -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln(), 1e-15));
        assert!(close(log_erfc(-3.0), libm::erfc(-3.0).ln(), 1e-15));
    }

    #[test]
    fn edge_cases_have_closed_forms() {
        let orders = default_orders();
        assert!(compute_rdp(0.0, 1.0, 10, &orders).unwrap().iter().all(|&r| r == 0.0));
        assert!(compute_rdp(0.0, 0.0, 10, &orders).unwrap().iter().all(|&r| r == 0.0));
        assert!(compute_rdp(0.3, 1.0, 0, &orders).unwrap().iter().all(|&r| r == 0.0));
        assert!(compute_rdp(0.3, 0.0, 1, &orders).unwrap().iter().all(|&r| r == f64::INFINITY));
        // q = 1: the Gaussian mechanism, alpha / (2 sigma^2) per step.
        for &s in &[0.3, 1.0, 7.5] {
            let rdp = compute_rdp(1.0, s, 3, &orders).unwrap();
            for (&a, &r) in orders.iter().zip(&rdp) {
                assert_eq!(r, a / (2.0 * s * s) * 3.0);
            }
        }
        // The 20th order, q = 1 and sigma = 10: TF Privacy's
        // test_compute_rdp_no_sampling.
        assert!(close(compute_rdp(1.0, 10.0, 1, &[20.0]).unwrap()[0], 0.1, 1e-15));
        let none = epsilon(0.3, 0.0, 1, 1e-5, &orders).unwrap();
        assert_eq!(none, PrivacySpent { epsilon: f64::INFINITY, order: None });
        // Noise so small that 1 / sigma^2 overflows is no noise.
        assert!(compute_rdp(0.3, 1e-200, 1, &[1.5, 2.0]).unwrap().iter().all(|&r| r == f64::INFINITY));
        // q = 1/2 puts the series' split point at 1/2 for any noise, where
        // its terms decay slowest; huge noise still gives a tiny finite RDP.
        for &a in &[1.1, 1.5, 2.5] {
            let r = compute_rdp(0.5, 1e6, 1, &[a]).unwrap()[0];
            assert!(r.is_finite() && r >= 0.0 && r < 1e-12, "order {a}: {r}");
        }
        assert_eq!(epsilon(0.0, 0.0, 1, 1e-5, &orders).unwrap().epsilon, 0.0);
    }

    #[test]
    fn orders_two_and_three_match_their_closed_forms_at_any_q() {
        // K ~ Binomial(alpha, q): A_2 - 1 = q^2 (e^{1/s^2} - 1) and
        // A_3 - 1 = 3 q^2 (1 - q) (e^{1/s^2} - 1) + q^3 (e^{3/s^2} - 1).
        for q in [1e-12_f64, 1e-8, 1e-4, 0.01, 0.3, 0.9] {
            for s in [0.5_f64, 1.0, 4.0, 100.0] {
                let e1 = (1.0 / (s * s)).exp_m1();
                let e3 = (3.0 / (s * s)).exp_m1();
                let want2 = (q * q * e1).ln_1p();
                let want3 = (3.0 * q * q * (1.0 - q) * e1 + q * q * q * e3).ln_1p() / 2.0;
                let got = compute_rdp(q, s, 1, &[2.0, 3.0]).unwrap();
                assert!(close(got[0], want2, 1e-13), "q {q} s {s}: {} vs {want2}", got[0]);
                assert!(close(got[1], want3, 1e-13), "q {q} s {s}: {} vs {want3}", got[1]);
            }
        }
    }

    #[test]
    fn log_a_matches_quadrature() {
        // The first ten are the (q, sigma, order) of test_compute_log_a_equals_mp
        // in tensorflow/privacy tensorflow_privacy/privacy/analysis/rdp_accountant_test.py
        // (also google/differential-privacy python/dp_accounting/dp_accounting/rdp/
        // rdp_privacy_accountant_test.py), checked there against mpmath quadrature.
        let mut cases = vec![
            (1e-7, 0.1, 1.01),
            (1e-6, 0.1, 256.0),
            (1e-5, 0.1, 256.1),
            (1e-6, 1.0, 27.0),
            (1e-4, 1.0, 1.5),
            (1e-3, 1.0, 2.0),
            (0.01, 10.0, 20.0),
            (0.1, 100.0, 20.5),
            (0.99, 0.1, 256.0),
            (0.999, 100.0, 256.1),
        ];
        for &q in &[0.003, 0.04, 0.5, 0.97] {
            for &s in &[0.4, 1.1, 3.0] {
                for &a in &[1.1, 1.5, 2.5, 3.0, 7.3, 12.0, 30.5] {
                    cases.push((q, s, a));
                }
            }
        }
        for (q, s, a) in cases {
            let got = rdp_step(q, s, a) * (a - 1.0);
            let want = log_a_quadrature(q, s, a);
            // The fractional series sums A itself, not A - 1: when A is within
            // 1e-8 of 1, log(A) has an absolute error of a few ulps of 1.
            assert!((got - want).abs() <= 1e-8 * want + 1e-15, "q {q} sigma {s} order {a}: {got} vs quadrature {want}");
        }
    }

    #[test]
    fn published_rdp_values() {
        // tensorflow/privacy tensorflow_privacy/privacy/analysis/rdp_accountant_test.py,
        // test_compute_rdp_scalar: 0.07737 to 5 places.
        assert!((compute_rdp(0.1, 2.0, 10, &[5.0]).unwrap()[0] - 0.07737).abs() < 5e-6);
        // Same file, test_compute_rdp_sequence: within 1e-5.
        let orders = [1.5, 2.5, 5.0, 50.0, 100.0];
        let rdp = compute_rdp(0.01, 2.5, 50, &orders).unwrap();
        for (&got, want) in rdp.iter().zip([0.00065, 0.001085, 0.00218075, 0.023846, 167.416307]) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        // google/differential-privacy python/dp_accounting/dp_accounting/rdp/
        // rdp_privacy_accountant_test.py, test_compute_rdp_poisson_sampled_gaussian,
        // as of commit 0b109e9^ (rtol 1e-4, signed fractional series) ...
        for (&got, want) in rdp.iter().zip([6.5007e-04, 1.0854e-03, 2.1808e-03, 2.3846e-02, 1.6742e+02]) {
            assert!(close(got, want, 1e-4), "{got} vs {want}");
        }
        // ... and since 0b109e9: 9 digits, the same at integer orders, an upper
        // bound at the fractional ones (it sums absolute values).
        for (&got, want) in rdp[2..].iter().zip([2.18075656e-03, 2.38460375e-02, 1.67416308e02]) {
            assert!(close(got, want, 5e-9), "{got} vs {want}");
        }
        assert!(rdp[0] < 6.70579741e-04 && rdp[1] < 1.08548710e-03);
    }

    #[test]
    fn conversion_matches_published_values() {
        // Constant RDP is pure DP; the largest order wins. tensorflow/privacy
        // rdp_accountant_test.py test_get_privacy_spent_check_target_delta and
        // dp_accounting rdp_privacy_accountant_test.py
        // test_compute_epsilon_delta_pure_dp: 1.32783806176 at order 32.
        let orders: Vec<f64> = (2..33).map(f64::from).collect();
        let spent = epsilon_from_rdp(&orders, &vec![1.1; orders.len()], 1e-5).unwrap();
        assert!((spent.epsilon - 1.32783806176).abs() < 5e-8, "{spent:?}");
        assert_eq!(spent.order, Some(32.0));
        // No sampling, sigma = 4.530877117 is (1, 1e-6)-DP on a fine grid of
        // orders (same two files, the Gaussian part of those tests; 7 places).
        let fine: Vec<f64> = (1001..100000).map(|i| 0.001 * i as f64).collect();
        let spent = epsilon(1.0, 4.530877117, 1, 1e-6, &fine).unwrap();
        assert!((spent.epsilon - 1.0).abs() < 5e-8, "{spent:?}");
    }

    #[test]
    fn epsilon_matches_tf_privacy_and_opacus() {
        // tensorflow/privacy tensorflow_privacy/privacy/analysis/
        // compute_dp_sgd_privacy_test.py, test_compute_dp_sgd_privacy, as of
        // commit 93376c9 (before dp_accounting's absolute-value series):
        // (n, batch, noise, epochs, delta) -> (epsilon, order); q = batch / n,
        // steps = ceil(epochs n / batch), assertAlmostEqual (7 places).
        let cases = [
            (60000.0_f64, 150.0, 1.3, 15.0, 1e-5, 0.7242234026109595, 19.0),
            (100000.0, 100.0, 1.0, 30.0, 1e-7, 1.4154988495444845, 13.0),
            (100000000.0, 1024.0, 0.1, 10.0, 1e-7, 5907982.31138195, 1.25),
        ];
        for (n, batch, noise, epochs, delta, want, order) in cases {
            let steps = (epochs * n / batch).ceil() as u64;
            let spent = epsilon(batch / n, noise, steps, delta, &tf_orders()).unwrap();
            assert!(close(spent.epsilon, want, 1e-9), "{spent:?} vs {want}");
            assert_eq!(spent.order, Some(order));
        }
        // pytorch/opacus opacus/tests/accountants_test.py, test_rdp_accountant:
        // q = 0.04, noise 1.5, int(90 / 0.04) = 2250 steps, delta 1e-5, the
        // default orders: 7.32911117143 (7 places).
        let spent = epsilon(0.04, 1.5, 2250, 1e-5, &default_orders()).unwrap();
        assert!((spent.epsilon - 7.32911117143).abs() < 5e-8, "{spent:?}");
    }

    #[test]
    fn default_orders_are_the_usual_list() {
        let orders = default_orders();
        assert_eq!(orders.len(), 99 + 52 + 3);
        assert_eq!((orders[0], orders[98], orders[99], orders[150]), (1.1, 10.9, 12.0, 63.0));
        assert_eq!(&orders[151..], &[128.0, 256.0, 512.0]);
        assert!(orders.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn epsilon_falls_with_noise_and_grows_with_steps() {
        let orders = default_orders();
        for &q in &[1e-4, 0.01, 0.2, 1.0] {
            let sigmas = [1e-3, 0.05, 0.3, 0.7, 1.0, 2.0, 5.0, 20.0, 1e3, 1e6];
            let eps: Vec<f64> = sigmas.iter().map(|&s| epsilon(q, s, 100, 1e-5, &orders).unwrap().epsilon).collect();
            assert!(eps.iter().all(|e| e.is_finite() && *e >= 0.0), "q {q}: {eps:?}");
            assert!(eps.windows(2).all(|w| w[1] <= w[0]), "q {q}: {eps:?}");
            assert!(eps[0] > eps[eps.len() - 1], "q {q}: {eps:?}");
            let by_steps: Vec<f64> =
                [1, 10, 100, 1000, 100000].iter().map(|&t| epsilon(q, 1.0, t, 1e-5, &orders).unwrap().epsilon).collect();
            assert!(by_steps.windows(2).all(|w| w[1] > w[0]), "q {q}: {by_steps:?}");
        }
    }

    #[test]
    fn calibration_round_trips() {
        let orders = default_orders();
        for &(eps, delta, q, steps) in &[(8.0, 1e-5, 0.04, 2250), (1.0, 1e-5, 0.01, 1000), (0.5, 1e-6, 1.0, 1), (3.0, 1e-8, 0.001, 100000)] {
            let s = noise_multiplier(eps, delta, q, steps, &orders).unwrap();
            let got = epsilon(q, s, steps, delta, &orders).unwrap().epsilon;
            assert!(got <= eps && got > 0.99 * eps, "target {eps}: sigma {s} gives {got}");
            let less = s * (1.0 - 10.0 * CALIBRATION_RTOL);
            assert!(epsilon(q, less, steps, delta, &orders).unwrap().epsilon > eps, "target {eps}: sigma {s} is not the smallest");
        }
        // pytorch/opacus opacus/tests/accountants_test.py,
        // test_get_noise_multiplier_rdp_epochs and _steps: 1.416 and 1.3562
        // (4 places) from a search that stops once epsilon is within 0.01 of
        // the target, from above in noise: at least the smallest noise.
        for (steps, theirs) in [(2250, 1.416), (2000, 1.3562)] {
            let s = noise_multiplier(8.0, 1e-5, 0.04, steps, &orders).unwrap();
            assert!(s <= theirs + 5e-5 && s > theirs - 0.01, "{s} vs {theirs}");
            let at_theirs = epsilon(0.04, theirs, steps, 1e-5, &orders).unwrap().epsilon;
            assert!((at_theirs - 8.0).abs() < 0.011, "{at_theirs}");
        }
        assert_eq!(noise_multiplier(1.0, 1e-5, 0.0, 10, &orders).unwrap(), 0.0);
        assert_eq!(noise_multiplier(1.0, 1e-5, 0.5, 0, &orders).unwrap(), 0.0);
    }

    #[test]
    fn bad_inputs_name_the_argument() {
        let o = default_orders();
        let arg = |r: CoreResult<PrivacySpent>| match r {
            Err(CoreError::InvalidArgument(a, _)) => a,
            other => panic!("{other:?}"),
        };
        assert_eq!(arg(epsilon(-0.1, 1.0, 1, 1e-5, &o)), "q");
        assert_eq!(arg(epsilon(1.5, 1.0, 1, 1e-5, &o)), "q");
        assert_eq!(arg(epsilon(f64::NAN, 1.0, 1, 1e-5, &o)), "q");
        assert_eq!(arg(epsilon(0.1, -1.0, 1, 1e-5, &o)), "noise_multiplier");
        assert_eq!(arg(epsilon(0.1, 1.0, 1, 0.0, &o)), "delta");
        assert_eq!(arg(epsilon(0.1, 1.0, 1, 1.0, &o)), "delta");
        assert_eq!(arg(epsilon(0.1, 1.0, 1, 1e-5, &[])), "orders");
        assert_eq!(arg(epsilon(0.1, 1.0, 1, 1e-5, &[1.0])), "orders");
        assert_eq!(arg(epsilon(0.1, 1.0, 1, 1e-5, &[2.0, f64::INFINITY])), "orders");
        assert_eq!(arg(epsilon_from_rdp(&[2.0, 3.0], &[1.0], 1e-5)), "rdp");
        for bad in [0.0, -1.0, f64::INFINITY, f64::NAN] {
            assert!(matches!(noise_multiplier(bad, 1e-5, 0.1, 10, &o), Err(CoreError::InvalidArgument("epsilon", _))));
        }
    }
}
