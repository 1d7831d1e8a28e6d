//! The coordinator on loopback, driven by the node client and by raw HTTP
//! written here by hand (not the client), for every refusal.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use fedagg_core::protocol::{self, EncodingSpec, FitIns, FitRes, LocalSpec, ModelSpec, NodeInfo};
use fedagg_net::client::Client;
use fedagg_net::coord::{Coordinator, Keys, Phase, Received, Settings};
use fedagg_net::keys::{generate, sha256_hex, SigningKey, VerifyingKey};
use fedagg_net::server::{Options, Server};
use fedagg_net::sign::RequestFields;

struct Fed {
    server: Server,
    node_keys: HashMap<String, String>,
    server_public: String,
}

fn start(nodes: &[&str], settings: Settings) -> Fed {
    let (server_pem, server_public) = generate().unwrap();
    let mut node_keys = HashMap::new();
    let mut allowed = HashMap::new();
    for n in nodes {
        let (pem, public) = generate().unwrap();
        allowed.insert(n.to_string(), VerifyingKey::from_text(&public).unwrap());
        node_keys.insert(n.to_string(), pem);
    }
    // One viewer (a dashboard), "dash", in every federation.
    let (pem, public) = generate().unwrap();
    let viewers = HashMap::from([("dash".to_string(), VerifyingKey::from_text(&public).unwrap())]);
    node_keys.insert("dash".to_string(), pem);
    let keys = Keys { server: SigningKey::from_pem(&server_pem).unwrap(), nodes: allowed, viewers, federation: "test".into() };
    let server = Server::start(
        Coordinator::new(keys, settings),
        Options { address: "127.0.0.1:0".parse().unwrap(), tls: None, log_file: None, threads: 2 },
    )
    .unwrap();
    server.set_phase(Phase::Running);
    Fed { server, node_keys, server_public }
}

fn client(fed: &Fed, node: &str) -> Client {
    Client::new(
        &format!("http://{}", fed.server.addr),
        node,
        SigningKey::from_pem(&fed.node_keys[node]).unwrap(),
        VerifyingKey::from_text(&fed.server_public).unwrap(),
        None,
        false,
    )
    .unwrap()
}

fn info(node: &str) -> Vec<u8> {
    protocol::encode(&NodeInfo {
        node: node.into(),
        n_samples: 10.0,
        has_validation: false,
        label_levels: vec![],
        data_version: 0,
    })
    .unwrap()
}

fn fit_res(node: &str, round: u32, dim: usize, value: f64) -> Vec<u8> {
    protocol::encode(&FitRes {
        round,
        node: node.into(),
        n_samples: 10.0,
        train_loss: 0.5,
        steps: 1.0,
        effective_steps: 1.0,
        weight: 10.0,
        val_loss: None,
        val_metric: None,
        update: vec![value; dim],
        control: None,
        residual: None,
    })
    .unwrap()
}

fn fit_ins(node: &str, round: u32, dim: usize) -> Vec<u8> {
    protocol::encode(&FitIns {
        round,
        committed_round: 0,
        node_round: 0,
        node: node.into(),
        stream: 1,
        epochs: 1,
        max_steps: None,
        validation: false,
        model: ModelSpec { sizes: vec![dim - 1, 1], head: 0, bits: 64, custom: None, ..Default::default() },
        local: LocalSpec {
            work: "fedavg".into(),
            algorithm: "fedavg".into(),
            mu: 0.0,
            optimizer: "sgd".into(),
            momentum: 0.0,
            beta1: 0.0,
            beta2: 0.0,
            eps: 0.0,
            alpha: 0.0,
            batch_size: 10,
            lr: 0.1,
            weight_decay: 0.0,
            shuffle: true,
            seed: 1,
            weights: "samples".into(),
        },
        encoding: EncodingSpec::default(),
        params: vec![0.0; dim],
        server_control: None,
    })
    .unwrap()
}

const T: Duration = Duration::from_secs(10);

