//! Reload on SIGHUP or `ucrelay reload`: re-read the config file and the certificate, apply every
//! setting that can change while running, and say plainly, setting by setting, what was applied,
//! what was refused and what waits for a restart. Nothing the file says is silently ignored:
//! every section is taken apart field by field (no `..`), so a new setting cannot be added
//! without deciding here whether a reload applies it.
//!
//! Applied live: `[devices]` subnets, admin password, task concurrency, deadline and retention (the device
//! plane, the legacy listener and the download agent read them per piece of work); `[edge]`
//! certificate (with `fqdn`, `pfx`, `pfx_password_file`) and connection limits and timeouts (new
//! connections); `[provisioning]`; `[images]` limits, rate, windows and intervals. After a
//! restart: `state_dir`, `[cloud]`, `[admin]`, `[diagnostics]`, the edge's listen addresses,
//! adding or removing a section, and the device plane's polling, scheme, CA, identity checks,
//! session cap and request deadline. A refused
//! certificate or upstream leaves the old one in service; no connection is cut either way.
//!
//! What waits for a restart is kept ([`crate::ops::ReloadState`]) and shown by `status` until
//! the relay restarts or the file says again what runs.

use crate::config::{
    CloudConfig, Config, DevicesConfig, EdgeConfig, ImagesConfig, PinSource, ProvisioningConfig,
};
use crate::edge::tls::CertSource;
use crate::edge::{cert, cloudcert, provisioning::Upstream};
use crate::ops::{ReloadLine, ReloadOutcome, Running};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Installs the SIGHUP handler. Done before the daemon reports ready: until a handler exists, a
/// SIGHUP (`systemctl reload`) would kill the process.
pub fn hangup() -> anyhow::Result<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok(signal(SignalKind::hangup())?)
}

pub async fn run(
    ctx: Running,
    mut hup: tokio::signal::unix::Signal,
    mut requests: mpsc::Receiver<oneshot::Sender<ReloadOutcome>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // The configuration in force: the startup one, with every live setting a reload applied.
    let mut effective = (*ctx.config).clone();
    loop {
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = hup.recv() => { info!("SIGHUP received: reloading"); None }
            req = requests.recv() => match req {
                Some(tx) => Some(tx),
                None => return Ok(()),
            },
        };
        crate::ops::systemd::reloading();
        let outcome = reload(&ctx, &mut effective);
        // Ready again whether or not the new config was taken: the relay keeps serving either way.
        crate::ops::systemd::ready(&crate::ops::systemd::summary(&ctx));
        for l in &outcome.lines {
            match l.outcome.as_str() {
                "applied" | "unchanged" => info!("reload: {}", l.message),
                _ => warn!("reload: {}: {}", l.outcome, l.message),
            }
        }
        if let Some(tx) = reply {
            let _ = tx.send(outcome);
        }
    }
}

/// What one reload found, line by line.
#[derive(Default)]
struct Plan {
    lines: Vec<ReloadLine>,
    restart: Vec<String>,
    refused: bool,
}

/// How a setting's values are shown: secrets never are.
type Show<T> = fn(&T) -> String;

impl Plan {
    fn line(&mut self, outcome: &str, message: String) {
        self.lines.push(ReloadLine {
            outcome: outcome.into(),
            message,
        });
    }

    fn applied(&mut self, message: String) {
        self.line("applied", message);
    }

    fn refused(&mut self, message: String) {
        self.refused = true;
        self.line("refused", message);
    }

    fn restart(&mut self, field: &str, message: String) {
        self.restart.push(field.to_string());
        self.line("restart", message);
    }

    /// A setting applied live: true when it changed (the caller installs it).
    fn live<T: PartialEq>(&mut self, field: &str, now: &T, file: &T, show: Show<T>) -> bool {
        if now == file {
            return false;
        }
        self.applied(format!("{field} is now {} (was {})", show(file), show(now)));
        true
    }

    /// A secret applied live: said to have changed, never shown.
    fn live_secret<T: PartialEq>(&mut self, field: &str, now: &T, file: &T) -> bool {
        if now == file {
            return false;
        }
        self.applied(format!("{field} changed; in use from now on"));
        true
    }

    /// A setting that takes effect after a restart: reported while the file differs from what
    /// runs.
    fn after_restart<T: PartialEq>(&mut self, field: &str, runs: &T, file: &T, show: Show<T>) {
        if runs != file {
            self.restart(
                field,
                format!(
                    "{field} is {} in the file; the relay keeps {} until it restarts",
                    show(file),
                    show(runs)
                ),
            );
        }
    }

