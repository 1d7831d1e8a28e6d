use super::config::*;
use super::convert::{core_err, doubles_list, input_err, new_doubles, threads};
use extendr_api::prelude::*;
use extendr_api::Result;
use fedagg_core::model::{Dataset, Head};
use fedagg_core::strategy::fold::scaffold_server_control;
use fedagg_core::compress::Compressor;
use fedagg_core::strategy::{
    fold_round_with, Compression, ClientAlgorithm, FoldRule, LocalConfig, RoundUpdate,
};
use fedagg_core::train::{self, ClientJob, LocalWork, RoundConfig};
use fedagg_core::{alloc, CoreError};


/// Seeded initial parameters as one flat vector.
/// @noRd
#[extendr]
fn rs_model_init(sizes: Robj, head: i32, scheme: i32, seed: f64) -> Result<Robj> {
    let net = network(&sizes, head, 64)?;
    let params = net.init(scheme, seed as u64).map_err(core_err)?;
    new_doubles(params.len(), |o| o.copy_from_slice(&params))
}

/// Mean loss and gradient of a model on data given as a column-major matrix.
/// @noRd
#[extendr]
fn rs_loss_grad(sizes: Robj, head: i32, bits: i32, params: Robj, x: Robj, n: i32, p: i32, y: Robj) -> Result<List> {
    let net = network(&sizes, head, bits)?;
    let data = Dataset::new(doubles(&x, "x")?, n.max(0) as usize, p.max(0) as usize, doubles(&y, "y")?).map_err(core_err)?;
    net.check_data(&data).map_err(core_err)?;
    let params = doubles(&params, "params")?;
    if params.len() != net.n_params() {
        return Err(input_err(format!("`params` has {} values, the model has {}", params.len(), net.n_params())));
    }
    let mut grad = net.zeroed_params("the gradient").map_err(core_err)?;
    let mut ws = net.workspace(data.n).map_err(core_err)?;
    let rows: Vec<usize> = (0..data.n).collect();
    let loss = net.loss_grad(params, &data, &rows, &mut grad, &mut ws);
    Ok(list!(loss = loss, grad = grad))
}

/// The fields the fold and the server step add to a round's result. All
/// NULL when there was none (collected updates).
struct UpdateFields {
    params: Robj,
    aggregate: Robj,
    server_m: Robj,
    server_v: Robj,
    client_norms: Robj,
    cosines: Robj,
    diagnostics: Robj,
    kept: Robj,
    filter_reason: Robj,
    clipped: Robj,
    selected: Robj,
}

impl UpdateFields {
    fn new(update: Option<RoundUpdate>) -> Result<Self> {
        let Some(u) = update else {
            let null = || -> Robj { ().into() };
            return Ok(UpdateFields {
                params: null(),
                aggregate: null(),
                server_m: null(),
                server_v: null(),
                client_norms: null(),
                cosines: null(),
                diagnostics: null(),
                kept: null(),
                filter_reason: null(),
                clipped: null(),
                selected: null(),
            });
        };
        let d = &u.diagnostics;
        Ok(UpdateFields {
            params: optional_vector(Some(&u.params))?,
            aggregate: optional_vector(Some(&u.aggregate))?,
            server_m: optional_vector(u.server.m.as_deref())?,
            server_v: optional_vector(u.server.v.as_deref())?,
            client_norms: u.client_norms.clone().into(),
            cosines: u.cosines.clone().into(),
            diagnostics: list!(
                update_norm = d.update_norm,
                client_norm_mean = d.client_norm_mean,
                client_norm_sd = d.client_norm_sd,
                cosine_mean = d.cosine_mean,
                gradient_diversity = d.gradient_diversity
            )
            .into(),
            kept: u.kept.clone().into(),
            filter_reason: u.filter_reasons.clone().into(),
            clipped: match &u.clipped {
                Some(c) => Logicals::from_values(c.iter().map(|&v| Rbool::from(v))).into(),
                None => ().into(),
            },
            selected: match &u.selected {
                Some(s) => s.clone().into(),
                None => ().into(),
            },
        })
    }
}

