//! Outbound connections to the cloud: TCP, the optional HTTP CONNECT proxy, TLS, then either one
//! HTTP/1.1 request or a WebSocket upgrade over the same kind of stream.
//!
//! One connector for both means the proxy and the TLS policy apply to every byte the relay sends to
//! the cloud, and each step has its own deadline, so a silent peer can never wedge a caller. This module
//! knows nothing about what the requests mean; the agents do.

pub mod connect;
pub mod origin;
mod session;

pub use session::{Session, Sessions};

use crate::config::{CloudConfig, CloudUrl, ProxyConfig};
use crate::protocol::{ErrorBody, ErrorCode};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{ServerName, pem::PemObject};
use serde::{Serialize, de::DeserializeOwned};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Largest response body the relay reads from the cloud (manifests, acks): anything bigger is refused.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Largest proxy CONNECT answer head.
const MAX_PROXY_HEAD: usize = 8 * 1024;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// A lower-level error kept as the cause of a [`CloudError`]; shared, so the error stays `Clone`.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

pub(crate) fn cause(e: impl std::error::Error + Send + Sync + 'static) -> Option<Cause> {
    Some(Arc::new(e))
}

/// Why a cloud call failed, in words an admin can act on. `Display` is what status and logs show;
/// the lower-level error, when there is one, stays reachable as `source()`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CloudError {
    /// Name resolution, TCP, proxy or TLS failed or timed out.
    #[error("{stage} failed: {detail}")]
    Connect {
        stage: &'static str,
        detail: String,
        #[source]
        source: Option<Cause>,
    },
    /// The request was sent but no complete answer arrived in time.
    #[error("{what} timed out after {}", humantime::format_duration(*after))]
    Timeout { what: &'static str, after: Duration },
    /// The cloud answered with an error status.
    #[error("cloud answered {status} {}: {message}", code.as_str())]
    Status {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    /// The cloud answered 2xx, but the body is not what the protocol says.
    #[error("cloud answered with an unreadable body: {detail}")]
    BadBody {
        detail: String,
        #[source]
        source: Option<Cause>,
    },
    /// A download the rules of [`origin`] do not allow: nothing was sent.
    #[error("refused: {detail}")]
    Refused { detail: String },
    /// The connection broke mid-request.
    #[error("connection to cloud broke: {detail}")]
    Io {
        detail: String,
        #[source]
        source: Option<Cause>,
    },
}

/// Equal when they say the same thing (the causes compare by their message).
impl PartialEq for CloudError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl CloudError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            CloudError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A broken connection, with its cause.
    pub(crate) fn io(e: impl std::error::Error + Send + Sync + 'static) -> CloudError {
        CloudError::Io {
            detail: e.to_string(),
            source: cause(e),
        }
    }

    /// A body that is not what the protocol says.
    pub(crate) fn bad_body(detail: impl Into<String>) -> CloudError {
        CloudError::BadBody {
            detail: detail.into(),
            source: None,
        }
    }
}

/// Connects to the cloud and speaks HTTP/1.1 or WebSocket over the connection.
#[derive(Clone)]
pub struct CloudClient {
    url: CloudUrl,
    proxy: Option<ProxyConfig>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// `[cloud].ca_file`, for the TLS of download origins other than the cloud's.
    ca_file: Option<std::path::PathBuf>,
    /// That TLS config, built on first use when the cloud itself is plain http.
    other_tls: Arc<std::sync::OnceLock<Arc<rustls::ClientConfig>>>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// The receive buffer of the sockets this client opens (None: the kernel's). A rate-limited
    /// download sets a small one, so the kernel cannot take megabytes at line rate before the
    /// limiter bites (see [`CloudClient::with_recv_buffer`]).
    recv_buffer: Option<u32>,
}

impl CloudClient {
    /// The same client, its connections opened with `recv_buffer` as their receive buffer.
    pub fn with_recv_buffer(&self, recv_buffer: Option<u32>) -> CloudClient {
        CloudClient {
            recv_buffer,
            ..self.clone()
        }
    }

    pub fn new(cfg: &CloudConfig) -> anyhow::Result<CloudClient> {
        let tls = if cfg.url.tls {
            Some(Arc::new(client_tls_config(cfg.ca_file.as_deref())?))
        } else {
            None
        };
        Ok(CloudClient {
            url: cfg.url.clone(),
            proxy: cfg.proxy.clone(),
            tls,
            ca_file: cfg.ca_file.clone(),
            other_tls: Arc::default(),
            connect_timeout: cfg.connect_timeout,
            request_timeout: cfg.request_timeout,
            recv_buffer: None,
        })
    }

