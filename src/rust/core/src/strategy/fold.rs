//! The fold: client updates, one at a time and in client order, into the
//! round's pseudo-gradient D, with per-round diagnostics of how the clients
//! agree.
//!
//! Rounds trained in Rust and rounds whose clients trained in R (custom
//! models, weight functions written in R) fold through this one type, so
//! both give the same numbers.
//!
//! With `Fold::with_transforms` the updates also go through the attacks,
//! filter, clipping, robust aggregator and noise of `transform`, in that
//! order; without any the fold is exactly the plain one.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::alloc::{try_with_capacity, try_zeroed};
use crate::error::{invalid, CoreError, CoreResult};
use crate::norms::{l2_norm, layer_norms, sum_squares};
use crate::parallel::{block_sums, min_len, reduction_block};
use crate::strategy::aggregator::{robust_aggregate, Aggregator, FoldRule};
use crate::strategy::transform::{check_update, Prepared, RoundTransforms};
use crate::updates::UpdateSet;


/// Updates longer than this are folded in parallel chunks. Each coordinate
/// is still summed over clients in client order, so the result does not
/// depend on the threads.
const PARALLEL_FROM: usize = 1 << 18;
const CHUNK: usize = 1 << 15;

/// Per-round diagnostics of the client updates (NaN when not computed).
#[derive(Clone, Debug, PartialEq)]
pub struct ClientDiagnostics {
    /// `||Delta_i||`.
    pub norms: Vec<f64>,
    /// `cos(Delta_i, D)`; NaN where either norm is 0.
    pub cosines: Vec<f64>,
    pub norm_mean: f64,
    /// Sample standard deviation (K - 1); NaN for one client.
    pub norm_sd: f64,
    /// Mean of the finite cosines.
    pub cosine_mean: f64,
    /// `sum_i ||Delta_i||^2 / ||sum_i Delta_i||^2` (Yin et al. 2018):
    /// 1/K when all updates agree, large when they cancel.
    pub gradient_diversity: f64,
}

impl ClientDiagnostics {
    pub fn not_computed(n_clients: usize) -> Self {
        ClientDiagnostics {
            norms: vec![f64::NAN; n_clients],
            cosines: vec![f64::NAN; n_clients],
            norm_mean: f64::NAN,
            norm_sd: f64::NAN,
            cosine_mean: f64::NAN,
            gradient_diversity: f64::NAN,
        }
    }
}

pub struct FoldOutput {
    /// The pseudo-gradient D.
    pub aggregate: Vec<f64>,
    pub diagnostics: ClientDiagnostics,
    /// Per client: whether its update passed the filter (all true without one).
    pub kept: Vec<bool>,
    /// Per client: why the filter dropped it ("" when kept).
    pub filter_reasons: Vec<String>,
    /// Per client, with clipping: whether its norm exceeded the bound
    /// (`None` for a client the filter dropped).
    pub clipped: Option<Vec<Option<bool>>>,
    /// Per client, for Krum, Multi-Krum and Bulyan: whether the rule picked it.
    pub selected: Option<Vec<bool>>,
}

/// Every update of the round, for the diagnostics that need D, which is
/// known only once all are in.
struct Kept<'a> {
    updates: Vec<Cow<'a, [f64]>>,
    /// Unweighted `sum_i Delta_i`, for the gradient diversity.
    plain_sum: Vec<f64>,
}

/// A running fold of client updates.
pub struct Fold<'a> {
    rule: FoldRule,
    /// `sum_i w_i Delta_i` (Mean) or `sum_i (w_i / a_i) Delta_i` (Normalized).
    weighted_sum: Vec<f64>,
    weight_total: f64,
    /// `sum_i w_i a_i` (Normalized only).
    weighted_steps: f64,
    n_clients: usize,
    kept: Option<Kept<'a>>,
    /// The transforms of `transform`; `None` is the plain fold.
    pipeline: Option<Pipeline<'a>>,
}

/// A fold with transforms (attacks, filter, clipping, robust aggregators,
/// noise).
struct Pipeline<'a> {
    transforms: &'a RoundTransforms,
    n_params: usize,
    diagnostics: bool,
    /// Each update is folded as it comes and then dropped (weighted
    /// aggregator, no filter, no diagnostics): memory stays at d.
    streaming: bool,
    entries: Vec<Entry<'a>>,
}

