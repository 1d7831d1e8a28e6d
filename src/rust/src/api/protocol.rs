//! The round's messages from R: the server writes a `FitIns` per selected
//! client, a node answers with a `FitRes`, the server reads it. The bytes are
//! R raw vectors, as they would travel between processes.

use super::config::*;
use super::convert::{core_err, input_err, new_doubles};
use extendr_api::prelude::*;
use extendr_api::Result;
use fedagg_core::protocol::{
    self, AttackSpec, CompressionSpec, CustomModelSpec, EncodingSpec, EvalIns, EvalRes, FitIns, FitRes, LocalDpSpec, LocalSpec, ModelSpec,
};

fn raw_bytes<'a>(x: &'a Robj, what: &str) -> Result<&'a [u8]> {
    x.as_raw_slice().ok_or_else(|| input_err(format!("`{what}` must be a raw vector")))
}

fn raw(bytes: &[u8]) -> Robj {
    Raw::from_bytes(bytes).into()
}

fn number_or(config: &List, name: &str, default: f64) -> Result<f64> {
    Ok(optional_number(config, name, "config")?.unwrap_or(default))
}

/// The local settings of a round config list (as R's `rust_config()`
/// writes it).
fn local_spec(config: &List) -> Result<LocalSpec> {
    let batch = number(config, "batch_size")?;
    Ok(LocalSpec {
        work: text(config, "work")?,
        algorithm: text(config, "algorithm")?,
        mu: number_or(config, "mu", 0.0)?,
        optimizer: text(config, "optimizer")?,
        momentum: number_or(config, "momentum", 0.0)?,
        beta1: number_or(config, "beta1", 0.0)?,
        beta2: number_or(config, "beta2", 0.0)?,
        eps: number_or(config, "eps", 0.0)?,
        alpha: number_or(config, "alpha", 0.0)?,
        batch_size: if batch.is_finite() { batch as usize } else { 0 },
        lr: number(config, "lr")?,
        weight_decay: number(config, "weight_decay")?,
        shuffle: field(config, "shuffle")?.as_bool().unwrap_or(true),
        seed: number(config, "seed")? as u64,
        weights: text(config, "weights")?,
    })
}

/// The model a message names: a built-in one (its parameters checked
/// against `d`), or, when `custom` is a name, a custom model of `d`
/// parameters that the node trains in R.
fn model_spec(sizes: &Robj, head: i32, bits: i32, custom: &Robj, d: usize) -> Result<ModelSpec> {
    if let Some(name) = custom.as_str() {
        if d == 0 {
            return Err(input_err("`params` is empty"));
        }
        return Ok(ModelSpec { custom: Some(CustomModelSpec { name: name.to_owned(), n_params: d }), ..Default::default() });
    }
    let net = network(sizes, head, bits)?;
    if d != net.n_params() {
        return Err(input_err(format!("`params` has {d} values, the model has {}", net.n_params())));
    }
    let a = arch(sizes)?;
    Ok(ModelSpec { sizes: a.sizes, head, bits, custom: None, input: a.input, front: a.front })
}

