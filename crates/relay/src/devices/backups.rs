//! Configuration backups: every `get_config` result is kept as a backup of that device (by MAC),
//! with its source and time, at most [`KEEP`] per device (the oldest drops out, in the same store
//! transaction). Backups can be listed, downloaded, deleted, and restored: the backup's parameters
//! are pushed back to the device with `config/set`.
//!
//! A backup keeps the device's export as it came, secrets included, so that a restore puts them
//! back; they never leave the relay: listings, downloads and results mask password-like values.

use super::DevicePlane;
use super::actions::{self, ConfigSource, Done, MAX_CONFIG_EXPORT, MAX_SET_PARAMS, OpCx, call};
use super::client::{DeviceError, Session};
use crate::protocol::Outcome;
use crate::util::time::rfc3339;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::SystemTime;
use tracing::info;

/// Backups kept per device.
pub const KEEP: usize = 5;

/// One stored backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Backup {
    /// Sorts by time: `20261123T100000.123Z-1a2b3c4d`.
    pub id: String,
    pub mac: String,
    /// The device's address when the backup was taken.
    pub target: String,
    pub source: String,
    pub taken_at: String,
    pub bytes: u64,
    /// The export was longer than the relay keeps (1 MiB) and is cut.
    #[serde(default)]
    pub truncated: bool,
    /// The command or task that took it.
    #[serde(default)]
    pub command_id: String,
    pub content: String,
}

impl Backup {
    /// What listings show: everything but the content.
    pub fn summary(&self) -> Value {
        json!({
            "backup_id": self.id,
            "mac": self.mac,
            "target": self.target,
            "source": self.source,
            "taken_at": self.taken_at,
            "bytes": self.bytes,
            "truncated": self.truncated,
            "command_id": self.command_id,
        })
    }

    /// The content with secrets masked: what may leave the relay.
    pub fn masked(&self) -> String {
        actions::mask_config(&self.content)
    }

    /// The parameters the backup holds, `name -> value`.
    pub fn params(&self) -> BTreeMap<String, String> {
        parse_params(&self.content)
    }
}

/// A backup id as the relay makes them (time, dash, 8 hex digits).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        && !id.contains("..")
}

fn new_id() -> String {
    format!(
        "{}-{}",
        jiff::Timestamp::now().strftime("%Y%m%dT%H%M%S%.3fZ"),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// The `name="value"` pairs of a Poly configuration export (XML attributes), unescaped.
pub fn parse_params(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some(eq) = rest.find("=\"") {
        let (before, after) = rest.split_at(eq);
        let name_start = before
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace() || *c == '<')
            .map(|(i, c)| i + c.len_utf8())
            .unwrap_or(0);
        let name = &before[name_start..];
        let after = &after[2..];
        let end = after.find('"').unwrap_or(after.len());
        let value = &after[..end];
        if !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-[]".contains(c))
            && name != "version"
            && name != "encoding"
            && name != "standalone"
        {
            out.insert(name.to_string(), xml_unescape(value));
        }
        rest = &after[end.min(after.len())..];
        if let Some(r) = rest.strip_prefix('"') {
            rest = r;
        }
    }
    out
}

fn xml_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// `get_config`: exports one configuration source, keeps it as a backup, and reports it (secrets
/// masked; a long export goes as an artifact).
pub async fn get_config(
    s: &mut Session,
    cx: &OpCx<'_>,
    source: ConfigSource,
) -> Result<Done, DeviceError> {
    let path = format!(
        "/Utilities/configuration/exportFile?source={}",
        source.index()
    );
    let (_, body) = s.get_raw(&path).await?;
    let truncated = body.len() > MAX_CONFIG_EXPORT;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_CONFIG_EXPORT)]).into_owned();
    let info = actions::device_info(s).await.ok();
    let mut payload = json!({
        "source": source.name(),
        "bytes": body.len(),
        "truncated": truncated,
    });
    let masked = actions::mask_config(&text);
    if masked.len() <= super::MAX_INLINE_PAYLOAD / 2 {
        payload["content"] = json!(masked);
    } else {
        let mac = info.as_ref().and_then(|i| i.mac.clone());
        let name = format!(
            "{}_{}_{}.cfg",
            mac.as_deref().unwrap_or("device"),
            source.name(),
            super::captures::file_stamp(SystemTime::now())
        );
        let meta = crate::artifacts::Meta::new("config_export", name, "text/plain")
            .device(Some(cx.target.to_string()), mac)
            .command(Some(cx.command_id.to_string()));
        match cx
            .plane
            .artifacts
            .put(meta, masked.into_bytes().into())
            .await
        {
            Ok(r) => payload["artifact"] = json!(r),
            Err(e) => {
                return Ok(Done::fail(format!(
                    "cannot keep the configuration export: {e}"
                )));
            }
        }
    }
    match info.and_then(|i| i.mac) {
        Some(mac) => {
            let b = Backup {
                id: new_id(),
                mac,
                target: cx.target.to_string(),
                source: source.name().to_string(),
                taken_at: rfc3339(SystemTime::now()),
                bytes: text.len() as u64,
                truncated,
                command_id: cx.command_id.to_string(),
                content: text,
            };
            match store(cx.plane, &b).await {
                Ok(dropped) => {
                    payload["backup_id"] = json!(b.id);
                    if !dropped.is_empty() {
                        payload["backups_dropped"] = json!(dropped);
                    }
                }
                Err(e) => payload["backup_error"] = json!(e),
            }
        }
        None => payload["backup_error"] = json!("the device did not tell its MAC; no backup kept"),
    }
    Ok(Done::ok(payload))
}

