//! The device-facing edge: the one HTTP server devices talk to. It owns the listeners (HTTPS on
//! `[edge].listen` with the PFX certificate, plain HTTP on `legacy_http_listen` for devices inside
//! `[devices].subnets`), TLS, the limits, routing, the body types and each connection's socket
//! state. Three handlers sit under it and never import one another: [`images`] serves verified
//! files from the image cache, [`uploads`] takes the files devices deliver into one-time slots of
//! the artifact store (packet captures), [`provisioning`] forwards everything else to
//! `[provisioning].upstream` (teeing device logs into the device log store when the relay keeps
//! them). A connection is first served by the provisioning handler's direct path
//! ([`provisioning::direct`]: a bodiless GET or HEAD forwarded by the edge's own HTTP/1 code, the
//! bulk of provisioning traffic); the first request it does not take hands the connection to the
//! general server (hyper) and the router, which answer everything else.
//!
//! Hostile input is stopped here: caps on open connections in total and per client address,
//! taken at accept so TLS handshakes count (over them: 503 at once, see [`admission`]); the legacy
//! listener closes a client outside the device subnets at accept, before reading a byte;
//! deadlines on the TLS handshake, on reading request headers and on any stall; a header size
//! cap; and path checks before routing. Nothing here caches provisioning answers.

pub mod admission;
pub mod body;
pub mod cert;
pub mod cloudcert;
pub mod conn;
pub mod images;
pub mod provisioning;
mod router;
pub mod tls;
pub mod uploads;

use crate::config::{Config, DevicesConfig, EdgeConfig};
use crate::util::live::Live;
use conn::{ActivityIo, DeviceConn, SocketState};
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use provisioning::{Upstream, UpstreamSlot};
use router::handle;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Outgoing TLS bytes buffered per connection.
const TLS_BUFFER: usize = 16 * 1024;

/// Counters shown in `ucrelay status`, one copy per thread (see `util::shard`): read them with
/// `sum`, bump them through `local()`.
pub type EdgeStats = crate::util::shard::Sharded<EdgeCounters>;

#[derive(Default, Debug)]
pub struct EdgeCounters {
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Of those, refused by the per-client cap.
    pub connections_refused_per_ip: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub requests: AtomicU64,
    pub status_2xx: AtomicU64,
    pub status_3xx: AtomicU64,
    pub status_4xx: AtomicU64,
    pub status_5xx: AtomicU64,
    pub bytes_out: AtomicU64,
    pub legacy_forbidden: AtomicU64,
}

