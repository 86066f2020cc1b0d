//! Client for the devices' REST API (Poly UC Software: `/api/v1/...`, Basic auth as `Polycom`, a
//! `{"Status": "2000", "data": ...}` envelope).
//!
//! One [`Session`] is one connection used for a few sequential requests, then dropped: phones
//! process one request at a time and thousands of idle pooled connections would only cost memory.
//! Every step has a deadline; redirects are never followed; answers are size-capped (JSON answers
//! far below the cap for files).
//!
//! With `[devices].identity = "tofu"` each connection gets its own certificate check ([`PinCheck`])
//! carrying what that device must present: a device whose key is not the pinned one fails the
//! TLS handshake, so the request carrying the admin password is never written.

use super::identity::{Expect, Fingerprint};
use crate::config::{DeviceIdentity, DeviceScheme, DevicesConfig};
use crate::util::secret::Secret;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Largest answer body read from a device (screen captures and config exports included).
pub const MAX_REPLY: usize = 8 * 1024 * 1024;
/// Largest JSON answer of the REST API read from a device: a status, a few dozen lines or 20
/// parameters are a few kilobytes; anything near this is a device misbehaving.
pub const MAX_JSON_REPLY: usize = 256 * 1024;
/// Longest API status code kept from a device's answer (real ones are 4 digits).
const MAX_CODE_LEN: usize = 16;

/// A device address: `IP` or `IP:PORT` (IPv6 as `[IP]:PORT`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Target { ip, port: None });
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(format!("{s:?}: port 0 is not a device port"));
            }
            return Ok(Target {
                ip: sa.ip(),
                port: Some(sa.port()),
            });
        }
        Err(format!(
            "{s:?} is not a device address (IP or IP:PORT; host names are not accepted)"
        ))
    }

    pub fn socket_addr(&self, scheme: DeviceScheme) -> SocketAddr {
        let default = match scheme {
            DeviceScheme::Https => 443,
            DeviceScheme::Http => 80,
        };
        SocketAddr::new(self.ip, self.port.unwrap_or(default))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.port, self.ip) {
            (None, ip) => write!(f, "{ip}"),
            (Some(p), IpAddr::V4(ip)) => write!(f, "{ip}:{p}"),
            (Some(p), IpAddr::V6(ip)) => write!(f, "[{ip}]:{p}"),
        }
    }
}

/// A lower-level error kept as the cause of a [`DeviceError`]; shared, so the error stays `Clone`
/// (one failure may be reported for a command and remembered by monitoring).
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

fn cause(e: impl std::error::Error + Send + Sync + 'static) -> Cause {
    Arc::new(e)
}

/// Why a device request did not give an answer we can use. `Display` is the reason reported to the
/// cloud and shown to admins; the lower-level error stays reachable as `source()`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    /// No TCP connection (refused, unreachable, reset during connect).
    #[error("device unreachable: {0}")]
    Unreachable(#[source] Cause),
    /// The connection broke before the answer was complete.
    #[error("device unreachable: connection closed: {0}")]
    Closed(#[source] Cause),
    /// The deadline passed.
    #[error("device did not answer in time ({0})")]
    Timeout(&'static str),
    /// TLS handshake failed.
    #[error("TLS handshake with the device failed: {0}")]
    Tls(#[source] Cause),
    /// The device presented a certificate key other than the pinned one; the handshake was
    /// aborted before any request (so before the admin password) went out.
    #[error(
        "device identity changed: {} presented certificate key {} instead of the pinned key {}; \
         the admin password was not sent. If the device was replaced or reset, accept the new key with \
         `ucrelay devices trust {}` or the cloud's device_trust command",
        .0.address, .0.seen.short(), .0.pinned.short(), .0.address
    )]
    IdentityChanged(Box<KeyChange>),
    /// 401: the admin password was refused.
    #[error(
        "device refused the admin password (HTTP 401); set it in the command or [devices].admin_password"
    )]
    Auth,
    /// 403: the device is busy with another request (phones take one at a time).
    #[error("device busy with another request (HTTP 403)")]
    Busy,
    /// 404 on an API path: the REST API is turned off on the device.
    #[error("device REST API is turned off (HTTP 404; set apps.restapi.enabled=1)")]
    ApiDisabled,
    /// Any other HTTP status.
    #[error("device answered HTTP {0}")]
    Http(u16),
    /// The envelope's `Status` is not 2000.
    #[error("device answered status {0}: {meaning}", meaning = api_code_meaning(.0))]
    Api(String),
    /// The answer could not be read as the API's envelope.
    #[error("unreadable answer from the device: {0}")]
    BadReply(String),
    /// The HTTP exchange failed in a way that is not a lost connection.
    #[error("unreadable answer from the device: {0}")]
    Exchange(#[source] Cause),
    /// The relay could not store what it learnt about the device (its key), so it did not go on.
    #[error("cannot record the device's key in the store: {0}")]
    Store(String),
}