    pub fn url(&self) -> &CloudUrl {
        &self.url
    }

    /// Opens a stream to the cloud: through the proxy when set, then TLS when the URL is https.
    /// Returns the local address of the TCP connection (the relay's address on the route to the cloud).
    pub async fn connect(&self) -> Result<(BoxIo, SocketAddr), CloudError> {
        let deadline = self.connect_timeout;
        let step = async {
            let (tcp, local) = match &self.proxy {
                None => {
                    tcp_connect_with(
                        &self.url.connect_target(),
                        "connect to cloud",
                        deadline,
                        self.recv_buffer,
                    )
                    .await?
                }
                Some(p) => {
                    let (mut tcp, local) = tcp_connect_with(
                        &p.address(),
                        "connect to proxy",
                        deadline,
                        self.recv_buffer,
                    )
                    .await?;
                    proxy_connect(&mut tcp, p, &self.url.connect_target()).await?;
                    (tcp, local)
                }
            };
            let io: BoxIo = match &self.tls {
                None => Box::new(tcp),
                Some(cfg) => {
                    let name = ServerName::try_from(self.url.host.clone()).map_err(|e| {
                        CloudError::Connect {
                            stage: "TLS",
                            detail: format!("bad server name: {e}"),
                            source: cause(e),
                        }
                    })?;
                    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| CloudError::Connect {
                            stage: "TLS handshake",
                            detail: e.to_string(),
                            source: cause(e),
                        })?;
                    Box::new(tls)
                }
            };
            Ok::<_, CloudError>((io, local))
        };
        timeout(deadline, step)
            .await
            .map_err(|_| CloudError::Timeout {
                what: "connecting to cloud",
                after: deadline,
            })?
    }

    /// Sends one JSON request and decodes a JSON answer. Errors carry the cloud's error code.
    pub async fn json<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Req>,
    ) -> Result<Resp, CloudError> {
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).map_err(CloudError::io)?),
            None => Bytes::new(),
        };
        let (status, body) = self.request(method, path, token, bytes).await?;
        if !(200..300).contains(&status) {
            return Err(status_error(status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| CloudError::bad_body(format!("{e} (first bytes: {:?})", preview(&body))))
    }

    /// One HTTP/1.1 request on a fresh connection; the whole exchange is bounded by the connect and
    /// request deadlines.
    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Bytes,
    ) -> Result<(u16, Bytes), CloudError> {
        let (status, _, body) = self.request_with_headers(method, path, token, body).await?;
        Ok((status, body))
    }

    /// [`Self::request`], keeping the answer's headers (`ucrelay doctor` reads the cloud's `Date`).
    pub async fn request_with_headers(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Bytes,
    ) -> Result<(u16, http::HeaderMap, Bytes), CloudError> {
        self.exchange(method, path, token, body, "application/json", &[])
            .await
    }

    /// One request with a body of any type and extra headers (an artifact chunk with its
    /// `Content-Range`); the answer is JSON as usual.
    pub async fn send_bytes(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Bytes,
        content_type: &str,
        headers: &[(http::HeaderName, String)],
    ) -> Result<(u16, Bytes), CloudError> {
        let (status, _, body) = self
            .exchange(method, path, token, body, content_type, headers)
            .await?;
        Ok((status, body))
    }

    async fn exchange(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Bytes,
        content_type: &str,
        headers: &[(http::HeaderName, String)],
    ) -> Result<(u16, http::HeaderMap, Bytes), CloudError> {
        let (io, _) = self.connect().await?;
        let rt = self.request_timeout;
        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(CloudError::io)?;
            let conn_task = tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = http::Request::builder()
                .method(method)
                .uri(self.url.path(path))
                .header(http::header::HOST, self.url.authority())
                .header(http::header::USER_AGENT, user_agent())
                .header(http::header::ACCEPT, "application/json");
            if !body.is_empty() {
                req = req.header(http::header::CONTENT_TYPE, content_type);
            }
            for (name, value) in headers {
                req = req.header(name, value);
            }
            if let Some(t) = token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req.body(Full::new(body)).map_err(CloudError::io)?;
            let resp = sender.send_request(req).await.map_err(CloudError::io)?;
            let status = resp.status().as_u16();
            let (head, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| CloudError::bad_body(format!("reading body: {e}")))?
                .to_bytes();
            conn_task.abort();
            Ok((status, head.headers, body))
        };
        timeout(rt, exchange)
            .await
            .map_err(|_| CloudError::Timeout {
                what: "cloud request",
                after: rt,
            })?
    }

    /// Starts a GET of an image file whose body the caller streams, with `Range: bytes=<from>-`
    /// when `range_from` > 0, under the rules of [`origin`]: `url` is a path on the cloud's
    /// origin or an absolute URL; the token goes to the cloud's own origin only; another origin
    /// must be https and is dialled only at addresses outside the LAN (`lan`: the device
    /// subnets); redirects are followed up to [`origin::MAX_REDIRECTS`] hops under the same rules.
    /// Each hop's answer head must arrive within the request deadline; the caller bounds each
    /// body read.
    pub async fn get_file(
        &self,
        url: &str,
        token: Option<&str>,
        range_from: u64,
        lan: &[ipnet::IpNet],
    ) -> Result<http::Response<hyper::body::Incoming>, CloudError> {
        let refused = |detail: String| CloudError::Refused { detail };
        let mut at = origin::manifest_url(&self.url, url)
            .map_err(|e| refused(format!("url {url:?}: {e}")))?;
        for hop in 0..=origin::MAX_REDIRECTS {
            let own = at.same_origin(&self.url);
            if !own && !at.tls {
                return Err(refused(format!(
                    "{} is not the cloud's origin ({}) and is plain http: files from any other origin must use https",
                    at.origin(),
                    self.url
                )));
            }
            let io = if own {
                self.connect().await?.0
            } else {
                let addrs = self.checked_addresses(&at, lan).await?;
                self.connect_other(&at, &addrs).await?
            };
            // The token, and nothing else that identifies the relay, goes to the cloud only.
            let token = if own { token } else { None };
            let resp = self.get_head(io, &at, token, range_from).await?;
            let status = resp.status().as_u16();
            if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                return Ok(resp);
            }
            if hop == origin::MAX_REDIRECTS {
                return Err(refused(format!(
                    "more than {} redirects (the last one from {})",
                    origin::MAX_REDIRECTS,
                    at.origin()
                )));
            }
            let location = resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    refused(format!(
                        "{} answered {status} without a usable Location",
                        at.origin()
                    ))
                })?
                .to_string();
            drop(resp);
            let next = at.join(&location).map_err(refused)?;
            tracing::debug!(from = %at.origin(), to = %next.origin(), status, "following a download redirect");
            at = next;
        }
        Err(refused("too many redirects".into()))
    }

    /// A stream to another origin than the cloud's, at one of the checked `addrs`: through the
    /// proxy (CONNECT to the checked address, so the proxy cannot resolve the name differently)
    /// or raced directly, then TLS with the system roots and `[cloud].ca_file`.
    async fn connect_other(
        &self,
        at: &origin::FileUrl,
        addrs: &[SocketAddr],
    ) -> Result<BoxIo, CloudError> {
        let deadline = self.connect_timeout;
        let step = async {
            let tcp = match &self.proxy {
                None => {
                    race_addrs(
                        addrs,
                        "connect to download origin",
                        deadline,
                        self.recv_buffer,
                    )
                    .await?
                    .0
                }
                Some(p) => {
                    let (mut tcp, _) = tcp_connect_with(
                        &p.address(),
                        "connect to proxy",
                        deadline,
                        self.recv_buffer,
                    )
                    .await?;
                    proxy_connect(&mut tcp, p, &addrs[0].to_string()).await?;
                    tcp
                }
            };
            let name = ServerName::try_from(at.host.clone()).map_err(|e| CloudError::Connect {
                stage: "TLS",
                detail: format!("bad server name {}: {e}", at.host),
                source: cause(e),
            })?;
            let tls = tokio_rustls::TlsConnector::from(self.other_tls()?)
                .connect(name, tcp)
                .await
                .map_err(|e| CloudError::Connect {
                    stage: "TLS handshake",
                    detail: format!("{}: {e}", at.origin()),
                    source: cause(e),
                })?;
            Ok::<BoxIo, CloudError>(Box::new(tls))
        };
        timeout(deadline, step)
            .await
            .map_err(|_| CloudError::Timeout {
                what: "connecting to a download origin",
                after: deadline,
            })?
    }

    /// TLS for origins other than the cloud's: the system roots plus `[cloud].ca_file` (a
    /// TLS-inspecting proxy re-signs those too), built once.
    fn other_tls(&self) -> Result<Arc<rustls::ClientConfig>, CloudError> {
        if let Some(t) = &self.tls {
            return Ok(t.clone());
        }
        if let Some(t) = self.other_tls.get() {
            return Ok(t.clone());
        }
        let cfg = client_tls_config(self.ca_file.as_deref()).map_err(|e| CloudError::Connect {
            stage: "TLS",
            detail: format!("{e:#}"),
            source: None,
        })?;
        Ok(self.other_tls.get_or_init(|| Arc::new(cfg)).clone())
    }

    /// Sends the GET on `io` and returns the answer head (the body streams after it).
    async fn get_head(
        &self,
        io: BoxIo,
        at: &origin::FileUrl,
        token: Option<&str>,
        range_from: u64,
    ) -> Result<http::Response<hyper::body::Incoming>, CloudError> {
        let rt = self.request_timeout;
        let head = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(CloudError::io)?;
            // Lives as long as the body is being read.
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = http::Request::get(at.path_and_query())
                .header(http::header::HOST, at.authority())
                .header(http::header::USER_AGENT, user_agent());
            if let Some(t) = token {
                req = req.header(http::header::AUTHORIZATION, bearer(t)?);
            }
            if range_from > 0 {
                req = req.header(http::header::RANGE, format!("bytes={range_from}-"));
            }
            let req = req.body(Full::new(Bytes::new())).map_err(CloudError::io)?;
            sender.send_request(req).await.map_err(CloudError::io)
        };
        timeout(rt, head).await.map_err(|_| CloudError::Timeout {
            what: "download request",
            after: rt,
        })?
    }

    /// Opens the WebSocket command channel. A 401 before the upgrade comes back as `Status`.
    pub async fn websocket(
        &self,
        path: &str,
        token: &str,
    ) -> Result<WebSocketStream<BoxIo>, CloudError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::error::Error as WsError;
        let (io, _) = self.connect().await?;
        let scheme = if self.url.tls { "wss" } else { "ws" };
        let uri = format!("{scheme}://{}{}", self.url.authority(), self.url.path(path));
        let mut req = uri.into_client_request().map_err(CloudError::io)?;
        let headers = req.headers_mut();
        headers.insert(http::header::AUTHORIZATION, bearer(token)?);
        headers.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static(user_agent()),
        );
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_BODY))
            .max_frame_size(Some(MAX_BODY));
        let rt = self.request_timeout;
        let handshake = tokio_tungstenite::client_async_with_config(req, io, Some(config));
        match timeout(rt, handshake).await {
            Err(_) => Err(CloudError::Timeout {
                what: "channel upgrade",
                after: rt,
            }),
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(WsError::Http(resp))) => {
                let status = resp.status().as_u16();
                let body = resp.body().clone().unwrap_or_default();
                Err(status_error(status, &body))
            }
            Ok(Err(e)) => Err(CloudError::Io {
                detail: format!("channel upgrade: {e}"),
                source: cause(e),
            }),
        }
    }
}