/// One client's update as the pipeline holds it.
struct Entry<'a> {
    /// `None` once folded (streaming).
    update: Option<Cow<'a, [f64]>>,
    /// Whole norm after the attack, before clipping (NaN when not computed).
    norm: f64,
    filter_norms: Vec<f64>,
    clipped: Option<bool>,
    weight: f64,
    a: f64,
    /// What the weighted fold multiplies the update by.
    coefficient: f64,
}

/// The message of the error when the filter dropped every client.
pub const ALL_FILTERED: &str = "every client was filtered out";

/// Whether `e` is the error of a round whose filter dropped every client. It
/// is a `Client` error (class "client") about no client in particular: its
/// index is 0 and means nothing.
pub fn is_all_filtered(e: &CoreError) -> bool {
    matches!(e, CoreError::Client(_, m) if m.starts_with(ALL_FILTERED))
}

impl<'a> Fold<'a> {
    /// An empty fold of updates of `n_params` values. With `diagnostics` the
    /// updates are kept (K x d) until `finish`; without, memory stays at d.
    pub fn new(n_params: usize, rule: FoldRule, diagnostics: bool, expected_clients: usize) -> CoreResult<Self> {
        let kept = if diagnostics {
            Some(Kept {
                updates: try_with_capacity(expected_clients, "the round's client updates")?,
                plain_sum: try_zeroed(n_params, "the unweighted sum of the client updates")?,
            })
        } else {
            None
        };
        Ok(Fold {
            rule,
            weighted_sum: try_zeroed(n_params, "the round's aggregate")?,
            weight_total: 0.0,
            weighted_steps: 0.0,
            n_clients: 0,
            kept,
            pipeline: None,
        })
    }

    /// A fold of exactly `n_clients` updates with `transforms` applied: the
    /// plain fold of `new` when they are all off. Every update is kept until
    /// `finish` when a filter or a robust aggregator needs them all, or
    /// with `diagnostics`; else each is folded as it comes.
    pub fn with_transforms(
        n_params: usize,
        rule: FoldRule,
        diagnostics: bool,
        n_clients: usize,
        transforms: &'a RoundTransforms,
    ) -> CoreResult<Self> {
        if transforms.is_none() {
            return Fold::new(n_params, rule, diagnostics, n_clients);
        }
        transforms.check_guard(n_params, rule)?;
        let weighted_sum = if transforms.aggregator.is_robust() {
            Vec::new()
        } else {
            try_zeroed(n_params, "the round's aggregate")?
        };
        let streaming = !transforms.keeps_updates() && !diagnostics;
        Ok(Fold {
            rule,
            weighted_sum,
            weight_total: 0.0,
            weighted_steps: 0.0,
            n_clients: 0,
            kept: None,
            pipeline: Some(Pipeline {
                transforms,
                n_params,
                diagnostics,
                streaming,
                entries: try_with_capacity(n_clients, "the round's client updates")?,
            }),
        })
    }

