//! A round's per-update steps, in two halves:
//!
//! * the clients' half (`RoundTransforms::client(k)`, run by `encode`):
//!   local DP, a simulated attack, compression with its residual. A client
//!   does this before it sends its update;
//! * the server's half (`RoundTransforms::guard`), on each update as
//!   received: the L2 norm (the round's `client_norms`), then clipping when
//!   no filter comes first; with a filter, the filter on every client's
//!   norms and then clipping of the kept updates happen in `fold`.
//!
//! Then `aggregator` combines the kept updates (the weighted fold of
//! `fold`, or a robust rule) and central DP noise is added to the sum.
//! A simulated round (`train::run_round`) runs both halves for each client
//! (`client::fit` encodes, then `guard`); the server's fold of updates
//! received from elsewhere (`fold_round_with`) runs only the server's.
//!
//! All off (`RoundTransforms::NONE`) is the plain fold: the same code runs,
//! with the same numbers and the same memory.
//!
//! What a round reports with transforms on:
//! * `kept`, `filter_reasons` per client (all kept, "" without a filter);
//!   `clipped` per client with clipping (`None` for a dropped client);
//!   `selected` per client for Krum, Multi-Krum and Bulyan.
//! * `client_norms`: whenever a filter, clipping or the diagnostics need
//!   them (NaN otherwise), each computed with `norms::l2_norm` on its own.
//!   The plain fold's diagnostics sum squares in blocks of
//!   `reduction_block(K)`, so for updates longer than such a block the two
//!   can differ in the last bit.
//! * Diagnostics: the norm mean and sd over all K clients; the cosines (NaN
//!   for dropped clients) and the gradient diversity over the updates that
//!   entered the aggregator (kept, clipped), against the final D (noise
//!   included).
//!
//! Memory: every update is kept until the end of the round (K x d) when a
//! filter or a robust aggregator needs them all, or with diagnostics; else
//! (clipping, noise) each is folded as it comes and memory stays at d plus
//! the updates of the clients in flight.
//!
//! Every step is per client or per fixed block of coordinates, and the
//! random numbers come from streams fixed by (seed, client, block), so the
//! results do not depend on the number of threads.

use std::borrow::Cow;


use crate::error::{invalid, num, CoreError, CoreResult};
use crate::norms::{clip_factor, clip_layers, l2_norm};
use crate::strategy::aggregator::{Aggregator, FoldRule};
use crate::strategy::encode::{Attack, ClientEncoding, Compression, LocalNoise};



/// Lengths of consecutive layers of the flat parameter vector; `None` is one
/// layer, the whole vector.
fn check_layers(layers: Option<&[usize]>, d: usize, arg: &'static str) -> CoreResult<()> {
    if let Some(sizes) = layers {
        if sizes.is_empty() {
            return invalid(arg, "`layer_sizes` has no layers");
        }
        let total = sizes.iter().try_fold(0usize, |a, &n| a.checked_add(n));
        if total != Some(d) {
            return invalid(arg, format!("`layer_sizes` sum to {}, the model has {d} parameters", sizes.iter().map(|&n| n as f64).sum::<f64>()));
        }
    }
    Ok(())
}

/// The layers of `x` as consecutive slices.
fn split_layers<'x>(x: &'x [f64], layers: Option<&[usize]>) -> Vec<&'x [f64]> {
    match layers {
        None => vec![x],
        Some(sizes) => {
            let mut out = Vec::with_capacity(sizes.len());
            let mut start = 0;
            for &n in sizes {
                out.push(&x[start..start + n]);
                start += n;
            }
            out
        }
    }
}

/// Drops updates whose norm is too large.
///
/// A client is dropped when its L2 norm exceeds `max_norm`, or exceeds
/// `median + mad * MAD` of the norms of the round's clients, where MAD is
/// the unscaled median absolute deviation `median(|n_i - median(n)|)` (no
/// 1.4826 factor) and the median of an even number of values is the mean of
/// the two middle ones. With `per_layer` every layer (lengths
/// `layer_sizes`, `None` = one layer) is judged on its own norm and
/// thresholds, and a client is dropped when any layer fails.
#[derive(Clone, Debug, PartialEq)]
pub struct NormFilter {
    pub max_norm: Option<f64>,
    pub mad: Option<f64>,
    pub per_layer: bool,
    pub layer_sizes: Option<Vec<usize>>,
}

impl NormFilter {
    fn layers(&self) -> Option<&[usize]> {
        split_by(self.per_layer, &self.layer_sizes)
    }

    fn check(&self, d: usize) -> CoreResult<()> {
        if let Some(m) = self.max_norm.filter(|m| !(m.is_finite() && *m > 0.0)) {
            return invalid("filter", format!("`max_norm` = {m} is not a finite number > 0"));
        }
        if let Some(m) = self.mad.filter(|m| !(m.is_finite() && *m >= 0.0)) {
            return invalid("filter", format!("`mad` = {m} is not a finite number >= 0"));
        }
        check_layers(self.layers(), d, "filter")
    }

    /// Per client: kept, and the reason when not. `norms[i]` are client i's
    /// norms, one per layer (or one in total).
    pub fn decide(&self, norms: &[Vec<f64>]) -> (Vec<bool>, Vec<String>) {
        let k = norms.len();
        let n_layers = norms.first().map_or(0, |n| n.len());
        let thresholds: Vec<Option<f64>> = (0..n_layers)
            .map(|l| {
                self.mad.map(|m| {
                    let mut column: Vec<f64> = norms.iter().map(|n| n[l]).collect();
                    let (median, mad) = median_and_mad(&mut column);
                    median + m * mad
                })
            })
            .collect();
        let mut kept = vec![true; k];
        let mut reasons = vec![String::new(); k];
        for (i, client) in norms.iter().enumerate() {
            let what = |l: usize| if self.per_layer { format!("layer {} norm", l + 1) } else { "norm".to_string() };
            let reason = client.iter().enumerate().find_map(|(l, &n)| {
                if let Some(max) = self.max_norm.filter(|max| n > *max) {
                    return Some(format!("{} {} > max_norm {}", what(l), num(n), num(max)));
                }
                match thresholds[l] {
                    Some(t) if n > t => {
                        Some(format!("{} {} > median + {} MAD ({})", what(l), num(n), num(self.mad.unwrap_or(0.0)), num(t)))
                    }
                    _ => None,
                }
            });
            if let Some(r) = reason {
                kept[i] = false;
                reasons[i] = r;
            }
        }
        (kept, reasons)
    }
}

