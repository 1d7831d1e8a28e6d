//! The networked federation from R: keys and certificates, the server's
//! background HTTP(S) coordinator, and a node's signed requests. Every
//! failure comes back as an R error tagged `[network]`, `[key]`,
//! `[forged]`, `[timeout]` or `[input]` (read by R's `call_rust()`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use extendr_api::prelude::*;
use extendr_api::{Error, Result};
use fedagg_core::protocol::{self, NodeInfo};
use fedagg_net::client::{Client, Heartbeats};
use fedagg_net::coord::{Coordinator, Keys, Phase, Received, Settings};
use fedagg_net::keys::{SigningKey, VerifyingKey};
use fedagg_net::server::{Options, Server};
use fedagg_net::NetError;

fn net_err(e: NetError) -> Error {
    let tag = match e.kind() {
        "invalid_argument" => "input",
        k => k,
    };
    Error::Other(format!("[{tag}] {e}"))
}

fn input(msg: impl std::fmt::Display) -> Error {
    Error::Other(format!("[input] {msg}"))
}

fn setting(settings: &List, name: &str) -> Result<Option<f64>> {
    match settings.iter().find(|(n, _)| *n == name) {
        None => Ok(None),
        Some((_, v)) if v.is_null() => Ok(None),
        Some((_, v)) => match v.as_real() {
            Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
            _ => Err(input(format!("limit `{name}` must be a positive number"))),
        },
    }
}

fn handle<T: 'static>(x: &Robj, what: &str) -> Result<ExternalPtr<T>> {
    let dead = || input(format!("`{what}` is not a live handle (was it saved and read back?)"));
    let ptr = ExternalPtr::<T>::try_from(x).map_err(|_| dead())?;
    // A handle saved with saveRDS() comes back as a NULL pointer.
    ptr.try_addr().map_err(|_| dead())?;
    Ok(ptr)
}

/// A new Ed25519 key pair: list(private = <PEM>, public = "ed25519:...").
/// @noRd
#[extendr]
fn rs_net_keygen() -> Result<List> {
    let (private, public) = fedagg_net::keys::generate().map_err(net_err)?;
    Ok(list!(private = private, public = public))
}

/// The public key of a private key (PEM).
/// @noRd
#[extendr]
fn rs_net_public_key(pem: &str) -> Result<String> {
    Ok(SigningKey::from_pem(pem).map_err(net_err)?.public_text())
}

/// Checks a public key's text.
/// @noRd
#[extendr]
fn rs_net_check_public(text: &str) -> Result<String> {
    Ok(VerifyingKey::from_text(text).map_err(net_err)?.to_text())
}

/// A teaching CA and a server certificate: list(ca, cert, key) as PEM.
/// @noRd
#[extendr]
fn rs_net_tls_selfsigned(hosts: Strings) -> Result<List> {
    let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let (ca, cert, key) = fedagg_net::tls::selfsigned(&hosts).map_err(net_err)?;
    Ok(list!(ca = ca, cert = cert, key = key))
}

/// Writes a file atomically (temporary file, fsync, rename).
/// @noRd
#[extendr]
fn rs_net_write_atomic(path: &str, bytes: Raw, private: bool) -> Result<()> {
    fedagg_net::files::write_atomic(std::path::Path::new(path), bytes.as_slice(), private).map_err(net_err)
}

/// A NodeInfo message: what a node says of itself when it joins.
/// @noRd
#[extendr]
fn rs_node_info(node: &str, n_samples: f64, has_validation: bool, label_levels: Strings, data_version: f64) -> Result<Raw> {
    let info = NodeInfo {
        node: node.to_string(),
        n_samples,
        has_validation,
        label_levels: label_levels.iter().map(|s| s.to_string()).collect(),
        data_version: data_version as u64,
    };
    let bytes = protocol::encode(&info).map_err(|e| input(e))?;
    Ok(Raw::from_bytes(&bytes))
}

