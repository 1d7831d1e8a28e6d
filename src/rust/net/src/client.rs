//! A node's side of the wire: signed requests over one kept-alive
//! connection (HTTP/1.1, TLS 1.3 unless the server is on loopback), and
//! the server's signatures checked on every answer that matters.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;

use crate::coord::task_text;
use crate::keys::{random_hex, sha256_hex, SigningKey, VerifyingKey};
use crate::server::H_TASK_SIGNATURE;
use crate::sign::*;
use crate::NetError;

/// Where the server is: `http(s)://host[:port]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, NetError> {
        let bad = |m: &str| NetError::Invalid("url".into(), m.to_string());
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("must start with https:// or http://"));
        };
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') || authority.contains('?') || authority.contains('@') {
            return Err(bad("must be a scheme, a host and a port, without a path"));
        }
        let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
            let (h, after) = inner.split_once(']').ok_or_else(|| bad("has an unclosed [ in its host"))?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| bad("has a port that is not a number from 1 to 65535"))?,
            None if https => 443,
            None => 80,
        };
        if port == 0 {
            return Err(bad("has port 0"));
        }
        Ok(Target { https, host, port })
    }

    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<IpAddr>().map_or(false, |ip| ip.is_loopback())
    }
}

/// Running heartbeats; dropping this stops them.
pub struct Heartbeats {
    stop: Arc<AtomicBool>,
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A server's answer, as a node reads it.
#[derive(Debug, Default)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub round: u64,
    pub task: String,
    /// Whether the server's signature over this answer checked out.
    pub verified: bool,
}

pub struct Client {
    rt: tokio::runtime::Runtime,
    target: Target,
    tls: Option<tokio_rustls::TlsConnector>,
    node: String,
    key: SigningKey,
    server_key: VerifyingKey,
    conn: Option<SendRequest<Full<Bytes>>>,
    /// The largest task (FitIns) this node accepts, from its model's size;
    /// other answers are small.
    pub max_task: usize,
}

/// The largest answer to anything but a task request.
pub const MAX_SMALL_REPLY: usize = 1 << 20;

impl Client {
    pub fn new(
        url: &str,
        node: &str,
        key: SigningKey,
        server_key: VerifyingKey,
        ca_pem: Option<&str>,
        insecure: bool,
    ) -> Result<Client, NetError> {
        let target = Target::parse(url)?;
        if !crate::sign::is_token(node, crate::coord::MAX_ID) {
            return Err(NetError::Invalid("node".into(), "must be 1-128 letters, digits or -_.:@".into()));
        }
        let tls = if target.https {
            let ca = ca_pem.ok_or_else(|| NetError::Invalid("ca".into(), "is needed for an https:// server".into()))?;
            Some(tokio_rustls::TlsConnector::from(crate::tls::client_config(ca)?))
        } else {
            if !target.is_loopback() && !insecure {
                return Err(NetError::Invalid(
                    "url".into(),
                    "uses plain http:// to a host that is not loopback; use https:// (or insist with insecure = TRUE)".into(),
                ));
            }
            None
        };
        let rt = Client::runtime()?;
        Ok(Client { rt, target, tls, node: node.to_string(), key, server_key, conn: None, max_task: 1 << 33 })
    }

