//! What the relay hands over about one device as files: the one-click export (`export_device`:
//! the device's state, its current configuration, the logs the relay kept and, optionally, a
//! packet capture of a few seconds, in one tar.gz), and the commands that read what the relay
//! keeps without contacting the device (`list_config_backups`, `get_config_backup`,
//! `delete_config_backup`, `get_device_logs`).

use super::DevicePlane;
use super::actions::{self, Done, OpCx, call};
use super::backups;
use super::captures::{self, CaptureRecord, Fetch, file_stamp};
use super::client::{DeviceError, Session};
use crate::artifacts::{ArtifactError, Meta};
use crate::protocol::{ArtifactRef, Command, Outcome};
use crate::util::time::rfc3339;
use serde_json::{Value, json};
use std::time::{Duration, Instant, SystemTime};
use tracing::info;

fn gz_tar<W: std::io::Write>(w: W) -> tar::Builder<flate2::write::GzEncoder<W>> {
    tar::Builder::new(flate2::write::GzEncoder::new(
        w,
        // Most of an export is compressed already (captures); do not spend CPU on it again.
        flate2::Compression::fast(),
    ))
}

fn append_bytes<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    h.set_cksum();
    tar.append_data(&mut h, path, data)
}

/// `export_device`: everything a support engineer asks for first, in one artifact.
pub async fn export(
    s: &mut Session,
    cx: &OpCx<'_>,
    capture_s: Option<u32>,
) -> Result<Done, DeviceError> {
    let info = actions::device_info(s).await?;
    let mac = info.mac.clone().unwrap_or_else(|| "device".into());
    let mut notes: Vec<String> = Vec::new();
    let lines = call(s, "/api/v1/mgmt/lineInfo", None, true).await.ok();
    let stats = call(s, "/api/v1/mgmt/device/stats", None, true).await.ok();
    let mut configs: Vec<(String, String)> = Vec::new();
    for (source, label) in [(4, "all_but_device"), (3, "device")] {
        match s
            .get_raw(&format!(
                "/Utilities/configuration/exportFile?source={source}"
            ))
            .await
        {
            Ok((_, body)) => {
                let text =
                    String::from_utf8_lossy(&body[..body.len().min(actions::MAX_CONFIG_EXPORT)]);
                configs.push((format!("config-{label}.cfg"), actions::mask_config(&text)));
            }
            Err(e) => notes.push(format!("configuration ({label}) not exported: {e}")),
        }
    }
    let mut capture: Option<ArtifactRef> = None;
    if let Some(secs) = capture_s {
        match take_capture(s, cx, &mac, secs).await {
            Ok(r) => capture = Some(r),
            Err(Fetch::Device(e)) => notes.push(format!("packet capture not taken: {e}")),
            Err(Fetch::Failed(why)) => notes.push(format!("packet capture not taken: {why}")),
        }
    }
    let log_files = if info.mac.is_some() {
        cx.plane.logs.files(&mac)
    } else {
        Vec::new()
    };
    if log_files.is_empty() {
        notes.push(if cx.plane.logs.collecting() {
            "the relay keeps no logs of this device (it has uploaded none since collection began)"
                .into()
        } else {
            "the relay keeps no device logs: the cloud takes them (log_upload is on)".into()
        });
    }
    let now = SystemTime::now();
    let device_json = json!({
        "target": cx.target.to_string(),
        "exported_at": rfc3339(now),
        "relay_version": crate::util::build::VERSION,
        "device_info": info.raw,
        "lines": lines,
        "stats": stats,
    });
    let name = format!("{mac}_{}.export.tar.gz", file_stamp(now));
    let meta = Meta::new("device_export", &name, "application/gzip")
        .device(Some(cx.target.to_string()), info.mac.clone())
        .command(Some(cx.command_id.to_string()));
    let artifacts = cx.plane.artifacts.clone();
    let capture_path = capture
        .as_ref()
        .map(|c| (c.name.clone(), artifacts.path(&c.artifact_id)));
    let mut contents: Vec<String> = Vec::new();
    contents.push("README.txt".into());
    contents.push("device.json".into());
    contents.extend(configs.iter().map(|(n, _)| n.clone()));
    contents.extend(log_files.iter().map(|(n, _, _)| format!("logs/{n}")));
    if let Some((n, _)) = &capture_path {
        contents.push(format!("capture/{n}"));
    }
    let readme = format!(
        "One-click export of device {target} ({mac}, {model}, firmware {fw}), made by ucrelay {v} at {at}.\n\nContents:\n{list}\n{notes}",
        target = cx.target,
        model = info.model,
        fw = info.firmware,
        v = crate::util::build::VERSION,
        at = rfc3339(now),
        list = contents
            .iter()
            .map(|c| format!("  {c}\n"))
            .collect::<String>(),
        notes = if notes.is_empty() {
            String::new()
        } else {
            format!(
                "\nNotes:\n{}",
                notes.iter().map(|n| format!("  {n}\n")).collect::<String>()
            )
        },
    );
    let a = artifacts.clone();
    let built = tokio::task::spawn_blocking(move || -> Result<ArtifactRef, ArtifactError> {
        let w = a.create(meta)?;
        let tmp_hint = std::path::PathBuf::from("export");
        let io = |e| ArtifactError::from_io(e, &tmp_hint);
        let mut tar = gz_tar(w);
        append_bytes(&mut tar, "README.txt", readme.as_bytes()).map_err(io)?;
        let dj = serde_json::to_vec_pretty(&device_json).unwrap_or_default();
        append_bytes(&mut tar, "device.json", &dj).map_err(io)?;
        for (n, text) in &configs {
            append_bytes(&mut tar, n, text.as_bytes()).map_err(io)?;
        }
        for (n, path, _) in &log_files {
            tar.append_path_with_name(path, format!("logs/{n}"))
                .map_err(io)?;
        }
        if let Some((n, path)) = &capture_path {
            tar.append_path_with_name(path, format!("capture/{n}"))
                .map_err(io)?;
        }
        let w = tar.into_inner().map_err(io)?.finish().map_err(io)?;
        w.finish()
    })
    .await;
    // The capture is inside the export now; its own copy is not needed.
    if let Some(c) = &capture {
        let _ = cx.plane.artifacts.remove(&c.artifact_id);
    }
    match built {
        Ok(Ok(r)) => {
            info!(device = %cx.target, artifact = %r.artifact_id, bytes = r.size, "device export stored");
            Ok(Done::ok(json!({
                "artifact": r,
                "contents": contents,
                "notes": notes,
            })))
        }
        Ok(Err(e)) => Ok(Done::fail(format!("cannot keep the export: {e}"))),
        Err(e) => Ok(Done::fail(format!("cannot build the export: {e}"))),
    }
}