/// One `FitIns` per selected client of a round: the global parameters, the
/// round config (local settings, server control, the clients' encodings),
/// and per client its node id, training stream, epochs and step limit (NA:
/// none). Each client's training and encoding draw from its stream (its
/// node's number; FedBuff: its dispatch). Returns list(headers = <one raw
/// frame and header per client>, payload = <raw vectors>): a client's
/// message is its header followed by the shared payload.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fit_instructions(
    sizes: Robj,
    head: i32,
    bits: i32,
    global: Robj,
    config: List,
    nodes: Strings,
    streams: Robj,
    epochs: Robj,
    max_steps: Robj,
    node_rounds: Robj,
    validation: bool,
    round: f64,
    committed_round: f64,
    custom: Robj,
) -> Result<List> {
    let global = doubles(&global, "params")?;
    let model = model_spec(&sizes, head, bits, &custom, global.len())?;
    let streams = numbers(&streams, "streams")?;
    let epochs = numbers(&epochs, "epochs")?;
    let max_steps = numbers(&max_steps, "max_steps")?;
    let node_rounds = numbers(&node_rounds, "node_rounds")?;
    let k = nodes.len();
    if streams.len() != k || epochs.len() != k || max_steps.len() != k || node_rounds.len() != k {
        return Err(input_err("nodes, streams, epochs, max_steps and node_rounds differ in length"));
    }
    let count = |x: f64, max: f64| x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x <= max;
    let round_max = u32::MAX as f64;
    if !count(round, round_max) || !count(committed_round, round_max) {
        return Err(input_err(format!("`round` ({round}) and `committed_round` ({committed_round}) must be whole numbers >= 0")));
    }
    for i in 0..k {
        if !count(streams[i], (1u64 << 53) as f64) {
            return Err(input_err(format!("`streams` has {}, not a whole number >= 0", streams[i])));
        }
        if !(count(epochs[i], protocol::MAX_EPOCHS as f64) && epochs[i] >= 1.0) {
            return Err(input_err(format!("`epochs` has {}, not a count from 1 to {}", epochs[i], protocol::MAX_EPOCHS)));
        }
        if !max_steps[i].is_nan() && !(count(max_steps[i], usize::MAX as f64) && max_steps[i] >= 1.0) {
            return Err(input_err(format!("`max_steps` has {}, not NA or a count >= 1", max_steps[i])));
        }
        if !count(node_rounds[i], round_max) {
            return Err(input_err(format!("`node_rounds` has {}, not a whole number >= 0", node_rounds[i])));
        }
    }
    let local = local_spec(&config)?;
    let transforms = round_transforms(&config)?;
    transforms.check_encodings(global.len(), k).map_err(core_err)?;
    let control_obj = nullable_field(&config, "control");
    let server_control = optional_doubles(&control_obj, "control")?.map(<[f64]>::to_vec);
    // One message per node, sent as its own header followed by the round's
    // vectors, which all of them share: the model is written once.
    let mut ins = FitIns {
        round: round as u32,
        committed_round: committed_round as u32,
        node_round: 0,
        node: String::new(),
        stream: 0,
        epochs: 1,
        max_steps: None,
        validation,
        model,
        local,
        encoding: EncodingSpec::default(),
        params: global.to_vec(),
        server_control,
    };
    let mut headers = Vec::with_capacity(k);
    for i in 0..k {
        let client = transforms.client_on(i, streams[i] as u64);
        ins.node_round = node_rounds[i] as u32;
        ins.node = (*nodes.elt(i)).to_owned();
        ins.stream = streams[i] as u64;
        ins.epochs = epochs[i] as usize;
        ins.max_steps = (!max_steps[i].is_nan()).then_some(max_steps[i] as usize);
        ins.encoding = EncodingSpec {
            local_dp: client.local_noise.map(|l| LocalDpSpec { clip: l.clip, sd: l.sd, seed: l.seed }),
            attack: client.attack.map(AttackSpec::from),
            attack_seed: client.attack_seed,
            compression: client.compression.as_ref().map(CompressionSpec::from),
        };
        headers.push(raw(&protocol::encode_header(&ins).map_err(core_err)?));
    }
    let payload = raw(&protocol::encode_vectors(&ins).map_err(core_err)?);
    Ok(list!(headers = List::from_values(headers), payload = payload))
}