fn bearer(token: &str) -> Result<http::HeaderValue, CloudError> {
    http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        CloudError::bad_body("the cloud's token contains characters not allowed in a header")
    })
}

pub fn user_agent() -> &'static str {
    concat!("ucrelay/", env!("CARGO_PKG_VERSION"))
}

fn preview(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned()
}

/// Maps an error answer to a `CloudError`, reading the protocol's error body when there is one.
pub fn status_error(status: u16, body: &[u8]) -> CloudError {
    match serde_json::from_slice::<ErrorBody>(body) {
        // A code this build does not know is read by its HTTP status, below.
        Ok(e) if e.error.code != ErrorCode::Other => CloudError::Status {
            status,
            code: e.error.code,
            message: e.error.message,
        },
        _ => {
            let code = match status {
                401 => ErrorCode::TokenInvalid,
                404 => ErrorCode::NotFound,
                429 | 503 => ErrorCode::Busy,
                400 => ErrorCode::BadRequest,
                413 => ErrorCode::TooLarge,
                s if s >= 500 => ErrorCode::Internal,
                _ => ErrorCode::Other,
            };
            let message = if body.is_empty() {
                "no details".to_string()
            } else {
                preview(body)
            };
            CloudError::Status {
                status,
                code,
                message,
            }
        }
    }
}