    /// A secret that takes effect after a restart.
    fn after_restart_secret(&mut self, field: &str, changed: bool) {
        if changed {
            self.restart(
                field,
                format!(
                    "{field} changed in the file; the relay keeps the old one until it restarts"
                ),
            );
        }
    }
}

fn dbg<T: Debug>(v: &T) -> String {
    format!("{v:?}")
}

fn dur(d: &Duration) -> String {
    humantime::format_duration(*d).to_string()
}

fn opt_path(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref()
        .map_or_else(|| "none".into(), |p| p.display().to_string())
}

fn num<T: ToString>(n: &T) -> String {
    n.to_string()
}

fn reload(ctx: &Running, effective: &mut Config) -> ReloadOutcome {
    let new = match Config::load(&ctx.config.path) {
        Ok(c) => c,
        Err(e) => {
            let mut p = Plan::default();
            p.refused(format!("{e}; the running configuration stays"));
            return finish(ctx, p);
        }
    };
    let mut p = Plan::default();
    let Config {
        path: _,
        state_dir,
        cloud: new_cloud,
        admin,
        edge: _,
        provisioning: _,
        images: _,
        devices: new_devices,
        diagnostics,
    } = &new;
    p.after_restart("state_dir", &effective.state_dir, state_dir, |p| {
        p.display().to_string()
    });
    cloud(&effective.cloud, new_cloud, &mut p);
    {
        let crate::config::AdminConfig {
            socket,
            metrics_listen,
        } = admin;
        p.after_restart("admin.socket", &effective.admin.socket, socket, |p| {
            p.display().to_string()
        });
        p.after_restart(
            "admin.metrics_listen",
            &effective.admin.metrics_listen,
            metrics_listen,
            |a| a.map_or_else(|| "off".into(), |a| a.to_string()),
        );
    }
    {
        // The artifact and device log stores take their limits when they open.
        let crate::config::DiagnosticsConfig {
            artifacts_max_total,
            device_logs_max_per_device,
            device_logs_max_total,
            device_logs_keep,
        } = diagnostics;
        let d = &effective.diagnostics;
        let bytes = |n: &u64| crate::util::bytes::human_bytes(*n);
        p.after_restart(
            "diagnostics.artifacts_max_total",
            &d.artifacts_max_total,
            artifacts_max_total,
            bytes,
        );
        p.after_restart(
            "diagnostics.device_logs_max_per_device",
            &d.device_logs_max_per_device,
            device_logs_max_per_device,
            bytes,
        );
        p.after_restart(
            "diagnostics.device_logs_max_total",
            &d.device_logs_max_total,
            device_logs_max_total,
            bytes,
        );
        p.after_restart(
            "diagnostics.device_logs_keep",
            &d.device_logs_keep,
            device_logs_keep,
            dur,
        );
    }
    devices(ctx, &mut effective.devices, new_devices, &mut p);
    edge(ctx, effective, &new, &mut p);
    images(ctx, effective, &new, &mut p);
    finish(ctx, p)
}

/// The outcome, and what waits for a restart published for `status`.
fn finish(ctx: &Running, mut p: Plan) -> ReloadOutcome {
    if !p.refused {
        *ctx.reload_state
            .restart_needed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = p.restart.clone();
    }
    if !p.restart.is_empty() {
        p.line(
            "restart",
            format!(
                "{} setting(s) wait for a restart (systemctl restart ucrelay): {}",
                p.restart.len(),
                p.restart.join(", ")
            ),
        );
    }
    if p.lines.is_empty() {
        p.line(
            "unchanged",
            "configuration re-read; nothing to change".into(),
        );
    }
    ReloadOutcome {
        ok: !p.refused && p.restart.is_empty(),
        messages: p.lines.iter().map(|l| l.message.clone()).collect(),
        restart_needed: p.restart,
        lines: p.lines,
    }
}