/// A node's half of a round: a `FitIns` (raw), the node's data
/// (`list(x, y)`), its validation data (or NULL), its SCAFFOLD control and
/// residual (or NULL). Returns `list(ok = TRUE, res = <raw FitRes>,
/// control =, residual =)` (the state the node keeps if the round commits),
/// or a failure as data as the round calls do.
/// @noRd
#[extendr]
fn rs_client_fit(ins: Robj, train: List, validation: List, control: Robj, residual: Robj) -> Result<List> {
    let ins: FitIns = protocol::decode(raw_bytes(&ins, "ins")?).map_err(core_err)?;
    let train_objects = data_objects(&train, "train")?;
    let validation_objects = data_objects(&validation, "validation")?;
    let train_sets = datasets(&train_objects)?;
    let validation_sets = datasets(&validation_objects)?;
    let Some(Some(train)) = train_sets.first() else { return Err(input_err("`train` must hold the node's data")) };
    let validation = validation_sets.first().copied().flatten();
    let control = optional_doubles(&control, "control")?;
    let residual = optional_doubles(&residual, "residual")?;
    match fedagg_core::client::fit_message(&ins, train, validation.as_ref(), control, residual) {
        Ok(res) => Ok(list!(
            ok = true,
            res = raw(&protocol::encode(&res).map_err(core_err)?),
            control = optional_values(&res.control)?,
            residual = optional_values(&res.residual)?,
            train_loss = res.train_loss
        )),
        Err(e) => client_failure(e),
    }
}

fn optional(x: Option<f64>) -> f64 {
    x.unwrap_or(f64::NAN)
}

fn optional_values(x: &Option<Vec<f64>>) -> Result<Robj> {
    match x {
        Some(v) => new_doubles(v.len(), |o| o.copy_from_slice(v)),
        None => Ok(().into()),
    }
}

/// One `EvalIns` per node: the candidate global parameters to evaluate on
/// each node's `split` ("validation" or "train"), as
/// `rs_fit_instructions()` returns them (headers and a shared payload).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_eval_instructions(sizes: Robj, head: i32, bits: i32, params: Robj, nodes: Strings, split: &str, round: f64, custom: Robj) -> Result<List> {
    let params = doubles(&params, "params")?;
    let model = model_spec(&sizes, head, bits, &custom, params.len())?;
    let mut ins = EvalIns { round: round as u32, node: String::new(), split: split.to_string(), model, params: params.to_vec() };
    let mut headers = Vec::with_capacity(nodes.len());
    for node in nodes.iter() {
        ins.node = node.to_string();
        headers.push(raw(&protocol::encode_header(&ins).map_err(core_err)?));
    }
    let payload = raw(&protocol::encode_vectors(&ins).map_err(core_err)?);
    Ok(list!(headers = List::from_values(headers), payload = payload))
}

/// A node's answer to an `EvalIns`, from the data of the split it asks
/// for: list(ok, res) or a client failure.
/// @noRd
#[extendr]
fn rs_client_evaluate(ins: Robj, data: List) -> Result<List> {
    let ins: EvalIns = protocol::decode(raw_bytes(&ins, "ins")?).map_err(core_err)?;
    let objects = data_objects(&data, "data")?;
    let sets = datasets(&objects)?;
    let Some(Some(set)) = sets.first() else { return Err(input_err("`data` must hold the node's data")) };
    match fedagg_core::client::evaluate_message(&ins, set) {
        Ok(res) => Ok(list!(ok = true, res = raw(&protocol::encode(&res).map_err(core_err)?))),
        Err(e) => client_failure(e),
    }
}

/// An `EvalIns` or `EvalRes` header (raw) as an R list.
/// @noRd
#[extendr]
fn rs_eval_read(message: Robj) -> Result<List> {
    let bytes = raw_bytes(&message, "message")?;
    match protocol::kind_of(bytes).map_err(core_err)? {
        protocol::Kind::EvalIns => {
            let ins: EvalIns = protocol::decode(bytes).map_err(core_err)?;
            let custom = ins.model.custom.as_ref().map_or("", |c| c.name.as_str());
            // A custom model's node evaluates in R: it needs the parameters.
            let params = if ins.model.custom.is_some() { new_doubles(ins.params.len(), |o| o.copy_from_slice(&ins.params))? } else { ().into() };
            Ok(list!(kind = "EvalIns", round = ins.round as f64, node = ins.node.as_str(), split = ins.split.as_str(),
                     custom = custom, params = params))
        }
        _ => eval_res_list(&protocol::decode(bytes).map_err(core_err)?),
    }
}

/// A read `EvalRes` as an R list.
pub(crate) fn eval_res_list(res: &EvalRes) -> Result<List> {
    Ok(list!(kind = "EvalRes", round = res.round as f64, node = res.node.as_str(), n = res.n, loss = res.loss, metric = res.metric))
}