/// A short packet capture for an export: started, left running `secs`, fetched.
async fn take_capture(
    s: &mut Session,
    cx: &OpCx<'_>,
    mac: &str,
    secs: u32,
) -> Result<ArtifactRef, Fetch> {
    if captures::all(cx.plane)
        .await
        .iter()
        .any(|c| c.target == cx.target.to_string() && c.state == "running")
    {
        return Err(Fetch::Failed(
            "a packet capture is already running on the device".into(),
        ));
    }
    call(
        s,
        "/api/v1/mgmt/config/set",
        Some(json!({
            "diags.pcap.enabled": "1",
            "diags.pcap.background.enabled": "1",
            "diags.pcap.background.filter": "",
            "diags.pcap.background.bufferSize": (10 * 1024).to_string(),
            "diags.pcap.background.duration": secs.div_ceil(60).max(1).to_string(),
        })),
        false,
    )
    .await?;
    let started = SystemTime::now();
    let wait = Duration::from_secs(u64::from(secs));
    let latest = cx
        .deadline
        .checked_sub(Duration::from_secs(20))
        .unwrap_or(cx.deadline);
    tokio::time::sleep(wait.min(latest.saturating_duration_since(Instant::now()))).await;
    let rec = CaptureRecord {
        id: uuid::Uuid::new_v4().to_string(),
        target: cx.target.to_string(),
        mac: mac.to_string(),
        command_id: cx.command_id.to_string(),
        filter: String::new(),
        max_size_mb: 10,
        duration_min: 1,
        started_at: rfc3339(started),
        ends_at: rfc3339(SystemTime::now()),
        name: captures::file_name(mac, started),
        state: "running".into(),
        ended_reason: None,
        artifact: None,
        password: None,
    };
    captures::fetch(s, cx.plane, cx.target, &rec, cx.command_id, cx.deadline).await
}

/// The MAC a command names: `params.mac`, or the MAC the relay knows for `params.target`.
fn mac_of(plane: &DevicePlane, params: &Value) -> Result<String, String> {
    if let Some(m) = params.get("mac").and_then(Value::as_str) {
        return crate::devlogs::normalise_mac(m)
            .ok_or_else(|| format!("mac {m:?} is not a MAC address (12 hex digits)"));
    }
    let Some(t) = params.get("target").and_then(Value::as_str) else {
        return Err("params.mac (or params.target of a known device) is required".into());
    };
    let target = super::client::Target::parse(t)?;
    plane
        .registry
        .mac_of(&target.to_string())
        .ok_or_else(|| format!("the relay does not know the MAC of {t}; give params.mac"))
}