/// Median of `x` (mean of the two middle values when even) and the unscaled
/// median absolute deviation `median(|x - median(x)|)`. Sorts `x`.
pub fn median_and_mad(x: &mut [f64]) -> (f64, f64) {
    fn median_sorted(v: &[f64]) -> f64 {
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    let cmp = |a: &f64, b: &f64| a.total_cmp(b);
    x.sort_by(cmp);
    let median = median_sorted(x);
    let mut deviations: Vec<f64> = x.iter().map(|v| (v - median).abs()).collect();
    deviations.sort_by(cmp);
    (median, median_sorted(&deviations))
}

/// Norm clipping of the kept updates.
///
/// Whole: the update is scaled to norm `max_norm` when its norm exceeds it.
/// Per layer (`per_layer`, layers of lengths `layer_sizes`, `None` = one):
/// each of the L layers is clipped on its own to `max_norm / sqrt(L)`, an
/// equal split of the budget (as TensorFlow Federated and Flower do), so the
/// whole update's norm stays within `max_norm`. Updates within the bound are
/// left as they are, bit for bit.
#[derive(Clone, Debug, PartialEq)]
pub struct Clip {
    pub max_norm: f64,
    pub per_layer: bool,
    pub layer_sizes: Option<Vec<usize>>,
}

impl Clip {
    fn layers(&self) -> Option<&[usize]> {
        split_by(self.per_layer, &self.layer_sizes)
    }

    fn check(&self, d: usize) -> CoreResult<()> {
        if !(self.max_norm.is_finite() && self.max_norm > 0.0) {
            return invalid("clip", format!("`max_norm` = {} is not a finite number > 0", self.max_norm));
        }
        check_layers(self.layers(), d, "clip")
    }

    /// The bound on each clipped part: the whole update, or each layer.
    pub fn bound(&self) -> f64 {
        if self.per_layer {
            let n_layers = self.layer_sizes.as_ref().map_or(1, |s| s.len());
            self.max_norm / (n_layers as f64).sqrt()
        } else {
            self.max_norm
        }
    }

    /// Clips `update` (whose whole norm is `norm`) in place; true when a
    /// norm exceeded its bound.
    pub fn apply(&self, update: &mut Cow<'_, [f64]>, norm: f64, what: &str) -> CoreResult<bool> {
        let bound = self.bound();
        if !self.per_layer {
            return clip_part(update, 0..update.len(), norm, bound, what);
        }
        let mut clipped = false;
        let mut start = 0;
        let sizes: Vec<usize> = match &self.layer_sizes {
            Some(s) => s.clone(),
            None => vec![update.len()],
        };
        for n in sizes {
            let range = start..start + n;
            start += n;
            let norm = l2_norm(&update[range.clone()]);
            clipped |= clip_part(update, range, norm, bound, what)?;
        }
        Ok(clipped)
    }
}

/// Scales `update[range]` (norm `norm`) to norm `bound` if it exceeds it,
/// by `v * (bound / norm)` as `norms::clip_layers` does; where that factor
/// is not a normal number (a norm beyond the double range) `clip_layers`
/// itself does the work.
fn clip_part(update: &mut Cow<'_, [f64]>, range: std::ops::Range<usize>, norm: f64, bound: f64, what: &str) -> CoreResult<bool> {
    if norm <= bound {
        return Ok(false);
    }
    let factor = clip_factor(norm, bound);
    let values = owned(update, what)?;
    let part = &mut values[range];
    if factor >= f64::MIN_POSITIVE {
        part.iter_mut().for_each(|v| *v *= factor);
    } else {
        let (clipped, _) = clip_layers(&[&*part], bound, false)?;
        part.copy_from_slice(&clipped[0]);
    }
    Ok(true)
}

/// The update as a mutable buffer, copied (with a checked allocation) when
/// borrowed.
fn owned<'u>(update: &'u mut Cow<'_, [f64]>, what: &str) -> CoreResult<&'u mut Vec<f64>> {
    crate::alloc::make_owned(update, what)
}


/// Central DP noise (McMahan et al. 2018, DP-FedAvg):
/// `D = (sum_i w_i Delta_i + N(0, sd^2 I)) / denominator` over the kept
/// clients, with the weights as given (not normalised: DP-FedAvg sends
/// w_i = 1 and the expected number of clients as the denominator). The noise
/// comes from `privacy::add_noise_in_place` with `seed`: streams fixed by
/// (seed, block of coordinates).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CentralNoise {
    pub sd: f64,
    pub seed: u64,
    pub denominator: f64,
}


/// Everything the server does to a round's updates besides folding them.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundTransforms {
    /// Applied by every client before it sends its update.
    pub local_noise: Option<LocalNoise>,
    /// How every client encodes what it sends (after local DP and any
    /// simulated attack): the server folds the decoded updates.
    pub compression: Option<Compression>,
    /// Error feedback: each client's residual from its last round (empty:
    /// none; else one entry per client of the round).
    pub residuals: Vec<Option<Vec<f64>>>,
    /// Empty: no attacks; else one entry per client of the round.
    pub attacks: Vec<Option<Attack>>,
    pub attack_seed: u64,
    pub filter: Option<NormFilter>,
    pub clip: Option<Clip>,
    pub aggregator: Aggregator,
    pub noise: Option<CentralNoise>,
}

