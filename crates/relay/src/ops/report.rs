//! The status report: what `ucrelay status` shows and the admin API serves. The JSON types are shared
//! by the daemon (which builds them) and the CLI (which renders them), so both always agree.

use super::Running;
use crate::cache::CatalogReport;
use crate::config::Config;
use crate::ctx::{AgentStatus, ChannelState, Registration};
use crate::util::text::printable;
use crate::util::time::rfc3339;
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub relay_id: String,
    pub hostname: String,
    pub started_at: String,
    pub uptime_s: u64,
    /// True when `problems` is empty.
    pub healthy: bool,
    /// Every unhealthy item, each in plain words with what to check.
    pub problems: Vec<String>,
    /// Things to act on soon that do not make the relay unhealthy (a certificate near expiry).
    pub warnings: Vec<String>,
    pub cloud: CloudReport,
    /// The device-facing edge, when configured.
    pub edge: Option<EdgeReport>,
    /// The image cache, when the download agent runs.
    pub images: Option<crate::cache::CatalogReport>,
    /// Device plane totals (known / online / offline devices, tasks by state).
    #[serde(default)]
    pub devices: Option<DevicesReport>,
    pub jobs: Vec<JobReport>,
    /// The store: whether it takes writes, and why not.
    #[serde(default)]
    pub store: Option<StoreReport>,
    /// Where `/metrics`, `/healthz` and `/ready` are served (the bound address), when configured.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// This relay's place in the tenant's fleet.
    #[serde(default)]
    pub fleet: Option<FleetReport>,
    /// What the relay keeps for support work: artifacts waiting for upload, device logs.
    #[serde(default)]
    pub diagnostics: Option<DiagnosticsReport>,
    /// Settings the config file changes that the running relay applies only after a restart
    /// (as found by the last reload).
    #[serde(default)]
    pub restart_needed: Vec<String>,
    /// The process's memory: resident, and the allocator's account of it.
    #[serde(default)]
    pub memory: Option<MemoryReport>,
}

/// What the relay holds in memory. `heap_in_use_bytes` is live data (it rises with a leak);
/// `resident_bytes` adds code, stacks and the free space the allocator keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryReport {
    pub resident_bytes: u64,
    pub heap_in_use_bytes: Option<u64>,
    pub heap_free_bytes: Option<u64>,
    pub threads: u64,
    #[serde(default)]
    pub open_fds: Option<u64>,
}

