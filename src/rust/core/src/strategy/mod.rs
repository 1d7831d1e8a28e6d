//! A federated round as a pipeline of exchangeable parts:
//! client algorithm x local optimizer -> fold -> server optimizer.
//!
//! * `local_opt`: what a client does with each step's gradient (SGD with
//!   momentum, Adam, RMSprop, Adagrad).
//! * `client`: the local run and the client algorithms that steer it
//!   (FedAvg, FedProx, SCAFFOLD, FedNova).
//! * `transform`: what the server does to the updates before and while
//!   folding them: simulated attacks, a norm filter, clipping, robust
//!   aggregators, central DP noise (all optional).
//! * `fold`: the weighted (or robust) combination of the client updates into
//!   the pseudo-gradient D, with diagnostics.
//! * `server_opt`: how the global parameters move along D (SGD with
//!   momentum, FedAdagrad, FedAdam, FedYogi).
//!
//! `train::run_round` runs the clients of a built-in model and then
//! `finish_round`; `fold_round` folds updates computed elsewhere (clients of
//! a custom model train in R). Both end in `finish_round`, so a round gives
//! the same numbers whichever way its clients trained.

pub mod aggregator;
pub mod client;
pub mod encode;
pub mod fold;
pub mod local_opt;
pub mod server_opt;
pub mod transform;

use std::borrow::Cow;

use rayon::prelude::*;

use crate::alloc::try_zeroed;
use crate::error::{invalid, CoreResult};
use crate::norms::l2_norm;
use crate::parallel::{effective_threads, min_len, with_threads};

pub use client::{ClientAlgorithm, GradientCorrection, LocalConfig, LocalOutcome};
pub use aggregator::{Aggregator, FoldRule};
pub use encode::{Attack, ClientEncoding, Compression, LocalNoise};
pub use fold::{ClientDiagnostics, Fold};
pub use local_opt::LocalOptimizer;
pub use server_opt::{ServerOptimizer, ServerState};
pub use transform::{CentralNoise, Clip, NormFilter, Prepared, RoundTransforms, NO_TRANSFORMS};

/// The server side of a round: its optimizer and the state the previous
/// round left (absent = zeros).
#[derive(Clone, Copy, Debug)]
pub struct ServerStep<'a> {
    pub optimizer: ServerOptimizer,
    pub m: Option<&'a [f64]>,
    pub v: Option<&'a [f64]>,
}

/// Summary diagnostics of one round (NaN when not computed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundDiagnostics {
    /// `||x_new - x||`.
    pub update_norm: f64,
    pub client_norm_mean: f64,
    pub client_norm_sd: f64,
    pub cosine_mean: f64,
    pub gradient_diversity: f64,
}

/// What the fold and the server step made of a round's client updates.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundUpdate {
    /// The new global parameters x_new.
    pub params: Vec<f64>,
    /// The pseudo-gradient D.
    pub aggregate: Vec<f64>,
    pub server: ServerState,
    /// `||Delta_i||` per client (after an attack, before clipping).
    pub client_norms: Vec<f64>,
    /// `cos(Delta_i, D)` per client (NaN for a client the filter dropped).
    pub cosines: Vec<f64>,
    pub diagnostics: RoundDiagnostics,
    /// Per client: passed the filter (all true without one).
    pub kept: Vec<bool>,
    /// Per client: why the filter dropped it ("" when kept).
    pub filter_reasons: Vec<String>,
    /// Per client, with clipping: its norm exceeded the bound (`None` when
    /// the filter dropped it).
    pub clipped: Option<Vec<Option<bool>>>,
    /// Per client, for Krum, Multi-Krum and Bulyan: picked by the rule.
    pub selected: Option<Vec<bool>>,
}