fn cloud(runs: &CloudConfig, file: &CloudConfig, p: &mut Plan) {
    let CloudConfig {
        url,
        tenant_id,
        pin,
        heartbeat_interval,
        proxy,
        ca_file,
        ping_interval,
        pin_retry_interval,
        connect_timeout,
        request_timeout,
        reconnect_max,
        addresses,
        command_queue,
    } = file;
    p.after_restart("cloud.addresses", &runs.addresses, addresses, |a| {
        format!("{a:?}")
    });
    p.after_restart("cloud.url", &runs.url, url, |u| u.to_string());
    p.after_restart("cloud.tenant_id", &runs.tenant_id, tenant_id, |t| t.clone());
    // A PIN file's content is read again before every registration; the setting itself (the
    // inline PIN, or which file) takes a restart.
    let same_pin = match (&runs.pin, pin) {
        (PinSource::Inline(a), PinSource::Inline(b)) => a == b,
        (PinSource::File(a), PinSource::File(b)) => a == b,
        _ => false,
    };
    p.after_restart_secret("cloud.pin", !same_pin);
    p.after_restart(
        "cloud.heartbeat_interval",
        &runs.heartbeat_interval,
        heartbeat_interval,
        dur,
    );
    let proxy_key = |x: &Option<crate::config::ProxyConfig>| {
        x.as_ref().map(|x| (x.address(), x.credentials.clone()))
    };
    if proxy_key(&runs.proxy) != proxy_key(proxy) {
        let show = |x: &Option<crate::config::ProxyConfig>| {
            x.as_ref()
                .map_or_else(|| "none".into(), |x| format!("http://{}", x.address()))
        };
        p.restart(
            "cloud.proxy",
            format!(
                "cloud.proxy is {} in the file; the relay keeps {} until it restarts",
                show(proxy),
                show(&runs.proxy)
            ),
        );
    }
    p.after_restart("cloud.ca_file", &runs.ca_file, ca_file, opt_path);
    p.after_restart(
        "cloud.ping_interval",
        &runs.ping_interval,
        ping_interval,
        dur,
    );
    p.after_restart(
        "cloud.pin_retry_interval",
        &runs.pin_retry_interval,
        pin_retry_interval,
        dur,
    );
    p.after_restart(
        "cloud.connect_timeout",
        &runs.connect_timeout,
        connect_timeout,
        dur,
    );
    p.after_restart(
        "cloud.request_timeout",
        &runs.request_timeout,
        request_timeout,
        dur,
    );
    p.after_restart(
        "cloud.reconnect_max",
        &runs.reconnect_max,
        reconnect_max,
        dur,
    );
    p.after_restart(
        "cloud.command_queue",
        &runs.command_queue,
        command_queue,
        num,
    );
}

/// `[devices]`: the subnets and the admin password first of all (an admin who narrows the
/// subnets after an incident needs them in force, not a note).
fn devices(ctx: &Running, runs: &mut DevicesConfig, file: &DevicesConfig, p: &mut Plan) {
    let DevicesConfig {
        enabled,
        subnets,
        poll_interval,
        admin_password,
        scheme,
        ca_file,
        request_timeout,
        poll_concurrency,
        task_concurrency,
        target_timeout,
        monitoring,
        stats_interval,
        identity,
        max_sessions,
        task_retention,
    } = file;
    let mut changed = false;
    if p.live("devices.subnets", &runs.subnets, subnets, |n| {
        n.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }) {
        runs.subnets = subnets.clone();
        changed = true;
    }
    if p.live_secret(
        "devices.admin_password",
        &runs.admin_password,
        admin_password,
    ) {
        runs.admin_password = admin_password.clone();
        changed = true;
    }
    if p.live(
        "devices.task_concurrency",
        &runs.task_concurrency,
        task_concurrency,
        num,
    ) {
        runs.task_concurrency = *task_concurrency;
        changed = true;
    }
    if p.live(
        "devices.target_timeout",
        &runs.target_timeout,
        target_timeout,
        dur,
    ) {
        runs.target_timeout = *target_timeout;
        changed = true;
    }
    if p.live(
        "devices.task_retention",
        &runs.task_retention,
        task_retention,
        dur,
    ) {
        runs.task_retention = *task_retention;
        changed = true;
    }
    if changed {
        ctx.devices_cfg.set(runs.clone());
    }
    if runs.enabled != *enabled {
        p.restart(
            "[devices]",
            format!(
                "[devices] was {} in the file; the device plane stays {} until a restart",
                if *enabled { "added" } else { "removed" },
                if runs.enabled { "on" } else { "off" }
            ),
        );
    }
    p.after_restart(
        "devices.poll_interval",
        &runs.poll_interval,
        poll_interval,
        dur,
    );
    p.after_restart("devices.scheme", &runs.scheme, scheme, dbg);
    p.after_restart("devices.ca_file", &runs.ca_file, ca_file, opt_path);
    p.after_restart(
        "devices.request_timeout",
        &runs.request_timeout,
        request_timeout,
        dur,
    );
    p.after_restart(
        "devices.poll_concurrency",
        &runs.poll_concurrency,
        poll_concurrency,
        num,
    );
    p.after_restart("devices.monitoring", &runs.monitoring, monitoring, num);
    p.after_restart(
        "devices.stats_interval",
        &runs.stats_interval,
        stats_interval,
        dur,
    );
    // The device client (its certificate checks) and the session cap are built at start.
    p.after_restart("devices.identity", &runs.identity, identity, |i| {
        i.as_str().to_string()
    });
    p.after_restart(
        "devices.max_sessions",
        &runs.max_sessions,
        max_sessions,
        num,
    );
}