    async fn connect(target: &Target, tls: &Option<tokio_rustls::TlsConnector>) -> Result<SendRequest<Full<Bytes>>, NetError> {
        let io_err = |e: std::io::Error| NetError::Io(format!("cannot reach {}:{}: {e}", target.host, target.port));
        let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port)).await.map_err(io_err)?;
        let _ = tcp.set_nodelay(true);
        macro_rules! handshake {
            ($io:expr) => {{
                let (sender, conn) = hyper::client::conn::http1::handshake($io)
                    .await
                    .map_err(|e| NetError::Io(format!("HTTP handshake failed: {e}")))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }};
        }
        Ok(match tls {
            Some(conn) => {
                let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                    .map_err(|_| NetError::Invalid("url".into(), format!("has a host rustls cannot check: {}", target.host)))?;
                let stream = conn
                    .connect(name, tcp)
                    .await
                    .map_err(|e| NetError::Io(format!("TLS with {} failed: {e}", target.host)))?;
                handshake!(TokioIo::new(stream))
            }
            None => handshake!(TokioIo::new(tcp)),
        })
    }

    /// One signed request. `round` and `task`: the task the request
    /// answers (0 and "" otherwise). Errors only when no valid answer came
    /// (network, time-out, a forged answer); refusals are replies.
    ///
    /// A kept-alive connection the server closed while the node was busy
    /// (training for longer than the server keeps idle connections) fails
    /// the first request sent on it: that request is signed again, with a
    /// new nonce, and sent once more on a new connection.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        round: u64,
        task: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Reply, NetError> {
        let reused = self.conn.is_some();
        let started = Instant::now();
        // Hashed and moved once: a retry reuses both (an update may be
        // hundreds of megabytes).
        let digest = sha256_hex(&body);
        let body = Bytes::from(body);
        match self.attempt(method, path, round, task, body.clone(), &digest, timeout) {
            Err(NetError::Io(_)) if reused => {
                self.conn = None;
                let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(100));
                self.attempt(method, path, round, task, body, &digest, left)
            }
            other => other,
        }
    }

    fn runtime() -> Result<tokio::runtime::Runtime, NetError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NetError::Io(e.to_string()))
    }

    /// Heartbeats every `every` on a connection of their own, from a
    /// thread, while the node trains: a long local training does not look
    /// like a dead node. They stop when the returned value is dropped.
    pub fn heartbeats(&self, every: Duration) -> Result<Heartbeats, NetError> {
        let mut beat = Client {
            rt: Client::runtime()?,
            target: self.target.clone(),
            tls: self.tls.clone(),
            node: self.node.clone(),
            key: self.key.clone(),
            server_key: self.server_key.clone(),
            conn: None,
            max_task: MAX_SMALL_REPLY,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("fedagg-heartbeat".into())
            .spawn(move || {
                let tick = Duration::from_millis(50);
                'outer: loop {
                    let since = Instant::now();
                    while since.elapsed() < every {
                        if flag.load(Ordering::Relaxed) {
                            break 'outer;
                        }
                        std::thread::sleep(tick);
                    }
                    // A heartbeat that fails is simply not counted.
                    let _ = beat.request("POST", "/v1/heartbeat", 0, "", Vec::new(), every.max(Duration::from_secs(1)));
                }
            })
            .map_err(|e| NetError::Io(format!("cannot start the heartbeat thread: {e}")))?;
        Ok(Heartbeats { stop })
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &mut self,
        method: &str,
        path: &str,
        round: u64,
        task: &str,
        body: Bytes,
        digest: &str,
        timeout: Duration,
    ) -> Result<Reply, NetError> {
        let fields = RequestFields {
            method: method.to_string(),
            path: path.to_string(),
            node: self.node.clone(),
            timestamp: crate::unix_now(),
            nonce: random_hex(16)?,
            digest: digest.to_string(),
            round,
            task: task.to_string(),
        };
        let signature = self.key.sign(fields.canonical().as_bytes());
        let host = if self.target.host.contains(':') { format!("[{}]", self.target.host) } else { self.target.host.clone() };
        let build = |body: Bytes| -> Result<Request<Full<Bytes>>, NetError> {
            let mut b = Request::builder()
                .method(method)
                .uri(path)
                .header("host", format!("{host}:{}", self.target.port))
                .header(H_NODE, &fields.node)
                .header(H_TIMESTAMP, fields.timestamp.to_string())
                .header(H_NONCE, &fields.nonce)
                .header(H_DIGEST, &fields.digest)
                .header(H_ROUND, round.to_string())
                .header(H_SIGNATURE, &signature)
                .header("content-length", body.len().to_string());
            if !task.is_empty() {
                b = b.header(H_TASK, task);
            }
            b.body(Full::new(body)).map_err(|e| NetError::Protocol(e.to_string()))
        };
        let target = self.target.clone();
        let tls = self.tls.clone();
        // An answer is refused by its announced size before it is read.
        let max_reply = if path.starts_with("/v1/task") { self.max_task } else { MAX_SMALL_REPLY };
        let mut conn = self.conn.take();
        let result = self.rt.block_on(async {
            tokio::time::timeout(timeout, async {
                // A kept-alive connection the server closed is opened again.
                let mut sender = match conn.take() {
                    Some(mut s) => match s.ready().await {
                        Ok(()) => s,
                        Err(_) => Client::connect(&target, &tls).await?,
                    },
                    None => Client::connect(&target, &tls).await?,
                };
                let response = sender
                    .send_request(build(body)?)
                    .await
                    .map_err(|e| NetError::Io(format!("the request failed: {e}")))?;
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let announced = headers
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                // Without a length (chunked), `Limited` below still stops at
                // the bound.
                if let Some(n) = announced.filter(|n| *n > max_reply as u64) {
                    return Err(NetError::Protocol(format!(
                        "the server's answer ({status}) announces {n} bytes, more than the {max_reply} allowed"
                    )));
                }
                let bytes = Limited::new(response.into_body(), max_reply)
                    .collect()
                    .await
                    .map_err(|e| NetError::Io(format!("the answer could not be read: {e}")))?
                    .to_bytes();
                Ok::<_, NetError>((sender, status, headers, bytes))
            })
            .await
        });
        let (sender, status, headers, bytes) = match result {
            Err(_) => return Err(NetError::Timeout(format!("no answer from the server within {:.1} s", timeout.as_secs_f64()))),
            Ok(r) => r?,
        };
        self.conn = Some(sender);
        let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).map(str::to_string);
        let round_back = header(H_ROUND).and_then(|r| r.parse::<u64>().ok()).unwrap_or(0);
        let task_back = header(H_TASK).unwrap_or_default();
        let digest = sha256_hex(&bytes);
        let verified = header(H_SERVER_SIGNATURE).map_or(false, |sig| {
            let expected = ResponseFields {
                node: self.node.clone(),
                path: path.to_string(),
                status,
                round: round_back,
                task: task_back.clone(),
                digest: digest.clone(),
                request_nonce: fields.nonce.clone(),
            };
            self.server_key.verify(expected.canonical().as_bytes(), &sig)
        });
        let reply = Reply { status, body: bytes.to_vec(), round: round_back, task: task_back, verified };
        // What a node acts on must come from the server: a task (and the
        // model in it), a kept upload, the end of the federation.
        if matches!(status, 200 | 204 | 410) && !reply.verified {
            return Err(NetError::Forged(format!(
                "the answer ({status}) to {method} {path} is not signed by the server's key; refused"
            )));
        }
        if path.starts_with("/v1/task") && status == 200 {
            let ok = header(H_TASK_SIGNATURE).map_or(false, |sig| {
                let text = task_text(&self.node, reply.round, &reply.task, &digest);
                self.server_key.verify(text.as_bytes(), &sig)
            });
            if !ok {
                return Err(NetError::Forged("the task is not signed by the server's key; refused".into()));
            }
        }
        Ok(reply)
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(Target::parse("http://127.0.0.1:8080").unwrap(), Target { https: false, host: "127.0.0.1".into(), port: 8080 });
        assert_eq!(Target::parse("https://[::1]:9/").unwrap(), Target { https: true, host: "::1".into(), port: 9 });
        assert_eq!(Target::parse("https://fed.example.org").unwrap().port, 443);
        assert!(Target::parse("ftp://x").is_err());
        assert!(Target::parse("http://x:0").is_err());
        assert!(Target::parse("http://x:99999").is_err());
        assert!(Target::parse("http://x/path").is_err());
        assert!(Target::parse("http://[::1").is_err());
        assert!(Target::parse("http://localhost:1").unwrap().is_loopback());
        assert!(!Target::parse("http://10.0.0.1:1").unwrap().is_loopback());
    }
}
