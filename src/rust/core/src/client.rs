//! The client's half of a round: its local work from the global
//! parameters (the client algorithm steering the local optimizer), its
//! report, and the encoding of what it sends (local DP, a simulated attack,
//! compression). `train::run_round` runs it for every client of a
//! simulated round, in parallel; a node in another process runs it on a
//! `protocol::FitIns` (`fit_message`).

use std::borrow::Cow;

use crate::alloc::try_copy;
use crate::error::{invalid, CoreError, CoreResult};
use crate::model::{Dataset, Evaluation, Network};
use crate::strategy::client::{fednova_steps, full_gradient, local_run_partial, scaffold_client_control};
use crate::strategy::{ClientAlgorithm, ClientEncoding, LocalConfig, LocalOptimizer, LocalOutcome};

/// What each client computes in a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalWork {
    /// Local training; update = new minus global parameters.
    Sgd,
    /// FedSGD: the full-batch gradient g at the global parameters; update = -lr g.
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
    /// No fold and no server step: every client's update is returned (for
    /// weights computed in R after the round).
    Collect,
}

pub struct ClientJob<'a> {
    pub train: Dataset<'a>,
    pub validation: Option<Dataset<'a>>,
    /// Stream of the round seed this client draws its sample order from.
    pub stream: u64,
    /// Local epochs of this client (clients may differ).
    pub epochs: usize,
    /// SCAFFOLD: this client's control c_i (absent = zeros).
    pub control: Option<&'a [f64]>,
    /// Partial work: at most this many local steps (a deadline cut it off).
    pub max_steps: Option<usize>,
}

#[derive(Clone, Copy, Debug)]
pub struct ClientReport {
    pub outcome: LocalOutcome,
    pub validation: Option<Evaluation>,
    pub weight: f64,
    /// FedNova's effective steps a_i; the local steps tau_i otherwise.
    pub effective_steps: f64,
}

/// What a client needs to know of its round besides its own data and state.
#[derive(Clone, Copy, Debug)]
pub struct FitConfig<'a> {
    pub work: LocalWork,
    /// Ignored for `LocalWork::Gradient`.
    pub algorithm: ClientAlgorithm,
    pub local: LocalConfig,
    pub rule: WeightRule,
    /// SCAFFOLD: the server control c (absent = zeros).
    pub server_control: Option<&'a [f64]>,
}

impl FitConfig<'_> {
    pub fn scaffold(&self) -> bool {
        self.work == LocalWork::Sgd && matches!(self.algorithm, ClientAlgorithm::Scaffold { .. })
    }
}

/// What a client sends back, and the state it keeps.
pub struct ClientFit {
    /// Its update Delta_i as sent (after its encoding).
    pub update: Vec<f64>,
    pub report: ClientReport,
    /// SCAFFOLD: its new control c_i.
    pub new_control: Option<Vec<f64>>,
    /// Error feedback: its new residual.
    pub residual: Option<Vec<f64>>,
}

