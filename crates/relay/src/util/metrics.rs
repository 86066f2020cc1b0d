//! The metrics registry: counters, gauges and histograms on atomics, rendered in the Prometheus
//! text format (0.0.4), and the process-wide instruments code updates as things happen.
//!
//! Two kinds of series:
//!
//! - **owned**: a [`Counter`], [`Gauge`], [`Histogram`] or [`CounterVec`] that code updates as
//!   things happen (`metrics::global().commands.inc(&[...])`);
//! - **collected**: a closure read at scrape time, for numbers some part of the relay already keeps
//!   (the status board, the edge's counters, the image cache); `ops::metrics` registers those.
//!
//! The registry is process-wide ([`global`]): one relay per process, and code deep in a module
//! (the store, the edge's request path) can count without threading a handle through. Serving it
//! over HTTP is `ops::metrics`'s job.

use super::shard::Sharded;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

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