    /// The transforms each update goes through before `add_prepared`, when
    /// there are any.
    pub fn transforms(&self) -> Option<&'a RoundTransforms> {
        self.pipeline.as_ref().map(|p| p.transforms)
    }

    /// Adds the next client's update with its (unnormalised) weight and, for
    /// FedNova, its effective number of steps `a`.
    pub fn add(&mut self, update: Cow<'a, [f64]>, weight: f64, a: f64) -> CoreResult<()> {
        let k = self.n_clients;
        let d = self.weighted_sum.len();
        if let Some(p) = &self.pipeline {
            let (transforms, diagnostics) = (p.transforms, p.diagnostics);
            let prepared = transforms.guard(k, p.n_params, update, diagnostics)?;
            return self.add_prepared(prepared, weight, a);
        }
        check_update(k, d, &update)?;
        let coefficient = self.coefficient(weight, a)?;
        self.weight_total += weight;
        axpy(&mut self.weighted_sum, coefficient, &update);
        if let Some(kept) = &mut self.kept {
            axpy(&mut kept.plain_sum, 1.0, &update);
            kept.updates.push(update);
        }
        self.n_clients += 1;
        Ok(())
    }

    /// The coefficient of the update of weight `weight` in the weighted sum,
    /// with both checked; counts FedNova's `sum_i w_i a_i`.
    fn coefficient(&mut self, weight: f64, a: f64) -> CoreResult<f64> {
        let k = self.n_clients;
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(CoreError::Client(k, format!("weight {weight} is not a finite number >= 0")));
        }
        Ok(match self.rule {
            FoldRule::Mean | FoldRule::SumOver(_) => weight,
            FoldRule::Normalized => {
                if !(a.is_finite() && a > 0.0) {
                    return Err(CoreError::Client(k, format!("FedNova's effective steps a = {a} is not a positive number")));
                }
                if !matches!(&self.pipeline, Some(p) if !p.streaming) {
                    self.weighted_steps += weight * a;
                }
                weight / a
            }
        })
    }

    /// Adds the next client's update after `RoundTransforms::guard` (of
    /// this fold's transforms, for this client), with its weight and steps.
    pub fn add_prepared(&mut self, prepared: Prepared<'a>, weight: f64, a: f64) -> CoreResult<()> {
        if self.pipeline.is_none() {
            return self.add(prepared.update, weight, a);
        }
        let coefficient = self.coefficient(weight, a)?;
        let pipeline = self.pipeline.as_mut().expect("checked above");
        let Prepared { update, norm, filter_norms, clipped, .. } = prepared;
        let update = if pipeline.streaming {
            self.weight_total += weight;
            axpy(&mut self.weighted_sum, coefficient, &update);
            None
        } else {
            Some(update)
        };
        pipeline.entries.push(Entry { update, norm, filter_norms, clipped, weight, a, coefficient });
        self.n_clients += 1;
        Ok(())
    }

    /// Whether `finish` computes the diagnostics (else they are NaN).
    pub fn diagnoses(&self) -> bool {
        match &self.pipeline {
            Some(p) => p.diagnostics,
            None => self.kept.is_some(),
        }
    }

    /// D and the diagnostics.
    pub fn finish(self) -> CoreResult<FoldOutput> {
        if self.n_clients == 0 {
            return invalid("clients", "no client updates to fold");
        }
        if self.pipeline.is_some() {
            return self.finish_pipeline();
        }
        let aggregate = normalised(self.rule, self.weighted_sum, self.weight_total, self.weighted_steps)?;
        let diagnostics = match &self.kept {
            Some(kept) => diagnose(kept, &aggregate)?,
            None => ClientDiagnostics::not_computed(self.n_clients),
        };
        let k = self.n_clients;
        Ok(FoldOutput { aggregate, diagnostics, kept: vec![true; k], filter_reasons: vec![String::new(); k], clipped: None, selected: None })
    }

    fn finish_pipeline(self) -> CoreResult<FoldOutput> {
        let Fold { rule, mut weighted_sum, mut weight_total, mut weighted_steps, n_clients: k, pipeline, .. } = self;
        let Pipeline { transforms: t, diagnostics, streaming, mut entries, .. } = pipeline.expect("a pipeline fold");
        // 3. The filter, on the norms of every client.
        let (kept, filter_reasons) = match &t.filter {
            Some(filter) => {
                let norms: Vec<Vec<f64>> = entries.iter().map(|e| e.filter_norms.clone()).collect();
                filter.decide(&norms)
            }
            None => (vec![true; k], vec![String::new(); k]),
        };
        let kept_idx: Vec<usize> = (0..k).filter(|&i| kept[i]).collect();
        if kept_idx.is_empty() {
            let mut reasons: Vec<String> = filter_reasons.iter().take(3).enumerate().map(|(i, r)| format!("client {}: {r}", i + 1)).collect();
            if k > 3 {
                reasons.push(format!("and {} more", k - 3));
            }
            return Err(CoreError::Client(0, format!("{ALL_FILTERED} ({})", reasons.join("; "))));
        }
        // 4. Clipping of the kept updates, when the filter came first.
        if let (Some(clip), Some(_)) = (&t.clip, &t.filter) {
            let results: Vec<CoreResult<()>> = entries
                .par_iter_mut()
                .zip(&kept)
                .enumerate()
                .with_min_len(min_len())
                .map(|(i, (e, &keep))| {
                    if keep {
                        let update = e.update.as_mut().expect("kept with a filter");
                        e.clipped = Some(clip.apply(update, e.norm, "a clipped client update").map_err(|err| match err {
                            CoreError::InvalidArgument(arg, msg) => CoreError::Client(i, format!("`{arg}` {msg}")),
                            other => other,
                        })?);
                    }
                    Ok(())
                })
                .collect();
            results.into_iter().collect::<CoreResult<()>>()?;
        }
        let clipped = t.clip.as_ref().map(|_| entries.iter().zip(&kept).map(|(e, &keep)| if keep { e.clipped } else { None }).collect());
        // 5. The aggregator, on the kept (clipped) updates; 6. the noise.
        let mut selected = None;
        let aggregate = match t.aggregator {
            Aggregator::Weighted => {
                if !streaming {
                    for &i in &kept_idx {
                        let e = &entries[i];
                        if rule == FoldRule::Normalized {
                            weighted_steps += e.weight * e.a;
                        }
                        weight_total += e.weight;
                        axpy(&mut weighted_sum, e.coefficient, e.update.as_deref().expect("kept"));
                    }
                }
                match &t.noise {
                    Some(noise) => {
                        if noise.sd > 0.0 {
                            crate::privacy::add_noise_in_place(&mut weighted_sum, noise.sd, noise.seed, 0)?;
                        }
                        weighted_sum.iter_mut().for_each(|s| *s /= noise.denominator);
                        if weighted_sum.iter().any(|s| !s.is_finite()) {
                            return Err(CoreError::Diverged(
                                "the noised sum of the clients' updates overflowed; the learning rate is probably too large".into(),
                            ));
                        }
                        weighted_sum
                    }
                    None => normalised(rule, weighted_sum, weight_total, weighted_steps)?,
                }
            }
            robust => {
                let updates: Vec<&[f64]> = kept_idx.iter().map(|&i| entries[i].update.as_deref().expect("kept")).collect();
                let weights: Vec<f64> = kept_idx.iter().map(|&i| entries[i].weight).collect();
                let (aggregate, picked) = robust_aggregate(robust, updates, &weights).map_err(|e| match e {
                    CoreError::Client(j, m) => CoreError::Client(kept_idx[j], m),
                    CoreError::ClientDiverged(j, m) => CoreError::ClientDiverged(kept_idx[j], m),
                    other => other,
                })?;
                if let Some(picked) = picked {
                    let mut flags = vec![false; k];
                    picked.into_iter().for_each(|j| flags[kept_idx[j]] = true);
                    selected = Some(flags);
                }
                if aggregate.iter().any(|s| !s.is_finite()) {
                    return Err(CoreError::Diverged(
                        "the robust aggregate of the clients' updates overflowed; the learning rate is probably too large".into(),
                    ));
                }
                aggregate
            }
        };
        // 7. Diagnostics on the updates that entered the aggregator.
        let diagnostics = if diagnostics {
            diagnose_entries(&entries, &kept_idx, &aggregate)?
        } else {
            let mut d = ClientDiagnostics::not_computed(k);
            d.norms = entries.iter().map(|e| e.norm).collect();
            d
        };
        Ok(FoldOutput { aggregate, diagnostics, kept, filter_reasons, clipped, selected })
    }
}