/// No transforms at all: the plain fold.
pub static NO_TRANSFORMS: RoundTransforms = RoundTransforms::NONE;

impl Default for RoundTransforms {
    fn default() -> Self {
        RoundTransforms::NONE
    }
}

/// The layer lengths a per-layer rule splits an update by (None: the whole
/// update), shared by the filter and the clipping.
fn split_by(per_layer: bool, layer_sizes: &Option<Vec<usize>>) -> Option<&[usize]> {
    if per_layer {
        layer_sizes.as_deref()
    } else {
        None
    }
}

/// A client's update after the server's per-client steps, ready to be folded.
pub struct Prepared<'a> {
    pub update: Cow<'a, [f64]>,
    /// Whole L2 norm as received, before clipping (NaN when not needed).
    pub norm: f64,
    /// The filter's norms (per layer, or the whole norm), empty without filter.
    pub filter_norms: Vec<f64>,
    /// Clipped already (no filter); `None` when clipping comes later or not at all.
    pub clipped: Option<bool>,
}

impl RoundTransforms {
    pub const NONE: RoundTransforms = RoundTransforms {
        local_noise: None,
        compression: None,
        residuals: Vec::new(),
        attacks: Vec::new(),
        attack_seed: 0,
        filter: None,
        clip: None,
        aggregator: Aggregator::Weighted,
        noise: None,
    };

    /// True when nothing is to be done: the plain fold.
    pub fn is_none(&self) -> bool {
        self.encodes_nothing() && self.guards_nothing()
    }

    /// No client encodes its update (local DP, attacks, compression).
    pub fn encodes_nothing(&self) -> bool {
        self.local_noise.is_none() && self.compression.is_none() && self.attacks.iter().all(Option::is_none)
    }

    /// The server folds the updates as received: no filter, clipping,
    /// robust aggregator or noise.
    pub fn guards_nothing(&self) -> bool {
        self.filter.is_none() && self.clip.is_none() && self.aggregator == Aggregator::Weighted && self.noise.is_none()
    }

    /// Whether every update must be kept until the end of the round.
    pub fn keeps_updates(&self) -> bool {
        self.filter.is_some() || self.aggregator.is_robust()
    }

    /// Client `k`'s half (the `k`-th of the round): how it encodes its
    /// update before sending it, drawing from its stream `k`.
    pub fn client(&self, k: usize) -> ClientEncoding<'_> {
        self.client_on(k, k as u64)
    }

    /// Client `k`'s half drawing from its own stream `stream`: the stream
    /// of its training (its node's number; FedBuff: its dispatch).
    pub fn client_on(&self, k: usize, stream: u64) -> ClientEncoding<'_> {
        ClientEncoding {
            local_noise: self.local_noise,
            attack: self.attacks.get(k).copied().flatten(),
            attack_seed: self.attack_seed,
            compression: self.compression,
            residual: self.residuals.get(k).and_then(|r| r.as_deref()),
            stream,
            client: k,
        }
    }

    /// Checks the settings for a round of `n_clients` updates of `d` values
    /// folded by `rule`: the clients' encodings and the server's steps.
    pub fn check(&self, d: usize, n_clients: usize, rule: FoldRule) -> CoreResult<()> {
        self.check_encodings(d, n_clients)?;
        self.check_guard(d, rule)
    }

    /// Checks the clients' half for a round of `n_clients` updates of `d` values.
    pub fn check_encodings(&self, d: usize, n_clients: usize) -> CoreResult<()> {
        if !self.attacks.is_empty() && self.attacks.len() != n_clients {
            return invalid("attacks", format!("has {} elements for {n_clients} clients", self.attacks.len()));
        }
        if !self.residuals.is_empty() && self.residuals.len() != n_clients {
            return invalid("residuals", format!("has {} elements for {n_clients} clients", self.residuals.len()));
        }
        (0..n_clients).try_for_each(|k| self.client(k).check(d))
    }

    /// Checks the server's half for updates of `d` values folded by `rule`.
    pub fn check_guard(&self, d: usize, rule: FoldRule) -> CoreResult<()> {
        if let Some(f) = &self.filter {
            f.check(d)?;
        }
        if let Some(c) = &self.clip {
            c.check(d)?;
        }
        self.aggregator.check()?;
        if rule == FoldRule::Normalized && self.aggregator.is_robust() {
            return invalid("aggregator", "FedNova's normalised fold cannot be combined with a robust aggregator");
        }
        if let Some(n) = &self.noise {
            if !(n.sd.is_finite() && n.sd >= 0.0) {
                return invalid("noise", format!("`sd` = {} is not a finite number >= 0", n.sd));
            }
            if !(n.denominator.is_finite() && n.denominator > 0.0) {
                return invalid("noise", format!("`denominator` = {} is not a finite number > 0", n.denominator));
            }
            if self.aggregator.is_robust() {
                return invalid("noise", "central DP noise needs the \"weighted\" aggregator");
            }
            if rule != FoldRule::Mean {
                return invalid("noise", "central DP noise is defined for the mean of the updates, not FedNova's or FedBuff's folds");
            }
        }
        Ok(())
    }

    /// The server's per-client steps on client `k`'s update as received:
    /// the check every update gets, the norms and, when no filter comes
    /// first, the clipping. `norms` asks for the whole norm even when
    /// neither the filter nor the clipping needs it (diagnostics).
    pub fn guard<'a>(&self, k: usize, d: usize, update: Cow<'a, [f64]>, norms: bool) -> CoreResult<Prepared<'a>> {
        check_update(k, d, &update)?;
        let mut update = update;
        let norm = if norms || self.filter.is_some() || self.clip.is_some() { l2_norm(&update) } else { f64::NAN };
        let filter_norms = match &self.filter {
            None => Vec::new(),
            Some(f) if !f.per_layer => vec![norm],
            Some(f) => split_layers(&update, f.layers()).into_iter().map(l2_norm).collect(),
        };
        let clipped = match (&self.clip, &self.filter) {
            (Some(c), None) => Some(c.apply(&mut update, norm, "a clipped client update").map_err(|e| in_client(k, e))?),
            _ => None,
        };
        Ok(Prepared { update, norm, filter_norms, clipped })
    }
}

