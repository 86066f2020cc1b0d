//! `/metrics`, `/healthz` and `/ready` on `[admin].metrics_listen`: the series read from the running
//! relay at scrape time, registered next to the owned ones in `util::metrics`.

use super::Running;
use crate::cache::Catalog;
use crate::ctx::{ChannelState, Registration};
use crate::edge::Edge;
use crate::util::memory::{Heap, Process, heap, process};
use crate::util::metrics::{Labels, Registry, global};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Registers the series read from the running relay's state at scrape time.
pub fn register_relay(ctx: &Running) {
    let r = &global().registry;
    register_process(r, ctx);
    register_devices(r, ctx);
    register_cloud(r, ctx);
    if let Some(edge) = &ctx.edge {
        register_edge(r, edge);
    }
    if let Some(cat) = &ctx.images {
        register_images(r, cat);
    }
}

fn label(k: &'static str, v: &str) -> Labels {
    vec![(k, v.to_string())]
}

/// One reading of `/proc/self` and of the allocator, shared by the gauges of a scrape (each gauge
/// is read on its own; mallinfo2 takes every arena's lock).
fn snapshot() -> Option<(Process, Option<Heap>)> {
    static LAST: Mutex<Option<(Instant, Process, Option<Heap>)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, p, h)) = *last
        && at.elapsed() < Duration::from_secs(1)
    {
        return Some((p, h));
    }
    let (p, h) = (process()?, heap());
    *last = Some((Instant::now(), p, h));
    Some((p, h))
}

/// Uptime, build, and the process's memory, threads and files (the names Prometheus's client
/// libraries give them), with the allocator's own account beside the RSS (glibc only): a leak
/// raises `ucrelay_heap_in_use_bytes`; fragmentation raises the RSS and the free bytes, not it.
fn register_process(r: &Registry, ctx: &Running) {
    let read = |f: fn(&Process) -> Option<u64>| {
        move || {
            snapshot()
                .and_then(|(p, _)| f(&p))
                .map_or(f64::NAN, |v| v as f64)
        }
    };
    if let Some((p, h)) = snapshot() {
        r.gauge_fn(
            "process_resident_memory_bytes",
            "Resident memory (VmRSS), bytes",
            read(|p| Some(p.resident)),
        );
        r.gauge_fn(
            "process_virtual_memory_bytes",
            "Virtual memory (VmSize), bytes",
            read(|p| Some(p.virtual_size)),
        );
        r.gauge_fn("process_threads", "Threads", read(|p| Some(p.threads)));
        if p.open_fds.is_some() {
            r.gauge_fn(
                "process_open_fds",
                "Open file descriptors",
                read(|p| p.open_fds),
            );
        }
        if h.is_some() {
            let heap = |f: fn(&Heap) -> u64| {
                move || {
                    snapshot()
                        .and_then(|(_, h)| h)
                        .map_or(f64::NAN, |h| f(&h) as f64)
                }
            };
            r.gauge_fn(
                "ucrelay_heap_in_use_bytes",
                "Bytes the allocator has handed out and not had back (live data)",
                heap(|h| h.in_use),
            );
            r.gauge_fn(
                "ucrelay_heap_free_bytes",
                "Free bytes the allocator keeps in its arenas",
                heap(|h| h.free),
            );
        }
    }
    let started = unix_secs(ctx.started_at);
    r.gauge_fn(
        "process_start_time_seconds",
        "When the relay started, seconds since the Unix epoch",
        move || started,
    );
    let c = ctx.clone();
    r.gauge_fn(
        "ucrelay_up_seconds",
        "Seconds since the relay started",
        move || c.started.elapsed().as_secs_f64(),
    );
    r.gauges_fn(
        "ucrelay_build_info",
        "Always 1; the labels carry the version and git revision",
        move || {
            vec![(
                vec![
                    ("version", crate::util::build::VERSION.to_string()),
                    ("revision", crate::util::build::revision().to_string()),
                ],
                1.0,
            )]
        },
    );
}

