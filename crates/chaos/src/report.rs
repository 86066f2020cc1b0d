//! What a run records: the faults as they happen (each an event with an id, a start and an end),
//! the promises broken (each naming the seed and the events active when it was seen), and the
//! counters that make up the closing line of figures.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct Event {
    pub id: u64,
    pub kind: &'static str,
    /// `relay-a`, `relay-b`, `cloud`.
    pub target: String,
    pub detail: String,
    pub start: f64,
    pub end: Option<f64>,
}

pub struct Report {
    pub seed: u64,
    t0: Instant,
    events: Mutex<Vec<Event>>,
    violations: Mutex<Vec<String>>,
    counters: Mutex<BTreeMap<&'static str, u64>>,
    pub device_requests: AtomicU64,
    pub device_bytes: AtomicU64,
    pub bad_bytes: AtomicU64,
    /// Times a relay went longer than the watchdog interval without petting it.
    pub wedges: AtomicU64,
}

impl Report {
    pub fn new(seed: u64, t0: Instant) -> Report {
        Report {
            seed,
            t0,
            events: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            counters: Mutex::new(BTreeMap::new()),
            device_requests: AtomicU64::new(0),
            device_bytes: AtomicU64::new(0),
            bad_bytes: AtomicU64::new(0),
            wedges: AtomicU64::new(0),
        }
    }

    /// Seconds since the run started.
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Records the start of a fault; returns its id for [`Report::end`].
    pub fn begin(&self, kind: &'static str, target: &str, detail: String) -> u64 {
        let mut ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let id = ev.len() as u64 + 1;
        let start = self.now();
        println!("chaos: +{start:7.2}s #{id} {kind} {target} {detail}");
        ev.push(Event {
            id,
            kind,
            target: target.to_string(),
            detail,
            start,
            end: None,
        });
        drop(ev);
        *self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
        id
    }

    pub fn end(&self, id: u64) {
        let mut ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.now();
        if let Some(e) = ev.iter_mut().find(|e| e.id == id) {
            e.end = Some(now);
        }
    }

    /// The events whose span (plus `grace` seconds after the end) touches [from, to].
    pub fn events_between(&self, from: f64, to: f64, grace: f64) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|e| e.start <= to && e.end.is_none_or(|end| end + grace >= from))
            .cloned()
            .collect()
    }

    /// A promise broken: recorded with the seed, the time and the faults active then.
    pub fn violation(&self, what: String) {
        let now = self.now();
        let active: Vec<String> = self
            .events_between(now - 1.0, now, 0.0)
            .iter()
            .map(|e| format!("#{} {} {} ({})", e.id, e.kind, e.target, e.detail))
            .collect();
        let active = if active.is_empty() {
            "no fault active".to_string()
        } else {
            format!("during {}", active.join(", "))
        };
        let line = format!("seed {} at +{now:.2}s: {what} ({active})", self.seed);
        println!("chaos: VIOLATION {line}");
        let mut v = self.violations.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() < 1000 {
            v.push(line);
        }
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn count(&self, name: &'static str, n: u64) {
        *self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name)
            .or_default() += n;
    }

    /// Keeps the largest value seen under `name`.
    pub fn max(&self, name: &'static str, v: u64) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let e = c.entry(name).or_default();
        *e = (*e).max(v);
    }

    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn bad_bytes(&self, n: u64) {
        self.bad_bytes.fetch_add(n, Ordering::Relaxed);
    }
}
