//! A phone downloading from a relay's edge: HTTPS with the relay's FQDN as SNI, trusting the run's
//! CAs, one request per connection, every step under a deadline. The body is kept even when the
//! transfer breaks, so that every byte the device did receive can be checked.

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use std::time::Duration;

pub struct Fetched {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    /// Why the body stopped early, if it did.
    pub broken: Option<String>,
}

pub fn tls(roots: &[Vec<u8>]) -> Result<tokio_rustls::TlsConnector> {
    let mut store = rustls::RootCertStore::empty();
    for der in roots {
        store
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| anyhow!("bad CA: {e}"))?;
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// GET `path` from the edge on 127.0.0.1:`port` (with `Range: bytes=a-b` when given).
pub async fn get(
    tls: &tokio_rustls::TlsConnector,
    fqdn: &str,
    port: u16,
    path: &str,
    range: Option<(u64, u64)>,
) -> Result<Fetched> {
    let step = Duration::from_secs(15);
    let tcp = tokio::time::timeout(step, tokio::net::TcpStream::connect(("127.0.0.1", port)))
        .await
        .map_err(|_| anyhow!("connect timed out"))?
        .context("connect")?;
    let name = ServerName::try_from(fqdn.to_string()).map_err(|e| anyhow!("{e}"))?;
    let stream = tokio::time::timeout(step, tls.connect(name, tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))?
        .context("TLS handshake")?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::get(path)
        .header(http::header::HOST, fqdn)
        .header(
            http::header::USER_AGENT,
            "FileTransport PolycomVVX-VVX_411-UA/6.4.0.1 (SN:0004f2000001) Type/Application",
        );
    if let Some((a, b)) = range {
        req = req.header(http::header::RANGE, format!("bytes={a}-{b}"));
    }
    let resp = tokio::time::timeout(step, sender.send_request(req.body(Empty::<Bytes>::new())?))
        .await
        .map_err(|_| anyhow!("no answer in time"))?
        .context("request")?;
    let status = resp.status().as_u16();
    let (head, mut body) = resp.into_parts();
    let mut out = Vec::new();
    let mut broken = None;
    loop {
        match tokio::time::timeout(step, body.frame()).await {
            Err(_) => {
                broken = Some("no body data for 15 s".to_string());
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                broken = Some(e.to_string());
                break;
            }
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                    if out.len() > 64 << 20 {
                        broken = Some("body over 64 MB".into());
                        break;
                    }
                }
            }
        }
    }
    Ok(Fetched {
        status,
        headers: head.headers,
        body: out,
        broken,
    })
}