impl MemoryReport {
    pub fn now() -> Option<MemoryReport> {
        let p = crate::util::memory::process()?;
        let h = crate::util::memory::heap();
        Some(MemoryReport {
            resident_bytes: p.resident,
            heap_in_use_bytes: h.map(|h| h.in_use),
            heap_free_bytes: h.map(|h| h.free),
            threads: p.threads,
            open_fds: p.open_fds,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiagnosticsReport {
    /// Files waiting for upload to the cloud, their bytes, and the cap.
    pub artifacts_pending: u64,
    pub artifacts_bytes: u64,
    pub artifacts_max_total: u64,
    pub artifacts_uploaded: u64,
    pub artifact_upload_error: Option<String>,
    /// True while the cloud does not take device logs and the relay keeps them.
    pub device_logs_collecting: bool,
    pub device_logs_devices: u64,
    pub device_logs_bytes: u64,
    /// Devices whose log collection stopped at the per-device cap.
    pub device_logs_capped: Vec<String>,
}

impl DiagnosticsReport {
    fn build(ctx: &Running, found: &mut Findings) -> DiagnosticsReport {
        let a = ctx.artifacts.summary();
        let l = ctx.device_logs.report();
        let capped: Vec<String> = l
            .devices
            .iter()
            .filter(|d| d.capped_at.is_some())
            .map(|d| d.mac.clone())
            .collect();
        if a.bytes.saturating_mul(10) >= a.max_total.saturating_mul(8) {
            found.warnings.push(format!(
                "artifact store {}% full ({} files waiting for upload): new captures and exports fail once it is full",
                a.bytes.saturating_mul(100).checked_div(a.max_total).unwrap_or(100),
                a.pending
            ));
        }
        if let Some(e) = &a.upload.last_error
            && a.pending > 0
        {
            found.warnings.push(format!(
                "artifact upload to the cloud is failing (retried): {e}"
            ));
        }
        for mac in &capped {
            found.warnings.push(format!(
                "device {mac} reached the device log cap: its logs are no longer kept (`ucrelay logs {mac} --delete` starts again)"
            ));
        }
        DiagnosticsReport {
            artifacts_pending: a.pending,
            artifacts_bytes: a.bytes,
            artifacts_max_total: a.max_total,
            artifacts_uploaded: a.upload.uploaded,
            artifact_upload_error: a.upload.last_error,
            device_logs_collecting: l.collecting,
            device_logs_devices: l.devices.len() as u64,
            device_logs_bytes: l.bytes,
            device_logs_capped: capped,
        }
    }
}

/// What the relay told the cloud about itself, the site the cloud placed it in, and its share.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetReport {
    /// The site the cloud placed the relay in (from its last heartbeat answer).
    pub site: Option<String>,
    pub site_isolated: bool,
    /// Where the site's devices download images (the shared FQDN, or the site's own path).
    pub download_path: Option<String>,
    /// The addresses and device subnets the relay reports.
    pub addresses: Vec<String>,
    pub subnets: Vec<String>,
    pub fqdn: Vec<String>,
    /// Devices in the relay's monitoring share (from the cloud's device list).
    pub devices_assigned: u64,
    /// Task targets leased to the relay and not finished.
    pub targets_leased: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreReport {
    pub path: String,
    /// False while the store refuses writes (a full disk, reopening after an I/O error).
    pub writable: bool,
    /// Why not, in plain words.
    pub problem: Option<String>,
    pub problem_since: Option<String>,
    pub disk_full: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesReport {
    pub devices: crate::protocol::DeviceCounts,
    pub tasks: crate::protocol::TaskCounts,
    /// Device polls done since the relay started.
    #[serde(default)]
    pub polls: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloudReport {
    pub url: String,
    pub tenant_id: String,
    pub proxy: Option<String>,
    pub registered: bool,
    /// `registered`, `registering`, `pin_rejected`, `failed`.
    pub registration: String,
    pub registration_error: Option<String>,
    pub registered_at: Option<String>,
    pub registrations: u64,
    /// `connected`, `connecting`, `disconnected`, `waiting_for_registration`.
    pub channel: String,
    pub channel_error: Option<String>,
    pub channel_since: Option<String>,
    pub reconnects: u64,
    pub last_heartbeat: Option<String>,
    pub last_heartbeat_ok: Option<bool>,
    pub last_heartbeat_error: Option<String>,
    pub heartbeats_ok: u64,
    pub heartbeats_failed: u64,
    pub heartbeat_interval_s: u64,
    pub commands_received: u64,
    /// Commands answered `busy` because `[cloud].command_queue` was full.
    #[serde(default)]
    pub commands_busy: u64,
    pub results_pending: u64,
    pub results_sent: u64,
    pub results_rejected: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeReport {
    pub listen: String,
    pub legacy_http_listen: Option<String>,
    pub fqdn: Vec<String>,
    pub upstream: Option<String>,
    /// The certificate in service; all `None` while the edge waits for the cloud's certificate.
    pub certificate_subject: Option<String>,
    pub certificate_sha256: Option<String>,
    pub certificate_not_after: Option<String>,
    pub certificate_days_left: Option<i64>,
    /// `file <path>`, `cloud upload <id> (received <time>)`, or `none: waiting for the
    /// certificate uploaded in the cloud`.
    #[serde(default)]
    pub certificate_source: String,
    /// What became of the last certificate the cloud pushed, when it is not the one serving.
    #[serde(default)]
    pub cloud_certificate: Option<String>,
    /// Why the last reload's certificate was refused (the previous one still serves).
    pub reload_error: Option<String>,
    pub connections_open: u64,
    pub connections_total: u64,
    pub connections_refused: u64,
    /// Of those, refused by `[edge].max_connections_per_ip`.
    #[serde(default)]
    pub connections_refused_per_ip: u64,
    pub tls_handshake_failures: u64,
    pub requests: u64,
    pub status_2xx: u64,
    pub status_3xx: u64,
    pub status_4xx: u64,
    pub status_5xx: u64,
    pub bytes_out: u64,
    pub legacy_forbidden: u64,
    /// Idle upstream connections kept for the next device connection.
    #[serde(default)]
    pub upstream_idle: u64,
}

impl EdgeReport {
    fn build(edge: &crate::edge::Edge) -> EdgeReport {
        let serving = edge.cert.current();
        let cert = serving.as_ref().map(|s| &s.cert);
        let st = &edge.stats;
        let (_, upstream) = edge.upstream.get();
        let days_left = cert.map(|c| match c.not_after.duration_since(SystemTime::now()) {
            Ok(d) => (d.as_secs() / 86_400) as i64,
            Err(e) => -((e.duration().as_secs() / 86_400) as i64) - 1,
        });
        EdgeReport {
            listen: edge
                .bound
                .get()
                .map(|b| b.0)
                .unwrap_or(edge.cfg().listen)
                .to_string(),
            legacy_http_listen: edge
                .bound
                .get()
                .and_then(|b| b.1)
                .or(edge.cfg().legacy_http_listen)
                .map(|a| a.to_string()),
            fqdn: edge.cfg().fqdn.clone(),
            upstream: upstream.as_ref().map(|u| u.describe()),
            certificate_subject: cert.map(|c| c.subject.clone()),
            certificate_sha256: cert.map(|c| c.sha256.clone()),
            certificate_not_after: cert.map(|c| rfc3339(c.not_after)),
            certificate_days_left: days_left,
            certificate_source: match &serving {
                Some(s) => s.source.to_string(),
                None => "none: waiting for the certificate uploaded in the cloud".into(),
            },
            cloud_certificate: edge
                .cloud_cert_note
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            reload_error: edge
                .reload_error
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            connections_open: st.sum(|c| &c.connections_open),
            connections_total: st.sum(|c| &c.connections_total),
            connections_refused: st.sum(|c| &c.connections_refused),
            connections_refused_per_ip: st.sum(|c| &c.connections_refused_per_ip),
            tls_handshake_failures: st.sum(|c| &c.tls_handshake_failures),
            requests: st.sum(|c| &c.requests),
            status_2xx: st.sum(|c| &c.status_2xx),
            status_3xx: st.sum(|c| &c.status_3xx),
            status_4xx: st.sum(|c| &c.status_4xx),
            status_5xx: st.sum(|c| &c.status_5xx),
            bytes_out: st.sum(|c| &c.bytes_out),
            legacy_forbidden: st.sum(|c| &c.legacy_forbidden),
            upstream_idle: upstream.map_or(0, |u| u.idle_connections() as u64),
        }
    }
}

impl CloudReport {
    fn build(
        s: &AgentStatus,
        cfg: &Config,
        results_pending: u64,
        found: &mut Findings,
    ) -> CloudReport {
        let problems = &mut found.problems;
        let (registration, registration_error) = match &s.registration {
            Registration::Starting => {
                problems.push(
                    "not registered with the cloud yet: first attempt in progress".to_string(),
                );
                ("registering", None)
            }
            Registration::Registered => ("registered", None),
            Registration::Rejected(why) => {
                problems.push(format!(
                    "PIN rejected by cloud ({why}): check [cloud] pin/pin_file and tenant_id in {}; after a PIN \
                     reset the old PIN keeps working for 24 hours only",
                    cfg.path.display()
                ));
                (
                    "pin_rejected",
                    Some(format!("PIN rejected by cloud: {why}")),
                )
            }
            Registration::Failed(why) => {
                problems.push(format!("not registered with the cloud: {why}"));
                ("failed", Some(why.clone()))
            }
        };
        let (channel, channel_error) = match &s.channel {
            ChannelState::Connected => ("connected", None),
            ChannelState::Connecting => ("connecting", None),
            ChannelState::WaitingForRegistration => ("waiting_for_registration", None),
            ChannelState::Disconnected(why) => ("disconnected", Some(why.clone())),
        };
        if s.registration == Registration::Registered && s.channel != ChannelState::Connected {
            let why = channel_error.clone().unwrap_or_else(|| "connecting".into());
            problems.push(format!("command channel is down: {why}"));
        }
        let (last_heartbeat, last_heartbeat_ok, last_heartbeat_error) = match &s.last_heartbeat {
            None => (None, None, None),
            Some((at, Ok(()))) => (Some(rfc3339(*at)), Some(true), None),
            Some((at, Err(e))) => {
                problems.push(format!("last heartbeat failed: {e}"));
                (Some(rfc3339(*at)), Some(false), Some(e.clone()))
            }
        };
        if s.results_rejected > 0 {
            problems.push(format!(
                "{} results were refused by the cloud as malformed or too large and set aside (see the logs)",
                s.results_rejected
            ));
        }
        if results_pending > 0
            && let Some(e) = &s.last_results_error
        {
            problems.push(format!(
                "{results_pending} results waiting to be sent to the cloud: {e}"
            ));
        }
        CloudReport {
            url: cfg.cloud.url.to_string(),
            tenant_id: cfg.cloud.tenant_id.clone(),
            proxy: cfg
                .cloud
                .proxy
                .as_ref()
                .map(|p| format!("http://{}", p.address())),
            registered: s.registration == Registration::Registered,
            registration: registration.into(),
            registration_error,
            registered_at: s.registered_at.map(rfc3339),
            registrations: s.registrations,
            channel: channel.into(),
            channel_error,
            channel_since: s.channel_since.map(rfc3339),
            reconnects: s.reconnects,
            last_heartbeat,
            last_heartbeat_ok,
            last_heartbeat_error,
            heartbeats_ok: s.heartbeats_ok,
            heartbeats_failed: s.heartbeats_failed,
            heartbeat_interval_s: s.heartbeat_interval_s,
            commands_received: s.commands_received,
            commands_busy: s.commands_busy,
            results_pending,
            results_sent: s.results_sent,
            results_rejected: s.results_rejected,
        }
    }
}

impl EdgeReport {
    /// A refused certificate reload is a problem; a certificate near expiry a warning.
    fn findings(&self, found: &mut Findings) {
        if let Some(why) = &self.reload_error {
            found
                .problems
                .push(format!("certificate reload refused: {why}"));
        }
        match (self.certificate_days_left, &self.certificate_not_after) {
            (Some(days), Some(at)) if days < 30 => found.warnings.push(format!(
                "edge certificate expires on {at} ({days} days left): renew it"
            )),
            (None, _) => found.problems.push(
                "edge HTTPS is not serving: no edge.pfx and no certificate from the cloud yet; upload the tenant's certificate in the cloud (or set [edge].pfx)"
                    .into(),
            ),
            _ => {}
        }
        if let Some(note) = &self.cloud_certificate {
            found.warnings.push(note.clone());
        }
    }
}

/// A refused manifest and failed images are problems; a failed sync round a warning.
fn image_findings(r: &CatalogReport, found: &mut Findings) {
    if let Some(why) = &r.refused {
        found.problems.push(format!(
            "image manifest refused, the previous one stays: {why}"
        ));
    }
    for i in r.images.iter().filter(|i| i.state == "failed") {
        found.problems.push(format!(
            "image {} failed to sync: {} (retried automatically; `ucrelay images sync` retries now)",
            i.id,
            i.reason.clone().unwrap_or_default()
        ));
    }
    if let Some(e) = &r.last_sync_error
        && r.refused.is_none()
    {
        found.warnings.push(format!("last image sync: {e}"));
    }
}

/// Which jobs run, and on what.
fn jobs(ctx: &Running) -> Vec<JobReport> {
    let job = |name: &str, on: bool, detail: &str| JobReport {
        name: name.into(),
        state: if on { "on" } else { "off" }.into(),
        detail: detail.into(),
    };
    let devices = ctx.devices.cfg();
    vec![
        job(
            "management",
            true,
            "registration, heartbeats, command channel",
        ),
        job(
            "download",
            ctx.images.is_some(),
            &match &ctx.images {
                Some(c) => format!("image cache in {}", c.cfg().dir.display()),
                None => "no [images] section".to_string(),
            },
        ),
        job(
            "devices",
            devices.enabled,
            &if devices.enabled {
                format!(
                    "commands, tasks and monitoring (poll every {})",
                    humantime::format_duration(devices.poll_interval)
                )
            } else {
                "no [devices] section".to_string()
            },
        ),
        job(
            "provisioning",
            ctx.edge.is_some(),
            // The upstream in service, which a reload may have changed.
            &match &ctx.edge {
                Some(e) => match e.upstream.get().1 {
                    Some(u) => {
                        format!("edge on {}, forwarding to {}", e.cfg().listen, u.describe())
                    }
                    None => format!("edge on {}, no [provisioning] upstream", e.cfg().listen),
                },
                None => "no [edge] section".to_string(),
            },
        ),
    ]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobReport {
    pub name: String,
    /// `on` or `off`.
    pub state: String,
    pub detail: String,
}

/// Devices presenting a changed key, and device-status records the relay could not deliver.
fn device_findings(plane: &crate::devices::DevicePlane, found: &mut Findings) {
    use std::sync::atomic::Ordering::Relaxed;
    let changed = plane.pins.changed();
    if !changed.is_empty() {
        let mut list = changed.clone();
        list.truncate(5);
        found.problems.push(format!(
            "{} device(s) presented a certificate key other than the pinned one and get no password ({}{}): \
             `ucrelay devices` shows them; if a device was replaced or reset, `ucrelay devices trust ADDRESS`",
            changed.len(),
            list.join(", "),
            if changed.len() > 5 { ", ..." } else { "" }
        ));
    }
    let reg = &plane.registry;
    let rejected = reg.records_rejected.load(Relaxed);
    if rejected > 0 {
        found.problems.push(format!(
            "{rejected} device-status records were refused by the cloud as malformed or too large and set aside (see the logs)"
        ));
    }
    let dropped = reg.alarms_dropped.load(Relaxed);
    if dropped > 0 {
        found.problems.push(format!(
            "{dropped} alarms were dropped: {} alarms are waiting for the cloud, the most the relay keeps",
            reg.pending_alarms()
        ));
    }
}

/// What is wrong (the relay is unhealthy) and what deserves a look, gathered while building.
#[derive(Default)]
struct Findings {
    problems: Vec<String>,
    warnings: Vec<String>,
}

impl StatusReport {
    pub fn build(ctx: &Running, results_pending: u64) -> StatusReport {
        let s = ctx.status.snapshot();
        let mut found = Findings::default();
        let cloud = CloudReport::build(&s, &ctx.config, results_pending, &mut found);
        let edge = ctx.edge.as_deref().map(EdgeReport::build);
        if let Some(e) = &edge {
            e.findings(&mut found);
        }
        let images = ctx.images.as_ref().map(|c| c.report());
        if let Some(r) = &images {
            image_findings(r, &mut found);
        }
        if ctx.devices.cfg().enabled {
            device_findings(&ctx.devices, &mut found);
        }
        let diagnostics = DiagnosticsReport::build(ctx, &mut found);
        let restart_needed = ctx
            .reload_state
            .restart_needed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !restart_needed.is_empty() {
            found.warnings.push(format!(
                "the config file changes {} but the running relay applies that only after a restart (systemctl restart ucrelay)",
                restart_needed.join(", ")
            ));
        }

        let trouble = ctx.store.trouble();
        if let Some(t) = &trouble {
            found.problems.push(if t.disk_full {
                format!(
                    "{} since {}; what is stored is kept and served, and the relay recovers by itself once there is space (free some, or grow the filesystem)",
                    t.message,
                    rfc3339(t.since)
                )
            } else {
                format!("{} since {}; it is opened again automatically", t.message, rfc3339(t.since))
            });
        }
        let store = Some(StoreReport {
            path: ctx.store.path().display().to_string(),
            writable: trouble.is_none(),
            problem: trouble.as_ref().map(|t| t.message.clone()),
            problem_since: trouble.as_ref().map(|t| rfc3339(t.since)),
            disk_full: trouble.as_ref().is_some_and(|t| t.disk_full),
        });
        StatusReport {
            version: crate::util::build::VERSION.into(),
            relay_id: ctx.relay_id.to_string(),
            hostname: ctx.hostname.to_string(),
            started_at: rfc3339(ctx.started_at),
            uptime_s: ctx.started.elapsed().as_secs(),
            healthy: found.problems.is_empty(),
            problems: found.problems,
            warnings: found.warnings,
            edge,
            images,
            devices: ctx.devices.cfg().enabled.then(|| DevicesReport {
                devices: ctx.devices.registry.counts(),
                tasks: ctx.devices.tasks.counts(),
                polls: ctx
                    .devices
                    .registry
                    .polls
                    .load(std::sync::atomic::Ordering::Relaxed),
            }),
            metrics_listen: crate::ops::metrics::bound().map(|a| a.to_string()),
            memory: MemoryReport::now(),
            fleet: Some(FleetReport {
                site: s.site.as_ref().map(|x| x.name.clone()),
                site_isolated: s.site.as_ref().is_some_and(|x| x.isolated),
                download_path: s.site.as_ref().and_then(|x| x.download_path.clone()),
                addresses: s.addresses.clone(),
                subnets: crate::agent::reported_subnets(&ctx.config).unwrap_or_default(),
                fqdn: ctx
                    .config
                    .edge
                    .as_ref()
                    .map(|e| e.fqdn.clone())
                    .unwrap_or_default(),
                devices_assigned: ctx.devices.registry.assigned(),
                targets_leased: ctx.devices.tasks.leased_open(),
            }),
            diagnostics: Some(diagnostics),
            restart_needed,
            cloud,
            jobs: jobs(ctx),
            store,
        }
    }

    /// The human view: a short table, then the problems.
    pub fn render(&self) -> String {
        let c = &self.cloud;
        let mut rows: Vec<(&str, String)> = vec![
            (
                "health",
                if self.healthy {
                    "healthy".into()
                } else {
                    format!("UNHEALTHY ({} problems)", self.problems.len())
                },
            ),
            ("version", self.version.clone()),
            ("relay id", self.relay_id.clone()),
            (
                "uptime",
                humantime::format_duration(std::time::Duration::from_secs(self.uptime_s))
                    .to_string(),
            ),
            ("cloud", format!("{} (tenant {})", c.url, c.tenant_id)),
        ];
        if let Some(m) = &self.memory {
            let mb = |b: u64| b as f64 / 1e6;
            let heap = m
                .heap_in_use_bytes
                .map(|h| format!(", {:.1} MB heap in use", mb(h)))
                .unwrap_or_default();
            let fds = m
                .open_fds
                .map(|n| format!(", {n} open files"))
                .unwrap_or_default();
            rows.push((
                "memory",
                format!(
                    "{:.1} MB resident{heap}, {} threads{fds}",
                    mb(m.resident_bytes),
                    m.threads
                ),
            ));
        }
        if let Some(p) = &c.proxy {
            rows.push(("proxy", p.clone()));
        }
        let reg = match (&c.registration_error, &c.registered_at) {
            (Some(e), _) => format!("{} - {e}", c.registration),
            (None, Some(at)) => format!("{} since {at}", c.registration),
            (None, None) => c.registration.clone(),
        };
        rows.push(("registration", reg));
        let chan = match (&c.channel_error, &c.channel_since) {
            (Some(e), _) => format!("{} - {e}", c.channel),
            (None, Some(at)) => format!("{} since {at}", c.channel),
            (None, None) => c.channel.clone(),
        };
        rows.push(("channel", format!("{chan} ({} reconnects)", c.reconnects)));
        let hb = match (
            &c.last_heartbeat,
            c.last_heartbeat_ok,
            &c.last_heartbeat_error,
        ) {
            (None, _, _) => "none yet".to_string(),
            (Some(at), Some(true), _) => format!("ok at {at}"),
            (Some(at), _, e) => format!("FAILED at {at}: {}", e.clone().unwrap_or_default()),
        };
        rows.push(("last heartbeat", hb));
        rows.push((
            "heartbeats",
            format!(
                "{} ok, {} failed, every {}s",
                c.heartbeats_ok, c.heartbeats_failed, c.heartbeat_interval_s
            ),
        ));
        rows.push((
            "commands",
            if c.commands_busy > 0 {
                format!(
                    "{} received, {} answered busy (queue full), {} results sent, {} pending",
                    c.commands_received, c.commands_busy, c.results_sent, c.results_pending
                )
            } else {
                format!(
                    "{} received, {} results sent, {} pending",
                    c.commands_received, c.results_sent, c.results_pending
                )
            },
        ));
        if let Some(e) = &self.edge {
            rows.push(("edge", format!("{} (fqdn {})", e.listen, e.fqdn.join(", "))));
            rows.push((
                "certificate",
                match (
                    &e.certificate_subject,
                    &e.certificate_not_after,
                    e.certificate_days_left,
                ) {
                    (Some(s), Some(at), Some(days)) => format!(
                        "{s} until {at} ({days} days), from {}",
                        e.certificate_source
                    ),
                    _ => e.certificate_source.clone(),
                },
            ));
            rows.push((
                "edge traffic",
                format!(
                    "{} open, {} refused ({} by the per-host cap), {} TLS failures; {} requests (2xx {}, 4xx {}, 5xx {}), {} bytes out",
                    e.connections_open,
                    e.connections_refused,
                    e.connections_refused_per_ip,
                    e.tls_handshake_failures,
                    e.requests,
                    e.status_2xx,
                    e.status_4xx,
                    e.status_5xx,
                    e.bytes_out
                ),
            ));
        }
        if let Some(i) = &self.images {
            let synced = i.images.iter().filter(|x| x.state == "synced").count();
            rows.push((
                "images",
                format!(
                    "{synced}/{} synced (revision {}), {} active downloads, {} bytes served",
                    i.images.len(),
                    i.revision,
                    i.downloads_active,
                    i.bytes_served
                ),
            ));
        }
        if let Some(d) = &self.devices {
            rows.push((
                "devices",
                format!(
                    "{} known, {} online, {} offline; tasks {} scheduled, {} executing, {} finished",
                    d.devices.known,
                    d.devices.online,
                    d.devices.offline,
                    d.tasks.scheduled,
                    d.tasks.executing,
                    d.tasks.done
                ),
            ));
        }
        if let Some(f) = &self.fleet {
            rows.push((
                "site",
                match &f.site {
                    Some(site) => format!(
                        "{site}{}{}",
                        if f.site_isolated { " (isolated)" } else { "" },
                        f.download_path
                            .as_ref()
                            .map(|p| format!(", devices download from {p}"))
                            .unwrap_or_default()
                    ),
                    None => "none (the cloud placed this relay in no site)".into(),
                },
            ));
            rows.push((
                "share",
                format!(
                    "{} devices assigned, {} task targets leased; addresses {}",
                    f.devices_assigned,
                    f.targets_leased,
                    if f.addresses.is_empty() {
                        "none".to_string()
                    } else {
                        f.addresses.join(", ")
                    }
                ),
            ));
        }
        if let Some(d) = &self.diagnostics {
            use crate::util::bytes::human_bytes;
            rows.push((
                "artifacts",
                format!(
                    "{} waiting for upload ({} of {}), {} delivered",
                    d.artifacts_pending,
                    human_bytes(d.artifacts_bytes),
                    human_bytes(d.artifacts_max_total),
                    d.artifacts_uploaded
                ),
            ));
            rows.push((
                "device logs",
                if d.device_logs_collecting {
                    format!(
                        "kept on the relay (the cloud does not take them): {} devices, {}",
                        d.device_logs_devices,
                        human_bytes(d.device_logs_bytes)
                    )
                } else {
                    format!(
                        "uploaded to the cloud (the relay keeps {} devices' older copies, {})",
                        d.device_logs_devices,
                        human_bytes(d.device_logs_bytes)
                    )
                },
            ));
        }
        for j in &self.jobs {
            let label: &str = match j.name.as_str() {
                "management" => "job management",
                "download" => "job download",
                "devices" => "job devices",
                _ => "job provisioning",
            };
            rows.push((label, format!("{} - {}", j.state, j.detail)));
        }
        // Values carry text from the cloud and devices (error messages, image ids, reasons):
        // escaped, so none of it can act on the terminal.
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("{k:<width$}  {}\n", printable(&v)));
        }
        if !self.warnings.is_empty() {
            out.push_str("\nwarnings:\n");
            for w in &self.warnings {
                out.push_str(&format!("  - {}\n", printable(w)));
            }
        }
        if !self.problems.is_empty() {
            out.push_str("\nproblems:\n");
            for p in &self.problems {
                out.push_str(&format!("  - {}\n", printable(p)));
            }
        }
        out
    }
}
