//! The edge's TLS: TLS 1.2 and 1.3 only (rustls has nothing older), with a certificate that can be
//! swapped while connections stay up. A handshake reads the current certificate; connections that
//! already finished theirs are never touched by a swap. The slot may start empty (an `[edge]`
//! without `pfx` waits for the certificate the cloud uploads): the HTTPS listener accepts nothing
//! until a certificate is in it.

use super::cert::LoadedCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// Where the certificate in service came from.
#[derive(Debug, Clone, PartialEq)]
pub enum CertSource {
    /// `[edge].pfx`.
    File(PathBuf),
    /// Uploaded in the cloud and pushed down the channel (or loaded from the state dir, where
    /// the last one that passed every rule is kept).
    Cloud {
        upload_id: String,
        received_at: SystemTime,
    },
}

impl std::fmt::Display for CertSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertSource::File(p) => write!(f, "file {}", p.display()),
            CertSource::Cloud {
                upload_id,
                received_at,
            } => write!(
                f,
                "cloud upload {upload_id} (received {})",
                crate::util::time::rfc3339(*received_at)
            ),
        }
    }
}

/// A certificate in service and where it came from.
#[derive(Debug)]
pub struct Serving {
    pub cert: LoadedCert,
    pub source: CertSource,
}

/// The certificate in service, replaceable at run time; empty until one passes the rules.
pub struct CertSlot {
    current: RwLock<Option<Arc<Serving>>>,
    filled: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSlot")
            .field("subject", &self.current().map(|s| s.cert.subject.clone()))
            .finish()
    }
}

impl CertSlot {
    pub fn new(cert: LoadedCert, source: CertSource) -> Arc<CertSlot> {
        let slot = CertSlot::empty();
        slot.replace(cert, source);
        slot
    }

    /// A slot with no certificate yet: handshakes fail and the HTTPS listener waits.
    pub fn empty() -> Arc<CertSlot> {
        Arc::new(CertSlot {
            current: RwLock::new(None),
            filled: tokio::sync::watch::Sender::new(false),
        })
    }

    pub fn current(&self) -> Option<Arc<Serving>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn replace(&self, cert: LoadedCert, source: CertSource) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) =
            Some(Arc::new(Serving { cert, source }));
        self.filled.send_replace(true);
    }

    /// Returns once the slot holds a certificate.
    pub async fn filled(&self) {
        let mut rx = self.filled.subscribe();
        let _ = rx.wait_for(|f| *f).await;
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current().map(|s| s.cert.key.clone())
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
    Ok(Arc::new(cfg))
}