/// D from the weighted sum: `sum / total` (Mean) or FedNova's
/// `(sum_i w_i a_i / total) (sum / total)`.
fn normalised(rule: FoldRule, weighted_sum: Vec<f64>, total: f64, weighted_steps: f64) -> CoreResult<Vec<f64>> {
    let mut aggregate = weighted_sum;
    if let FoldRule::SumOver(n) = rule {
        if n == 0 {
            return invalid("denominator", "must be at least 1");
        }
        aggregate.iter_mut().for_each(|s| *s /= n as f64);
    } else if !(total > 0.0 && total.is_finite()) {
        return invalid("weights", "the clients' weights sum to zero (every selected client has zero validation accuracy?)");
    }
    match rule {
        FoldRule::SumOver(_) => {}
        FoldRule::Mean => aggregate.iter_mut().for_each(|s| *s /= total),
        FoldRule::Normalized => {
            let mean_steps = weighted_steps / total;
            aggregate.iter_mut().for_each(|s| *s = mean_steps * (*s / total));
        }
    }
    // Finite updates can still sum past the largest double.
    if aggregate.iter().any(|s| !s.is_finite()) {
        return Err(CoreError::Diverged(
            "the weighted mean of the clients' updates overflowed; the learning rate is probably too large".into(),
        ));
    }
    Ok(aggregate)
}