/// Starts the coordinator on background threads; returns its handle and
/// the port it listens on (`port` 0: one the system picks).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_net_serve(
    host: &str,
    port: i32,
    tls_cert: Nullable<String>,
    tls_key: Nullable<String>,
    server_key: &str,
    node_ids: Strings,
    node_keys: Strings,
    viewer_ids: Strings,
    viewer_keys: Strings,
    federation: &str,
    limits: List,
    log_file: Nullable<String>,
    threads: i32,
    insecure: bool,
) -> Result<List> {
    let ip: std::net::IpAddr = host.parse().map_err(|_| input(format!("`host` must be an IP address, not `{host}`")))?;
    if matches!(tls_cert, Nullable::Null) && !ip.is_loopback() && !insecure {
        return Err(input(format!("plain HTTP is served on loopback addresses only, not on {ip}")));
    }
    if !(0..=65535).contains(&port) {
        return Err(input("`port` must be from 0 to 65535"));
    }
    let mut nodes = HashMap::new();
    for (id, key) in node_ids.iter().zip(node_keys.iter()) {
        let (id, key): (&str, &str) = (id.as_ref(), key.as_ref());
        if !fedagg_net::sign::is_token(id, fedagg_net::coord::MAX_ID) {
            return Err(input(format!("node id `{}` must be 1-128 letters, digits or -_.:@", id)));
        }
        let k = VerifyingKey::from_text(key).map_err(|e| input(format!("the key of node `{}`: {e}", id)))?;
        if nodes.insert(id.to_string(), k).is_some() {
            return Err(input(format!("node `{}` is listed twice in the authorized keys", id)));
        }
    }
    let mut settings = Settings::default();
    let ms = |s: f64| (s * 1000.0).min(8.64e7) as u64;
    if let Some(v) = setting(&limits, "clock_window")? {
        settings.window_s = v.min(8.64e4) as i64;
    }
    if let Some(v) = setting(&limits, "rate")? {
        settings.rate_per_s = v;
    }
    if let Some(v) = setting(&limits, "burst")? {
        settings.burst = v.max(1.0);
    }
    if let Some(v) = setting(&limits, "header_timeout")? {
        settings.header_timeout_ms = ms(v);
    }
    if let Some(v) = setting(&limits, "body_timeout")? {
        settings.body_timeout_ms = ms(v);
    }
    if let Some(v) = setting(&limits, "max_poll")? {
        settings.max_poll_ms = ms(v);
    }
    if let Some(v) = setting(&limits, "max_connections")? {
        settings.max_connections = (v.min(1e6) as usize).max(1);
    }
    if let Some(v) = setting(&limits, "max_per_peer")? {
        settings.max_per_peer = (v.min(1e6) as usize).max(1);
    }
    if let Some(v) = setting(&limits, "liveness")? {
        settings.liveness_s = v;
    }
    let tls = match (tls_cert.into_option(), tls_key.into_option()) {
        (Some(c), Some(k)) => Some(fedagg_net::tls::server_config(&c, &k).map_err(net_err)?),
        (None, None) => None,
        _ => return Err(input("`tls` needs both a certificate and its key")),
    };
    let mut viewers = HashMap::new();
    for (id, key) in viewer_ids.iter().zip(viewer_keys.iter()) {
        let (id, key): (&str, &str) = (id.as_ref(), key.as_ref());
        if !fedagg_net::sign::is_token(id, fedagg_net::coord::MAX_ID) {
            return Err(input(format!("viewer id `{}` must be 1-128 letters, digits or -_.:@", id)));
        }
        if nodes.contains_key(id) {
            return Err(input(format!("`{}` is both a node and a viewer: a viewer needs an id of its own", id)));
        }
        let k = VerifyingKey::from_text(key).map_err(|e| input(format!("the key of viewer `{}`: {e}", id)))?;
        if viewers.insert(id.to_string(), k).is_some() {
            return Err(input(format!("viewer `{}` is listed twice", id)));
        }
    }
    let keys = Keys { server: SigningKey::from_pem(server_key).map_err(net_err)?, nodes, viewers, federation: federation.to_string() };
    let server = Server::start(
        Coordinator::new(keys, settings),
        Options {
            address: SocketAddr::new(ip, port as u16),
            tls,
            log_file: log_file.into_option().map(std::path::PathBuf::from),
            threads: threads.max(1) as usize,
        },
    )
    .map_err(net_err)?;
    let port = server.addr.port() as i32;
    Ok(list!(handle = ExternalPtr::new(server), port = port))
}