/// Client `k`'s half of a round (`k` names it in errors): local work from
/// `global` on `job`'s data, its report, and its update encoded by
/// `encoding`. A failure is `CoreError::Client(k, ..)`, or
/// `CoreError::ClientDiverged(k, ..)` when its training diverged or gave a
/// non-finite loss or update; running out of memory stays a `Memory` error.
pub fn fit(net: &Network, global: &[f64], job: &ClientJob<'_>, cfg: &FitConfig<'_>, encoding: &ClientEncoding<'_>, k: usize) -> CoreResult<ClientFit> {
    let fail = |e: CoreError| in_client(k, e);
    net.check_data(&job.train).map_err(fail)?;
    let mut vector = try_copy(global, "a client's copy of the parameters").map_err(fail)?;
    let outcome = match cfg.work {
        LocalWork::Sgd => {
            let correction = cfg.algorithm.correction(global, job.control, cfg.server_control);
            local_run_partial(net, &mut vector, &job.train, &cfg.local, job.epochs, &correction, job.stream, job.max_steps)
                .map_err(fail)?
        }
        LocalWork::Gradient => full_gradient(net, global, &job.train, cfg.local.weight_decay, &mut vector).map_err(fail)?,
    };
    // Whatever the local work, nothing non-finite may reach the fold.
    if !outcome.train_loss.is_finite() {
        return Err(CoreError::ClientDiverged(k, format!("returned a non-finite training loss ({})", outcome.train_loss)));
    }
    let validation = match job.validation {
        Some(v) => {
            net.check_data(&v).map_err(fail)?;
            let at = if cfg.work == LocalWork::Sgd { &vector[..] } else { global };
            Some(net.evaluate(at, &v).map_err(fail)?)
        }
        None => None,
    };
    let new_control = if cfg.scaffold() {
        Some(scaffold_client_control(job.control, cfg.server_control, global, &vector, outcome.steps, cfg.local.lr).map_err(fail)?)
    } else {
        None
    };
    // `vector` becomes the update Delta_i in place.
    match cfg.work {
        LocalWork::Sgd => vector.iter_mut().zip(global).for_each(|(y, x)| *y -= x),
        LocalWork::Gradient => vector.iter_mut().for_each(|g| *g *= -cfg.local.lr),
    }
    if let Some(i) = vector.iter().position(|v| !v.is_finite()) {
        return Err(CoreError::ClientDiverged(k, format!("returned a non-finite value ({}) at position {}", vector[i], i + 1)));
    }
    let weight = match cfg.rule {
        WeightRule::Samples => outcome.n_samples as f64,
        WeightRule::Equal | WeightRule::Collect => 1.0,
        WeightRule::Validation => match validation {
            Some(e) if net.head.is_classifier() => e.metric,
            Some(e) => 1.0 / (1.0 + e.metric),
            None => return Err(CoreError::Client(k, "has no validation data for accuracy weights".into())),
        },
    };
    let effective_steps = match (cfg.work, cfg.algorithm, cfg.local.optimizer) {
        (LocalWork::Sgd, ClientAlgorithm::FedNova, LocalOptimizer::Sgd { momentum }) => fednova_steps(outcome.steps, momentum),
        _ => outcome.steps as f64,
    };
    let (update, residual) = if encoding.is_none() {
        (vector, None)
    } else {
        let (sent, residual) = encoding.encode(Cow::Owned(vector))?;
        (sent.into_owned(), residual)
    };
    Ok(ClientFit { update, report: ClientReport { outcome, validation, weight, effective_steps }, new_control, residual })
}

/// An error of client `k`'s own work, attributed to it.
pub(crate) fn in_client(k: usize, e: CoreError) -> CoreError {
    match e {
        CoreError::InvalidArgument(arg, msg) => CoreError::Client(k, format!("`{arg}` {msg}")),
        CoreError::Client(_, msg) => CoreError::Client(k, msg),
        CoreError::Diverged(msg) | CoreError::ClientDiverged(_, msg) => CoreError::ClientDiverged(k, msg),
        CoreError::Memory(msg) => CoreError::Memory(format!("client {}: {msg}", k + 1)),
    }
}

/// The network a `FitIns` or `EvalIns` names.
pub fn network_of(model: &crate::protocol::ModelSpec) -> CoreResult<Network> {
    use crate::model::{Head, Precision};
    if let Some(c) = &model.custom {
        return invalid("model", format!("is the custom model \"{}\", which trains in R on the node", c.name));
    }
    Network::from_parts(&model.sizes, Head::from_code(model.head)?, Precision::from_code(model.bits)?, &model.input, &model.front)
}

/// The client's settings a `FitIns` carries.
pub fn fit_config_of(spec: &crate::protocol::LocalSpec) -> CoreResult<(LocalWork, ClientAlgorithm, LocalConfig, WeightRule)> {
    use crate::protocol::{algorithm_named, optimizer_named, weight_rule_named, work_named};
    let work = work_named(&spec.work)?;
    // FedSGD sends a gradient whatever the algorithm says.
    let algorithm = match work {
        LocalWork::Gradient => ClientAlgorithm::FedAvg,
        LocalWork::Sgd => algorithm_named(&spec.algorithm, |_| Ok(spec.mu))?,
    };
    let optimizer = optimizer_named(&spec.optimizer, |field| {
        Ok(match field {
            "momentum" => spec.momentum,
            "beta1" => spec.beta1,
            "beta2" => spec.beta2,
            "eps" => spec.eps,
            _ => spec.alpha,
        })
    })?;
    let local = LocalConfig {
        batch_size: spec.batch_size,
        lr: spec.lr,
        weight_decay: spec.weight_decay,
        shuffle: spec.shuffle,
        seed: spec.seed,
        optimizer,
    };
    local.check()?;
    if work == LocalWork::Sgd {
        algorithm.check(&optimizer)?;
    }
    Ok((work, algorithm, local, weight_rule_named(&spec.weights)?))
}