/// One federated round over the clients' data handles: local work, fold,
/// server step.
/// @noRd
#[extendr]
fn rs_train_round(sizes: Robj, head: i32, bits: i32, global: Robj, train: List, validation: List, streams: Robj, config: List, n_threads: i32) -> Result<List> {
    let net = network(&sizes, head, bits)?;
    let global = doubles(&global, "params")?;
    let train_objects = data_objects(&train, "train")?;
    let validation_objects = data_objects(&validation, "validation")?;
    let train_sets = datasets(&train_objects)?;
    let validation_sets = datasets(&validation_objects)?;
    let streams = doubles(&streams, "streams")?;
    let k = train_sets.len();
    if validation_sets.len() != k || streams.len() != k {
        return Err(input_err("train, validation and streams differ in length"));
    }
    let epochs = numbers(&field(&config, "epochs")?, "epochs")?;
    if epochs.len() != 1 && epochs.len() != k {
        return Err(input_err(format!("config `epochs` has {} values: give 1 or one per client ({k})", epochs.len())));
    }
    if let Some(bad) = epochs.iter().find(|e| !(e.is_finite() && **e >= 1.0 && e.fract() == 0.0)) {
        return Err(input_err(format!("config `epochs` has {bad}, not a count >= 1")));
    }
    // Borrowed from R here, on R's thread, before any parallel work.
    let control_obj = nullable_field(&config, "control");
    let control = optional_doubles(&control_obj, "control")?;
    let client_control_objs = list_elements(&nullable_field(&config, "client_controls"), "client_controls")?;
    let client_controls = optional_vectors(&client_control_objs, k, "client_controls")?;
    let max_steps_obj = nullable_field(&config, "max_steps");
    let max_steps = if max_steps_obj.is_null() { vec![f64::NAN; k] } else { numbers(&max_steps_obj, "max_steps")? };
    if max_steps.len() != k {
        return Err(input_err(format!("config `max_steps` has {} values for {k} clients", max_steps.len())));
    }
    if let Some(bad) = max_steps.iter().find(|m| !m.is_nan() && !(m.is_finite() && **m >= 1.0 && m.fract() == 0.0)) {
        return Err(input_err(format!("config `max_steps` has {bad}, not NA or a count >= 1")));
    }
    let mut jobs = Vec::with_capacity(k);
    for (i, t) in train_sets.iter().enumerate() {
        let train = t.ok_or_else(|| core_err(CoreError::Client(i, "has no training data".into())))?;
        let epochs = if epochs.len() == 1 { epochs[0] } else { epochs[i] } as usize;
        let max_steps = (!max_steps[i].is_nan()).then_some(max_steps[i] as usize);
        jobs.push(ClientJob { train, validation: validation_sets[i], stream: streams[i] as u64, epochs, control: client_controls[i], max_steps });
    }
    let work = fedagg_core::protocol::work_named(&text(&config, "work")?).map_err(core_err)?;
    let rule = fedagg_core::protocol::weight_rule_named(&text(&config, "weights")?).map_err(core_err)?;
    let batch = number(&config, "batch_size")?;
    let local = LocalConfig {
        batch_size: if batch.is_finite() { batch as usize } else { 0 },
        lr: number(&config, "lr")?,
        weight_decay: number(&config, "weight_decay")?,
        shuffle: field(&config, "shuffle")?.as_bool().unwrap_or(true),
        seed: number(&config, "seed")? as u64,
        optimizer: local_optimizer(&config)?,
    };
    let server = ServerObjects::new(&config)?;
    let transforms = round_transforms(&config)?;
    let round = RoundConfig {
        work,
        // FedSGD sends a gradient whatever the algorithm says.
        algorithm: if work == LocalWork::Gradient { ClientAlgorithm::FedAvg } else { client_algorithm(&config)? },
        local,
        rule,
        server: server.step()?,
        diagnostics: flag(&config, "diagnostics")?,
        control,
        n_nodes: number(&config, "n_nodes")?,
        transforms: &transforms,
    };
    let out = match train::run_round(&net, global, &jobs, &round, threads(n_threads)) {
        Ok(out) => out,
        Err(e) => return client_failure(e),
    };
    let reports = &out.reports;
    let val = |f: fn(&fedagg_core::model::Evaluation) -> f64| -> Vec<f64> {
        reports.iter().map(|r| r.validation.as_ref().map(f).unwrap_or(f64::NAN)).collect()
    };
    let fields = UpdateFields::new(out.update)?;
    Ok(list!(
        ok = true,
        aggregate = fields.aggregate,
        n_samples = reports.iter().map(|r| r.outcome.n_samples as f64).collect::<Vec<_>>(),
        train_loss = reports.iter().map(|r| r.outcome.train_loss).collect::<Vec<_>>(),
        steps = reports.iter().map(|r| r.outcome.steps as f64).collect::<Vec<_>>(),
        val_loss = val(|e| e.loss),
        val_metric = val(|e| e.metric),
        weight = reports.iter().map(|r| r.weight).collect::<Vec<_>>(),
        collected = doubles_list(out.collected)?,
        params = fields.params,
        server_m = fields.server_m,
        server_v = fields.server_v,
        control = optional_vector(out.control.as_deref())?,
        client_controls = optional_vector_list(out.client_controls)?,
        a = reports.iter().map(|r| r.effective_steps).collect::<Vec<_>>(),
        client_norms = fields.client_norms,
        cosines = fields.cosines,
        diagnostics = fields.diagnostics,
        kept = fields.kept,
        filter_reason = fields.filter_reason,
        clipped = fields.clipped,
        selected = fields.selected,
        residuals = residual_list(&out.residuals)?
    ))
}