/// A key a device presented where another one is pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    pub address: String,
    pub pinned: Fingerprint,
    pub seen: Fingerprint,
}

/// Equal when they say the same thing (the causes compare by their message).
impl PartialEq for DeviceError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl DeviceError {
    /// True when the device did not answer at all (for monitoring: offline).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            DeviceError::Unreachable(_)
                | DeviceError::Closed(_)
                | DeviceError::Timeout(_)
                | DeviceError::Tls(_)
        )
    }
}

/// Plain meaning of a Poly REST status code.
pub fn api_code_meaning(code: &str) -> &'static str {
    match code {
        "2000" => "success",
        "4000" => "invalid input parameters",
        "4001" => "device busy",
        "4002" => "line not registered",
        "4003" => "operation not allowed",
        "4004" => "operation not supported",
        "4005" => "line does not exist",
        "4006" => "URLs not configured",
        "4007" => "no active call",
        "4008" => "configuration export failed",
        "4009" => "input size limit exceeded",
        "4010" => "default password not allowed (change the device's admin password)",
        "4011" => "contact not found",
        "4400" => "bad request",
        "4403" => "forbidden",
        "5000" => "failed to process request",
        "5500" => "internal server error",
        _ => "unknown status code",
    }
}

/// A decoded `{"Status", "data"}` answer with Status 2000.
#[derive(Debug, Clone)]
pub struct Reply {
    pub data: serde_json::Value,
}

/// Shared, cheap-to-clone client settings.
#[derive(Clone)]
pub struct DeviceClient {
    scheme: DeviceScheme,
    identity: DeviceIdentity,
    tls: Arc<rustls::ClientConfig>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    timeout: Duration,
}