/// The relay-level commands about what it keeps for a device.
pub async fn kept(plane: &DevicePlane, cmd: &Command) -> Done {
    let mac = match mac_of(plane, &cmd.params) {
        Ok(m) => m,
        Err(why) => return Done::fail(why),
    };
    let backup_id = || -> Result<String, Done> {
        match cmd.params.get("backup_id").and_then(Value::as_str) {
            Some(id) if backups::valid_id(id) || id == "latest" => Ok(id.to_string()),
            Some(id) => Err(Done::fail(format!("backup_id {id:?} is not a backup id"))),
            None => Err(Done::fail("params.backup_id is required (or \"latest\")")),
        }
    };
    match cmd.name.as_str() {
        "list_config_backups" => match backups::list(plane, &mac).await {
            Ok(list) => Done::ok(json!({
                "mac": mac,
                "keep": backups::KEEP,
                "backups": list.iter().map(backups::Backup::summary).collect::<Vec<_>>(),
            })),
            Err(why) => Done::fail(why),
        },
        "get_config_backup" => {
            let id = match backup_id() {
                Ok(i) => i,
                Err(d) => return d,
            };
            let b = match backups::get(plane, &mac, &id).await {
                Ok(b) => b,
                Err(why) => return Done::fail(why),
            };
            let stamp = crate::util::time::parse_rfc3339(&b.taken_at).unwrap_or(SystemTime::now());
            let name = format!("{mac}_{}_{}.cfg", b.source, file_stamp(stamp));
            let meta = Meta::new("config_backup", name, "text/plain")
                .device(Some(b.target.clone()), Some(mac.clone()))
                .command(Some(cmd.id.clone()));
            match plane
                .artifacts
                .put(meta, b.masked().into_bytes().into())
                .await
            {
                Ok(r) => Done::ok(json!({"backup": b.summary(), "artifact": r})),
                Err(e) => Done::fail(format!("cannot hand over the backup: {e}")),
            }
        }
        "delete_config_backup" => {
            let id = match backup_id() {
                Ok(i) => i,
                Err(d) => return d,
            };
            let id = if id == "latest" {
                match backups::get(plane, &mac, "latest").await {
                    Ok(b) => b.id,
                    Err(why) => return Done::fail(why),
                }
            } else {
                id
            };
            match backups::delete(plane, &mac, &id).await {
                Ok(()) => Done::ok(json!({"mac": mac, "deleted": id})),
                Err(why) => Done::fail(why),
            }
        }
        "get_device_logs" => match device_logs(plane, &mac, Some(cmd.id.clone())).await {
            Ok(Some((r, files))) => Done::ok(json!({"mac": mac, "files": files, "artifact": r})),
            Ok(None) => Done {
                result: Outcome::NotApplicable,
                reason: if plane.logs.collecting() {
                    format!("the relay keeps no logs of device {mac}")
                } else {
                    format!(
                        "the relay keeps no logs of device {mac}: the cloud takes device logs (log_upload is on)"
                    )
                },
                payload: Value::Null,
                cause: None,
            },
            Err(e) => Done::fail(format!("cannot hand over the logs: {e}")),
        },
        other => Done::fail(format!("{other:?} is not a command about kept device data")),
    }
}

/// One device's kept logs as a tar.gz artifact; None when there are none.
pub async fn device_logs(
    plane: &DevicePlane,
    mac: &str,
    command_id: Option<String>,
) -> Result<Option<(ArtifactRef, usize)>, ArtifactError> {
    if plane.logs.files(mac).is_empty() {
        return Ok(None);
    }
    let name = format!("{mac}_logs_{}.tar.gz", file_stamp(SystemTime::now()));
    let meta = Meta::new("device_logs", name, "application/gzip")
        .device(None, Some(mac.to_string()))
        .command(command_id);
    let (artifacts, logs, mac) = (plane.artifacts.clone(), plane.logs.clone(), mac.to_string());
    tokio::task::spawn_blocking(move || {
        let mut w = artifacts.create(meta)?;
        let n = logs
            .write_tar_gz(&mac, &mut w)
            .map_err(|e| ArtifactError::from_io(e, std::path::Path::new("device logs")))?;
        Ok(Some((w.finish()?, n)))
    })
    .await
    .map_err(|e| ArtifactError::Io {
        path: "device logs".into(),
        source: std::io::Error::other(e.to_string()),
    })?
}