/// Fold and server step of a round whose client updates were computed in R
/// (custom models, weight functions written in R): the same fold as
/// `rs_train_round`'s.
/// @noRd
#[extendr]
fn rs_fold_round(global: Robj, deltas: List, weights: Robj, a: Robj, config: List, n_threads: i32) -> Result<List> {
    let global = doubles(&global, "global")?;
    let delta_objs: Vec<Robj> = deltas.values().collect();
    let updates = delta_objs.iter().map(|d| doubles(d, "deltas")).collect::<Result<Vec<&[f64]>>>()?;
    let k = updates.len();
    let weights = numbers(&weights, "weights")?;
    let a = if a.is_null() { None } else { Some(numbers(&a, "a")?) };
    let algorithm = text(&config, "algorithm")?;
    let rule = match algorithm.as_str() {
        "fednova" => FoldRule::Normalized,
        "fedavg" | "fedprox" | "scaffold" | "scaffold_step" | "fedsgd" => FoldRule::Mean,
        other => return Err(input_err(format!("config `algorithm` \"{other}\" is not a known client algorithm"))),
    };
    // FedBuff: the weighted sum over the buffer's fixed size.
    let rule = match nullable_field(&config, "denominator") {
        d if d.is_null() => rule,
        d => match d.as_real() {
            Some(n) if n >= 1.0 && n.fract() == 0.0 && n <= usize::MAX as f64 => FoldRule::SumOver(n as usize),
            _ => return Err(input_err("config `denominator` must be a whole number >= 1")),
        },
    };
    let server = ServerObjects::new(&config)?;
    let step = server.step()?;
    let diagnostics = flag(&config, "diagnostics")?;
    let control_obj = nullable_field(&config, "control");
    let new_control_objs = list_elements(&nullable_field(&config, "client_controls_new"), "client_controls_new")?;
    let control = if algorithm.starts_with("scaffold") && !new_control_objs.is_empty() {
        let old_objs = list_elements(&nullable_field(&config, "client_controls"), "client_controls")?;
        let old = optional_vectors(&old_objs, k, "client_controls")?;
        let new = optional_vectors(&new_control_objs, k, "client_controls_new")?;
        let new = new
            .into_iter()
            .map(|c| c.ok_or_else(|| input_err("`client_controls_new` must hold a vector for every client")))
            .collect::<Result<Vec<&[f64]>>>()?;
        let c = optional_doubles(&control_obj, "control")?;
        let n_nodes = number(&config, "n_nodes")?;
        Some(scaffold_server_control(c, &old, &new, n_nodes, global.len()).map_err(core_err)?)
    } else {
        None
    };
    let transforms = round_transforms(&config)?;
    let update = match fold_round_with(global, &updates, &weights, a.as_deref(), rule, &step, diagnostics, &transforms, threads(n_threads)) {
        Ok(update) => update,
        Err(e) => return client_failure(e),
    };
    let fields = UpdateFields::new(Some(update))?;
    Ok(list!(
        ok = true,
        params = fields.params,
        aggregate = fields.aggregate,
        server_m = fields.server_m,
        server_v = fields.server_v,
        control = optional_vector(control.as_deref())?,
        client_norms = fields.client_norms,
        cosines = fields.cosines,
        diagnostics = fields.diagnostics,
        kept = fields.kept,
        filter_reason = fields.filter_reason,
        clipped = fields.clipped,
        selected = fields.selected
    ))
}

