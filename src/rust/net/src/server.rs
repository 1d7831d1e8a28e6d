//! The coordinator's HTTP(S) server: hyper on a tokio runtime of its own
//! (background threads), so that R keeps its thread and stays
//! interruptible while nodes talk to the server.
//!
//! Endpoints (inst/protocol.md): `GET /healthz`, `GET /ready`,
//! `GET /metrics`, and the signed `POST /v1/join`, `GET /v1/task`,
//! `POST /v1/update`, `POST /v1/heartbeat`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::buf::Chain;
use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Notify, Semaphore};

use crate::coord::{self, Coordinator, Phase, Refusal, Signed, UploadPlan};
use crate::sign::{H_FEDERATION, H_ROUND, H_SERVER_SIGNATURE, H_TASK};
use crate::NetError;
use fedagg_core::protocol;

pub const H_TASK_SIGNATURE: &str = "x-fedagg-task-signature";
const LOG_KEPT: usize = 10_000;

/// What the server's threads share.
pub struct Shared {
    pub coord: Coordinator,
    /// Woken when tasks are posted or the phase changes (long polls).
    pub tasks_changed: Notify,
    /// Woken when an upload is kept (R waiting in `wait_uploads`).
    pub uploads_ready: Condvar,
    pub log: Mutex<VecDeque<String>>,
    pub log_file: Option<Mutex<std::fs::File>>,
    shutdown: Notify,
    per_peer: Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// Refusals of unauthenticated requests logged this second (bounded,
    /// so that a flood cannot fill the disk).
    log_budget: Mutex<(u64, u32)>,
}

/// A connection counted against its peer's address while it lives.
struct PeerSlot {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    fn take(shared: &Arc<Shared>, ip: std::net::IpAddr) -> Option<PeerSlot> {
        let mut m = shared.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= shared.coord.settings.max_per_peer {
            return None;
        }
        *n += 1;
        Some(PeerSlot { shared: shared.clone(), ip })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.shared.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

pub struct Server {
    runtime: Option<tokio::runtime::Runtime>,
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
}

pub struct Options {
    pub address: SocketAddr,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub log_file: Option<std::path::PathBuf>,
    pub threads: usize,
}

impl Server {
    /// Binds now (so a taken port is an error here), then serves on
    /// background threads until `stop()`.
    pub fn start(coord: Coordinator, opts: Options) -> Result<Server, NetError> {
        let std_listener = std::net::TcpListener::bind(opts.address)
            .map_err(|e| {
                let message = format!("cannot listen on {}: {e}", opts.address);
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    NetError::PortInUse(message)
                } else {
                    NetError::Io(message)
                }
            })?;
        std_listener.set_nonblocking(true).map_err(|e| NetError::Io(e.to_string()))?;
        let addr = std_listener.local_addr().map_err(|e| NetError::Io(e.to_string()))?;
        let log_file = match &opts.log_file {
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| NetError::Io(format!("cannot open the log file {}: {e}", p.display())))?,
            )),
            None => None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads.max(1))
            .thread_name("fedagg-net")
            .enable_all()
            .build()
            .map_err(|e| NetError::Io(format!("cannot start the server's threads: {e}")))?;
        let shared = Arc::new(Shared {
            coord,
            tasks_changed: Notify::new(),
            uploads_ready: Condvar::new(),
            log: Mutex::new(VecDeque::new()),
            log_file,
            shutdown: Notify::new(),
            per_peer: Mutex::new(Default::default()),
            log_budget: Mutex::new((0, 0)),
        });
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(|e| NetError::Io(e.to_string()))?
        };
        runtime.spawn(accept_loop(listener, shared.clone(), opts.tls));
        Ok(Server { runtime: Some(runtime), shared, addr })
    }

    /// Ready to serve nodes (or not: resuming, shutting down); wakes the
    /// long polls so that they answer at once.
    pub fn set_phase(&self, phase: Phase) {
        self.shared.coord.set_phase(phase);
        self.shared.tasks_changed.notify_waiters();
    }

    /// This round's tasks: (node, frame and header) each followed by the
    /// shared `payload` (see `Coordinator::post_tasks`).
    pub fn post_tasks(&self, round: u64, dim: usize, tasks: Vec<(String, Bytes)>, payload: Bytes) -> Result<Vec<String>, String> {
        let ids = self.shared.coord.post_tasks(round, dim, tasks, payload)?;
        self.shared.tasks_changed.notify_waiters();
        Ok(ids)
    }

    /// The uploads kept since the last call, waiting up to `wait` for the
    /// first one.
    pub fn wait_uploads(&self, wait: Duration) -> Vec<coord::Upload> {
        let st = self.shared.coord.lock();
        let (mut st, _) = self
            .shared
            .uploads_ready
            .wait_timeout_while(st, wait, |s| s.uploads.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut st.uploads)
    }

    pub fn log_lines(&self, n: usize) -> Vec<String> {
        let log = self.shared.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().skip(log.len().saturating_sub(n)).cloned().collect()
    }

    /// Refuses new work at once, lets requests in flight finish for up to
    /// `grace`, then stops the threads.
    pub fn stop(&mut self, grace: Duration) {
        self.set_phase(Phase::ShuttingDown);
        self.shared.shutdown.notify_waiters();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(grace);
        }
    }

    pub fn running(&self) -> bool {
        self.runtime.is_some()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>, tls: Option<Arc<rustls::ServerConfig>>) {
    let limit = Arc::new(Semaphore::new(shared.coord.settings.max_connections));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.notified() => return,
            a = listener.accept() => a,
        };
        let Ok((tcp, peer)) = accepted else {
            // Out of descriptors and the like: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shared.coord.refused(coord::refuse(503, "too_many_connections"));
            drop(tcp);
            continue;
        };
        // One address may not take every connection.
        let Some(per_peer) = PeerSlot::take(&shared, peer.ip()) else {
            shared.coord.refused(coord::refuse(503, "too_many_connections"));
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _per_peer = per_peer;
            let header_timeout = Duration::from_millis(shared.coord.settings.header_timeout_ms);
            // A client that stops reading its answers leaves the server's
            // writes pending: they fail after the header time-out.
            let mut timed = tokio_io_timeout::TimeoutStream::new(tcp);
            timed.set_write_timeout(Some(header_timeout));
            let timed = Box::pin(timed);
            match acceptor {
                Some(acc) => {
                    // A handshake that never ends would hold a connection.
                    if let Ok(Ok(stream)) = tokio::time::timeout(header_timeout, acc.accept(timed)).await {
                        serve_connection(TokioIo::new(stream), shared, peer).await;
                    }
                }
                None => serve_connection(TokioIo::new(timed), shared, peer).await,
            }
        });
    }
}

