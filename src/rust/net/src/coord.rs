//! The coordinator's state and its decisions, without sockets: who may
//! ask, which task each node has, which uploads are kept. The HTTP layer
//! (`server`) parses a request into these calls; R posts tasks and takes
//! the uploads between rounds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fedagg_core::protocol::{self, EvalRes, FitRes, Kind, NodeInfo};

use crate::keys::{sha256_hex, SigningKey, VerifyingKey};
use crate::metrics::Metrics;
use crate::sign::{is_token, RequestFields, ResponseFields};

pub const MAX_ID: usize = 128;
pub const MAX_NONCE: usize = 64;
/// Most class names a node may report when it joins.
pub const MAX_LEVELS: usize = 10_000;
/// Room for a FitRes header beside its vectors (names, losses, counts).
pub const REPLY_HEADER_ROOM: usize = 64 * 1024;

/// Limits, with the defaults of `fed_serve()`'s `limits`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Accepted clock difference between a node and the server, seconds.
    pub window_s: i64,
    /// Sustained requests per second per node, and the burst allowed.
    pub rate_per_s: f64,
    pub burst: f64,
    pub header_timeout_ms: u64,
    pub body_timeout_ms: u64,
    /// Longest a `GET /v1/task` waits for a task before answering 204.
    pub max_poll_ms: u64,
    pub max_connections: usize,
    /// Connections one IP address may hold at once.
    pub max_per_peer: usize,
    /// Largest `POST /v1/join` body.
    pub join_max_bytes: usize,
    /// A node is "connected" if heard from within this many seconds.
    pub liveness_s: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            window_s: 300,
            // A fast simulation's rounds take milliseconds: a node may then
            // need hundreds of requests a second. The limit is there against
            // a flood, each request costing a signature check (~50 us).
            rate_per_s: 1000.0,
            burst: 2000.0,
            header_timeout_ms: 10_000,
            body_timeout_ms: 120_000,
            max_poll_ms: 10_000,
            max_connections: 512,
            max_per_peer: 256,
            join_max_bytes: 64 * 1024,
            liveness_s: 30.0,
        }
    }
}

/// Why a request was refused: its HTTP status and a stable reason code
/// (in the metrics, the logs and the body of the answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

pub const fn refuse(status: u16, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

pub const MALFORMED_HEADERS: Refusal = refuse(400, "malformed_headers");
pub const DIGEST_MISMATCH: Refusal = refuse(400, "digest_mismatch");
pub const UNKNOWN_NODE: Refusal = refuse(401, "unknown_node");
pub const BAD_SIGNATURE: Refusal = refuse(401, "bad_signature");
pub const STALE_TIMESTAMP: Refusal = refuse(401, "stale_timestamp");
pub const NOT_ASSIGNED: Refusal = refuse(403, "not_assigned");
pub const NOT_FOUND: Refusal = refuse(404, "not_found");
pub const METHOD: Refusal = refuse(405, "method_not_allowed");
pub const BODY_TIMEOUT: Refusal = refuse(408, "body_timeout");
pub const REPLAYED_NONCE: Refusal = refuse(409, "replayed_nonce");
pub const WRONG_ROUND: Refusal = refuse(409, "wrong_round");
pub const CONFLICTING_UPLOAD: Refusal = refuse(409, "conflicting_upload");
pub const NOT_JOINED: Refusal = refuse(409, "not_joined");
pub const LENGTH_REQUIRED: Refusal = refuse(411, "length_required");
pub const TOO_LARGE: Refusal = refuse(413, "too_large");
pub const MALFORMED_BODY: Refusal = refuse(422, "malformed_body");
pub const WRONG_DIMENSION: Refusal = refuse(422, "wrong_dimension");
pub const NON_FINITE: Refusal = refuse(422, "non_finite");
pub const RATE_LIMITED: Refusal = refuse(429, "rate_limited");
pub const BUSY: Refusal = refuse(429, "upload_in_progress");
pub const NOT_READY: Refusal = refuse(503, "not_ready");

/// One node's task: a FitIns (or EvalIns) for a round, sent as its own
/// frame and header (`prefix`) followed by the round's vectors
/// (`payload`), which every task of the round shares: the global model is
/// held once however many nodes train (a `Bytes` clone is a reference).
#[derive(Clone, Debug)]
pub struct Task {
    pub id: String,
    pub round: u64,
    pub prefix: Bytes,
    pub payload: Bytes,
    /// SHA-256 of the body, prefix then payload (hex), computed once.
    pub digest: String,
    /// The server's signature over the task (node, round, id, digest).
    pub signature: String,
    pub dim: usize,
    /// FitIns tasks are answered by a FitRes, EvalIns ones by an EvalRes.
    pub kind: Kind,
    /// The largest answer this task can have.
    pub max_reply: usize,
    /// The digest of the upload kept for it, if any.
    pub answered: Option<String>,
}

/// What `begin_upload` decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadPlan {
    /// Read the body, at most this many bytes.
    Read(usize),
    /// The same bytes were kept already: answer as then.
    AlreadyKept,
}