/// The clients' half of a round for updates computed elsewhere (clients of
/// a custom model, FedBuff's arrivals): update `k` goes through client
/// `k`'s encoding of config (`local_dp`, `attacks`, `attack_seed`,
/// `compression` with `residuals`), drawing from stream `streams[k]`, as it
/// would before being sent.
/// @noRd
#[extendr]
fn rs_encode_updates(deltas: List, config: List, streams: Robj, n_threads: i32) -> Result<List> {
    let delta_objs: Vec<Robj> = deltas.values().collect();
    let updates = delta_objs.iter().map(|d| doubles(d, "deltas")).collect::<Result<Vec<&[f64]>>>()?;
    let transforms = round_transforms(&config)?;
    let d = updates.first().map_or(0, |u| u.len());
    if let Some(k) = updates.iter().position(|u| u.len() != d) {
        return client_failure(CoreError::Client(k, format!("has an update of {} values, the others have {d}", updates[k].len())));
    }
    if let Err(e) = transforms.check_encodings(d, updates.len()) {
        return Err(core_err(e));
    }
    let streams = numbers(&streams, "streams")?;
    if streams.len() != updates.len() {
        return Err(input_err(format!("`streams` has {} values for {} updates", streams.len(), updates.len())));
    }
    let encoded = fedagg_core::parallel::with_threads(threads(n_threads), || {
        updates
            .iter()
            .enumerate()
            .map(|(k, u)| transforms.client_on(k, streams[k] as u64).encode(std::borrow::Cow::Borrowed(u)).map(|(u, r)| (u.into_owned(), r)))
            .collect::<std::result::Result<Vec<_>, CoreError>>()
    });
    let encoded = match encoded {
        Ok(e) => e,
        Err(e) => return client_failure(e),
    };
    let (sent, residuals): (Vec<Vec<f64>>, Vec<Option<Vec<f64>>>) = encoded.into_iter().unzip();
    Ok(list!(ok = true, updates = doubles_list(sent)?, residuals = residual_list(&residuals)?))
}

/// One update compressed as a client of a round would (client 0 of the
/// round seeded `seed`): the decoded update, its bytes and new residual.
/// @noRd
#[extendr]
fn rs_compress_update(update: Robj, compression: List, residual: Robj, seed: f64) -> Result<List> {
    let update = doubles(&update, "update")?;
    let c = Compression { compressor: compressor(&compression)?, seed: seed as u64 };
    let residual = if residual.is_null() { None } else { Some(doubles(&residual, "residual")?) };
    let out = c.compressor.compress(update, residual, &mut c.rng(0)).map_err(core_err)?;
    Ok(list!(decoded = out.decoded, bytes = out.bytes as f64, residual = optional_vector(out.residual.as_deref())?))
}