/// Withdraws the round's tasks: later uploads for them are refused.
/// @noRd
#[extendr]
fn rs_net_close_tasks(server: Robj) -> Result<()> {
    handle::<Server>(&server, "server")?.shared.coord.close_tasks();
    Ok(())
}

/// "starting", "running", "done" or "stopping".
/// @noRd
#[extendr]
fn rs_net_set_phase(server: Robj, phase: &str) -> Result<()> {
    let s = handle::<Server>(&server, "server")?;
    let phase = match phase {
        "starting" => Phase::Starting,
        "running" => Phase::Running,
        "done" => Phase::Done,
        "stopping" => Phase::ShuttingDown,
        other => return Err(input(format!("unknown phase `{other}`"))),
    };
    s.set_phase(phase);
    Ok(())
}

/// This round's tasks (replacing the last round's): one FitIns per node.
/// @noRd
#[extendr]
fn rs_net_post_tasks(server: Robj, round: f64, dim: f64, nodes: Strings, headers: List, payload: Robj) -> Result<Strings> {
    let s = handle::<Server>(&server, "server")?;
    if nodes.len() != headers.len() {
        return Err(input("one task per node"));
    }
    let payload = payload.as_raw_slice().ok_or_else(|| input("the tasks' payload must be a raw vector"))?;
    let mut tasks = Vec::with_capacity(nodes.len());
    for (id, head) in nodes.iter().zip(headers.values()) {
        let bytes = head.as_raw_slice().ok_or_else(|| input("each task must be a raw vector"))?;
        tasks.push((id.to_string(), fedagg_net::Bytes::copy_from_slice(bytes)));
    }
    // One copy of the round's vectors, shared by every task.
    let ids = s.post_tasks(round as u64, dim as usize, tasks, fedagg_net::Bytes::copy_from_slice(payload)).map_err(input)?;
    Ok(ids.iter().map(|s| s.as_str()).collect())
}

/// The uploads kept since the last call, waiting up to `wait` seconds for
/// the first: list(node, round, task, res = list of read FitRes or EvalRes,
/// as `rs_fit_res_read()` and `rs_eval_read()` give them). Each upload's
/// numbers move into R one at a time and are dropped here as they go.
/// @noRd
#[extendr]
fn rs_net_wait_uploads(server: Robj, wait: f64) -> Result<List> {
    let s = handle::<Server>(&server, "server")?;
    let wait = if wait.is_finite() && wait > 0.0 { Duration::from_secs_f64(wait.min(60.0)) } else { Duration::ZERO };
    let ups = s.wait_uploads(wait);
    let nodes: Vec<String> = ups.iter().map(|u| u.node.clone()).collect();
    let rounds: Vec<f64> = ups.iter().map(|u| u.round as f64).collect();
    let tasks: Vec<String> = ups.iter().map(|u| u.task.clone()).collect();
    let mut read = Vec::with_capacity(ups.len());
    for u in ups {
        let mut large = false;
        read.push(match u.message {
            Received::Fit(res) => {
                large = 8 * res.update.len() >= fedagg_net::memory::TRIM_BYTES;
                super::protocol::fit_res_list(res)?
            }
            Received::Eval(res) => super::protocol::eval_res_list(&res)?,
        });
        // Its numbers are R's now, and its buffer is freed: give the pages
        // back, so that an update is held once, not twice.
        if large {
            fedagg_net::memory::give_back();
        }
    }
    Ok(list!(node = nodes, round = rounds, task = tasks, res = List::from_values(read)))
}