/// An accepted upload, waiting for R: decoded once, when it was checked,
/// and kept as numbers (its bytes are dropped then).
#[derive(Clone, Debug)]
pub struct Upload {
    pub node: String,
    pub round: u64,
    pub task: String,
    pub message: Received,
}

/// What an upload answered.
#[derive(Clone, Debug, PartialEq)]
pub enum Received {
    Fit(FitRes),
    Eval(EvalRes),
}

#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub info: Option<NodeInfo>,
    pub joined_at: Option<i64>,
    pub last_seen: Option<Instant>,
    tokens: f64,
    refilled: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Starting or resuming: only /healthz and /metrics answer.
    Starting,
    Running,
    /// The federation ended: nodes are told to stop (410).
    Done,
    ShuttingDown,
}

/// Everything that changes under the coordinator's lock.
pub struct State {
    pub phase: Phase,
    pub nodes: BTreeMap<String, NodeEntry>,
    pub tasks: HashMap<String, Task>,
    pub uploads: Vec<Upload>,
    /// Nodes whose upload body is being read: one at a time per node, so
    /// that a node cannot make the server buffer many bodies at once.
    pub uploading: std::collections::HashSet<String>,
    pub metrics: Metrics,
    nonces: HashMap<String, i64>,
    nonce_order: VecDeque<(i64, String)>,
    /// Token buckets of the viewers (dashboards): their rate is limited
    /// like a node's, apart from the nodes' own.
    viewer_buckets: HashMap<String, (f64, Instant)>,
    /// The last status the server's R side published (JSON), served to
    /// viewers at `GET /v1/status`.
    pub status: Bytes,
}

/// The immutable part: keys and limits.
pub struct Keys {
    pub server: SigningKey,
    pub nodes: HashMap<String, VerifyingKey>,
    /// Read-only clients (dashboards): they may `GET /v1/status` and
    /// nothing else, and nodes may not read it.
    pub viewers: HashMap<String, VerifyingKey>,
    pub federation: String,
}

/// The signed headers of a request, as read.
#[derive(Clone, Debug)]
pub struct Signed {
    pub fields: RequestFields,
    pub signature: String,
}

pub struct Coordinator {
    pub keys: Arc<Keys>,
    pub settings: Settings,
    pub state: std::sync::Mutex<State>,
}

