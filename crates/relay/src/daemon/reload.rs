//! Reload on SIGHUP or `ucrelay reload`: re-read the config file and the certificate, apply what can
//! change while running (the edge certificate, the provisioning upstream), and say plainly what was
//! applied, what was refused and what needs a restart. A refused certificate leaves the old one
//! serving; no connection is cut either way.

use crate::config::Config;
use crate::edge::tls::CertSource;
use crate::edge::{cert, cloudcert, provisioning::Upstream};
use crate::ops::{ReloadOutcome, Running};
use std::sync::Arc;
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
        let outcome = reload(&ctx);
        // Ready again whether or not the new config was taken: the relay keeps serving either way.
        crate::ops::systemd::ready(&crate::ops::systemd::summary(&ctx));
        for m in &outcome.messages {
            if outcome.ok {
                info!("reload: {m}");
            } else {
                warn!("reload: {m}");
            }
        }
        if let Some(tx) = reply {
            let _ = tx.send(outcome);
        }
    }
}

fn reload(ctx: &Running) -> ReloadOutcome {
    let mut messages = Vec::new();
    let new = match Config::load(&ctx.config.path) {
        Ok(c) => c,
        Err(e) => {
            return ReloadOutcome {
                ok: false,
                messages: vec![format!("{e}; the running configuration stays")],
            };
        }
    };
    let old = &ctx.config;
    let mut ok = true;
    match (&ctx.edge, &new.edge) {
        (Some(edge), Some(e)) => {
            match &e.pfx {
                Some(pfx) => {
                    let report = cert::load(
                        pfx,
                        e.pfx_password_file.as_deref(),
                        &e.fqdn,
                        std::time::SystemTime::now(),
                    );
                    match report.cert {
                        Some(loaded) => {
                            messages.push(format!(
                                "certificate reloaded: {} (sha256 {}), new handshakes use it",
                                loaded.subject, loaded.sha256
                            ));
                            edge.cert.replace(loaded, CertSource::File(pfx.clone()));
                            *edge.reload_error.write().unwrap_or_else(|e| e.into_inner()) = None;
                        }
                        None => {
                            ok = false;
                            let why = format!(
                                "certificate refused: {}; the previous certificate stays in service",
                                crate::edge::refusal(&report)
                            );
                            *edge.reload_error.write().unwrap_or_else(|e| e.into_inner()) =
                                Some(why.clone());
                            messages.push(why);
                        }
                    }
                }
                None => {
                    let serving_file = edge
                        .cert
                        .current()
                        .is_some_and(|s| matches!(s.source, CertSource::File(_)));
                    if serving_file {
                        match cloudcert::load_stored(
                            &ctx.config.state_dir,
                            &e.fqdn,
                            std::time::SystemTime::now(),
                        ) {
                            Some((loaded, source)) => {
                                messages.push(format!(
                                    "edge.pfx removed: serving the certificate uploaded in the cloud ({source})"
                                ));
                                edge.cert.replace(loaded, source);
                            }
                            None => messages.push(
                                "edge.pfx removed, but no certificate from the cloud is kept yet: the file's certificate serves until one arrives".into(),
                            ),
                        }
                    }
                }
            }
            let upstream_changed = old
                .provisioning
                .as_ref()
                .map(|p| (&p.upstream, &p.ca_file, p.timeout, p.connect_timeout))
                != new
                    .provisioning
                    .as_ref()
                    .map(|p| (&p.upstream, &p.ca_file, p.timeout, p.connect_timeout));
            if upstream_changed {
                match new.provisioning.as_ref().map(Upstream::new).transpose() {
                    Ok(up) => {
                        messages.push(match &up {
                            Some(u) => format!("provisioning upstream is now {}", u.describe()),
                            None => "provisioning upstream removed".to_string(),
                        });
                        edge.upstream.set(up.map(Arc::new));
                    }
                    Err(e) => {
                        ok = false;
                        messages.push(format!("provisioning upstream not changed: {e:#}"));
                    }
                }
            }
            if e.listen != edge.cfg.listen || e.legacy_http_listen != edge.cfg.legacy_http_listen {
                messages.push("edge listen addresses changed: takes effect after a restart".into());
            }
        }
        (None, Some(_)) | (Some(_), None) => {
            messages.push("[edge] was added or removed: takes effect after a restart".into());
        }
        (None, None) => {}
    }
    if format!("{:?}", old.cloud) != format!("{:?}", new.cloud) || old.state_dir != new.state_dir {
        messages.push("[cloud] or state_dir changed: takes effect after a restart".into());
    }
    if messages.is_empty() {
        messages.push("configuration re-read; nothing to change".into());
    }
    ReloadOutcome { ok, messages }
}