/// The allow-listed nodes and what the joined ones said of themselves.
/// @noRd
#[extendr]
fn rs_net_nodes(server: Robj) -> Result<List> {
    let s = handle::<Server>(&server, "server")?;
    let coord = &s.shared.coord;
    let st = coord.lock();
    let now = std::time::Instant::now();
    let mut ids = Vec::new();
    let mut joined = Vec::new();
    let mut n = Vec::new();
    let mut val = Vec::new();
    let mut seen = Vec::new();
    let mut levels = Vec::new();
    let mut version = Vec::new();
    for (id, e) in &st.nodes {
        ids.push(id);
        joined.push(e.info.is_some());
        n.push(e.info.as_ref().map_or(f64::NAN, |i| i.n_samples));
        val.push(e.info.as_ref().map_or(false, |i| i.has_validation));
        seen.push(e.last_seen.map_or(f64::NAN, |t| now.duration_since(t).as_secs_f64()));
        levels.push(Robj::from(e.info.as_ref().map_or(Vec::new(), |i| i.label_levels.clone())));
        version.push(e.info.as_ref().map_or(0.0, |i| i.data_version as f64));
    }
    Ok(list!(node = ids, joined = joined, n_samples = n, has_validation = val, seconds_since_seen = seen,
             label_levels = List::from_values(levels), data_version = version))
}

/// Prometheus text of `GET /metrics`.
/// @noRd
#[extendr]
fn rs_net_metrics(server: Robj) -> Result<String> {
    Ok(handle::<Server>(&server, "server")?.shared.coord.metrics_text())
}

/// R values as JSON: named lists become objects (a data frame: its
/// columns), other lists and vectors arrays; NA and non-finite numbers
/// become null.
fn to_json(x: &Robj) -> serde_json::Value {
    use serde_json::Value;
    let num = |v: f64| serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number);
    match x.rtype() {
        Rtype::Null => Value::Null,
        Rtype::Logicals => Value::Array(
            x.as_logical_slice().unwrap_or(&[]).iter().map(|b| if b.is_na() { Value::Null } else { Value::Bool(b.is_true()) }).collect(),
        ),
        Rtype::Integers => Value::Array(
            x.as_integer_slice().unwrap_or(&[]).iter().map(|&i| if i == i32::MIN { Value::Null } else { Value::from(i) }).collect(),
        ),
        Rtype::Doubles => Value::Array(x.as_real_slice().unwrap_or(&[]).iter().map(|&v| num(v)).collect()),
        Rtype::Strings => Value::Array(
            x.as_str_iter()
                .map(|it| it.map(|s| if s.is_na() { Value::Null } else { Value::String(s.to_string()) }).collect())
                .unwrap_or_default(),
        ),
        Rtype::List => {
            let list = List::try_from(x.clone()).unwrap_or_default();
            let names: Option<Vec<String>> = x.names().map(|n| n.map(|s| s.to_string()).collect());
            match names {
                Some(names) => Value::Object(names.into_iter().zip(list.values()).map(|(n, v)| (n, to_json(&v))).collect()),
                None => Value::Array(list.values().map(|v| to_json(&v)).collect()),
            }
        }
        _ => Value::Null,
    }
}

/// R values as one JSON text (the dashboard's status document).
/// @noRd
#[extendr]
fn rs_to_json(x: Robj) -> Result<String> {
    serde_json::to_string(&to_json(&x)).map_err(|e| input(e.to_string()))
}

/// Publishes the status viewers read at `GET /v1/status`: JSON made by
/// `rs_to_json()` (not parsed again here, once a round).
/// @noRd
#[extendr]
fn rs_net_set_status(server: Robj, json: &str) -> Result<()> {
    handle::<Server>(&server, "server")?.shared.coord.set_status(json.as_bytes().to_vec());
    Ok(())
}

/// The coordinator's counts now, as viewers read them (JSON).
/// @noRd
#[extendr]
fn rs_net_live(server: Robj) -> Result<String> {
    Ok(handle::<Server>(&server, "server")?.shared.coord.live_json())
}

/// A committed round's wall time, for the metrics.
/// @noRd
#[extendr]
fn rs_net_observe_round(server: Robj, seconds: f64) -> Result<()> {
    handle::<Server>(&server, "server")?.shared.coord.lock().metrics.observe_round(seconds.max(0.0));
    Ok(())
}

/// The last `n` JSON log lines.
/// @noRd
#[extendr]
fn rs_net_log(server: Robj, n: f64) -> Result<Strings> {
    let lines = handle::<Server>(&server, "server")?.log_lines(n.max(0.0) as usize);
    Ok(lines.iter().map(|s| s.as_str()).collect())
}