/// A node's own attack (a simulated malicious node, in its own process)
/// written into the task it received: its update is then attacked exactly
/// as the simulation attacks it, from the round's attack seed and the
/// node's stream. `attack`: list(kind, ...) as R's `rust_attack()` writes it.
/// @noRd
#[extendr]
fn rs_fit_ins_set_attack(ins: Robj, attack: List) -> Result<Robj> {
    let mut ins: FitIns = protocol::decode(raw_bytes(&ins, "ins")?).map_err(core_err)?;
    let parsed = protocol::attack_named(&text(&attack, "kind")?, |f| required_number(&attack, f, "attack").map_err(as_core));
    ins.encoding.attack = Some(AttackSpec::from(parsed.map_err(core_err)?));
    Ok(raw(&protocol::encode(&ins).map_err(core_err)?))
}

/// A `FitRes` (raw) read and checked, as an R list.
/// @noRd
#[extendr]
fn rs_fit_res_read(res: Robj) -> Result<List> {
    fit_res_list(protocol::decode(raw_bytes(&res, "res")?).map_err(core_err)?)
}

/// A read `FitRes` as an R list (its vectors moved into R's memory).
pub(crate) fn fit_res_list(res: FitRes) -> Result<List> {
    Ok(list!(
        kind = "FitRes",
        round = res.round as f64,
        node = res.node.as_str(),
        n_samples = res.n_samples,
        train_loss = res.train_loss,
        steps = res.steps,
        effective_steps = res.effective_steps,
        weight = res.weight,
        val_loss = optional(res.val_loss),
        val_metric = optional(res.val_metric),
        update = new_doubles(res.update.len(), |o| o.copy_from_slice(&res.update))?,
        control = optional_values(&res.control)?,
        residual = optional_values(&res.residual)?
    ))
}

/// A `FitIns` (raw) read and checked, as an R list (for printing and for
/// a node to see what it is asked); its vectors only `with_vectors`.
/// @noRd
#[extendr]
fn rs_fit_ins_read(ins: Robj, with_vectors: bool) -> Result<List> {
    let ins: FitIns = protocol::decode(raw_bytes(&ins, "ins")?).map_err(core_err)?;
    let l = &ins.local;
    let e = &ins.encoding;
    Ok(list!(
        round = ins.round as f64,
        committed_round = ins.committed_round as f64,
        node_round = ins.node_round as f64,
        node = ins.node.as_str(),
        stream = ins.stream as f64,
        epochs = ins.epochs as f64,
        max_steps = ins.max_steps.map_or(f64::NAN, |m| m as f64),
        validation = ins.validation,
        model = list!(
            sizes = ins.model.sizes.iter().map(|&s| s as f64).collect::<Vec<_>>(),
            head = ins.model.head,
            bits = ins.model.bits,
            custom = ins.model.custom.as_ref().map_or("", |c| c.name.as_str()),
            n_params = ins.params.len() as f64
        ),
        local = list!(
            work = l.work.as_str(),
            algorithm = l.algorithm.as_str(),
            mu = l.mu,
            optimizer = l.optimizer.as_str(),
            momentum = l.momentum,
            beta1 = l.beta1,
            beta2 = l.beta2,
            eps = l.eps,
            alpha = l.alpha,
            batch_size = l.batch_size as f64,
            lr = l.lr,
            weight_decay = l.weight_decay,
            shuffle = l.shuffle,
            seed = l.seed as f64,
            weights = l.weights.as_str()
        ),
        encoding = list!(
            local_dp = e.local_dp.is_some(),
            attack = e.attack.as_ref().map_or("", |a| a.kind.as_str()),
            compression = e.compression.as_ref().map_or("", |c| c.kind.as_str())
        ),
        params = if with_vectors { new_doubles(ins.params.len(), |o| o.copy_from_slice(&ins.params))? } else { ().into() },
        server_control = if with_vectors { optional_values(&ins.server_control)? } else { ().into() }
    ))
}