/// What the edge runs with; the certificate, the upstream, the limits and the device subnets can
/// change on reload.
pub struct Edge {
    /// `[edge]` as in force: the listen addresses are the ones bound at start; the limits are read
    /// per connection, so a reload applies them to new connections.
    cfg: Live<EdgeConfig>,
    pub cert: Arc<tls::CertSlot>,
    pub upstream: UpstreamSlot,
    /// `[devices]` as in force (its subnets decide who may use the legacy listener).
    pub devices: Arc<Live<DevicesConfig>>,
    /// The connection slots.
    pub admission: Arc<admission::Admission>,
    pub stats: EdgeStats,
    /// Why the last reload of the certificate was refused, if it was.
    pub reload_error: RwLock<Option<String>>,
    /// What became of the last certificate the cloud pushed when it is not the one serving
    /// (refused, or kept behind a local `edge.pfx`).
    pub cloud_cert_note: RwLock<Option<String>>,
    /// Where the cloud's certificate is kept (`<state_dir>/cloud-cert`).
    pub state_dir: std::path::PathBuf,
    /// The image cache, when the download agent runs: its paths are served here.
    pub images: std::sync::OnceLock<Arc<crate::cache::Catalog>>,
    /// The addresses actually bound (a configured port 0 becomes a real port).
    pub bound: std::sync::OnceLock<(SocketAddr, Option<SocketAddr>)>,
    /// The artifact store, for device uploads into its slots.
    pub artifacts: std::sync::OnceLock<Arc<crate::artifacts::Artifacts>>,
    /// The device log store, which keeps copies of device logs while the cloud does not take them.
    pub logs: std::sync::OnceLock<Arc<crate::devlogs::DeviceLogs>>,
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
    pub fn new(
        config: &Config,
        devices: Arc<Live<DevicesConfig>>,
    ) -> anyhow::Result<Option<Arc<Edge>>> {
        let Some(e) = &config.edge else {
            return Ok(None);
        };
        let now = std::time::SystemTime::now();
        let slot = match &e.pfx {
            Some(pfx) => {
                let report = cert::load(pfx, e.pfx_password_file.as_deref(), &e.fqdn, now);
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
                        pfx.display(),
                        refusal(&report)
                    );
                };
                info!(subject = %loaded.subject, sha256 = %loaded.sha256, "edge certificate loaded");
                tls::CertSlot::new(loaded, tls::CertSource::File(pfx.clone()))
            }
            None => match cloudcert::load_stored(&config.state_dir, &e.fqdn, now) {
                Some((loaded, source)) => {
                    info!(subject = %loaded.subject, sha256 = %loaded.sha256, %source, "edge certificate loaded (uploaded in the cloud)");
                    tls::CertSlot::new(loaded, source)
                }
                None => {
                    info!("no edge.pfx: HTTPS waits for the certificate uploaded in the cloud");
                    tls::CertSlot::empty()
                }
            },
        };
        let upstream = config
            .provisioning
            .as_ref()
            .map(Upstream::new)
            .transpose()?
            .map(Arc::new);
        Ok(Some(Arc::new(Edge {
            cfg: Live::new(e.clone()),
            cert: slot,
            upstream: UpstreamSlot::new(upstream),
            devices,
            admission: Arc::default(),
            stats: EdgeStats::default(),
            reload_error: RwLock::new(None),
            cloud_cert_note: RwLock::new(None),
            state_dir: config.state_dir.clone(),
            bound: std::sync::OnceLock::new(),
            images: std::sync::OnceLock::new(),
            artifacts: std::sync::OnceLock::new(),
            logs: std::sync::OnceLock::new(),
        })))
    }

    /// The base URL devices reach this edge at: `https://<first fqdn>[:port]` (the bound port).
    pub fn public_base(&self) -> Option<String> {
        let port = self.bound.get()?.0.port();
        let cfg = self.cfg();
        let host = cfg.fqdn.first()?;
        Some(if port == 443 {
            format!("https://{host}")
        } else {
            format!("https://{host}:{port}")
        })
    }

    /// A copy of a device log upload (`PUT .../<mac>-app.log`) when the relay keeps device logs,
    /// the sender is inside the device subnets and the device has not reached its cap.
    pub(crate) fn log_copy(
        &self,
        method: &http::Method,
        path: &str,
        peer: std::net::IpAddr,
    ) -> Option<crate::devlogs::LogUpload> {
        if method != http::Method::PUT {
            return None;
        }
        let logs = self.logs.get()?;
        if !logs.collecting() || !self.devices.get().allows(peer.to_canonical()) {
            return None;
        }
        let (mac, kind) = crate::devlogs::log_upload_name(path)?;
        logs.begin(&mac, kind, peer)
    }

    /// `[edge]` as in force now.
    pub fn cfg(&self) -> Arc<EdgeConfig> {
        self.cfg.get()
    }

    /// Installs `[edge]` as a reload left it (the caller keeps what needs a restart as it was).
    pub fn set_cfg(&self, cfg: EdgeConfig) {
        self.cfg.set(cfg);
    }

    pub async fn bind(&self) -> anyhow::Result<EdgeListeners> {
        use anyhow::Context;
        let cfg = self.cfg();
        let tls = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on edge.listen {}", cfg.listen))?;
        let legacy = match cfg.legacy_http_listen {
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

/// Serves both listeners until shutdown, then lets open connections finish their current request
/// (bounded by the daemon's grace period).
pub async fn run(
    edge: Arc<Edge>,
    listeners: EdgeListeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls_cfg = tls::server_config(edge.cert.clone())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_cfg);
    let tracker = TaskTracker::new();
    let mut loops = tokio::task::JoinSet::new();
    loops.spawn(accept_loop(
        edge.clone(),
        listeners.tls,
        Some(acceptor),
        tracker.clone(),
        shutdown.clone(),
    ));
    if let Some(l) = listeners.legacy {
        loops.spawn(accept_loop(
            edge.clone(),
            l,
            None,
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
    tracker: TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    if tls.is_some() && edge.cert.current().is_none() {
        // Devices get nothing rather than a failed handshake until a certificate passed.
        info!(listen = %listener.local_addr()?, "edge HTTPS bound; waiting for the certificate uploaded in the cloud before serving");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = edge.cert.filled() => {}
        }
    }
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
        edge.stats
            .local()
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        // Plain HTTP is for the device subnets only: anyone else is closed before a byte is read.
        if tls.is_none() && !edge.devices.get().allows(peer.ip().to_canonical()) {
            edge.stats
                .local()
                .legacy_forbidden
                .fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "plain HTTP from outside [devices].subnets: closed at accept");
            drop(stream);
            continue;
        }
        let cfg = edge.cfg();
        let admitted =
            edge.admission
                .admit(peer.ip(), cfg.max_connections, cfg.max_connections_per_ip);
        let (slot, refusal, turn) = match admitted {
            Ok(slot) => (Some(slot), None, None),
            Err(why) => {
                let st = edge.stats.local();
                st.connections_refused.fetch_add(1, Ordering::Relaxed);
                if why == admission::Refusal::PerIp {
                    st.connections_refused_per_ip
                        .fetch_add(1, Ordering::Relaxed);
                }
                match edge.admission.tell() {
                    Some(turn) => {
                        st.status_5xx.fetch_add(1, Ordering::Relaxed);
                        (None, Some(why), Some(turn))
                    }
                    None => {
                        // Too many refusals in flight already: no handshake, no answer.
                        drop(stream);
                        continue;
                    }
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let (edge, tls, shutdown) = (edge.clone(), tls.clone(), shutdown.clone());
        tracker.spawn(async move {
            edge.stats
                .local()
                .connections_open
                .fetch_add(1, Ordering::Relaxed);
            connection(&edge, stream, peer, tls, refusal, shutdown).await;
            edge.stats
                .local()
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
            drop((slot, turn));
        });
    }
}

async fn connection(
    edge: &Arc<Edge>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    refusal: Option<admission::Refusal>,
    shutdown: CancellationToken,
) {
    let socket = Arc::new(SocketState::new());
    let io = ActivityIo {
        inner: stream,
        state: socket.clone(),
    };
    let deadline = edge.cfg().header_timeout;
    match tls {
        None => serve_http(edge, io, peer, "http", refusal, socket, shutdown).await,
        Some(acceptor) => match tokio::time::timeout(deadline, acceptor.accept(io)).await {
            Ok(Ok(mut tls_io)) => {
                // rustls buffers up to 64 KiB of outgoing data per connection by default; one
                // record is enough to keep the socket busy and bounds memory per device.
                tls_io.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
                serve_http(edge, tls_io, peer, "https", refusal, socket, shutdown).await
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
    refusal: Option<admission::Refusal>,
    socket: Arc<SocketState>,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if let Some(why) = refusal {
        // Over a connection cap: say so at once rather than leave the device hanging.
        let msg = why.answer();
        let _ = tokio::time::timeout(Duration::from_secs(2), io.write_all(msg.as_bytes())).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), io.shutdown()).await;
        return;
    }
    let cfg = edge.cfg();
    let conn = Arc::new(DeviceConn {
        edge: edge.clone(),
        peer,
        scheme,
        socket: socket.clone(),
        upstream: edge.upstream.get(),
        lanes: provisioning::LaneSlot::default(),
    });
    // The usual request goes the direct path; the first one that path does not take hands the
    // connection, with what was read of it, to the general server below.
    let io = if conn.upstream.1.is_some() {
        // Boxed: its state (upstream connect, TLS, the body relay) is freed at the hand-off instead
        // of sizing every connection's task, image downloads included.
        let direct = Box::pin(provisioning::direct::serve(
            &conn,
            io,
            &shutdown,
            cfg.header_timeout,
            cfg.max_header_size,
        ));
        match watch_idle(direct, &socket, cfg.idle_timeout).await {
            Some(provisioning::direct::Served::Handoff(io)) => io,
            Some(provisioning::direct::Served::Closed) => return,
            None => {
                debug!(%peer, "closing a connection idle for {:?}", cfg.idle_timeout);
                return;
            }
        }
    } else {
        provisioning::direct::Rewind::new(Vec::new(), io)
    };
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(conn, req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .max_buf_size(cfg.max_header_size)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let idle = cfg.idle_timeout;
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

/// Runs `work` while the connection moves bytes; `None` once it has been idle for `idle`.
async fn watch_idle<F: std::future::Future>(
    work: F,
    socket: &SocketState,
    idle: Duration,
) -> Option<F::Output> {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            out = work.as_mut() => return Some(out),
            _ = tokio::time::sleep(Duration::from_secs(1).min(idle)) => {
                if socket.idle_for() >= idle {
                    return None;
                }
            }
        }
    }
}
