//! A federated round over many clients of a built-in model: local work on
//! every selected client in parallel, then the fold and the server step of
//! `strategy`.
//!
//! Clients are trained a chunk at a time and folded in client order, so the
//! round is the same on any number of threads. Without diagnostics the fold
//! keeps one running sum (memory: chunk x parameters whatever the number of
//! clients); with them it keeps every client's update until D is known.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::error::{invalid, CoreResult};
use crate::model::{Dataset, Evaluation, Network};
use crate::parallel::{effective_threads, min_len, with_threads};
use crate::client::{self, in_client, FitConfig};
pub use crate::client::{ClientJob, ClientReport, LocalWork, WeightRule};
use crate::strategy::client::local_run;
use crate::strategy::fold::scaffold_server_control;
use crate::strategy::{
    finish_round, ClientAlgorithm, Fold, FoldRule, GradientCorrection, LocalConfig, LocalOptimizer, Prepared, RoundTransforms, RoundUpdate,
    ServerStep,
};

pub use crate::strategy::client::{full_gradient, LocalOutcome};

/// Minibatch SGD with momentum, FedAvg's local run: a shorthand for
/// `strategy::client::local_run` with the SGD optimizer and no correction.
#[derive(Clone, Copy, Debug)]
pub struct SgdConfig {
    pub epochs: usize,
    /// 0 means full batch.
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub shuffle: bool,
    pub seed: u64,
}

impl SgdConfig {
    pub fn check(&self) -> CoreResult<()> {
        if self.epochs == 0 {
            return invalid("epochs", "must be at least 1");
        }
        self.local().check()
    }

    /// The same settings as a local configuration of the strategy pipeline.
    pub fn local(&self) -> LocalConfig {
        LocalConfig {
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            shuffle: self.shuffle,
            seed: self.seed,
            optimizer: LocalOptimizer::Sgd { momentum: self.momentum },
        }
    }
}

/// Runs local minibatch SGD from `params` (updated in place). The sample
/// order comes from the client's own stream `stream` of `cfg.seed`.
pub fn local_sgd(net: &Network, params: &mut [f64], data: &Dataset<'_>, cfg: &SgdConfig, stream: u64) -> CoreResult<LocalOutcome> {
    cfg.check()?;
    local_run(net, params, data, &cfg.local(), cfg.epochs, &GradientCorrection::default(), stream)
}




/// Everything about a round that is the same for all its clients.
#[derive(Clone, Copy, Debug)]
pub struct RoundConfig<'a> {
    pub work: LocalWork,
    /// Ignored for `LocalWork::Gradient`.
    pub algorithm: ClientAlgorithm,
    pub local: LocalConfig,
    pub rule: WeightRule,
    pub server: ServerStep<'a>,
    /// Keep every update for norms and cosines (K x parameters of memory).
    pub diagnostics: bool,
    /// SCAFFOLD: the server control c (absent = zeros).
    pub control: Option<&'a [f64]>,
    /// SCAFFOLD: the number N of all nodes, selected or not.
    pub n_nodes: f64,
    /// Attacks, filter, clipping, robust aggregator, central noise
    /// (`&NO_TRANSFORMS`: none). Not applied with `WeightRule::Collect`:
    /// the collected updates are returned as the clients computed them, for
    /// the fold that takes them later to transform.
    pub transforms: &'a RoundTransforms,
}

impl RoundConfig<'_> {
    /// What each client of the round is told.
    pub fn fit_config(&self) -> FitConfig<'_> {
        FitConfig { work: self.work, algorithm: self.algorithm, local: self.local, rule: self.rule, server_control: self.control }
    }

    fn scaffold(&self) -> bool {
        self.work == LocalWork::Sgd && matches!(self.algorithm, ClientAlgorithm::Scaffold { .. })
    }

    fn fold_rule(&self) -> FoldRule {
        if self.work == LocalWork::Sgd && self.algorithm == ClientAlgorithm::FedNova {
            FoldRule::Normalized
        } else {
            FoldRule::Mean
        }
    }
}


pub struct RoundOutput {
    pub reports: Vec<ClientReport>,
    /// The fold and server step; `None` for `WeightRule::Collect`.
    pub update: Option<RoundUpdate>,
    /// Every client's update Delta_i for `WeightRule::Collect`, else empty.
    pub collected: Vec<Vec<f64>>,
    /// SCAFFOLD: the new server control c_new.
    pub control: Option<Vec<f64>>,
    /// SCAFFOLD: every selected client's new control c_i_new.
    pub client_controls: Option<Vec<Vec<f64>>>,
    /// Per client, with error-feedback compression: its new residual
    /// (empty otherwise).
    pub residuals: Vec<Option<Vec<f64>>>,
}

