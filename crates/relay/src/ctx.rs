//! `Ctx`: what every long-lived task shares (config, store, cloud client, the live status board).
//! Cheap to clone.

use crate::cloud::CloudClient;
use crate::config::Config;
use crate::store::Store;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};
use tokio::sync::Notify;

#[derive(Clone)]
pub struct Ctx {
    pub config: Arc<Config>,
    pub store: Store,
    pub cloud: CloudClient,
    pub relay_id: Arc<str>,
    pub hostname: Arc<str>,
    pub status: Arc<StatusBoard>,
    /// Wakes the results sender when a result lands in the outbox.
    pub outbox_wake: Arc<Notify>,
    pub started: Instant,
    pub started_at: SystemTime,
    /// The cloud session (token) the management agent keeps; other jobs borrow its token.
    pub sessions: Arc<crate::agent::Sessions>,
    /// The download agent's catalog, when `[images]` is configured.
    pub images: Option<Arc<crate::cache::Catalog>>,
    /// The device plane (commands, tasks, monitoring); inert when `[devices]` is absent.
    pub devices: Arc<crate::devices::DevicePlane>,
    /// The device-facing edge, when `[edge]` is configured.
    pub edge: Option<Arc<crate::edge::Edge>>,
    /// Asks the daemon to reload config and certificate; the answer comes back on the oneshot.
    pub reload: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<ReloadOutcome>>,
}

/// What a reload did, line by line, and whether everything asked for was applied.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReloadOutcome {
    pub ok: bool,
    pub messages: Vec<String>,
}

/// The optional jobs' shared state, handed to [`Ctx::new`].
pub struct Jobs {
    pub images: Option<Arc<crate::cache::Catalog>>,
    pub devices: Arc<crate::devices::DevicePlane>,
    pub edge: Option<Arc<crate::edge::Edge>>,
}

impl Ctx {
    pub fn new(
        config: Config,
        store: Store,
        cloud: CloudClient,
        relay_id: String,
        jobs: Jobs,
        reload: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<ReloadOutcome>>,
    ) -> Ctx {
        Ctx {
            config: Arc::new(config),
            store,
            cloud,
            relay_id: relay_id.into(),
            hostname: hostname().into(),
            status: Arc::new(StatusBoard::default()),
            outbox_wake: Arc::new(Notify::new()),
            started: Instant::now(),
            started_at: SystemTime::now(),
            sessions: Arc::new(crate::agent::Sessions::new()),
            images: jobs.images,
            devices: jobs.devices,
            edge: jobs.edge,
            reload,
        }
    }
}

/// The machine's name. /proc/sys is hidden under the unit's `ProcSubset=pid`, so /etc/hostname is
/// the fallback.
pub fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Live state of the management agent, written by its loops and read by the admin API.
/// A std mutex: it is held only to copy or set a few fields, never across an `.await`.
#[derive(Default)]
pub struct StatusBoard {
    inner: Mutex<AgentStatus>,
}

impl StatusBoard {
    pub fn lock(&self) -> MutexGuard<'_, AgentStatus> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> AgentStatus {
        self.lock().clone()
    }
}

#[derive(Debug, Clone, Default)]
pub struct AgentStatus {
    pub registration: Registration,
    pub registered_at: Option<SystemTime>,
    pub registrations: u64,
    pub channel: ChannelState,
    pub channel_since: Option<SystemTime>,
    pub session_id: Option<String>,
    pub reconnects: u64,
    pub last_heartbeat: Option<(SystemTime, Result<(), String>)>,
    pub heartbeats_ok: u64,
    pub heartbeats_failed: u64,
    pub heartbeat_interval_s: u64,
    pub commands_received: u64,
    pub channel_errors_sent: u64,
    pub results_sent: u64,
    /// Results the cloud refused as malformed (moved aside, not retried).
    pub results_rejected: u64,
    pub last_results_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum Registration {
    #[default]
    Starting,
    Registered,
    /// The cloud refused the tenant ID or PIN: retried slowly, shown plainly.
    Rejected(String),
    /// Any other failure (network, cloud error, PIN file unreadable).
    Failed(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum ChannelState {
    /// No channel without a registration.
    #[default]
    WaitingForRegistration,
    Connecting,
    Connected,
    Disconnected(String),
}
