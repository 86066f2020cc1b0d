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

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::ring::cipher_suite as cs;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    /// A slot holding a self-signed ECDSA certificate for `relay.test`, and that certificate.
    fn slot() -> (Arc<CertSlot>, CertificateDer<'static>) {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["relay.test".to_string()]).expect("cert");
        let der = cert.der().clone();
        let key = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
            signing_key.serialize_der().into(),
        ))
        .expect("key");
        let loaded = LoadedCert {
            key: Arc::new(CertifiedKey::new(vec![der.clone()], key)),
            subject: "CN=relay.test".into(),
            dns_names: vec!["relay.test".into()],
            not_after: std::time::SystemTime::now(),
            sha256: String::new(),
        };
        (CertSlot::new(loaded), der)
    }

    /// Handshakes in memory with a client offering exactly `suites`, in that order, over
    /// `version`; returns the suite the edge chose.
    fn negotiated(
        suites: &[rustls::SupportedCipherSuite],
        version: &'static rustls::SupportedProtocolVersion,
    ) -> rustls::CipherSuite {
        let (slot, root) = slot();
        let server = server_config(slot).expect("server config");
        let mut roots = RootCertStore::empty();
        roots.add(root).expect("root");
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: suites.to_vec(),
            ..rustls::crypto::ring::default_provider()
        };
        let client = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = "relay.test".try_into().expect("name");
        let mut c = ClientConnection::new(Arc::new(client), name).expect("client");
        let mut s = ServerConnection::new(server).expect("server");
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).expect("client write");
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("server read");
                s.process_new_packets().expect("server handshake");
            }
            buf.clear();
            s.write_tls(&mut buf).expect("server write");
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).expect("client read");
                c.process_new_packets().expect("client handshake");
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                assert_eq!(s.protocol_version(), Some(version.version));
                return s.negotiated_cipher_suite().expect("suite").suite();
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn the_edge_picks_by_its_own_suite_order_not_the_clients() {
        // The client lists the edge's suites in reverse order (ChaCha20, AES-128, AES-256); the
        // edge answers with its own first choice all the same.
        let tls13 = [
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
        ];
        assert_eq!(
            negotiated(&tls13, &rustls::version::TLS13),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        let tls12 = [
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ];
        assert_eq!(
            negotiated(&tls12, &rustls::version::TLS12),
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        );
        // A client that has ChaCha20 only still gets it.
        assert_eq!(
            negotiated(&tls13[..1], &rustls::version::TLS13),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
    }
}
