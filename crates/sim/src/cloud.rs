//! `ucrelay sim cloud`: the reference cloud, over plain HTTP, that the relay is developed and
//! tested against.
//!
//! It implements the cloud side of the relay-to-cloud protocol v1 (`crate::protocol`) the way a
//! real cloud would: registration with tenant ID + PIN (with the old/new PIN grace window and the
//! reset cooldown), bearer tokens, heartbeats (active/inactive), the WebSocket command channel,
//! results with de-duplication, plus a JSON test API under `/sim/` to drive it and look inside,
//! and fault injection to test the relay's handling of a broken cloud. State can be kept in a JSON
//! file across restarts.
//!
//! With `--provisioning DIR` it also serves the tenant's provisioning tree on the same listener:
//! every path outside `/relay/` and `/sim/` is a file of DIR, behind Basic/Digest authentication
//! as `PlcmSpIp`/`PlcmSpIp`, with PUT uploads (see `provisioning`).
//!
//! With `--images DIR` it publishes every regular file of DIR as one image and serves the files
//! under `/files/<name>` with Range support, plus test hooks to corrupt, throttle or fail them
//! (see `images`).
//!
//! It speaks plain HTTP on `--listen`; with `--tls-listen` (and a PEM certificate and key) it
//! serves the same API over HTTPS on a second address too, so that tests can run it as another
//! origin than the cloud's (a CDN the manifest points at, a canary that must never see the
//! relay's token).
//!
//! Artifacts (`/relay/v1/artifacts`) are taken in resumable chunks and kept beside the state
//! file; the test API lists them and hands their bytes back (see `artifacts`). The tenant's
//! `log_upload` setting (`/sim/tenants/{tenant}/settings`) reaches relays in heartbeat answers.
//!
//! Tasks (`/sim/tasks`) go to the relay as `task` commands on the channel and show the state and
//! totals the relay reports back in its results; the tenant's device list (`/sim/devices`) is
//! served at `GET /relay/v1/devices` with its revision in every heartbeat answer; device-status
//! batches keep each device's latest report and every alarm.
//!
//! Layout: this file holds the public API, the listener and shutdown; `state` the data and the
//! pure rules; `api` the HTTP handlers; `devices` the device plane's handlers (tasks, device
//! lists, device status); `channel` the WebSocket side; `provisioning` the provisioning tree;
//! `images` the image catalog and file server.

mod api;
mod artifacts;
mod assign;
mod certificates;
mod channel;
mod devices;
mod fleet;
mod images;
mod provisioning;
mod state;

use anyhow::Context as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Options of `ucrelay sim cloud`.
#[derive(clap::Args, Debug, Clone)]
pub struct CloudArgs {
    /// Address to listen on (plain HTTP); port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: String,
    /// The tenant this cloud serves.
    #[arg(long)]
    pub tenant: String,
    /// The tenant's PIN; used only when the state file does not know the tenant yet.
    #[arg(long)]
    pub pin: String,
    /// Directory whose regular files are published as images, one file each, downloadable under
    /// /files/<name>. Created when missing.
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Directory served as the tenant's provisioning tree: every path outside /relay/ and /sim/,
    /// behind Basic/Digest auth PlcmSpIp/PlcmSpIp, with PUT uploads. Created when missing.
    #[arg(long, value_name = "DIR")]
    pub provisioning: Option<PathBuf>,
    /// JSON file keeping tenants, relays, tokens, commands and results across restarts.
    #[arg(long, value_name = "FILE")]
    pub state_file: Option<PathBuf>,
    /// How long the previous PIN stays valid after a reset.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub pin_grace: Duration,
    /// Minimum time between two PIN resets of a tenant.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub pin_reset_cooldown: Duration,
    /// A relay without a heartbeat for this long is shown as inactive.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub inactive_after: Duration,
    /// Heartbeat interval asked of relays (whole seconds, at least 1).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Also serve everything over HTTPS on this address (needs --tls-cert and --tls-key).
    #[arg(long, value_name = "ADDR", requires_all = ["tls_cert", "tls_key"])]
    pub tls_listen: Option<String>,
    /// PEM certificate chain for --tls-listen.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-listen.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

impl CloudArgs {
    /// The command line's defaults for everything but tenant and PIN (for the demo and tests).
    pub fn new(tenant: &str, pin: &str) -> CloudArgs {
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            args: CloudArgs,
        }
        <Wrap as clap::Parser>::try_parse_from(["cloud", "--tenant", tenant, "--pin", pin])
            .expect("tenant and PIN are the only required flags")
            .args
    }
}

