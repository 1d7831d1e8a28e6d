//! The messages of a round between a server and its nodes, versioned and
//! validated, so that the two halves of a round (`client::fit` on a node,
//! the fold on the server) can run in different processes or machines:
//!
//! * `FitIns`: the server asks a node to train: the global parameters, the
//!   round, the settings of the client algorithm and local optimizer, the
//!   node's random streams, its encoding (local DP, attack, compression) and
//!   the round the server last committed;
//! * `FitRes`: the node's update as sent, its report, and the state it will
//!   keep if the round commits (SCAFFOLD's control, its residual);
//! * `EvalIns` / `EvalRes`: evaluation of given parameters on a node's data
//!   (power-of-choice losses, validation metrics);
//! * `NodeInfo`: what a node says of itself when it joins.
//!
//! Wire format (`encode` / `decode`): the 6 bytes `FEDAGG`, one byte of
//! protocol version, one byte of message kind, the header's length as a
//! little-endian u32, a JSON header, then the message's vectors as raw
//! little-endian float64, in the order the header's `vectors` lists them
//! with their lengths. A reader knows every size before it reads a value,
//! and refuses anything that does not add up.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::client::{LocalWork, WeightRule};
use crate::compress::Compressor;
use crate::error::{invalid, CoreError, CoreResult};
use crate::strategy::{Attack, ClientAlgorithm, Compression, LocalOptimizer};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;

const MAGIC: &[u8; 6] = b"FEDAGG";

/// Headers are small (settings and numbers); a larger one is refused
/// before it is read.
pub const MAX_HEADER_BYTES: usize = 1 << 20;

/// The kinds of message, as the byte after the version says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    FitIns = 1,
    FitRes = 2,
    EvalIns = 3,
    EvalRes = 4,
    NodeInfo = 5,
}

impl Kind {
    fn from_byte(b: u8) -> CoreResult<Kind> {
        Ok(match b {
            1 => Kind::FitIns,
            2 => Kind::FitRes,
            3 => Kind::EvalIns,
            4 => Kind::EvalRes,
            5 => Kind::NodeInfo,
            other => return bad(format!("unknown message kind {other}")),
        })
    }
}

fn bad<T>(msg: impl Into<String>) -> CoreResult<T> {
    Err(CoreError::InvalidArgument("message", msg.into()))
}

/// A built-in model: layer sizes, the head's code and the precision bits;
/// or a custom model (`custom`), which the node trains in R with its own
/// copy of the model's code: the message names it and its dimension only,
/// so no code ever travels.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub sizes: Vec<usize>,
    pub head: i32,
    pub bits: i32,
    /// A convolutional network's input (height, width, channels) and the
    /// codes of its convolutional layers (`conv::FrontOp::code`); empty for
    /// a dense network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input: Vec<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub front: Vec<[usize; 5]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<CustomModelSpec>,
}

/// A model written in R (`model_custom()`): its name and its number of
/// parameters, which the node checks against its own copy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CustomModelSpec {
    pub name: String,
    pub n_params: usize,
}

/// The local work of a round, as `FitConfig` and `LocalConfig` hold it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalSpec {
    /// "sgd" (local training) or "gradient" (FedSGD).
    pub work: String,
    /// "fedavg", "fedprox", "scaffold" or "fednova".
    pub algorithm: String,
    pub mu: f64,
    /// "sgd", "adam", "rmsprop" or "adagrad", with their settings.
    pub optimizer: String,
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub alpha: f64,
    /// 0: full batch.
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub shuffle: bool,
    /// The round's training seed; the node draws from its stream `stream`.
    pub seed: u64,
    /// "samples", "equal", "accuracy" or "collect".
    pub weights: String,
}

/// Local DP of a client's update.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalDpSpec {
    pub clip: f64,
    pub sd: f64,
    pub seed: u64,
}

/// A simulated attack: `kind` ("sign_flip", "scale", "gaussian",
/// "same_value") and its one setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttackSpec {
    pub kind: String,
    pub value: f64,
}

/// A compressor: `kind` ("topk", "random_k", "quantize", "float16",
/// "none") and its settings, with the round's compression seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompressionSpec {
    pub kind: String,
    pub fraction: f64,
    pub error_feedback: bool,
    pub bits: u32,
    pub stochastic: bool,
    pub seed: u64,
}

/// How the node encodes what it sends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EncodingSpec {
    pub local_dp: Option<LocalDpSpec>,
    pub attack: Option<AttackSpec>,
    pub attack_seed: u64,
    pub compression: Option<CompressionSpec>,
}

// The names of the parts a round is made of, once for the whole crate: the
// binding layer reads R's settings by them and a node reads its FitIns by
// them. `get(field)` gives a setting of the part by its name.

/// The local work "sgd" (local training) or "gradient" (FedSGD).
pub fn work_named(name: &str) -> CoreResult<LocalWork> {
    match name {
        "sgd" => Ok(LocalWork::Sgd),
        "gradient" => Ok(LocalWork::Gradient),
        other => invalid("work", format!("\"{other}\" is not \"sgd\" or \"gradient\"")),
    }
}