/// A client's update as it reaches the fold: as computed, or already
/// through the per-client transforms.
enum Sent {
    Raw(Vec<f64>),
    Prepared(Prepared<'static>),
}

/// What one client sends back: its update, report, new control and new
/// error-feedback residual.
type ClientResult = (Sent, ClientReport, Option<Vec<f64>>, Option<Vec<f64>>);

/// Clients processed together before folding.
fn chunk_len(threads: usize) -> usize {
    4 * threads.max(1)
}

fn check_round(net: &Network, global: &[f64], jobs: &[ClientJob<'_>], cfg: &RoundConfig<'_>) -> CoreResult<()> {
    let d = net.n_params();
    if global.len() != d {
        return invalid("params", format!("has {} values, the model has {d}", global.len()));
    }
    if jobs.is_empty() {
        return invalid("clients", "no clients selected");
    }
    cfg.local.check()?;
    if let Some(k) = jobs.iter().position(|j| j.epochs == 0) {
        return invalid("epochs", format!("must be at least 1 (client {})", k + 1));
    }
    if cfg.work == LocalWork::Sgd {
        cfg.algorithm.check(&cfg.local.optimizer)?;
    }
    // Before any client trains: a bad setting fails at once.
    cfg.transforms.check_encodings(d, jobs.len())?;
    if cfg.rule != WeightRule::Collect {
        cfg.server.optimizer.check()?;
        cfg.transforms.check_guard(d, cfg.fold_rule())?;
    }
    if cfg.scaffold() {
        if cfg.control.is_some_and(|c| c.len() != d) {
            return invalid("control", format!("does not have {d} values"));
        }
        if let Some(k) = jobs.iter().position(|j| j.control.is_some_and(|c| c.len() != d)) {
            return invalid("client_controls", format!("element {} does not have {d} values", k + 1));
        }
        if !(cfg.n_nodes.is_finite() && cfg.n_nodes >= 1.0) {
            return invalid("n_nodes", "must be a number >= 1");
        }
    }
    Ok(())
}

/// One federated round: local work on every client in `jobs` starting from
/// `global`, in parallel, then the fold and the server step. A failing client
/// is reported as `CoreError::Client(index in jobs, message)`, or as
/// `CoreError::ClientDiverged` when its training diverged or it returned a
/// non-finite loss or update; running out of memory stays a `Memory` error.
/// The first failure in client order is reported, on any number of threads.
pub fn run_round(net: &Network, global: &[f64], jobs: &[ClientJob<'_>], cfg: &RoundConfig<'_>, threads: usize) -> CoreResult<RoundOutput> {
    check_round(net, global, jobs, cfg)?;
    let d = net.n_params();
    // The thread count sets only how many clients are in memory at once,
    // never the result.
    let effective = effective_threads(threads);
    let scaffold = cfg.scaffold();
    let rule = cfg.fold_rule();
    let collect = cfg.rule == WeightRule::Collect;
    // Both halves of the per-update steps run with the client's work, in
    // parallel: the client's encoding always, the server's guard unless the
    // updates are collected for a fold elsewhere.
    let transforms = (!collect && !cfg.transforms.is_none()).then_some(cfg.transforms);
    let one_client = |k: usize| -> CoreResult<ClientResult> {
        // One stream per client for its training and its encoding.
        let fit = client::fit(net, global, &jobs[k], &cfg.fit_config(), &cfg.transforms.client_on(k, jobs[k].stream), k)?;
        let vector = fit.update;
        let sent = match transforms {
            Some(t) => Sent::Prepared(t.guard(k, d, Cow::Owned(vector), cfg.diagnostics)?),
            None => Sent::Raw(vector),
        };
        Ok((sent, fit.report, fit.new_control, fit.residual))
    };

    with_threads(threads, || {
        let mut fold = if collect { None } else { Some(Fold::with_transforms(d, rule, cfg.diagnostics, jobs.len(), cfg.transforms)?) };
        let mut reports = Vec::with_capacity(jobs.len());
        let mut collected = Vec::new();
        let mut client_controls = Vec::new();
        let mut residuals = Vec::new();
        let indices: Vec<usize> = (0..jobs.len()).collect();
        for chunk in indices.chunks(chunk_len(effective)) {
            let results: Vec<CoreResult<ClientResult>> = chunk.par_iter().with_min_len(min_len()).map(|&k| one_client(k)).collect();
            for result in results {
                let (update, report, new_control, residual) = result?;
                residuals.push(residual);
                match (&mut fold, update) {
                    (Some(fold), Sent::Raw(update)) => fold.add(Cow::Owned(update), report.weight, report.effective_steps)?,
                    (Some(fold), Sent::Prepared(p)) => fold.add_prepared(p, report.weight, report.effective_steps)?,
                    (None, Sent::Raw(update)) => collected.push(update),
                    (None, Sent::Prepared(p)) => collected.push(p.update.into_owned()),
                }
                client_controls.extend(new_control);
                reports.push(report);
            }
        }
        let (control, client_controls) = if scaffold {
            let old: Vec<Option<&[f64]>> = jobs.iter().map(|j| j.control).collect();
            let new: Vec<&[f64]> = client_controls.iter().map(|c| c.as_slice()).collect();
            (Some(scaffold_server_control(cfg.control, &old, &new, cfg.n_nodes, d)?), Some(client_controls))
        } else {
            (None, None)
        };
        let update = match fold {
            Some(fold) => Some(finish_round(global, fold, &cfg.server)?),
            None => None,
        };
        if residuals.iter().all(Option::is_none) {
            residuals.clear();
        }
        Ok(RoundOutput { reports, update, collected, control, client_controls, residuals })
    })
}

/// Evaluates one parameter vector on many data sets in parallel.
pub fn evaluate_many(net: &Network, params: &[f64], data: &[Dataset<'_>], threads: usize) -> CoreResult<Vec<Evaluation>> {
    if params.len() != net.n_params() {
        return invalid("params", format!("has {} values, the model has {}", params.len(), net.n_params()));
    }
    let results: Vec<CoreResult<Evaluation>> = with_threads(threads, || {
        data.par_iter()
            .enumerate()
            .with_min_len(min_len())
            .map(|(k, d)| {
                net.check_data(d).map_err(|e| in_client(k, e))?;
                net.evaluate(params, d).map_err(|e| in_client(k, e))
            })
            .collect()
    });
    // Collected in order, so the first failing client is the one reported,
    // however the threads happened to finish.
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::CoreError;
    use crate::model::{Head, OwnedData};
    use crate::rng::Rng;
    use crate::strategy::{fold_round, ServerOptimizer, NO_TRANSFORMS};
    use crate::test_data::{blobs, random_data, reference_loss_grad};


    fn cfg() -> SgdConfig {
        SgdConfig { epochs: 2, batch_size: 5, lr: 0.1, weight_decay: 0.01, momentum: 0.5, shuffle: true, seed: 42 }
    }

    /// FedAvg with server SGD(1, 0): the round of the package before the
    /// strategy pipeline.
    fn fedavg(local: &SgdConfig, rule: WeightRule) -> RoundConfig<'static> {
        RoundConfig {
            work: LocalWork::Sgd,
            algorithm: ClientAlgorithm::FedAvg,
            local: local.local(),
            rule,
            server: ServerStep { optimizer: ServerOptimizer::Sgd { lr: 1.0, momentum: 0.0 }, m: None, v: None },
            diagnostics: true,
            control: None,
            n_nodes: 1.0,
            transforms: &NO_TRANSFORMS,
        }
    }

    fn jobs_for<'a>(sets: &'a [OwnedData], validation: bool, epochs: usize) -> Vec<ClientJob<'a>> {
        sets.iter()
            .enumerate()
            .map(|(k, d)| ClientJob {
                train: d.view(),
                validation: validation.then_some(d.view()),
                stream: k as u64,
                epochs,
                control: None,
                max_steps: None,
            })
            .collect()
    }

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
    }