async fn serve_connection<I>(io: I, shared: Arc<Shared>, peer: SocketAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let header_timeout = Duration::from_millis(shared.coord.settings.header_timeout_ms);
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(req, shared, peer).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(true)
        .serve_connection(io, service)
        .await;
}

/// A body in two parts, written one after the other: a task's own header
/// and the round's shared vectors (every other answer has an empty tail).
type Reply = Response<Full<Chain<Bytes, Bytes>>>;

fn plain(status: u16, body: impl Into<Bytes>, content_type: &'static str) -> Reply {
    two_part(status, body.into(), Bytes::new(), content_type)
}

fn two_part(status: u16, head: Bytes, tail: Bytes, content_type: &'static str) -> Reply {
    let mut r = Response::new(Full::new(head.chain(tail)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn refusal_body(r: Refusal) -> String {
    format!("{{\"error\":\"{}\",\"status\":{}}}\n", r.reason, r.status)
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>, peer: SocketAddr) -> Reply {
    let method = req.method().clone();
    let route = req.uri().path().to_string();
    let coord = &shared.coord;
    match route.as_str() {
        "/healthz" | "/ready" | "/metrics" => {
            count(coord, &route);
            if method != Method::GET {
                coord.refused(coord::METHOD);
                return plain(405, refusal_body(coord::METHOD), "application/json");
            }
            match route.as_str() {
                "/healthz" => plain(200, "ok\n", "text/plain"),
                "/ready" => {
                    if coord.phase() == Phase::Running {
                        plain(200, "ready\n", "text/plain")
                    } else {
                        plain(503, "not ready\n", "text/plain")
                    }
                }
                _ => plain(200, coord.metrics_text(), "text/plain; version=0.0.4"),
            }
        }
        "/v1/join" | "/v1/task" | "/v1/update" | "/v1/heartbeat" | "/v1/status" => {
            count(coord, &route);
            let expected = if route == "/v1/task" || route == "/v1/status" { Method::GET } else { Method::POST };
            if method != expected {
                coord.refused(coord::METHOD);
                log(&shared, &route, "", peer, 405, Some(coord::METHOD.reason), 0);
                return plain(405, refusal_body(coord::METHOD), "application/json");
            }
            signed(req, shared.clone(), peer, route).await
        }
        _ => {
            coord.refused(coord::NOT_FOUND);
            plain(404, refusal_body(coord::NOT_FOUND), "application/json")
        }
    }
}

fn count(coord: &Coordinator, route: &str) {
    let key: &'static str = match route {
        "/healthz" => "healthz",
        "/ready" => "ready",
        "/metrics" => "metrics",
        "/v1/join" => "join",
        "/v1/task" => "task",
        "/v1/update" => "update",
        "/v1/status" => "status",
        _ => "heartbeat",
    };
    *coord.lock().metrics.requests.entry(key).or_insert(0) += 1;
}

async fn signed(req: Request<Incoming>, shared: Arc<Shared>, peer: SocketAddr, route: String) -> Reply {
    let coord = &shared.coord;
    let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| route.clone());
    let headers = req.headers().clone();
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).map(str::to_string);
    let node_claimed = header(crate::sign::H_NODE).filter(|n| crate::sign::is_token(n, coord::MAX_ID)).unwrap_or_default();
    let refuse = |r: Refusal, s: Option<&Signed>| {
        coord.refused(r);
        if s.is_some() || log_allowed(&shared) {
            log(&shared, &route, &node_claimed, peer, r.status, Some(r.reason), 0);
        }
        let body = refusal_body(r);
        let mut reply = plain(r.status, body.clone(), "application/json");
        // Answers to authenticated requests are signed, refusals too, so a
        // node can tell the server's "no" from a forged one.
        if let Some(s) = s {
            let sig = coord.sign_response(&s.fields, &s.fields.path, r.status, 0, "", body.as_bytes());
            insert(&mut reply, H_SERVER_SIGNATURE, &sig);
        }
        reply
    };
    let Some(s) = coord::read_signed(req.method().as_str(), &path, header) else {
        return refuse(coord::MALFORMED_HEADERS, None);
    };
    if let Err(r) = coord.authenticate(&s, crate::unix_now(), route == "/v1/status") {
        // Refusals after the signature checked out (a replay, the rate) are
        // signed: the node can tell them from a forged "no".
        let signed_refusal = r == coord::RATE_LIMITED || r == coord::REPLAYED_NONCE;
        return refuse(r, if signed_refusal { Some(&s) } else { None });
    }
    let phase = coord.phase();
    if matches!(phase, Phase::Starting | Phase::ShuttingDown) {
        return refuse(coord::NOT_READY, Some(&s));
    }
    let f = s.fields.clone();
    let kept_answer = || Bytes::from_static(b"{\"status\":\"kept\"}\n");
    let limit = match route.as_str() {
        "/v1/join" => Ok(coord.settings.join_max_bytes),
        "/v1/update" => match coord.begin_upload(&f.node, &f.task, f.round, &f.digest) {
            Ok(UploadPlan::Read(l)) => Ok(l),
            Ok(UploadPlan::AlreadyKept) => {
                // A resend of kept bytes: answered as the first time,
                // without reading it again.
                let a = Answer { status: 200, body: kept_answer(), tail: Bytes::new(), round: f.round, task: &f.task, digest: None, ctype: "application/json" };
                return signed_answer(&shared, &f, &route, peer, a);
            }
            Err(r) => Err(r),
        },
        _ => Ok(0),
    };
    let limit = match limit {
        Ok(l) => l,
        Err(r) => return refuse(r, Some(&s)),
    };
    // Frees the node's upload slot however this request ends.
    struct Slot<'a>(&'a Coordinator, &'a str, bool);
    impl Drop for Slot<'_> {
        fn drop(&mut self) {
            if self.2 {
                self.0.end_upload(self.1);
            }
        }
    }
    let _slot = Slot(coord, &f.node, route == "/v1/update");
    // The body's size is known, and refused, before a byte of it is read.
    let length = match headers.get(CONTENT_LENGTH) {
        Some(v) => match v.to_str().ok().and_then(|t| t.parse::<u64>().ok()) {
            Some(n) => n,
            None => return refuse(coord::MALFORMED_HEADERS, Some(&s)),
        },
        None if limit == 0 => 0,
        None => return refuse(coord::LENGTH_REQUIRED, Some(&s)),
    };
    if length > limit as u64 {
        return refuse(coord::TOO_LARGE, Some(&s));
    }
    let body_timeout = Duration::from_millis(coord.settings.body_timeout_ms);
    if route == "/v1/update" {
        // An update is read straight into its numbers as it arrives, and
        // hashed on the way: it is never held as bytes and numbers at once.
        let read = tokio::time::timeout(body_timeout, read_message(req.into_body(), limit, length as usize)).await;
        let (reader, digest, n) = match read {
            Err(_) => return refuse(coord::BODY_TIMEOUT, Some(&s)),
            Ok(Err(_)) => return refuse(coord::TOO_LARGE, Some(&s)),
            Ok(Ok(r)) => r,
        };
        coord.lock().metrics.bytes_in += n as u64;
        if digest != f.digest {
            return refuse(coord::DIGEST_MISMATCH, Some(&s));
        }
        let Some(reader) = reader else { return refuse(coord::MALFORMED_BODY, Some(&s)) };
        // Checking a large update (every value finite) is CPU work: off
        // the threads that serve the long polls.
        let sh = shared.clone();
        let (node, task, round, digest) = (f.node.clone(), f.task.clone(), f.round, f.digest.clone());
        let kept = tokio::task::spawn_blocking(move || sh.coord.upload(&node, &task, round, reader, digest)).await;
        return match kept {
            Ok(Ok(_)) => {
                shared.uploads_ready.notify_all();
                let a = Answer { status: 200, body: kept_answer(), tail: Bytes::new(), round: f.round, task: &f.task, digest: None, ctype: "application/json" };
                signed_answer(&shared, &f, &route, peer, a)
            }
            Ok(Err(r)) => refuse(r, Some(&s)),
            Err(_) => refuse(coord::MALFORMED_BODY, Some(&s)),
        };
    }
    let body = match tokio::time::timeout(body_timeout, Limited::new(req.into_body(), limit).collect()).await {
        Err(_) => return refuse(coord::BODY_TIMEOUT, Some(&s)),
        Ok(Err(_)) => return refuse(coord::TOO_LARGE, Some(&s)),
        Ok(Ok(b)) => b.to_bytes(),
    };
    coord.lock().metrics.bytes_in += body.len() as u64;
    if crate::keys::sha256_hex(&body) != f.digest {
        return refuse(coord::DIGEST_MISMATCH, Some(&s));
    }
    let answer = |status: u16, body: Bytes, round: u64, task: &str, ctype: &'static str| {
        signed_answer(&shared, &f, &route, peer, Answer { status, body, tail: Bytes::new(), round, task, digest: None, ctype })
    };
    match route.as_str() {
        "/v1/join" => match coord.join(&f.node, &body) {
            Ok(()) => {
                let text = format!("{{\"federation\":{},\"status\":\"joined\"}}\n", json_string(&coord.keys.federation));
                answer(200, Bytes::from(text), 0, "", "application/json")
            }
            Err(r) => refuse(r, Some(&s)),
        },
        "/v1/heartbeat" => answer(204, Bytes::new(), 0, "", "text/plain"),
        "/v1/status" => answer(200, Bytes::from(coord.status_json()), 0, "", "application/json"),
        _ => {
            // GET /v1/task?wait=<seconds>: a long poll.
            let wait = query_wait(&f.path).min(coord.settings.max_poll_ms);
            let deadline = tokio::time::Instant::now() + Duration::from_millis(wait);
            loop {
                let notified = shared.tasks_changed.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                match coord.phase() {
                    Phase::Done => return answer(410, Bytes::from_static(b"{\"status\":\"done\"}\n"), 0, "", "application/json"),
                    Phase::Running => {}
                    _ => return refuse(coord::NOT_READY, Some(&s)),
                }
                match coord.task_for(&f.node) {
                    Err(r) => return refuse(r, Some(&s)),
                    Ok(Some(task)) => {
                        // The task's digest is known: the model is not hashed again.
                        let a = Answer {
                            status: 200,
                            body: task.prefix.clone(),
                            tail: task.payload.clone(),
                            round: task.round,
                            task: &task.id,
                            digest: Some(task.digest.clone()),
                            ctype: "application/octet-stream",
                        };
                        let mut reply = signed_answer(&shared, &f, &route, peer, a);
                        insert(&mut reply, H_TASK_SIGNATURE, &task.signature);
                        return reply;
                    }
                    Ok(None) => {}
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return answer(204, Bytes::new(), 0, "", "text/plain");
                }
            }
        }
    }
}

