//! The networked federation of fedagg: a coordinator serving tasks to
//! nodes over HTTP/1.1 (TLS 1.3 with rustls), and the nodes' client.
//! Plain Rust, no R types: the R binding is `src/api/net.rs`.
//!
//! * `keys`: Ed25519 key pairs, PEM, public-key text.
//! * `sign`: what a node and the server sign.
//! * `coord`: the coordinator's state (tasks, uploads, nonces, rate
//!   limits, metrics), decided without sockets so it is tested directly.
//! * `server`: hyper on tokio around `coord`, with TLS and time-outs.
//! * `client`: a node's signed requests.
//! * `tls`, `files`: certificates; atomic file writes.
//!
//! The wire protocol is documented in inst/protocol.md.

pub mod client;
pub mod coord;
pub mod files;
pub mod keys;
pub mod memory;
pub mod metrics;
pub mod server;
pub mod sign;
pub mod tls;

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum NetError {
    /// A key or certificate could not be read.
    Key(String),
    /// The system's randomness or a cryptographic primitive failed.
    Crypto(String),
    /// A setting is out of range.
    Invalid(String, String),
    /// Bind, connect, read or write failed.
    Io(String),
    /// The address to listen on is taken by another socket (told apart
    /// from other I/O failures by its error kind, not by the system's
    /// message, which follows the locale).
    PortInUse(String),
    /// The peer answered something the protocol does not allow.
    Protocol(String),
    /// The server's answer is not signed by the server's key.
    Forged(String),
    /// No answer in time.
    Timeout(String),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::Key(m) => write!(f, "{m}"),
            NetError::Crypto(m) => write!(f, "{m}"),
            NetError::Invalid(arg, m) => write!(f, "`{arg}` {m}"),
            NetError::Io(m) | NetError::PortInUse(m) => write!(f, "{m}"),
            NetError::Protocol(m) => write!(f, "{m}"),
            NetError::Forged(m) => write!(f, "{m}"),
            NetError::Timeout(m) => write!(f, "{m}"),
        }
    }
}

impl NetError {
    /// The R error class suffix (`fedagg_error_<kind>`).
    pub fn kind(&self) -> &'static str {
        match self {
            NetError::Key(_) => "key",
            NetError::Crypto(_) => "crypto",
            NetError::Invalid(..) => "invalid_argument",
            NetError::Io(_) => "network",
            NetError::PortInUse(_) => "port_in_use",
            NetError::Protocol(_) => "protocol",
            NetError::Forged(_) => "forged",
            NetError::Timeout(_) => "timeout",
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
pub use bytes::Bytes;