/// Resolves `target` (`host:port`) and races its addresses ([`connect::race`]), each attempt
/// bounded by `per_address`. Returns the stream and its local address.
pub(crate) async fn tcp_connect(
    target: &str,
    stage: &'static str,
    per_address: Duration,
) -> Result<(TcpStream, SocketAddr), CloudError> {
    tcp_connect_with(target, stage, per_address, None).await
}

/// [`tcp_connect`], each socket with `recv_buffer` as its receive buffer when given.
pub(crate) async fn tcp_connect_with(
    target: &str,
    stage: &'static str,
    per_address: Duration,
    recv_buffer: Option<u32>,
) -> Result<(TcpStream, SocketAddr), CloudError> {
    let addrs = resolve(target).await?;
    race_addrs(&addrs, stage, per_address, recv_buffer).await
}

/// The addresses `target` (`host:port`) resolves to, in the resolver's order.
pub(crate) async fn resolve(target: &str) -> Result<Vec<SocketAddr>, CloudError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(target)
        .await
        .map_err(|e| CloudError::Connect {
            stage: "name resolution",
            detail: format!("{target}: {e}"),
            source: cause(e),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(CloudError::Connect {
            stage: "name resolution",
            detail: format!("{target}: no addresses"),
            source: None,
        });
    }
    Ok(addrs)
}