/// Device and task counts from the device plane.
fn register_devices(r: &Registry, ctx: &Running) {
    for (name, help, pick) in [
        (
            "ucrelay_devices_known",
            "Devices the relay knows (cloud list and commands)",
            0u8,
        ),
        (
            "ucrelay_devices_online",
            "Devices that answered their last poll",
            1,
        ),
        (
            "ucrelay_devices_offline",
            "Devices that did not answer their last poll",
            2,
        ),
    ] {
        let c = ctx.clone();
        r.gauge_fn(name, help, move || {
            let n = c.devices.registry.counts();
            [n.known, n.online, n.offline][usize::from(pick)] as f64
        });
    }
    for (name, help, pick) in [
        (
            "ucrelay_tasks_scheduled",
            "Tasks waiting for their start time",
            0u8,
        ),
        ("ucrelay_tasks_executing", "Tasks running now", 1),
        (
            "ucrelay_tasks_finished",
            "Tasks done, halted, cancelled or rejected",
            2,
        ),
    ] {
        let c = ctx.clone();
        r.gauge_fn(name, help, move || {
            let t = c.devices.tasks.counts();
            [t.scheduled, t.executing, t.done][usize::from(pick)] as f64
        });
    }
    let c = ctx.clone();
    r.gauge_fn(
        "ucrelay_device_polls_since_start",
        "Device polls since the relay started",
        move || {
            c.devices
                .registry
                .polls
                .load(std::sync::atomic::Ordering::Relaxed) as f64
        },
    );
}

/// The management agent's link to the cloud, from its status board.
fn register_cloud(r: &Registry, ctx: &Running) {
    let c = ctx.clone();
    r.gauge_fn(
        "ucrelay_cloud_registered",
        "1 when the relay is registered with the cloud",
        move || {
            f64::from(u8::from(
                c.status.lock().registration == Registration::Registered,
            ))
        },
    );
    let c = ctx.clone();
    r.gauge_fn(
        "ucrelay_cloud_channel_up",
        "1 when the command channel (WebSocket) is connected",
        move || f64::from(u8::from(c.status.lock().channel == ChannelState::Connected)),
    );
    let c = ctx.clone();
    r.counters_fn(
        "ucrelay_heartbeats_total",
        "Heartbeats sent to the cloud, by result",
        move || {
            let s = c.status.lock();
            vec![
                (label("result", "ok"), s.heartbeats_ok),
                (label("result", "failed"), s.heartbeats_failed),
            ]
        },
    );
    let c = ctx.clone();
    r.counter_fn(
        "ucrelay_cloud_reconnects_total",
        "Command channel reconnects",
        move || c.status.lock().reconnects,
    );
    let c = ctx.clone();
    r.counter_fn(
        "ucrelay_cloud_registrations_total",
        "Successful registrations with the cloud",
        move || c.status.lock().registrations,
    );
    let c = ctx.clone();
    r.counter_fn(
        "ucrelay_commands_received_total",
        "Commands received on the channel",
        move || c.status.lock().commands_received,
    );
    let c = ctx.clone();
    r.counter_fn(
        "ucrelay_commands_busy_total",
        "Commands answered busy on the channel because the command queue was full",
        move || c.status.lock().commands_busy,
    );
    let c = ctx.clone();
    r.counter_fn(
        "ucrelay_results_sent_total",
        "Results acknowledged by the cloud",
        move || c.status.lock().results_sent,
    );
}

/// The edge's counters and certificate.
fn register_edge(r: &Registry, edge: &Arc<Edge>) {
    let e = edge.clone();
    r.gauge_fn(
        "ucrelay_edge_connections_open",
        "Device connections open on the edge",
        move || e.stats.sum(|c| &c.connections_open) as f64,
    );
    let e = edge.clone();
    r.counters_fn(
        "ucrelay_edge_requests_total",
        "Device requests answered by the edge, by status class",
        move || {
            let s = &e.stats;
            vec![
                (label("class", "2xx"), s.sum(|c| &c.status_2xx)),
                (label("class", "3xx"), s.sum(|c| &c.status_3xx)),
                (label("class", "4xx"), s.sum(|c| &c.status_4xx)),
                (label("class", "5xx"), s.sum(|c| &c.status_5xx)),
            ]
        },
    );
    let e = edge.clone();
    r.counter_fn(
        "ucrelay_edge_tls_handshake_failures_total",
        "TLS handshakes that failed on the edge",
        move || e.stats.sum(|c| &c.tls_handshake_failures),
    );
    let e = edge.clone();
    r.gauge_fn(
        "ucrelay_certificate_not_after_seconds",
        "Expiry of the edge certificate in service (Unix time)",
        move || {
            e.cert
                .current()
                .map_or(0.0, |s| unix_secs(s.cert.not_after))
        },
    );
}