/// An update's length and values, checked as the fold always did.
pub(crate) fn check_update(k: usize, d: usize, update: &[f64]) -> CoreResult<()> {
    if update.len() != d {
        return Err(CoreError::Client(k, format!("has an update of {} values, the model has {d}", update.len())));
    }
    if let Some(i) = update.iter().position(|v| !v.is_finite()) {
        return Err(CoreError::ClientDiverged(k, format!("returned a non-finite value ({}) at position {}", update[i], i + 1)));
    }
    Ok(())
}



/// An error of the transforms of client `k`'s update, attributed to it.
fn in_client(k: usize, e: CoreError) -> CoreError {
    match e {
        CoreError::InvalidArgument(arg, msg) => CoreError::Client(k, format!("`{arg}` {msg}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::strategy::encode::{gaussian_fill, ATTACK_BLOCK, ATTACK_STREAM_TAG};
    use crate::parallel::with_threads;
    use crate::robust;
    use crate::strategy::{fold_round, fold_round_with, RoundUpdate, ServerOptimizer, ServerStep};
    use crate::updates::UpdateSet;

    const SGD: ServerStep<'static> = ServerStep { optimizer: ServerOptimizer::Sgd { lr: 1.0, momentum: 0.0 }, m: None, v: None };

    fn random_updates(k: usize, d: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = Rng::new(seed, 9);
        (0..k).map(|i| (0..d).map(|_| (1.0 + i as f64 * 0.3) * rng.normal()).collect()).collect()
    }

    fn refs(ups: &[Vec<f64>]) -> Vec<&[f64]> {
        ups.iter().map(|u| u.as_slice()).collect()
    }

    fn with(t: RoundTransforms) -> RoundTransforms {
        t
    }

    /// A round of `ups` with weights `w` and `t`, server SGD(1, 0).
    /// The clients' half of `t` on each update, then the server's half and
    /// the fold, as the two sides of a round run them.
    fn round(ups: &[Vec<f64>], w: &[f64], t: &RoundTransforms, diagnostics: bool, threads: usize) -> CoreResult<RoundUpdate> {
        let global = vec![0.0; ups[0].len()];
        t.check_encodings(ups[0].len(), ups.len())?;
        let sent = with_threads(threads, || {
            (0..ups.len()).map(|k| t.client(k).encode(Cow::Borrowed(&ups[k])).map(|(u, _)| u.into_owned())).collect::<CoreResult<Vec<_>>>()
        })?;
        let server = RoundTransforms { local_noise: None, compression: None, residuals: Vec::new(), attacks: Vec::new(), attack_seed: 0, ..t.clone() };
        fold_round_with(&global, &refs(&sent), w, None, FoldRule::Mean, &SGD, diagnostics, &server, threads)
    }

    /// Client `k`'s update through both halves: its encoding, then the
    /// server's steps (no diagnostics).
    fn prepared(t: &RoundTransforms, k: usize, u: &[f64]) -> Vec<f64> {
        let (sent, _) = t.client(k).encode(Cow::Borrowed(u)).unwrap();
        t.guard(k, u.len(), sent, false).unwrap().update.into_owned()
    }

    fn norm(x: &[f64]) -> f64 {
        x.iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    /// Bitwise equality of two rounds, NaN included (Debug prints every
    /// double so that it reads back exactly).
    fn same(a: &RoundUpdate, b: &RoundUpdate) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    #[test]
    fn median_and_mad_by_hand() {
        // Median 3; deviations 2, 1, 0, 1, 97: MAD 1.
        assert_eq!(median_and_mad(&mut [1.0, 2.0, 3.0, 4.0, 100.0]), (3.0, 1.0));
        // Even: median (2 + 4) / 2 = 3; deviations 2, 1, 1, 5: MAD (1 + 2) / 2.
        assert_eq!(median_and_mad(&mut [4.0, 1.0, 8.0, 2.0]), (3.0, 1.5));
    }

    #[test]
    fn each_attack_changes_the_update_as_defined() {
        let ups = random_updates(4, 10, 1);
        let attacks = vec![
            Some(Attack::SignFlip { scale: 2.5 }),
            Some(Attack::Scale { factor: -7.0 }),
            Some(Attack::SameValue { value: 0.125 }),
            None,
        ];
        let t = RoundTransforms { attacks, ..RoundTransforms::NONE };
        let got: Vec<Vec<f64>> = (0..4).map(|k| prepared(&t, k, &ups[k])).collect();
        assert_eq!(got[0], ups[0].iter().map(|v| -2.5 * v).collect::<Vec<_>>());
        assert_eq!(got[1], ups[1].iter().map(|v| -7.0 * v).collect::<Vec<_>>());
        assert_eq!(got[2], vec![0.125; 10]);
        assert_eq!(got[3], ups[3]);
        // The round folds what the attacks made of the updates.
        let w = [1.0, 2.0, 3.0, 4.0];
        let attacked = round(&ups, &w, &t, true, 1).unwrap();
        let by_hand = fold_round(&[0.0; 10], &refs(&got), &w, None, FoldRule::Mean, &SGD, true, 1).unwrap();
        assert_eq!(attacked.aggregate, by_hand.aggregate);
        assert_eq!(attacked.cosines, by_hand.cosines);
        // Norms are those of the attacked updates.
        for (n, g) in attacked.client_norms.iter().zip(&got) {
            assert!((n - norm(g)).abs() <= 1e-14 * norm(g));
        }
        // An attack on an unattacked round's client count is an input error.
        let short = RoundTransforms { attacks: vec![None, Some(Attack::Scale { factor: 2.0 })], ..RoundTransforms::NONE };
        assert!(matches!(round(&ups, &w, &short, false, 1), Err(CoreError::InvalidArgument("attacks", _))));
        let bad = RoundTransforms { attacks: vec![None, None, None, Some(Attack::Gaussian { sd: -1.0 })], ..RoundTransforms::NONE };
        assert!(matches!(round(&ups, &w, &bad, false, 1), Err(CoreError::InvalidArgument("attacks", _))));
        // An attack that overflows the update names the client.
        let huge = RoundTransforms { attacks: vec![None, Some(Attack::Scale { factor: 1e308 }), None, None], ..RoundTransforms::NONE };
        assert!(matches!(round(&ups, &w, &huge, false, 1), Err(CoreError::Client(1, _))));
    }

    #[test]
    fn gaussian_attack_is_seeded_and_thread_invariant() {
        let d = 5 * ATTACK_BLOCK + 123;
        let u = vec![1.0; d];
        let t = |seed| RoundTransforms { attacks: vec![None, Some(Attack::Gaussian { sd: 3.0 })], attack_seed: seed, ..RoundTransforms::NONE };
        let (a, b) = (t(11), t(12));
        let one = with_threads(1, || prepared(&a, 1, &u));
        let two = with_threads(2, || prepared(&a, 1, &u));
        assert_eq!(one, two);
        assert_eq!(one, prepared(&a, 1, &vec![-5.0; d]), "the noise replaces the update");
        assert_ne!(one, prepared(&b, 1, &u), "another seed, other noise");
        // Another client's position draws other numbers from the same seed.
        let other_client = RoundTransforms { attacks: vec![Some(Attack::Gaussian { sd: 3.0 }), None], attack_seed: 11, ..RoundTransforms::NONE };
        assert_ne!(one, prepared(&other_client, 0, &u));
        // By definition: sd times the standard normals of the client's streams.
        let mut rng = Rng::new(11, ATTACK_STREAM_TAG ^ (1 << 24) ^ 2);
        let j = 2 * ATTACK_BLOCK;
        assert_eq!(one[j], 3.0 * rng.normal());
        assert_eq!(one[j + 1], 3.0 * rng.normal());
        let mean = one.iter().sum::<f64>() / d as f64;
        let sd = (one.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (d - 1) as f64).sqrt();
        assert!(mean.abs() < 5.0 * 3.0 / (d as f64).sqrt() && (sd - 3.0).abs() < 5.0 * 3.0 / (2.0 * d as f64).sqrt(), "{mean} {sd}");
        // Whole rounds with the attack, on 1 and 2 threads.
        let ups = random_updates(2, d, 4);
        let r1 = round(&ups, &[1.0, 1.0], &a, true, 1).unwrap();
        let r2 = round(&ups, &[1.0, 1.0], &a, true, 2).unwrap();
        assert!(same(&r1, &r2));
    }

    /// Norms 5, 10, 1, 2, 50 in total; per layer (2 + 2 values):
    /// (5, 0), (0, 10), (1, 0), (2, 0), (50, 0).
    fn filter_example() -> Vec<Vec<f64>> {
        vec![
            vec![3.0, 4.0, 0.0, 0.0],
            vec![0.0, 0.0, 6.0, 8.0],
            vec![1.0, 0.0, 0.0, 0.0],
            vec![0.0, 2.0, 0.0, 0.0],
            vec![30.0, 40.0, 0.0, 0.0],
        ]
    }

    fn filter(max_norm: Option<f64>, mad: Option<f64>, per_layer: bool) -> RoundTransforms {
        let layer_sizes = per_layer.then(|| vec![2, 2]);
        RoundTransforms { filter: Some(NormFilter { max_norm, mad, per_layer, layer_sizes }), ..RoundTransforms::NONE }
    }

    #[test]
    fn filter_by_fixed_bound_and_by_median_plus_mad() {
        let ups = filter_example();
        let w = [1.0, 2.0, 3.0, 4.0, 5.0];
        let reasons = |r: &RoundUpdate| r.filter_reasons.clone();
        // Whole norms 5, 10, 1, 2, 50: median 5; deviations 0, 5, 4, 3, 45: MAD 4;
        // median + 3 MAD = 17.
        let r = round(&ups, &w, &filter(None, Some(3.0), false), true, 1).unwrap();
        assert_eq!(r.kept, vec![true, true, true, true, false]);
        assert_eq!(reasons(&r), vec!["", "", "", "", "norm 50 > median + 3 MAD (17)"]);
        // Fixed bound 9: the norms 10 and 50 are dropped; the bound is judged first.
        let r = round(&ups, &w, &filter(Some(9.0), Some(3.0), false), true, 1).unwrap();
        assert_eq!(r.kept, vec![true, false, true, true, false]);
        assert_eq!(reasons(&r)[1], "norm 10 > max_norm 9");
        assert_eq!(reasons(&r)[4], "norm 50 > max_norm 9");
        // D is the weighted mean of the kept clients, as if only they had come.
        let kept: Vec<Vec<f64>> = [0, 2, 3].iter().map(|&i| ups[i].clone()).collect();
        let only = fold_round(&[0.0; 4], &refs(&kept), &[1.0, 3.0, 4.0], None, FoldRule::Mean, &SGD, true, 1).unwrap();
        assert_eq!(r.aggregate, only.aggregate);
        // Dropped clients: NaN cosines, norms still reported.
        assert!(r.cosines[1].is_nan() && r.cosines[4].is_nan() && r.cosines[0].is_finite());
        assert_eq!(r.client_norms, vec![5.0, 10.0, 1.0, 2.0, 50.0]);
        assert_eq!(r.selected, None);
        // Per layer. Layer 1 norms 5, 0, 1, 2, 50: median 2, MAD 2, threshold 8.
        // Layer 2 norms 0, 10, 0, 0, 0: median 0, MAD 0, threshold 0.
        let r = round(&ups, &w, &filter(None, Some(3.0), true), false, 1).unwrap();
        assert_eq!(r.kept, vec![true, false, true, true, false]);
        assert_eq!(reasons(&r)[1], "layer 2 norm 10 > median + 3 MAD (0)");
        assert_eq!(reasons(&r)[4], "layer 1 norm 50 > median + 3 MAD (8)");
        // Without diagnostics the norms the filter used are still reported.
        assert_eq!(r.client_norms, vec![5.0, 10.0, 1.0, 2.0, 50.0]);
        assert!(r.cosines.iter().all(|c| c.is_nan()));
        let r = round(&ups, &w, &filter(Some(4.5), None, true), false, 1).unwrap();
        assert_eq!(r.kept, vec![false, false, true, true, false]);
        assert_eq!(reasons(&r)[0], "layer 1 norm 5 > max_norm 4.5");
        assert_eq!(reasons(&r)[1], "layer 2 norm 10 > max_norm 4.5");
        // The whole filter with the same bound keeps client 0? No: its norm is 5 too.
        let r = round(&ups, &w, &filter(Some(5.5), None, false), false, 1).unwrap();
        assert_eq!(r.kept, vec![true, false, true, true, false]);
        // Nobody left: a client error of no client in particular.
        let err = round(&ups, &w, &filter(Some(0.5), None, false), false, 1).unwrap_err();
        assert!(crate::strategy::fold::is_all_filtered(&err), "{err}");
        assert_eq!(err.kind(), "client");
        assert!(err.to_string().contains("every client was filtered out"), "{err}");
        // Layer sizes must cover the update.
        let bad = RoundTransforms {
            filter: Some(NormFilter { max_norm: Some(1.0), mad: None, per_layer: true, layer_sizes: Some(vec![2, 3]) }),
            ..RoundTransforms::NONE
        };
        assert!(matches!(round(&ups, &w, &bad, false, 1), Err(CoreError::InvalidArgument("filter", _))));
    }

    #[test]
    fn clipping_whole_and_per_layer_follows_its_formula() {
        let ups = random_updates(4, 10, 2);
        let norms: Vec<f64> = ups.iter().map(|u| norm(u)).collect();
        let bound = (norms[1] + norms[2]) / 2.0;
        let whole = RoundTransforms { clip: Some(Clip { max_norm: bound, per_layer: false, layer_sizes: None }), ..RoundTransforms::NONE };
        for (k, u) in ups.iter().enumerate() {
            let p = whole.guard(k, 10, Cow::Borrowed(u), false).unwrap();
            assert_eq!(p.clipped, Some(norms[k] > bound));
            if norms[k] > bound {
                assert!(p.update.iter().zip(u).all(|(c, v)| (c - v * bound / norms[k]).abs() <= 1e-15 * v.abs().max(1e-300)));
                assert!((norm(&p.update) - bound).abs() < 1e-14 * bound);
            } else {
                // Untouched: still the caller's buffer.
                assert!(matches!(p.update, Cow::Borrowed(x) if std::ptr::eq(x, u.as_slice())));
            }
        }
        // Per layer: each of 3 layers to bound / sqrt(3).
        let sizes = vec![3, 5, 2];
        let per_layer = RoundTransforms {
            clip: Some(Clip { max_norm: bound, per_layer: true, layer_sizes: Some(sizes.clone()) }),
            ..RoundTransforms::NONE
        };
        let layer_bound = bound / 3f64.sqrt();
        let mut any_clipped = false;
        let mut any_kept = false;
        for (k, u) in ups.iter().enumerate() {
            let p = per_layer.guard(k, 10, Cow::Borrowed(u), false).unwrap();
            let mut start = 0;
            let mut exceeded = false;
            for n in &sizes {
                let (layer, got) = (&u[start..start + n], &p.update[start..start + n]);
                let ln = norm(layer);
                if ln > layer_bound {
                    exceeded = true;
                    any_clipped = true;
                    assert!(got.iter().zip(layer).all(|(c, v)| (c - v * layer_bound / ln).abs() <= 1e-15 * v.abs().max(1e-300)));
                } else {
                    any_kept = true;
                    assert_eq!(got, layer, "a layer within its bound is unchanged");
                }
                start += n;
            }
            assert_eq!(p.clipped, Some(exceeded));
            assert!(norm(&p.update) <= bound * (1.0 + 1e-14));
        }
        assert!(any_clipped && any_kept);
        // In a round: the flags, and a huge bound changes nothing at all.
        let w = [1.0, 1.0, 2.0, 2.0];
        let r = round(&ups, &w, &whole, true, 1).unwrap();
        assert_eq!(r.clipped, Some(norms.iter().map(|n| Some(*n > bound)).collect()));
        assert!(r.client_norms.iter().zip(&norms).all(|(a, b)| (a - b).abs() < 1e-14 * b), "pre-clip norms");
        let loose = RoundTransforms { clip: Some(Clip { max_norm: 1e10, per_layer: false, layer_sizes: None }), ..RoundTransforms::NONE };
        let plain = fold_round(&[0.0; 10], &refs(&ups), &w, None, FoldRule::Mean, &SGD, true, 1).unwrap();
        let r = round(&ups, &w, &loose, true, 1).unwrap();
        assert_eq!(r.aggregate, plain.aggregate);
        assert_eq!(r.clipped, Some(vec![Some(false); 4]));
        // Clipping after a filter (that keeps everyone) gives the same round.
        let both = RoundTransforms {
            filter: Some(NormFilter { max_norm: Some(1e10), mad: None, per_layer: false, layer_sizes: None }),
            ..whole.clone()
        };
        let (a, b) = (round(&ups, &w, &whole, false, 1).unwrap(), round(&ups, &w, &both, false, 1).unwrap());
        assert_eq!(a.aggregate, b.aggregate);
        assert_eq!(a.clipped, b.clipped);
        assert!(matches!(
            round(&ups, &w, &with(RoundTransforms { clip: Some(Clip { max_norm: 0.0, per_layer: false, layer_sizes: None }), ..RoundTransforms::NONE }), false, 1),
            Err(CoreError::InvalidArgument("clip", _))
        ));
    }

    #[test]
    fn clipping_updates_beyond_the_double_range_keeps_their_direction() {
        let u = vec![1.5e308, -1.5e308, 0.0];
        let t = RoundTransforms { clip: Some(Clip { max_norm: 2.0, per_layer: false, layer_sizes: None }), ..RoundTransforms::NONE };
        let p = t.guard(0, 3, Cow::Borrowed(&u), false).unwrap();
        assert_eq!(p.norm, f64::INFINITY);
        let s = 2f64.sqrt();
        assert!((p.update[0] - s).abs() < 1e-15 && (p.update[1] + s).abs() < 1e-15 && p.update[2] == 0.0, "{:?}", p.update);
    }

    /// Every robust rule in a round with clipping and a filter, against the
    /// kernel of `robust` on the kept, clipped updates.
    #[test]
    fn robust_aggregators_in_the_fold_equal_their_kernels() {
        let k = 12;
        let mut ups = random_updates(k, 37, 3);
        ups[5].iter_mut().for_each(|v| *v *= 1e3); // filtered out by the MAD rule
        let w: Vec<f64> = (0..k).map(|i| 1.0 + (i % 3) as f64).collect();
        let clip = Clip { max_norm: 8.0, per_layer: true, layer_sizes: Some(vec![30, 7]) };
        let filter = NormFilter { max_norm: None, mad: Some(3.0), per_layer: false, layer_sizes: None };
        let base = RoundTransforms { clip: Some(clip.clone()), filter: Some(filter), ..RoundTransforms::NONE };
        let kept: Vec<usize> = (0..k).filter(|&i| i != 5).collect();
        let clip_only = RoundTransforms { clip: Some(clip), ..RoundTransforms::NONE };
        let clipped: Vec<Vec<f64>> = kept.iter().map(|&i| prepared(&clip_only, i, &ups[i])).collect();
        assert!(clipped.iter().zip(&kept).any(|(c, &i)| *c != ups[i]), "the bound binds for some");
        let set = UpdateSet::from_vectors(refs(&clipped)).unwrap();
        let kw: Vec<f64> = kept.iter().map(|&i| w[i]).collect();
        let n = kept.len();
        let krum_f = (n - 3) / 2;
        let cases: Vec<(Aggregator, Vec<f64>, Option<Vec<usize>>)> = vec![
            (Aggregator::Median, robust::coordinate_median(&set).unwrap().remove(0), None),
            (Aggregator::TrimmedMean { trim: 0.2 }, robust::trimmed_mean(&set, 0.2).unwrap().remove(0), None),
            {
                let r = robust::multi_krum(&set, krum_f, 1, None).unwrap();
                (Aggregator::Krum { f: None }, r.aggregate[0].clone(), Some(r.selected))
            },
            {
                let r = robust::multi_krum(&set, 2, 1, None).unwrap();
                (Aggregator::Krum { f: Some(2) }, r.aggregate[0].clone(), Some(r.selected))
            },
            {
                let r = robust::multi_krum(&set, 2, 4, Some(&kw)).unwrap();
                (Aggregator::MultiKrum { f: Some(2), m: Some(4) }, r.aggregate[0].clone(), Some(r.selected))
            },
            {
                let r = robust::multi_krum(&set, krum_f, n - krum_f, Some(&kw)).unwrap();
                (Aggregator::MultiKrum { f: None, m: None }, r.aggregate[0].clone(), Some(r.selected))
            },
            {
                let r = robust::geometric_median(&set, Some(&kw), 1e-10, 50).unwrap();
                (Aggregator::GeometricMedian { tol: 1e-10, max_iter: 50 }, r.aggregate[0].clone(), None)
            },
            {
                let r = robust::bulyan(&set, 2).unwrap();
                (Aggregator::Bulyan { f: Some(2) }, r.aggregate[0].clone(), Some(r.selected))
            },
        ];
        for (aggregator, expected, picked) in cases {
            let t = RoundTransforms { aggregator, ..base.clone() };
            let r1 = round(&ups, &w, &t, true, 1).unwrap();
            let r2 = round(&ups, &w, &t, false, 2).unwrap();
            assert_eq!(r1.aggregate, expected, "{aggregator:?}");
            assert_eq!(r2.aggregate, expected, "{aggregator:?} on two threads, without diagnostics");
            assert_eq!(r1.kept, (0..k).map(|i| i != 5).collect::<Vec<_>>());
            let flags = picked.map(|p| {
                let mut f = vec![false; k];
                p.into_iter().for_each(|j| f[kept[j]] = true);
                f
            });
            assert_eq!(r1.selected, flags, "{aggregator:?}");
            assert!(r1.cosines[5].is_nan() && r1.cosines[0].is_finite());
        }
        // Bulyan needs K >= 4f + 3; FedNova and robust rules do not mix.
        let t = RoundTransforms { aggregator: Aggregator::Bulyan { f: Some(3) }, ..base.clone() };
        assert!(matches!(round(&ups, &w, &t, false, 1), Err(CoreError::InvalidArgument("f", m)) if m.contains("4f + 3")));
        let t = RoundTransforms { aggregator: Aggregator::Median, ..RoundTransforms::NONE };
        let a = vec![1.0; k];
        let err = fold_round_with(&[0.0; 37], &refs(&ups), &w, Some(&a), FoldRule::Normalized, &SGD, false, &t, 1).unwrap_err();
        assert!(matches!(err, CoreError::InvalidArgument("aggregator", _)), "{err:?}");
    }

    #[test]
    fn local_dp_clips_then_adds_seeded_noise() {
        let d = 20_000;
        let u: Vec<f64> = (0..d).map(|i| ((i % 7) as f64) - 3.0).collect();
        let norm = u.iter().map(|v| v * v).sum::<f64>().sqrt();
        let with = |sd: f64, seed: u64| RoundTransforms {
            local_noise: Some(LocalNoise { clip: 2.0, sd, seed }),
            ..RoundTransforms::NONE
        };
        // Without noise: exactly the clipped update.
        let quiet = prepared(&with(0.0, 1), 0, &u);
        for (q, v) in quiet.iter().zip(&u) {
            assert!((q - v * 2.0 / norm).abs() < 1e-15);
        }
        // With noise: clipped update + N(0, sd^2), seeded per client, never the attack streams.
        let a = prepared(&with(0.5, 9), 3, &u);
        let b = with_threads(2, || prepared(&with(0.5, 9), 3, &u));
        assert_eq!(a, b);
        let other_client = prepared(&with(0.5, 9), 4, &u);
        assert_ne!(a, other_client);
        let resid: Vec<f64> = a.iter().zip(&quiet).map(|(x, q)| x - q).collect();
        let sd = (resid.iter().map(|r| r * r).sum::<f64>() / d as f64).sqrt();
        assert!((sd - 0.5).abs() < 0.02, "{sd}");
        let mut attack_noise = vec![0.0; d];
        gaussian_fill(&mut attack_noise, 0.5, 9, 3);
        assert_ne!(resid, attack_noise);
        assert!(with(-1.0, 1).check(d, 1, FoldRule::Mean).is_err());
    }

    #[test]
    fn central_noise_follows_dp_fedavg() {
        let (k, d) = (7, 50_000);
        let ups = random_updates(k, d, 5);
        let ones = vec![1.0; k];
        let noise = |sd: f64, seed: u64| RoundTransforms {
            clip: Some(Clip { max_norm: 1e12, per_layer: false, layer_sizes: None }),
            noise: Some(CentralNoise { sd, seed, denominator: 10.5 }),
            ..RoundTransforms::NONE
        };
        // sd 0, a clip that never binds: the sum over the denominator.
        let r = round(&ups, &ones, &noise(0.0, 1), false, 2).unwrap();
        let plain = fold_round(&vec![0.0; d], &refs(&ups), &ones, None, FoldRule::Mean, &SGD, false, 1).unwrap();
        for j in 0..d {
            let mut sum = 0.0;
            for u in &ups {
                sum += u[j];
            }
            assert_eq!(r.aggregate[j], sum / 10.5);
            let scaled = plain.aggregate[j] * k as f64 / 10.5;
            assert!((r.aggregate[j] - scaled).abs() <= 1e-14 * scaled.abs().max(1e-10), "{j}");
        }
        // The noise: sd / denominator per coordinate, seeded, thread-invariant.
        let sd = 4.0;
        let noisy = round(&ups, &ones, &noise(sd, 99), false, 1).unwrap();
        let noisy2 = round(&ups, &ones, &noise(sd, 99), false, 2).unwrap();
        assert!(same(&noisy, &noisy2));
        assert_ne!(noisy.aggregate, round(&ups, &ones, &noise(sd, 100), false, 1).unwrap().aggregate);
        let diff: Vec<f64> = noisy.aggregate.iter().zip(&r.aggregate).map(|(a, b)| a - b).collect();
        let mean = diff.iter().sum::<f64>() / d as f64;
        let emp = (diff.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (d - 1) as f64).sqrt();
        let expected = sd / 10.5;
        assert!((emp - expected).abs() < 5.0 * expected / (2.0 * d as f64).sqrt(), "{emp} vs {expected}");
        assert!(mean.abs() < 5.0 * expected / (d as f64).sqrt());
        // The noise is privacy::add_noise_in_place's with the seed, layer 0.
        let mut expected_noise = vec![0.0; d];
        crate::privacy::add_noise_in_place(&mut expected_noise, sd, 99, 0).unwrap();
        let j = 12_345;
        let mut sum = 0.0;
        for u in &ups {
            sum += u[j];
        }
        assert_eq!(noisy.aggregate[j], (sum + expected_noise[j]) / 10.5);
        // Only with the weighted mean, and not with FedNova.
        let robust = RoundTransforms { aggregator: Aggregator::Median, ..noise(sd, 1) };
        assert!(matches!(round(&ups, &ones, &robust, false, 1), Err(CoreError::InvalidArgument("noise", _))));
        let err = fold_round_with(&vec![0.0; d], &refs(&ups), &ones, Some(&ones), FoldRule::Normalized, &SGD, false, &noise(sd, 1), 1);
        assert!(matches!(err, Err(CoreError::InvalidArgument("noise", _))));
        let bad = RoundTransforms { noise: Some(CentralNoise { sd: 1.0, seed: 1, denominator: 0.0 }), ..RoundTransforms::NONE };
        assert!(matches!(round(&ups, &ones, &bad, false, 1), Err(CoreError::InvalidArgument("noise", _))));
    }

    #[test]
    fn no_transforms_is_the_plain_fold() {
        let ups = random_updates(5, 300, 6);
        let w = [1.0, 2.0, 3.0, 4.0, 5.0];
        for diagnostics in [false, true] {
            let plain = fold_round(&[0.0; 300], &refs(&ups), &w, None, FoldRule::Mean, &SGD, diagnostics, 2).unwrap();
            let none = round(&ups, &w, &RoundTransforms::default(), diagnostics, 2).unwrap();
            assert!(same(&plain, &none));
            assert_eq!(none.kept, vec![true; 5]);
            assert_eq!(none.filter_reasons, vec![String::new(); 5]);
            assert!(none.clipped.is_none() && none.selected.is_none());
            // Attack entries that are all NULL are no attack.
            let idle = RoundTransforms { attacks: vec![None; 5], ..RoundTransforms::NONE };
            assert!(idle.is_none());
        }
    }
}
