//! Prometheus metrics, `/healthz` and `/ready` on `[admin].metrics_listen`.
//!
//! A deliberately small registry: counters, gauges and histograms on atomics, rendered in the
//! Prometheus text format (0.0.4). Two kinds of series:
//!
//! - **owned**: a [`Counter`], [`Gauge`], [`Histogram`] or [`CounterVec`] that code updates as
//!   things happen (`metrics::global().commands.inc(&[...])`);
//! - **collected**: a closure read at scrape time, for numbers some module already keeps (the
//!   status board, the edge's counters, the image catalog). Adding one is one line, e.g. for the
//!   device plane:
//!
//!   ```ignore
//!   registry.gauge_fn("ucrelay_devices_online", "Devices that answered their last poll", move || online.load() as f64);
//!   ```
//!
//! The registry is process-wide ([`global`]): one relay per process, and code deep in a module
//! (the store, the edge's request path) can count without threading a handle through.

use super::shard::Sharded;
use crate::ctx::{ChannelState, Ctx, Registration};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

/// Label pairs, in a fixed order.
pub type Labels = Vec<(&'static str, String)>;

#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge holding an f64 (stored as bits).
#[derive(Default, Debug)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A counter per label set (small, known cardinality: command names × results).
#[derive(Default, Debug)]
pub struct CounterVec(Mutex<BTreeMap<Vec<(&'static str, String)>, u64>>);

impl CounterVec {
    pub fn inc(&self, labels: &[(&'static str, &str)]) {
        let key = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert(0) += 1;
    }
    fn samples(&self) -> Vec<(Labels, f64)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v as f64))
            .collect()
    }
}

/// A histogram with fixed upper bounds (seconds); the sum is kept in microseconds. Sharded, since
/// the edge observes one for every request (see `shard`).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    shards: Sharded<HistogramShard>,
}

#[derive(Debug)]
struct HistogramShard {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// Request latency buckets, 1 ms to 30 s.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            shards: Sharded::new(|| HistogramShard {
                buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
                count: AtomicU64::new(0),
                sum_us: AtomicU64::new(0),
            }),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let shard = self.shards.local();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            shard.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        shard.count.fetch_add(1, Ordering::Relaxed);
        shard
            .sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &Labels) {
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self
                .shards
                .iter()
                .map(|s| s.buckets[i].load(Ordering::Relaxed))
                .sum::<u64>();
            let mut l = labels.clone();
            l.push(("le", fmt_value(*b)));
            let _ = writeln!(out, "{name}_bucket{} {cumulative}", fmt_labels(&l));
        }
        let count = self.shards.sum(|s| &s.count);
        let mut l = labels.clone();
        l.push(("le", "+Inf".into()));
        let _ = writeln!(out, "{name}_bucket{} {count}", fmt_labels(&l));
        let sum = self.shards.sum(|s| &s.sum_us) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{} {}", fmt_labels(labels), fmt_value(sum));
        let _ = writeln!(out, "{name}_count{} {count}", fmt_labels(labels));
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

type Collect = Box<dyn Fn() -> Vec<(Labels, f64)> + Send + Sync>;

enum Source {
    Samples(Collect),
    Histograms(Box<dyn Fn() -> Vec<(Labels, Arc<Histogram>)> + Send + Sync>),
}

struct Family {
    name: String,
    help: String,
    kind: Kind,
    source: Source,
}

/// The families to render, in registration order.
#[derive(Default)]
pub struct Registry {
    families: Mutex<Vec<Family>>,
}

impl Registry {
    fn add(&self, name: &str, help: &str, kind: Kind, source: Source) {
        let mut f = self.families.lock().unwrap_or_else(|e| e.into_inner());
        // Registering again (a second relay in one process, a test) replaces the family.
        f.retain(|x| x.name != name);
        f.push(Family {
            name: name.into(),
            help: help.into(),
            kind,
            source,
        });
    }