/// Exact bytes of a compressed update of `d` values.
/// @noRd
#[extendr]
fn rs_compress_bytes(compression: List, d: f64) -> Result<f64> {
    Ok(compressor(&compression)?.bytes(d as usize) as f64)
}

/// The first `n` uniform draws of client 0's compression stream of `seed`
/// (with `bounds`: one `below(bound)` draw per bound instead), so that
/// plain-R references can replay random sparsification and quantisation.
/// @noRd
#[extendr]
fn rs_compress_draws(seed: f64, n: f64, bounds: Robj) -> Result<Robj> {
    let c = Compression { compressor: Compressor::None, seed: seed as u64 };
    let mut rng = c.rng(0);
    if bounds.is_null() {
        let draws: Vec<f64> = (0..n as usize).map(|_| rng.uniform()).collect();
        return Ok(draws.into());
    }
    let bounds = numbers(&bounds, "bounds")?;
    if bounds.iter().any(|b| !(b.is_finite() && *b >= 1.0)) {
        return Err(input_err("`bounds` must be counts >= 1"));
    }
    let draws: Vec<f64> = bounds.iter().map(|&b| rng.below(b as u64) as f64).collect();
    Ok(draws.into())
}

/// Loss and metric of one parameter vector on many data handles.
/// @noRd
#[extendr]
fn rs_evaluate(sizes: Robj, head: i32, bits: i32, params: Robj, data: List, n_threads: i32) -> Result<List> {
    let net = network(&sizes, head, bits)?;
    let params = doubles(&params, "params")?;
    let objects = data_objects(&data, "data")?;
    let sets = datasets(&objects)?;
    let sets: Vec<Dataset> = sets.into_iter().map(|s| s.ok_or_else(|| input_err("missing data"))).collect::<Result<_>>()?;
    match train::evaluate_many(&net, params, &sets, threads(n_threads)) {
        Ok(evals) => Ok(list!(
            ok = true,
            loss = evals.iter().map(|e| e.loss).collect::<Vec<_>>(),
            metric = evals.iter().map(|e| e.metric).collect::<Vec<_>>(),
            n = evals.iter().map(|e| e.n as f64).collect::<Vec<_>>()
        )),
        Err(e) => client_failure(e),
    }
}

/// Predictions (n x outputs, column-major) for a column-major matrix.
/// @noRd
#[extendr]
fn rs_predict(sizes: Robj, head: i32, bits: i32, params: Robj, x: Robj, n: i32, p: i32) -> Result<Robj> {
    let net = network(&sizes, head, bits)?;
    let params = doubles(&params, "params")?;
    let (n, p) = (n.max(0) as usize, p.max(0) as usize);
    if p != net.n_inputs() || params.len() != net.n_params() {
        return Err(input_err("`x` or `params` does not fit the model"));
    }
    let x = doubles(&x, "x")?;
    let k = if net.head == Head::Softmax { net.n_outputs() } else { 1 };
    let what = "the predictions";
    let n_out = n.checked_mul(k).ok_or_else(|| core_err(CoreError::Memory(format!("{what} ({n} x {k}) exceed the address space"))))?;
    alloc::check_request::<f64>(n_out, what).map_err(core_err)?;
    let unused_labels = alloc::try_zeroed(n, "the rows of `x`").map_err(core_err)?;
    let data = Dataset::new(x, n, p, &unused_labels).map_err(core_err)?;
    let mut failure = None;
    let out = new_doubles(n_out, |o| {
        if let Err(e) = net.predict(params, &data, o) {
            failure = Some(e);
        }
    })?;
    match failure {
        Some(e) => Err(core_err(e)),
        None => Ok(out),
    }
}

extendr_module! {
    mod train;
    fn rs_model_init;
    fn rs_loss_grad;
    fn rs_train_round;
    fn rs_fold_round;
    fn rs_encode_updates;
    fn rs_evaluate;
    fn rs_predict;
    fn rs_compress_update;
    fn rs_compress_bytes;
    fn rs_compress_draws;
}
