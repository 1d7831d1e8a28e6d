//! Client algorithms: the local run a client does in a round, and the
//! per-client quantities its algorithm derives from it.
//!
//! Every step's gradient is the mean minibatch gradient g at the local
//! parameters y, then, in this order: `g + wd y` (weight decay),
//! `+ mu (y - x)` (FedProx's proximal term, x = global parameters) and
//! `- c_i + c` (SCAFFOLD's drift correction). The local optimizer then steps
//! along it. SCAFFOLD's correction can instead be applied after the step,
//! `y -= lr (c - c_i)`, outside the optimizer's momentum (`after_step`; what
//! NIID-Bench and Flower's baseline do with momentum SGD).

use crate::alloc::{try_with_capacity, try_zeroed};
use crate::error::{invalid, num, CoreError, CoreResult};
use crate::model::{Dataset, Network, Precision};
use crate::rng::Rng;
use crate::strategy::local_opt::{LocalOptState, LocalOptimizer};

/// How a client's local run is steered, and how its update is used.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClientAlgorithm {
    /// Local training, update = new minus global parameters (McMahan et al. 2017).
    FedAvg,
    /// FedAvg with the proximal term `mu / 2 ||y - x||^2` (Li et al. 2020).
    FedProx { mu: f64 },
    /// Drift correction by control variates, option II (Karimireddy et al.
    /// 2020); `after_step`: the correction is applied after the optimizer's
    /// step rather than added to the gradient.
    Scaffold { after_step: bool },
    /// FedAvg whose updates are normalised by their number of effective
    /// steps before averaging (Wang et al. 2020).
    FedNova,
}

impl ClientAlgorithm {
    /// How the algorithm steers a local run from the global parameters
    /// `global`, with the client's control `c_i` and the server's `c`
    /// (SCAFFOLD; absent = zeros).
    pub fn correction<'a>(&self, global: &'a [f64], c_i: Option<&'a [f64]>, c: Option<&'a [f64]>) -> GradientCorrection<'a> {
        match *self {
            ClientAlgorithm::FedProx { mu } => GradientCorrection { proximal: Some((mu, global)), ..Default::default() },
            ClientAlgorithm::Scaffold { after_step } => {
                GradientCorrection { client_control: c_i, server_control: c, after_step, ..Default::default() }
            }
            ClientAlgorithm::FedAvg | ClientAlgorithm::FedNova => GradientCorrection::default(),
        }
    }

    pub fn check(&self, optimizer: &LocalOptimizer) -> CoreResult<()> {
        match *self {
            ClientAlgorithm::FedProx { mu } if !(mu.is_finite() && mu >= 0.0) => invalid("mu", "must be a number >= 0"),
            // The normalisation a_i is derived for (momentum) SGD steps only.
            ClientAlgorithm::FedNova if optimizer.sgd_momentum().is_none() => {
                invalid("optimizer", "FedNova normalises SGD steps: use the \"sgd\" local optimizer")
            }
            _ => Ok(()),
        }
    }
}

/// Settings of one local run that are the same for every client of a round.
#[derive(Clone, Copy, Debug)]
pub struct LocalConfig {
    /// 0 means full batch.
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub shuffle: bool,
    pub seed: u64,
    pub optimizer: LocalOptimizer,
}

impl LocalConfig {
    pub fn check(&self) -> CoreResult<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return invalid("lr", "must be a positive number");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return invalid("weight_decay", "must be >= 0");
        }
        self.optimizer.check()
    }

    /// Minibatch length for `n` samples.
    pub fn batch_len(&self, n: usize) -> usize {
        if self.batch_size == 0 || self.batch_size > n {
            n
        } else {
            self.batch_size
        }
    }

    /// Local steps tau of a run of `epochs` epochs over `n` samples.
    pub fn steps(&self, n: usize, epochs: usize) -> usize {
        epochs.saturating_mul(n.div_ceil(self.batch_len(n).max(1)))
    }
}