    /// A gauge read at scrape time.
    pub fn gauge_fn(&self, name: &str, help: &str, f: impl Fn() -> f64 + Send + Sync + 'static) {
        self.add(
            name,
            help,
            Kind::Gauge,
            Source::Samples(Box::new(move || vec![(Vec::new(), f())])),
        );
    }

    /// Gauges with labels, read at scrape time.
    pub fn gauges_fn(
        &self,
        name: &str,
        help: &str,
        f: impl Fn() -> Vec<(Labels, f64)> + Send + Sync + 'static,
    ) {
        self.add(name, help, Kind::Gauge, Source::Samples(Box::new(f)));
    }

    /// A counter read at scrape time (a number some module already counts). `name` ends in
    /// `_total`.
    pub fn counter_fn(&self, name: &str, help: &str, f: impl Fn() -> u64 + Send + Sync + 'static) {
        self.add(
            name,
            help,
            Kind::Counter,
            Source::Samples(Box::new(move || vec![(Vec::new(), f() as f64)])),
        );
    }

    /// Counters with labels, read at scrape time.
    pub fn counters_fn(
        &self,
        name: &str,
        help: &str,
        f: impl Fn() -> Vec<(Labels, u64)> + Send + Sync + 'static,
    ) {
        self.add(
            name,
            help,
            Kind::Counter,
            Source::Samples(Box::new(move || {
                f().into_iter().map(|(l, v)| (l, v as f64)).collect()
            })),
        );
    }

    /// An owned counter.
    pub fn counter(&self, name: &str, help: &str) -> Arc<Counter> {
        let c = Arc::new(Counter::default());
        let r = c.clone();
        self.counter_fn(name, help, move || r.get());
        c
    }

    /// An owned gauge.
    pub fn gauge(&self, name: &str, help: &str) -> Arc<Gauge> {
        let g = Arc::new(Gauge::default());
        let r = g.clone();
        self.gauge_fn(name, help, move || r.get());
        g
    }

    /// An owned counter per label set.
    pub fn counter_vec(&self, name: &str, help: &str) -> Arc<CounterVec> {
        let c = Arc::new(CounterVec::default());
        let r = c.clone();
        self.add(
            name,
            help,
            Kind::Counter,
            Source::Samples(Box::new(move || r.samples())),
        );
        c
    }

    /// Histograms with labels (a fixed set, created up front).
    pub fn histograms(&self, name: &str, help: &str, series: Vec<(Labels, Arc<Histogram>)>) {
        self.add(
            name,
            help,
            Kind::Histogram,
            Source::Histograms(Box::new(move || series.clone())),
        );
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for f in families.iter() {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            match &f.source {
                Source::Samples(collect) => {
                    for (labels, v) in collect() {
                        let _ = writeln!(out, "{}{} {}", f.name, fmt_labels(&labels), fmt_value(v));
                    }
                }
                Source::Histograms(collect) => {
                    for (labels, h) in collect() {
                        h.render(&mut out, &f.name, &labels);
                    }
                }
            }
        }
        out
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn fmt_labels(labels: &Labels) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// The relay's own instruments that code updates as things happen.
pub struct Metrics {
    pub registry: Registry,
    /// Command and task results stored, by command name and result.
    pub commands: Arc<CounterVec>,
    /// Edge request latency (time to the response head), by status class.
    edge_latency: [Arc<Histogram>; 4],
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::default();
        let commands = registry.counter_vec(
            "ucrelay_commands_total",
            "Command and task results stored, by command name and result",
        );
        let edge_latency = std::array::from_fn(|_| Arc::new(Histogram::new(LATENCY_BOUNDS)));
        registry.histograms(
            "ucrelay_edge_request_duration_seconds",
            "Device requests on the edge: time until the response head, by status class",
            CLASSES
                .iter()
                .zip(&edge_latency)
                .map(|(c, h)| (vec![("class", (*c).to_string())], h.clone()))
                .collect(),
        );
        Metrics {
            registry,
            commands,
            edge_latency,
        }
    }

    /// Records one edge request's latency under its status class.
    pub fn edge_request(&self, status: u16, latency: Duration) {
        let i = match status {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            _ => 3,
        };
        self.edge_latency[i].observe(latency);
    }
}

const CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Registers the series read from the running relay's state at scrape time.
pub fn register_relay(ctx: &Ctx) {
    let r = &global().registry;
    let l = |k: &'static str, v: &str| vec![(k, v.to_string())];

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
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                    ("revision", crate::util::build::revision().to_string()),
                ],
                1.0,
            )]
        },
    );
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
                (l("result", "ok"), s.heartbeats_ok),
                (l("result", "failed"), s.heartbeats_failed),
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
        "ucrelay_results_sent_total",
        "Results acknowledged by the cloud",
        move || c.status.lock().results_sent,
    );

    if let Some(edge) = &ctx.edge {
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
                    (l("class", "2xx"), s.sum(|c| &c.status_2xx)),
                    (l("class", "3xx"), s.sum(|c| &c.status_3xx)),
                    (l("class", "4xx"), s.sum(|c| &c.status_4xx)),
                    (l("class", "5xx"), s.sum(|c| &c.status_5xx)),
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
            move || unix_secs(e.cert.current().not_after),
        );
    }

    if let Some(cat) = &ctx.images {
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
}

