//! Ed25519 identities: every node and the server hold a key pair. Private
//! keys are PKCS#8 in PEM ("PRIVATE KEY", as `openssl genpkey -algorithm
//! ed25519` writes them); public keys travel as `ed25519:<base64 of the 32
//! bytes>`, one line, easy to paste into an allow-list.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::NetError;

pub const PUBLIC_PREFIX: &str = "ed25519:";

/// A private key, ready to sign.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    /// The PKCS#8 document, so that a copy can be made (ring's key pairs
    /// are not Clone).
    der: Vec<u8>,
}

impl Clone for SigningKey {
    fn clone(&self) -> Self {
        SigningKey::from_pkcs8(&self.der).expect("a key that was read once reads again")
    }
}

/// A public key, ready to verify.
#[derive(Clone)]
pub struct VerifyingKey {
    bytes: [u8; 32],
}

/// A new key pair: (private key PEM, public key text).
pub fn generate() -> Result<(String, String), NetError> {
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| NetError::Crypto("cannot draw a key".into()))?;
    let key = SigningKey::from_pkcs8(pkcs8.as_ref())?;
    Ok((pem_encode("PRIVATE KEY", pkcs8.as_ref()), key.public_text()))
}

pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or(""));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER inside the first PEM block with this label.
pub fn pem_decode(label: &str, pem: &str) -> Result<Vec<u8>, NetError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin).ok_or_else(|| NetError::Key(format!("no {label} block")))? + begin.len();
    let stop = pem[start..].find(&end).ok_or_else(|| NetError::Key(format!("unterminated {label} block")))? + start;
    let text: String = pem[start..stop].chars().filter(|c| !c.is_whitespace()).collect();
    B64.decode(text.as_bytes()).map_err(|_| NetError::Key(format!("the {label} block is not base64")))
}

impl SigningKey {
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, NetError> {
        // maybe_unchecked: also PKCS#8 v1 (no public key inside), as
        // OpenSSL writes it.
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(|pair| SigningKey { pair, der: der.to_vec() })
            .map_err(|_| NetError::Key("not an Ed25519 private key (PKCS#8)".into()))
    }

    pub fn from_pem(pem: &str) -> Result<SigningKey, NetError> {
        SigningKey::from_pkcs8(&pem_decode("PRIVATE KEY", pem)?)
    }

    pub fn sign(&self, message: &[u8]) -> String {
        B64.encode(self.pair.sign(message).as_ref())
    }

    pub fn public(&self) -> VerifyingKey {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey { bytes }
    }

    pub fn public_text(&self) -> String {
        self.public().to_text()
    }
}

impl VerifyingKey {
    pub fn from_text(text: &str) -> Result<VerifyingKey, NetError> {
        let t = text.trim();
        let b64 = t
            .strip_prefix(PUBLIC_PREFIX)
            .ok_or_else(|| NetError::Key(format!("a public key starts with `{PUBLIC_PREFIX}`")))?;
        let raw = B64.decode(b64.as_bytes()).map_err(|_| NetError::Key("the public key is not base64".into()))?;
        if raw.len() != 32 {
            return Err(NetError::Key(format!("an Ed25519 public key has 32 bytes, not {}", raw.len())));
        }
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&raw);
        Ok(VerifyingKey { bytes })
    }

    pub fn to_text(&self) -> String {
        format!("{PUBLIC_PREFIX}{}", B64.encode(self.bytes))
    }

    /// Whether `signature` (base64) signs `message` with this key.
    pub fn verify(&self, message: &[u8], signature: &str) -> bool {
        let Ok(sig) = B64.decode(signature.trim().as_bytes()) else { return false };
        UnparsedPublicKey::new(&ED25519, &self.bytes).verify(message, &sig).is_ok()
    }
}

/// `n` random bytes as lower-case hex (nonces, task ids).
pub fn random_hex(n: usize) -> Result<String, NetError> {
    let mut buf = vec![0u8; n];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut buf)
        .map_err(|_| NetError::Crypto("no randomness".into()))?;
    Ok(hex(&buf))
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// SHA-256 of the concatenation of `parts`, without concatenating them.
pub fn sha256_hex_parts(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    hex(ctx.finish().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sign() {
        let (pem, public) = generate().unwrap();
        let key = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(key.public_text(), public);
        let v = VerifyingKey::from_text(&public).unwrap();
        let sig = key.sign(b"hello");
        assert!(v.verify(b"hello", &sig));
        assert!(!v.verify(b"hellp", &sig));
        assert!(!v.verify(b"hello", "not base64!"));
        let (_, other) = generate().unwrap();
        assert!(!VerifyingKey::from_text(&other).unwrap().verify(b"hello", &sig));
        assert!(VerifyingKey::from_text("ed25519:AAAA").is_err());
        assert!(VerifyingKey::from_text("rsa:AAAA").is_err());
        assert!(SigningKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err());
    }

    #[test]
    fn sha256_matches_the_fips_vector() {
        // FIPS 180-2, appendix B.1: SHA-256("abc").
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}

#[cfg(test)]
mod rfc8032 {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn signs_as_rfc_8032_test_1() {
        // RFC 8032, section 7.1, TEST 1 (empty message), with the secret
        // key wrapped as OpenSSL writes it (PKCS#8 v1, RFC 8410).
        let seed = unhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
        let mut der = unhex("302e020100300506032b657004220420");
        der.extend_from_slice(&seed);
        let key = SigningKey::from_pem(&pem_encode("PRIVATE KEY", &der)).unwrap();
        assert_eq!(
            key.public().bytes.to_vec(),
            unhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        );
        let sig = B64.decode(key.sign(b"")).unwrap();
        assert_eq!(
            sig,
            unhex(concat!(
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555",
                "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
            ))
        );
    }
}