/// Terms the client algorithm adds to every step's gradient. All absent is
/// plain local training (FedAvg).
#[derive(Clone, Copy, Debug, Default)]
pub struct GradientCorrection<'a> {
    /// FedProx: `mu` and the global parameters x the run is pulled back to.
    pub proximal: Option<(f64, &'a [f64])>,
    /// SCAFFOLD: the client's control c_i (subtracted; absent = zeros).
    pub client_control: Option<&'a [f64]>,
    /// SCAFFOLD: the server's control c (added; absent = zeros).
    pub server_control: Option<&'a [f64]>,
    /// SCAFFOLD: apply `- lr (c - c_i)` to the parameters after each step
    /// instead of adding `c - c_i` to the gradient.
    pub after_step: bool,
}

impl GradientCorrection<'_> {
    fn check(&self, n_params: usize) -> CoreResult<()> {
        let fits = |x: Option<&[f64]>| !matches!(x, Some(x) if x.len() != n_params);
        if !fits(self.proximal.map(|(_, x)| x)) {
            return invalid("params", "the proximal anchor does not fit the model");
        }
        if !fits(self.client_control) || !fits(self.server_control) {
            return invalid("control", format!("a control variate does not have {n_params} values"));
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
    /// Local steps tau (1 for a FedSGD gradient).
    pub steps: usize,
}

/// Runs `epochs` epochs of local training from `params` (updated in place).
/// The sample order comes from the client's own stream `stream` of
/// `cfg.seed`.
pub fn local_run(
    net: &Network,
    params: &mut [f64],
    data: &Dataset<'_>,
    cfg: &LocalConfig,
    epochs: usize,
    correction: &GradientCorrection<'_>,
    stream: u64,
) -> CoreResult<LocalOutcome> {
    local_run_partial(net, params, data, cfg, epochs, correction, stream, None)
}

/// `local_run` that stops after `max_steps` local steps when given: the
/// partial work of a client cut off by a deadline (FedProx and FedNova use
/// it; the reported loss is the mean over the samples it saw).
#[allow(clippy::too_many_arguments)]
pub fn local_run_partial(
    net: &Network,
    params: &mut [f64],
    data: &Dataset<'_>,
    cfg: &LocalConfig,
    epochs: usize,
    correction: &GradientCorrection<'_>,
    stream: u64,
    max_steps: Option<usize>,
) -> CoreResult<LocalOutcome> {
    cfg.check()?;
    if max_steps == Some(0) {
        return invalid("max_steps", "must be at least 1");
    }
    if epochs == 0 {
        return invalid("epochs", "must be at least 1");
    }
    correction.check(net.n_params())?;
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { local_run_avx2(net, params, data, cfg, epochs, correction, stream, max_steps) };
        }
    }
    local_run_body(net, params, data, cfg, epochs, correction, stream, max_steps)
}

