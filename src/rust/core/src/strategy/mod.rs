//! A federated round as a pipeline of exchangeable parts:
//! client algorithm x local optimizer -> fold -> server optimizer.
//!
//! * `local_opt`: what a client does with each step's gradient (SGD with
//!   momentum, Adam, RMSprop, Adagrad).
//! * `client`: the local run and the client algorithms that steer it
//!   (FedAvg, FedProx, SCAFFOLD, FedNova).
//! * `fold`: the weighted combination of the client updates into the
//!   pseudo-gradient D, with diagnostics.
//! * `server_opt`: how the global parameters move along D (SGD with
//!   momentum, FedAdagrad, FedAdam, FedYogi).
//!
//! `train::run_round` runs the clients of a built-in model and then
//! `finish_round`; `fold_round` folds updates computed elsewhere (clients of
//! a custom model train in R). Both end in `finish_round`, so a round gives
//! the same numbers whichever way its clients trained.

pub mod client;
pub mod fold;
pub mod local_opt;
pub mod server_opt;

use std::borrow::Cow;

use crate::alloc::try_zeroed;
use crate::error::{invalid, CoreResult};
use crate::norms::l2_norm;
use crate::parallel::with_threads;

pub use client::{ClientAlgorithm, GradientCorrection, LocalConfig, LocalOutcome};
pub use fold::{ClientDiagnostics, Fold, FoldRule};
pub use local_opt::LocalOptimizer;
pub use server_opt::{ServerOptimizer, ServerState};

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
    /// `||Delta_i||` per client.
    pub client_norms: Vec<f64>,
    /// `cos(Delta_i, D)` per client.
    pub cosines: Vec<f64>,
    pub diagnostics: RoundDiagnostics,
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
    let k = updates.len();
    if k == 0 {
        return invalid("deltas", "no client updates");
    }
    if weights.len() != k {
        return invalid("weights", format!("has {} values for {k} clients", weights.len()));
    }
    let steps = match (rule, a) {
        (FoldRule::Normalized, None) => return invalid("a", "FedNova needs every client's effective steps"),
        (_, Some(a)) if a.len() != k => return invalid("a", format!("has {} values for {k} clients", a.len())),
        (_, a) => a,
    };
    server.optimizer.check()?;
    with_threads(threads, || {
        let mut fold = Fold::new(global.len(), rule, diagnostics, k)?;
        for (i, (update, weight)) in updates.iter().zip(weights).enumerate() {
            fold.add(Cow::Borrowed(update), *weight, steps.map_or(1.0, |a| a[i]))?;
        }
        finish_round(global, fold, server)
    })
}
