use super::convert::{core_err, doubles_list, input_err, new_doubles, real_slice, threads};
use extendr_api::prelude::*;
use extendr_api::Result;
use fedagg_core::model::{Dataset, Head, Network, Precision};
use fedagg_core::strategy::fold::{is_all_filtered, scaffold_server_control};
use fedagg_core::compress::Compressor;
use fedagg_core::strategy::{
    fold_round_with, Aggregator, Attack, CentralNoise, Compression, LocalNoise, ClientAlgorithm, Clip, FoldRule, LocalConfig, LocalOptimizer,
    NormFilter, RoundTransforms, RoundUpdate, ServerOptimizer, ServerStep,
};
use fedagg_core::train::{self, ClientJob, LocalWork, RoundConfig, WeightRule};
use fedagg_core::{alloc, CoreError};

/// The network of a built-in model: layer sizes, head code and precision
/// bits (64 or 32).
fn network(sizes: &Robj, head: i32, bits: i32) -> Result<Network> {
    let sizes: Vec<usize> = doubles(sizes, "sizes")?.iter().map(|&s| s as usize).collect();
    let net = Network::new(&sizes, Head::from_code(head).map_err(core_err)?).map_err(core_err)?;
    Ok(net.with_precision(Precision::from_code(bits).map_err(core_err)?))
}

fn doubles<'a>(x: &'a Robj, what: &str) -> Result<&'a [f64]> {
    real_slice(x).ok_or_else(|| input_err(format!("`{what}` must be a double vector")))
}

/// The `(x, y)` pairs of a list of client data (NULL stays None), held here
/// so that `datasets()` can borrow their memory.
fn data_objects(list: &List, what: &str) -> Result<Vec<Option<(Robj, Robj)>>> {
    list.values()
        .map(|obj| {
            if obj.is_null() {
                return Ok(None);
            }
            let pair = List::try_from(&obj).ok().filter(|l| l.len() == 2);
            let pair = pair.ok_or_else(|| input_err(format!("each element of `{what}` must be list(x, y)")))?;
            Ok(Some((pair.elt(0)?, pair.elt(1)?)))
        })
        .collect()
}

/// Borrows R's column-major matrices and label vectors, on R's thread and
/// before any parallel work: the data are never copied whole.
fn datasets<'a>(objects: &'a [Option<(Robj, Robj)>]) -> Result<Vec<Option<Dataset<'a>>>> {
    objects
        .iter()
        .map(|pair| {
            let Some((x, y)) = pair else { return Ok(None) };
            let dim: Vec<usize> = x.dim().map(|d| d.iter().map(|v| Option::<i32>::from(v).unwrap_or(0).max(0) as usize).collect()).unwrap_or_default();
            if dim.len() != 2 {
                return Err(input_err("a client's `x` must be a matrix"));
            }
            let data = Dataset::new(doubles(x, "x")?, dim[0], dim[1], doubles(y, "y")?).map_err(core_err)?;
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

/// A field that may be NULL, where absent means NULL too: R drops a list
/// element assigned NULL with `$<-`.
fn nullable_field(config: &List, name: &str) -> Robj {
    config.iter().find(|(n, _)| *n == name).map_or_else(|| ().into(), |(_, v)| v)
}

/// A double, or an integer (R's `length()` and `5L` are integers).
fn number(config: &List, name: &str) -> Result<f64> {
    let value = field(config, name)?;
    value
        .as_real()
        .or_else(|| value.as_integer().map(f64::from))
        .ok_or_else(|| input_err(format!("config `{name}` must be a number")))
}

/// A client failure as data, so R can raise a classed error naming the
/// client: `kind` is "client" (its data or setup) or "diverged" (its
/// training blew up). Other errors are raised as R errors by `core_err`, and
/// so is a filter that dropped every client: a `[filter]` error about no
/// client in particular.
fn client_failure(e: CoreError) -> Result<List> {
    if is_all_filtered(&e) {
        let CoreError::Client(_, message) = e else { unreachable!("is_all_filtered matches client errors") };
        return Err(extendr_api::Error::Other(format!("[filter] {message}")));
    }
    let kind = e.kind();
    match e {
        CoreError::Client(k, message) | CoreError::ClientDiverged(k, message) => {
            Ok(list!(ok = false, client = k as i32 + 1, message = message, kind = kind))
        }
        other => Err(core_err(other)),
    }
}

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

/// Doubles from an R double or integer vector (R users write `epochs = 2L`).
fn numbers(x: &Robj, what: &str) -> Result<Vec<f64>> {
    if let Some(v) = x.as_real_slice() {
        return Ok(v.to_vec());
    }
    if let Some(v) = x.as_integer_slice() {
        return Ok(v.iter().map(|&i| i as f64).collect());
    }
    Err(input_err(format!("`{what}` must be a numeric vector")))
}

/// NULL or a double vector, borrowed.
fn optional_doubles<'a>(x: &'a Robj, what: &str) -> Result<Option<&'a [f64]>> {
    if x.is_null() {
        Ok(None)
    } else {
        doubles(x, what).map(Some)
    }
}

