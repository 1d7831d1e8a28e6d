//! Local training on one client, and a federated round over many clients.
//!
//! A round trains the selected clients in parallel and folds each result into
//! one running weighted sum in client order, a chunk of clients at a time, so
//! memory stays at (chunk x parameters) whatever the number of clients and
//! the sum is the same on any number of threads.

use rayon::prelude::*;

use crate::alloc::{try_copy, try_with_capacity, try_zeroed};
use crate::error::{invalid, CoreError, CoreResult};
use crate::model::{Dataset, Evaluation, Network};
use crate::parallel::{effective_threads, with_threads};
use crate::rng::Rng;

/// Minibatch SGD settings of one local run.
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
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return invalid("lr", "must be a positive number");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return invalid("weight_decay", "must be >= 0");
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return invalid("momentum", "must be in [0, 1)");
        }
        Ok(())
    }
}

/// What a client did in one local run.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalOutcome {
    pub n_samples: usize,
    /// Mean loss over every sample seen, each scored before its step.
    pub train_loss: f64,
    pub steps: usize,
}

/// Runs local minibatch SGD from `params` (updated in place). The sample
/// order comes from the client's own stream `stream` of `cfg.seed`.
pub fn local_sgd(net: &Network, params: &mut [f64], data: &Dataset, cfg: &SgdConfig, stream: u64) -> CoreResult<LocalOutcome> {
    cfg.check()?;
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { local_sgd_avx2(net, params, data, cfg, stream) };
        }
    }
    local_sgd_body(net, params, data, cfg, stream)
}

/// The same code compiled for AVX2: four doubles per instruction instead of
/// two. No FMA, so every operation rounds exactly as in the portable build
/// and results are the same on every x86-64 machine.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn local_sgd_avx2(net: &Network, params: &mut [f64], data: &Dataset, cfg: &SgdConfig, stream: u64) -> CoreResult<LocalOutcome> {
    local_sgd_body(net, params, data, cfg, stream)
}

#[inline(always)]
fn local_sgd_body(net: &Network, params: &mut [f64], data: &Dataset, cfg: &SgdConfig, stream: u64) -> CoreResult<LocalOutcome> {
    let n = data.n;
    let batch = if cfg.batch_size == 0 || cfg.batch_size > n { n } else { cfg.batch_size };
    let mut ws = net.workspace()?;
    let mut grad = net.zeroed_params("the gradient")?;
    let mut velocity = if cfg.momentum > 0.0 { net.zeroed_params("the momentum velocity")? } else { Vec::new() };
    let mut order = all_rows(n)?;
    let mut rng = Rng::new(cfg.seed, stream);
    let (mut loss_sum, mut steps) = (0.0, 0);
    for epoch in 1..=cfg.epochs {
        if cfg.shuffle {
            for i in (1..n).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
        }
        for rows in order.chunks(batch) {
            let loss = net.loss_grad(params, data, rows, &mut grad, &mut ws);
            steps += 1;
            // Checked every step because it costs nothing: a diverging run
            // stops at once instead of spending its epochs on Inf and NaN.
            if !loss.is_finite() {
                return Err(CoreError::Diverged(format!(
                    "the training loss became {loss} at step {steps} (epoch {epoch}); the learning rate {} is probably too large",
                    cfg.lr
                )));
            }
            loss_sum += loss * rows.len() as f64;
            if cfg.weight_decay > 0.0 {
                for (g, p) in grad.iter_mut().zip(params.iter()) {
                    *g += cfg.weight_decay * p;
                }
            }
            if cfg.momentum > 0.0 {
                for ((p, v), g) in params.iter_mut().zip(velocity.iter_mut()).zip(&grad) {
                    *v = cfg.momentum * *v + g;
                    *p -= cfg.lr * *v;
                }
            } else {
                for (p, g) in params.iter_mut().zip(&grad) {
                    *p -= cfg.lr * g;
                }
            }
        }
        // Once per epoch: a scan of every parameter costs as much as a step.
        if let Some(bad) = params.iter().find(|p| !p.is_finite()) {
            return Err(CoreError::Diverged(format!(
                "a parameter became {bad} in epoch {epoch}; the learning rate {} is probably too large",
                cfg.lr
            )));
        }
    }
    let train_loss = loss_sum / (n * cfg.epochs) as f64;
    if !train_loss.is_finite() {
        return Err(CoreError::Diverged(format!(
            "the mean training loss overflowed to {train_loss}; the learning rate {} is probably too large",
            cfg.lr
        )));
    }
    Ok(LocalOutcome { n_samples: n, train_loss, steps })
}

