//! Registration and heartbeats. Registers with tenant ID + PIN, then heartbeats every interval.
//! A rejected PIN is retried only every `pin_retry_interval`; other failures back off exponentially.

use super::Dispatch;
use crate::cloud::CloudError;
use crate::cloud::Sessions;
use crate::ctx::{Ctx, Registration};
use crate::protocol::{
    AgentState, AgentsState, ErrorCode, HeartbeatRequest, HeartbeatResponse, PATH_HEARTBEAT,
    PATH_REGISTER, PROTOCOL_VERSION, RegisterRequest, RegisterResponse,
};
use crate::util::backoff::{Backoff, jitter, sleep_or_shutdown};
use anyhow::Result;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why a registration did not produce a session.
enum RegisterError {
    /// The cloud refused the credentials (or our protocol): retry slowly.
    Rejected(String),
    /// Anything else: retry with backoff.
    Failed(String),
}

pub async fn run(
    ctx: Ctx,
    sessions: Arc<Sessions>,
    dispatch: Arc<dyn Dispatch>,
    shutdown: CancellationToken,
) -> Result<()> {
    let cfg = &ctx.config.cloud;
    let mut interval = cfg.heartbeat_interval;
    ctx.status.lock().heartbeat_interval_s = interval.as_secs();
    let mut reg_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
    let mut hb_backoff = Backoff::new(hb_backoff_base(interval), interval);
    let mut seq = 0u64;
    let mut session_rx = sessions.subscribe();
    let mut registered_at = Instant::now();
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let Some(session) = sessions.current() else {
            let wait = match register(&ctx).await {
                Ok(resp) => {
                    if resp.heartbeat_interval_s > 0 {
                        interval = cfg
                            .heartbeat_interval
                            .min(Duration::from_secs(resp.heartbeat_interval_s.max(1)));
                    }
                    hb_backoff = Backoff::new(hb_backoff_base(interval), interval);
                    let s = sessions.set(resp.token);
                    session_rx.mark_unchanged();
                    registered_at = Instant::now();
                    let mut st = ctx.status.lock();
                    st.registration = Registration::Registered;
                    st.registered_at = Some(SystemTime::now());
                    st.registrations += 1;
                    st.heartbeat_interval_s = interval.as_secs();
                    drop(st);
                    info!(relay_id = %ctx.relay_id, generation = s.generation, "registered with cloud");
                    continue; // heartbeat at once
                }
                Err(RegisterError::Rejected(why)) => {
                    warn!(reason = %why, retry_in = ?cfg.pin_retry_interval, "cloud rejected registration");
                    ctx.status.lock().registration = Registration::Rejected(why);
                    jitter(cfg.pin_retry_interval, 0.1)
                }
                Err(RegisterError::Failed(why)) => {
                    let d = reg_backoff.next_delay();
                    warn!(reason = %why, retry_in = ?d, "registration failed");
                    ctx.status.lock().registration = Registration::Failed(why);
                    d
                }
            };
            if !sleep_or_shutdown(wait, &shutdown).await {
                return Ok(());
            }
            continue;
        };

        seq += 1;
        let sent_at = Instant::now();
        let wait = match heartbeat(&ctx, dispatch.as_ref(), &session.token, seq).await {
            Ok(resp) => {
                hb_backoff.reset();
                reg_backoff.reset();
                if resp.next_interval_s > 0 {
                    interval = cfg
                        .heartbeat_interval
                        .min(Duration::from_secs(resp.next_interval_s.max(1)));
                }
                let mut st = ctx.status.lock();
                st.heartbeats_ok += 1;
                st.last_heartbeat = Some((SystemTime::now(), Ok(())));
                st.heartbeat_interval_s = interval.as_secs();
                if st.site != resp.site {
                    match &resp.site {
                        Some(site) => {
                            info!(site = %site.name, isolated = site.isolated, "the cloud placed this relay in a site")
                        }
                        None => info!("the cloud placed this relay in no site"),
                    }
                    st.site = resp.site.clone();
                }
                drop(st);
                tracing::debug!(seq, "heartbeat ok");
                dispatch.leases(&resp.leases, sent_at);
                // The cloud's image or device list may have changed: their jobs look.
                dispatch.images_revision(resp.images_revision, false);
                dispatch.devices_revision(resp.devices_revision);
                if let Some(upload) = resp.log_upload {
                    ctx.device_logs.set_cloud_setting(upload);
                }
                jitter(interval, 0.05)
            }
            Err(e) => {
                let why = e.to_string();
                {
                    let mut st = ctx.status.lock();
                    st.heartbeats_failed += 1;
                    st.last_heartbeat = Some((SystemTime::now(), Err(why.clone())));
                }
                if e.code() == Some(ErrorCode::TokenInvalid) {
                    info!("cloud no longer accepts our session token; registering again");
                    sessions.invalidate(session.generation);
                    ctx.status.lock().registration =
                        Registration::Failed("session expired, registering again".into());
                    // A cloud that rejects every fresh token must not be hammered.
                    if registered_at.elapsed() < Duration::from_secs(5) {
                        reg_backoff.next_delay()
                    } else {
                        Duration::ZERO
                    }
                } else {
                    // Sooner than the interval to notice recovery, but never faster than the base.
                    let d = hb_backoff
                        .next_delay()
                        .max(hb_backoff_base(interval))
                        .min(interval);
                    warn!(seq, error = %why, retry_in = ?d, "heartbeat failed");
                    d
                }
            }
        };
        // Wake early when another loop invalidates the session (it saw a 401).
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Ok(()),
            changed = session_rx.changed() => { if changed.is_err() { return Ok(()); } }
        }
    }
}