/// The image cache.
fn register_images(r: &Registry, cat: &Arc<Catalog>) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = cat.clone();
    r.counter_fn(
        "ucrelay_image_bytes_synced_total",
        "Image bytes downloaded from the cloud",
        move || c.stats.bytes_fetched.load(Relaxed),
    );
    let c = cat.clone();
    r.counter_fn(
        "ucrelay_image_bytes_served_total",
        "Image bytes served to devices",
        move || c.stats.bytes_served.load(Relaxed),
    );
    let c = cat.clone();
    r.gauge_fn(
        "ucrelay_image_downloads_active",
        "Devices downloading an image from the edge now",
        move || c.stats.downloads_active.load(Relaxed) as f64,
    );
    let c = cat.clone();
    r.gauges_fn(
        "ucrelay_image_state",
        "1 for each image's current state (synced, syncing, failed)",
        move || {
            c.report()
                .images
                .into_iter()
                .map(|i| (vec![("image", i.id), ("state", i.state)], 1.0))
                .collect()
        },
    );
    let c = cat.clone();
    r.gauges_fn(
        "ucrelay_image_bytes",
        "Bytes of each image on disk (done) and listed (total)",
        move || {
            c.report()
                .images
                .into_iter()
                .flat_map(|i| {
                    [
                        (
                            vec![("image", i.id.clone()), ("kind", "done".into())],
                            i.bytes_done as f64,
                        ),
                        (
                            vec![("image", i.id), ("kind", "total".into())],
                            i.bytes_total as f64,
                        ),
                    ]
                })
                .collect()
        },
    );
}

/// Whether the relay is ready to serve: registered, and (with an edge) the edge bound.
pub fn readiness(ctx: &Running) -> Result<(), String> {
    let st = ctx.status.snapshot();
    match &st.registration {
        Registration::Registered => {}
        Registration::Starting => return Err("not registered with the cloud yet".into()),
        Registration::Rejected(why) => return Err(format!("PIN rejected by cloud: {why}")),
        Registration::Failed(why) => return Err(format!("not registered: {why}")),
    }
    if let Some(e) = &ctx.edge
        && e.bound.get().is_none()
    {
        return Err("the edge is not serving yet".into());
    }
    Ok(())
}

static BOUND: OnceLock<std::net::SocketAddr> = OnceLock::new();

/// Connections the metrics listener serves at once; one more is closed at accept. A scraper
/// needs one; the rest of the cap is room for a few people with curl.
pub const MAX_CONNECTIONS: usize = 32;
/// Deadline for each request head, which also closes a keep-alive connection left idle.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a metrics connection may stay open, whatever it does.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(60);

/// The address the metrics listener bound (a configured port 0 becomes a real port).
pub fn bound() -> Option<std::net::SocketAddr> {
    BOUND.get().copied()
}

/// Binds the metrics listener (before the daemon reports ready). It has no authentication, so a
/// bind beyond loopback is logged as a warning.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind admin.metrics_listen {addr}"))?;
    if let Ok(a) = listener.local_addr() {
        let _ = BOUND.set(a);
    }
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "{}", beyond_loopback(addr));
    }
    Ok(listener)
}

/// What `bind` and `ucrelay check` say about metrics served beyond loopback.
pub fn beyond_loopback(addr: std::net::SocketAddr) -> String {
    format!(
        "admin.metrics_listen {addr} is beyond loopback and has no authentication: whoever reaches it reads the relay's metrics; bind it to 127.0.0.1 or a management network"
    )
}

/// Serves `/metrics`, `/healthz` and `/ready` until shutdown: at most [`MAX_CONNECTIONS`] at
/// once, each request head within [`HEADER_TIMEOUT`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Running,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use axum::{Router, extract::State, http::StatusCode, http::header, routing::get};
    use hyper_util::rt::{TokioIo, TokioTimer};
    async fn metrics() -> impl axum::response::IntoResponse {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            global().registry.render(),
        )
    }
    async fn healthz() -> &'static str {
        "ok\n"
    }
    async fn ready(State(ctx): State<Running>) -> (StatusCode, String) {
        match readiness(&ctx) {
            Ok(()) => (StatusCode::OK, "ready\n".into()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        }
    }
    register_relay(&ctx);
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/ready", get(ready))
        .with_state(ctx);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics connection cap reached; closed at accept");
            continue;
        };
        let (app, shutdown) = (app.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _slot = slot;
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true);
            let conn = b.serve_connection(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(app),
            );
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = tokio::time::sleep(CONNECTION_DEADLINE) => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.as_mut()).await;
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
    Ok(())
}