/// Row indices 0..n, the sample order of a run.
fn all_rows(n: usize) -> CoreResult<Vec<usize>> {
    let mut rows = try_with_capacity(n, "the sample order")?;
    rows.extend(0..n);
    Ok(rows)
}

/// Full-batch gradient at `params` (with weight decay) and the mean loss: the
/// work of a FedSGD client.
pub fn full_gradient(net: &Network, params: &[f64], data: &Dataset, weight_decay: f64, grad: &mut [f64]) -> CoreResult<LocalOutcome> {
    let rows = all_rows(data.n)?;
    let mut ws = net.workspace()?;
    let loss = net.loss_grad(params, data, &rows, grad, &mut ws);
    if weight_decay > 0.0 {
        for (g, p) in grad.iter_mut().zip(params) {
            *g += weight_decay * p;
        }
    }
    if !loss.is_finite() || !grad.iter().all(|g| g.is_finite()) {
        return Err(CoreError::Diverged(
            "the loss or gradient is not finite at the global parameters; the learning rate is probably too large".into(),
        ));
    }
    Ok(LocalOutcome { n_samples: data.n, train_loss: loss, steps: 1 })
}

/// What each client sends back in a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalWork {
    /// FedAvg: local SGD, send the new parameters.
    Sgd,
    /// FedSGD: send the full-batch gradient at the global parameters.
    Gradient,
}

/// How a client's result is weighted in the aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightRule {
    Samples,
    Equal,
    /// The trained model's accuracy (or, for regression, 1 / (1 + RMSE)) on
    /// the client's validation data.
    Validation,
    /// No aggregate: every client's vector is returned (for weights computed
    /// in R after the round).
    Collect,
}

pub struct ClientJob<'a> {
    pub train: &'a Dataset,
    pub validation: Option<&'a Dataset>,
    /// Stream of the round seed this client draws its sample order from.
    pub stream: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct ClientReport {
    pub outcome: LocalOutcome,
    pub validation: Option<Evaluation>,
    pub weight: f64,
}

pub struct RoundOutput {
    /// Weighted mean of the clients' vectors (parameters or gradients);
    /// empty for `WeightRule::Collect`.
    pub aggregate: Vec<f64>,
    pub reports: Vec<ClientReport>,
    pub collected: Vec<Vec<f64>>,
}

/// Clients processed together before folding into the running sum.
fn chunk_len(threads: usize) -> usize {
    4 * threads.max(1)
}