/// The encoding a `FitIns` asks of the node, with the residual the node
/// kept from its last round.
pub fn encoding_of<'a>(ins: &crate::protocol::FitIns, residual: Option<&'a [f64]>) -> CoreResult<ClientEncoding<'a>> {
    use crate::strategy::LocalNoise;
    let e = &ins.encoding;
    let encoding = ClientEncoding {
        local_noise: e.local_dp.map(|l| LocalNoise { clip: l.clip, sd: l.sd, seed: l.seed }),
        attack: e.attack.as_ref().map(|a| a.attack()).transpose()?,
        attack_seed: e.attack_seed,
        compression: e.compression.as_ref().map(|c| c.compression()).transpose()?,
        residual,
        stream: ins.stream,
        client: 0,
    };
    encoding.check(ins.params.len())?;
    Ok(encoding)
}

/// A node's half of a round from a `FitIns`: its local work on its own
/// data, with its own state (SCAFFOLD's `control`, its error-feedback
/// `residual`), answered as a `FitRes`. The same computation as the
/// client's part of a simulated round (`train::run_round`), number for
/// number.
pub fn fit_message(
    ins: &crate::protocol::FitIns,
    train: &Dataset<'_>,
    validation: Option<&Dataset<'_>>,
    control: Option<&[f64]>,
    residual: Option<&[f64]>,
) -> CoreResult<crate::protocol::FitRes> {
    let net = network_of(&ins.model)?;
    let d = net.n_params();
    if ins.params.len() != d {
        return invalid("params", format!("has {} values, the model has {d}", ins.params.len()));
    }
    if control.is_some_and(|c| c.len() != d) {
        return invalid("control", format!("does not have {d} values"));
    }
    let (work, algorithm, local, rule) = fit_config_of(&ins.local)?;
    let cfg = FitConfig { work, algorithm, local, rule, server_control: ins.server_control.as_deref() };
    let job = ClientJob {
        train: *train,
        validation: if ins.validation { validation.copied() } else { None },
        stream: ins.stream,
        epochs: ins.epochs,
        control: if cfg.scaffold() { control } else { None },
        max_steps: ins.max_steps,
    };
    let encoding = encoding_of(ins, residual)?;
    let fit = fit(&net, &ins.params, &job, &cfg, &encoding, 0)?;
    let report = fit.report;
    Ok(crate::protocol::FitRes {
        round: ins.round,
        node: ins.node.clone(),
        n_samples: report.outcome.n_samples as f64,
        train_loss: report.outcome.train_loss,
        steps: report.outcome.steps as f64,
        effective_steps: report.effective_steps,
        weight: report.weight,
        val_loss: report.validation.map(|e| e.loss),
        val_metric: report.validation.map(|e| e.metric),
        update: fit.update,
        control: fit.new_control,
        residual: fit.residual,
    })
}

/// A node's answer to an `EvalIns`: the global parameters evaluated on the
/// node's data of the asked split (the caller passes that split's data).
pub fn evaluate_message(ins: &crate::protocol::EvalIns, data: &Dataset<'_>) -> CoreResult<crate::protocol::EvalRes> {
    let net = network_of(&ins.model)?;
    if ins.params.len() != net.n_params() {
        return invalid("params", format!("has {} values, the model has {}", ins.params.len(), net.n_params()));
    }
    let ev = net.evaluate(&ins.params, data)?;
    Ok(crate::protocol::EvalRes { round: ins.round, node: ins.node.clone(), n: ev.n as f64, loss: ev.loss, metric: ev.metric })
}
