//! Packet captures as files. `start` turns on the device's background capture (filter, size and
//! time limits) and remembers the capture in the store; `stop` has the device upload the file to
//! a one-time URL on the relay's own edge and keeps it as an artifact named
//! `<mac>_<yyyy.mm.dd_HHMMSS>.pcap.tar.gz` (UTC start time) until the cloud has it; `cancel` turns
//! the capture off and drops the file, on the device and on the relay if it was fetched already.
//!
//! A capture also ends by itself: every few seconds the relay looks at each running capture and
//! fetches the file once its time limit has passed or the device stopped at its size limit. The
//! artifact then names the command that started the capture, and a later `stop` answers with it.
//! Captures are in the store, so a restart does not lose one.

use super::DevicePlane;
use super::actions::{self, Capture, Done, OpCx, call};
use super::client::{DeviceError, Session, Target};
use crate::protocol::ArtifactRef;
use crate::util::secret::Secret;
use crate::util::time::{parse_rfc3339, rfc3339};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often running captures are looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How long a finished capture is remembered (so that a late `stop` gets its file).
const KEEP_ENDED: Duration = Duration::from_secs(24 * 3600);
/// How long the relay keeps trying to fetch a capture whose device is unreachable.
const GIVE_UP_AFTER: Duration = Duration::from_secs(3600);

/// One capture, as stored (keyed by the device's address: a device runs one at a time).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptureRecord {
    pub id: String,
    pub target: String,
    pub mac: String,
    /// The command (or task) that started it; its artifact names it.
    pub command_id: String,
    pub filter: String,
    pub max_size_mb: u32,
    pub duration_min: u32,
    pub started_at: String,
    pub ends_at: String,
    /// `<mac>_<yyyy.mm.dd_HHMMSS>.pcap.tar.gz`
    pub name: String,
    /// `running` or `ended`.
    pub state: String,
    #[serde(default)]
    pub ended_reason: Option<String>,
    #[serde(default)]
    pub artifact: Option<ArtifactRef>,
    /// The device password the start command carried, when it was not the configured one: the
    /// relay needs it to end the capture by itself. Dropped with the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// `yyyy.mm.dd_HHMMSS` in UTC.
pub fn file_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .strftime("%Y.%m.%d_%H%M%S")
        .to_string()
}

/// The capture file's name: `<mac>_<yyyy.mm.dd_HHMMSS>.pcap.tar.gz`.
pub fn file_name(mac: &str, started: SystemTime) -> String {
    format!("{mac}_{}.pcap.tar.gz", file_stamp(started))
}

async fn load(plane: &DevicePlane, target: &str) -> Option<CaptureRecord> {
    let t = target.to_string();
    let rows = plane.store.run(|s| s.captures_all()).await.ok()?;
    rows.into_iter()
        .filter(|(k, _)| *k == t)
        .find_map(|(_, v)| serde_json::from_slice(&v).ok())
}

async fn save(plane: &DevicePlane, rec: &CaptureRecord) -> Result<(), String> {
    let value = serde_json::to_vec(rec).map_err(|e| e.to_string())?;
    let key = rec.target.clone();
    plane
        .store
        .run(move |s| s.set_capture(&key, Some(&value)))
        .await
        .map_err(|e| format!("cannot store the capture: {e:#}"))
}

async fn forget(plane: &DevicePlane, target: &str) {
    let key = target.to_string();
    if let Err(e) = plane.store.run(move |s| s.set_capture(&key, None)).await {
        warn!(device = %target, error = %format!("{e:#}"), "cannot forget a finished capture");
    }
}

/// Every capture the relay remembers.
pub async fn all(plane: &DevicePlane) -> Vec<CaptureRecord> {
    plane
        .store
        .run(|s| s.captures_all())
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect()
}