/// One federated round: local work on every client in `jobs` starting from
/// `global`, in parallel, then the weighted mean. A failing client is
/// reported as `CoreError::Client(index in jobs, message)`, or as
/// `CoreError::ClientDiverged` when its training diverged or it returned a
/// non-finite loss or vector; running out of memory stays a `Memory` error.
/// The first failure in client order is reported, on any number of threads.
pub fn run_round(
    net: &Network,
    global: &[f64],
    jobs: &[ClientJob<'_>],
    work: LocalWork,
    cfg: &SgdConfig,
    rule: WeightRule,
    threads: usize,
) -> CoreResult<RoundOutput> {
    if global.len() != net.n_params() {
        return invalid("params", format!("has {} values, the model has {}", global.len(), net.n_params()));
    }
    if jobs.is_empty() {
        return invalid("clients", "no clients selected");
    }
    cfg.check()?;
    let d = net.n_params();
    // The thread count sets only how many clients are in memory at once,
    // never the result.
    let effective = effective_threads(threads);
    let one_client = |k: usize| -> CoreResult<(Vec<f64>, ClientReport)> {
        let job = &jobs[k];
        let fail = |e: CoreError| in_client(k, e);
        net.check_data(job.train).map_err(fail)?;
        let mut vector = try_copy(global, "a client's copy of the parameters").map_err(fail)?;
        let outcome = match work {
            LocalWork::Sgd => local_sgd(net, &mut vector, job.train, cfg, job.stream).map_err(fail)?,
            LocalWork::Gradient => {
                let mut grad = net.zeroed_params("a client's gradient").map_err(fail)?;
                let out = full_gradient(net, global, job.train, cfg.weight_decay, &mut grad).map_err(fail)?;
                vector = grad;
                out
            }
        };
        // Whatever the local work, nothing non-finite may reach the aggregate.
        if !outcome.train_loss.is_finite() {
            return Err(CoreError::ClientDiverged(k, format!("returned a non-finite training loss ({})", outcome.train_loss)));
        }
        if let Some(i) = vector.iter().position(|v| !v.is_finite()) {
            return Err(CoreError::ClientDiverged(k, format!("returned a non-finite value ({}) at position {}", vector[i], i + 1)));
        }
        let validation = match job.validation {
            Some(v) => {
                net.check_data(v).map_err(fail)?;
                let at = if work == LocalWork::Sgd { &vector[..] } else { global };
                Some(net.evaluate(at, v).map_err(fail)?)
            }
            None => None,
        };
        let weight = match rule {
            WeightRule::Samples => outcome.n_samples as f64,
            WeightRule::Equal | WeightRule::Collect => 1.0,
            WeightRule::Validation => match validation {
                Some(e) if net.head.is_classifier() => e.metric,
                Some(e) => 1.0 / (1.0 + e.metric),
                None => return Err(CoreError::Client(k, "has no validation data for accuracy weights".into())),
            },
        };
        Ok((vector, ClientReport { outcome, validation, weight }))
    };

    with_threads(threads, || {
        let mut sum = if rule == WeightRule::Collect { Vec::new() } else { try_zeroed(d, "the round's aggregate")? };
        let mut reports = Vec::with_capacity(jobs.len());
        let mut collected = Vec::new();
        let indices: Vec<usize> = (0..jobs.len()).collect();
        for chunk in indices.chunks(chunk_len(effective)) {
            let results: Vec<CoreResult<(Vec<f64>, ClientReport)>> = chunk.par_iter().map(|&k| one_client(k)).collect();
            for result in results {
                let (vector, report) = result?;
                if rule == WeightRule::Collect {
                    collected.push(vector);
                } else {
                    for (s, v) in sum.iter_mut().zip(&vector) {
                        *s += report.weight * v;
                    }
                }
                reports.push(report);
            }
        }
        if rule != WeightRule::Collect {
            let total: f64 = reports.iter().map(|r| r.weight).sum();
            if !(total > 0.0 && total.is_finite()) {
                return invalid("weights", "the clients' weights sum to zero (every selected client has zero validation accuracy?)");
            }
            sum.iter_mut().for_each(|s| *s /= total);
            // Finite vectors can still sum past the largest double.
            if sum.iter().any(|s| !s.is_finite()) {
                return Err(CoreError::Diverged(
                    "the weighted mean of the clients' vectors overflowed; the learning rate is probably too large".into(),
                ));
            }
        }
        Ok(RoundOutput { aggregate: sum, reports, collected })
    })
}

/// Evaluates one parameter vector on many data sets in parallel.
pub fn evaluate_many(net: &Network, params: &[f64], data: &[&Dataset], threads: usize) -> CoreResult<Vec<Evaluation>> {
    if params.len() != net.n_params() {
        return invalid("params", format!("has {} values, the model has {}", params.len(), net.n_params()));
    }
    let results: Vec<CoreResult<Evaluation>> = with_threads(threads, || {
        data.par_iter()
            .enumerate()
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

/// An error of client `k`'s work, attributed to it and kept in its class.
fn in_client(k: usize, e: CoreError) -> CoreError {
    match e {
        CoreError::InvalidArgument(arg, msg) => CoreError::Client(k, format!("`{arg}` {msg}")),
        CoreError::Client(_, msg) => CoreError::Client(k, msg),
        CoreError::Diverged(msg) | CoreError::ClientDiverged(_, msg) => CoreError::ClientDiverged(k, msg),
        CoreError::Memory(msg) => CoreError::Memory(format!("client {}: {msg}", k + 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Head;

    fn blobs(n: usize, seed: u64, shift: f64) -> Dataset {
        let mut rng = Rng::new(seed, 0);
        let p = 3;
        let mut x = vec![0.0; n * p];
        let mut y = vec![0.0; n];
        for i in 0..n {
            let class = rng.below(3) as usize;
            y[i] = class as f64;
            for j in 0..p {
                x[j * n + i] = rng.normal() + if j == class { 2.0 + shift } else { 0.0 };
            }
        }
        Dataset::from_col_major(&x, n, p, &y).unwrap()
    }

    fn cfg() -> SgdConfig {
        SgdConfig { epochs: 2, batch_size: 5, lr: 0.1, weight_decay: 0.01, momentum: 0.5, shuffle: true, seed: 42 }
    }

    #[test]
    fn local_sgd_lowers_the_loss() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let data = blobs(60, 1, 0.0);
        let mut params = net.init(0, 0).unwrap();
        let before = net.evaluate(&params, &data).unwrap().loss;
        let out = local_sgd(&net, &mut params, &data, &cfg(), 0).unwrap();
        assert_eq!(out.steps, 2 * 12);
        assert!(net.evaluate(&params, &data).unwrap().loss < 0.5 * before);
    }

    #[test]
    fn round_is_the_same_on_one_and_two_threads() {
        let net = Network::new(&[3, 4, 3], Head::Softmax).unwrap();
        let sets: Vec<Dataset> = (0..11).map(|k| blobs(20 + 3 * k, k as u64, 0.1 * k as f64)).collect();
        let jobs: Vec<ClientJob> = sets.iter().enumerate().map(|(k, d)| ClientJob { train: d, validation: Some(d), stream: k as u64 }).collect();
        let global = net.init(1, 3).unwrap();
        for rule in [WeightRule::Samples, WeightRule::Validation] {
            let one = run_round(&net, &global, &jobs, LocalWork::Sgd, &cfg(), rule, 1).unwrap();
            let two = run_round(&net, &global, &jobs, LocalWork::Sgd, &cfg(), rule, 2).unwrap();
            assert_eq!(one.aggregate, two.aggregate);
        }
    }

    #[test]
    fn round_matches_a_sequential_weighted_mean() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let sets: Vec<Dataset> = (0..5).map(|k| blobs(10 + 7 * k, k as u64, 0.0)).collect();
        let jobs: Vec<ClientJob> = sets.iter().enumerate().map(|(k, d)| ClientJob { train: d, validation: None, stream: k as u64 }).collect();
        let global = net.init(0, 0).unwrap();
        let out = run_round(&net, &global, &jobs, LocalWork::Sgd, &cfg(), WeightRule::Samples, 2).unwrap();
        let mut expected = vec![0.0; net.n_params()];
        let total: f64 = sets.iter().map(|s| s.n as f64).sum();
        for (k, s) in sets.iter().enumerate() {
            let mut p = global.clone();
            local_sgd(&net, &mut p, s, &cfg(), k as u64).unwrap();
            for (e, v) in expected.iter_mut().zip(&p) {
                *e += s.n as f64 / total * v;
            }
        }
        for (a, b) in out.aggregate.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn a_failing_client_is_named() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let good = blobs(10, 1, 0.0);
        let bad = Dataset::from_col_major(&[0.0; 6], 2, 3, &[0.0, 7.0]).unwrap();
        let jobs = vec![
            ClientJob { train: &good, validation: None, stream: 0 },
            ClientJob { train: &bad, validation: None, stream: 1 },
        ];
        let err = run_round(&net, &net.init(0, 0).unwrap(), &jobs, LocalWork::Sgd, &cfg(), WeightRule::Samples, 2).err().unwrap();
        assert!(matches!(err, CoreError::Client(1, _)));
    }

    #[test]
    fn divergence_is_an_error() {
        let net = Network::new(&[3, 1], Head::Identity).unwrap();
        let mut data = blobs(30, 2, 0.0);
        data.x.iter_mut().for_each(|v| *v *= 1e3);
        let mut params = net.init(0, 0).unwrap();
        let c = SgdConfig { lr: 10.0, epochs: 20, ..cfg() };
        assert!(matches!(local_sgd(&net, &mut params, &data, &c, 0), Err(CoreError::Diverged(_))));
    }

    /// Regression data on which SGD with a huge learning rate blows up.
    fn regression(n: usize, seed: u64) -> Dataset {
        let mut rng = Rng::new(seed, 0);
        let x: Vec<f64> = (0..n * 3).map(|_| rng.normal()).collect();
        let y: Vec<f64> = (0..n).map(|i| x[i] - 2.0 * x[n + i] + rng.normal()).collect();
        Dataset::from_col_major(&x, n, 3, &y).unwrap()
    }

    #[test]
    fn a_diverging_linear_model_stops_at_the_first_non_finite_loss() {
        // lr = 1e3 used to run on with loss Inf and parameters near 1e304.
        let net = Network::new(&[3, 1], Head::Identity).unwrap();
        let data = regression(50, 1);
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
        let sets: Vec<Dataset> = (0..5).map(|k| regression(20 + k, k as u64)).collect();
        let mut jobs: Vec<ClientJob> = sets.iter().enumerate().map(|(k, d)| ClientJob { train: d, validation: None, stream: k as u64 }).collect();
        let global = net.init(0, 0).unwrap();
        let c = SgdConfig { lr: 1e3, epochs: 200, batch_size: 0, momentum: 0.0, weight_decay: 0.0, ..cfg() };
        for threads in [1, 2] {
            let err = run_round(&net, &global, &jobs, LocalWork::Sgd, &c, WeightRule::Samples, threads).err().unwrap();
            // Every client diverges; the first in client order is reported.
            assert!(matches!(&err, CoreError::ClientDiverged(0, _)), "{err:?}");
            assert_eq!(err.client(), Some(0));
            assert!(err.to_string().starts_with("client 1: "), "{err}");
        }
        // FedSGD from parameters where the gradient overflows.
        let huge = vec![1e300; net.n_params()];
        let err = run_round(&net, &huge, &jobs, LocalWork::Gradient, &cfg(), WeightRule::Samples, 2).err().unwrap();
        assert!(matches!(err, CoreError::ClientDiverged(0, _)), "{err:?}");
        // Data problems stay client errors.
        let bad = Dataset::from_col_major(&[0.0; 4], 2, 2, &[0.0, 1.0]).unwrap();
        jobs[2].train = &bad;
        let err = run_round(&net, &global, &jobs, LocalWork::Sgd, &cfg(), WeightRule::Samples, 2).err().unwrap();
        assert!(matches!(&err, CoreError::Client(2, _)), "{err:?}");
        assert_eq!(err.kind(), "client");
    }

    #[test]
    fn chunk_size_follows_the_capped_thread_count() {
        assert_eq!(chunk_len(effective_threads(1000)), 4 * crate::parallel::available_threads());
    }
}