/// The weight rule "samples", "equal", "accuracy" or "collect".
pub fn weight_rule_named(name: &str) -> CoreResult<WeightRule> {
    match name {
        "samples" => Ok(WeightRule::Samples),
        "equal" => Ok(WeightRule::Equal),
        "accuracy" => Ok(WeightRule::Validation),
        "collect" => Ok(WeightRule::Collect),
        other => invalid("weights", format!("\"{other}\" is not a known weight rule")),
    }
}

/// A client algorithm by name, with its setting `mu` (FedProx).
pub fn algorithm_named(name: &str, get: impl Fn(&'static str) -> CoreResult<f64>) -> CoreResult<ClientAlgorithm> {
    Ok(match name {
        "fedavg" => ClientAlgorithm::FedAvg,
        "fedprox" => ClientAlgorithm::FedProx { mu: get("mu")? },
        "scaffold" => ClientAlgorithm::Scaffold { after_step: false },
        "scaffold_step" => ClientAlgorithm::Scaffold { after_step: true },
        "fednova" => ClientAlgorithm::FedNova,
        other => return invalid("algorithm", format!("\"{other}\" is not a known client algorithm")),
    })
}

/// A local optimizer by name, with its settings.
pub fn optimizer_named(name: &str, get: impl Fn(&'static str) -> CoreResult<f64>) -> CoreResult<LocalOptimizer> {
    Ok(match name {
        "sgd" => LocalOptimizer::Sgd { momentum: get("momentum")? },
        "adam" => LocalOptimizer::Adam { beta1: get("beta1")?, beta2: get("beta2")?, eps: get("eps")? },
        "rmsprop" => LocalOptimizer::RmsProp { alpha: get("alpha")?, eps: get("eps")? },
        "adagrad" => LocalOptimizer::Adagrad { eps: get("eps")? },
        other => return invalid("optimizer", format!("\"{other}\" is not a known local optimizer")),
    })
}

/// A simulated attack by kind, with its one setting (`scale`, `factor`,
/// `sd` or `value`).
pub fn attack_named(kind: &str, get: impl Fn(&'static str) -> CoreResult<f64>) -> CoreResult<Attack> {
    Ok(match kind {
        "sign_flip" => Attack::SignFlip { scale: get("scale")? },
        "scale" => Attack::Scale { factor: get("factor")? },
        "gaussian" => Attack::Gaussian { sd: get("sd")? },
        "same_value" => Attack::SameValue { value: get("value")? },
        other => return invalid("attack", format!("\"{other}\" is not a known attack")),
    })
}

/// A compressor by kind, with its settings (`fraction`, `bits`) and flags
/// (`error_feedback`, `stochastic`).
pub fn compressor_named(
    kind: &str,
    get: impl Fn(&'static str) -> CoreResult<f64>,
    flag: impl Fn(&'static str) -> CoreResult<bool>,
) -> CoreResult<Compressor> {
    let out = match kind {
        "topk" => Compressor::TopK { fraction: get("fraction")?, error_feedback: flag("error_feedback")? },
        "random_k" => Compressor::RandomK { fraction: get("fraction")? },
        "quantize" => Compressor::Quantize { bits: get("bits")? as u32, stochastic: flag("stochastic")? },
        "float16" => Compressor::Float16,
        "none" => Compressor::None,
        other => return invalid("compression", format!("\"{other}\" is not a known compressor")),
    };
    out.check()?;
    Ok(out)
}

impl From<Attack> for AttackSpec {
    fn from(a: Attack) -> Self {
        let (kind, value) = match a {
            Attack::SignFlip { scale } => ("sign_flip", scale),
            Attack::Scale { factor } => ("scale", factor),
            Attack::Gaussian { sd } => ("gaussian", sd),
            Attack::SameValue { value } => ("same_value", value),
        };
        AttackSpec { kind: kind.into(), value }
    }
}

impl AttackSpec {
    pub fn attack(&self) -> CoreResult<Attack> {
        attack_named(&self.kind, |_| Ok(self.value))
    }
}

impl From<&Compression> for CompressionSpec {
    fn from(c: &Compression) -> Self {
        let mut spec = CompressionSpec { kind: String::new(), fraction: 0.0, error_feedback: false, bits: 0, stochastic: false, seed: c.seed };
        spec.kind = match c.compressor {
            Compressor::TopK { fraction, error_feedback } => {
                (spec.fraction, spec.error_feedback) = (fraction, error_feedback);
                "topk"
            }
            Compressor::RandomK { fraction } => {
                spec.fraction = fraction;
                "random_k"
            }
            Compressor::Quantize { bits, stochastic } => {
                (spec.bits, spec.stochastic) = (bits, stochastic);
                "quantize"
            }
            Compressor::Float16 => "float16",
            Compressor::None => "none",
        }
        .into();
        spec
    }
}

impl CompressionSpec {
    pub fn compression(&self) -> CoreResult<Compression> {
        let compressor = compressor_named(
            &self.kind,
            |f| Ok(if f == "bits" { self.bits as f64 } else { self.fraction }),
            |f| Ok(if f == "stochastic" { self.stochastic } else { self.error_feedback }),
        )?;
        Ok(Compression { compressor, seed: self.seed })
    }
}

/// The server asks a node to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitIns {
    pub round: u32,
    /// The last round the server committed: a node keeps the state of a
    /// round only once a later instruction says that round was committed.
    pub committed_round: u32,
    /// The round whose state of this node the server committed last (0:
    /// none): the node keeps a pending state only if it is that round's, so
    /// the state of an attempt the server threw away is never kept.
    pub node_round: u32,
    pub node: String,
    /// The node's random stream of the round's seeds, for its training and
    /// its encoding alike (its number among the server's nodes; FedBuff:
    /// its dispatch).
    pub stream: u64,
    pub epochs: usize,
    /// A deadline cut the work to this many local steps.
    pub max_steps: Option<usize>,
    /// Evaluate the trained model on the node's validation data.
    pub validation: bool,
    pub model: ModelSpec,
    pub local: LocalSpec,
    pub encoding: EncodingSpec,
    #[serde(skip)]
    pub params: Vec<f64>,
    /// SCAFFOLD's server control c.
    #[serde(skip)]
    pub server_control: Option<Vec<f64>>,
}

/// A node's answer to a `FitIns`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitRes {
    pub round: u32,
    pub node: String,
    pub n_samples: f64,
    pub train_loss: f64,
    pub steps: f64,
    /// FedNova's a_i; the local steps otherwise.
    pub effective_steps: f64,
    pub weight: f64,
    /// `None` when not evaluated.
    pub val_loss: Option<f64>,
    pub val_metric: Option<f64>,
    /// The update as sent (after the node's encoding).
    #[serde(skip)]
    pub update: Vec<f64>,
    /// SCAFFOLD: the node's new control c_i (kept once the round commits).
    #[serde(skip)]
    pub control: Option<Vec<f64>>,
    /// Error feedback: the node's new residual (kept once the round commits).
    #[serde(skip)]
    pub residual: Option<Vec<f64>>,
}

/// The server asks a node to evaluate `params` on its "train" or
/// "validation" data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalIns {
    pub round: u32,
    pub node: String,
    pub split: String,
    pub model: ModelSpec,
    #[serde(skip)]
    pub params: Vec<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRes {
    pub round: u32,
    pub node: String,
    pub n: f64,
    pub loss: f64,
    /// Accuracy (classification) or RMSE (regression).
    pub metric: f64,
}

/// What a node says of itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: String,
    pub n_samples: f64,
    pub has_validation: bool,
    pub label_levels: Vec<String>,
    pub data_version: u64,
}

/// The most epochs a `FitIns` may ask of a node.
pub const MAX_EPOCHS: usize = 1_000_000;

/// JSON has no Inf or NaN (serde_json writes them as null, which reads back
/// as something else or not at all): a header number must be finite.
fn finite_numbers(what: &str, numbers: &[(&str, f64)]) -> CoreResult<()> {
    match numbers.iter().find(|(_, x)| !x.is_finite()) {
        Some((name, x)) => bad(format!("{what}'s {name} = {x} is not finite")),
        None => Ok(()),
    }
}

/// A message of the protocol: its kind, and its vectors by name (the header
/// carries everything else).
pub trait Message: Serialize + DeserializeOwned {
    const KIND: Kind;
    /// The vectors to send, in order (absent optional ones left out).
    fn vectors(&self) -> Vec<(&'static str, &[f64])>;
    /// Puts a vector read from the wire in its place.
    fn set_vector(&mut self, name: &str, values: Vec<f64>) -> CoreResult<()>;
    /// Checks what the header alone cannot: required vectors are there.
    fn check(&self) -> CoreResult<()>;
}

impl Message for FitIns {
    const KIND: Kind = Kind::FitIns;
    fn vectors(&self) -> Vec<(&'static str, &[f64])> {
        let mut v = vec![("params", self.params.as_slice())];
        if let Some(c) = &self.server_control {
            v.push(("server_control", c));
        }
        v
    }
    fn set_vector(&mut self, name: &str, values: Vec<f64>) -> CoreResult<()> {
        match name {
            "params" => self.params = values,
            "server_control" => self.server_control = Some(values),
            other => return bad(format!("FitIns has no vector `{other}`")),
        }
        Ok(())
    }
    fn check(&self) -> CoreResult<()> {
        let d = self.params.len();
        if d == 0 {
            return bad("FitIns has no parameters");
        }
        if let Some(c) = &self.model.custom {
            if c.n_params != d {
                return bad(format!("FitIns' custom model has {} parameters, not the {d} sent", c.n_params));
            }
        }
        if self.server_control.as_ref().is_some_and(|c| c.len() != d) {
            return bad(format!("FitIns' server control does not have the {d} values of the parameters"));
        }
        if self.epochs == 0 || self.epochs > MAX_EPOCHS {
            return bad(format!("FitIns asks for {} epochs (1 to {MAX_EPOCHS})", self.epochs));
        }
        if self.max_steps == Some(0) {
            return bad("FitIns asks for at most 0 steps");
        }
        finite_numbers("FitIns", &[("lr", self.local.lr), ("mu", self.local.mu), ("momentum", self.local.momentum),
                                   ("weight_decay", self.local.weight_decay), ("beta1", self.local.beta1),
                                   ("beta2", self.local.beta2), ("eps", self.local.eps), ("alpha", self.local.alpha)])
    }
}

impl Message for FitRes {
    const KIND: Kind = Kind::FitRes;
    fn vectors(&self) -> Vec<(&'static str, &[f64])> {
        let mut v = vec![("update", self.update.as_slice())];
        if let Some(c) = &self.control {
            v.push(("control", c));
        }
        if let Some(r) = &self.residual {
            v.push(("residual", r));
        }
        v
    }
    fn set_vector(&mut self, name: &str, values: Vec<f64>) -> CoreResult<()> {
        match name {
            "update" => self.update = values,
            "control" => self.control = Some(values),
            "residual" => self.residual = Some(values),
            other => return bad(format!("FitRes has no vector `{other}`")),
        }
        Ok(())
    }
    fn check(&self) -> CoreResult<()> {
        let d = self.update.len();
        if d == 0 {
            return bad("FitRes has no update");
        }
        for (name, v) in [("control", &self.control), ("residual", &self.residual)] {
            if v.as_ref().is_some_and(|v| v.len() != d) {
                return bad(format!("FitRes' {name} does not have the {d} values of the update"));
            }
        }
        if let Some(i) = self.update.iter().position(|v| !v.is_finite()) {
            return bad(format!("FitRes' update has a non-finite value at position {}", i + 1));
        }
        if !(self.n_samples.is_finite() && self.n_samples >= 0.0) {
            return bad(format!("FitRes' n_samples = {} is not a number >= 0", self.n_samples));
        }
        finite_numbers("FitRes", &[("train_loss", self.train_loss), ("steps", self.steps),
                                   ("effective_steps", self.effective_steps), ("weight", self.weight),
                                   ("val_loss", self.val_loss.unwrap_or(0.0)), ("val_metric", self.val_metric.unwrap_or(0.0))])
    }
}

impl Message for EvalIns {
    const KIND: Kind = Kind::EvalIns;
    fn vectors(&self) -> Vec<(&'static str, &[f64])> {
        vec![("params", self.params.as_slice())]
    }
    fn set_vector(&mut self, name: &str, values: Vec<f64>) -> CoreResult<()> {
        match name {
            "params" => self.params = values,
            other => return bad(format!("EvalIns has no vector `{other}`")),
        }
        Ok(())
    }
    fn check(&self) -> CoreResult<()> {
        if !matches!(self.split.as_str(), "train" | "validation") {
            return bad(format!("EvalIns' split \"{}\" is not \"train\" or \"validation\"", self.split));
        }
        Ok(())
    }
}

impl Message for EvalRes {
    const KIND: Kind = Kind::EvalRes;
    fn vectors(&self) -> Vec<(&'static str, &[f64])> {
        Vec::new()
    }
    fn set_vector(&mut self, name: &str, _: Vec<f64>) -> CoreResult<()> {
        bad(format!("EvalRes has no vector `{name}`"))
    }
    fn check(&self) -> CoreResult<()> {
        Ok(())
    }
}

impl Message for NodeInfo {
    const KIND: Kind = Kind::NodeInfo;
    fn vectors(&self) -> Vec<(&'static str, &[f64])> {
        Vec::new()
    }
    fn set_vector(&mut self, name: &str, _: Vec<f64>) -> CoreResult<()> {
        bad(format!("NodeInfo has no vector `{name}`"))
    }
    fn check(&self) -> CoreResult<()> {
        if self.node.is_empty() {
            return bad("NodeInfo has an empty node id");
        }
        Ok(())
    }
}

/// The header as sent: the message's own fields and its vectors' names and
/// lengths.
#[derive(Serialize, Deserialize)]
struct Header<T> {
    message: T,
    vectors: Vec<(String, usize)>,
}

/// A message on the wire.
pub fn encode<M: Message>(message: &M) -> CoreResult<Vec<u8>> {
    encode_with(message, true)
}

/// The frame and header of a message, and its vectors if `with_vectors`.
fn encode_with<M: Message>(message: &M, with_vectors: bool) -> CoreResult<Vec<u8>> {
    message.check()?;
    let vectors = message.vectors();
    let header = Header { message, vectors: vectors.iter().map(|(n, v)| (n.to_string(), v.len())).collect() };
    let json = serde_json::to_vec(&header).map_err(|e| CoreError::InvalidArgument("message", format!("cannot write the header: {e}")))?;
    if json.len() > MAX_HEADER_BYTES {
        return bad(format!("the header has {} bytes, more than {MAX_HEADER_BYTES}", json.len()));
    }
    let payload: usize = if with_vectors { vectors.iter().map(|(_, v)| v.len()).sum() } else { 0 };
    let total = payload.checked_mul(8).and_then(|p| p.checked_add(12 + json.len()));
    let Some(total) = total else { return Err(CoreError::Memory("the message is larger than memory can address".into())) };
    crate::alloc::check_bytes(total, "a protocol message")?;
    let mut out = Vec::new();
    out.try_reserve_exact(total).map_err(|_| CoreError::Memory(format!("not enough memory for a protocol message of {total} bytes")))?;
    out.extend_from_slice(MAGIC);
    out.push(PROTOCOL_VERSION);
    out.push(M::KIND as u8);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    if with_vectors {
        write_vectors(&mut out, &vectors);
    }
    Ok(out)
}

/// Bytes of `vectors` on the wire, checked against memory and the address
/// space before anything is allocated.
fn vector_bytes(vectors: &[(&str, &[f64])]) -> CoreResult<usize> {
    let total = vectors.iter().try_fold(0usize, |acc, (_, v)| v.len().checked_mul(8).and_then(|b| acc.checked_add(b)));
    let total = total.ok_or_else(|| CoreError::Memory("a protocol message larger than memory can address".into()))?;
    crate::alloc::check_bytes(total, "a protocol message")?;
    Ok(total)
}

/// Appends `vectors` as little-endian float64, in order (`out` has room).
fn write_vectors(out: &mut Vec<u8>, vectors: &[(&str, &[f64])]) {
    for (_, v) in vectors {
        for x in *v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
}

/// The kind of the message in `bytes`, from its frame alone.
pub fn kind_of(bytes: &[u8]) -> CoreResult<Kind> {
    frame(bytes).map(|(kind, _, _)| kind)
}

/// The kind of a message sent in two parts, its frame and header
/// (`prefix`, with any vectors that follow it) and vectors shared by
/// several messages (`payload`), checked as far as the frame goes: the
/// sizes the header announces must be those of the bytes that follow it.
pub fn kind_of_parts(prefix: &[u8], payload: &[u8]) -> CoreResult<Kind> {
    let (kind, header, rest) = frame(prefix)?;
    let (_, expected) = announced(header)?;
    if Some(expected) != rest.len().checked_add(payload.len()) {
        return bad("the header's vector sizes are not those of the bytes that follow it");
    }
    Ok(kind)
}

/// The vectors a header announces (name, length) and their bytes in all.
fn announced(header: &[u8]) -> CoreResult<(Vec<(String, usize)>, usize)> {
    #[derive(Deserialize)]
    struct Sizes {
        vectors: Vec<(String, usize)>,
    }
    let sizes: Sizes = serde_json::from_slice(header).map_err(|e| CoreError::InvalidArgument("message", format!("malformed header: {e}")))?;
    let total = sizes.vectors.iter().try_fold(0usize, |acc, (_, n)| n.checked_mul(8).and_then(|b| acc.checked_add(b)));
    let Some(total) = total else { return bad("the header announces vectors larger than memory can address") };
    Ok((sizes.vectors, total))
}

/// A message as its own frame and header (the first part) and its vectors
/// (the second), which several messages can share: `encode()` is their
/// concatenation.
pub fn encode_header<M: Message>(message: &M) -> CoreResult<Vec<u8>> {
    encode_with(message, false)
}

/// The vectors of a message on the wire (the part after its header).
pub fn encode_vectors<M: Message>(message: &M) -> CoreResult<Vec<u8>> {
    message.check()?;
    let vectors = message.vectors();
    let total = vector_bytes(&vectors)?;
    let mut out = Vec::new();
    out.try_reserve_exact(total).map_err(|_| CoreError::Memory(format!("not enough memory for a protocol message of {total} bytes")))?;
    write_vectors(&mut out, &vectors);
    Ok(out)
}

/// The frame's first 12 bytes: magic, version, kind, header length.
fn frame_start(bytes: &[u8]) -> CoreResult<(Kind, usize)> {
    if bytes.len() < 12 || &bytes[..6] != MAGIC {
        return bad("not a fedagg message (no FEDAGG frame)");
    }
    if bytes[6] != PROTOCOL_VERSION {
        return bad(format!("protocol version {} (this build speaks {PROTOCOL_VERSION})", bytes[6]));
    }
    let kind = Kind::from_byte(bytes[7])?;
    let header_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if header_len > MAX_HEADER_BYTES {
        return bad(format!("the header claims {header_len} bytes, more than {MAX_HEADER_BYTES}"));
    }
    Ok((kind, header_len))
}

/// The frame: kind, header bytes, payload bytes.
fn frame(bytes: &[u8]) -> CoreResult<(Kind, &[u8], &[u8])> {
    let (kind, header_len) = frame_start(bytes)?;
    let rest = &bytes[12..];
    if rest.len() < header_len {
        return bad(format!("the header claims {header_len} bytes, the message has {}", rest.len()));
    }
    Ok((kind, &rest[..header_len], &rest[header_len..]))
}

/// A message read from the wire, checked: its kind, version, every size,
/// and its own consistency.
pub fn decode<M: Message>(bytes: &[u8]) -> CoreResult<M> {
    let mut reader = Reader::new(Some(bytes.len()));
    reader.push(bytes)?;
    reader.finish()
}

/// Reads a message as its bytes arrive, straight into its vectors: a large
/// upload is never held as bytes and numbers at once. The frame and header
/// come first; once the header is read, every vector is allocated at the
/// size it announces (refused if the bytes still to come cannot hold them),
/// and the values are filled in as the chunks arrive.
pub struct Reader {
    /// The whole message's size, when known in advance (an HTTP body's
    /// Content-Length).
    expected: Option<usize>,
    /// Bytes seen.
    seen: usize,
    /// The frame and header, until the header is complete.
    head: Vec<u8>,
    header_len: Option<usize>,
    vectors: Vec<(String, Vec<f64>)>,
    /// Announced lengths, in order.
    lengths: Vec<usize>,
    current: usize,
    /// A value cut between two chunks.
    carry: [u8; 8],
    carried: usize,
}

impl Reader {
    pub fn new(expected: Option<usize>) -> Self {
        Reader { expected, seen: 0, head: Vec::new(), header_len: None, vectors: Vec::new(), lengths: Vec::new(), current: 0, carry: [0; 8], carried: 0 }
    }

    /// The message's kind, once its frame has been read.
    pub fn kind(&self) -> Option<Kind> {
        frame_start(&self.head).ok().map(|(k, _)| k)
    }

    pub fn push(&mut self, mut chunk: &[u8]) -> CoreResult<()> {
        self.seen = self.seen.saturating_add(chunk.len());
        if self.expected.is_some_and(|e| self.seen > e) {
            return bad("the message is longer than announced");
        }
        // The frame, then the header (at most 12 + MAX_HEADER_BYTES bytes).
        while self.header_len.is_none() && !chunk.is_empty() {
            let want = if self.head.len() < 12 { 12 } else { 12 + frame_start(&self.head)?.1 };
            let take = (want - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.head.len() < 12 {
                break;
            }
            let (_, h) = frame_start(&self.head)?;
            if let Some(e) = self.expected {
                if e < 12 + h {
                    return bad(format!("the header claims {h} bytes, the message has {}", e - 12));
                }
            }
            if self.head.len() == 12 + h {
                self.start_vectors()?;
            }
        }
        self.fill(chunk)
    }

    fn start_vectors(&mut self) -> CoreResult<()> {
        let header = &self.head[12..];
        let (vectors, total) = announced(header)?;
        if let Some(e) = self.expected {
            if e - self.head.len() != total {
                return bad(format!("the header announces {total} bytes of vectors, the message has {}", e - self.head.len()));
            }
        }
        for (name, n) in vectors {
            let mut values = Vec::new();
            values.try_reserve_exact(n).map_err(|_| CoreError::Memory(format!("not enough memory for the vector `{name}` of {n} values")))?;
            self.lengths.push(n);
            self.vectors.push((name, values));
        }
        self.header_len = Some(header.len());
        Ok(())
    }

    fn fill(&mut self, mut chunk: &[u8]) -> CoreResult<()> {
        while !chunk.is_empty() {
            while self.current < self.vectors.len() && self.vectors[self.current].1.len() == self.lengths[self.current] {
                self.current += 1;
            }
            let Some((_, v)) = self.vectors.get_mut(self.current) else {
                return bad("the message has bytes after its vectors");
            };
            if self.carried > 0 || chunk.len() < 8 {
                let take = (8 - self.carried).min(chunk.len());
                self.carry[self.carried..self.carried + take].copy_from_slice(&chunk[..take]);
                self.carried += take;
                chunk = &chunk[take..];
                if self.carried == 8 {
                    v.push(f64::from_le_bytes(self.carry));
                    self.carried = 0;
                }
                continue;
            }
            let room = self.lengths[self.current] - v.len();
            let n = (chunk.len() / 8).min(room);
            v.extend(chunk[..8 * n].chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))));
            chunk = &chunk[8 * n..];
        }
        Ok(())
    }

    /// The message, once every byte is in, checked as `decode()` checks it.
    pub fn finish<M: Message>(self) -> CoreResult<M> {
        let (kind, h) = frame_start(&self.head)?;
        if kind != M::KIND {
            return bad(format!("a {kind:?} message where a {:?} was expected", M::KIND));
        }
        if self.header_len.is_none() {
            return bad(format!("the header claims {h} bytes, the message has {}", self.head.len() - 12));
        }
        let complete = self.carried == 0 && self.vectors.iter().zip(&self.lengths).all(|((_, v), &n)| v.len() == n);
        if !complete {
            let expected: usize = self.lengths.iter().sum::<usize>() * 8;
            return bad(format!("the header announces {expected} bytes of vectors, the message has {}", self.seen - 12 - h));
        }
        let header: Header<M> =
            serde_json::from_slice(&self.head[12..]).map_err(|e| CoreError::InvalidArgument("message", format!("malformed header: {e}")))?;
        let mut message = header.message;
        for (name, values) in self.vectors {
            message.set_vector(&name, values)?;
        }
        message.check()?;
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fit_ins() -> FitIns {
        FitIns {
            round: 3,
            committed_round: 2,
            node_round: 1,
            node: "site-a".into(),
            stream: 7,
            epochs: 2,
            max_steps: None,
            validation: false,
            model: ModelSpec { sizes: vec![4, 3], head: 2, bits: 64, custom: None, ..Default::default() },
            local: LocalSpec {
                work: "sgd".into(),
                algorithm: "fedprox".into(),
                mu: 0.1,
                optimizer: "sgd".into(),
                momentum: 0.9,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                alpha: 0.99,
                batch_size: 10,
                lr: 0.05,
                weight_decay: 0.0,
                shuffle: true,
                seed: 12345,
                weights: "samples".into(),
            },
            encoding: EncodingSpec { attack: Some(AttackSpec { kind: "scale".into(), value: 10.0 }), ..Default::default() },
            params: vec![0.1, -2.5, f64::MIN_POSITIVE, 1e300, 0.0, -0.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0],
            server_control: Some(vec![1.0; 15]),
        }
    }

    #[test]
    fn messages_round_trip_bit_for_bit() {
        let ins = fit_ins();
        let bytes = encode(&ins).unwrap();
        assert_eq!(&bytes[..6], b"FEDAGG");
        assert_eq!(kind_of(&bytes).unwrap(), Kind::FitIns);
        let back: FitIns = decode(&bytes).unwrap();
        assert_eq!(back, ins);
        assert_eq!(back.params[5].to_bits(), (-0.0f64).to_bits());
        // Header numbers too, to the bit (the default JSON float parser is
        // not always exact).
        let mut rng = crate::rng::Rng::new(3, 0);
        for _ in 0..2000 {
            let mut ins = fit_ins();
            ins.local.lr = rng.uniform() * 10f64.powi((rng.uniform() * 40.0) as i32 - 20);
            let back: FitIns = decode(&encode(&ins).unwrap()).unwrap();
            assert_eq!(back.local.lr.to_bits(), ins.local.lr.to_bits());
        }
        let res = FitRes {
            round: 3,
            node: "site-a".into(),
            n_samples: 54.0,
            train_loss: 0.25,
            steps: 12.0,
            effective_steps: 12.0,
            weight: 54.0,
            val_loss: None,
            val_metric: Some(0.5),
            update: vec![0.5; 15],
            control: None,
            residual: Some(vec![0.0; 15]),
        };
        assert_eq!(decode::<FitRes>(&encode(&res).unwrap()).unwrap(), res);
        let info = NodeInfo { node: "b".into(), n_samples: 10.0, has_validation: true, label_levels: vec!["no".into(), "yes".into()], data_version: 2 };
        assert_eq!(decode::<NodeInfo>(&encode(&info).unwrap()).unwrap(), info);
    }

    #[test]
    fn a_custom_model_travels_by_name_and_dimension_only() {
        let mut ins = fit_ins();
        ins.model = ModelSpec { custom: Some(CustomModelSpec { name: "glm".into(), n_params: 15 }), ..Default::default() };
        let back: FitIns = decode(&encode(&ins).unwrap()).unwrap();
        assert_eq!(back, ins);
        // A built-in model's header has no `custom` field at all, so older
        // readers see the message as before.
        let plain = encode(&fit_ins()).unwrap();
        assert!(!String::from_utf8_lossy(&plain).contains("custom"));
        // The announced dimension must be the one sent.
        ins.model.custom = Some(CustomModelSpec { name: "glm".into(), n_params: 14 });
        assert!(matches!(encode(&ins), Err(CoreError::InvalidArgument("message", _))));
        // The Rust trainer refuses it: it trains in R.
        ins.model.custom = Some(CustomModelSpec { name: "glm".into(), n_params: 15 });
        assert!(crate::client::network_of(&ins.model).is_err());
    }

    #[test]
    fn a_message_in_two_parts_is_the_whole_message() {
        let ins = fit_ins();
        let (head, tail) = (encode_header(&ins).unwrap(), encode_vectors(&ins).unwrap());
        assert_eq!([head.clone(), tail.clone()].concat(), encode(&ins).unwrap());
        assert_eq!(kind_of_parts(&head, &tail).unwrap(), Kind::FitIns);
        assert_eq!(kind_of_parts(&encode(&ins).unwrap(), &[]).unwrap(), Kind::FitIns);
        assert!(kind_of_parts(&head, &tail[8..]).is_err(), "a payload one value short");
        assert!(kind_of_parts(&head, &[]).is_err(), "no payload");
        assert!(kind_of_parts(&head[..head.len() - 1], &tail).is_err(), "a cut header");
    }

    #[test]
    fn a_message_read_chunk_by_chunk_is_the_message() {
        let bytes = encode(&fit_ins()).unwrap();
        let whole: FitIns = decode(&bytes).unwrap();
        for size in [1, 3, 7, 8, 9, 13, 64, 1000, bytes.len()] {
            for expected in [Some(bytes.len()), None] {
                let mut r = Reader::new(expected);
                for chunk in bytes.chunks(size) {
                    r.push(chunk).unwrap();
                }
                assert_eq!(r.kind(), Some(Kind::FitIns));
                let back: FitIns = r.finish().unwrap();
                assert_eq!(back, whole, "chunks of {size}");
                assert_eq!(back.params[5].to_bits(), (-0.0f64).to_bits());
            }
        }
        // Refused as soon as the header says more than the body can hold,
        // before anything is allocated for it.
        let mut r = Reader::new(Some(bytes.len() - 8));
        let cut = 12 + u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert!(r.push(&bytes[..cut]).is_err());
        // Cut short, one byte too many, or another kind.
        for (body, expected) in [(&bytes[..bytes.len() - 3], None), (&bytes[..], Some(bytes.len() - 1))] {
            let mut r = Reader::new(expected);
            let pushed = body.chunks(5).try_for_each(|c| r.push(c));
            assert!(pushed.is_err() || r.finish::<FitIns>().is_err());
        }
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 8]);
        assert!(decode::<FitIns>(&longer).is_err(), "bytes after the vectors");
        let mut r = Reader::new(None);
        r.push(&bytes).unwrap();
        assert!(r.finish::<FitRes>().is_err(), "a FitIns read as a FitRes");
    }

    #[test]
    fn malformed_messages_are_refused_with_reasons() {
        let bytes = encode(&fit_ins()).unwrap();
        let refused = |b: &[u8]| matches!(decode::<FitIns>(b), Err(CoreError::InvalidArgument("message", _)));
        // Truncated anywhere, one byte too many, another kind, version or magic.
        for cut in [0, 5, 11, 12, 40, bytes.len() - 8, bytes.len() - 1] {
            assert!(refused(&bytes[..cut]), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(refused(&longer));
        let mut other = bytes.clone();
        other[7] = Kind::FitRes as u8;
        assert!(refused(&other));
        let mut version = bytes.clone();
        version[6] = 99;
        assert!(refused(&version));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(refused(&magic));
        // A header that claims more than the limit is refused before reading.
        let mut huge = bytes.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(refused(&huge));
        // A vector length that overflows the payload size.
        let json = serde_json::to_vec(&Header { message: fit_ins(), vectors: vec![("params".to_string(), usize::MAX / 4)] }).unwrap();
        let mut forged = bytes[..8].to_vec();
        forged.extend_from_slice(&(json.len() as u32).to_le_bytes());
        forged.extend_from_slice(&json);
        assert!(refused(&forged));
        // An unknown vector, a control of the wrong length, non-finite updates.
        let mut ins = fit_ins();
        ins.server_control = Some(vec![1.0; 3]);
        assert!(matches!(encode(&ins), Err(CoreError::InvalidArgument("message", _))));
        let res = FitRes {
            round: 1,
            node: "a".into(),
            n_samples: 1.0,
            train_loss: 0.0,
            steps: 1.0,
            effective_steps: 1.0,
            weight: 1.0,
            val_loss: None,
            val_metric: None,
            update: vec![f64::NAN],
            control: None,
            residual: None,
        };
        assert!(encode(&res).is_err());
        // Header numbers must be finite (JSON has no Inf or NaN), epochs bounded.
        let inf_loss = FitRes { update: vec![0.5], train_loss: f64::INFINITY, ..res.clone() };
        assert!(matches!(encode(&inf_loss), Err(CoreError::InvalidArgument("message", _))));
        let inf_val = FitRes { update: vec![0.5], val_loss: Some(f64::INFINITY), ..res };
        assert!(matches!(encode(&inf_val), Err(CoreError::InvalidArgument("message", _))));
        let mut nan_lr = fit_ins();
        nan_lr.local.lr = f64::NAN;
        assert!(matches!(encode(&nan_lr), Err(CoreError::InvalidArgument("message", _))));
        let mut many = fit_ins();
        many.epochs = MAX_EPOCHS + 1;
        assert!(matches!(encode(&many), Err(CoreError::InvalidArgument("message", _))));
        many.epochs = 1;
        many.max_steps = Some(0);
        assert!(matches!(encode(&many), Err(CoreError::InvalidArgument("message", _))));
    }
}