/// `y += a x` (with `a = 1` this is exactly `y += x`: multiplying by one is
/// exact).
fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    let kernel = |(y, x): (&mut [f64], &[f64])| {
        for (y, x) in y.iter_mut().zip(x) {
            *y += a * x;
        }
    };
    if y.len() >= PARALLEL_FROM {
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).with_min_len(min_len()).for_each(kernel);
    } else {
        kernel((y, x));
    }
}


fn diagnose(kept: &Kept<'_>, aggregate: &[f64]) -> CoreResult<ClientDiagnostics> {
    let updates: Vec<&[f64]> = kept.updates.iter().map(|u| u.as_ref()).collect();
    let k = updates.len();
    let set = UpdateSet::from_vectors(updates.clone())?;
    let norms: Vec<f64> = layer_norms(&set).into_iter().map(|n| n[0]).collect();
    // All K dot products in one pass over D, in fixed blocks.
    let dots = block_sums(aggregate.len(), reduction_block(k), k, |r, acc| {
        let d = &aggregate[r.clone()];
        for (a, u) in acc.iter_mut().zip(&updates) {
            *a = u[r.clone()].iter().zip(d).map(|(x, y)| x * y).sum();
        }
    });
    let aggregate_norm = l2_norm(aggregate);
    let cosines: Vec<f64> = dots
        .iter()
        .zip(&norms)
        .map(|(dot, n)| if *n == 0.0 || aggregate_norm == 0.0 { f64::NAN } else { dot / (n * aggregate_norm) })
        .collect();
    let (norm_mean, norm_sd, cosine_mean) = summarize(&norms, &cosines);
    let spread = norms.iter().map(|n| n * n).sum::<f64>();
    let agreement = sum_squares(&kept.plain_sum);
    let gradient_diversity = if agreement == 0.0 { f64::NAN } else { spread / agreement };
    Ok(ClientDiagnostics { norms, cosines, norm_mean, norm_sd, cosine_mean, gradient_diversity })
}

/// Mean and sd (K - 1 in the denominator; NaN for one client) of the
/// clients' update norms, and the mean of their finite cosines.
fn summarize(norms: &[f64], cosines: &[f64]) -> (f64, f64, f64) {
    let k = norms.len();
    let mean = norms.iter().sum::<f64>() / k as f64;
    let sd = if k > 1 { (norms.iter().map(|n| (n - mean).powi(2)).sum::<f64>() / (k - 1) as f64).sqrt() } else { f64::NAN };
    let finite: Vec<f64> = cosines.iter().copied().filter(|c| c.is_finite()).collect();
    let cosine_mean = if finite.is_empty() { f64::NAN } else { finite.iter().sum::<f64>() / finite.len() as f64 };
    (mean, sd, cosine_mean)
}

