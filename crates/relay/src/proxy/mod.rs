//! The device-facing edge (the provisioning proxy job): HTTPS on `[edge].listen` with the PFX
//! certificate, optionally plain HTTP on `legacy_http_listen` for devices inside `[devices].subnets`,
//! and every request that is not a cached image forwarded to `[provisioning].upstream`.
//!
//! Hostile input is stopped here: a cap on open connections (over it: 503 at once), deadlines on the
//! TLS handshake, on reading request headers and on any stall, a header size cap, and path checks
//! before routing. Nothing here caches provisioning answers.

pub mod cert;
mod forward;
mod lane;
pub mod tls;

use crate::config::{Config, EdgeConfig};
use crate::util::paths;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use forward::Upstream;

/// Outgoing TLS bytes buffered per connection.
const TLS_BUFFER: usize = 16 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type EdgeBody = BoxBody<Bytes, BoxError>;

/// A short plain-text answer of the edge's own (errors, refusals).
pub fn text_response(status: StatusCode, text: &str) -> Response<EdgeBody> {
    let body = format!(
        "{} {}: {text}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Counters shown in `ucrelay status`, one copy per thread (see `ops::shard`): read them with
/// `sum`, bump them through `local()`.
pub type EdgeStats = crate::util::shard::Sharded<EdgeCounters>;

#[derive(Default, Debug)]
pub struct EdgeCounters {
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub requests: AtomicU64,
    pub status_2xx: AtomicU64,
    pub status_3xx: AtomicU64,
    pub status_4xx: AtomicU64,
    pub status_5xx: AtomicU64,
    pub bytes_out: AtomicU64,
    pub legacy_forbidden: AtomicU64,
}

/// What the edge runs with; the certificate and the upstream can change on reload.
pub struct Edge {
    pub cfg: EdgeConfig,
    pub cert: Arc<tls::CertSlot>,
    pub upstream: UpstreamSlot,
    pub subnets: Vec<IpNet>,
    pub stats: EdgeStats,
    /// Why the last reload of the certificate was refused, if it was.
    pub reload_error: RwLock<Option<String>>,
    /// The image cache, when the download agent runs: its paths are served here.
    pub images: std::sync::OnceLock<Arc<crate::download::Catalog>>,
    /// The addresses actually bound (a configured port 0 becomes a real port).
    pub bound: std::sync::OnceLock<(SocketAddr, Option<SocketAddr>)>,
}

/// Every failed certificate rule as `rule: message`, for one-line errors.
pub fn refusal(report: &cert::CertReport) -> String {
    report
        .failures()
        .map(|c| format!("{}: {}", c.rule, c.message))
        .collect::<Vec<_>>()
        .join("; ")
}

pub struct EdgeListeners {
    pub tls: TcpListener,
    pub legacy: Option<TcpListener>,
}

impl Edge {
    /// Loads and checks the certificate and prepares the upstream; fails with every broken rule named.
    pub fn new(config: &Config) -> anyhow::Result<Option<Arc<Edge>>> {
        let Some(e) = &config.edge else {
            return Ok(None);
        };
        let report = cert::load(
            &e.pfx,
            e.pfx_password_file.as_deref(),
            &e.fqdn,
            std::time::SystemTime::now(),
        );
        for c in report
            .checks
            .iter()
            .filter(|c| c.level == cert::Level::Warn)
        {
            warn!(rule = %c.rule, "certificate: {}", c.message);
        }
        let Some(loaded) = report.cert else {
            anyhow::bail!(
                "edge.pfx {}: certificate refused: {}",
                e.pfx.display(),
                refusal(&report)
            );
        };
        info!(subject = %loaded.subject, sha256 = %loaded.sha256, "edge certificate loaded");
        let upstream = config
            .provisioning
            .as_ref()
            .map(Upstream::new)
            .transpose()?
            .map(Arc::new);
        Ok(Some(Arc::new(Edge {
            cfg: e.clone(),
            cert: tls::CertSlot::new(loaded),
            upstream: UpstreamSlot::new(upstream),
            subnets: config.devices.subnets.clone(),
            stats: EdgeStats::default(),
            reload_error: RwLock::new(None),
            bound: std::sync::OnceLock::new(),
            images: std::sync::OnceLock::new(),
        })))
    }

    pub async fn bind(&self) -> anyhow::Result<EdgeListeners> {
        use anyhow::Context;
        let tls = TcpListener::bind(self.cfg.listen)
            .await
            .with_context(|| format!("cannot listen on edge.listen {}", self.cfg.listen))?;
        let legacy = match self.cfg.legacy_http_listen {
            None => None,
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen on edge.legacy_http_listen {a}"))?,
            ),
        };
        let _ = self.bound.set((
            tls.local_addr()?,
            legacy.as_ref().map(|l| l.local_addr()).transpose()?,
        ));
        Ok(EdgeListeners { tls, legacy })
    }
}

/// The provisioning upstream in service, which a reload may replace. Each device connection takes
/// it once, with its generation, and its requests only check the generation: reading that shared
/// number is cheap, while taking the lock and a reference for every request would make the CPUs
/// pass those cache lines back and forth (see `ops::shard`).
pub struct UpstreamSlot {
    current: RwLock<Option<Arc<Upstream>>>,
    generation: AtomicU64,
}

impl UpstreamSlot {
    fn new(up: Option<Arc<Upstream>>) -> UpstreamSlot {
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

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Serves both listeners until shutdown, then lets open connections finish their current request
/// (bounded by the daemon's grace period).
pub async fn run(
    edge: Arc<Edge>,
    listeners: EdgeListeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls_cfg = tls::server_config(edge.cert.clone())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_cfg);
    let slots = Arc::new(Semaphore::new(edge.cfg.max_connections));
    let tracker = TaskTracker::new();
    let mut loops = tokio::task::JoinSet::new();
    loops.spawn(accept_loop(
        edge.clone(),
        listeners.tls,
        Some(acceptor),
        slots.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));
    if let Some(l) = listeners.legacy {
        loops.spawn(accept_loop(
            edge.clone(),
            l,
            None,
            slots,
            tracker.clone(),
            shutdown.clone(),
        ));
    }
    while let Some(r) = loops.join_next().await {
        r??;
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

async fn accept_loop(
    edge: Arc<Edge>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    slots: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(listen = %listener.local_addr()?, scheme, "edge listening");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    warn!(error = %e, "edge accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        edge.stats
            .local()
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        let permit = slots.clone().try_acquire_owned().ok();
        let (edge, tls, shutdown) = (edge.clone(), tls.clone(), shutdown.clone());
        tracker.spawn(async move {
            edge.stats
                .local()
                .connections_open
                .fetch_add(1, Ordering::Relaxed);
            connection(&edge, stream, peer, tls, permit.is_some(), shutdown).await;
            edge.stats
                .local()
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

async fn connection(
    edge: &Arc<Edge>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    admitted: bool,
    shutdown: CancellationToken,
) {
    let socket = Arc::new(SocketState::new());
    let io = ActivityIo {
        inner: stream,
        state: socket.clone(),
    };
    let deadline = edge.cfg.header_timeout;
    match tls {
        None => serve_http(edge, io, peer, "http", admitted, socket, shutdown).await,
        Some(acceptor) => match tokio::time::timeout(deadline, acceptor.accept(io)).await {
            Ok(Ok(mut tls_io)) => {
                // rustls buffers up to 64 KiB of outgoing data per connection by default; one
                // record is enough to keep the socket busy and bounds memory per device.
                tls_io.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
                serve_http(edge, tls_io, peer, "https", admitted, socket, shutdown).await
            }
            Ok(Err(e)) => {
                edge.stats
                    .local()
                    .tls_handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%peer, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                edge.stats
                    .local()
                    .tls_handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%peer, "TLS handshake timed out");
            }
        },
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_http<I>(
    edge: &Arc<Edge>,
    mut io: I,
    peer: SocketAddr,
    scheme: &'static str,
    admitted: bool,
    socket: Arc<SocketState>,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if !admitted {
        // Over the connection cap: say so at once rather than leave the device hanging.
        edge.stats
            .local()
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        edge.stats
            .local()
            .status_5xx
            .fetch_add(1, Ordering::Relaxed);
        let msg = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain\r\nContent-Length: 33\r\nConnection: close\r\n\r\n503 relay busy: too many devices\n";
        let _ = tokio::time::timeout(Duration::from_secs(2), io.write_all(msg.as_bytes())).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), io.shutdown()).await;
        return;
    }
    let conn = Arc::new(DeviceConn {
        edge: edge.clone(),
        peer,
        scheme,
        socket: socket.clone(),
        upstream: edge.upstream.get(),
        lanes: lane::LaneSlot::default(),
    });
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(conn, req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(edge.cfg.header_timeout)
        .max_buf_size(edge.cfg.max_header_size)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let idle = edge.cfg.idle_timeout;
    let mut shutting_down = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(%peer, error = %e, "edge connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !shutting_down => {
                // Finish the request in flight, then close.
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep(Duration::from_secs(1).min(idle)) => {
                if socket.idle_for() >= idle {
                    debug!(%peer, "closing a connection idle for {idle:?}");
                    return;
                }
            }
        }
    }
}

/// Routes one request: checks, then the image cache or the upstream.
async fn handle(conn: Arc<DeviceConn>, req: Request<Incoming>) -> Response<EdgeBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mac = device_mac(req.headers());
    let resp = route(&conn, req).await;
    let status = resp.status();
    let stats = conn.edge.stats.local();
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let counter = match status.as_u16() {
        200..=299 => &stats.status_2xx,
        300..=399 => &stats.status_3xx,
        400..=499 => &stats.status_4xx,
        _ => &stats.status_5xx,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    crate::util::metrics::global().edge_request(status.as_u16(), started.elapsed());
    let (parts, body) = resp.into_parts();
    let logged = AccessLogBody {
        inner: body,
        bytes: 0,
        line: Some(AccessLine {
            method: method.to_string(),
            path,
            status: status.as_u16(),
            mac,
            started,
        }),
        conn,
    };
    Response::from_parts(parts, logged.boxed())
}

async fn route(conn: &Arc<DeviceConn>, req: Request<Incoming>) -> Response<EdgeBody> {
    let edge = &conn.edge;
    let peer = conn.peer;
    if conn.scheme == "http" && !edge.subnets.iter().any(|n| n.contains(&peer.ip())) {
        edge.stats
            .local()
            .legacy_forbidden
            .fetch_add(1, Ordering::Relaxed);
        return text_response(
            StatusCode::FORBIDDEN,
            &format!(
                "plain HTTP is only for devices inside [devices].subnets; {} is not",
                peer.ip()
            ),
        );
    }
    let decoded = match paths::check(req.uri().path(), req.uri().query()) {
        Err(paths::PathError::TooLong) => {
            return text_response(StatusCode::URI_TOO_LONG, "request target too long");
        }
        Err(paths::PathError::Bad(why)) => return text_response(StatusCode::BAD_REQUEST, why),
        Ok(p) => p,
    };
    if let Some(images) = edge.images.get() {
        use crate::download::Lookup;
        match images.lookup(&decoded) {
            Lookup::Ready { file, sha256, size } => {
                let socket = Some(conn.socket.clone());
                return crate::download::serve::serve(
                    images, &req, socket, &decoded, &file, &sha256, size,
                )
                .await;
            }
            Lookup::NotReady { done, size } => {
                images
                    .stats
                    .refused_not_synced
                    .fetch_add(1, Ordering::Relaxed);
                let pct = (done * 100).checked_div(size).unwrap_or(0);
                let mut r = text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "{decoded} is still syncing to this relay ({pct}% done); it is served once verified"
                    ),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
                return r;
            }
            Lookup::Unknown => {}
        }
    }
    // The connection's upstream, unless a reload has changed it since the connection started.
    let reloaded;
    let upstream = if conn.upstream.0 == edge.upstream.generation() {
        conn.upstream.1.as_ref()
    } else {
        reloaded = edge.upstream.get().1;
        reloaded.as_ref()
    };
    match upstream {
        Some(up) => up.forward(req, conn).await,
        None => text_response(
            StatusCode::NOT_FOUND,
            "no provisioning upstream is configured on this relay",
        ),
    }
}

/// The MAC from a phone's User-Agent, `... (SN:0004f2e765da) ...`, when present.
fn device_mac(headers: &http::HeaderMap) -> Option<String> {
    let ua = headers.get(header::USER_AGENT)?.to_str().ok()?;
    let rest = &ua[ua.find("(SN:")? + 4..];
    let mac: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    (mac.len() == 12).then(|| mac.to_ascii_lowercase())
}

struct AccessLine {
    method: String,
    path: String,
    status: u16,
    mac: Option<String>,
    started: Instant,
}

/// Passes the response body through, counting bytes, and writes the access log line when the body
/// is done (or the device went away), so the line has the real byte count and duration.
struct AccessLogBody {
    inner: EdgeBody,
    bytes: u64,
    line: Option<AccessLine>,
    conn: Arc<DeviceConn>,
}

impl Body for AccessLogBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(d) = frame.data_ref()
        {
            self.bytes += d.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AccessLogBody {
    fn drop(&mut self) {
        if let Some(l) = self.line.take() {
            self.conn
                .edge
                .stats
                .local()
                .bytes_out
                .fetch_add(self.bytes, Ordering::Relaxed);
            info!(
                target: "ucrelay::access",
                method = %l.method,
                path = %l.path,
                status = l.status,
                bytes = self.bytes,
                duration_ms = l.started.elapsed().as_millis() as u64,
                client = %self.conn.peer.ip(),
                mac = %l.mac.as_deref().unwrap_or("-"),
                "request"
            );
        }
    }
}

/// What a device connection's socket has been doing: when it last moved a byte (for the idle
/// watchdog), and whether its last write found the kernel's send buffer full.
///
/// An image download reads the second to make its next chunk only once the socket has taken
/// what was already written (see `download::serve`). Otherwise hyper queues one more chunk
/// behind the TLS record that is waiting for the socket, and with a thousand slow downloads
/// those idle chunks add up to tens of megabytes. The kernel's send buffer, not ours, is what
/// keeps the wire busy in the meantime.
pub struct SocketState {
    started: Instant,
    last_ms: AtomicU64,
    blocked: AtomicBool,
    unblocked: AtomicWaker,
}

impl SocketState {
    fn new() -> SocketState {
        SocketState {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            blocked: AtomicBool::new(false),
            unblocked: AtomicWaker::new(),
        }
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Ready while the socket takes writes; otherwise wakes the caller once a write goes through.
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.blocked.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.unblocked.register(cx.waker());
        if self.blocked.load(Ordering::Acquire) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.last_ms
                    .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
                if self.blocked.swap(false, Ordering::AcqRel) {
                    self.unblocked.wake();
                }
            }
            Poll::Pending => self.blocked.store(true, Ordering::Release),
            _ => {}
        }
    }
}

/// One device connection: what its requests share. Each request holds a reference to this,
/// which only its own connection touches, instead of references to the edge-wide values, which
/// every connection would touch (see `ops::shard`).
pub struct DeviceConn {
    edge: Arc<Edge>,
    peer: SocketAddr,
    scheme: &'static str,
    /// Paces image bodies.
    pub socket: Arc<SocketState>,
    /// The upstream in service when the connection started, with its generation.
    upstream: (u64, Option<Arc<Upstream>>),
    /// The upstream connection the requests use, kept between them.
    lanes: lane::LaneSlot,
}

/// The device's TCP stream (under TLS, when there is TLS), reporting to its `SocketState`.
struct ActivityIo<T> {
    inner: T,
    state: Arc<SocketState>,
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.last_ms.store(
                self.state.started.elapsed().as_millis() as u64,
                Ordering::Relaxed,
            );
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        self.state.wrote(&r);
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.state.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Flag(AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn socket_state_blocks_until_a_write_goes_through() {
        use tokio::io::AsyncReadExt;
        let (near, mut far) = tokio::io::duplex(4096);
        let state = Arc::new(SocketState::new());
        let mut io = ActivityIo {
            inner: near,
            state: state.clone(),
        };
        let woken = Arc::new(Flag(AtomicBool::new(false)));
        let waker = std::task::Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(
            state.poll_writable(&mut cx).is_ready(),
            "a fresh socket takes writes"
        );
        // Fill the pipe until a write is refused.
        let chunk = [7u8; 1024];
        let mut refused = false;
        for _ in 0..16 {
            if Pin::new(&mut io).poll_write(&mut cx, &chunk).is_pending() {
                refused = true;
                break;
            }
        }
        assert!(refused, "the 4 KiB pipe filled up");
        assert!(state.poll_writable(&mut cx).is_pending());
        assert!(!woken.0.load(Ordering::SeqCst));
        // The peer reads; the next write goes through and wakes whoever waited.
        let mut sink = vec![0u8; 4096];
        far.read_exact(&mut sink).await.unwrap();
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, &chunk),
            Poll::Ready(Ok(1024))
        ));
        assert!(woken.0.load(Ordering::SeqCst), "the waiting body was woken");
        assert!(state.poll_writable(&mut cx).is_ready());
        assert!(state.idle_for() < Duration::from_secs(5));
    }

    #[test]
    fn mac_from_user_agent() {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::USER_AGENT,
            "FileTransport PolycomSoundStationIP-SSIP_5000-UA/4.0.3.7562 (SN:0004F2E765DA) Type/Application".parse().unwrap(),
        );
        assert_eq!(device_mac(&h).as_deref(), Some("0004f2e765da"));
        h.insert(header::USER_AGENT, "curl/8.0".parse().unwrap());
        assert_eq!(device_mac(&h), None);
    }
}