/// A node's encoding of its own update (local DP, its simulated attack,
/// compression with its residual), as its `FitIns` asks: what a custom
/// model's node, which trains in R, sends. The same encoding as the
/// simulation's (`rs_encode_updates`) for that client.
/// @noRd
#[extendr]
fn rs_client_encode(ins: Robj, update: Robj, residual: Robj) -> Result<List> {
    let ins: FitIns = protocol::decode(raw_bytes(&ins, "ins")?).map_err(core_err)?;
    let update = doubles(&update, "update")?;
    if update.len() != ins.params.len() {
        return Err(input_err(format!("`update` has {} values, the task's parameters {}", update.len(), ins.params.len())));
    }
    let residual = optional_doubles(&residual, "residual")?;
    let encoding = fedagg_core::client::encoding_of(&ins, residual).map_err(core_err)?;
    match encoding.encode(std::borrow::Cow::Borrowed(update)) {
        Ok((sent, residual)) => Ok(list!(
            ok = true,
            update = new_doubles(sent.len(), |o| o.copy_from_slice(&sent))?,
            residual = optional_values(&residual)?
        )),
        Err(e) => client_failure(e),
    }
}

/// A `FitRes` answering `ins`, from what a node computed in R: `report`
/// holds n_samples, train_loss, steps, effective_steps, weight, val_loss and
/// val_metric (NA: not evaluated).
/// @noRd
#[extendr]
fn rs_fit_res_make(ins: Robj, report: List, update: Robj, control: Robj, residual: Robj) -> Result<Robj> {
    let ins: FitIns = protocol::decode(raw_bytes(&ins, "ins")?).map_err(core_err)?;
    let get = |name: &str| number(&report, name);
    let maybe = |x: f64| (!x.is_nan()).then_some(x);
    let res = FitRes {
        round: ins.round,
        node: ins.node,
        n_samples: get("n_samples")?,
        train_loss: get("train_loss")?,
        steps: get("steps")?,
        effective_steps: get("effective_steps")?,
        weight: get("weight")?,
        val_loss: maybe(get("val_loss")?),
        val_metric: maybe(get("val_metric")?),
        update: doubles(&update, "update")?.to_vec(),
        control: optional_doubles(&control, "control")?.map(<[f64]>::to_vec),
        residual: optional_doubles(&residual, "residual")?.map(<[f64]>::to_vec),
    };
    if res.update.len() != ins.params.len() {
        return Err(input_err(format!("`update` has {} values, the task's parameters {}", res.update.len(), ins.params.len())));
    }
    Ok(raw(&protocol::encode(&res).map_err(core_err)?))
}

/// An `EvalRes` answering the `EvalIns` of `round` to `node` (as
/// `rs_eval_read()` read it), from an evaluation done in R.
/// @noRd
#[extendr]
fn rs_eval_res_make(round: f64, node: &str, n: f64, loss: f64, metric: f64) -> Result<Robj> {
    if !(round.is_finite() && round >= 0.0 && round.fract() == 0.0 && round <= u32::MAX as f64) {
        return Err(input_err(format!("round must be a count, not {round}")));
    }
    let res = EvalRes { round: round as u32, node: node.to_string(), n, loss, metric };
    Ok(raw(&protocol::encode(&res).map_err(core_err)?))
}

/// The protocol version and the kind of a message, from its frame.
/// @noRd
#[extendr]
fn rs_message_kind(bytes: Robj) -> Result<String> {
    let kind = protocol::kind_of(raw_bytes(&bytes, "message")?).map_err(core_err)?;
    Ok(format!("{kind:?}"))
}

extendr_module! {
    mod protocol;
    fn rs_fit_instructions;
    fn rs_client_fit;
    fn rs_fit_res_read;
    fn rs_fit_ins_read;
    fn rs_message_kind;
    fn rs_eval_instructions;
    fn rs_client_evaluate;
    fn rs_eval_read;
    fn rs_fit_ins_set_attack;
    fn rs_client_encode;
    fn rs_fit_res_make;
    fn rs_eval_res_make;
}