pub async fn perform(s: &mut Session, cx: &OpCx<'_>, c: &Capture) -> Result<Done, DeviceError> {
    let key = cx.target.to_string();
    match c {
        Capture::Start {
            filter,
            max_size_mb,
            duration_min,
        } => {
            if let Some(old) = load(cx.plane, &key).await
                && old.state == "running"
            {
                return Ok(Done::fail(format!(
                    "a packet capture is already running on {key} (since {}); stop or cancel it first",
                    old.started_at
                )));
            }
            if cx.plane.artifacts.upload_base().is_none() {
                return Ok(Done::fail(
                    "packet captures need the relay's [edge]: the device uploads the file to it",
                ));
            }
            let info = actions::device_info(s).await?;
            let Some(mac) = info.mac else {
                return Ok(Done::fail(
                    "the device did not tell its MAC (needed to name the capture file)",
                ));
            };
            call(
                s,
                "/api/v1/mgmt/config/set",
                Some(json!({
                    "diags.pcap.enabled": "1",
                    "diags.pcap.background.enabled": "1",
                    "diags.pcap.background.filter": filter,
                    "diags.pcap.background.bufferSize": (max_size_mb * 1024).to_string(),
                    "diags.pcap.background.duration": duration_min.to_string(),
                })),
                false,
            )
            .await?;
            let now = SystemTime::now();
            let ends = now + Duration::from_secs(u64::from(*duration_min) * 60);
            let own_password = cx.plane.password(None);
            let rec = CaptureRecord {
                id: uuid::Uuid::new_v4().to_string(),
                target: key.clone(),
                name: file_name(&mac, now),
                mac,
                command_id: cx.command_id.to_string(),
                filter: filter.clone(),
                max_size_mb: *max_size_mb,
                duration_min: *duration_min,
                started_at: rfc3339(now),
                ends_at: rfc3339(ends),
                state: "running".into(),
                ended_reason: None,
                artifact: None,
                password: (cx.password.expose() != own_password.expose())
                    .then(|| cx.password.expose().to_string()),
            };
            if let Err(why) = save(cx.plane, &rec).await {
                return Ok(Done::fail(why));
            }
            info!(device = %key, capture = %rec.id, name = %rec.name, "packet capture started");
            Ok(Done::ok(json!({
                "capture": "started",
                "capture_id": rec.id,
                "name": rec.name,
                "filter": filter,
                "max_size_mb": max_size_mb,
                "duration_min": duration_min,
                "ends_at": rec.ends_at,
            })))
        }
        Capture::Stop => {
            let rec = match load(cx.plane, &key).await {
                Some(r) if r.state == "ended" => {
                    return Ok(Done::ok(json!({
                        "capture": "ended",
                        "capture_id": r.id,
                        "name": r.name,
                        "ended": r.ended_reason,
                        "artifact": r.artifact,
                    })));
                }
                Some(r) => r,
                None => {
                    // Not started through this relay (or before a restore): still fetch it.
                    let info = actions::device_info(s).await?;
                    let mac = info.mac.unwrap_or_else(|| "device".into());
                    let now = SystemTime::now();
                    CaptureRecord {
                        id: uuid::Uuid::new_v4().to_string(),
                        target: key.clone(),
                        name: file_name(&mac, now),
                        mac,
                        command_id: cx.command_id.to_string(),
                        filter: String::new(),
                        max_size_mb: 10,
                        duration_min: 0,
                        started_at: rfc3339(now),
                        ends_at: rfc3339(now),
                        state: "running".into(),
                        ended_reason: None,
                        artifact: None,
                        password: None,
                    }
                }
            };
            match fetch(s, cx.plane, cx.target, &rec, cx.command_id, cx.deadline).await {
                Ok(r) => {
                    forget(cx.plane, &key).await;
                    info!(device = %key, artifact = %r.artifact_id, bytes = r.size, "packet capture stopped and fetched");
                    Ok(Done::ok(json!({
                        "capture": "stopped",
                        "capture_id": rec.id,
                        "name": r.name,
                        "artifact": r,
                    })))
                }
                Err(Fetch::Device(e)) => Err(e),
                Err(Fetch::Failed(why)) => Ok(Done::fail(why)),
            }
        }
        Capture::Cancel => {
            call(
                s,
                "/api/v1/mgmt/config/set",
                Some(json!({"diags.pcap.background.enabled": "0", "diags.pcap.enabled": "0"})),
                false,
            )
            .await?;
            let mut dropped_artifact = false;
            if let Some(rec) = load(cx.plane, &key).await {
                if let Some(a) = &rec.artifact {
                    dropped_artifact = cx.plane.artifacts.remove(&a.artifact_id).unwrap_or(false);
                }
                forget(cx.plane, &key).await;
            }
            info!(device = %key, "packet capture cancelled; file dropped");
            Ok(Done::ok(json!({
                "capture": "cancelled",
                "file": "dropped",
                "relay_copy_dropped": dropped_artifact,
            })))
        }
    }
}

/// Why a capture file did not arrive.
pub enum Fetch {
    Device(DeviceError),
    Failed(String),
}

impl From<DeviceError> for Fetch {
    fn from(e: DeviceError) -> Fetch {
        Fetch::Device(e)
    }
}

