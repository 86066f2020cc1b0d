//! The configuration file as written: serde types that mirror the TOML, every key optional unless
//! the file cannot mean anything without it, unknown keys rejected. Nothing here is trusted;
//! `validate` turns it into the typed `Config`.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) state_dir: PathBuf,
    pub(super) cloud: RawCloud,
    pub(super) admin: Option<RawAdmin>,
    pub(super) edge: Option<RawEdge>,
    pub(super) provisioning: Option<RawProvisioning>,
    pub(super) images: Option<RawImages>,
    pub(super) devices: Option<RawDevices>,
    pub(super) diagnostics: Option<RawDiagnostics>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCloud {
    pub(super) url: String,
    pub(super) tenant_id: String,
    pub(super) pin: Option<String>,
    pub(super) pin_file: Option<PathBuf>,
    pub(super) heartbeat_interval: Option<String>,
    pub(super) proxy: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) ping_interval: Option<String>,
    pub(super) pin_retry_interval: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) request_timeout: Option<String>,
    pub(super) reconnect_max: Option<String>,
    pub(super) addresses: Option<Vec<String>>,
    pub(super) command_queue: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) socket: Option<PathBuf>,
    pub(super) metrics_listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEdge {
    pub(super) listen: Option<String>,
    pub(super) fqdn: Vec<String>,
    pub(super) pfx: Option<PathBuf>,
    pub(super) pfx_password_file: Option<PathBuf>,
    pub(super) legacy_http_listen: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_connections_per_ip: Option<usize>,
    pub(super) header_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) max_header_size: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvisioning {
    pub(super) upstream: String,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) timeout: Option<String>,
    pub(super) connect_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawImages {
    pub(super) dir: Option<PathBuf>,
    pub(super) max_images: Option<u32>,
    pub(super) max_total: Option<String>,
    pub(super) bandwidth_limit: Option<String>,
    pub(super) parallel: Option<usize>,
    pub(super) max_downloads: Option<usize>,
    pub(super) min_free: Option<String>,
    pub(super) sync_interval: Option<String>,
    pub(super) sync_window: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDevices {
    pub(super) subnets: Option<Vec<String>>,
    pub(super) poll_interval: Option<String>,
    pub(super) admin_password: Option<String>,
    pub(super) admin_password_file: Option<PathBuf>,
    pub(super) scheme: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) request_timeout: Option<String>,
    pub(super) poll_concurrency: Option<usize>,
    pub(super) task_concurrency: Option<usize>,
    pub(super) target_timeout: Option<String>,
    pub(super) monitoring: Option<bool>,
    pub(super) stats_interval: Option<String>,
    pub(super) identity: Option<String>,
    pub(super) max_sessions: Option<usize>,
    pub(super) task_retention: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiagnostics {
    pub(super) artifacts_max_total: Option<String>,
    pub(super) device_logs_max_per_device: Option<String>,
    pub(super) device_logs_max_total: Option<String>,
    pub(super) device_logs_keep: Option<String>,
}