/// A message body read as it arrives: its bytes hashed (SHA-256, hex) and
/// fed to a protocol reader, and counted. The reader is `None` when the
/// bytes are not a well-formed message (the rest is still read and hashed,
/// so that a digest mismatch is told apart from a malformed body).
async fn read_message(body: Incoming, limit: usize, length: usize) -> Result<(Option<protocol::Reader>, String, usize), ()> {
    let mut body = Limited::new(body, limit);
    let mut reader = Some(protocol::Reader::new(Some(length)));
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut n = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ())?;
        if let Some(data) = frame.data_ref() {
            hash.update(data);
            n += data.len();
            if let Some(r) = reader.as_mut() {
                if r.push(data).is_err() {
                    reader = None;
                }
            }
        }
    }
    Ok((reader, crate::keys::hex(hash.finish().as_ref()), n))
}

/// At most 100 log lines a second for refusals of unauthenticated
/// requests (the metrics still count every one).
fn log_allowed(shared: &Shared) -> bool {
    let now = crate::unix_now() as u64;
    let mut b = shared.log_budget.lock().unwrap_or_else(|p| p.into_inner());
    if b.0 != now {
        *b = (now, 0);
    }
    b.1 += 1;
    b.1 <= 100
}

/// An answer to an authenticated request.
struct Answer<'a> {
    status: u16,
    body: Bytes,
    /// Sent after `body` (a task's shared vectors).
    tail: Bytes,
    round: u64,
    task: &'a str,
    /// The body's SHA-256 when already known (a task's).
    digest: Option<String>,
    ctype: &'static str,
}

