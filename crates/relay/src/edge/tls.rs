//! The edge's TLS: TLS 1.2 and 1.3 only (rustls has nothing older), the server's cipher order,
//! and a certificate that can be swapped while connections stay up. A handshake reads the current certificate; connections that
//! already finished theirs are never touched by a swap.

use super::cert::LoadedCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::sync::{Arc, RwLock};

/// The certificate in service, replaceable at run time.
pub struct CertSlot {
    current: RwLock<Arc<LoadedCert>>,
}

impl std::fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSlot")
            .field("subject", &self.current().subject)
            .finish()
    }
}

impl CertSlot {
    pub fn new(cert: LoadedCert) -> Arc<CertSlot> {
        Arc::new(CertSlot {
            current: RwLock::new(Arc::new(cert)),
        })
    }

    pub fn current(&self) -> Arc<LoadedCert> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn replace(&self, cert: LoadedCert) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(cert);
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }
}

/// A rustls server config that always serves the slot's current certificate.
pub fn server_config(slot: Arc<CertSlot>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(slot);
    // Phones speak HTTP/1.1 to their provisioning server.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The server's preference decides the cipher suite (strongest first, as rustls lists them),
    // not whatever order a client offers: what auditors (and testssl.sh) expect.
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}