/// Finishes a fold and applies the server optimizer to it.
pub fn finish_round(global: &[f64], fold: Fold<'_>, server: &ServerStep<'_>) -> CoreResult<RoundUpdate> {
    let diagnosed = fold.diagnoses();
    let folded = fold.finish()?;
    let (params, state) = server.optimizer.step(global, &folded.aggregate, server.m, server.v)?;
    let update_norm = if diagnosed {
        let mut change = try_zeroed(global.len(), "the change of the global parameters")?;
        for ((c, new), old) in change.iter_mut().zip(&params).zip(global) {
            *c = new - old;
        }
        l2_norm(&change)
    } else {
        f64::NAN
    };
    let c = folded.diagnostics;
    Ok(RoundUpdate {
        params,
        aggregate: folded.aggregate,
        server: state,
        diagnostics: RoundDiagnostics {
            update_norm,
            client_norm_mean: c.norm_mean,
            client_norm_sd: c.norm_sd,
            cosine_mean: c.cosine_mean,
            gradient_diversity: c.gradient_diversity,
        },
        client_norms: c.norms,
        cosines: c.cosines,
        kept: folded.kept,
        filter_reasons: folded.filter_reasons,
        clipped: folded.clipped,
        selected: folded.selected,
    })
}

/// A round whose client updates `Delta_i` were computed elsewhere: folds
/// them with `weights` (non-negative, normalised here) and, for FedNova,
/// their effective steps `a`, then takes the server step. Updates are
/// borrowed, not copied, even when kept for the diagnostics.
#[allow(clippy::too_many_arguments)]
pub fn fold_round(
    global: &[f64],
    updates: &[&[f64]],
    weights: &[f64],
    a: Option<&[f64]>,
    rule: FoldRule,
    server: &ServerStep<'_>,
    diagnostics: bool,
    threads: usize,
) -> CoreResult<RoundUpdate> {
    fold_round_with(global, updates, weights, a, rule, server, diagnostics, &NO_TRANSFORMS, threads)
}

/// The server's half of a round: `fold_round` with the server's steps of
/// `transforms` (norms, filter, clipping, robust aggregator, noise) applied
/// to updates received from the clients. The clients' half (local DP,
/// attacks, compression) is theirs, done before they send: settings of it
/// here are an error, never ignored. The per-client steps run in parallel a
/// chunk of clients at a time; the updates are folded in client order.
#[allow(clippy::too_many_arguments)]
pub fn fold_round_with(
    global: &[f64],
    updates: &[&[f64]],
    weights: &[f64],
    a: Option<&[f64]>,
    rule: FoldRule,
    server: &ServerStep<'_>,
    diagnostics: bool,
    transforms: &RoundTransforms,
    threads: usize,
) -> CoreResult<RoundUpdate> {
    let k = updates.len();
    if k == 0 {
        return invalid("deltas", "no client updates");
    }
    if weights.len() != k {
        return invalid("weights", format!("has {} values for {k} clients", weights.len()));
    }
    if !transforms.encodes_nothing() {
        return invalid("transforms", "local DP, attacks and compression are the clients' half of a round: encode each update where it is computed");
    }
    let steps = match (rule, a) {
        (FoldRule::Normalized, None) => return invalid("a", "FedNova needs every client's effective steps"),
        (_, Some(a)) if a.len() != k => return invalid("a", format!("has {} values for {k} clients", a.len())),
        (_, a) => a,
    };
    server.optimizer.check()?;
    with_threads(threads, || {
        let mut fold = Fold::with_transforms(global.len(), rule, diagnostics, k, transforms)?;
        let Some(transforms) = fold.transforms() else {
            for (i, (update, weight)) in updates.iter().zip(weights).enumerate() {
                fold.add(Cow::Borrowed(update), *weight, steps.map_or(1.0, |a| a[i]))?;
            }
            return finish_round(global, fold, server);
        };
        let indices: Vec<usize> = (0..k).collect();
        for chunk in indices.chunks(4 * effective_threads(threads)) {
            let prepared: Vec<CoreResult<Prepared<'_>>> =
                chunk.par_iter().with_min_len(min_len()).map(|&i| transforms.guard(i, global.len(), Cow::Borrowed(updates[i]), diagnostics)).collect();
            for (&i, p) in chunk.iter().zip(prepared) {
                fold.add_prepared(p?, weights[i], steps.map_or(1.0, |a| a[i]))?;
            }
        }
        finish_round(global, fold, server)
    })
}
