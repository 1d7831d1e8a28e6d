use super::convert::{core_err, doubles_list, input_err, new_doubles, threads};
use extendr_api::prelude::*;
use extendr_api::Result;
use fedagg_core::model::{Dataset, Head, Network};
use fedagg_core::train::{self, ClientJob, LocalWork, SgdConfig, WeightRule};
use fedagg_core::{alloc, CoreError};

fn network(sizes: &Robj, head: i32) -> Result<Network> {
    let sizes: Vec<usize> = doubles(sizes, "sizes")?.iter().map(|&s| s as usize).collect();
    Network::new(&sizes, Head::from_code(head).map_err(core_err)?).map_err(core_err)
}

fn doubles<'a>(x: &'a Robj, what: &str) -> Result<&'a [f64]> {
    x.as_real_slice().ok_or_else(|| input_err(format!("`{what}` must be a double vector")))
}

/// Borrows the data sets behind a list of external pointers (NULL stays None).
/// Done on R's thread, before any parallel work.
fn datasets(list: &List) -> Result<Vec<Option<&Dataset>>> {
    list.values()
        .map(|obj| {
            if obj.is_null() {
                return Ok(None);
            }
            let ptr: &ExternalPtr<Dataset> = (&obj).try_into().map_err(|_| {
                input_err("a client's data handle is not valid in this R session (was it saved and reloaded?)")
            })?;
            // The pointer lives in `list`, which outlives this borrow.
            let data: &Dataset = unsafe { &*(ptr.addr() as *const Dataset) };
            Ok(Some(data))
        })
        .collect()
}

fn field(config: &List, name: &str) -> Result<Robj> {
    config
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .ok_or_else(|| input_err(format!("config has no `{name}`")))
}

fn number(config: &List, name: &str) -> Result<f64> {
    field(config, name)?.as_real().ok_or_else(|| input_err(format!("config `{name}` must be a double")))
}

/// A client failure as data, so R can raise a classed error naming the
/// client: `kind` is "client" (its data or setup) or "diverged" (its
/// training blew up). Other errors are raised as R errors by `core_err`.
fn client_failure(e: CoreError) -> Result<List> {
    let kind = e.kind();
    match e {
        CoreError::Client(k, message) | CoreError::ClientDiverged(k, message) => {
            Ok(list!(ok = false, client = k as i32 + 1, message = message, kind = kind))
        }
        other => Err(core_err(other)),
    }
}

/// Copies one client's data into Rust, row-major, once.
/// @noRd
#[extendr]
fn rs_dataset(x: Robj, n: i32, p: i32, y: Robj) -> Result<ExternalPtr<Dataset>> {
    let data = Dataset::from_col_major(doubles(&x, "x")?, n as usize, p as usize, doubles(&y, "y")?).map_err(core_err)?;
    Ok(ExternalPtr::new(data))
}

/// TRUE when the handle still points at data (FALSE after save/reload).
/// @noRd
#[extendr]
fn rs_dataset_valid(handle: Robj) -> bool {
    <&ExternalPtr<Dataset>>::try_from(&handle).is_ok()
}

/// Seeded initial parameters as one flat vector.
/// @noRd
#[extendr]
fn rs_model_init(sizes: Robj, head: i32, scheme: i32, seed: f64) -> Result<Robj> {
    let net = network(&sizes, head)?;
    let params = net.init(scheme, seed as u64).map_err(core_err)?;
    new_doubles(params.len(), |o| o.copy_from_slice(&params))
}

/// Mean loss and gradient of a model on data given as a column-major matrix.
/// @noRd
#[extendr]
fn rs_loss_grad(sizes: Robj, head: i32, params: Robj, x: Robj, n: i32, p: i32, y: Robj) -> Result<List> {
    let net = network(&sizes, head)?;
    let data = Dataset::from_col_major(doubles(&x, "x")?, n as usize, p as usize, doubles(&y, "y")?).map_err(core_err)?;
    net.check_data(&data).map_err(core_err)?;
    let params = doubles(&params, "params")?;
    if params.len() != net.n_params() {
        return Err(input_err(format!("`params` has {} values, the model has {}", params.len(), net.n_params())));
    }
    let mut grad = net.zeroed_params("the gradient").map_err(core_err)?;
    let mut ws = net.workspace().map_err(core_err)?;
    let rows: Vec<usize> = (0..data.n).collect();
    let loss = net.loss_grad(params, &data, &rows, &mut grad, &mut ws);
    Ok(list!(loss = loss, grad = grad))
}