/// `[edge]` and `[provisioning]`: the certificate, the limits, the upstream.
fn edge(ctx: &Running, runs: &mut Config, file: &Config, p: &mut Plan) {
    let (edge, e) = match (&ctx.edge, &file.edge) {
        (Some(edge), Some(e)) => (edge, e),
        (None, None) => {
            if runs.provisioning.as_ref().map(|c| &c.upstream)
                != file.provisioning.as_ref().map(|c| &c.upstream)
            {
                p.restart(
                    "provisioning",
                    "[provisioning] changed, but without [edge] nothing forwards; add [edge] and restart".into(),
                );
            }
            return;
        }
        (None, Some(_)) | (Some(_), None) => {
            p.restart(
                "[edge]",
                format!(
                    "[edge] was {} in the file; takes effect after a restart",
                    if file.edge.is_some() {
                        "added"
                    } else {
                        "removed"
                    }
                ),
            );
            return;
        }
    };
    let EdgeConfig {
        listen,
        fqdn,
        pfx,
        pfx_password_file,
        legacy_http_listen,
        max_connections,
        max_connections_per_ip,
        header_timeout,
        idle_timeout,
        max_header_size,
    } = e;
    let mut next = (*edge.cfg()).clone();
    // The certificate is read again whether or not its settings changed: the file may have been
    // replaced in place. Without a pfx the certificate is the cloud's (kept in the state dir).
    match pfx {
        Some(pfx_path) => {
            let report = cert::load(
                pfx_path,
                pfx_password_file.as_deref(),
                fqdn,
                std::time::SystemTime::now(),
            );
            match report.cert {
                Some(loaded) => {
                    p.applied(format!(
                        "certificate reloaded: {} (sha256 {}), new handshakes use it",
                        loaded.subject, loaded.sha256
                    ));
                    edge.cert
                        .replace(loaded, CertSource::File(pfx_path.clone()));
                    *edge.reload_error.write().unwrap_or_else(|e| e.into_inner()) = None;
                    next.fqdn = fqdn.clone();
                    next.pfx = pfx.clone();
                    next.pfx_password_file = pfx_password_file.clone();
                }
                None => {
                    let why = format!(
                        "certificate refused: {}; the previous certificate stays in service",
                        crate::edge::refusal(&report)
                    );
                    *edge.reload_error.write().unwrap_or_else(|e| e.into_inner()) =
                        Some(why.clone());
                    p.refused(why);
                }
            }
        }
        None => {
            let serving_file = edge
                .cert
                .current()
                .is_some_and(|s| matches!(s.source, CertSource::File(_)));
            next.fqdn = fqdn.clone();
            next.pfx = None;
            next.pfx_password_file = None;
            if serving_file {
                match cloudcert::load_stored(
                    &ctx.config.state_dir,
                    fqdn,
                    std::time::SystemTime::now(),
                ) {
                    Some((loaded, source)) => {
                        p.applied(format!(
                            "edge.pfx removed: serving the certificate uploaded in the cloud ({source})"
                        ));
                        edge.cert.replace(loaded, source);
                    }
                    None => p.applied(
                        "edge.pfx removed, but no certificate from the cloud is kept yet: the file's certificate serves until one arrives".into(),
                    ),
                }
            }
        }
    }
    let now = edge.cfg();
    if p.live(
        "edge.max_connections",
        &now.max_connections,
        max_connections,
        num,
    ) {
        next.max_connections = *max_connections;
    }
    if p.live(
        "edge.max_connections_per_ip",
        &now.max_connections_per_ip,
        max_connections_per_ip,
        num,
    ) {
        next.max_connections_per_ip = *max_connections_per_ip;
    }
    if p.live(
        "edge.header_timeout",
        &now.header_timeout,
        header_timeout,
        dur,
    ) {
        next.header_timeout = *header_timeout;
    }
    if p.live("edge.idle_timeout", &now.idle_timeout, idle_timeout, dur) {
        next.idle_timeout = *idle_timeout;
    }
    if p.live(
        "edge.max_header_size",
        &now.max_header_size,
        max_header_size,
        num,
    ) {
        next.max_header_size = *max_header_size;
    }
    p.after_restart("edge.listen", &now.listen, listen, num);
    p.after_restart(
        "edge.legacy_http_listen",
        &now.legacy_http_listen,
        legacy_http_listen,
        |a| a.map_or_else(|| "off".into(), |a| a.to_string()),
    );
    runs.edge = Some(next.clone());
    edge.set_cfg(next);

    // [provisioning]: compared with what is in force, applied when it builds.
    let key = |c: &Option<ProvisioningConfig>| {
        c.as_ref().map(|c| {
            let ProvisioningConfig {
                upstream,
                ca_file,
                timeout,
                connect_timeout,
            } = c;
            (
                upstream.clone(),
                ca_file.clone(),
                *timeout,
                *connect_timeout,
            )
        })
    };
    if key(&runs.provisioning) != key(&file.provisioning) {
        match file.provisioning.as_ref().map(Upstream::new).transpose() {
            Ok(up) => {
                p.applied(match &up {
                    Some(u) => format!("provisioning upstream is now {}", u.describe()),
                    None => "provisioning upstream removed".to_string(),
                });
                edge.upstream.set(up.map(Arc::new));
                runs.provisioning = file.provisioning.clone();
            }
            Err(e) => p.refused(format!("provisioning upstream not changed: {e:#}")),
        }
    }
}