/// Stores a backup; returns the ids of the oldest ones it pushed out.
pub async fn store(plane: &DevicePlane, b: &Backup) -> Result<Vec<String>, String> {
    let value = serde_json::to_vec(b).map_err(|e| e.to_string())?;
    let (mac, id) = (b.mac.clone(), b.id.clone());
    let dropped = plane
        .store
        .run(move |s| s.backup_add(&mac, &id, &value, KEEP))
        .await
        .map_err(|e| format!("cannot store the backup: {e:#}"))?;
    info!(mac = %b.mac, backup = %b.id, source = %b.source, dropped = dropped.len(), "configuration backup kept");
    Ok(dropped)
}

/// Every backup of a device, oldest first.
pub async fn list(plane: &DevicePlane, mac: &str) -> Result<Vec<Backup>, String> {
    let m = mac.to_string();
    let rows = plane
        .store
        .run(move |s| s.backups(&m))
        .await
        .map_err(|e| format!("cannot read the backups: {e:#}"))?;
    Ok(rows
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect())
}

/// One backup (`latest` for the newest).
pub async fn get(plane: &DevicePlane, mac: &str, id: &str) -> Result<Backup, String> {
    let all = list(plane, mac).await?;
    let found = if id == "latest" {
        all.into_iter().last()
    } else {
        all.into_iter().find(|b| b.id == id)
    };
    found.ok_or_else(|| {
        if id == "latest" {
            format!("device {mac} has no configuration backup on this relay")
        } else {
            format!("device {mac} has no backup {id:?}")
        }
    })
}

pub async fn delete(plane: &DevicePlane, mac: &str, id: &str) -> Result<(), String> {
    let (m, i) = (mac.to_string(), id.to_string());
    let found = plane
        .store
        .run(move |s| s.backup_remove(&m, &i))
        .await
        .map_err(|e| format!("cannot delete the backup: {e:#}"))?;
    if found {
        info!(%mac, backup = %id, "configuration backup deleted");
        Ok(())
    } else {
        Err(format!("device {mac} has no backup {id:?}"))
    }
}

/// `restore_config_backup`: pushes the backup's parameters back with `config/set`, in batches.
pub async fn restore(s: &mut Session, cx: &OpCx<'_>, which: &str) -> Result<Done, DeviceError> {
    let info = actions::device_info(s).await?;
    let Some(mac) = info.mac else {
        return Ok(Done::fail(
            "the device did not tell its MAC, so its backups cannot be found",
        ));
    };
    let backup = match get(cx.plane, &mac, which).await {
        Ok(b) => b,
        Err(why) => return Ok(Done::fail(why)),
    };
    if backup.truncated {
        return Ok(Done::fail(format!(
            "backup {} was cut at 1 MiB when it was taken; restoring part of a configuration is refused",
            backup.id
        )));
    }
    let params = backup.params();
    if params.is_empty() {
        return Ok(Done::fail(format!(
            "backup {} holds no parameters",
            backup.id
        )));
    }
    let items: Vec<(String, String)> = params.into_iter().collect();
    for batch in items.chunks(MAX_SET_PARAMS / 2) {
        let data: serde_json::Map<String, Value> = batch
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        call(
            s,
            "/api/v1/mgmt/config/set",
            Some(Value::Object(data)),
            false,
        )
        .await?;
    }
    info!(%mac, backup = %backup.id, params = items.len(), "configuration backup restored");
    Ok(Done {
        result: Outcome::Success,
        reason: String::new(),
        payload: json!({
            "backup_id": backup.id,
            "source": backup.source,
            "taken_at": backup.taken_at,
            "restored": items.len(),
        }),
        cause: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_parse_into_parameters() {
        let text = "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n<!-- VVX 411 0004f2000001: local -->\n<PHONE_CONFIG>\n  <ALL\n    reg.1.address=\"1000\"\n    reg.1.displayName=\"A &amp; B &quot;x&quot;\"\n    up.screenCapture.enabled=\"1\"\n    empty=\"\"\n  />\n</PHONE_CONFIG>\n";
        let p = parse_params(text);
        assert_eq!(p.len(), 4, "{p:?}");
        assert_eq!(p["reg.1.address"], "1000");
        assert_eq!(p["reg.1.displayName"], "A & B \"x\"");
        assert_eq!(p["empty"], "");
        assert!(valid_id(&new_id()));
        assert!(!valid_id("../etc"));
        assert!(new_id() < new_id() || new_id().len() > 20);
    }
}