impl DeviceClient {
    pub fn new(cfg: &DevicesConfig) -> anyhow::Result<DeviceClient> {
        let tls = match &cfg.ca_file {
            None => unverified_tls_config()?,
            Some(ca) if cfg.identity == DeviceIdentity::Ca => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", ca.display()))?
                {
                    roots.add(cert?)?;
                }
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
                    .with_no_client_auth()
            }
            // Validation refuses a ca_file without identity = "ca"; never verify less than asked.
            Some(_) => anyhow::bail!("devices.ca_file is set but identity is not \"ca\""),
        };
        Ok(DeviceClient {
            scheme: cfg.scheme,
            identity: cfg.identity,
            tls: Arc::new(tls),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            timeout: cfg.request_timeout,
        })
    }

    /// The TLS settings device connections use (for `probe`, which times the handshake itself).
    pub fn tls_config(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    pub fn scheme(&self) -> DeviceScheme {
        self.scheme
    }

    /// Deadline of one request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `[devices].identity` as the relay started (a change waits for a restart).
    pub fn identity(&self) -> DeviceIdentity {
        self.identity
    }

    /// Whether handshakes are checked against pinned keys (`identity = "tofu"` over HTTPS).
    pub fn pins_keys(&self) -> bool {
        self.identity == DeviceIdentity::Tofu && self.scheme == DeviceScheme::Https
    }

    /// The address pins are kept under: the socket address the relay dials.
    pub fn pin_address(&self, target: &Target) -> String {
        target.socket_addr(self.scheme).to_string()
    }

    /// Opens a connection to the device. Credentials are `Polycom:<password>`; nothing is sent
    /// before the handshake passed. `expect` is what the device's key must be (None: no pin).
    pub async fn session(
        &self,
        target: &Target,
        password: &Secret,
        expect: Option<Expect>,
    ) -> Result<Session, DeviceError> {
        let addr = target.socket_addr(self.scheme);
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("Polycom:{}", password.expose()))
        );
        let mut session = Session {
            client: self.clone(),
            addr,
            host: target.to_string(),
            auth: http::HeaderValue::from_str(&auth)
                .map_err(|_| DeviceError::BadReply("password is not valid in a header".into()))?,
            sender: None,
            expect: expect.filter(|_| self.pins_keys()),
            seen: None,
        };
        session.connect().await?;
        Ok(session)
    }
}

/// One connection to one device.
pub struct Session {
    client: DeviceClient,
    addr: SocketAddr,
    host: String,
    auth: http::HeaderValue,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// What the device's key must be (None: keys are not pinned).
    expect: Option<Expect>,
    /// The key the first handshake of this session saw.
    seen: Option<Fingerprint>,
}

impl Session {
    /// The key this session's handshake saw, when keys are pinned and the handshake verified a
    /// certificate (a resumed TLS session verifies none: the key is the one it was made with).
    pub fn observed_key(&self) -> Option<Fingerprint> {
        self.expect?;
        self.seen
    }

    /// The TLS settings of one connection: the shared ones, or with keys pinned, the shared ones
    /// with this connection's own check.
    fn tls_for(&self) -> (Arc<rustls::ClientConfig>, Option<Arc<PinCheck>>) {
        // A reconnect inside the session must meet the key the first handshake saw.
        let expect = match (self.expect, self.seen) {
            (Some(_), Some(seen)) => Some(Expect::Key(seen)),
            (e, None) => e,
            (None, Some(_)) => None,
        };
        let Some(expect) = expect else {
            return (self.client.tls.clone(), None);
        };
        let check = Arc::new(PinCheck {
            expect,
            provider: self.client.provider.clone(),
            seen: std::sync::Mutex::new(None),
        });
        let mut cfg = (*self.client.tls).clone();
        cfg.dangerous().set_certificate_verifier(check.clone());
        (Arc::new(cfg), Some(check))
    }