/// Races `addrs`; the error names every address and why it failed.
pub(crate) async fn race_addrs(
    addrs: &[SocketAddr],
    stage: &'static str,
    per_address: Duration,
    recv_buffer: Option<u32>,
) -> Result<(TcpStream, SocketAddr), CloudError> {
    match connect::race_with(addrs, per_address, recv_buffer).await {
        Ok((s, _)) => {
            let _ = s.set_nodelay(true);
            let local = s.local_addr().map_err(CloudError::io)?;
            Ok((s, local))
        }
        Err(e) => Err(CloudError::Connect {
            stage,
            detail: e.to_string(),
            source: cause(e),
        }),
    }
}

/// Asks an HTTP proxy for a tunnel with CONNECT and checks for a 2xx answer.
pub(crate) async fn proxy_connect(
    tcp: &mut TcpStream,
    proxy: &ProxyConfig,
    target: &str,
) -> Result<(), CloudError> {
    let mut head = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: {}\r\n",
        user_agent()
    );
    if let Some(cred) = &proxy.credentials {
        let enc = base64::engine::general_purpose::STANDARD.encode(cred.expose());
        head.push_str(&format!("Proxy-Authorization: Basic {enc}\r\n"));
    }
    head.push_str("\r\n");
    let io_err = |e: std::io::Error| CloudError::Connect {
        stage: "proxy CONNECT",
        detail: e.to_string(),
        source: cause(e),
    };
    tcp.write_all(head.as_bytes()).await.map_err(io_err)?;
    // Read byte by byte up to the blank line so no tunnelled byte is consumed.
    let mut buf = Vec::with_capacity(256);
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() >= MAX_PROXY_HEAD {
            return Err(CloudError::Connect {
                stage: "proxy CONNECT",
                detail: "answer head too large".into(),
                source: None,
            });
        }
        let b = tcp.read_u8().await.map_err(io_err)?;
        buf.push(b);
    }
    let text = String::from_utf8_lossy(&buf);
    let status_line = text.lines().next().unwrap_or_default();
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(c) if (200..300).contains(&c) => Ok(()),
        _ => Err(CloudError::Connect {
            stage: "proxy CONNECT",
            detail: format!(
                "proxy {} refused the tunnel to {target}: {status_line}",
                proxy.address()
            ),
            source: None,
        }),
    }
}

/// TLS client config for the cloud: the system's roots, plus `ca_file` when set.
pub fn client_tls_config(
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let mut n = 0;
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| anyhow::anyhow!("cannot read CA file {}: {e}", path.display()))?
        {
            let cert =
                cert.map_err(|e| anyhow::anyhow!("bad certificate in {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("unusable CA in {}: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            anyhow::bail!("no certificates found in CA file {}", path.display());
        }
    }
    if roots.is_empty() {
        anyhow::bail!(
            "no trusted CA certificates: the system store is empty and no [cloud].ca_file is set"
        );
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_map_to_codes() {
        let e = status_error(
            401,
            br#"{"error":{"code":"pin_rejected","message":"nope"}}"#,
        );
        assert_eq!(e.code(), Some(ErrorCode::PinRejected));
        assert_eq!(
            status_error(502, b"<html>bad gateway").code(),
            Some(ErrorCode::Internal)
        );
        assert_eq!(status_error(401, b"").code(), Some(ErrorCode::TokenInvalid));
        let newer = status_error(
            503,
            br#"{"error":{"code":"from_the_future","message":"x"}}"#,
        );
        assert_eq!(newer.code(), Some(ErrorCode::Busy));
        let shown = status_error(500, b"<html>oops").to_string();
        assert!(shown.contains("500") && shown.contains("oops"), "{shown}");
    }
}
