//! The provisioning handler: forwards a device request to `[provisioning].upstream`. The request goes
//! on unchanged apart from what a proxy must change (hop-by-hop headers dropped, Host rewritten,
//! X-Forwarded-* added), bodies stream both ways, nothing is cached. Upstream connections are kept
//! alive and reused (see `lane`).

pub mod direct;
mod lane;
mod tee;

use super::body::{BoxError, EdgeBody, text_response};
use super::conn::DeviceConn;
use crate::config::{CloudUrl, ProvisioningConfig};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
pub use lane::LaneSlot;
use lane::{Lane, LaneBody, Pool, RawPool, SendError, UpIo};
use rustls::pki_types::ServerName;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tee::UpBody;
use tokio::net::TcpStream;
use tracing::debug;

pub struct Upstream {
    base: CloudUrl,
    /// For an https upstream: the connector (system roots or `ca_file`) and the name to verify.
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    timeout: Duration,
    pool: Arc<Pool>,
    /// Idle connections of the direct path (`direct`), which keeps no task per connection.
    raw_pool: RawPool,
    // Worked out once, not per request.
    target: String,
    host: HeaderValue,
}

/// Why the upstream gave no answer.
enum Fail {
    Connect(String),
    Upstream(String),
}

/// Headers that describe one connection, not the message: never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

impl Upstream {
    pub fn new(cfg: &ProvisioningConfig) -> anyhow::Result<Upstream> {
        let base = CloudUrl::parse(&cfg.upstream)
            .map_err(|e| anyhow::anyhow!("provisioning.upstream: {e}"))?;
        let bad = |e: String| anyhow::anyhow!("provisioning.upstream: {e}");
        let tls = if base.tls {
            let mut config = crate::cloud::client_tls_config(cfg.ca_file.as_deref())?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(base.host.clone())
                .map_err(|e| bad(format!("{}: {e}", base.host)))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Upstream {
            target: base.connect_target(),
            host: HeaderValue::from_str(&base.authority()).map_err(|e| bad(format!("{e}")))?,
            base,
            tls,
            connect_timeout: cfg.connect_timeout,
            timeout: cfg.timeout,
            pool: Arc::new(Pool::default()),
            raw_pool: RawPool::default(),
        })
    }

    /// The request target sent upstream: the device's path and query, unchanged, after the
    /// upstream's base path (none, usually, so the path is reused as it is).
    fn upstream_uri(&self, uri: &http::Uri) -> Result<http::Uri, String> {
        let pq = match (self.base.base_path.is_empty(), uri.path_and_query()) {
            (true, Some(pq)) => pq.clone(),
            (true, None) => http::uri::PathAndQuery::from_static("/"),
            (false, pq) => {
                let tail = pq.map(|p| p.as_str()).unwrap_or("/");
                self.base.path(tail).parse().map_err(|e| format!("{e}"))?
            }
        };
        Ok(http::Uri::from(pq))
    }

    pub fn describe(&self) -> String {
        self.base.to_string()
    }

    /// Idle upstream connections waiting for a device connection.
    pub fn idle_connections(&self) -> usize {
        self.pool.len() + self.raw_pool.len()
    }

    /// A new connection to the upstream, ready for HTTP/1 requests.
    async fn connect(&self) -> Result<Lane, Fail> {
        let io = self.connect_io().await?;
        Lane::handshake(io)
            .await
            .map_err(|e| Fail::Connect(format!("{}: {e}", self.target)))
    }