fn text(config: &List, name: &str) -> Result<String> {
    field(config, name)?
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| input_err(format!("config `{name}` must be a string")))
}

fn flag(config: &List, name: &str) -> Result<bool> {
    field(config, name)?.as_bool().ok_or_else(|| input_err(format!("config `{name}` must be TRUE or FALSE")))
}

/// The elements of an R list of optional double vectors (NULL: none at
/// all), kept alive while their slices are borrowed.
fn list_elements(x: &Robj, what: &str) -> Result<Vec<Robj>> {
    if x.is_null() {
        return Ok(Vec::new());
    }
    let list = x.as_list().ok_or_else(|| input_err(format!("`{what}` must be a list")))?;
    Ok(list.values().collect())
}

/// Borrows `elements` as optional vectors; an empty list means `n` absent
/// ones (all zeros).
fn optional_vectors<'a>(elements: &'a [Robj], n: usize, what: &str) -> Result<Vec<Option<&'a [f64]>>> {
    if elements.is_empty() {
        return Ok(vec![None; n]);
    }
    if elements.len() != n {
        return Err(input_err(format!("`{what}` has {} elements for {n} clients", elements.len())));
    }
    elements.iter().map(|e| optional_doubles(e, what)).collect()
}

fn local_optimizer(config: &List) -> Result<LocalOptimizer> {
    Ok(match text(config, "optimizer")?.as_str() {
        "sgd" => LocalOptimizer::Sgd { momentum: number(config, "momentum")? },
        "adam" => LocalOptimizer::Adam { beta1: number(config, "beta1")?, beta2: number(config, "beta2")?, eps: number(config, "eps")? },
        "rmsprop" => LocalOptimizer::RmsProp { alpha: number(config, "alpha")?, eps: number(config, "eps")? },
        "adagrad" => LocalOptimizer::Adagrad { eps: number(config, "eps")? },
        other => return Err(input_err(format!("config `optimizer` \"{other}\" is not a known local optimizer"))),
    })
}

fn client_algorithm(config: &List) -> Result<ClientAlgorithm> {
    Ok(match text(config, "algorithm")?.as_str() {
        "fedavg" => ClientAlgorithm::FedAvg,
        "fedprox" => ClientAlgorithm::FedProx { mu: number(config, "mu")? },
        "scaffold" => ClientAlgorithm::Scaffold,
        "fednova" => ClientAlgorithm::FedNova,
        other => return Err(input_err(format!("config `algorithm` \"{other}\" is not a known client algorithm"))),
    })
}

/// The R objects of config `server`, held while their state is borrowed.
struct ServerObjects {
    settings: List,
    m: Robj,
    v: Robj,
}

impl ServerObjects {
    fn new(config: &List) -> Result<Self> {
        let settings = field(config, "server")?.as_list().ok_or_else(|| input_err("config `server` must be a list"))?;
        let (m, v) = (nullable_field(&settings, "m"), nullable_field(&settings, "v"));
        Ok(ServerObjects { settings, m, v })
    }

    fn step(&self) -> Result<ServerStep<'_>> {
        let s = &self.settings;
        let lr = number(s, "lr")?;
        let optimizer = match text(s, "kind")?.as_str() {
            "sgd" => ServerOptimizer::Sgd { lr, momentum: number(s, "momentum")? },
            "adagrad" => ServerOptimizer::Adagrad { lr, beta1: number(s, "beta1")?, tau: number(s, "tau")? },
            "adam" => ServerOptimizer::Adam { lr, beta1: number(s, "beta1")?, beta2: number(s, "beta2")?, tau: number(s, "tau")? },
            "yogi" => ServerOptimizer::Yogi { lr, beta1: number(s, "beta1")?, beta2: number(s, "beta2")?, tau: number(s, "tau")? },
            other => return Err(input_err(format!("config `server$kind` \"{other}\" is not a known server optimizer"))),
        };
        Ok(ServerStep { optimizer, m: optional_doubles(&self.m, "server$m")?, v: optional_doubles(&self.v, "server$v")? })
    }
}

/// A number of `list`, or `None` when NULL or absent.
fn optional_number(list: &List, name: &str, what: &str) -> Result<Option<f64>> {
    let value = nullable_field(list, name);
    if value.is_null() {
        return Ok(None);
    }
    value
        .as_real()
        .or_else(|| value.as_integer().map(f64::from))
        .map(Some)
        .ok_or_else(|| input_err(format!("config `{what}${name}` must be a number or NULL")))
}