impl Coordinator {
    pub fn new(keys: Keys, settings: Settings) -> Coordinator {
        let now = Instant::now();
        let nodes = keys
            .nodes
            .keys()
            .map(|id| {
                (id.clone(), NodeEntry { info: None, joined_at: None, last_seen: None, tokens: settings.burst, refilled: now })
            })
            .collect();
        Coordinator {
            keys: Arc::new(keys),
            state: std::sync::Mutex::new(State {
                phase: Phase::Starting,
                nodes,
                tasks: HashMap::new(),
                uploads: Vec::new(),
                uploading: Default::default(),
                metrics: Metrics::default(),
                nonces: HashMap::new(),
                nonce_order: VecDeque::new(),
                viewer_buckets: HashMap::new(),
                status: Bytes::from_static(b"null"),
            }),
            settings,
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere must not take the server down with it: the
        // state is only ever replaced whole under the lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn refused(&self, r: Refusal) {
        *self.lock().metrics.rejected.entry(r.reason).or_insert(0) += 1;
    }

    /// Checks a request's identity before its body is read: a known node,
    /// a timestamp in the window, a valid signature over the claimed body
    /// digest, a fresh nonce, and the node's rate. A `viewer` request is
    /// checked against the viewers' keys only, so a node's key cannot read
    /// the status and a viewer's key cannot act as a node.
    pub fn authenticate(&self, s: &Signed, now_unix: i64, viewer: bool) -> Result<(), Refusal> {
        let f = &s.fields;
        let keys = if viewer { &self.keys.viewers } else { &self.keys.nodes };
        let Some(key) = keys.get(&f.node) else { return Err(UNKNOWN_NODE) };
        if f.timestamp.abs_diff(now_unix) > self.settings.window_s.max(0) as u64 {
            return Err(STALE_TIMESTAMP);
        }
        // Verified before the nonce is stored, so that nobody but the node
        // can use up its nonces.
        if !key.verify(f.canonical().as_bytes(), &s.signature) {
            return Err(BAD_SIGNATURE);
        }
        let mut st = self.lock();
        let nonce_key = format!("{}{}/{}", if viewer { "viewer:" } else { "" }, f.node, f.nonce);
        if st.nonces.contains_key(&nonce_key) {
            return Err(REPLAYED_NONCE);
        }
        // Nonces older than the window can go: their timestamps are refused.
        let horizon = now_unix - self.settings.window_s - 1;
        while st.nonce_order.front().map_or(false, |(t, _)| *t < horizon) {
            if let Some((_, k)) = st.nonce_order.pop_front() {
                st.nonces.remove(&k);
            }
        }
        let now = Instant::now();
        let (rate, burst) = (self.settings.rate_per_s, self.settings.burst);
        let (tokens, refilled) = if viewer {
            let e = st.viewer_buckets.entry(f.node.clone()).or_insert((burst, now));
            (&mut e.0, &mut e.1)
        } else {
            let e = st.nodes.get_mut(&f.node).ok_or(UNKNOWN_NODE)?;
            (&mut e.tokens, &mut e.refilled)
        };
        let elapsed = now.duration_since(*refilled).as_secs_f64();
        *tokens = (*tokens + elapsed * rate).min(burst);
        *refilled = now;
        if *tokens < 1.0 {
            return Err(RATE_LIMITED);
        }
        *tokens -= 1.0;
        st.nonces.insert(nonce_key.clone(), f.timestamp);
        st.nonce_order.push_back((f.timestamp, nonce_key));
        Ok(())
    }

    /// A request of this node was accepted: it is alive.
    pub fn touch(&self, node: &str) {
        if let Some(e) = self.lock().nodes.get_mut(node) {
            e.last_seen = Some(Instant::now());
        }
    }

    /// The server's signature over its answer to a node's request.
    pub fn sign_response(&self, req: &RequestFields, path: &str, status: u16, round: u64, task: &str, body: &[u8]) -> String {
        self.sign_response_digest(req, path, status, round, task, sha256_hex(body))
    }

    /// As `sign_response`, with the body's digest already known (a task's).
    pub fn sign_response_digest(&self, req: &RequestFields, path: &str, status: u16, round: u64, task: &str, digest: String) -> String {
        let fields = ResponseFields {
            node: req.node.clone(),
            path: path.to_string(),
            status,
            round,
            task: task.to_string(),
            digest,
            request_nonce: req.nonce.clone(),
        };
        self.keys.server.sign(fields.canonical().as_bytes())
    }

    /// A node says what it holds (NodeInfo).
    pub fn join(&self, node: &str, body: &[u8]) -> Result<(), Refusal> {
        let info: NodeInfo = protocol::decode(body).map_err(|_| MALFORMED_BODY)?;
        if info.node != node {
            return Err(NOT_ASSIGNED);
        }
        let sane = info.n_samples.is_finite()
            && (0.0..=1e15).contains(&info.n_samples)
            && info.label_levels.len() <= MAX_LEVELS
            && info.label_levels.iter().all(|l| l.len() <= 256);
        if !sane {
            return Err(MALFORMED_BODY);
        }
        let mut st = self.lock();
        let entry = st.nodes.get_mut(node).ok_or(UNKNOWN_NODE)?;
        entry.info = Some(info);
        entry.joined_at = Some(crate::unix_now());
        Ok(())
    }

    /// The task waiting for this node, if any: (id, round, body, signature).
    pub fn task_for(&self, node: &str) -> Result<Option<Task>, Refusal> {
        let st = self.lock();
        if st.nodes.get(node).map_or(true, |n| n.info.is_none()) {
            return Err(NOT_JOINED);
        }
        Ok(st.tasks.get(node).filter(|t| t.answered.is_none()).cloned())
    }

    /// What to do with an upload for (node, task, round) whose body has
    /// the signed digest `digest`, decided before its body is read: read
    /// at most this many bytes (the node then holds the upload slot until
    /// `end_upload`), or answer a resend of a kept upload at once.
    pub fn begin_upload(&self, node: &str, task: &str, round: u64, digest: &str) -> Result<UploadPlan, Refusal> {
        let mut st = self.lock();
        let t = st.tasks.get(node).ok_or(NOT_ASSIGNED)?;
        if t.id != task {
            return Err(NOT_ASSIGNED);
        }
        if t.round != round {
            return Err(WRONG_ROUND);
        }
        match &t.answered {
            Some(d) if d == digest => return Ok(UploadPlan::AlreadyKept),
            Some(_) => return Err(CONFLICTING_UPLOAD),
            None => {}
        }
        let limit = t.max_reply;
        if !st.uploading.insert(node.to_string()) {
            return Err(BUSY);
        }
        Ok(UploadPlan::Read(limit))
    }

    pub fn end_upload(&self, node: &str) {
        self.lock().uploading.remove(node);
    }

    /// R's side: the round's deadline passed (or every answer is in): its
    /// tasks are withdrawn, so a late upload is refused (403) rather than
    /// acknowledged and then dropped.
    pub fn close_tasks(&self) {
        self.lock().tasks.clear();
    }

    /// An upload, its digest already checked: kept once; a resend of the
    /// same bytes is answered the same, different bytes are refused.
    /// Returns whether it was new.
    /// `digest`: the body's SHA-256, checked by the caller.
    /// `read`: the body, read (as it arrived) up to its last byte.
    pub fn upload(&self, node: &str, task: &str, round: u64, read: protocol::Reader, digest: String) -> Result<bool, Refusal> {
        let (dim, kind, answered) = {
            let st = self.lock();
            let t = st.tasks.get(node).ok_or(NOT_ASSIGNED)?;
            if t.id != task {
                return Err(NOT_ASSIGNED);
            }
            if t.round != round {
                return Err(WRONG_ROUND);
            }
            (t.dim, t.kind, t.answered.clone())
        };
        if let Some(d) = answered {
            return if d == digest { Ok(false) } else { Err(CONFLICTING_UPLOAD) };
        }
        let message = if kind == Kind::EvalIns {
            Received::Eval(check_eval_res(read.finish(), node, round)?)
        } else {
            Received::Fit(check_fit_res(read.finish(), node, round, dim)?)
        };
        let mut st = self.lock();
        let t = st.tasks.get_mut(node).ok_or(NOT_ASSIGNED)?;
        if t.id != task {
            return Err(NOT_ASSIGNED);
        }
        match &t.answered {
            Some(d) if *d == digest => return Ok(false),
            Some(_) => return Err(CONFLICTING_UPLOAD),
            None => t.answered = Some(digest),
        }
        st.uploads.push(Upload { node: node.to_string(), round, task: task.to_string(), message });
        st.metrics.updates_received += 1;
        Ok(true)
    }

    /// R's side: this round's tasks replace every earlier one (their late
    /// uploads are then refused). `tasks`: (node, the frame and header of
    /// its FitIns or EvalIns), each followed on the wire by the shared
    /// `payload` (the message's vectors; empty when `tasks` hold whole
    /// messages). Returns the task ids.
    pub fn post_tasks(&self, round: u64, dim: usize, tasks: Vec<(String, Bytes)>, payload: Bytes) -> Result<Vec<String>, String> {
        let max_reply = reply_limit(dim).ok_or_else(|| format!("a model of {dim} parameters is too large"))?;
        let mut built = HashMap::with_capacity(tasks.len());
        let mut ids = Vec::with_capacity(tasks.len());
        for (node, prefix) in tasks {
            if !self.keys.nodes.contains_key(&node) {
                return Err(format!("node `{node}` is not in the authorized keys"));
            }
            let kind = match protocol::kind_of_parts(&prefix, &payload) {
                Ok(k @ (Kind::FitIns | Kind::EvalIns)) => k,
                _ => return Err(format!("the task of node `{node}` is not a FitIns or EvalIns message")),
            };
            let max_reply = if kind == Kind::EvalIns { REPLY_HEADER_ROOM } else { max_reply };
            let id = crate::keys::random_hex(12).map_err(|e| e.to_string())?;
            let digest = crate::keys::sha256_hex_parts(&[&prefix, &payload]);
            let signature = self.keys.server.sign(task_text(&node, round, &id, &digest).as_bytes());
            ids.push(id.clone());
            built.insert(node, Task { id, round, prefix, payload: payload.clone(), digest, signature, dim, kind, max_reply, answered: None });
        }
        let mut st = self.lock();
        st.tasks = built;
        st.uploads.clear();
        Ok(ids)
    }

    pub fn take_uploads(&self) -> Vec<Upload> {
        std::mem::take(&mut self.lock().uploads)
    }

    pub fn set_phase(&self, phase: Phase) {
        self.lock().phase = phase;
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// Nodes heard from within the liveness window.
    pub fn connected(&self, st: &State) -> usize {
        let now = Instant::now();
        st.nodes
            .values()
            .filter(|n| n.last_seen.map_or(false, |t| now.duration_since(t).as_secs_f64() <= self.settings.liveness_s))
            .count()
    }

    pub fn set_status(&self, json: Vec<u8>) {
        self.lock().status = Bytes::from(json);
    }

    /// What viewers read at `GET /v1/status`: the status the R side last
    /// published, and the coordinator's own counts at this moment.
    pub fn status_json(&self) -> String {
        let live = self.live_json();
        let st = self.lock();
        // The published part is JSON made by serde_json (rs_net_set_status),
        // spliced in as it is.
        let published = std::str::from_utf8(&st.status).unwrap_or("null");
        format!("{{\"server\":{live},\"published\":{published}}}\n")
    }

    /// The coordinator's own counts at this moment (JSON).
    pub fn live_json(&self) -> String {
        let st = self.lock();
        let registered = st.nodes.values().filter(|n| n.info.is_some()).count();
        let phase = match st.phase {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Done => "done",
            Phase::ShuttingDown => "shutting_down",
        };
        let rejected: serde_json::Map<String, serde_json::Value> =
            st.metrics.rejected.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
        let live = serde_json::json!({
            "phase": phase,
            "nodes_registered": registered,
            "nodes_connected": self.connected(&st),
            "rounds_committed": st.metrics.rounds_committed,
            "updates_received": st.metrics.updates_received,
            "rejected": rejected,
        });
        live.to_string()
    }

    pub fn metrics_text(&self) -> String {
        let st = self.lock();
        let registered = st.nodes.values().filter(|n| n.info.is_some()).count();
        st.metrics.render(registered, self.connected(&st), st.phase == Phase::Running)
    }
}

/// What the server signs for a task (verified by the node with the
/// server's public key, together with the response signature).
pub fn task_text(node: &str, round: u64, task: &str, digest: &str) -> String {
    format!("fedagg-task-v1\n{node}\n{round}\n{task}\n{digest}\n")
}

/// The largest FitRes for a model of `dim` parameters: the update, a
/// control variate and a residual, and room for the header.
pub fn reply_limit(dim: usize) -> Option<usize> {
    dim.checked_mul(8 * 3)?.checked_add(REPLY_HEADER_ROOM)
}

/// A FitRes fit to be folded: its node and round, the model's dimension,
/// finite numbers.
pub fn check_fit_res(read: fedagg_core::error::CoreResult<FitRes>, node: &str, round: u64, dim: usize) -> Result<FitRes, Refusal> {
    let res: FitRes = read.map_err(|e| {
        if e.to_string().contains("finite") {
            NON_FINITE
        } else {
            MALFORMED_BODY
        }
    })?;
    if res.node != node {
        return Err(NOT_ASSIGNED);
    }
    if u64::from(res.round) != round {
        return Err(WRONG_ROUND);
    }
    let dims_ok = res.update.len() == dim
        && res.control.as_ref().map_or(true, |c| c.len() == dim)
        && res.residual.as_ref().map_or(true, |r| r.len() == dim);
    if !dims_ok {
        return Err(WRONG_DIMENSION);
    }
    let finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
    if !finite(&res.update)
        || !res.control.as_deref().map_or(true, finite)
        || !res.residual.as_deref().map_or(true, finite)
        || ![res.n_samples, res.train_loss, res.steps, res.effective_steps, res.weight].iter().all(|x| x.is_finite())
    {
        return Err(NON_FINITE);
    }
    Ok(res)
}

/// An EvalRes for this node and round, with finite numbers.
pub fn check_eval_res(read: fedagg_core::error::CoreResult<EvalRes>, node: &str, round: u64) -> Result<EvalRes, Refusal> {
    let res: EvalRes = read.map_err(|_| MALFORMED_BODY)?;
    if res.node != node {
        return Err(NOT_ASSIGNED);
    }
    if u64::from(res.round) != round {
        return Err(WRONG_ROUND);
    }
    if ![res.n, res.loss, res.metric].iter().all(|x| x.is_finite()) || res.n < 0.0 {
        return Err(NON_FINITE);
    }
    Ok(res)
}

/// Reads the signed headers; `None` if any is missing or malformed.
pub fn read_signed(
    method: &str,
    path: &str,
    header: impl Fn(&str) -> Option<String>,
) -> Option<Signed> {
    let node = header(crate::sign::H_NODE)?;
    let nonce = header(crate::sign::H_NONCE)?;
    let digest = header(crate::sign::H_DIGEST)?;
    let task = header(crate::sign::H_TASK).unwrap_or_default();
    if !is_token(&node, MAX_ID) || !is_token(&nonce, MAX_NONCE) || nonce.len() < 16 {
        return None;
    }
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return None;
    }
    if !task.is_empty() && !is_token(&task, MAX_ID) {
        return None;
    }
    let timestamp = header(crate::sign::H_TIMESTAMP)?.parse::<i64>().ok()?;
    let round = header(crate::sign::H_ROUND).unwrap_or_else(|| "0".into()).parse::<u64>().ok()?;
    let signature = header(crate::sign::H_SIGNATURE)?;
    if signature.len() > 200 {
        return None;
    }
    Some(Signed {
        fields: RequestFields {
            method: method.to_string(),
            path: path.to_string(),
            node,
            timestamp,
            nonce,
            digest,
            round,
            task,
        },
        signature,
    })
}