/// First retry delay after a failed heartbeat.
fn hb_backoff_base(interval: Duration) -> Duration {
    Duration::from_secs(5).min(interval)
}

async fn register(ctx: &Ctx) -> Result<RegisterResponse, RegisterError> {
    let cfg = &ctx.config.cloud;
    let pin = cfg
        .pin
        .read()
        .map_err(|e| RegisterError::Failed(format!("cannot read the PIN: {e}")))?;
    let req = RegisterRequest {
        protocol: PROTOCOL_VERSION,
        tenant_id: cfg.tenant_id.clone(),
        pin: pin.expose().to_string(),
        relay_id: ctx.relay_id.to_string(),
        hostname: ctx.hostname.to_string(),
        version: crate::util::build::VERSION.into(),
        fqdn: ctx
            .config
            .edge
            .as_ref()
            .map(|e| e.fqdn.clone())
            .unwrap_or_default(),
        addresses: super::reported_addresses(&ctx.config),
        subnets: super::reported_subnets(&ctx.config),
    };
    ctx.status.lock().addresses = req.addresses.clone();
    ctx.cloud
        .json(http::Method::POST, PATH_REGISTER, None, Some(&req))
        .await
        .map_err(|e| match &e {
            CloudError::Status {
                code: ErrorCode::PinRejected | ErrorCode::UnknownTenant,
                message,
                ..
            } => RegisterError::Rejected(message.clone()),
            CloudError::Status {
                code: ErrorCode::UnsupportedVersion,
                message,
                ..
            } => RegisterError::Rejected(format!(
                "the cloud does not speak protocol v{PROTOCOL_VERSION}: {message}; upgrade ucrelay"
            )),
            // Any other 401 at registration also means the credentials were refused.
            CloudError::Status {
                status: 401,
                message,
                ..
            } => RegisterError::Rejected(message.clone()),
            _ => RegisterError::Failed(e.to_string()),
        })
}

async fn heartbeat(
    ctx: &Ctx,
    dispatch: &dyn Dispatch,
    token: &str,
    seq: u64,
) -> Result<HeartbeatResponse, CloudError> {
    let pending = ctx.store.run(|s| s.outbox_len()).await.unwrap_or(0);
    let st = ctx.status.snapshot();
    let jobs = dispatch.report();
    let mut troubles = Vec::new();
    if st.channel != crate::ctx::ChannelState::Connected {
        troubles.push("command channel down".to_string());
    }
    // A full disk under the store: the cloud learns why commands and tasks are refused.
    if let Some(t) = ctx.store.trouble() {
        troubles.push(t.message);
    }
    let management = AgentState {
        state: if troubles.is_empty() {
            "ok"
        } else {
            "degraded"
        }
        .into(),
        reason: (!troubles.is_empty()).then(|| troubles.join("; ")),
    };
    let req = HeartbeatRequest {
        seq,
        uptime_s: ctx.started.elapsed().as_secs(),
        version: crate::util::build::VERSION.into(),
        agents: AgentsState {
            management,
            download: jobs.download,
            provisioning: jobs.provisioning,
        },
        images: jobs.images,
        results_pending: pending,
        devices: jobs.devices,
        tasks: jobs.tasks,
        fqdn: ctx
            .config
            .edge
            .as_ref()
            .map(|e| e.fqdn.clone())
            .unwrap_or_default(),
        addresses: super::reported_addresses(&ctx.config),
        subnets: super::reported_subnets(&ctx.config),
    };
    ctx.status.lock().addresses = req.addresses.clone();
    ctx.cloud
        .json(http::Method::POST, PATH_HEARTBEAT, Some(token), Some(&req))
        .await
}