fn required_number(list: &List, name: &str, what: &str) -> Result<f64> {
    optional_number(list, name, what)?.ok_or_else(|| input_err(format!("config `{what}${name}` must be a number")))
}

/// A count (a whole number >= 0) of `list`, or `None` when NULL or absent.
fn optional_count(list: &List, name: &str, what: &str) -> Result<Option<usize>> {
    match optional_number(list, name, what)? {
        None => Ok(None),
        Some(x) if x.is_finite() && x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as usize)),
        Some(x) => Err(input_err(format!("config `{what}${name}` = {x} is not a whole number >= 0"))),
    }
}

/// TRUE or FALSE of `list`; NULL or absent is FALSE.
fn optional_flag(list: &List, name: &str, what: &str) -> Result<bool> {
    let value = nullable_field(list, name);
    if value.is_null() {
        return Ok(false);
    }
    value.as_bool().ok_or_else(|| input_err(format!("config `{what}${name}` must be TRUE or FALSE")))
}

/// Layer lengths `layer_sizes` of `list` (NULL or absent: one layer).
fn layer_sizes(list: &List, what: &str) -> Result<Option<Vec<usize>>> {
    let value = nullable_field(list, "layer_sizes");
    if value.is_null() {
        return Ok(None);
    }
    let sizes = numbers(&value, &format!("{what}$layer_sizes"))?;
    sizes
        .iter()
        .map(|&n| {
            if n.is_finite() && n >= 0.0 && n.fract() == 0.0 {
                Ok(n as usize)
            } else {
                Err(input_err(format!("config `{what}$layer_sizes` has {n}, not a whole number >= 0")))
            }
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// An element of `config` that is NULL (absent) or a list.
fn optional_list(config: &List, name: &str) -> Result<Option<List>> {
    let value = nullable_field(config, name);
    if value.is_null() {
        return Ok(None);
    }
    value.as_list().map(Some).ok_or_else(|| input_err(format!("config `{name}` must be a list or NULL")))
}

/// The optional transforms of a round: config `attacks`, `attack_seed`,
/// `filter`, `clip`, `aggregator`, `noise` (NULL or absent: off).
fn round_transforms(config: &List) -> Result<RoundTransforms> {
    let mut t = RoundTransforms::default();
    let attacks = nullable_field(config, "attacks");
    if !attacks.is_null() {
        let list = attacks.as_list().ok_or_else(|| input_err("config `attacks` must be a list or NULL"))?;
        for (i, element) in list.values().enumerate() {
            if element.is_null() {
                t.attacks.push(None);
                continue;
            }
            let what = format!("attacks[[{}]]", i + 1);
            let a = element.as_list().ok_or_else(|| input_err(format!("config `{what}` must be a list or NULL")))?;
            t.attacks.push(Some(match text(&a, "kind")?.as_str() {
                "sign_flip" => Attack::SignFlip { scale: required_number(&a, "scale", &what)? },
                "scale" => Attack::Scale { factor: required_number(&a, "factor", &what)? },
                "gaussian" => Attack::Gaussian { sd: required_number(&a, "sd", &what)? },
                "same_value" => Attack::SameValue { value: required_number(&a, "value", &what)? },
                other => return Err(input_err(format!("config `{what}$kind` \"{other}\" is not a known attack"))),
            }));
        }
        let seed = nullable_field(config, "attack_seed");
        if !seed.is_null() {
            t.attack_seed = number(config, "attack_seed")? as u64;
        }
    }
    if let Some(f) = optional_list(config, "filter")? {
        let per_layer = optional_flag(&f, "per_layer", "filter")?;
        t.filter = Some(NormFilter {
            max_norm: optional_number(&f, "max_norm", "filter")?,
            mad: optional_number(&f, "mad", "filter")?,
            per_layer,
            layer_sizes: if per_layer { layer_sizes(&f, "filter")? } else { None },
        });
    }
    if let Some(c) = optional_list(config, "clip")? {
        let per_layer = optional_flag(&c, "per_layer", "clip")?;
        t.clip = Some(Clip {
            max_norm: required_number(&c, "max_norm", "clip")?,
            per_layer,
            layer_sizes: if per_layer { layer_sizes(&c, "clip")? } else { None },
        });
    }
    if let Some(a) = optional_list(config, "aggregator")? {
        let what = "aggregator";
        t.aggregator = match text(&a, "kind")?.as_str() {
            "weighted" => Aggregator::Weighted,
            "median" => Aggregator::Median,
            "trimmed_mean" => Aggregator::TrimmedMean { trim: required_number(&a, "trim", what)? },
            "krum" => Aggregator::Krum { f: optional_count(&a, "f", what)? },
            "multi_krum" => Aggregator::MultiKrum { f: optional_count(&a, "f", what)?, m: optional_count(&a, "m", what)? },
            "geometric_median" => Aggregator::GeometricMedian {
                tol: optional_number(&a, "tol", what)?.unwrap_or(1e-8),
                max_iter: optional_count(&a, "max_iter", what)?.unwrap_or(100),
            },
            "bulyan" => Aggregator::Bulyan { f: optional_count(&a, "f", what)? },
            other => return Err(input_err(format!("config `aggregator$kind` \"{other}\" is not a known aggregator"))),
        };
    }
    if let Some(l) = optional_list(config, "local_dp")? {
        t.local_noise = Some(LocalNoise {
            clip: required_number(&l, "clip", "local_dp")?,
            sd: required_number(&l, "sd", "local_dp")?,
            seed: required_number(&l, "seed", "local_dp")? as u64,
        });
    }
    if let Some(c) = optional_list(config, "compression")? {
        t.compression = Some(Compression { compressor: compressor(&c)?, seed: required_number(&c, "seed", "compression")? as u64 });
        let residuals = list_elements(&nullable_field(config, "residuals"), "residuals")?;
        t.residuals = residuals
            .iter()
            .map(|r| if r.is_null() { Ok(None) } else { Ok(Some(doubles(r, "residuals")?.to_vec())) })
            .collect::<Result<_>>()?;
    }
    if let Some(n) = optional_list(config, "noise")? {
        t.noise = Some(CentralNoise {
            sd: required_number(&n, "sd", "noise")?,
            seed: required_number(&n, "seed", "noise")? as u64,
            denominator: required_number(&n, "denominator", "noise")?,
        });
    }
    Ok(t)
}

/// A compressor from its R description (`kind` and its settings).
pub(crate) fn compressor(c: &List) -> Result<Compressor> {
    let what = "compression";
    let out = match text(c, "kind")?.as_str() {
        "topk" => Compressor::TopK {
            fraction: required_number(c, "fraction", what)?,
            error_feedback: optional_flag(c, "error_feedback", what)?,
        },
        "random_k" => Compressor::RandomK { fraction: required_number(c, "fraction", what)? },
        "quantize" => Compressor::Quantize {
            bits: required_number(c, "bits", what)? as u32,
            stochastic: optional_flag(c, "stochastic", what)?,
        },
        "float16" => Compressor::Float16,
        "none" => Compressor::None,
        other => return Err(input_err(format!("config `compression$kind` \"{other}\" is not a known compressor"))),
    };
    out.check().map_err(core_err)?;
    Ok(out)
}

/// Residuals per client as an R list (NULL without error feedback).
fn residual_list(residuals: &[Option<Vec<f64>>]) -> Result<Robj> {
    if residuals.iter().all(Option::is_none) {
        return Ok(().into());
    }
    let values = residuals
        .iter()
        .map(|r| match r {
            Some(v) => new_doubles(v.len(), |o| o.copy_from_slice(v)),
            None => Ok(().into()),
        })
        .collect::<Result<Vec<Robj>>>()?;
    Ok(List::from_values(values).into())
}

fn optional_vector(x: Option<&[f64]>) -> Result<Robj> {
    match x {
        Some(v) => new_doubles(v.len(), |o| o.copy_from_slice(v)),
        None => Ok(().into()),
    }
}

fn optional_vector_list(x: Option<Vec<Vec<f64>>>) -> Result<Robj> {
    match x {
        Some(v) => Ok(doubles_list(v)?.into()),
        None => Ok(().into()),
    }
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
    let work = match text(&config, "work")?.as_str() {
        "sgd" => LocalWork::Sgd,
        "gradient" => LocalWork::Gradient,
        _ => return Err(input_err("config `work` must be \"sgd\" or \"gradient\"")),
    };
    let rule = match text(&config, "weights")?.as_str() {
        "samples" => WeightRule::Samples,
        "equal" => WeightRule::Equal,
        "accuracy" => WeightRule::Validation,
        "collect" => WeightRule::Collect,
        _ => return Err(input_err("config `weights` is not a known rule")),
    };
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
        "fedavg" | "fedprox" | "scaffold" | "fedsgd" => FoldRule::Mean,
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
    let control = if algorithm == "scaffold" && !new_control_objs.is_empty() {
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
/// `compression` with `residuals`), as it would before being sent.
/// @noRd
#[extendr]
fn rs_encode_updates(deltas: List, config: List, n_threads: i32) -> Result<List> {
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
    let encoded = fedagg_core::parallel::with_threads(threads(n_threads), || {
        updates
            .iter()
            .enumerate()
            .map(|(k, u)| transforms.client(k).encode(std::borrow::Cow::Borrowed(u)).map(|(u, r)| (u.into_owned(), r)))
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