    async fn connect(&mut self) -> Result<(), DeviceError> {
        let timeout = self.client.timeout;
        let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(self.addr))
            .await
            .map_err(|_| DeviceError::Timeout("connect"))?
            .map_err(|e| DeviceError::Unreachable(cause(e)))?;
        let _ = tcp.set_nodelay(true);
        let sender = match self.client.scheme {
            DeviceScheme::Http => handshake(TokioIo::new(tcp)).await?,
            DeviceScheme::Https => {
                let name = ServerName::IpAddress(self.addr.ip().into());
                let (tls_cfg, check) = self.tls_for();
                let tls = tokio::time::timeout(
                    timeout,
                    tokio_rustls::TlsConnector::from(tls_cfg).connect(name, tcp),
                )
                .await
                .map_err(|_| DeviceError::Timeout("TLS handshake"))?
                .map_err(|e| {
                    // The pin check refused the key: say so, not "TLS failed".
                    if let Some((pinned, seen)) = check.as_ref().and_then(|c| c.refused()) {
                        return DeviceError::IdentityChanged(Box::new(KeyChange {
                            address: self.addr.to_string(),
                            pinned,
                            seen,
                        }));
                    }
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        DeviceError::Tls(cause(e))
                    } else {
                        DeviceError::Unreachable(cause(e))
                    }
                })?;
                if self.seen.is_none() {
                    self.seen = check.as_ref().and_then(|c| c.seen());
                }
                handshake(TokioIo::new(tls)).await?
            }
        };
        self.sender = Some(sender);
        Ok(())
    }

    /// `GET path`, expecting the JSON envelope.
    pub async fn get(&mut self, path: &str) -> Result<Reply, DeviceError> {
        let (status, _, body) = self
            .send(http::Method::GET, path, None, MAX_JSON_REPLY)
            .await?;
        envelope(status, &body)
    }

    /// `POST path` with `{"data": data}` (or no body when `data` is None), expecting the envelope.
    pub async fn post(
        &mut self,
        path: &str,
        data: Option<serde_json::Value>,
    ) -> Result<Reply, DeviceError> {
        let body = data.map(|d| serde_json::json!({ "data": d }).to_string().into_bytes());
        let (status, _, body) = self
            .send(http::Method::POST, path, body, MAX_JSON_REPLY)
            .await?;
        envelope(status, &body)
    }

    /// `GET path` for a non-JSON resource (screen capture, config export): content type and body.
    pub async fn get_raw(&mut self, path: &str) -> Result<(String, Bytes), DeviceError> {
        let (status, ctype, body) = self.send(http::Method::GET, path, None, MAX_REPLY).await?;
        match status {
            200 => Ok((ctype, body)),
            other => Err(http_error(other)),
        }
    }

    async fn send(
        &mut self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<(u16, String, Bytes), DeviceError> {
        // A device may close a kept-alive connection between requests: reconnect once.
        let reusable = self.sender.as_ref().is_some_and(|s| !s.is_closed());
        if !reusable {
            self.connect().await?;
        }
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.host)
            .header(http::header::AUTHORIZATION, self.auth.clone())
            .header(http::header::USER_AGENT, crate::cloud::user_agent())
            .header(http::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| DeviceError::Exchange(cause(e)))?;
        let sender = self.sender.as_mut().expect("connected above");
        let timeout = self.client.timeout;
        let exchange = async {
            sender
                .ready()
                .await
                .map_err(|e| DeviceError::Unreachable(cause(e)))?;
            let resp = sender.send_request(req).await.map_err(|e| {
                if e.is_incomplete_message() || e.is_closed() {
                    DeviceError::Closed(cause(e))
                } else {
                    DeviceError::Exchange(cause(e))
                }
            })?;
            let status = resp.status().as_u16();
            let ctype = resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .chars()
                .take(100)
                .filter(|c| !c.is_control())
                .collect::<String>();
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| {
                    DeviceError::BadReply(format!(
                        "reading the body (at most {} KiB): {e}",
                        limit / 1024
                    ))
                })?
                .to_bytes();
            Ok::<_, DeviceError>((status, ctype, body))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => {
                if r.is_err() {
                    self.sender = None;
                }
                r
            }
            Err(_) => {
                self.sender = None;
                Err(DeviceError::Timeout("request"))
            }
        }
    }
}