    #[test]
    fn local_sgd_lowers_the_loss() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let owned = blobs(60, 1, 0.0);
        let data = owned.view();
        let mut params = net.init(0, 0).unwrap();
        let before = net.evaluate(&params, &data).unwrap().loss;
        let out = local_sgd(&net, &mut params, &data, &cfg(), 0).unwrap();
        assert_eq!(out.steps, 2 * 12);
        assert!(net.evaluate(&params, &data).unwrap().loss < 0.5 * before);
    }

    /// The local run written out as it was before the strategy pipeline:
    /// minibatch SGD with weight decay and heavy-ball momentum.
    fn reference_local_sgd(net: &Network, params: &mut [f64], data: &Dataset<'_>, cfg: &SgdConfig, stream: u64) {
        reference_local_sgd_with(net, params, data, cfg, stream, false)
    }

    /// `per_sample`: gradients from the per-sample reference instead of the
    /// matrix kernels.
    fn reference_local_sgd_with(net: &Network, params: &mut [f64], data: &Dataset<'_>, cfg: &SgdConfig, stream: u64, per_sample: bool) {
        let n = data.n;
        let batch = if cfg.batch_size == 0 || cfg.batch_size > n { n } else { cfg.batch_size };
        let mut ws = net.workspace(data.n).unwrap();
        let mut grad = vec![0.0; net.n_params()];
        let mut velocity = vec![0.0; net.n_params()];
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = Rng::new(cfg.seed, stream);
        for _ in 0..cfg.epochs {
            if cfg.shuffle {
                for i in (1..n).rev() {
                    let j = rng.below(i as u64 + 1) as usize;
                    order.swap(i, j);
                }
            }
            for rows in order.chunks(batch) {
                if per_sample {
                    grad = reference_loss_grad(net, params, data, rows).1;
                } else {
                    net.loss_grad(params, data, rows, &mut grad, &mut ws);
                }
                for ((p, v), g) in params.iter_mut().zip(velocity.iter_mut()).zip(&grad) {
                    let g = g + cfg.weight_decay * *p;
                    if cfg.momentum > 0.0 {
                        *v = cfg.momentum * *v + g;
                        *p -= cfg.lr * *v;
                    } else {
                        *p -= cfg.lr * g;
                    }
                }
            }
        }
    }

    /// Minibatches of one row, a short last batch, a batch larger than the
    /// data, full batch; an MLP whose batches also cross a block boundary.
    #[test]
    fn local_sgd_on_matrix_kernels_equals_per_sample_sgd() {
        let cases = [(Network::new(&[5, 9, 4], Head::Softmax).unwrap(), 23), (Network::new(&[3, 6, 1], Head::Sigmoid).unwrap(), 300)];
        for (net, n) in cases {
            let owned = random_data(&net, n, 4);
            let data = owned.view();
            for batch in [1, 7, n, n + 17, 0, 280] {
                let c = SgdConfig { epochs: 2, batch_size: batch, lr: 0.05, weight_decay: 0.01, momentum: 0.5, shuffle: true, seed: 42 };
                let start = net.init(1, 9).unwrap();
                let mut fast = start.clone();
                local_sgd(&net, &mut fast, &data, &c, 3).unwrap();
                let mut slow = start.clone();
                reference_local_sgd_with(&net, &mut slow, &data, &c, 3, true);
                let gap = crate::test_data::relative_gap(&fast, &slow);
                assert!(gap <= 1e-12 && fast != start, "n = {n}, batch = {batch}: gap {gap:e}");
            }
        }
    }

    #[test]
    fn local_sgd_keeps_its_definition_bit_for_bit() {
        let net = Network::new(&[3, 4, 3], Head::Softmax).unwrap();
        let owned = blobs(37, 3, 0.0);
        let data = owned.view();
        for momentum in [0.0, 0.5] {
            for shuffle in [false, true] {
                let c = SgdConfig { momentum, shuffle, ..cfg() };
                let mut got = net.init(1, 1).unwrap();
                let mut expected = got.clone();
                local_sgd(&net, &mut got, &data, &c, 4).unwrap();
                reference_local_sgd(&net, &mut expected, &data, &c, 4);
                assert_eq!(got, expected, "momentum {momentum}, shuffle {shuffle}");
            }
        }
    }

    #[test]
    fn round_is_the_same_on_one_and_two_threads() {
        let net = Network::new(&[3, 4, 3], Head::Softmax).unwrap();
        let sets: Vec<OwnedData> = (0..11).map(|k| blobs(20 + 3 * k, k as u64, 0.1 * k as f64)).collect();
        let jobs = jobs_for(&sets, true, 2);
        let global = net.init(1, 3).unwrap();
        for rule in [WeightRule::Samples, WeightRule::Validation] {
            let one = run_round(&net, &global, &jobs, &fedavg(&cfg(), rule), 1).unwrap();
            let two = run_round(&net, &global, &jobs, &fedavg(&cfg(), rule), 2).unwrap();
            assert_eq!(one.update, two.update);
        }
    }

    /// Every part of the pipeline at once, on clients with different epochs.
    #[test]
    fn whole_rounds_with_diagnostics_and_controls_are_thread_invariant() {
        let net = Network::new(&[3, 4, 3], Head::Softmax).unwrap();
        let d = net.n_params();
        let sets: Vec<OwnedData> = (0..11).map(|k| blobs(20 + 3 * k, k as u64, 0.1 * k as f64)).collect();
        let controls: Vec<Vec<f64>> = (0..11).map(|k| (0..d).map(|j| 0.01 * ((k * j) % 7) as f64 - 0.03).collect()).collect();
        let server_control: Vec<f64> = (0..d).map(|j| 0.005 * (j % 5) as f64).collect();
        let m: Vec<f64> = (0..d).map(|j| 0.001 * j as f64).collect();
        let v: Vec<f64> = (0..d).map(|j| 0.002 * j as f64).collect();
        let mut jobs = jobs_for(&sets, true, 1);
        for (k, job) in jobs.iter_mut().enumerate() {
            job.epochs = 1 + k % 3;
            job.control = (k % 4 != 0).then(|| controls[k].as_slice());
        }
        let global = net.init(1, 3).unwrap();
        let adam = LocalOptimizer::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let cases = [
            (ClientAlgorithm::Scaffold { after_step: false }, LocalOptimizer::Sgd { momentum: 0.0 }, ServerOptimizer::Yogi { lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3 }),
            (ClientAlgorithm::FedNova, LocalOptimizer::Sgd { momentum: 0.9 }, ServerOptimizer::Sgd { lr: 1.0, momentum: 0.9 }),
            (ClientAlgorithm::FedProx { mu: 0.1 }, adam, ServerOptimizer::Adam { lr: 0.05, beta1: 0.9, beta2: 0.99, tau: 1e-3 }),
        ];
        for (algorithm, optimizer, server) in cases {
            let round = RoundConfig {
                algorithm,
                local: LocalConfig { optimizer, ..cfg().local() },
                server: ServerStep { optimizer: server, m: Some(&m), v: Some(&v) },
                control: Some(&server_control),
                n_nodes: 20.0,
                ..fedavg(&cfg(), WeightRule::Validation)
            };
            let one = run_round(&net, &global, &jobs, &round, 1).unwrap();
            let two = run_round(&net, &global, &jobs, &round, 2).unwrap();
            let update = one.update.as_ref().unwrap();
            assert_eq!(one.update, two.update, "{algorithm:?}");
            assert!(update.diagnostics.update_norm > 0.0 && update.diagnostics.gradient_diversity > 0.0);
            assert!(update.cosines.iter().all(|c| c.is_finite()));
            assert_eq!(one.control, two.control);
            assert_eq!(one.client_controls, two.client_controls);
            assert_eq!(one.control.is_some(), matches!(algorithm, ClientAlgorithm::Scaffold { .. }));
            let a = |o: &RoundOutput| o.reports.iter().map(|r| r.effective_steps.to_bits()).collect::<Vec<_>>();
            assert_eq!(a(&one), a(&two));
        }
    }

    #[test]
    fn clients_run_their_own_number_of_epochs() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let sets: Vec<OwnedData> = (0..4).map(|k| blobs(11 + k, k as u64, 0.0)).collect();
        let mut jobs = jobs_for(&sets, false, 1);
        for (k, job) in jobs.iter_mut().enumerate() {
            job.epochs = k + 1;
        }
        let global = net.init(0, 0).unwrap();
        let out = run_round(&net, &global, &jobs, &fedavg(&cfg(), WeightRule::Samples), 2).unwrap();
        for (k, r) in out.reports.iter().enumerate() {
            let batches = (11 + k).div_ceil(5);
            assert_eq!(r.outcome.steps, (k + 1) * batches);
            assert_eq!(r.effective_steps, r.outcome.steps as f64);
        }
    }

    #[test]
    fn round_matches_a_sequential_weighted_mean() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let sets: Vec<OwnedData> = (0..5).map(|k| blobs(10 + 7 * k, k as u64, 0.0)).collect();
        let jobs = jobs_for(&sets, false, 2);
        let global = net.init(0, 0).unwrap();
        let out = run_round(&net, &global, &jobs, &fedavg(&cfg(), WeightRule::Samples), 2).unwrap();
        let update = out.update.unwrap();
        let mut mean_params = vec![0.0; net.n_params()];
        let total: f64 = sets.iter().map(|s| s.n as f64).sum();
        for (k, s) in sets.iter().enumerate() {
            let mut p = global.clone();
            local_sgd(&net, &mut p, &s.view(), &cfg(), k as u64).unwrap();
            for (e, v) in mean_params.iter_mut().zip(&p) {
                *e += s.n as f64 / total * v;
            }
        }
        // Server SGD(1, 0) is FedAvg: x + D is the mean of the clients' parameters.
        let expected_d: Vec<f64> = mean_params.iter().zip(&global).map(|(a, b)| a - b).collect();
        assert!(close(&update.aggregate, &expected_d, 1e-12));
        assert!(close(&update.params, &mean_params, 1e-12));
        let x_plus_d: Vec<f64> = global.iter().zip(&update.aggregate).map(|(a, b)| a + b).collect();
        assert_eq!(update.params, x_plus_d);
        assert!(update.server.m.is_none() && update.server.v.is_none());
    }

    #[test]
    fn fedsgd_update_is_minus_lr_times_the_gradient() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let sets: Vec<OwnedData> = (0..3).map(|k| blobs(9 + k, k as u64, 0.0)).collect();
        let jobs = jobs_for(&sets, false, 1);
        let global = net.init(1, 2).unwrap();
        let round = RoundConfig { work: LocalWork::Gradient, rule: WeightRule::Collect, ..fedavg(&cfg(), WeightRule::Collect) };
        let out = run_round(&net, &global, &jobs, &round, 2).unwrap();
        for (k, s) in sets.iter().enumerate() {
            let mut g = vec![0.0; net.n_params()];
            full_gradient(&net, &global, &s.view(), cfg().weight_decay, &mut g).unwrap();
            let expected: Vec<f64> = g.iter().map(|g| g * -cfg().lr).collect();
            assert_eq!(out.collected[k], expected);
            assert_eq!(out.reports[k].effective_steps, 1.0);
        }
    }

    #[test]
    fn scaffold_round_updates_the_controls_by_their_formulas() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let d = net.n_params();
        let sets: Vec<OwnedData> = (0..3).map(|k| blobs(12 + 5 * k, k as u64, 0.0)).collect();
        let c_i: Vec<Vec<f64>> = (0..3).map(|k| (0..d).map(|j| 0.02 * (j as f64 - k as f64)).collect()).collect();
        let c: Vec<f64> = (0..d).map(|j| 0.01 * (j % 3) as f64).collect();
        let mut jobs = jobs_for(&sets, false, 2);
        jobs[0].control = Some(&c_i[0]);
        jobs[2].control = Some(&c_i[2]);
        let global = net.init(1, 9).unwrap();
        let local = SgdConfig { momentum: 0.0, ..cfg() }.local();
        let round = RoundConfig { algorithm: ClientAlgorithm::Scaffold { after_step: false }, local, control: Some(&c), n_nodes: 7.0, ..fedavg(&cfg(), WeightRule::Samples) };
        let out = run_round(&net, &global, &jobs, &round, 2).unwrap();
        let new = out.client_controls.as_ref().unwrap();
        let mut change = vec![0.0; d];
        for (k, job) in jobs.iter().enumerate() {
            let mut y = global.clone();
            let terms = GradientCorrection { client_control: job.control, server_control: Some(&c), ..Default::default() };
            let outcome = local_run(&net, &mut y, &sets[k].view(), &local, 2, &terms, k as u64).unwrap();
            let tau = outcome.steps as f64;
            let old = job.control.map_or(vec![0.0; d], |c| c.to_vec());
            for j in 0..d {
                let expected = old[j] - c[j] + (global[j] - y[j]) / (tau * local.lr);
                assert!((new[k][j] - expected).abs() < 1e-12 * (1.0 + expected.abs()), "client {k}, {j}");
                change[j] += new[k][j] - old[j];
            }
        }
        let expected_c: Vec<f64> = c.iter().zip(&change).map(|(c, s)| c + s / 7.0).collect();
        assert!(close(out.control.as_ref().unwrap(), &expected_c, 1e-13));
        // Collecting the updates gives the same controls.
        let collected = run_round(&net, &global, &jobs, &RoundConfig { rule: WeightRule::Collect, ..round }, 1).unwrap();
        assert_eq!(collected.client_controls, out.client_controls);
        assert_eq!(collected.control, out.control);
    }

    #[test]
    fn fednova_round_normalises_by_effective_steps() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let sets: Vec<OwnedData> = (0..4).map(|k| blobs(10 + 6 * k, k as u64, 0.0)).collect();
        let mut jobs = jobs_for(&sets, false, 1);
        for (k, job) in jobs.iter_mut().enumerate() {
            job.epochs = 1 + k;
        }
        let global = net.init(1, 5).unwrap();
        for momentum in [0.0, 0.9] {
            let local = SgdConfig { momentum, ..cfg() }.local();
            let round = RoundConfig { algorithm: ClientAlgorithm::FedNova, local, ..fedavg(&cfg(), WeightRule::Samples) };
            let out = run_round(&net, &global, &jobs, &round, 2).unwrap();
            let collected = run_round(&net, &global, &jobs, &RoundConfig { rule: WeightRule::Collect, ..round }, 2).unwrap();
            let p: Vec<f64> = sets.iter().map(|s| s.n as f64 / sets.iter().map(|s| s.n as f64).sum::<f64>()).collect();
            let mut d = vec![0.0; net.n_params()];
            let mut mean_a = 0.0;
            for (k, r) in out.reports.iter().enumerate() {
                let tau = r.outcome.steps as f64;
                let a = if momentum == 0.0 { tau } else { (tau - momentum * (1.0 - momentum.powf(tau)) / (1.0 - momentum)) / (1.0 - momentum) };
                assert!((r.effective_steps - a).abs() < 1e-12 * a, "momentum {momentum}, client {k}");
                mean_a += p[k] * a;
                for (o, u) in d.iter_mut().zip(&collected.collected[k]) {
                    *o += p[k] * u / a;
                }
            }
            d.iter_mut().for_each(|v| *v *= mean_a);
            assert!(close(&out.update.unwrap().aggregate, &d, 1e-12), "momentum {momentum}");
        }
        // FedNova needs the SGD local optimizer.
        let adam = LocalConfig { optimizer: LocalOptimizer::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, ..cfg().local() };
        let round = RoundConfig { algorithm: ClientAlgorithm::FedNova, local: adam, ..fedavg(&cfg(), WeightRule::Samples) };
        let err = run_round(&net, &global, &jobs, &round, 1).err().unwrap();
        assert!(matches!(err, CoreError::InvalidArgument("optimizer", _)), "{err:?}");
    }

    #[test]
    fn fednova_with_equal_steps_and_plain_sgd_is_fedavg() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        // Same size for all: the same number of steps tau for every client.
        let sets: Vec<OwnedData> = (0..4).map(|k| blobs(15, k as u64, 0.2 * k as f64)).collect();
        let jobs = jobs_for(&sets, false, 3);
        let global = net.init(1, 6).unwrap();
        let sgd = SgdConfig { momentum: 0.0, ..cfg() };
        let plain = run_round(&net, &global, &jobs, &fedavg(&sgd, WeightRule::Equal), 2).unwrap().update.unwrap();
        let nova_cfg = RoundConfig { algorithm: ClientAlgorithm::FedNova, ..fedavg(&sgd, WeightRule::Equal) };
        let nova = run_round(&net, &global, &jobs, &nova_cfg, 2).unwrap().update.unwrap();
        assert!(close(&nova.aggregate, &plain.aggregate, 1e-14));
        assert_ne!(nova.aggregate, vec![0.0; net.n_params()]);
    }

    #[test]
    fn a_collected_round_folded_later_gives_the_same_round() {
        let net = Network::new(&[3, 4, 3], Head::Softmax).unwrap();
        let sets: Vec<OwnedData> = (0..6).map(|k| blobs(14 + 2 * k, k as u64, 0.0)).collect();
        let jobs = jobs_for(&sets, true, 2);
        let global = net.init(1, 8).unwrap();
        let server = ServerStep { optimizer: ServerOptimizer::Adagrad { lr: 0.1, beta1: 0.5, tau: 1e-2 }, m: None, v: None };
        for algorithm in [ClientAlgorithm::FedAvg, ClientAlgorithm::FedNova] {
            let round = RoundConfig { algorithm, server, ..fedavg(&cfg(), WeightRule::Validation) };
            let whole = run_round(&net, &global, &jobs, &round, 2).unwrap();
            let collected = run_round(&net, &global, &jobs, &RoundConfig { rule: WeightRule::Collect, ..round }, 2).unwrap();
            let updates: Vec<&[f64]> = collected.collected.iter().map(|v| v.as_slice()).collect();
            let weights: Vec<f64> = whole.reports.iter().map(|r| r.weight).collect();
            let a: Vec<f64> = collected.reports.iter().map(|r| r.effective_steps).collect();
            let rule = if algorithm == ClientAlgorithm::FedNova { FoldRule::Normalized } else { FoldRule::Mean };
            let later = fold_round(&global, &updates, &weights, Some(&a), rule, &server, true, 1).unwrap();
            assert_eq!(whole.update.unwrap(), later, "{algorithm:?}");
        }
    }

    #[test]
    fn diagnostics_can_be_switched_off() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let sets: Vec<OwnedData> = (0..3).map(|k| blobs(12, k as u64, 0.0)).collect();
        let jobs = jobs_for(&sets, false, 1);
        let global = net.init(0, 0).unwrap();
        let on = run_round(&net, &global, &jobs, &fedavg(&cfg(), WeightRule::Samples), 1).unwrap().update.unwrap();
        let round = RoundConfig { diagnostics: false, ..fedavg(&cfg(), WeightRule::Samples) };
        let off = run_round(&net, &global, &jobs, &round, 1).unwrap().update.unwrap();
        assert_eq!(on.params, off.params);
        assert!(off.client_norms.iter().chain(&off.cosines).all(|v| v.is_nan()));
        assert!(off.diagnostics.update_norm.is_nan() && off.diagnostics.cosine_mean.is_nan());
        let change: f64 = on.params.iter().zip(&global).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        assert!((on.diagnostics.update_norm - change).abs() < 1e-14);
    }

    #[test]
    fn a_failing_client_is_named() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let good = blobs(10, 1, 0.0);
        let bad = OwnedData::from_col_major(&[0.0; 6], 2, 3, &[0.0, 7.0]).unwrap();
        let sets = [good, bad];
        let jobs = jobs_for(&sets, false, 2);
        let err = run_round(&net, &net.init(0, 0).unwrap(), &jobs, &fedavg(&cfg(), WeightRule::Samples), 2).err().unwrap();
        assert!(matches!(err, CoreError::Client(1, _)));
    }

    #[test]
    fn divergence_is_an_error() {
        let net = Network::new(&[3, 1], Head::Identity).unwrap();
        let mut owned = blobs(30, 2, 0.0);
        owned.x.iter_mut().for_each(|v| *v *= 1e3);
        let data = owned.view();
        let mut params = net.init(0, 0).unwrap();
        let c = SgdConfig { lr: 10.0, epochs: 20, ..cfg() };
        assert!(matches!(local_sgd(&net, &mut params, &data, &c, 0), Err(CoreError::Diverged(_))));
    }

    /// Regression data on which SGD with a huge learning rate blows up.
    fn regression(n: usize, seed: u64) -> OwnedData {
        let mut rng = Rng::new(seed, 0);
        let x: Vec<f64> = (0..n * 3).map(|_| rng.normal()).collect();
        let y: Vec<f64> = (0..n).map(|i| x[i] - 2.0 * x[n + i] + rng.normal()).collect();
        OwnedData::from_col_major(&x, n, 3, &y).unwrap()
    }

    #[test]
    fn a_diverging_linear_model_stops_at_the_first_non_finite_loss() {
        // lr = 1e3 used to run on with loss Inf and parameters near 1e304.
        let net = Network::new(&[3, 1], Head::Identity).unwrap();
        let owned = regression(50, 1);
        let data = owned.view();
        let c = SgdConfig { lr: 1e3, epochs: 30, batch_size: 10, momentum: 0.0, weight_decay: 0.0, ..cfg() };
        let mut params = net.init(0, 0).unwrap();
        let err = local_sgd(&net, &mut params, &data, &c, 0).unwrap_err();
        let CoreError::Diverged(msg) = &err else { panic!("{err:?}") };
        assert!(msg.contains("training loss") && msg.contains("learning rate"), "{msg}");
        assert_eq!(err.kind(), "diverged");
    }

    #[test]
    fn a_diverging_client_is_named_and_classed_in_a_round() {
        let net = Network::new(&[3, 1], Head::Identity).unwrap();
        let sets: Vec<OwnedData> = (0..5).map(|k| regression(20 + k, k as u64)).collect();
        let mut jobs = jobs_for(&sets, false, 200);
        let global = net.init(0, 0).unwrap();
        let c = SgdConfig { lr: 1e3, epochs: 200, batch_size: 0, momentum: 0.0, weight_decay: 0.0, ..cfg() };
        for threads in [1, 2] {
            let err = run_round(&net, &global, &jobs, &fedavg(&c, WeightRule::Samples), threads).err().unwrap();
            // Every client diverges; the first in client order is reported.
            assert!(matches!(&err, CoreError::ClientDiverged(0, _)), "{err:?}");
            assert_eq!(err.client(), Some(0));
            assert!(err.to_string().starts_with("client 1: "), "{err}");
        }
        // FedSGD from parameters where the gradient overflows.
        let huge = vec![1e300; net.n_params()];
        let fedsgd = RoundConfig { work: LocalWork::Gradient, ..fedavg(&cfg(), WeightRule::Samples) };
        let err = run_round(&net, &huge, &jobs, &fedsgd, 2).err().unwrap();
        assert!(matches!(err, CoreError::ClientDiverged(0, _)), "{err:?}");
        // Data problems stay client errors.
        let bad = OwnedData::from_col_major(&[0.0; 4], 2, 2, &[0.0, 1.0]).unwrap();
        jobs[2].train = bad.view();
        jobs.iter_mut().for_each(|j| j.epochs = 2);
        let err = run_round(&net, &global, &jobs, &fedavg(&cfg(), WeightRule::Samples), 2).err().unwrap();
        assert!(matches!(&err, CoreError::Client(2, _)), "{err:?}");
        assert_eq!(err.kind(), "client");
    }

    #[test]
    fn a_diverging_server_step_is_a_round_error() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let sets: Vec<OwnedData> = (0..2).map(|k| blobs(12, k as u64, 0.0)).collect();
        let jobs = jobs_for(&sets, false, 1);
        let global = net.init(1, 1).unwrap();
        // A velocity carried in from a round that had already run away.
        let velocity = vec![1e308; net.n_params()];
        let round = RoundConfig {
            server: ServerStep { optimizer: ServerOptimizer::Sgd { lr: 10.0, momentum: 0.9 }, m: None, v: Some(&velocity) },
            ..fedavg(&cfg(), WeightRule::Samples)
        };
        let err = run_round(&net, &global, &jobs, &round, 1).err().unwrap();
        assert!(matches!(err, CoreError::Diverged(_)), "{err:?}");
    }

    #[test]
    fn chunk_size_follows_the_capped_thread_count() {
        assert_eq!(chunk_len(effective_threads(1000)), 4 * crate::parallel::available_threads());
    }

    /// Attacks, filter, clipping, a robust rule: the same round on 1 and 2
    /// threads, and the same as collecting the updates and folding them
    /// later with the same transforms (`rs_fold_round`'s path).
    #[test]
    fn rounds_with_transforms_are_thread_invariant_and_match_a_later_fold() {
        use crate::strategy::{fold_round_with, Aggregator, Attack, CentralNoise, Clip, NormFilter};
        let net = Network::new(&[3, 4, 3], Head::Softmax).unwrap();
        let d = net.n_params();
        let sets: Vec<OwnedData> = (0..9).map(|k| blobs(20 + 3 * k, k as u64, 0.1 * k as f64)).collect();
        let jobs = jobs_for(&sets, false, 2);
        let global = net.init(1, 3).unwrap();
        let mut attacks = vec![None; 9];
        attacks[2] = Some(Attack::Gaussian { sd: 0.5 });
        attacks[4] = Some(Attack::Scale { factor: 100.0 });
        attacks[7] = Some(Attack::SignFlip { scale: 1.0 });
        let sizes = vec![12, 4, 12, 3];
        assert_eq!(sizes.iter().sum::<usize>(), d);
        let robust = RoundTransforms {
            compression: None,
            residuals: Vec::new(),
            local_noise: None,
            attacks: attacks.clone(),
            attack_seed: 77,
            filter: Some(NormFilter { max_norm: None, mad: Some(3.0), per_layer: true, layer_sizes: Some(sizes.clone()) }),
            clip: Some(Clip { max_norm: 0.5, per_layer: true, layer_sizes: Some(sizes.clone()) }),
            aggregator: Aggregator::TrimmedMean { trim: 0.2 },
            noise: None,
        };
        let dp = RoundTransforms {
            compression: None,
            residuals: Vec::new(),
            local_noise: None,
            attacks,
            attack_seed: 77,
            filter: None,
            clip: Some(Clip { max_norm: 0.3, per_layer: false, layer_sizes: None }),
            aggregator: Aggregator::Weighted,
            noise: Some(CentralNoise { sd: 0.01, seed: 5, denominator: 12.0 }),
        };
        for (t, diagnostics) in [(&robust, true), (&robust, false), (&dp, false), (&dp, true)] {
            let round = RoundConfig { transforms: t, diagnostics, ..fedavg(&cfg(), WeightRule::Equal) };
            let one = run_round(&net, &global, &jobs, &round, 1).unwrap().update.unwrap();
            let two = run_round(&net, &global, &jobs, &round, 2).unwrap().update.unwrap();
            assert_eq!(format!("{one:?}"), format!("{two:?}"));
            // Collected updates are as the clients sent them: their own,
            // through their encoding (here the attacks), not the server's steps.
            let collected = run_round(&net, &global, &jobs, &RoundConfig { rule: WeightRule::Collect, ..round }, 2).unwrap();
            let plain = run_round(&net, &global, &jobs, &RoundConfig { rule: WeightRule::Collect, transforms: &NO_TRANSFORMS, ..round }, 2).unwrap();
            let encoded: Vec<Vec<f64>> =
                plain.collected.iter().enumerate().map(|(k, u)| t.client_on(k, jobs[k].stream).encode(Cow::Borrowed(u)).unwrap().0.into_owned()).collect();
            assert_eq!(collected.collected, encoded);
            assert_ne!(collected.collected, plain.collected);
            // The server's half, folding them later, is the simulated round.
            let server_half = RoundTransforms { attacks: Vec::new(), ..t.clone() };
            let updates: Vec<&[f64]> = collected.collected.iter().map(|v| v.as_slice()).collect();
            let later =
                fold_round_with(&global, &updates, &[1.0; 9], None, FoldRule::Mean, &round.server, diagnostics, &server_half, 2).unwrap();
            assert_eq!(format!("{one:?}"), format!("{later:?}"));
            // Given the clients' half, the server refuses rather than ignores it.
            assert!(matches!(
                fold_round_with(&global, &updates, &[1.0; 9], None, FoldRule::Mean, &round.server, diagnostics, t, 2),
                Err(CoreError::InvalidArgument("transforms", _))
            ));
            assert!(one.clipped.as_ref().unwrap().iter().flatten().any(|c| *c));
        }
        let one = run_round(&net, &global, &jobs, &RoundConfig { transforms: &robust, ..fedavg(&cfg(), WeightRule::Equal) }, 1).unwrap();
        let u = one.update.unwrap();
        // The scaled-up client is filtered out, and shows it.
        assert!(!u.kept[4] && u.filter_reasons[4].contains("MAD"), "{:?}", u.filter_reasons);
        assert!(u.cosines[4].is_nan());
        // A bad setting fails before any client trains.
        let bad = RoundTransforms { aggregator: Aggregator::Bulyan { f: Some(2) }, ..robust.clone() };
        let nova = RoundConfig { algorithm: ClientAlgorithm::FedNova, transforms: &bad, ..fedavg(&cfg(), WeightRule::Equal) };
        assert!(matches!(run_round(&net, &global, &jobs, &nova, 1), Err(CoreError::InvalidArgument("aggregator", _))));
    }

    /// The node's half from a serialised `FitIns` gives, bit for bit, the
    /// update, report, control and residual of that client in the
    /// simulated round: SCAFFOLD with momentum, attacks, top-k with error
    /// feedback, validation.
    #[test]
    fn a_client_fitted_from_its_message_is_its_part_of_the_simulated_round() {
        use crate::compress::Compressor;
        use crate::protocol::{self, AttackSpec, CompressionSpec, EncodingSpec, FitIns, FitRes, LocalSpec, ModelSpec};
        use crate::strategy::{Attack, Compression};
        let net = Network::new(&[3, 4, 3], Head::Softmax).unwrap();
        let d = net.n_params();
        let sets: Vec<OwnedData> = (0..5).map(|k| blobs(20 + 3 * k, k as u64, 0.1 * k as f64)).collect();
        let controls: Vec<Vec<f64>> = (0..5).map(|k| (0..d).map(|j| 0.01 * ((k * j) % 7) as f64 - 0.03).collect()).collect();
        let residuals: Vec<Option<Vec<f64>>> = (0..5).map(|k| (k % 2 == 0).then(|| (0..d).map(|j| 1e-3 * ((j + k) % 5) as f64).collect())).collect();
        let server_control: Vec<f64> = (0..d).map(|j| 0.005 * (j % 5) as f64).collect();
        let mut jobs = jobs_for(&sets, true, 2);
        for (k, job) in jobs.iter_mut().enumerate() {
            job.control = Some(&controls[k]);
            job.stream = 10 + 3 * k as u64;
        }
        let transforms = RoundTransforms {
            attacks: vec![None, Some(Attack::Scale { factor: 3.0 }), None, Some(Attack::Gaussian { sd: 0.5 }), None],
            attack_seed: 99,
            compression: Some(Compression { compressor: Compressor::TopK { fraction: 0.3, error_feedback: true }, seed: 5 }),
            residuals: residuals.clone(),
            ..RoundTransforms::NONE
        };
        let local = SgdConfig { momentum: 0.5, ..cfg() }.local();
        let round = RoundConfig {
            algorithm: ClientAlgorithm::Scaffold { after_step: false },
            control: Some(&server_control),
            n_nodes: 9.0,
            rule: WeightRule::Collect,
            transforms: &transforms,
            local,
            ..fedavg(&cfg(), WeightRule::Collect)
        };
        let global = net.init(1, 3).unwrap();
        let sim = run_round(&net, &global, &jobs, &round, 2).unwrap();
        for k in 0..5 {
            let attack = transforms.attacks[k].map(|a| match a {
                Attack::Scale { factor } => AttackSpec { kind: "scale".into(), value: factor },
                Attack::Gaussian { sd } => AttackSpec { kind: "gaussian".into(), value: sd },
                _ => unreachable!(),
            });
            let ins = FitIns {
                round: 4,
                committed_round: 3,
                node_round: 0,
                node: format!("node{k}"),
                stream: jobs[k].stream,
                epochs: 2,
                max_steps: None,
                validation: true,
                model: ModelSpec { sizes: vec![3, 4, 3], head: 2, bits: 64, custom: None, ..Default::default() },
                local: LocalSpec {
                    work: "sgd".into(),
                    algorithm: "scaffold".into(),
                    mu: 0.0,
                    optimizer: "sgd".into(),
                    momentum: 0.5,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    alpha: 0.99,
                    batch_size: local.batch_size,
                    lr: local.lr,
                    weight_decay: local.weight_decay,
                    shuffle: local.shuffle,
                    seed: local.seed,
                    weights: "collect".into(),
                },
                encoding: EncodingSpec {
                    attack,
                    attack_seed: 99,
                    compression: Some(CompressionSpec { kind: "topk".into(), fraction: 0.3, error_feedback: true, bits: 0, stochastic: false, seed: 5 }),
                    local_dp: None,
                },
                params: global.clone(),
                server_control: Some(server_control.clone()),
            };
            // Through the wire and back, on the node's side.
            let ins: FitIns = protocol::decode(&protocol::encode(&ins).unwrap()).unwrap();
            let view = sets[k].view();
            let res = crate::client::fit_message(&ins, &view, Some(&view), Some(&controls[k]), residuals[k].as_deref()).unwrap();
            let res: FitRes = protocol::decode(&protocol::encode(&res).unwrap()).unwrap();
            assert_eq!(res.update, sim.collected[k], "client {k}");
            assert_eq!(res.control.as_ref(), Some(&sim.client_controls.as_ref().unwrap()[k]));
            assert_eq!(res.residual, sim.residuals[k]);
            let report = &sim.reports[k];
            assert_eq!((res.n_samples, res.train_loss, res.steps), (report.outcome.n_samples as f64, report.outcome.train_loss, report.outcome.steps as f64));
            assert_eq!(res.val_loss, report.validation.map(|e| e.loss));
        }
    }
}