/// A running cloud. Dropping it without [`CloudHandle::shutdown`] stops it too, without waiting.
pub struct CloudHandle {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    tracker: TaskTracker,
}

impl CloudHandle {
    /// Stops accepting, closes every open connection including WebSocket channels, writes the
    /// state file, and returns when all of that is done (the port can then be bound again).
    pub async fn shutdown(self) -> anyhow::Result<()> {
        info!(addr = %self.addr, "sim cloud shutting down");
        self.shared.cancel.cancel();
        self.tracker.close();
        // Every task watches the cancel token and ends within a few seconds (connections get
        // SHUTDOWN_GRACE); the bound here only keeps a bug from hanging the caller forever.
        if tokio::time::timeout(Duration::from_secs(15), self.tracker.wait())
            .await
            .is_err()
        {
            warn!("sim cloud: some connections did not close within 15s");
        }
        self.shared.persist_latest().await
    }
}

impl Drop for CloudHandle {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

/// How long an open HTTP connection gets to finish its request once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A second, HTTPS listener: the socket and the TLS acceptor to put in front of the API.
pub struct TlsListener {
    pub listener: TcpListener,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsListener {
    /// Binds `addr` and loads the PEM certificate chain and key.
    pub async fn bind(
        addr: &str,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> anyhow::Result<TlsListener> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("cannot read --tls-cert {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("bad certificate in {}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("cannot read --tls-key {}", key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("certificate and key do not go together")?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on --tls-listen {addr}"))?;
        Ok(TlsListener {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        })
    }
}

/// Starts the cloud on an already-bound listener. Loads `--state-file` when it exists (a corrupt
/// one is an error naming the file) and writes it at once when it does not.
pub async fn start(listener: TcpListener, args: CloudArgs) -> anyhow::Result<CloudHandle> {
    start_with_tls(listener, None, args).await
}

/// [`start`], also serving the API over HTTPS on `tls`.
pub async fn start_with_tls(
    listener: TcpListener,
    tls: Option<TlsListener>,
    args: CloudArgs,
) -> anyhow::Result<CloudHandle> {
    anyhow::ensure!(!args.tenant.trim().is_empty(), "--tenant must not be empty");
    anyhow::ensure!(!args.pin.is_empty(), "--pin must not be empty");
    let addr = listener
        .local_addr()
        .context("listener has no local address")?;

    let loaded = match args.state_file.clone() {
        Some(path) => tokio::task::spawn_blocking(move || state::load(&path))
            .await
            .context("state loader")??,
        None => None,
    };
    let from_file = loaded.is_some();
    let mut persisted = loaded.unwrap_or_default();
    if persisted.tenants.contains_key(&args.tenant) {
        info!(tenant = %args.tenant, "tenant PIN taken from the state file (--pin is ignored once the state file exists)");
    } else {
        persisted
            .tenants
            .insert(args.tenant.clone(), state::Tenant::new(args.pin.clone()));
    }
    if from_file {
        info!(
            relays = persisted.relays.len(),
            commands = persisted.commands.len(),
            results = persisted.results.len(),
            "sim cloud state loaded"
        );
    }

    let prov = match args.provisioning.clone() {
        Some(dir) => Some(
            tokio::task::spawn_blocking(move || provisioning::Provisioning::open(&dir))
                .await
                .context("provisioning tree")??,
        ),
        None => None,
    };

    let images = images::Images::open(args.images.clone()).await?;
    let artifact_files = artifacts::ArtifactFiles::open(args.state_file.as_deref())?;

    let cancel = CancellationToken::new();
    let shared = Arc::new(Shared {
        args: args.clone(),
        prov,
        images,
        artifact_files,
        cancel: cancel.clone(),
        tracker: TaskTracker::new(),
        rt: Mutex::new(Runtime {
            db: state::Db::new(persisted),
            generation: 1,
            channels: HashMap::new(),
            channel_errors: Vec::new(),
            fault: api::FaultMode::None,
            next_conn_id: 1,
            prov_log: VecDeque::new(),
            image_faults: images::ImageFaults::default(),
            image_counters: HashMap::new(),
            channel_down: HashMap::new(),
            started_at: SystemTime::now(),
            shares: HashMap::new(),
            reporters: HashMap::new(),
            artifact_faults: artifacts::ArtifactFaults::default(),
            busy: HashMap::new(),
            limits: api::Limits::default(),
        }),
        written: tokio::sync::Mutex::new(0),
        connections: std::sync::atomic::AtomicU64::new(0),
    });
    // Written now so that the PIN given on the first start is the one kept from then on, and so
    // that an unwritable state file is reported at start, not at the first registration.
    shared.persist_latest().await?;

    let router = api::router(shared.clone());
    let tracker = shared.tracker.clone();
    if let Some(t) = tls {
        if let Ok(a) = t.listener.local_addr() {
            info!(addr = %a, "sim cloud serving HTTPS too");
        }
        tracker.spawn(accept_loop(
            t.listener,
            Some(t.acceptor),
            router.clone(),
            shared.clone(),
        ));
    }
    tracker.spawn(accept_loop(listener, None, router, shared.clone()));
    tracker.spawn(flusher(shared.clone()));
    tracker.spawn(lease_keeper(shared.clone()));
    info!(%addr, tenant = %args.tenant, "sim cloud started");
    Ok(CloudHandle {
        addr,
        shared,
        tracker,
    })
}

/// CLI entry: binds `--listen`, prints the readiness line, runs until SIGINT/SIGTERM.
pub async fn main(args: CloudArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let tls = match (&args.tls_listen, &args.tls_cert, &args.tls_key) {
        (Some(addr), Some(cert), Some(key)) => Some(TlsListener::bind(addr, cert, key).await?),
        _ => None,
    };
    let tls_addr = tls.as_ref().and_then(|t| t.listener.local_addr().ok());
    let handle = start_with_tls(listener, tls, args).await?;
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "ucrelay sim cloud listening on http://{}", handle.addr)?;
        if let Some(a) = tls_addr {
            writeln!(out, "ucrelay sim cloud listening on https://{a}")?;
        }
        out.flush()?;
    }
    wait_for_signal().await?;
    handle.shutdown().await
}

pub(crate) async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("cannot watch SIGINT")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("cannot watch Ctrl-C")?;
    Ok(())
}

/// State shared by every handler and task of one cloud.
pub(crate) struct Shared {
    pub args: CloudArgs,
    /// Cancelled at shutdown; every task and connection watches it.
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
    /// The provisioning tree, when `--provisioning` is given.
    pub prov: Option<provisioning::Provisioning>,
    /// The image catalog (empty without `--images`).
    pub images: Arc<images::Images>,
    /// Where artifact bytes are kept (beside the state file).
    pub artifact_files: artifacts::ArtifactFiles,
    rt: Mutex<Runtime>,
    /// Highest `Runtime::generation` known to be in the state file. A tokio mutex so that writes
    /// happen one at a time, in order, without blocking the runtime.
    written: tokio::sync::Mutex<u64>,
    /// TCP connections accepted since start, on either listener (`GET /sim/stats`).
    pub connections: std::sync::atomic::AtomicU64,
}

/// Everything behind the one lock: the persisted data and what lives only while running.
pub(crate) struct Runtime {
    pub db: state::Db,
    /// Bumped on every change worth writing to the state file.
    pub generation: u64,
    /// The open channel of each relay (at most one).
    pub channels: HashMap<String, channel::ChannelConn>,
    pub channel_errors: Vec<channel::ChannelErrorEntry>,
    pub fault: api::FaultMode,
    pub next_conn_id: u64,
    /// The last provisioning requests, oldest first (`GET /sim/provisioning/log`).
    pub prov_log: VecDeque<provisioning::LogEntry>,
    /// Test hooks of `/files` (`POST /sim/images/faults`); not persisted.
    pub image_faults: images::ImageFaults,
    /// Per-file download counters by file name (`GET /sim/images`); not persisted.
    pub image_counters: HashMap<String, images::FileCounters>,
    /// When each relay's channel last went down (a relay never connected since the start counts
    /// as down since `started_at`).
    pub channel_down: HashMap<String, SystemTime>,
    pub started_at: SystemTime,
    /// Each tenant's monitoring shares, recomputed when their inputs change.
    pub shares: HashMap<String, assign::ShareCache>,
    /// Per device address, how many reports each relay sent since the start (not persisted):
    /// shows that every device is polled by one relay.
    pub reporters: HashMap<String, std::collections::BTreeMap<String, u64>>,
    /// Test hooks of artifact uploads (`POST /sim/artifacts/faults`); not persisted.
    pub artifact_faults: artifacts::ArtifactFaults,
    /// Relays that answered `busy`, and until when their commands wait (not persisted).
    pub busy: HashMap<String, channel::BusyBackoff>,
    /// Per-record size limits of results and device status (`POST /sim/limits`).
    pub limits: api::Limits,
}

impl Runtime {
    /// Marks the state as changed; returns the generation to pass to [`Shared::persist`].
    pub fn changed(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }
}

impl Shared {
    /// The lock cannot stay poisoned: a panic elsewhere must not take the whole cloud down.
    pub fn lock(&self) -> MutexGuard<'_, Runtime> {
        self.rt.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    /// Makes sure the state file holds at least generation `generation`. Writes are serialised;
    /// a write already done by someone else with a newer snapshot counts (group commit).
    pub async fn persist(&self, generation: u64) -> anyhow::Result<()> {
        let Some(path) = self.args.state_file.clone() else {
            return Ok(());
        };
        let mut written = self.written.lock().await;
        if *written >= generation {
            return Ok(());
        }
        let (snapshot, at) = {
            let rt = self.lock();
            (
                serde_json::to_vec_pretty(&rt.db.p).context("cannot serialise the cloud state")?,
                rt.generation,
            )
        };
        tokio::task::spawn_blocking(move || state::write_atomic(&path, &snapshot))
            .await
            .context("state writer")??;
        *written = at;
        Ok(())
    }

