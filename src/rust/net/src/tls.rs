//! TLS 1.3 only, on rustls with the ring provider. Certificates and keys
//! are PEM files; `selfsigned()` makes a CA and a server certificate
//! signed by it, for teaching and tests (a real federation uses its
//! institution's certificates).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::NetError;

// ring rather than aws-lc-rs (which needs cmake and adds ~1 MB); rustls
// marks ring's provider deprecated only for its lack of post-quantum key
// exchange.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| NetError::Key(format!("cannot read the {what}: {e}")))?;
    if certs.is_empty() {
        return Err(NetError::Key(format!("the {what} holds no certificate")));
    }
    Ok(certs)
}

pub fn server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, NetError> {
    let chain = certs(cert_pem, "server certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| NetError::Key(format!("cannot read the server's TLS key: {e}")))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Key(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| NetError::Key(format!("the certificate and key do not fit: {e}")))?;
    Ok(Arc::new(cfg))
}

pub fn client_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, NetError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        roots.add(c).map_err(|e| NetError::Key(format!("cannot use the CA certificate: {e}")))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Key(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A teaching CA and a server certificate for `hosts` (names or IP
/// addresses): (CA certificate, server certificate, server key), PEM.
pub fn selfsigned(hosts: &[String]) -> Result<(String, String, String), NetError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
    let err = |e: rcgen::Error| NetError::Crypto(format!("cannot make the certificates: {e}"));
    if hosts.is_empty() {
        return Err(NetError::Invalid("hosts".into(), "must name at least one host".into()));
    }
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "fedagg federation CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(err)?;
    params.distinguished_name.push(DnType::CommonName, hosts[0].clone());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, &ca_cert, &ca_key).map_err(err)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}