async fn handshake<T>(io: TokioIo<T>) -> Result<SendRequest<Full<Bytes>>, DeviceError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_REPLY.max(64 * 1024))
        .handshake(io)
        .await
        .map_err(|e| DeviceError::Unreachable(cause(e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn http_error(status: u16) -> DeviceError {
    match status {
        401 => DeviceError::Auth,
        403 => DeviceError::Busy,
        404 => DeviceError::ApiDisabled,
        other => DeviceError::Http(other),
    }
}

/// Decodes the envelope of a device's REST answer (`{"Status": "2000", "data": ...}`) given its
/// HTTP status. `Status` is a string in real answers; a number is accepted too. Public for the
/// fuzz targets and the corpus replay test.
pub fn envelope(status: u16, body: &[u8]) -> Result<Reply, DeviceError> {
    if status != 200 {
        // Some firmware puts a Status code in error answers too; the HTTP status says enough.
        return Err(http_error(status));
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| DeviceError::BadReply(format!("not JSON ({e}): {}", preview(body))))?;
    let code = match v.get("Status") {
        Some(serde_json::Value::String(s)) => s
            .chars()
            .take(MAX_CODE_LEN)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => {
            return Err(DeviceError::BadReply(format!(
                "no Status field: {}",
                preview(body)
            )));
        }
    };
    if code != "2000" {
        return Err(DeviceError::Api(code));
    }
    Ok(Reply {
        data: v.get("data").cloned().unwrap_or(serde_json::Value::Null),
    })
}

fn preview(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(120)]);
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The TLS client settings for devices without `[devices].ca_file`: any certificate is accepted
/// (see `AnyCertificate`), the handshake signature is still checked.
pub fn unverified_tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    )
}

/// Device certificates are vendor-signed and named after the MAC, so by default they are not
/// verified (documented in the README); the handshake signature is still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `identity = "tofu"`: one connection's certificate check. The key must be what [`Expect`] says;
/// anything else aborts the handshake (the request with the admin password is never written). The
/// handshake signature is checked as always. What was seen is kept for the caller to pin.
#[derive(Debug)]
struct PinCheck {
    expect: Expect,
    provider: Arc<rustls::crypto::CryptoProvider>,
    seen: std::sync::Mutex<Option<Fingerprint>>,
}

impl PinCheck {
    fn seen(&self) -> Option<Fingerprint> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (pinned, seen) when the check refused the key.
    fn refused(&self) -> Option<(Fingerprint, Fingerprint)> {
        match (self.expect, self.seen()) {
            (Expect::Key(k), Some(seen)) if k != seen => Some((k, seen)),
            _ => None,
        }
    }
}

impl rustls::client::danger::ServerCertVerifier for PinCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(fp) = Fingerprint::of_certificate(end_entity.as_ref()) else {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            ));
        };
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(fp);
        if self.expect.admits(&fp) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// With `[devices].ca_file`: the chain must lead to that CA, but the name is not checked (device
/// certificates name the MAC, not the address the relay dials).
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_and_without_port() {
        let t = Target::parse("10.0.0.5").unwrap();
        assert_eq!(t.port, None);
        assert_eq!(t.socket_addr(DeviceScheme::Https).port(), 443);
        assert_eq!(t.socket_addr(DeviceScheme::Http).port(), 80);
        let t = Target::parse("127.0.3.4:8443").unwrap();
        assert_eq!(t.to_string(), "127.0.3.4:8443");
        assert_eq!(Target::parse("[::1]:443").unwrap().to_string(), "[::1]:443");
        assert!(Target::parse("phone.example").is_err());
        assert!(Target::parse("10.0.0.5:0").is_err());
        assert!(Target::parse("").is_err());
    }

    #[test]
    fn envelope_accepts_string_and_number_status() {
        let r = envelope(200, br#"{"Status":"2000","data":{"a":1}}"#).unwrap();
        assert_eq!(r.data["a"], 1);
        assert!(envelope(200, br#"{"Status":2000}"#).is_ok());
        assert_eq!(
            envelope(200, br#"{"Status":"4007"}"#).unwrap_err(),
            DeviceError::Api("4007".into())
        );
        assert_eq!(envelope(401, b"").unwrap_err(), DeviceError::Auth);
        assert_eq!(envelope(403, b"").unwrap_err(), DeviceError::Busy);
        assert_eq!(envelope(404, b"").unwrap_err(), DeviceError::ApiDisabled);
        assert!(matches!(
            envelope(200, b"<html>"),
            Err(DeviceError::BadReply(_))
        ));
        assert!(
            DeviceError::Api("4002".into())
                .to_string()
                .contains("line not registered")
        );
    }
}