/// A request written by hand: headers signed with `key` unless overridden.
#[allow(clippy::too_many_arguments)]
fn raw(addr: SocketAddr, method: &str, path: &str, node: &str, key: &SigningKey, body: &[u8], round: u64, task: &str, tweak: impl Fn(&mut Vec<(String, String)>, &mut RequestFields)) -> (u16, String) {
    let mut fields = RequestFields {
        method: method.into(),
        path: path.into(),
        node: node.into(),
        timestamp: fedagg_net::unix_now(),
        nonce: fedagg_net::keys::random_hex(16).unwrap(),
        digest: sha256_hex(body),
        round,
        task: task.into(),
    };
    let mut headers = vec![("content-length".to_string(), body.len().to_string())];
    tweak(&mut headers, &mut fields);
    let sig = key.sign(fields.canonical().as_bytes());
    let mut all = vec![
        ("x-fedagg-node".to_string(), fields.node.clone()),
        ("x-fedagg-timestamp".to_string(), fields.timestamp.to_string()),
        ("x-fedagg-nonce".to_string(), fields.nonce.clone()),
        ("x-fedagg-content-sha256".to_string(), fields.digest.clone()),
        ("x-fedagg-round".to_string(), fields.round.to_string()),
        ("x-fedagg-task".to_string(), fields.task.clone()),
        ("x-fedagg-signature".to_string(), sig),
    ];
    // A tweak may replace any header (same name) or add one.
    for (k, v) in headers {
        all.retain(|(a, _)| *a != k);
        all.push((k, v));
    }
    send_raw(addr, method, path, &all, body)
}

