//! What is signed, byte for byte (documented in inst/protocol.md).
//!
//! A node signs every request over its method, path (with the query), its
//! node id, a Unix timestamp, a nonce, the SHA-256 of the body, and the
//! round and task it answers. The server signs every task and every answer
//! to a signed request over the node, the path, the status, the round and
//! task, the body's SHA-256 and the request's nonce, so that a node can
//! neither be fed a forged model nor an old answer replayed. The digest is
//! signed, not only the transport: integrity holds behind an ingress that
//! terminates TLS.

pub const H_NODE: &str = "x-fedagg-node";
pub const H_TIMESTAMP: &str = "x-fedagg-timestamp";
pub const H_NONCE: &str = "x-fedagg-nonce";
pub const H_ROUND: &str = "x-fedagg-round";
pub const H_TASK: &str = "x-fedagg-task";
pub const H_DIGEST: &str = "x-fedagg-content-sha256";
pub const H_SIGNATURE: &str = "x-fedagg-signature";
pub const H_SERVER_SIGNATURE: &str = "x-fedagg-server-signature";
pub const H_FEDERATION: &str = "x-fedagg-federation";

/// The signed fields of a node's request.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestFields {
    pub method: String,
    pub path: String,
    pub node: String,
    pub timestamp: i64,
    pub nonce: String,
    pub digest: String,
    pub round: u64,
    pub task: String,
}

impl RequestFields {
    pub fn canonical(&self) -> String {
        format!(
            "fedagg-request-v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.method, self.path, self.node, self.timestamp, self.nonce, self.digest, self.round, self.task
        )
    }
}

/// The signed fields of the server's answer to a node's request.
#[derive(Clone, Debug, PartialEq)]
pub struct ResponseFields {
    pub node: String,
    pub path: String,
    pub status: u16,
    pub round: u64,
    pub task: String,
    pub digest: String,
    pub request_nonce: String,
}

impl ResponseFields {
    pub fn canonical(&self) -> String {
        format!(
            "fedagg-response-v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.node, self.path, self.status, self.round, self.task, self.digest, self.request_nonce
        )
    }
}

/// A node id, nonce or task id is safe to put in a header and a log line.
pub fn is_token(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_in_the_signed_text() {
        let base = RequestFields {
            method: "POST".into(),
            path: "/v1/update".into(),
            node: "site-a".into(),
            timestamp: 1_700_000_000,
            nonce: "00ff".into(),
            digest: "ab".into(),
            round: 3,
            task: "t1".into(),
        };
        let text = base.canonical();
        let variants = [
            RequestFields { method: "GET".into(), ..base.clone() },
            RequestFields { path: "/v1/task".into(), ..base.clone() },
            RequestFields { node: "site-b".into(), ..base.clone() },
            RequestFields { timestamp: 1_700_000_001, ..base.clone() },
            RequestFields { nonce: "00fe".into(), ..base.clone() },
            RequestFields { digest: "ac".into(), ..base.clone() },
            RequestFields { round: 4, ..base.clone() },
            RequestFields { task: "t2".into(), ..base.clone() },
        ];
        for v in variants {
            assert_ne!(v.canonical(), text);
        }
        assert!(is_token("site-a_1.x", 64));
        assert!(!is_token("site a", 64));
        assert!(!is_token("a\nb", 64));
        assert!(!is_token("", 64));
    }
}