    /// A new connection to the upstream: TCP, then TLS for an https upstream, each with the
    /// connect deadline.
    async fn connect_io(&self) -> Result<UpIo, Fail> {
        let deadline = self.connect_timeout;
        let tcp = match tokio::time::timeout(deadline, TcpStream::connect(&self.target)).await {
            Err(_) => {
                return Err(Fail::Connect(format!(
                    "{}: no connection within {}",
                    self.target,
                    humantime::format_duration(deadline)
                )));
            }
            Ok(Err(e)) => return Err(Fail::Connect(format!("{}: {e}", self.target))),
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        let io: UpIo = match &self.tls {
            None => Box::new(tcp),
            Some((connector, name)) => {
                match tokio::time::timeout(deadline, connector.connect(name.clone(), tcp)).await {
                    Err(_) => {
                        return Err(Fail::Connect(format!(
                            "{}: no TLS handshake within {}",
                            self.target,
                            humantime::format_duration(deadline)
                        )));
                    }
                    Ok(Err(e)) => {
                        return Err(Fail::Connect(format!("{}: TLS: {e}", self.target)));
                    }
                    Ok(Ok(s)) => Box::new(s),
                }
            }
        };
        Ok(io)
    }

    /// Sends the request on the device connection's lane, a pooled connection or a new one. A
    /// reused connection that turns out to be closed before the request went out is replaced by a
    /// new one, once.
    async fn exchange(
        &self,
        slot: &LaneSlot,
        req: Request<UpBody>,
    ) -> Result<(Response<Incoming>, Option<Lane>), Fail> {
        let reused = slot.take(&self.pool).or_else(|| self.pool.take());
        let (lane, fresh) = match reused {
            Some(l) => (l, false),
            None => (self.connect().await?, true),
        };
        match lane.exchange(req).await {
            Ok(r) => Ok(r),
            Err(SendError::NotSent(why, req)) if !fresh => {
                debug!(upstream = %self.base, %why, "a kept-alive upstream connection was gone; using a new one");
                match self.connect().await?.exchange(*req).await {
                    Ok(r) => Ok(r),
                    Err(SendError::NotSent(why, _)) => Err(Fail::Upstream(why)),
                    Err(SendError::Failed(e)) => Err(Fail::Upstream(error_chain(&e))),
                }
            }
            Err(SendError::NotSent(why, _)) => Err(Fail::Upstream(why)),
            Err(SendError::Failed(e)) => Err(Fail::Upstream(error_chain(&e))),
        }
    }

    /// Sends `req` upstream and returns its answer, or a 502/504 of our own.
    pub async fn forward(
        &self,
        req: Request<Incoming>,
        device: &Arc<DeviceConn>,
    ) -> Response<EdgeBody> {
        let (client_ip, proto) = (device.peer.ip(), device.scheme);
        let (parts, body) = req.into_parts();
        let uri = match self.upstream_uri(&parts.uri) {
            Ok(u) => u,
            Err(e) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot forward this request: {e}"),
                );
            }
        };
        let mut headers = parts.headers;
        let original_host = headers.get(header::HOST).cloned();
        strip_hop_by_hop(&mut headers);
        // The relay already answered the device's Expect; the upstream gets the body straight away.
        headers.remove(header::EXPECT);
        headers.remove(header::HOST);
        append_forwarded_for(&mut headers, client_ip);
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        if let Some(h) = original_host {
            headers.insert(X_FORWARDED_HOST, h);
        }
        headers.insert(header::HOST, self.host.clone());
        // A device log the relay keeps a copy of: tee it on its way, keep it once the upstream
        // took it (2xx).
        let mut verdict = None;
        let body = match device
            .edge
            .log_copy(&parts.method, parts.uri.path(), client_ip)
        {
            Some(mut copy) => {
                verdict = copy.take_verdict();
                UpBody::tee(body, copy)
            }
            None => UpBody::Plain(body),
        };
        let mut up_req = Request::new(body);
        *up_req.method_mut() = parts.method;
        *up_req.uri_mut() = uri;
        *up_req.version_mut() = http::Version::HTTP_11;
        *up_req.headers_mut() = headers;
        let answer = self.exchange(&device.lanes, up_req);
        match tokio::time::timeout(self.timeout, answer).await {
            Err(_) => text_response(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "provisioning server did not answer within {}",
                    humantime::format_duration(self.timeout)
                ),
            ),
            Ok(Err(fail)) => {
                let (why, detail) = match fail {
                    Fail::Connect(d) => ("cannot connect to the provisioning server", d),
                    Fail::Upstream(d) => ("provisioning server failed", d),
                };
                tracing::warn!(upstream = %self.base, error = %detail, "{why}");
                text_response(StatusCode::BAD_GATEWAY, why)
            }
            Ok(Ok((resp, lane))) => {
                if let Some(v) = verdict {
                    let _ = v.send(resp.status().is_success());
                }
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let body = LaneBody::new(body, lane, device.clone());
                Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed())
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Names listed in Connection are hop-by-hop too; most requests carry none.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, ip: IpAddr) {
    let name = X_FORWARDED_FOR;
    let value = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(name, v);
    }
}

/// The provisioning upstream in service, which a reload may replace. Each device connection takes
/// it once, with its generation, and its requests only check the generation: reading that shared
/// number is cheap, while taking the lock and a reference for every request would make the CPUs
/// pass those cache lines back and forth (see `util::shard`).
pub struct UpstreamSlot {
    current: RwLock<Option<Arc<Upstream>>>,
    generation: AtomicU64,
}

impl UpstreamSlot {
    pub(crate) fn new(up: Option<Arc<Upstream>>) -> UpstreamSlot {
        UpstreamSlot {
            current: RwLock::new(up),
            generation: AtomicU64::new(0),
        }
    }

    /// The upstream in service and its generation.
    pub fn get(&self) -> (u64, Option<Arc<Upstream>>) {
        // The generation first: a value newer than its generation only costs a second look.
        let generation = self.generation.load(Ordering::Acquire);
        let up = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (generation, up)
    }

    pub fn set(&self, up: Option<Arc<Upstream>>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = up;
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_end_to_end_ones_stay() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("authorization", "Digest x"),
            ("www-authenticate", "Basic realm=x"),
            (
                "user-agent",
                "FileTransport PolycomVVX-VVX_411-UA/6.4.7.4560 Type/Application",
            ),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "user-agent", "www-authenticate"]);
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.7".parse().unwrap());
        append_forwarded_for(&mut h, "10.0.0.8".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.7, 10.0.0.8");
    }
}