/// One federated round over the clients' data handles.
/// @noRd
#[extendr]
fn rs_train_round(sizes: Robj, head: i32, global: Robj, train: List, validation: List, streams: Robj, config: List, n_threads: i32) -> Result<List> {
    let net = network(&sizes, head)?;
    let global = doubles(&global, "params")?;
    let train_sets = datasets(&train)?;
    let validation_sets = datasets(&validation)?;
    let streams = doubles(&streams, "streams")?;
    if validation_sets.len() != train_sets.len() || streams.len() != train_sets.len() {
        return Err(input_err("train, validation and streams differ in length"));
    }
    let mut jobs = Vec::with_capacity(train_sets.len());
    for (k, t) in train_sets.iter().enumerate() {
        let train = t.ok_or_else(|| core_err(CoreError::Client(k, "has no training data".into())))?;
        jobs.push(ClientJob { train, validation: validation_sets[k], stream: streams[k] as u64 });
    }
    let work = match field(&config, "work")?.as_str() {
        Some("sgd") => LocalWork::Sgd,
        Some("gradient") => LocalWork::Gradient,
        _ => return Err(input_err("config `work` must be \"sgd\" or \"gradient\"")),
    };
    let rule = match field(&config, "weights")?.as_str() {
        Some("samples") => WeightRule::Samples,
        Some("equal") => WeightRule::Equal,
        Some("accuracy") => WeightRule::Validation,
        Some("collect") => WeightRule::Collect,
        _ => return Err(input_err("config `weights` is not a known rule")),
    };
    let batch = number(&config, "batch_size")?;
    let cfg = SgdConfig {
        epochs: number(&config, "epochs")? as usize,
        batch_size: if batch.is_finite() { batch as usize } else { 0 },
        lr: number(&config, "lr")?,
        weight_decay: number(&config, "weight_decay")?,
        momentum: number(&config, "momentum")?,
        shuffle: field(&config, "shuffle")?.as_bool().unwrap_or(true),
        seed: number(&config, "seed")? as u64,
    };
    let out = match train::run_round(&net, global, &jobs, work, &cfg, rule, threads(n_threads)) {
        Ok(out) => out,
        Err(e) => return client_failure(e),
    };
    let reports = &out.reports;
    let val = |f: fn(&fedagg_core::model::Evaluation) -> f64| -> Vec<f64> {
        reports.iter().map(|r| r.validation.as_ref().map(f).unwrap_or(f64::NAN)).collect()
    };
    let aggregate = new_doubles(out.aggregate.len(), |o| o.copy_from_slice(&out.aggregate))?;
    Ok(list!(
        ok = true,
        aggregate = aggregate,
        n_samples = reports.iter().map(|r| r.outcome.n_samples as f64).collect::<Vec<_>>(),
        train_loss = reports.iter().map(|r| r.outcome.train_loss).collect::<Vec<_>>(),
        steps = reports.iter().map(|r| r.outcome.steps as f64).collect::<Vec<_>>(),
        val_loss = val(|e| e.loss),
        val_metric = val(|e| e.metric),
        weight = reports.iter().map(|r| r.weight).collect::<Vec<_>>(),
        collected = doubles_list(out.collected)?
    ))
}

/// Loss and metric of one parameter vector on many data handles.
/// @noRd
#[extendr]
fn rs_evaluate(sizes: Robj, head: i32, params: Robj, data: List, n_threads: i32) -> Result<List> {
    let net = network(&sizes, head)?;
    let params = doubles(&params, "params")?;
    let sets = datasets(&data)?;
    let sets: Vec<&Dataset> = sets.into_iter().map(|s| s.ok_or_else(|| input_err("missing data handle"))).collect::<Result<_>>()?;
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
fn rs_predict(sizes: Robj, head: i32, params: Robj, x: Robj, n: i32, p: i32) -> Result<Robj> {
    let net = network(&sizes, head)?;
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
    let data = Dataset::from_col_major(x, n, p, &unused_labels).map_err(core_err)?;
    let mut ws = net.workspace().map_err(core_err)?;
    let mut row_out = alloc::try_zeroed(k, what).map_err(core_err)?;
    new_doubles(n_out, |o| {
        for i in 0..n {
            net.predict_row(params, data.row(i), &mut row_out, &mut ws);
            for (c, v) in row_out.iter().enumerate() {
                o[c * n + i] = *v;
            }
        }
    })
}

extendr_module! {
    mod train;
    fn rs_dataset;
    fn rs_dataset_valid;
    fn rs_model_init;
    fn rs_loss_grad;
    fn rs_train_round;
    fn rs_evaluate;
    fn rs_predict;
}