fn send_raw(addr: SocketAddr, method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[test]
fn a_round_through_the_wire_and_every_refusal() {
    let fed = start(&["a", "b"], Settings { rate_per_s: 1000.0, burst: 1000.0, ..Settings::default() });
    let addr = fed.server.addr;
    let mut a = client(&fed, "a");
    // Tasks before joining are refused.
    let r = a.request("GET", "/v1/task", 0, "", vec![], T).unwrap();
    assert_eq!(r.status, 409);
    assert_eq!(a.request("POST", "/v1/join", 0, "", info("a"), T).unwrap().status, 200);
    // No task yet: a short long-poll answers 204.
    assert_eq!(a.request("GET", "/v1/task?wait=0.2", 0, "", vec![], T).unwrap().status, 204);
    let ins = fit_ins("a", 3, 4);
    // Posted as its header and the round's shared vectors, received whole
    // (the node checks the signed digest of the whole).
    let cut = 12 + u32::from_le_bytes(ins[8..12].try_into().unwrap()) as usize;
    let (head, tail) = (Bytes::copy_from_slice(&ins[..cut]), Bytes::copy_from_slice(&ins[cut..]));
    assert!(fed.server.post_tasks(3, 4, vec![("a".into(), head.clone())], tail.slice(8..)).is_err(), "a payload one value short");
    let ids = fed.server.post_tasks(3, 4, vec![("a".into(), head)], tail).unwrap();
    let task = a.request("GET", "/v1/task?wait=1", 0, "", vec![], T).unwrap();
    assert_eq!((task.status, task.round, task.task.clone(), task.body.clone()), (200, 3, ids[0].clone(), ins));
    let key_a = SigningKey::from_pem(&fed.node_keys["a"]).unwrap();
    let good = fit_res("a", 3, 4, 0.25);
    let up = |body: &[u8], round: u64, task: &str| raw(addr, "POST", "/v1/update", "a", &key_a, body, round, task, |_, _| {});

    // Refused before anything is kept.
    assert_eq!(up(&fit_res("a", 3, 5, 0.25), 3, &ids[0]).0, 422, "wrong dimension");
    let mut nan = good.clone();
    let n = nan.len();
    nan[n - 8..].copy_from_slice(&f64::NAN.to_le_bytes());
    assert_eq!(up(&nan, 3, &ids[0]).0, 422, "non-finite");
    assert_eq!(up(b"garbage", 3, &ids[0]).0, 422, "malformed");
    assert_eq!(up(&good, 4, &ids[0]).0, 409, "another round");
    // One upload in flight per node; later ones wait (429).
    assert_eq!(up(&good, 3, "0123456789ab").0, 403, "a task not assigned");
    assert_eq!(up(&fit_res("b", 3, 4, 0.25), 3, &ids[0]).0, 403, "another node's update");
    let tw = |f: fn(&mut Vec<(String, String)>, &mut RequestFields)| raw(addr, "POST", "/v1/update", "a", &key_a, &good, 3, &ids[0], f);
    assert_eq!(tw(|_, f| f.timestamp -= 3600).0, 401, "stale timestamp");
    assert_eq!(tw(|_, f| f.node = "mallory".into()).0, 401, "unknown node");
    assert_eq!(tw(|_, f| f.digest = sha256_hex(b"other")).0, 400, "digest mismatch");
    assert_eq!(tw(|h, _| h.push(("x-fedagg-signature".into(), "AAAA".into()))).0, 401, "bad signature");
    assert_eq!(tw(|h, _| h.push(("x-fedagg-nonce".into(), "short".into()))).0, 400, "malformed nonce");
    assert_eq!(tw(|h, _| h.push(("content-length".into(), "1000000000".into()))).0, 413, "1 GB refused unread");
    assert_eq!(tw(|h, _| h.retain(|(k, _)| k != "content-length")).0, 411, "length required");
    let (_, mut fields) = (0, RequestFields {
        method: "POST".into(), path: "/v1/update".into(), node: "a".into(), timestamp: fedagg_net::unix_now(),
        nonce: "00112233445566778899aabbccddeeff".into(), digest: sha256_hex(&good), round: 3, task: ids[0].clone(),
    });
    let replay = |fields: &RequestFields| {
        let sig = key_a.sign(fields.canonical().as_bytes());
        let h = vec![
            ("x-fedagg-node".into(), "a".into()), ("x-fedagg-timestamp".into(), fields.timestamp.to_string()),
            ("x-fedagg-nonce".into(), fields.nonce.clone()), ("x-fedagg-content-sha256".into(), fields.digest.clone()),
            ("x-fedagg-round".into(), "3".into()), ("x-fedagg-task".into(), fields.task.clone()),
            ("x-fedagg-signature".into(), sig), ("content-length".into(), good.len().to_string()),
        ];
        send_raw(addr, "POST", "/v1/update", &h, &good).0
    };
    assert!(fed.server.wait_uploads(Duration::from_millis(10)).is_empty(), "nothing kept");
    assert_eq!(replay(&fields), 200);
    assert_eq!(replay(&fields), 409, "replayed nonce");
    fields.nonce = "ffeeddccbbaa99887766554433221100".into();
    assert_eq!(replay(&fields), 200, "a resend with a new nonce is answered the same");
    assert_eq!(up(&fit_res("a", 3, 4, 0.5), 3, &ids[0]).0, 409, "different bytes for a kept task");
    let kept = fed.server.wait_uploads(Duration::from_secs(1));
    assert_eq!(kept.len(), 1, "counted once");
    assert_eq!(kept[0].message, Received::Fit(protocol::decode(&good).unwrap()));
    // Other routes and methods.
    assert_eq!(send_raw(addr, "GET", "/healthz", &[], b"").0, 200);
    assert_eq!(send_raw(addr, "GET", "/ready", &[], b"").0, 200);
    assert_eq!(send_raw(addr, "POST", "/healthz", &[], b"").0, 405);
    assert_eq!(send_raw(addr, "GET", "/nope", &[], b"").0, 404);
    let (_, metrics) = send_raw(addr, "GET", "/metrics", &[], b"");
    assert!(metrics.contains("fedagg_updates_received_total 1"), "{metrics}");
    assert!(metrics.contains("fedagg_rejected_total{reason=\"too_large\"} 1"));
    assert!(metrics.contains("fedagg_rejected_total{reason=\"replayed_nonce\"} 1"));
    assert!(fed.server.log_lines(1000).iter().any(|l| l.contains("\"reason\":\"digest_mismatch\"")));
    // The end of the federation reaches a polling node.
    fed.server.set_phase(Phase::Done);
    assert_eq!(a.request("GET", "/v1/task?wait=1", 0, "", vec![], T).unwrap().status, 410);
}

#[test]
fn a_node_refuses_answers_not_signed_by_its_server() {
    let fed = start(&["a"], Settings::default());
    let (_, impostor) = generate().unwrap();
    let mut fooled = Client::new(
        &format!("http://{}", fed.server.addr),
        "a",
        SigningKey::from_pem(&fed.node_keys["a"]).unwrap(),
        VerifyingKey::from_text(&impostor).unwrap(),
        None,
        false,
    )
    .unwrap();
    let err = fooled.request("POST", "/v1/join", 0, "", info("a"), T).unwrap_err();
    assert_eq!(err.kind(), "forged");
}

#[test]
fn rate_limits_slow_senders_and_plain_http_elsewhere() {
    let fed = start(&["a"], Settings { rate_per_s: 0.001, burst: 3.0, header_timeout_ms: 300, body_timeout_ms: 300, ..Settings::default() });
    let mut a = client(&fed, "a");
    let statuses: Vec<u16> = (0..5).map(|_| a.request("POST", "/v1/heartbeat", 0, "", vec![], T).map(|r| r.status).unwrap_or(0)).collect();
    assert_eq!(&statuses[..3], &[204, 204, 204]);
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");
    // A sender that stops mid-headers is cut off.
    let mut s = TcpStream::connect(fed.server.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(started.elapsed() < Duration::from_secs(5), "closed after the header time-out");
    let e = Client::new("http://10.1.2.3:80", "a", SigningKey::from_pem(&fed.node_keys["a"]).unwrap(),
                        VerifyingKey::from_text(&fed.server_public).unwrap(), None, false);
    assert!(e.is_err());
}

#[test]
fn tls_with_a_selfsigned_ca() {
    let (ca, cert, key) = fedagg_net::tls::selfsigned(&["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (server_pem, server_public) = generate().unwrap();
    let (node_pem, node_public) = generate().unwrap();
    let mut allowed = HashMap::new();
    allowed.insert("a".to_string(), VerifyingKey::from_text(&node_public).unwrap());
    let keys = Keys { server: SigningKey::from_pem(&server_pem).unwrap(), nodes: allowed, viewers: HashMap::new(), federation: "tls".into() };
    let server = Server::start(
        Coordinator::new(keys, Settings::default()),
        Options {
            address: "127.0.0.1:0".parse().unwrap(),
            tls: Some(fedagg_net::tls::server_config(&cert, &key).unwrap()),
            log_file: None,
            threads: 1,
        },
    )
    .unwrap();
    server.set_phase(Phase::Running);
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let mut c = Client::new(&url, "a", SigningKey::from_pem(&node_pem).unwrap(),
                            VerifyingKey::from_text(&server_public).unwrap(), Some(&ca), false).unwrap();
    assert_eq!(c.request("POST", "/v1/join", 0, "", info("a"), T).unwrap().status, 200);
    // Another CA's certificate is not trusted.
    let (other_ca, _, _) = fedagg_net::tls::selfsigned(&["127.0.0.1".into()]).unwrap();
    let mut d = Client::new(&url, "a", SigningKey::from_pem(&node_pem).unwrap(),
                            VerifyingKey::from_text(&server_public).unwrap(), Some(&other_ca), false).unwrap();
    assert_eq!(d.request("POST", "/v1/heartbeat", 0, "", vec![], T).unwrap_err().kind(), "network");
}

#[test]
fn review_findings_stay_fixed() {
    let fed = start(&["a"], Settings { header_timeout_ms: 500, rate_per_s: 1000.0, burst: 1000.0, ..Settings::default() });
    let addr = fed.server.addr;
    let key = SigningKey::from_pem(&fed.node_keys["a"]).unwrap();
    // A timestamp that would overflow a subtraction is stale, not fresh.
    let (st, _) = raw(addr, "POST", "/v1/heartbeat", "a", &key, b"", 0, "", |_, f| f.timestamp = i64::MIN + fedagg_net::unix_now());
    assert_eq!(st, 401);
    // Join data out of range are refused.
    let bad = protocol::encode(&NodeInfo { node: "a".into(), n_samples: -1e300, has_validation: false, label_levels: vec![], data_version: 0 }).unwrap();
    assert_eq!(raw(addr, "POST", "/v1/join", "a", &key, &bad, 0, "", |_, _| {}).0, 422);
    assert_eq!(raw(addr, "POST", "/v1/join", "a", &key, &info("a"), 0, "", |_, _| {}).0, 200);
    let ids = fed.server.post_tasks(1, 4, vec![("a".into(), Bytes::from(fit_ins("a", 1, 4)))], Bytes::new()).unwrap();
    let good = fit_res("a", 1, 4, 0.5);
    assert_eq!(raw(addr, "POST", "/v1/update", "a", &key, &good, 1, &ids[0], |_, _| {}).0, 200);
    // A resend of kept bytes is answered from its signed digest, its body unread.
    let (st, _) = raw(addr, "POST", "/v1/update", "a", &key, b"", 1, &ids[0], |h, f| {
        f.digest = sha256_hex(&good);
        h.push(("content-length".into(), "1000000000".into()));
    });
    assert_eq!(st, 200);
    // After the round's deadline its tasks are withdrawn: late is refused.
    fed.server.shared.coord.close_tasks();
    assert_eq!(raw(addr, "POST", "/v1/update", "a", &key, &good, 1, &ids[0], |_, _| {}).0, 403);
    assert_eq!(fed.server.wait_uploads(Duration::from_millis(10)).len(), 1);
}

#[test]
fn a_client_that_stops_reading_frees_its_connection() {
    // One connection in all: a stalled one would lock everyone out.
    let fed = start(&["a"], Settings { header_timeout_ms: 500, max_connections: 1, ..Settings::default() });
    let addr = fed.server.addr;
    // A client that pipelines requests and never reads the answers loses
    // its connection once the server's writes stall.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
    let one = b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n";
    let started = std::time::Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(20) {
        if s.write_all(one).is_err() {
            closed = true;
            break;
        }
    }
    // Writes fail either because the server closed the connection or
    // because our send buffer is full; either way the server must still
    // answer others.
    let _ = closed;
    std::thread::sleep(Duration::from_millis(1500));
    let (st, _) = send_raw(addr, "GET", "/healthz", &[], b"");
    assert_eq!(st, 200);
}

#[test]
fn heartbeats_while_busy_and_a_closed_idle_connection_is_reopened() {
    let fed = start(&["a"], Settings { header_timeout_ms: 200, ..Settings::default() });
    let mut a = client(&fed, "a");
    assert_eq!(a.request("POST", "/v1/join", 0, "", info("a"), T).unwrap().status, 200);
    {
        let _beats = a.heartbeats(Duration::from_millis(100)).unwrap();
        std::thread::sleep(Duration::from_millis(450));
    }
    std::thread::sleep(Duration::from_millis(300));
    let text = fed.server.shared.coord.metrics_text();
    let beats: u64 = text
        .lines()
        .find(|l| l.starts_with("fedagg_requests_total{endpoint=\"heartbeat\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!((3..=5).contains(&beats), "{beats} heartbeats in 450 ms at 100 ms, none after they stopped");
    // The server closed the idle kept-alive connection (header time-out):
    // the next request still gets through.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.request("POST", "/v1/heartbeat", 0, "", vec![], T).unwrap().status, 204);
}

/// A man in the middle that flips the last byte of every answer.
fn tampering_proxy(server: SocketAddr) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        // Bounded: a few connections, then the proxy stops.
        for conn in listener.incoming().take(4) {
            let Ok(mut client) = conn else { return };
            let mut upstream = TcpStream::connect(server).unwrap();
            client.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            upstream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut request = Vec::new();
            while let Ok(n) = client.read(&mut buf) {
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            upstream.write_all(&request).unwrap();
            let mut answer = Vec::new();
            while let Ok(n) = upstream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
            }
            if let Some(last) = answer.last_mut() {
                *last ^= 1;
            }
            let _ = client.write_all(&answer);
        }
    });
    addr
}

#[test]
fn a_node_refuses_a_task_tampered_with_on_the_way() {
    let fed = start(&["a"], Settings::default());
    let mut a = client(&fed, "a");
    assert_eq!(a.request("POST", "/v1/join", 0, "", info("a"), T).unwrap().status, 200);
    fed.server.post_tasks(1, 4, vec![("a".into(), Bytes::from(fit_ins("a", 1, 4)))], Bytes::new()).unwrap();
    let proxy = tampering_proxy(fed.server.addr);
    let mut fooled = Client::new(
        &format!("http://{proxy}"),
        "a",
        SigningKey::from_pem(&fed.node_keys["a"]).unwrap(),
        VerifyingKey::from_text(&fed.server_public).unwrap(),
        None,
        false,
    )
    .unwrap();
    let err = fooled.request("GET", "/v1/task", 0, "", vec![], T).unwrap_err();
    assert_eq!(err.kind(), "forged", "{err}");
    // The untampered task reaches the node as sent.
    assert_eq!(a.request("GET", "/v1/task", 0, "", vec![], T).unwrap().status, 200);
}

#[test]
fn a_taken_port_is_its_own_error_kind() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (server_pem, _) = generate().unwrap();
    let keys = Keys { server: SigningKey::from_pem(&server_pem).unwrap(), nodes: HashMap::new(), viewers: HashMap::new(), federation: "port".into() };
    let err = Server::start(
        Coordinator::new(keys, Settings::default()),
        Options { address: holder.local_addr().unwrap(), tls: None, log_file: None, threads: 1 },
    )
    .err()
    .expect("the port is taken");
    assert_eq!(err.kind(), "port_in_use");
    assert!(err.to_string().contains(&holder.local_addr().unwrap().to_string()));
}

#[test]
fn viewers_read_the_status_and_nothing_else() {
    let fed = start(&["n1"], Settings::default());
    let t = Duration::from_secs(5);
    let mut dash = client(&fed, "dash");
    // Before anything is published: the coordinator's part, and null.
    let r = dash.request("GET", "/v1/status", 0, "", Vec::new(), t).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.verified, "the status answer is signed by the server");
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["published"], serde_json::Value::Null);
    assert_eq!(v["server"]["phase"], "running");
    fed.server.shared.coord.set_status(br#"{"round":[3]}"#.to_vec());
    let r = dash.request("GET", "/v1/status", 0, "", Vec::new(), t).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["published"]["round"][0], 3);
    // A viewer's key is not a node's: no join, no task.
    let r = dash.request("POST", "/v1/join", 0, "", info("dash"), t).unwrap();
    assert_eq!((r.status, r.body.starts_with(b"{\"error\":\"unknown_node\"")), (401, true));
    let r = dash.request("GET", "/v1/task?wait=0", 0, "", Vec::new(), t).unwrap();
    assert_eq!(r.status, 401);
    // A node's key does not read the status.
    let mut n1 = client(&fed, "n1");
    let r = n1.request("GET", "/v1/status", 0, "", Vec::new(), t).unwrap();
    assert_eq!(r.status, 401);
    // The refusals are counted by reason, and the viewer sees them.
    let r = dash.request("GET", "/v1/status", 0, "", Vec::new(), t).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["server"]["rejected"]["unknown_node"], 3);
    // The status is read with GET only.
    let r = dash.request("POST", "/v1/status", 0, "", Vec::new(), t).unwrap();
    assert_eq!(r.status, 405);
}