/// The diagnostics of a pipeline fold: `norms` (after the attack, before
/// clipping) of every client, and their mean and sd; the cosines of the
/// updates that entered the aggregator (kept, clipped) with the final D, NaN
/// for the clients the filter dropped; the gradient diversity of the updates
/// that entered.
fn diagnose_entries(entries: &[Entry<'_>], kept_idx: &[usize], aggregate: &[f64]) -> CoreResult<ClientDiagnostics> {
    let k = entries.len();
    let norms: Vec<f64> = entries.iter().map(|e| e.norm).collect();
    let updates: Vec<&[f64]> = kept_idx.iter().map(|&i| entries[i].update.as_deref().expect("kept for the diagnostics")).collect();
    let entered_norms: Vec<f64> = kept_idx
        .iter()
        .zip(&updates)
        .map(|(&i, u)| if entries[i].clipped == Some(true) { l2_norm(u) } else { entries[i].norm })
        .collect();
    let n = updates.len();
    let dots = block_sums(aggregate.len(), reduction_block(n), n, |r, acc| {
        let d = &aggregate[r.clone()];
        for (a, u) in acc.iter_mut().zip(&updates) {
            *a = u[r.clone()].iter().zip(d).map(|(x, y)| x * y).sum();
        }
    });
    let aggregate_norm = l2_norm(aggregate);
    let mut cosines = vec![f64::NAN; k];
    for (j, &i) in kept_idx.iter().enumerate() {
        let n = entered_norms[j];
        cosines[i] = if n == 0.0 || aggregate_norm == 0.0 { f64::NAN } else { dots[j] / (n * aggregate_norm) };
    }
    let (norm_mean, norm_sd, cosine_mean) = summarize(&norms, &cosines);
    let mut plain_sum = try_zeroed(aggregate.len(), "the unweighted sum of the client updates")?;
    for u in &updates {
        axpy(&mut plain_sum, 1.0, u);
    }
    let spread = entered_norms.iter().map(|n| n * n).sum::<f64>();
    let agreement = sum_squares(&plain_sum);
    let gradient_diversity = if agreement == 0.0 { f64::NAN } else { spread / agreement };
    Ok(ClientDiagnostics { norms, cosines, norm_mean, norm_sd, cosine_mean, gradient_diversity })
}

/// SCAFFOLD's new server control: `c + sum_i (c_i_new - c_i) / N` over the
/// round's clients in client order, with N the number of all nodes (absent
/// controls are zeros).
pub fn scaffold_server_control(
    server_control: Option<&[f64]>,
    old_client_controls: &[Option<&[f64]>],
    new_client_controls: &[&[f64]],
    n_nodes: f64,
    n_params: usize,
) -> CoreResult<Vec<f64>> {
    if !(n_nodes.is_finite() && n_nodes >= 1.0) {
        return invalid("n_nodes", "must be a number >= 1");
    }
    if old_client_controls.len() != new_client_controls.len() {
        return invalid("client_controls", "old and new client controls differ in number");
    }
    if server_control.is_some_and(|c| c.len() != n_params) {
        return invalid("control", format!("does not have {n_params} values"));
    }
    let mut change = try_zeroed(n_params, "the change of the server control")?;
    for (k, (old, new)) in old_client_controls.iter().zip(new_client_controls).enumerate() {
        if new.len() != n_params || old.is_some_and(|c| c.len() != n_params) {
            return invalid("client_controls", format!("element {} does not have {n_params} values", k + 1));
        }
        match old {
            Some(old) => {
                for ((s, n), o) in change.iter_mut().zip(*new).zip(*old) {
                    *s += n - o;
                }
            }
            None => axpy(&mut change, 1.0, new),
        }
    }
    let mut control = change;
    for (j, s) in control.iter_mut().enumerate() {
        *s = server_control.map_or(0.0, |c| c[j]) + *s / n_nodes;
    }
    if control.iter().any(|v| !v.is_finite()) {
        return Err(CoreError::Diverged("the server control variate overflowed".into()));
    }
    Ok(control)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::with_threads;
    use crate::rng::Rng;

    fn updates(k: usize, d: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = Rng::new(seed, 1);
        (0..k).map(|_| (0..d).map(|_| rng.normal()).collect()).collect()
    }

    fn fold(rule: FoldRule, ups: &[Vec<f64>], w: &[f64], a: &[f64], diagnostics: bool) -> FoldOutput {
        let mut f = Fold::new(ups[0].len(), rule, diagnostics, ups.len()).unwrap();
        for ((u, w), a) in ups.iter().zip(w).zip(a) {
            f.add(Cow::Borrowed(u), *w, *a).unwrap();
        }
        f.finish().unwrap()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn mean_and_diagnostics_match_direct_computation() {
        let ups = updates(4, 7, 1);
        let w = [1.0, 3.0, 0.5, 2.0];
        let out = fold(FoldRule::Mean, &ups, &w, &[1.0; 4], true);
        let total: f64 = w.iter().sum();
        let mut d = vec![0.0; 7];
        for (u, wk) in ups.iter().zip(&w) {
            for (o, v) in d.iter_mut().zip(u) {
                *o += wk / total * v;
            }
        }
        let close = |a: f64, b: f64| (a - b).abs() < 1e-13 * (1.0 + b.abs());
        assert!(out.aggregate.iter().zip(&d).all(|(a, b)| close(*a, *b)));
        let diag = &out.diagnostics;
        let norms: Vec<f64> = ups.iter().map(|u| dot(u, u).sqrt()).collect();
        let d_norm = dot(&d, &d).sqrt();
        for k in 0..4 {
            assert!(close(diag.norms[k], norms[k]));
            assert!(close(diag.cosines[k], dot(&ups[k], &d) / (norms[k] * d_norm)));
        }
        let mean = norms.iter().sum::<f64>() / 4.0;
        let sd = (norms.iter().map(|n| (n - mean).powi(2)).sum::<f64>() / 3.0).sqrt();
        assert!(close(diag.norm_mean, mean) && close(diag.norm_sd, sd));
        assert!(close(diag.cosine_mean, diag.cosines.iter().sum::<f64>() / 4.0));
        let plain: Vec<f64> = (0..7).map(|j| ups.iter().map(|u| u[j]).sum()).collect();
        let diversity = norms.iter().map(|n| n * n).sum::<f64>() / dot(&plain, &plain);
        assert!(close(diag.gradient_diversity, diversity));
        // Without diagnostics: the same D, NaN diagnostics.
        let lean = fold(FoldRule::Mean, &ups, &w, &[1.0; 4], false);
        assert_eq!(lean.aggregate, out.aggregate);
        assert!(lean.diagnostics.norms.iter().all(|n| n.is_nan()) && lean.diagnostics.gradient_diversity.is_nan());
    }

    #[test]
    fn degenerate_diagnostics_are_nan() {
        // One client: no sd. A zero update: no cosine, and the mean skips it.
        let ups = vec![vec![0.0, 0.0], vec![1.0, 2.0]];
        let out = fold(FoldRule::Mean, &ups, &[1.0, 1.0], &[1.0; 2], true);
        assert!(out.diagnostics.cosines[0].is_nan());
        assert!((out.diagnostics.cosines[1] - 1.0).abs() < 1e-15);
        assert!((out.diagnostics.cosine_mean - 1.0).abs() < 1e-15);
        let one = fold(FoldRule::Mean, &ups[1..], &[1.0], &[1.0], true);
        assert!(one.diagnostics.norm_sd.is_nan());
        assert!((one.diagnostics.gradient_diversity - 1.0).abs() < 1e-15);
        // Updates that cancel: D = 0, so no cosines and no diversity.
        let cancel = vec![vec![1.0, -1.0], vec![-1.0, 1.0]];
        let out = fold(FoldRule::Mean, &cancel, &[1.0, 1.0], &[1.0; 2], true);
        assert!(out.diagnostics.cosines.iter().all(|c| c.is_nan()) && out.diagnostics.cosine_mean.is_nan());
        assert!(out.diagnostics.gradient_diversity.is_nan());
    }

    #[test]
    fn fednova_normalises_by_effective_steps() {
        let ups = updates(3, 5, 2);
        let w = [2.0, 1.0, 1.0];
        let a = [4.0, 10.0, 2.5];
        let out = fold(FoldRule::Normalized, &ups, &w, &a, true);
        let total: f64 = w.iter().sum();
        let p: Vec<f64> = w.iter().map(|v| v / total).collect();
        let mean_a: f64 = p.iter().zip(&a).map(|(p, a)| p * a).sum();
        for (j, got) in out.aggregate.iter().enumerate() {
            let expected = mean_a * (0..3).map(|k| p[k] * ups[k][j] / a[k]).sum::<f64>();
            assert!((got - expected).abs() < 1e-14, "{j}");
        }
        // Equal a for every client: FedAvg's D, up to rounding.
        let fedavg = fold(FoldRule::Mean, &ups, &w, &[1.0; 3], false);
        let nova = fold(FoldRule::Normalized, &ups, &w, &[6.0; 3], false);
        assert!(fedavg.aggregate.iter().zip(&nova.aggregate).all(|(a, b)| (a - b).abs() < 1e-15));
    }

    #[test]
    fn bad_updates_weights_and_steps_name_the_client() {
        let mut f = Fold::new(2, FoldRule::Normalized, true, 3).unwrap();
        f.add(Cow::Owned(vec![1.0, 2.0]), 1.0, 1.0).unwrap();
        assert!(matches!(f.add(Cow::Owned(vec![1.0]), 1.0, 1.0), Err(CoreError::Client(1, _))));
        assert!(matches!(f.add(Cow::Owned(vec![1.0, f64::NAN]), 1.0, 1.0), Err(CoreError::ClientDiverged(1, _))));
        assert!(matches!(f.add(Cow::Owned(vec![1.0, 1.0]), -1.0, 1.0), Err(CoreError::Client(1, _))));
        assert!(matches!(f.add(Cow::Owned(vec![1.0, 1.0]), 1.0, 0.0), Err(CoreError::Client(1, _))));
        let mut zero = Fold::new(2, FoldRule::Mean, false, 1).unwrap();
        zero.add(Cow::Owned(vec![1.0, 2.0]), 0.0, 1.0).unwrap();
        assert!(matches!(zero.finish(), Err(CoreError::InvalidArgument("weights", _))));
    }

    #[test]
    fn large_folds_are_thread_invariant() {
        let ups = updates(5, PARALLEL_FROM + 1001, 3);
        let w = [1.0, 2.0, 3.0, 4.0, 5.0];
        let one = with_threads(1, || fold(FoldRule::Mean, &ups, &w, &[1.0; 5], true));
        let two = with_threads(2, || fold(FoldRule::Mean, &ups, &w, &[1.0; 5], true));
        assert_eq!(one.aggregate, two.aggregate);
        assert_eq!(one.diagnostics, two.diagnostics);
        // Each coordinate is summed in client order, as a plain loop does.
        let total: f64 = w.iter().sum();
        let j = PARALLEL_FROM + 17;
        let mut s = 0.0;
        for (u, wk) in ups.iter().zip(&w) {
            s += wk * u[j];
        }
        assert_eq!(one.aggregate[j], s / total);
    }

    #[test]
    fn scaffold_server_control_adds_the_mean_change_over_all_nodes() {
        let c = [0.5, -0.5];
        let old = [Some(&[0.1, 0.2][..]), None];
        let new = [&[0.3, 0.0][..], &[1.0, -1.0][..]];
        let got = scaffold_server_control(Some(&c), &old, &new, 10.0, 2).unwrap();
        let expected = [0.5 + ((0.3 - 0.1) + 1.0) / 10.0, -0.5 + ((0.0 - 0.2) - 1.0) / 10.0];
        assert!(got.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-15), "{got:?}");
        assert!(scaffold_server_control(None, &old, &new, 0.0, 2).is_err());
        assert!(scaffold_server_control(None, &old, &new[..1], 3.0, 2).is_err());
    }

    #[test]
    fn a_sum_over_a_fixed_count_ignores_the_weight_total() {
        let ups = vec![vec![1.0, 2.0], vec![3.0, -4.0], vec![0.5, 0.25]];
        let w = [0.5, 1.0, 0.0];
        let out = fold(FoldRule::SumOver(4), &ups, &w, &[1.0; 3], false);
        let expected: Vec<f64> = (0..2).map(|j| (0.5 * ups[0][j] + ups[1][j] + 0.0 * ups[2][j]) / 4.0).collect();
        assert_eq!(out.aggregate, expected);
        // Bit for bit the plain mean of the pre-weighted updates when the
        // count is the number of updates.
        let scaled: Vec<Vec<f64>> = ups.iter().zip(&w).map(|(u, w)| u.iter().map(|v| w * v).collect()).collect();
        let out3 = fold(FoldRule::SumOver(3), &ups, &w, &[1.0; 3], true);
        let mean = fold(FoldRule::Mean, &scaled, &[1.0; 3], &[1.0; 3], true);
        assert_eq!(out3.aggregate, mean.aggregate);
    }
}