/// Has the device upload its capture into a one-time slot and waits for it, until `until`.
pub async fn fetch(
    s: &mut Session,
    plane: &DevicePlane,
    target: &Target,
    rec: &CaptureRecord,
    command_id: &str,
    until: Instant,
) -> Result<ArtifactRef, Fetch> {
    let ttl = until
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(5));
    // The tar.gz of a capture is at most a little over the capture itself.
    let max = u64::from(rec.max_size_mb) * 1024 * 1024 + 1024 * 1024;
    let meta = crate::artifacts::Meta::new("packet_capture", &rec.name, "application/gzip")
        .device(Some(rec.target.clone()), Some(rec.mac.clone()))
        .command(Some(command_id.to_string()));
    let (url, rx) = plane
        .artifacts
        .open_slot(target.ip, meta, max, ttl)
        .map_err(Fetch::Failed)?;
    match call(
        s,
        "/api/v1/mgmt/network/uploadBgCapture",
        Some(json!({"url": url})),
        false,
    )
    .await
    {
        Err(DeviceError::Api(code)) if code == "4003" => {
            return Err(Fetch::Failed(
                "the device has no packet capture to upload (status 4003)".into(),
            ));
        }
        other => {
            other?;
        }
    }
    call(
        s,
        "/api/v1/mgmt/config/set",
        Some(json!({"diags.pcap.background.enabled": "0"})),
        false,
    )
    .await?;
    match tokio::time::timeout(ttl, rx).await {
        Ok(Ok(Ok(r))) => Ok(r),
        Ok(Ok(Err(why))) => Err(Fetch::Failed(format!(
            "the device's upload of its capture failed: {why}"
        ))),
        Ok(Err(_)) | Err(_) => Err(Fetch::Failed(format!(
            "the device did not upload its capture within {}",
            humantime::format_duration(Duration::from_secs(ttl.as_secs()))
        ))),
    }
}

/// Ends captures that reached their limit and fetches their files; forgets old finished ones.
pub async fn run(plane: Arc<DevicePlane>, shutdown: CancellationToken) -> Result<()> {
    if !plane.cfg().enabled {
        shutdown.cancelled().await;
        return Ok(());
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        for rec in all(&plane).await {
            let check = check_one(&plane, rec);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = check => {}
            }
        }
    }
}

async fn check_one(plane: &Arc<DevicePlane>, mut rec: CaptureRecord) {
    let now = SystemTime::now();
    let ends = parse_rfc3339(&rec.ends_at).unwrap_or(now);
    if rec.state == "ended" {
        if now.duration_since(ends).is_ok_and(|d| d > KEEP_ENDED) {
            forget(plane, &rec.target).await;
        }
        return;
    }
    let target = match plane.check_target(&rec.target) {
        Ok(t) => t,
        Err(why) => {
            warn!(device = %rec.target, "packet capture forgotten: {why}");
            forget(plane, &rec.target).await;
            return;
        }
    };
    let password = match &rec.password {
        Some(p) => Secret::new(p),
        None => plane.password(None),
    };
    let timed_out = now >= ends;
    let until = Instant::now() + plane.cfg().target_timeout;
    let work = async {
        let _guard = plane.lock(&target).await;
        let _permit = plane.session_permit().await?;
        let mut s = plane.open(&target, &password).await?;
        if !timed_out {
            let v = call(
                &mut s,
                "/api/v1/mgmt/config/get",
                Some(json!(["diags.pcap.background.enabled"])),
                false,
            )
            .await?;
            let on = v
                .get("diags.pcap.background.enabled")
                .and_then(|p| p.get("Value"))
                .and_then(|v| v.as_str())
                == Some("1");
            if on {
                return Ok(None);
            }
        }
        let command_id = rec.command_id.clone();
        fetch(&mut s, plane, &target, &rec, &command_id, until)
            .await
            .map(Some)
    };
    let outcome = match tokio::time::timeout(plane.cfg().target_timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Fetch::Failed("the device did not answer in time".into())),
    };
    match outcome {
        Ok(None) => {}
        Ok(Some(r)) => {
            let why = if timed_out {
                format!("its time limit ({} min)", rec.duration_min)
            } else {
                format!("its size limit ({} MB)", rec.max_size_mb)
            };
            info!(device = %rec.target, artifact = %r.artifact_id, name = %r.name, bytes = r.size, "packet capture ended at {why}; its file waits for upload to the cloud");
            rec.state = "ended".into();
            rec.ended_reason = Some(why);
            rec.ends_at = rfc3339(now);
            rec.artifact = Some(r);
            rec.password = None;
            if let Err(e) = save(plane, &rec).await {
                warn!(device = %rec.target, error = %e, "cannot record the end of a capture");
            }
        }
        Err(e) => {
            let why = match e {
                Fetch::Device(e) => e.to_string(),
                Fetch::Failed(w) => w,
            };
            if now.duration_since(ends).is_ok_and(|d| d > GIVE_UP_AFTER) {
                warn!(device = %rec.target, reason = %why, "cannot fetch a finished packet capture; giving up");
                forget(plane, &rec.target).await;
            } else {
                debug!(device = %rec.target, reason = %why, "packet capture not fetched yet");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_files_are_named_like_the_reference_agent() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_428_000);
        assert_eq!(
            file_name("0004f2000031", t),
            "0004f2000031_2026.11.23_100000.pcap.tar.gz"
        );
    }
}