/// The same code compiled for AVX2: four doubles per instruction instead of
/// two. No FMA, so every operation rounds exactly as in the portable build
/// and results are the same on every x86-64 machine.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn local_run_avx2(
    net: &Network,
    params: &mut [f64],
    data: &Dataset<'_>,
    cfg: &LocalConfig,
    epochs: usize,
    correction: &GradientCorrection<'_>,
    stream: u64,
    max_steps: Option<usize>,
) -> CoreResult<LocalOutcome> {
    local_run_body(net, params, data, cfg, epochs, correction, stream, max_steps)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn local_run_body(
    net: &Network,
    params: &mut [f64],
    data: &Dataset<'_>,
    cfg: &LocalConfig,
    epochs: usize,
    correction: &GradientCorrection<'_>,
    stream: u64,
    max_steps: Option<usize>,
) -> CoreResult<LocalOutcome> {
    let n = data.n;
    let batch = cfg.batch_len(n);
    let mut ws = net.workspace(batch)?;
    let mut grad = net.zeroed_params("the gradient")?;
    let mut optimizer = LocalOptState::new(cfg.optimizer, net.n_params())?;
    let mut order = all_rows(n)?;
    let mut rng = Rng::new(cfg.seed, stream);
    // mu = 0 adds nothing; skipping it keeps FedProx(0) bitwise FedAvg.
    let proximal = correction.proximal.filter(|(mu, _)| *mu > 0.0);
    let (mut loss_sum, mut steps, mut seen, mut cut_short) = (0.0, 0, 0usize, false);
    // Float32 and nothing but plain SGD: the fused step (same arithmetic).
    let fused = net.precision == Precision::F32
        && cfg.optimizer.sgd_momentum() == Some(0.0)
        && cfg.weight_decay == 0.0
        && proximal.is_none()
        && correction.client_control.is_none()
        && correction.server_control.is_none();
    let limit = max_steps.unwrap_or(usize::MAX);
    let dropout = net.has_dropout();
    'epochs: for epoch in 1..=epochs {
        if cfg.shuffle {
            for i in (1..n).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
        }
        for rows in order.chunks(batch) {
            if steps >= limit {
                cut_short = true;
                break 'epochs;
            }
            if dropout {
                ws.dropout_key = Some(step_key(cfg.seed, stream, steps));
            }
            let loss = if fused {
                net.loss_grad_f32(params, data, rows, &mut ws).expect("a float32 workspace")
            } else {
                net.loss_grad(params, data, rows, &mut grad, &mut ws)
            };
            steps += 1;
            seen += rows.len();
            // Checked every step because it costs nothing: a diverging run
            // stops at once instead of spending its epochs on Inf and NaN.
            if !loss.is_finite() {
                return Err(CoreError::Diverged(format!(
                    "the training loss became {loss} at step {steps} (epoch {epoch}); the learning rate {} is probably too large",
                    num(cfg.lr)
                )));
            }
            loss_sum += loss * rows.len() as f64;
            if fused {
                ws.sgd_step_f32(params, cfg.lr);
                continue;
            }
            if cfg.weight_decay > 0.0 {
                for (g, p) in grad.iter_mut().zip(params.iter()) {
                    *g += cfg.weight_decay * p;
                }
            }
            if let Some((mu, anchor)) = proximal {
                for ((g, p), x) in grad.iter_mut().zip(params.iter()).zip(anchor) {
                    *g += mu * (p - x);
                }
            }
            if !correction.after_step {
                if let Some(c_i) = correction.client_control {
                    for (g, c) in grad.iter_mut().zip(c_i) {
                        *g -= c;
                    }
                }
                if let Some(c) = correction.server_control {
                    for (g, c) in grad.iter_mut().zip(c) {
                        *g += c;
                    }
                }
            }
            optimizer.step(params, &grad, cfg.lr);
            if correction.after_step {
                // y <- y - lr (c - c_i), in this order of operations.
                if let Some(c) = correction.server_control {
                    for (p, c) in params.iter_mut().zip(c) {
                        *p -= cfg.lr * c;
                    }
                }
                if let Some(c_i) = correction.client_control {
                    for (p, c) in params.iter_mut().zip(c_i) {
                        *p += cfg.lr * c;
                    }
                }
            }
        }
        // Once per epoch: a scan of every parameter costs as much as a step.
        if let Some(bad) = params.iter().find(|p| !p.is_finite()) {
            return Err(CoreError::Diverged(format!(
                "a parameter became {bad} in epoch {epoch}; the learning rate {} is probably too large",
                num(cfg.lr)
            )));
        }
    }
    // A run cut short checks its parameters here (a full one did at its last epoch).
    if let Some(bad) = params.iter().find(|p| cut_short && !p.is_finite()) {
        return Err(CoreError::Diverged(format!("a parameter became {bad}; the learning rate {} is probably too large", num(cfg.lr))));
    }
    let train_loss = loss_sum / seen as f64;
    if !train_loss.is_finite() {
        return Err(CoreError::Diverged(format!(
            "the mean training loss overflowed to {train_loss}; the learning rate {} is probably too large",
            num(cfg.lr)
        )));
    }
    Ok(LocalOutcome { n_samples: n, train_loss, steps })
}