/// Stops the coordinator: refuses new work, lets requests in flight end
/// within `grace` seconds.
/// @noRd
#[extendr]
fn rs_net_stop(server: Robj, grace: f64) -> Result<()> {
    let mut s = handle::<Server>(&server, "server")?;
    let grace = if grace.is_finite() && grace > 0.0 { grace.min(600.0) } else { 0.0 };
    s.stop(Duration::from_secs_f64(grace));
    Ok(())
}

/// Whether the coordinator's threads run.
/// @noRd
#[extendr]
fn rs_net_running(server: Robj) -> Result<bool> {
    Ok(handle::<Server>(&server, "server").map(|s| s.running()).unwrap_or(false))
}

/// A node's connection to its server.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_net_client(
    url: &str,
    node: &str,
    key_pem: &str,
    server_key: &str,
    ca_pem: Nullable<String>,
    insecure: bool,
    max_task: f64,
) -> Result<Robj> {
    let key = SigningKey::from_pem(key_pem).map_err(net_err)?;
    let server_key = VerifyingKey::from_text(server_key).map_err(net_err)?;
    let ca = ca_pem.into_option();
    let mut c = Client::new(url, node, key, server_key, ca.as_deref(), insecure).map_err(net_err)?;
    if max_task.is_finite() && max_task > 0.0 {
        c.max_task = max_task.min(1e15) as usize;
    }
    Ok(ExternalPtr::new(c).into())
}

/// Heartbeats every `every` seconds from a thread while the node trains;
/// stopped by `rs_net_heartbeats_stop()` (or when the handle is collected).
/// @noRd
#[extendr]
fn rs_net_heartbeats(client: Robj, every: f64) -> Result<Robj> {
    let c = handle::<Client>(&client, "client")?;
    if !(every.is_finite() && every > 0.0) {
        return Err(input("`heartbeat` must be a positive number of seconds"));
    }
    let beats = c.heartbeats(Duration::from_secs_f64(every.min(86_400.0))).map_err(net_err)?;
    Ok(ExternalPtr::new(Some(beats)).into())
}

/// Stops heartbeats.
/// @noRd
#[extendr]
fn rs_net_heartbeats_stop(beats: Robj) -> Result<()> {
    let mut b = handle::<Option<Heartbeats>>(&beats, "heartbeats")?;
    b.take();
    Ok(())
}

/// One signed request of a node: list(status, body, round, task).
/// Refusals are answers; no answer, a time-out or a forged answer is an
/// error.
/// @noRd
#[extendr]
fn rs_net_request(client: Robj, method: &str, path: &str, round: f64, task: &str, body: Raw, timeout: f64) -> Result<List> {
    let mut c = handle::<Client>(&client, "client")?;
    let timeout = if timeout.is_finite() && timeout > 0.0 { timeout.min(86_400.0) } else { 30.0 };
    let reply = c
        .request(method, path, round.max(0.0) as u64, task, body.as_slice().to_vec(), Duration::from_secs_f64(timeout))
        .map_err(net_err)?;
    Ok(list!(status = reply.status as i32, body = Raw::from_bytes(&reply.body), round = reply.round as f64,
             task = reply.task, verified = reply.verified))
}

extendr_module! {
    mod net;
    fn rs_net_keygen;
    fn rs_net_public_key;
    fn rs_net_check_public;
    fn rs_net_tls_selfsigned;
    fn rs_net_write_atomic;
    fn rs_node_info;
    fn rs_net_serve;
    fn rs_net_set_phase;
    fn rs_net_close_tasks;
    fn rs_net_post_tasks;
    fn rs_net_wait_uploads;
    fn rs_net_nodes;
    fn rs_net_metrics;
    fn rs_net_observe_round;
    fn rs_to_json;
    fn rs_net_set_status;
    fn rs_net_live;
    fn rs_net_log;
    fn rs_net_stop;
    fn rs_net_running;
    fn rs_net_client;
    fn rs_net_request;
    fn rs_net_heartbeats;
    fn rs_net_heartbeats_stop;
}
