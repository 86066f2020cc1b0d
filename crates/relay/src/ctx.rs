//! `Ctx`: the services every long-lived job shares: the validated config, the store, the cloud
//! connector and session, the artifact store and the device log store, and the status board the
//! management agent keeps. Cheap to clone.
//!
//! It carries services, never a job's own state: each job's state reaches it once, as the argument
//! of its `run(ctx, state, shutdown)`, so no job can reach into another through `Ctx`.

use crate::artifacts::Artifacts;
use crate::cloud::{CloudClient, Sessions};
use crate::config::{Config, DevicesConfig};
use crate::devlogs::DeviceLogs;
use crate::store::Store;
use crate::util::live::Live;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};
use tokio::sync::Notify;

#[derive(Clone)]
pub struct Ctx {
    /// The configuration the relay started with. What a reload can change while running lives
    /// with the job that uses it (`devices_cfg` here, the edge's limits, the image cache's); what
    /// it cannot (`[cloud]`, `[admin]`, `state_dir`) is read from here.
    pub config: Arc<Config>,
    /// `[devices]` as in force: the device plane, the edge's legacy listener and the download
    /// agent's address checks all read the same subnets, which a reload replaces.
    pub devices_cfg: Arc<Live<DevicesConfig>>,
    pub store: Store,
    pub cloud: CloudClient,
    /// The cloud session (bearer token) the management agent keeps; other jobs use its token.
    pub sessions: Arc<Sessions>,
    pub relay_id: Arc<str>,
    pub hostname: Arc<str>,
    pub status: Arc<StatusBoard>,
    /// Wakes the results sender when a result lands in the outbox (whoever stored it).
    pub results_wake: Arc<Notify>,
    pub started: Instant,
    pub started_at: SystemTime,
    /// Files waiting for upload to the cloud (captures, exports).
    pub artifacts: Arc<Artifacts>,
    /// Device logs the relay keeps while the cloud does not take them.
    pub device_logs: Arc<DeviceLogs>,
}

impl Ctx {
    pub fn new(
        config: Config,
        devices_cfg: Arc<Live<DevicesConfig>>,
        store: Store,
        cloud: CloudClient,
        relay_id: String,
        artifacts: Arc<Artifacts>,
        device_logs: Arc<DeviceLogs>,
    ) -> Ctx {
        Ctx {
            artifacts,
            device_logs,
            config: Arc::new(config),
            devices_cfg,
            store,
            cloud,
            sessions: Arc::new(Sessions::new()),
            relay_id: relay_id.into(),
            hostname: hostname().into(),
            status: Arc::new(StatusBoard::default()),
            results_wake: Arc::new(Notify::new()),
            started: Instant::now(),
            started_at: SystemTime::now(),
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
    /// Commands answered `busy` (queue full), neither stored nor acknowledged.
    pub commands_busy: u64,
    pub channel_errors_sent: u64,
    pub results_sent: u64,
    /// Results the cloud refused as malformed (moved aside, not retried).
    pub results_rejected: u64,
    pub last_results_error: Option<String>,
    /// The site the cloud placed this relay in, from the last heartbeat answer.
    pub site: Option<crate::protocol::SiteInfo>,
    /// The addresses the relay reported in its last registration or heartbeat.
    pub addresses: Vec<String>,
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