/// The key of a training step's dropout masks: the run's seed, the
/// client's stream and the step's index.
pub(crate) fn step_key(seed: u64, stream: u64, step: usize) -> u64 {
    crate::rng::Rng::new(seed ^ (step as u64).wrapping_mul(0xA24B_AED4_963E_E407), stream).next_u64()
}

/// Row indices 0..n, the sample order of a run.
pub(crate) fn all_rows(n: usize) -> CoreResult<Vec<usize>> {
    let mut rows = try_with_capacity(n, "the sample order")?;
    rows.extend(0..n);
    Ok(rows)
}

/// Full-batch gradient at `params` (with weight decay) and the mean loss: the
/// work of a FedSGD client.
pub fn full_gradient(net: &Network, params: &[f64], data: &Dataset<'_>, weight_decay: f64, grad: &mut [f64]) -> CoreResult<LocalOutcome> {
    let rows = all_rows(data.n)?;
    let mut ws = net.workspace(data.n)?;
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

/// FedNova's effective number of steps a_i of `steps` local SGD steps with
/// heavy-ball `momentum` rho: tau itself for plain SGD, else
/// `(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)`, the sum over steps
/// of the weights momentum gives each gradient.
pub fn fednova_steps(steps: usize, momentum: f64) -> f64 {
    let tau = steps as f64;
    if momentum == 0.0 {
        return tau;
    }
    let rho = momentum;
    (tau - rho * (1.0 - rho.powf(tau)) / (1.0 - rho)) / (1.0 - rho)
}

/// SCAFFOLD's new client control, option II:
/// `c_i - c + (x - y) / (tau lr)` with absent controls taken as zeros.
pub fn scaffold_client_control(
    client_control: Option<&[f64]>,
    server_control: Option<&[f64]>,
    global: &[f64],
    local: &[f64],
    steps: usize,
    lr: f64,
) -> CoreResult<Vec<f64>> {
    let scale = steps as f64 * lr;
    let mut out = try_zeroed(global.len(), "a client's new control variate")?;
    for (j, (o, (x, y))) in out.iter_mut().zip(global.iter().zip(local)).enumerate() {
        let c_i = client_control.map_or(0.0, |c| c[j]);
        let c = server_control.map_or(0.0, |c| c[j]);
        *o = c_i - c + (x - y) / scale;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Head, Precision};
    use crate::test_data::blobs;

    fn sgd(momentum: f64) -> LocalConfig {
        LocalConfig { batch_size: 4, lr: 0.1, weight_decay: 0.01, shuffle: true, seed: 7, optimizer: LocalOptimizer::Sgd { momentum } }
    }

    fn random(d: usize, seed: u64, scale: f64) -> Vec<f64> {
        let mut rng = Rng::new(seed, 5);
        (0..d).map(|_| scale * rng.normal()).collect()
    }

    /// Float32 with plain SGD takes the fused step; it must be the same
    /// arithmetic as `loss_grad` followed by a float64 SGD step.
    #[test]
    fn the_fused_float32_sgd_step_is_the_plain_one_bit_for_bit() {
        let net = Network::new(&[3, 7, 3], Head::Softmax).unwrap().with_precision(Precision::F32);
        let owned = blobs(29, 4, 0.0);
        let data = owned.view();
        let cfg = LocalConfig { batch_size: 4, lr: 0.1, weight_decay: 0.0, shuffle: true, seed: 3, optimizer: LocalOptimizer::Sgd { momentum: 0.0 } };
        let start = net.init(1, 2).unwrap();
        let mut fused = start.clone();
        local_run(&net, &mut fused, &data, &cfg, 3, &GradientCorrection::default(), 5).unwrap();
        let mut plain = start.clone();
        let mut ws = net.workspace(4).unwrap();
        let mut g = vec![0.0; net.n_params()];
        let mut order: Vec<usize> = (0..data.n).collect();
        let mut rng = Rng::new(cfg.seed, 5);
        for _ in 0..3 {
            for i in (1..data.n).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            for rows in order.chunks(4) {
                net.loss_grad(&plain, &data, rows, &mut g, &mut ws);
                for (p, gi) in plain.iter_mut().zip(&g) {
                    *p -= cfg.lr * gi;
                }
            }
        }
        assert_eq!(fused, plain);
        assert_ne!(fused, start);
    }

    /// Each optimizer inside a real local run (softmax regression, weight
    /// decay, minibatches with a short last one, several epochs) against the
    /// loop written out with the optimizer's definition.
    #[test]
    fn local_runs_with_each_optimizer_match_a_direct_loop() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let owned = blobs(11, 6, 0.0);
        let data = owned.view();
        let global = random(net.n_params(), 6, 0.3);
        let optimizers = [
            LocalOptimizer::Sgd { momentum: 0.9 },
            LocalOptimizer::Adam { beta1: 0.8, beta2: 0.99, eps: 1e-6 },
            LocalOptimizer::RmsProp { alpha: 0.9, eps: 1e-6 },
            LocalOptimizer::Adagrad { eps: 1e-6 },
        ];
        for optimizer in optimizers {
            let cfg = LocalConfig { shuffle: false, optimizer, ..sgd(0.0) };
            let mut y = global.clone();
            let out = local_run(&net, &mut y, &data, &cfg, 2, &GradientCorrection::default(), 0).unwrap();
            assert_eq!(out.steps, 2 * 3);
            let d = net.n_params();
            let (mut e, mut first, mut second) = (global.clone(), vec![0.0; d], vec![0.0; d]);
            let mut g = vec![0.0; d];
            let mut ws = net.workspace(data.n).unwrap();
            let mut t = 0;
            for _ in 0..2 {
                for rows in [vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9, 10]] {
                    t += 1;
                    net.loss_grad(&e, &data, &rows, &mut g, &mut ws);
                    for j in 0..d {
                        let gj = g[j] + cfg.weight_decay * e[j];
                        e[j] -= cfg.lr
                            * match optimizer {
                                LocalOptimizer::Sgd { momentum } => {
                                    first[j] = momentum * first[j] + gj;
                                    first[j]
                                }
                                LocalOptimizer::Adam { beta1, beta2, eps } => {
                                    first[j] = beta1 * first[j] + (1.0 - beta1) * gj;
                                    second[j] = beta2 * second[j] + (1.0 - beta2) * gj * gj;
                                    (first[j] / (1.0 - beta1.powi(t))) / ((second[j] / (1.0 - beta2.powi(t))).sqrt() + eps)
                                }
                                LocalOptimizer::RmsProp { alpha, eps } => {
                                    second[j] = alpha * second[j] + (1.0 - alpha) * gj * gj;
                                    gj / (second[j].sqrt() + eps)
                                }
                                LocalOptimizer::Adagrad { eps } => {
                                    second[j] += gj * gj;
                                    gj / (second[j].sqrt() + eps)
                                }
                            };
                    }
                }
            }
            assert!(y.iter().zip(&e).all(|(a, b)| (a - b).abs() < 1e-13), "{optimizer:?}");
        }
    }

    #[test]
    fn fedprox_with_mu_zero_is_bitwise_fedavg() {
        let net = Network::new(&[3, 4, 3], Head::Softmax).unwrap();
        let owned = blobs(23, 1, 0.0);
        let data = owned.view();
        let global = net.init(1, 2).unwrap();
        for optimizer in [LocalOptimizer::Sgd { momentum: 0.9 }, LocalOptimizer::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }] {
            let cfg = LocalConfig { optimizer, ..sgd(0.0) };
            let mut fedavg = global.clone();
            let a = local_run(&net, &mut fedavg, &data, &cfg, 2, &GradientCorrection::default(), 3).unwrap();
            let mut prox = global.clone();
            let prox_terms = GradientCorrection { proximal: Some((0.0, &global)), ..Default::default() };
            let b = local_run(&net, &mut prox, &data, &cfg, 2, &prox_terms, 3).unwrap();
            assert_eq!(fedavg, prox);
            assert_eq!(a.train_loss.to_bits(), b.train_loss.to_bits());
            // And mu > 0 does pull the run back towards the global parameters.
            let mut pulled = global.clone();
            let strong = GradientCorrection { proximal: Some((5.0, &global)), ..Default::default() };
            local_run(&net, &mut pulled, &data, &cfg, 2, &strong, 3).unwrap();
            let dist = |y: &[f64]| y.iter().zip(&global).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
            assert!(dist(&pulled) < dist(&fedavg));
        }
    }

    #[test]
    fn fedprox_step_matches_its_definition() {
        // Full batch, one epoch: one step from y = x + offset, where the
        // proximal term is mu * offset.
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let owned = blobs(10, 2, 0.0);
        let data = owned.view();
        let global = random(net.n_params(), 1, 0.3);
        let start: Vec<f64> = global.iter().map(|v| v + 0.25).collect();
        let cfg = LocalConfig { batch_size: 0, shuffle: false, ..sgd(0.0) };
        let mu = 0.7;
        let mut y = start.clone();
        let terms = GradientCorrection { proximal: Some((mu, &global)), ..Default::default() };
        local_run(&net, &mut y, &data, &cfg, 1, &terms, 0).unwrap();
        let mut g = vec![0.0; net.n_params()];
        let rows: Vec<usize> = (0..data.n).collect();
        net.loss_grad(&start, &data, &rows, &mut g, &mut net.workspace(data.n).unwrap());
        for j in 0..g.len() {
            let expected = start[j] - cfg.lr * (g[j] + cfg.weight_decay * start[j] + mu * (start[j] - global[j]));
            assert!((y[j] - expected).abs() < 1e-15, "{j}");
        }
    }

    #[test]
    fn scaffold_with_zero_controls_and_one_step_is_sgd() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let owned = blobs(17, 3, 0.0);
        let data = owned.view();
        let global = net.init(1, 4).unwrap();
        let zeros = vec![0.0; net.n_params()];
        let cfg = LocalConfig { batch_size: 0, ..sgd(0.0) };
        let mut plain = global.clone();
        local_run(&net, &mut plain, &data, &cfg, 1, &GradientCorrection::default(), 1).unwrap();
        let mut corrected = global.clone();
        let terms = GradientCorrection { client_control: Some(&zeros), server_control: Some(&zeros), ..Default::default() };
        let out = local_run(&net, &mut corrected, &data, &cfg, 1, &terms, 1).unwrap();
        assert_eq!(out.steps, 1);
        assert_eq!(plain, corrected);
    }

    #[test]
    fn scaffold_correction_enters_every_step() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let owned = blobs(8, 4, 0.0);
        let data = owned.view();
        let global = random(net.n_params(), 2, 0.2);
        let (c_i, c) = (random(net.n_params(), 3, 0.1), random(net.n_params(), 4, 0.1));
        let cfg = LocalConfig { batch_size: 0, shuffle: false, weight_decay: 0.0, ..sgd(0.0) };
        let mut y = global.clone();
        let terms = GradientCorrection { client_control: Some(&c_i), server_control: Some(&c), ..Default::default() };
        local_run(&net, &mut y, &data, &cfg, 2, &terms, 0).unwrap();
        let rows: Vec<usize> = (0..data.n).collect();
        let mut expected = global.clone();
        let mut g = vec![0.0; net.n_params()];
        for _ in 0..2 {
            net.loss_grad(&expected, &data, &rows, &mut g, &mut net.workspace(data.n).unwrap());
            for j in 0..g.len() {
                expected[j] -= cfg.lr * (g[j] - c_i[j] + c[j]);
            }
        }
        assert!(y.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-14));
    }

    #[test]
    fn scaffold_after_the_step_stays_outside_the_momentum() {
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let owned = blobs(8, 4, 0.0);
        let data = owned.view();
        let global = random(net.n_params(), 2, 0.2);
        let (c_i, c) = (random(net.n_params(), 3, 0.1), random(net.n_params(), 4, 0.1));
        let cfg = LocalConfig { batch_size: 0, shuffle: false, weight_decay: 0.0, ..sgd(0.9) };
        let mut y = global.clone();
        let terms = GradientCorrection { client_control: Some(&c_i), server_control: Some(&c), after_step: true, ..Default::default() };
        local_run(&net, &mut y, &data, &cfg, 3, &terms, 0).unwrap();
        // Written from the definition: b <- rho b + g; y <- y - lr b; y <- y - lr (c - c_i).
        let rows: Vec<usize> = (0..data.n).collect();
        let (mut expected, mut b) = (global.clone(), vec![0.0; net.n_params()]);
        let mut g = vec![0.0; net.n_params()];
        for _ in 0..3 {
            net.loss_grad(&expected, &data, &rows, &mut g, &mut net.workspace(data.n).unwrap());
            for j in 0..g.len() {
                b[j] = 0.9 * b[j] + g[j];
                expected[j] -= cfg.lr * b[j];
                expected[j] -= cfg.lr * (c[j] - c_i[j]);
            }
        }
        assert!(y.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-13));
        // Inside the momentum (the default), the same run differs.
        let mut z = global.clone();
        local_run(&net, &mut z, &data, &cfg, 3, &GradientCorrection { after_step: false, ..terms }, 0).unwrap();
        assert!(z.iter().zip(&y).any(|(a, b)| (a - b).abs() > 1e-6));
    }

    #[test]
    fn scaffold_client_control_follows_option_two() {
        let x = [1.0, 2.0, -1.0];
        let y = [0.5, 2.5, -1.0];
        let (c_i, c) = ([0.1, 0.2, 0.3], [-0.4, 0.0, 0.6]);
        let (steps, lr) = (4, 0.05);
        let new = scaffold_client_control(Some(&c_i), Some(&c), &x, &y, steps, lr).unwrap();
        for j in 0..3 {
            let expected = c_i[j] - c[j] + (x[j] - y[j]) / (steps as f64 * lr);
            assert!((new[j] - expected).abs() < 1e-15);
        }
        // Absent controls are zeros.
        let new = scaffold_client_control(None, None, &x, &y, steps, lr).unwrap();
        assert_eq!(new, vec![2.5, -2.5, 0.0]);
    }

    #[test]
    fn fednova_effective_steps() {
        assert_eq!(fednova_steps(12, 0.0), 12.0);
        let (tau, rho) = (12.0f64, 0.9f64);
        let by_formula = (tau - rho * (1.0 - rho.powf(tau)) / (1.0 - rho)) / (1.0 - rho);
        assert!((fednova_steps(12, 0.9) - by_formula).abs() < 1e-12);
        // The same as summing what momentum weighs each step's gradient with:
        // gradient s (1-based) enters the remaining tau - s + 1 updates with
        // weights 1, rho, rho^2, ...
        let summed: f64 = (1..=12).map(|s| (0..=(12 - s)).map(|k| rho.powi(k)).sum::<f64>()).sum();
        assert!((fednova_steps(12, 0.9) - summed).abs() < 1e-12, "{} vs {summed}", fednova_steps(12, 0.9));
        // One step is one step whatever the momentum.
        assert!((fednova_steps(1, 0.9) - 1.0).abs() < 1e-15);
    }

    #[test]
    fn steps_count_batches_per_epoch() {
        let cfg = sgd(0.0);
        assert_eq!(cfg.steps(10, 3), 3 * 3);
        assert_eq!(cfg.steps(8, 2), 2 * 2);
        assert_eq!(LocalConfig { batch_size: 0, ..cfg }.steps(10, 5), 5);
        assert_eq!(LocalConfig { batch_size: 50, ..cfg }.steps(10, 2), 2);
        let net = Network::new(&[3, 3], Head::Softmax).unwrap();
        let mut p = net.init(0, 0).unwrap();
        let out = local_run(&net, &mut p, &blobs(10, 5, 0.0).view(), &cfg, 3, &GradientCorrection::default(), 0).unwrap();
        assert_eq!(out.steps, cfg.steps(10, 3));
    }
}