/// Whether the relay is ready to serve: registered, and (with an edge) the edge bound.
pub fn readiness(ctx: &Ctx) -> Result<(), String> {
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

/// The address the metrics listener bound (a configured port 0 becomes a real port).
pub fn bound() -> Option<std::net::SocketAddr> {
    BOUND.get().copied()
}

/// Binds the metrics listener (before the daemon reports ready).
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind admin.metrics_listen {addr}"))?;
    if let Ok(a) = listener.local_addr() {
        let _ = BOUND.set(a);
    }
    Ok(listener)
}

/// Serves `/metrics`, `/healthz` and `/ready` until shutdown.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Ctx,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use axum::{Router, extract::State, http::StatusCode, http::header, routing::get};
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
    async fn ready(State(ctx): State<Ctx>) -> (StatusCode, String) {
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
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|e| anyhow::anyhow!("metrics server failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let r = Registry::default();
        let c = r.counter("t_events_total", "Events");
        c.add(3);
        let g = r.gauge("t_level", "Level");
        g.set(1.5);
        let v = r.counter_vec("t_cmds_total", "Commands");
        v.inc(&[("name", "ping"), ("result", "success")]);
        v.inc(&[("name", "ping"), ("result", "success")]);
        let h = Arc::new(Histogram::new(&[0.1, 1.0]));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        r.histograms(
            "t_latency_seconds",
            "Latency",
            vec![(vec![("class", "2xx".into())], h)],
        );
        r.gauges_fn("t_q", "Quoted", || vec![(vec![("k", "a\"b".into())], 1.0)]);
        let text = r.render();
        for want in [
            "# TYPE t_events_total counter\nt_events_total 3\n",
            "t_level 1.5\n",
            "t_cmds_total{name=\"ping\",result=\"success\"} 2\n",
            "t_latency_seconds_bucket{class=\"2xx\",le=\"0.1\"} 1\n",
            "t_latency_seconds_bucket{class=\"2xx\",le=\"1\"} 2\n",
            "t_latency_seconds_bucket{class=\"2xx\",le=\"+Inf\"} 3\n",
            "t_latency_seconds_sum{class=\"2xx\"} 5.55\n",
            "t_latency_seconds_count{class=\"2xx\"} 3\n",
            "t_q{k=\"a\\\"b\"} 1\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // Registering a name again replaces it rather than duplicating the family.
        r.gauge_fn("t_level", "Level", || 2.0);
        let text = r.render();
        assert_eq!(text.matches("# TYPE t_level gauge").count(), 1, "{text}");
    }
}
