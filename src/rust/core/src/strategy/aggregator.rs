//! How a round's kept updates become its pseudo-gradient D: the fold rule
//! of the weighted mean (`FoldRule`), or a robust rule (`Aggregator`) and
//! its dispatch to the kernels of `robust`.

use crate::error::{invalid, CoreResult};
use crate::robust;
use crate::updates::UpdateSet;

/// How the updates are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoldRule {
    /// `D = sum_i p_i Delta_i`, `p_i = w_i / sum w`.
    Mean,
    /// FedNova: `D = (sum_i p_i a_i) sum_i p_i Delta_i / a_i`, every update
    /// normalised by its effective number of steps a_i.
    Normalized,
    /// `D = sum_i w_i Delta_i / n` over a count fixed in advance, whatever
    /// the weights: FedBuff's buffer of K staleness-weighted updates.
    SumOver(usize),
}

/// How the kept updates are combined into D.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Aggregator {
    /// The fold of `fold`: `sum_i p_i Delta_i` (FedNova: normalised).
    #[default]
    Weighted,
    /// Coordinate-wise median (weights ignored).
    Median,
    /// Coordinate-wise trimmed mean (weights ignored).
    TrimmedMean { trim: f64 },
    /// Krum: the update with the best score (`f`: `None` = the largest
    /// with 2f + 2 < K).
    Krum { f: Option<usize> },
    /// Multi-Krum: the weighted mean of the `m` best (`None` = K - f).
    MultiKrum { f: Option<usize>, m: Option<usize> },
    /// Weighted geometric median (smoothed Weiszfeld).
    GeometricMedian { tol: f64, max_iter: usize },
    /// Bulyan (`f`: `None` = the largest with K >= 4f + 3; weights ignored).
    Bulyan { f: Option<usize> },
}

impl Aggregator {
    pub fn is_robust(&self) -> bool {
        *self != Aggregator::Weighted
    }

    /// Whether the rule picks clients (reported as `selected`).
    pub fn selects(&self) -> bool {
        matches!(self, Aggregator::Krum { .. } | Aggregator::MultiKrum { .. } | Aggregator::Bulyan { .. })
    }

    pub(crate) fn check(&self) -> CoreResult<()> {
        match *self {
            Aggregator::TrimmedMean { trim } if !(0.0..0.5).contains(&trim) => invalid("aggregator", format!("`trim` = {trim} is not in [0, 0.5)")),
            Aggregator::MultiKrum { m: Some(0), .. } => invalid("aggregator", "`m` must be at least 1"),
            Aggregator::GeometricMedian { tol, .. } if !(tol.is_finite() && tol > 0.0) => {
                invalid("aggregator", format!("`tol` = {tol} is not a finite number > 0"))
            }
            Aggregator::GeometricMedian { max_iter: 0, .. } => invalid("aggregator", "`max_iter` must be at least 1"),
            _ => Ok(()),
        }
    }
}

/// The largest f Krum allows among `k` clients (2f + 2 < K); 0 below 3
/// clients, where Krum itself reports the problem.
pub fn krum_max_f(k: usize) -> usize {
    k.saturating_sub(3) / 2
}

/// A robust rule of `robust` on `updates` (one layer each), with its picks
/// (0-based, among `updates`) for the rules that pick.
pub fn robust_aggregate(rule: Aggregator, updates: Vec<&[f64]>, weights: &[f64]) -> CoreResult<(Vec<f64>, Option<Vec<usize>>)> {
    let n = updates.len();
    let set = UpdateSet::from_vectors(updates)?;
    let one = |mut layers: Vec<Vec<f64>>| layers.swap_remove(0);
    Ok(match rule {
        Aggregator::Weighted => return invalid("aggregator", "\"weighted\" is not a robust rule"),
        Aggregator::Median => (one(robust::coordinate_median(&set)?), None),
        Aggregator::TrimmedMean { trim } => (one(robust::trimmed_mean(&set, trim)?), None),
        Aggregator::Krum { f } => {
            let r = robust::multi_krum(&set, f.unwrap_or(krum_max_f(n)), 1, None)?;
            (one(r.aggregate), Some(r.selected))
        }
        Aggregator::MultiKrum { f, m } => {
            let f = f.unwrap_or(krum_max_f(n));
            let r = robust::multi_krum(&set, f, m.unwrap_or(n.saturating_sub(f)), Some(weights))?;
            (one(r.aggregate), Some(r.selected))
        }
        Aggregator::GeometricMedian { tol, max_iter } => (one(robust::geometric_median(&set, Some(weights), tol, max_iter)?.aggregate), None),
        Aggregator::Bulyan { f } => {
            let Some(f) = f.or(robust::bulyan_max_f(n)) else {
                return invalid("f", format!("Bulyan needs K >= 4f + 3 clients (K = {n})"));
            };
            let r = robust::bulyan(&set, f)?;
            (one(r.aggregate), Some(r.selected))
        }
    })
}