/// The one way an accepted request is answered: signed by the server over
/// the node, path, status, round, task, body digest and request nonce,
/// counted and logged; the node counts as heard from.
fn signed_answer(shared: &Shared, f: &crate::sign::RequestFields, route: &str, peer: SocketAddr, a: Answer<'_>) -> Reply {
    let coord = &shared.coord;
    coord.touch(&f.node);
    let digest = a.digest.unwrap_or_else(|| crate::keys::sha256_hex_parts(&[&a.body, &a.tail]));
    let sig = coord.sign_response_digest(f, &f.path, a.status, a.round, a.task, digest);
    let n = a.body.len() + a.tail.len();
    let mut reply = two_part(a.status, a.body, a.tail, a.ctype);
    insert(&mut reply, H_SERVER_SIGNATURE, &sig);
    insert(&mut reply, H_ROUND, &a.round.to_string());
    insert(&mut reply, H_TASK, a.task);
    insert(&mut reply, H_FEDERATION, &coord.keys.federation);
    coord.lock().metrics.bytes_out += n as u64;
    log(shared, route, &f.node, peer, a.status, None, n);
    reply
}

fn insert(reply: &mut Reply, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        reply.headers_mut().insert(name, v);
    }
}

fn query_wait(path: &str) -> u64 {
    let Some(q) = path.split_once('?').map(|(_, q)| q) else { return 0 };
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "wait")
        .and_then(|(_, v)| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(|v| (v * 1000.0).min(3.6e6) as u64)
        .unwrap_or(0)
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// One JSON line per request on a signed endpoint, accepted or refused.
fn log(shared: &Shared, route: &str, node: &str, peer: SocketAddr, status: u16, reason: Option<&str>, bytes: usize) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let line = format!(
        "{{\"time\":{now:.3},\"event\":\"{}\",\"endpoint\":\"{route}\",\"node\":{},\"peer\":\"{peer}\",\"status\":{status},\"reason\":{},\"bytes_out\":{bytes}}}",
        if reason.is_some() { "refused" } else { "accepted" },
        json_string(node),
        reason.map(json_string).unwrap_or_else(|| "null".into()),
    );
    if let Some(f) = &shared.log_file {
        if let Ok(mut f) = f.lock() {
            let _ = writeln!(f, "{line}");
        }
    }
    let mut log = shared.log.lock().unwrap_or_else(|p| p.into_inner());
    if log.len() >= LOG_KEPT {
        log.pop_front();
    }
    log.push_back(line);
}