    /// Writes the state file if anything changed since the last write.
    pub async fn persist_latest(&self) -> anyhow::Result<()> {
        let generation = self.lock().generation;
        self.persist(generation).await
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: axum::Router,
    shared: Arc<Shared>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                shared
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let (router, cancel) = (router.clone(), shared.cancel.clone());
                match tls.clone() {
                    None => {
                        shared
                            .tracker
                            .spawn(serve_connection(stream, peer, router, cancel));
                    }
                    Some(acceptor) => {
                        shared.tracker.spawn(async move {
                            let handshake = tokio::time::timeout(
                                Duration::from_secs(10),
                                acceptor.accept(stream),
                            );
                            match handshake.await {
                                Ok(Ok(tls)) => serve_connection(tls, peer, router, cancel).await,
                                Ok(Err(e)) => {
                                    debug!(%peer, error = %e, "sim cloud: TLS handshake failed")
                                }
                                Err(_) => debug!(%peer, "sim cloud: TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
            Err(e) => {
                // Typically out of file descriptors: pause instead of spinning on the error.
                warn!(error = %e, "sim cloud: accept failed");
                tokio::select! {
                    _ = shared.cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    // `listener` is dropped here: the port is free once shutdown returns.
}

async fn serve_connection<I>(
    stream: I,
    peer: SocketAddr,
    router: axum::Router,
    cancel: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let conn = builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router))
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(%peer, error = %e, "sim cloud: connection ended with an error");
            }
        }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            // Past the grace the connection is dropped, which closes the socket.
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await;
        }
    }
}

/// Writes changes that are not written at once (heartbeats, counters) at most once a second.
async fn flusher(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => break,
            _ = tick.tick() => {
                if let Err(e) = shared.persist_latest().await {
                    warn!(error = %format!("{e:#}"), "sim cloud: cannot write the state file");
                }
            }
        }
    }
}

/// Takes back the leases of relays that went silent and hands their targets on, checking a few
/// times per `--inactive-after` (at most once a second, at least every 100 ms).
async fn lease_keeper(shared: Arc<Shared>) {
    let every =
        (shared.args.inactive_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => break,
            _ = tick.tick() => {
                let generation = {
                    let mut rt = shared.lock();
                    let now = shared.now();
                    let deliver = rt.expire_leases(now, shared.args.inactive_after);
                    if deliver.is_empty() {
                        continue;
                    }
                    for idx in deliver {
                        rt.deliver_command(idx);
                    }
                    rt.changed()
                };
                if let Err(e) = shared.persist(generation).await {
                    warn!(error = %format!("{e:#}"), "sim cloud: cannot write the state file");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
