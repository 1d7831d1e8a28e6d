//! Two-sample Kolmogorov-Smirnov test, matching R's `stats::ks.test`.

use crate::alloc::{try_copy, try_with_capacity};
use crate::error::{invalid, CoreResult};
use crate::parallel::sequential;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alternative {
    TwoSided,
    /// H1: the CDF of x lies below that of y (statistic max(F_y - F_x)).
    Less,
    /// H1: the CDF of x lies above that of y (statistic max(F_x - F_y)).
    Greater,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KsResult {
    pub statistic: f64,
    pub p_value: f64,
    pub exact: bool,
    pub ties: bool,
}

/// Samples larger than this are sorted in parallel.
const PAR_SORT_MIN: usize = 1 << 15;

fn sorted(x: &[f64]) -> CoreResult<Vec<f64>> {
    let mut v = try_copy(x, "a sorted copy of the sample")?;
    let cmp = |a: &f64, b: &f64| a.partial_cmp(b).expect("NaN is removed before sorting");
    if v.len() >= PAR_SORT_MIN && !sequential() {
        v.par_sort_unstable_by(cmp);
    } else {
        v.sort_unstable_by(cmp);
    }
    Ok(v)
}

/// Walks the pooled sample in order. At the end of every run of equal values
/// it reports `(cx * ny - cy * nx)`, the ECDF difference F_x - F_y scaled by
/// nx * ny to an exact integer.
fn scaled_differences(x: &[f64], y: &[f64], mut visit: impl FnMut(i128)) {
    let (nx, ny) = (x.len() as i128, y.len() as i128);
    let (mut i, mut j) = (0usize, 0usize);
    while i < x.len() || j < y.len() {
        let v = match (x.get(i), y.get(j)) {
            (Some(&a), Some(&b)) => a.min(b),
            (Some(&a), None) => a,
            (None, Some(&b)) => b,
            (None, None) => unreachable!(),
        };
        while i < x.len() && x[i] == v {
            i += 1;
        }
        while j < y.len() && y[j] == v {
            j += 1;
        }
        visit(i as i128 * ny - j as i128 * nx);
    }
}

/// R's `pkstwo` (series of the Kolmogorov distribution, tol 1e-6), kept
/// identical so that asymptotic p-values agree with `ks.test` to the digit.
pub fn pkolmogorov(x: f64) -> f64 {
    let tol: f64 = 1e-6;
    if x < 1.0 {
        let k_max = (2.0 - tol.ln()).sqrt() as i64;
        let z = -(std::f64::consts::FRAC_PI_2 * std::f64::consts::FRAC_PI_4) / (x * x);
        let w = x.ln();
        let mut s = 0.0;
        let mut k = 1;
        while k < k_max {
            s += ((k * k) as f64 * z - w).exp();
            k += 2;
        }
        s / (1.0 / (2.0 * std::f64::consts::PI).sqrt())
    } else {
        let z = -2.0 * x * x;
        let mut s = -1.0;
        let mut k = 1.0_f64;
        let mut old = 0.0_f64;
        let mut new = 1.0;
        while (old - new).abs() > tol {
            old = new;
            new += 2.0 * s * (z * k * k).exp();
            s *= -1.0;
            k += 1.0;
        }
        new
    }
}

/// Exact P(D < d_obs) under H0 by counting lattice paths, as R's `psmirnov`:
/// the constraint is checked only where the pooled sample changes value
/// (`boundary[k]`), which handles ties. Counts are rescaled as they grow.
fn exact_lower_tail(nx: usize, ny: usize, d_scaled: i128, boundary: &[bool], two_sided: bool) -> f64 {
    let n = nx + ny;
    let (nxi, nyi) = (nx as i128, ny as i128);
    let mut diag = vec![1.0_f64];
    let mut u_min = 0usize;
    let mut log_scale = 0.0_f64;
    for k in 1..=n {
        let new_min = k.saturating_sub(ny);
        let new_max = k.min(nx);
        let mut next = vec![0.0; new_max - new_min + 1];
        for (idx, slot) in next.iter_mut().enumerate() {
            let u = new_min + idx;
            // From (u, v - 1): same u, previous diagonal.
            let same = u.checked_sub(u_min).and_then(|p| diag.get(p)).copied().unwrap_or(0.0);
            // From (u - 1, v).
            let from_x = if u >= 1 {
                (u - 1).checked_sub(u_min).and_then(|p| diag.get(p)).copied().unwrap_or(0.0)
            } else {
                0.0
            };
            let mut val = same + from_x;
            if boundary[k - 1] {
                let v = (k - u) as i128;
                let t = u as i128 * nyi - v * nxi;
                let t = if two_sided { t.abs() } else { t };
                if t >= d_scaled {
                    val = 0.0;
                }
            }
            *slot = val;
        }
        let max = next.iter().copied().fold(0.0, f64::max);
        if max > 1e200 {
            next.iter_mut().for_each(|v| *v *= 1e-200);
            log_scale += 200.0 * std::f64::consts::LN_10;
        }
        diag = next;
        u_min = new_min;
    }
    let count = diag[nx - u_min];
    if count == 0.0 {
        return 0.0;
    }
    let log_denom = libm::lgamma(n as f64 + 1.0) - libm::lgamma(nx as f64 + 1.0) - libm::lgamma(ny as f64 + 1.0);
    (count.ln() + log_scale - log_denom).exp()
}

/// Two-sample KS test. `exact = None` chooses as R 4.2 does: exact when
/// nx * ny < 10000 (ties allowed). NaN must be removed by the caller.
pub fn ks_two_sample(x: &[f64], y: &[f64], alternative: Alternative, exact: Option<bool>) -> CoreResult<KsResult> {
    if x.is_empty() {
        return invalid("x", "needs at least one non-missing value");
    }
    if y.is_empty() {
        return invalid("y", "needs at least one non-missing value");
    }
    if x.iter().chain(y).any(|v| v.is_nan()) {
        return invalid("x", "must not contain NaN");
    }
    let (xs, ys) = if sequential() { (sorted(x), sorted(y)) } else { rayon::join(|| sorted(x), || sorted(y)) };
    let (xs, ys) = (xs?, ys?);
    let (nx, ny) = (xs.len(), ys.len());
    let (mut d_plus, mut d_minus) = (0i128, 0i128);
    let mut groups = 0usize;
    scaled_differences(&xs, &ys, |t| {
        d_plus = d_plus.max(t);
        d_minus = d_minus.max(-t);
        groups += 1;
    });
    let ties = groups < nx + ny;
    let d_scaled = match alternative {
        Alternative::TwoSided => d_plus.max(d_minus),
        Alternative::Greater => d_plus,
        Alternative::Less => d_minus,
    };
    let scale = nx as f64 * ny as f64;
    let statistic = d_scaled as f64 / scale;
    let exact = exact.unwrap_or(scale < 10_000.0);
    let p_value = if exact {
        let mut pooled = try_with_capacity(nx + ny, "the pooled sample")?;
        pooled.extend(xs.iter().chain(&ys).copied());
        pooled.sort_unstable_by(|a, b| a.partial_cmp(b).unwrap());
        let boundary: Vec<bool> = (0..pooled.len())
            .map(|k| k + 1 == pooled.len() || pooled[k] != pooled[k + 1])
            .collect();
        1.0 - exact_lower_tail(nx, ny, d_scaled, &boundary, alternative == Alternative::TwoSided)
    } else {
        let n = scale / (nx + ny) as f64;
        match alternative {
            Alternative::TwoSided if statistic < f64::EPSILON => 1.0,
            Alternative::TwoSided => 1.0 - pkolmogorov(n.sqrt() * statistic),
            _ => (-2.0 * n * statistic * statistic).exp(),
        }
    };
    Ok(KsResult { statistic, p_value: p_value.clamp(0.0, 1.0), exact, ties })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistic_by_hand() {
        let r = ks_two_sample(&[1.0, 2.0, 3.0], &[4.0, 5.0], Alternative::TwoSided, None).unwrap();
        assert_eq!(r.statistic, 1.0);
        // All 3 x below both y: one of choose(5, 2) = 10 orderings, two-sided doubles it.
        assert!((r.p_value - 0.2).abs() < 1e-12, "{}", r.p_value);
        assert!(r.exact && !r.ties);
    }

    #[test]
    fn identical_samples_have_d_zero_and_p_one() {
        let r = ks_two_sample(&[1.0, 2.0], &[1.0, 2.0], Alternative::TwoSided, None).unwrap();
        assert_eq!(r.statistic, 0.0);
        assert_eq!(r.p_value, 1.0);
        assert!(r.ties);
    }

    #[test]
    fn kolmogorov_limit_known_values() {
        // P(K <= 1.36) ~ 0.95, P(K <= 1.63) ~ 0.99 (standard critical values).
        assert!((pkolmogorov(1.358) - 0.95).abs() < 1e-3);
        assert!((pkolmogorov(1.628) - 0.99).abs() < 1e-3);
    }

    #[test]
    fn rejects_empty_and_nan() {
        assert!(ks_two_sample(&[], &[1.0], Alternative::TwoSided, None).is_err());
        assert!(ks_two_sample(&[1.0], &[f64::NAN], Alternative::TwoSided, None).is_err());
    }
}