/// `[images]`: every limit live; the cache directory after a restart.
fn images(ctx: &Running, runs: &mut Config, file: &Config, p: &mut Plan) {
    let (cat, i) = match (&ctx.images, &file.images) {
        (Some(cat), Some(i)) => (cat, i),
        (None, None) => return,
        (None, Some(_)) | (Some(_), None) => {
            p.restart(
                "[images]",
                format!(
                    "[images] was {} in the file; takes effect after a restart",
                    if file.images.is_some() {
                        "added"
                    } else {
                        "removed"
                    }
                ),
            );
            return;
        }
    };
    let ImagesConfig {
        dir,
        max_images,
        max_total,
        bandwidth_limit,
        parallel,
        max_downloads,
        min_free,
        sync_interval,
        sync_window,
    } = i;
    let now = cat.cfg();
    let mut next = (*now).clone();
    let bytes = |n: &u64| crate::util::bytes::human_bytes(*n);
    let mut changed = false;
    if p.live("images.max_images", &now.max_images, max_images, num) {
        next.max_images = *max_images;
        changed = true;
    }
    if p.live("images.max_total", &now.max_total, max_total, bytes) {
        next.max_total = *max_total;
        changed = true;
    }
    if p.live(
        "images.bandwidth_limit",
        &now.bandwidth_limit,
        bandwidth_limit,
        |b| {
            b.map_or_else(
                || "unlimited".into(),
                |b| format!("{}/s", crate::util::bytes::human_bytes(b)),
            )
        },
    ) {
        next.bandwidth_limit = *bandwidth_limit;
        changed = true;
    }
    if p.live("images.parallel", &now.parallel, parallel, num) {
        next.parallel = *parallel;
        changed = true;
    }
    if p.live(
        "images.max_downloads",
        &now.max_downloads,
        max_downloads,
        num,
    ) {
        next.max_downloads = *max_downloads;
        changed = true;
    }
    if p.live("images.min_free", &now.min_free, min_free, bytes) {
        next.min_free = *min_free;
        changed = true;
    }
    if p.live(
        "images.sync_interval",
        &now.sync_interval,
        sync_interval,
        dur,
    ) {
        next.sync_interval = *sync_interval;
        changed = true;
    }
    if p.live("images.sync_window", &now.sync_window, sync_window, |w| {
        w.map_or_else(|| "always".into(), |w| w.to_string())
    }) {
        next.sync_window = *sync_window;
        changed = true;
    }
    p.after_restart("images.dir", &now.dir, dir, |d| d.display().to_string());
    if changed {
        runs.images = Some(next.clone());
        cat.set_cfg(next);
        // The limits may change what the manifest may hold and when to sync: look again now.
        cat.wake.notify_one();
    }
}
