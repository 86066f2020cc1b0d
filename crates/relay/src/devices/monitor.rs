//! Monitoring: every known device (from the cloud's device list and from commands) is polled once per
//! `poll_interval`, each at its own fixed offset inside the period so the load is spread evenly, with
//! bounded concurrency. Reports go to the cloud in batches; alarms (device offline / back, line
//! unregistered / registered again) are stored until the cloud acknowledges them.
//!
//! What a device answers is hostile input: a report keeps at most [`MAX_LINES`] lines and short,
//! printable strings, one poll raises at most [`MAX_ALARMS_PER_POLL`] alarms for a device (then one
//! `alarms_suppressed` alarm counts the rest), and the alarms waiting for the cloud are capped. A
//! batch the cloud refuses as unreadable or too large (400, 413) is sent again one record at a
//! time, and the record the cloud cannot take is set aside, so the rest keep flowing.

use super::DevicePlane;
use super::client::{DeviceError, Session, Target};
use super::health::Health;
use crate::config::DevicesConfig;
use crate::ctx::Ctx;
use crate::protocol::{
    ALARM_DEVICE_OFFLINE, ALARM_DEVICE_ONLINE, ALARM_LINE_REGISTERED, ALARM_LINE_UNREGISTERED,
    ALARM_SUPPRESSED, Alarm, DeviceCounts, DeviceList, DeviceReport, DeviceStats,
    DeviceStatusBatch, ErrorCode, LineStatus, PATH_DEVICE_STATUS, PATH_DEVICES,
};
use crate::store::{Store, Write};
use crate::util::backoff::Backoff;
use crate::util::time::rfc3339;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Reports per `POST /relay/v1/device-status`.
const REPORT_BATCH: usize = 1000;
const ALARM_BATCH: usize = 500;
/// Bytes of reports and of alarms per request at most (one larger record goes alone).
const REPORT_BATCH_BYTES: usize = 3 << 20;
const ALARM_BATCH_BYTES: usize = 1 << 20;
/// Most lines kept of one device (the range `dial` accepts); a device listing more is cut here.
pub const MAX_LINES: usize = 48;
/// Longest model, firmware, MAC or call state kept from a device, in characters.
pub const MAX_FIELD: usize = 64;
/// Longest line URI kept.
pub const MAX_URI: usize = 256;
/// Alarms one poll raises for one device at most; past it, one `alarms_suppressed` alarm.
pub const MAX_ALARMS_PER_POLL: usize = 8;
/// Alarms kept waiting for the cloud at most; past it, new ones are dropped and counted.
pub const MAX_PENDING_ALARMS: u64 = 100_000;
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// How often reports go to the cloud: every `REPORT_EVERY`, or more often with a short poll
/// interval (a sixtieth of it, at least every second), so that a report leaves within the period.
fn report_every(period: Duration) -> Duration {
    (period / 60).clamp(Duration::from_secs(1), REPORT_EVERY)
}
const FLUSH_EVERY: Duration = Duration::from_secs(10);

/// A device the relay knows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Known {
    pub address: String,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub from_cloud: bool,
    #[serde(default)]
    pub from_commands: bool,
    #[serde(default)]
    pub last: Option<LastReport>,
    /// The last CPU and memory reading.
    #[serde(default)]
    pub last_stats: Option<Box<DeviceStats>>,
    /// A `config_update_failed` alarm is standing (cleared by `config_updated`).
    #[serde(default)]
    pub config_update_failed: bool,
    /// A `firmware_upgrade_failed` alarm is standing (cleared by `firmware_upgraded`).
    #[serde(default)]
    pub firmware_upgrade_failed: bool,
    #[serde(skip)]
    next_poll: Option<Instant>,
    #[serde(skip)]
    polling: bool,
    #[serde(skip)]
    next_stats: Option<Instant>,
    #[serde(skip)]
    stats_polling: bool,
}

impl Known {
    fn new(address: String, mac: Option<String>, next_poll: Instant) -> Known {
        Known {
            address,
            mac,
            name: None,
            from_cloud: false,
            from_commands: false,
            last: None,
            last_stats: None,
            config_update_failed: false,
            firmware_upgrade_failed: false,
            next_poll: Some(next_poll),
            polling: false,
            next_stats: None,
            stats_polling: false,
        }
    }
}

/// A device's last report, kept as its JSON in one allocation. As a struct it would be a dozen
/// small allocations per device: half a million for 50,000 devices, renewed at every poll and
/// scattered among the buffers of the polls in flight, which fragments the heap and keeps the
/// process's memory far above what is live (measured: 135 MB resident for 50 MB of heap).
#[derive(Debug, Clone)]
pub struct LastReport {
    json: Box<[u8]>,
    online: bool,
}

impl LastReport {
    pub fn new(r: &DeviceReport) -> LastReport {
        LastReport {
            json: serde_json::to_vec(r).unwrap_or_default().into_boxed_slice(),
            online: r.online,
        }
    }

    pub fn online(&self) -> bool {
        self.online
    }

    pub fn report(&self) -> Option<DeviceReport> {
        serde_json::from_slice(&self.json).ok()
    }
}

impl Serialize for LastReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.report() {
            Some(r) => r.serialize(s),
            None => s.serialize_none(),
        }
    }
}

impl<'de> Deserialize<'de> for LastReport {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        DeviceReport::deserialize(d).map(|r| LastReport::new(&r))
    }
}

struct Inner {
    devices: HashMap<String, Known>,
    dirty: HashSet<String>,
    /// Latest report per device not yet delivered.
    unsent: HashMap<String, DeviceReport>,
    /// Latest CPU and memory reading per device not yet delivered.
    unsent_stats: HashMap<String, DeviceStats>,
}

pub struct Registry {
    inner: Mutex<Inner>,
    /// The cloud answered with a device list: only its devices (this relay's monitoring share)
    /// are polled; devices known from commands alone are not (another relay may poll them).
    list_in_force: std::sync::atomic::AtomicBool,
    /// Revision of the cloud's device list last applied.
    applied_revision: AtomicU64,
    /// Wakes the device-list fetcher (heartbeat saw a new revision).
    pub list_wake: Notify,
    report_wake: Notify,
    interval: Duration,
    pub polls: AtomicU64,
    /// Alarms stored and not yet acknowledged (kept in step with the store).
    pending_alarms: AtomicU64,
    /// Alarms not raised: past the per-poll cap (summarised), or past the pending cap (dropped).
    pub alarms_suppressed: AtomicU64,
    pub alarms_dropped: AtomicU64,
    /// Status records the cloud refused for good (400, 413) and that were set aside.
    pub records_rejected: AtomicU64,
}

/// Fixed offset of a device inside the poll period (FNV-1a of its address). Offsets stop short of
/// the period's end by one report interval and a second (at most a tenth of the period), so that a
/// device's report reaches the cloud within the period it was polled in.
fn offset(address: &str, period: Duration) -> Duration {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in address.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let margin = (period / 10).min(report_every(period) + Duration::from_secs(1));
    let ms = period.saturating_sub(margin).as_millis().max(1) as u64;
    Duration::from_millis(h % ms)
}

/// Stats readings sit at their own offset, not on top of the status polls.
fn stats_offset(address: &str, period: Duration) -> Duration {
    offset(&format!("{address}#stats"), period)
}

impl Registry {
    pub fn load(store: &Store, cfg: &DevicesConfig) -> Result<Registry> {
        let now = Instant::now();
        let mut devices = HashMap::new();
        for (addr, bytes) in store.devices_all()? {
            if let Ok(mut k) = serde_json::from_slice::<Known>(&bytes) {
                k.next_poll = Some(now + offset(&addr, cfg.poll_interval));
                devices.insert(addr, k);
            }
        }
        let pending = store.alarms_len()?;
        Ok(Registry {
            inner: Mutex::new(Inner {
                devices,
                dirty: HashSet::new(),
                unsent: HashMap::new(),
                unsent_stats: HashMap::new(),
            }),
            applied_revision: AtomicU64::new(0),
            list_in_force: std::sync::atomic::AtomicBool::new(false),
            list_wake: Notify::new(),
            report_wake: Notify::new(),
            interval: cfg.poll_interval,
            polls: AtomicU64::new(0),
            pending_alarms: AtomicU64::new(pending),
            alarms_suppressed: AtomicU64::new(0),
            alarms_dropped: AtomicU64::new(0),
            records_rejected: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The MAC the relay knows for a device (from the cloud's list or its last poll).
    pub fn mac_of(&self, address: &str) -> Option<String> {
        let g = self.lock();
        let k = g.devices.get(address)?;
        k.mac
            .clone()
            .or_else(|| k.last.as_ref().and_then(|r| r.report()?.mac))
    }

    /// One alarm was stored: counts it as pending and wakes the reporter.
    pub fn alarm_stored(&self) {
        self.pending_alarms.fetch_add(1, Ordering::Relaxed);
        self.report_wake.notify_one();
    }

    /// Alarms stored and not yet acknowledged by the cloud.
    pub fn pending_alarms(&self) -> u64 {
        self.pending_alarms.load(Ordering::Relaxed)
    }

    /// Records a device the relay talked to because of a command. While the cloud's device list
    /// is in force, a device outside it is not added: it is in another relay's share (or in none),
    /// and a 50,000-target task would otherwise leave 50,000 records behind.
    pub fn learn(&self, target: &Target, mac: Option<String>) {
        let addr = target.to_string();
        let mut g = self.lock();
        if let Some(k) = g.devices.get_mut(&addr) {
            if k.from_commands {
                return;
            }
            k.from_commands = true;
        } else if self.list_in_force.load(Ordering::Relaxed) {
            return;
        } else {
            let next = Instant::now() + offset(&addr, self.interval);
            let mut k = Known::new(addr.clone(), mac, next);
            k.from_commands = true;
            g.devices.insert(addr.clone(), k);
        }
        g.dirty.insert(addr);
    }

    /// A heartbeat answer named the cloud's device-list revision.
    pub fn note_revision(&self, revision: u64) {
        if revision != 0 && revision != self.applied_revision.load(Ordering::Relaxed) {
            self.list_wake.notify_one();
        }
    }

    /// Devices in this relay's monitoring share (the cloud's device list for it).
    pub fn assigned(&self) -> u64 {
        self.lock()
            .devices
            .values()
            .filter(|k| k.from_cloud)
            .count() as u64
    }

    pub fn counts(&self) -> DeviceCounts {
        let g = self.lock();
        let mut c = DeviceCounts {
            known: g.devices.len() as u64,
            ..Default::default()
        };
        for k in g.devices.values() {
            match k.last.as_ref().map(LastReport::online) {
                Some(true) => c.online += 1,
                Some(false) => c.offline += 1,
                None => {}
            }
        }
        c
    }

    /// Every known device with its last status, for `ucrelay devices`. The lock is held only to
    /// copy the entries; sorting and encoding happen outside it.
    pub fn list(&self) -> Vec<Value> {
        let mut v: Vec<Known> = self.lock().devices.values().cloned().collect();
        v.sort_by(|a, b| {
            let ka = a.address.parse::<Target>().ok();
            let kb = b.address.parse::<Target>().ok();
            ka.cmp(&kb).then(a.address.cmp(&b.address))
        });
        v.into_iter()
            .map(|k| {
                let source = match (k.from_cloud, k.from_commands) {
                    (true, true) => "cloud+commands",
                    (true, false) => "cloud",
                    _ => "commands",
                };
                let mut o = serde_json::json!({
                    "address": k.address,
                    "mac": k.mac.clone().or_else(|| k.last.as_ref().and_then(|r| r.report()?.mac)),
                    "name": k.name,
                    "source": source,
                    "state": match k.last.as_ref().map(LastReport::online) {
                        Some(true) => "online",
                        Some(false) => "offline",
                        None => "unknown",
                    },
                });
                if let Some(r) = &k.last {
                    o["last"] = serde_json::from_slice(&r.json).unwrap_or(Value::Null);
                }
                if let Some(st) = &k.last_stats {
                    o["stats"] = serde_json::to_value(st).unwrap_or(Value::Null);
                }
                let mut standing = Vec::new();
                if k.config_update_failed {
                    standing.push("config_update_failed");
                }
                if k.firmware_upgrade_failed {
                    standing.push("firmware_upgrade_failed");
                }
                o["alarms"] = serde_json::json!(standing);
                o
            })
            .collect()
    }

    /// Records what an operation found out about a device's health; returns the alarm to raise
    /// when that changes the device's standing (a failure, or the recovery from one).
    pub fn note_health(&self, target: &Target, mac: Option<String>, h: &Health) -> Option<Alarm> {
        self.learn(target, mac.clone());
        let addr = target.to_string();
        let mut g = self.lock();
        let k = g.devices.get_mut(&addr)?;
        if k.mac.is_none() {
            k.mac = mac;
        }
        let (kind, message) = match h {
            Health::ConfigFailed(why) => {
                k.config_update_failed = true;
                (
                    "config_update_failed",
                    format!("configuration update of {addr} failed: {why}"),
                )
            }
            Health::ConfigOk if k.config_update_failed => {
                k.config_update_failed = false;
                (
                    "config_updated",
                    format!("configuration of {addr} updated again"),
                )
            }
            Health::UpgradeFailed(why) => {
                k.firmware_upgrade_failed = true;
                (
                    "firmware_upgrade_failed",
                    format!("firmware upgrade of {addr} failed: {why}"),
                )
            }
            Health::UpgradeOk(fw) if k.firmware_upgrade_failed => {
                k.firmware_upgrade_failed = false;
                ("firmware_upgraded", format!("{addr} upgraded to {fw}"))
            }
            Health::ConfigOk | Health::UpgradeOk(_) => return None,
        };
        let alarm = Alarm {
            id: uuid::Uuid::new_v4().to_string(),
            address: addr.clone(),
            mac: k.mac.clone(),
            kind: kind.into(),
            line: None,
            message,
            at: rfc3339(SystemTime::now()),
        };
        g.dirty.insert(addr);
        Some(alarm)
    }

    /// Wakes the reporter (alarms were stored).
    pub fn wake_reporter(&self) {
        self.report_wake.notify_one();
    }

    /// Applies the cloud's device list: adds new devices, forgets cloud devices no longer listed
    /// (unless commands also used them).
    fn apply_list(&self, list: &DeviceList) {
        let now = Instant::now();
        let listed: HashSet<&str> = list.devices.iter().map(|d| d.address.as_str()).collect();
        let mut g = self.lock();
        let mut added = 0;
        // One table of the list's size at once, not a doubling (and a copy) every few thousand.
        let more = list.devices.len().saturating_sub(g.devices.len());
        g.devices.reserve(more);
        for d in &list.devices {
            let addr = match Target::parse(&d.address) {
                Ok(t) => t.to_string(),
                Err(why) => {
                    warn!(device = %d.address, reason = %why, "cloud device list: entry skipped");
                    continue;
                }
            };
            let k = g.devices.entry(addr.clone()).or_insert_with(|| {
                added += 1;
                Known::new(addr.clone(), None, now + offset(&addr, self.interval))
            });
            k.from_cloud = true;
            if d.mac.is_some() {
                k.mac = d.mac.clone();
            }
            if d.name.is_some() {
                k.name = d.name.clone();
            }
            g.dirty.insert(addr);
        }
        let before = g.devices.len();
        let mut dropped = Vec::new();
        g.devices.retain(|addr, k| {
            if k.from_cloud && !listed.contains(addr.as_str()) {
                // No longer ours to poll (out of the list, or in another relay's share).
                k.from_cloud = false;
                dropped.push(addr.clone());
                return k.from_commands;
            }
            true
        });
        for d in &dropped {
            g.dirty.insert(d.clone());
            // Another relay reports it now.
            g.unsent.remove(d);
        }
        info!(
            revision = list.revision,
            listed = list.devices.len(),
            added,
            removed = before - g.devices.len(),
            "applied the cloud's device list"
        );
        self.applied_revision
            .store(list.revision, Ordering::Relaxed);
        // Revision 0 and nothing in it: the cloud keeps no list for the tenant (as with a 404),
        // and the devices commands reach are monitored.
        self.list_in_force.store(
            list.revision != 0 || !list.devices.is_empty(),
            Ordering::Relaxed,
        );
    }
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        Target::parse(s)
    }
}

/// Uptime from `UpTimeSinceLastReboot` ("2 Day 6:16:10") or `UpTime{Days,Hours,Minutes,Seconds}`.
pub fn parse_uptime(info: &Value) -> Option<u64> {
    if let Some(s) = info.get("UpTimeSinceLastReboot").and_then(Value::as_str) {
        let mut parts = s.split_whitespace();
        let days: u64 = parts.next()?.parse().ok()?;
        let _ = parts.next()?; // "Day" / "Days"
        let hms: Vec<u64> = parts
            .next()?
            .split(':')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        let [h, m, s] = hms[..] else {
            return None;
        };
        return seconds(days, h, m, s);
    }
    let u = info.get("UpTime")?;
    let n = |k: &str| -> Option<u64> {
        match u.get(k)? {
            Value::String(s) => s.trim().parse().ok(),
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
    };
    seconds(n("Days")?, n("Hours")?, n("Minutes")?, n("Seconds")?)
}

/// Days, hours, minutes and seconds as the device gave them, in seconds; None when the sum does
/// not fit (a device's numbers are not trusted to be sane).
fn seconds(days: u64, hours: u64, minutes: u64, secs: u64) -> Option<u64> {
    days.checked_mul(86_400)?
        .checked_add(hours.checked_mul(3600)?)?
        .checked_add(minutes.checked_mul(60)?)?
        .checked_add(secs)
}

/// A device's text as kept: at most `max` characters, control characters replaced.
pub fn clean(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// A device's MAC as 12 lowercase hex digits (separators dropped); None when it is not one.
fn clean_mac(s: &str) -> Option<String> {
    if s.len() > MAX_FIELD {
        return None;
    }
    let hex: String = s
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | '.'))
        .collect();
    (hex.len() == 12 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// The firmware version from `device/info` data (`FirmwareRelease`, else `Firmware.Application`).
pub fn parse_firmware(info: &Value) -> String {
    if let Some(s) = info.get("FirmwareRelease").and_then(Value::as_str) {
        return clean(s, MAX_FIELD);
    }
    let s = info
        .get("Firmware")
        .and_then(|f| f.get("Application"))
        .and_then(Value::as_str)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("");
    clean(s, MAX_FIELD)
}

/// The device's lines from `lineInfo` data: the first [`MAX_LINES`] entries, each line number once.
pub fn parse_lines(data: &Value) -> Vec<LineStatus> {
    let Some(arr) = data.as_array() else {
        return vec![];
    };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, l) in arr.iter().take(MAX_LINES).enumerate() {
        let fallback = i as u32 + 1;
        let line = match l.get("LineNumber") {
            Some(Value::String(s)) => s.trim().parse().unwrap_or(fallback),
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(fallback),
            _ => fallback,
        };
        if !seen.insert(line) {
            continue;
        }
        let registered = l
            .get("RegistrationStatus")
            .and_then(Value::as_str)
            .is_some_and(|s| s.eq_ignore_ascii_case("registered"));
        let uri = ["SIPAddress", "Username", "UserID"]
            .iter()
            .find_map(|k| l.get(*k).and_then(Value::as_str).filter(|s| !s.is_empty()))
            .map(|s| clean(s, MAX_URI))
            .unwrap_or_default();
        out.push(LineStatus {
            line,
            registered,
            uri,
        });
    }
    if arr.len() > MAX_LINES {
        debug!(
            listed = arr.len(),
            kept = MAX_LINES,
            "device lists more lines than the relay keeps"
        );
    }
    out
}

async fn read_status(
    s: &mut Session,
    report: &mut DeviceReport,
    now: SystemTime,
) -> Result<(), DeviceError> {
    let info = s.get("/api/v1/mgmt/device/info").await?.data;
    report.model = clean(
        info.get("ModelNumber")
            .and_then(Value::as_str)
            .unwrap_or(""),
        MAX_FIELD,
    );
    report.firmware = parse_firmware(&info);
    report.mac = info
        .get("MACAddress")
        .and_then(Value::as_str)
        .and_then(clean_mac);
    report.uptime_s = parse_uptime(&info);
    report.last_reboot = report
        .uptime_s
        .and_then(|u| now.checked_sub(Duration::from_secs(u)))
        .map(rfc3339);
    report.lines = parse_lines(&s.get("/api/v1/mgmt/lineInfo").await?.data);
    report.call_state = match s.get("/api/v1/webCallControl/callStatus").await {
        Ok(r) => clean(
            r.data
                .get("CallState")
                .and_then(Value::as_str)
                .unwrap_or("unknown"),
            MAX_FIELD,
        ),
        Err(DeviceError::Api(code)) if code == "4007" => "idle".into(),
        Err(e) => return Err(e),
    };
    Ok(())
}

/// Polls one device. Never fails: an unreachable device is a report with `online: false`.
pub async fn poll_one(plane: &DevicePlane, address: &str) -> DeviceReport {
    let now = SystemTime::now();
    let mut report = DeviceReport {
        address: address.to_string(),
        polled_at: rfc3339(now),
        ..Default::default()
    };
    let target = match plane.check_target(address) {
        Ok(t) => t,
        Err(why) => {
            report.reason = why;
            return report;
        }
    };
    let password = plane.password(None);
    let deadline = plane.cfg().request_timeout * 4;
    let outcome = plane
        .with_device(&target, deadline, "poll", async {
            let mut s = plane.open(&target, &password).await?;
            read_status(&mut s, &mut report, now).await
        })
        .await;
    match outcome {
        Ok(()) => report.online = true,
        Err(e) => {
            // A device that answers at all is online, even if it refuses us.
            report.online = !e.is_unreachable();
            report.reason = e.to_string();
        }
    }
    report
}

/// Alarms raised by going from `prev` to `now`: at most [`MAX_ALARMS_PER_POLL`], then one
/// `alarms_suppressed` alarm saying how many more changes this poll found. Returns the alarms and
/// how many were suppressed.
pub fn alarms_for(prev: Option<&DeviceReport>, now: &DeviceReport) -> (Vec<Alarm>, u64) {
    let mut all = changes(prev, now);
    if all.len() <= MAX_ALARMS_PER_POLL {
        return (all, 0);
    }
    let rest = (all.len() - MAX_ALARMS_PER_POLL) as u64;
    all.truncate(MAX_ALARMS_PER_POLL);
    let mac = all.first().and_then(|a| a.mac.clone());
    all.push(Alarm {
        id: uuid::Uuid::new_v4().to_string(),
        address: now.address.clone(),
        mac,
        kind: ALARM_SUPPRESSED.into(),
        line: None,
        message: format!(
            "device {} changed in {rest} more ways in one poll than the {MAX_ALARMS_PER_POLL} alarms \
             raised for it; its status report has the whole state",
            now.address
        ),
        at: now.polled_at.clone(),
    });
    (all, rest)
}

/// Every change from `prev` to `now` worth an alarm.
fn changes(prev: Option<&DeviceReport>, now: &DeviceReport) -> Vec<Alarm> {
    let mut out = Vec::new();
    let mk = |kind: &str, line: Option<u32>, message: String| Alarm {
        id: uuid::Uuid::new_v4().to_string(),
        address: now.address.clone(),
        mac: now.mac.clone().or_else(|| prev.and_then(|p| p.mac.clone())),
        kind: kind.into(),
        line,
        message,
        at: now.polled_at.clone(),
    };
    let was_online = prev.map(|p| p.online);
    match (was_online, now.online) {
        (Some(true) | None, false) => out.push(mk(
            ALARM_DEVICE_OFFLINE,
            None,
            format!("device {} is offline: {}", now.address, now.reason),
        )),
        (Some(false), true) => out.push(mk(
            ALARM_DEVICE_ONLINE,
            None,
            format!("device {} is back online", now.address),
        )),
        _ => {}
    }
    if now.online && now.reason.is_empty() {
        for l in &now.lines {
            let before = prev
                .filter(|p| p.online && p.reason.is_empty())
                .and_then(|p| p.lines.iter().find(|x| x.line == l.line))
                .map(|x| x.registered);
            match (before, l.registered) {
                (Some(true) | None, false) => out.push(mk(
                    ALARM_LINE_UNREGISTERED,
                    Some(l.line),
                    format!(
                        "line {} ({}) of {} is not registered",
                        l.line, l.uri, now.address
                    ),
                )),
                (Some(false), true) => out.push(mk(
                    ALARM_LINE_REGISTERED,
                    Some(l.line),
                    format!(
                        "line {} ({}) of {} is registered again",
                        l.line, l.uri, now.address
                    ),
                )),
                _ => {}
            }
        }
    }
    out
}

/// Monitoring's loops: device-list sync, poller, reporter, persistence.
pub async fn run(ctx: Ctx, plane: Arc<DevicePlane>, shutdown: CancellationToken) -> Result<()> {
    if !plane.cfg().enabled {
        shutdown.cancelled().await;
        return Ok(());
    }
    tokio::try_join!(
        list_sync(ctx.clone(), plane.clone(), shutdown.clone()),
        poller(ctx.clone(), plane.clone(), shutdown.clone()),
        reporter(ctx.clone(), plane.clone(), shutdown.clone()),
        flusher(ctx.clone(), plane.clone(), shutdown.clone()),
    )?;
    Ok(())
}

async fn list_sync(ctx: Ctx, plane: Arc<DevicePlane>, shutdown: CancellationToken) -> Result<()> {
    let mut sessions = ctx.sessions.subscribe();
    let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(600));
    let mut wanted = true;
    loop {
        if wanted && let Some(session) = ctx.sessions.current() {
            match ctx
                .cloud
                .json::<(), DeviceList>(http::Method::GET, PATH_DEVICES, Some(&session.token), None)
                .await
            {
                Ok(list) => {
                    plane.registry.apply_list(&list);
                    backoff.reset();
                    wanted = false;
                }
                Err(e) => {
                    if e.code() == Some(ErrorCode::TokenInvalid) {
                        ctx.sessions.invalidate(session.generation);
                    }
                    if e.code() == Some(ErrorCode::NotFound) {
                        // A cloud without device lists: commands still teach us devices.
                        debug!("cloud has no device list");
                        wanted = false;
                    } else {
                        warn!(error = %e, "cannot fetch the cloud's device list");
                    }
                }
            }
        }
        let wait = if wanted {
            backoff.next_delay()
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = plane.registry.list_wake.notified() => wanted = true,
            _ = tokio::time::sleep(wait) => {}
            changed = sessions.changed() => {
                if changed.is_err() { return Ok(()); }
                if sessions.borrow_and_update().is_some() { wanted = true; }
            }
        }
    }
}

async fn poller(ctx: Ctx, plane: Arc<DevicePlane>, shutdown: CancellationToken) -> Result<()> {
    if !plane.cfg().monitoring {
        shutdown.cancelled().await;
        return Ok(());
    }
    let sem = Arc::new(Semaphore::new(plane.cfg().poll_concurrency));
    let interval = plane.cfg().poll_interval;
    let tick = (interval / 100).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let stats_interval = plane.cfg().stats_interval;
    let mut work = tokio::task::JoinSet::new();
    loop {
        let now = Instant::now();
        let stats_due: Vec<String> = {
            let mut g = plane.registry.lock();
            let mut due = Vec::new();
            for k in g.devices.values_mut() {
                let at = *k
                    .next_stats
                    .get_or_insert_with(|| now + stats_offset(&k.address, stats_interval));
                if at <= now && !k.stats_polling {
                    k.stats_polling = true;
                    let mut next = at + stats_interval;
                    while next <= now {
                        next += stats_interval;
                    }
                    k.next_stats = Some(next);
                    due.push(k.address.clone());
                }
            }
            due
        };
        for addr in stats_due {
            let permit = tokio::select! {
                p = sem.clone().acquire_owned() => p?,
                _ = shutdown.cancelled() => break,
            };
            let plane = plane.clone();
            work.spawn(async move {
                let _permit = permit;
                let st = poll_stats(&plane, &addr).await;
                record_stats(&plane, &addr, st);
            });
        }
        let due: Vec<String> = {
            let mut g = plane.registry.lock();
            let mut due = Vec::new();
            let share_only = plane.registry.list_in_force.load(Ordering::Relaxed);
            for k in g.devices.values_mut() {
                if share_only && !k.from_cloud {
                    continue;
                }
                let at = *k
                    .next_poll
                    .get_or_insert_with(|| now + offset(&k.address, interval));
                if at <= now && !k.polling {
                    k.polling = true;
                    // The next slot keeps the device's offset, whatever this poll takes.
                    let mut next = at + interval;
                    while next <= now {
                        next += interval;
                    }
                    k.next_poll = Some(next);
                    due.push(k.address.clone());
                }
            }
            due
        };
        for addr in due {
            let permit = tokio::select! {
                p = sem.clone().acquire_owned() => p?,
                _ = shutdown.cancelled() => break,
            };
            let plane = plane.clone();
            work.spawn(async move {
                let _permit = permit;
                let report = poll_one(&plane, &addr).await;
                plane.registry.polls.fetch_add(1, Ordering::Relaxed);
                record_report(&plane, report).await;
            });
            while work.try_join_next().is_some() {}
        }
        while work.try_join_next().is_some() {}
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(tick) => {}
        }
    }
    work.abort_all();
    while work.join_next().await.is_some() {}
    let _ = ctx;
    Ok(())
}

/// Reads one device's CPU and memory. None when it cannot (offline, refused, no such endpoint):
/// status polls report why.
pub async fn poll_stats(plane: &DevicePlane, address: &str) -> Option<DeviceStats> {
    let target = plane.check_target(address).ok()?;
    let password = plane.password(None);
    let mac = plane
        .registry
        .lock()
        .devices
        .get(address)
        .and_then(|k| k.mac.clone());
    let read = plane
        .with_device(&target, plane.cfg().request_timeout * 2, "stats", async {
            let mut s = plane.open(&target, &password).await?;
            super::health::read_stats(&mut s, address, mac).await
        })
        .await;
    match read {
        Ok(st) => st,
        Err(e) => {
            debug!(device = %address, error = %e, "no CPU/memory reading");
            None
        }
    }
}

fn record_stats(plane: &DevicePlane, address: &str, st: Option<DeviceStats>) {
    let mut g = plane.registry.lock();
    let Some(k) = g.devices.get_mut(address) else {
        return;
    };
    k.stats_polling = false;
    let Some(st) = st else { return };
    k.last_stats = Some(Box::new(st.clone()));
    g.dirty.insert(address.to_string());
    g.unsent_stats.insert(address.to_string(), st);
}

async fn record_report(plane: &DevicePlane, report: DeviceReport) {
    let reg = &plane.registry;
    // The lock is held to copy the previous report and, later, to store the new one; comparing
    // them and building alarms happens outside it.
    let prev = {
        let mut g = reg.lock();
        let Some(k) = g.devices.get_mut(&report.address) else {
            return; // forgotten meanwhile
        };
        k.polling = false;
        if reg.list_in_force.load(Ordering::Relaxed) && !k.from_cloud {
            return; // moved to another relay's share while it was polled
        }
        k.last.as_ref().and_then(LastReport::report)
    };
    let (alarms, suppressed) = alarms_for(prev.as_ref(), &report);
    {
        let mut g = reg.lock();
        let addr = report.address.clone();
        let Some(k) = g.devices.get_mut(&addr) else {
            return;
        };
        if k.mac.is_none() {
            k.mac = report.mac.clone();
        }
        k.last = Some(LastReport::new(&report));
        g.dirty.insert(addr.clone());
        g.unsent.insert(addr, report);
    }
    if suppressed > 0 {
        reg.alarms_suppressed
            .fetch_add(suppressed, Ordering::Relaxed);
    }
    if alarms.is_empty() {
        return;
    }
    let n = alarms.len() as u64;
    if reg.pending_alarms().saturating_add(n) > MAX_PENDING_ALARMS {
        let dropped = reg.alarms_dropped.fetch_add(n, Ordering::Relaxed) + n;
        warn!(
            device = %alarms[0].address,
            pending = reg.pending_alarms(),
            dropped,
            "{MAX_PENDING_ALARMS} alarms are waiting for the cloud; this poll's alarms are dropped"
        );
        return;
    }
    for a in &alarms {
        warn!(device = %a.address, mac = ?a.mac, kind = %a.kind, "{}", a.message);
    }
    let writes = alarms
        .iter()
        .map(|a| Write::Alarm {
            id: a.id.clone(),
            value: serde_json::to_vec(a).unwrap_or_default(),
        })
        .collect();
    if let Err(e) = plane.record(writes).await {
        warn!(error = %e, "cannot store alarms");
        return;
    }
    reg.pending_alarms.fetch_add(n, Ordering::Relaxed);
    reg.report_wake.notify_one();
}

/// What one `device-status` request carries.
struct Outgoing {
    reports: Vec<DeviceReport>,
    alarms: Vec<Alarm>,
    stats: Vec<DeviceStats>,
}

/// Takes the next batch: alarms first (they are durable and in order), then reports and CPU/memory
/// readings, each within its count and byte budget. `single` (while looking for a record the
/// cloud refuses) takes one record only. The registry lock is held only to move reports out; their
/// sizes are measured outside it, and what does not fit goes back unless a newer poll replaced it.
async fn next_batch(ctx: &Ctx, plane: &DevicePlane, single: bool) -> Result<Outgoing> {
    let (max_alarms, alarm_bytes) = if single {
        (1, 0)
    } else {
        (ALARM_BATCH, ALARM_BATCH_BYTES)
    };
    let read = ctx
        .store
        .run(move |s| {
            Ok::<_, crate::store::StoreError>((
                s.alarms_batch(max_alarms, alarm_bytes)?,
                s.alarms_len()?,
            ))
        })
        .await;
    let (batch, pending) = match read {
        Ok(r) => r,
        // A store that refuses for now (a full disk): report without the alarms this round.
        Err(e) if e.is_transient() => {
            debug!(error = %format!("{e:#}"), "alarms wait: the store cannot be read now");
            (
                Vec::new(),
                plane.registry.pending_alarms.load(Ordering::Relaxed),
            )
        }
        Err(e) => return Err(e.into()),
    };
    // The store is the truth (alarms from other writers, e.g. device logs, count too).
    plane
        .registry
        .pending_alarms
        .store(pending, Ordering::Relaxed);
    let alarms: Vec<Alarm> = batch
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect();
    if single && !alarms.is_empty() {
        return Ok(Outgoing {
            reports: vec![],
            alarms,
            stats: vec![],
        });
    }
    let max_reports = if single { 1 } else { REPORT_BATCH };
    let (taken, stats): (Vec<DeviceReport>, Vec<DeviceStats>) = {
        let mut g = plane.registry.lock();
        let keys: Vec<String> = g.unsent.keys().take(max_reports).cloned().collect();
        let taken: Vec<DeviceReport> = keys.iter().filter_map(|k| g.unsent.remove(k)).collect();
        // A reading is a few numbers: the count bounds it. One at a time, after the reports, while
        // isolating.
        let max_stats = match (single, taken.is_empty()) {
            (false, _) => REPORT_BATCH,
            (true, true) => 1,
            (true, false) => 0,
        };
        let keys: Vec<String> = g.unsent_stats.keys().take(max_stats).cloned().collect();
        let stats = keys
            .iter()
            .filter_map(|k| g.unsent_stats.remove(k))
            .collect();
        (taken, stats)
    };
    let mut reports = Vec::with_capacity(taken.len());
    let mut back = Vec::new();
    let mut bytes = 0usize;
    for r in taken {
        let size = serde_json::to_vec(&r).map(|v| v.len()).unwrap_or(0);
        bytes = bytes.saturating_add(size);
        if !reports.is_empty() && bytes > REPORT_BATCH_BYTES {
            back.push(r);
        } else {
            reports.push(r);
        }
    }
    put_back(plane, back, vec![]);
    Ok(Outgoing {
        reports,
        alarms,
        stats,
    })
}

/// Returns reports and readings that were not delivered, unless a newer poll of the same device
/// replaced them.
fn put_back(plane: &DevicePlane, reports: Vec<DeviceReport>, stats: Vec<DeviceStats>) {
    if reports.is_empty() && stats.is_empty() {
        return;
    }
    let mut g = plane.registry.lock();
    for r in reports {
        g.unsent.entry(r.address.clone()).or_insert(r);
    }
    for st in stats {
        g.unsent_stats.entry(st.address.clone()).or_insert(st);
    }
}

async fn reporter(ctx: Ctx, plane: Arc<DevicePlane>, shutdown: CancellationToken) -> Result<()> {
    let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(300));
    // After the cloud refused a batch as unreadable or too large: one record per request until the
    // record it cannot take is found and set aside.
    let mut single = false;
    loop {
        let mut wait = report_every(plane.cfg().poll_interval);
        if let Some(session) = ctx.sessions.current() {
            let out = next_batch(&ctx, &plane, single).await?;
            if !out.reports.is_empty() || !out.alarms.is_empty() || !out.stats.is_empty() {
                let batch = DeviceStatusBatch {
                    reports: out.reports,
                    alarms: out.alarms,
                    stats: out.stats,
                };
                match ctx
                    .cloud
                    .json::<_, Value>(
                        http::Method::POST,
                        PATH_DEVICE_STATUS,
                        Some(&session.token),
                        Some(&batch),
                    )
                    .await
                {
                    Ok(_) => {
                        backoff.reset();
                        single = false;
                        let ids: Vec<String> = batch.alarms.iter().map(|a| a.id.clone()).collect();
                        if !ids.is_empty() {
                            let n = ids.len() as u64;
                            match ctx.store.run(move |s| s.alarms_remove(&ids)).await {
                                Ok(()) => {
                                    let _ = plane.registry.pending_alarms.fetch_update(
                                        Ordering::Relaxed,
                                        Ordering::Relaxed,
                                        |p| Some(p.saturating_sub(n)),
                                    );
                                }
                                // Sent again later; the cloud keeps an alarm once, by id.
                                Err(e) if e.is_transient() => {
                                    warn!(error = %format!("{e:#}"), "delivered alarms stay in the store for now");
                                }
                                Err(e) => return Err(e.into()),
                            }
                        }
                        debug!(
                            reports = batch.reports.len(),
                            alarms = batch.alarms.len(),
                            "device status delivered"
                        );
                        // More waiting: go again soon.
                        let more = {
                            let g = plane.registry.lock();
                            !g.unsent.is_empty() || !g.unsent_stats.is_empty()
                        };
                        if more || plane.registry.pending_alarms() > 0 {
                            wait = Duration::from_millis(50);
                        }
                    }
                    Err(e)
                        if matches!(
                            e.code(),
                            Some(ErrorCode::BadRequest | ErrorCode::TooLarge)
                        ) =>
                    {
                        wait = Duration::from_millis(50);
                        let n = batch.reports.len() + batch.alarms.len() + batch.stats.len();
                        if n > 1 {
                            warn!(error = %e, records = n, "cloud refused a device-status batch; sending one record at a time to find the one it cannot take");
                            single = true;
                            put_back(&plane, batch.reports, batch.stats);
                        } else if let Some(a) = batch.alarms.into_iter().next() {
                            error!(alarm_id = %a.id, device = %a.address, kind = %a.kind, error = %e,
                                "cloud refused an alarm (malformed or too large); kept in the store's rejected table, not retried");
                            let (id, why) = (a.id.clone(), e.to_string());
                            match ctx.store.run(move |s| s.alarm_reject(&id, &why)).await {
                                Ok(()) => {
                                    let _ = plane.registry.pending_alarms.fetch_update(
                                        Ordering::Relaxed,
                                        Ordering::Relaxed,
                                        |p| Some(p.saturating_sub(1)),
                                    );
                                    plane
                                        .registry
                                        .records_rejected
                                        .fetch_add(1, Ordering::Relaxed);
                                }
                                // Refused again later, and set aside once the store takes it.
                                Err(e) if e.is_transient() => {
                                    warn!(error = %format!("{e:#}"), "a refused alarm stays in the store for now");
                                }
                                Err(e) => return Err(e.into()),
                            }
                        } else if let Some(r) = batch.reports.first() {
                            // The next poll of the device makes a new report.
                            error!(device = %r.address, error = %e,
                                "cloud refused a device report (malformed or too large); dropped");
                            plane
                                .registry
                                .records_rejected
                                .fetch_add(1, Ordering::Relaxed);
                        } else if let Some(st) = batch.stats.first() {
                            error!(device = %st.address, error = %e,
                                "cloud refused a CPU and memory reading; dropped");
                            plane
                                .registry
                                .records_rejected
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        if e.code() == Some(ErrorCode::TokenInvalid) {
                            ctx.sessions.invalidate(session.generation);
                        }
                        put_back(&plane, batch.reports, batch.stats);
                        wait = backoff.next_delay();
                        warn!(error = %e, retry_in = ?wait, "cannot deliver device status");
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
            _ = plane.registry.report_wake.notified() => {}
        }
    }
}

async fn flusher(ctx: Ctx, plane: Arc<DevicePlane>, shutdown: CancellationToken) -> Result<()> {
    loop {
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tokio::time::sleep(FLUSH_EVERY) => false,
        };
        // Copy under the lock, encode outside it.
        let (changed, removed): (Vec<Known>, Vec<String>) = {
            let mut g = plane.registry.lock();
            let dirty: Vec<String> = g.dirty.drain().collect();
            let mut changed = Vec::new();
            let mut removed = Vec::new();
            for addr in dirty {
                match g.devices.get(&addr) {
                    Some(k) => changed.push(k.clone()),
                    None => removed.push(addr),
                }
            }
            (changed, removed)
        };
        let writes: Vec<Write> = changed
            .into_iter()
            .map(|k| Write::Device {
                value: serde_json::to_vec(&k).unwrap_or_default(),
                address: k.address,
            })
            .collect();
        if !writes.is_empty() || !removed.is_empty() {
            let keys: Vec<String> = writes
                .iter()
                .filter_map(|w| match w {
                    Write::Device { address, .. } => Some(address.clone()),
                    _ => None,
                })
                .chain(removed.iter().cloned())
                .collect();
            let stored = ctx
                .store
                .run(move |s| {
                    s.write_batch(&writes)?;
                    s.devices_remove(&removed)
                })
                .await;
            match stored {
                Ok(()) => {}
                // A full disk: the registry stays in memory and is written once there is space.
                Err(e) if e.is_transient() => {
                    debug!(error = %format!("{e:#}"), "device registry waits for the store");
                    plane.registry.lock().dirty.extend(keys);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if stop {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn uptime_in_both_firmware_forms() {
        assert_eq!(
            parse_uptime(&json!({"UpTimeSinceLastReboot": "2 Day 6:16:10"})),
            Some(2 * 86400 + 6 * 3600 + 16 * 60 + 10)
        );
        assert_eq!(
            parse_uptime(
                &json!({"UpTime": {"Days": "0", "Hours": "1", "Minutes": "2", "Seconds": "3"}})
            ),
            Some(3723)
        );
        assert_eq!(
            parse_uptime(&json!({"UpTimeSinceLastReboot": "soon"})),
            None
        );
        // Numbers a hostile device picks to overflow: no answer, no panic, no wrapped value.
        let max = u64::MAX.to_string();
        assert_eq!(
            parse_uptime(&json!({"UpTimeSinceLastReboot": format!("{max} Day 1:2:3")})),
            None
        );
        assert_eq!(
            parse_uptime(&json!({"UpTimeSinceLastReboot": format!("0 Day {max}:0:0")})),
            None
        );
        assert_eq!(
            parse_uptime(
                &json!({"UpTime": {"Days": 0, "Hours": 0, "Minutes": 1, "Seconds": u64::MAX}})
            ),
            None
        );
        assert_eq!(
            parse_uptime(
                &json!({"UpTime": {"Days": 213_503_982_334_602u64, "Hours": 0, "Minutes": 0, "Seconds": 0}})
            ),
            None
        );
        let lines = parse_lines(&json!([{"LineNumber": 4_294_967_297u64}, {"LineNumber": "-1"}]));
        assert_eq!(lines.iter().map(|l| l.line).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            parse_firmware(&json!({"Firmware": {"Application": "5.9.3.2857 02-Jul-19 06:14"}})),
            "5.9.3.2857"
        );
        assert_eq!(
            parse_firmware(&json!({"FirmwareRelease": "5.5.0.22173"})),
            "5.5.0.22173"
        );
    }

    #[test]
    fn lines_parse_case_insensitively() {
        let l = parse_lines(&json!([
            {"LineNumber": "1", "RegistrationStatus": "Registered", "SIPAddress": "sip:1000@pbx"},
            {"LineNumber": "2", "RegistrationStatus": "unregistered", "Username": "1001"}
        ]));
        assert_eq!(l.len(), 2);
        assert!(l[0].registered && !l[1].registered);
        assert_eq!(l[1].uri, "1001");
    }

    fn rep(online: bool, lines: &[(u32, bool)]) -> DeviceReport {
        DeviceReport {
            address: "10.0.0.9".into(),
            online,
            reason: if online {
                String::new()
            } else {
                "device unreachable: refused".into()
            },
            lines: lines
                .iter()
                .map(|&(line, registered)| LineStatus {
                    line,
                    registered,
                    uri: format!("sip:{line}@pbx"),
                })
                .collect(),
            polled_at: "2026-01-01T00:00:00Z".into(),
            ..Default::default()
        }
    }

    #[test]
    fn alarms_fire_on_transitions_only() {
        let kinds = |v: (Vec<Alarm>, u64)| v.0.into_iter().map(|a| a.kind).collect::<Vec<_>>();
        assert!(alarms_for(None, &rep(true, &[(1, true)])).0.is_empty());
        assert_eq!(
            kinds(alarms_for(None, &rep(false, &[]))),
            ["device_offline"]
        );
        let up = rep(true, &[(1, true), (2, true)]);
        assert!(alarms_for(Some(&up), &up).0.is_empty());
        assert_eq!(
            kinds(alarms_for(Some(&up), &rep(false, &[]))),
            ["device_offline"]
        );
        assert_eq!(
            kinds(alarms_for(Some(&rep(false, &[])), &up)),
            ["device_online"]
        );
        let l2down = rep(true, &[(1, true), (2, false)]);
        assert_eq!(kinds(alarms_for(Some(&up), &l2down)), ["line_unregistered"]);
        assert_eq!(kinds(alarms_for(Some(&l2down), &up)), ["line_registered"]);
        assert!(alarms_for(Some(&l2down), &l2down).0.is_empty());
    }

    #[test]
    fn one_poll_raises_a_bounded_number_of_alarms() {
        let all: Vec<(u32, bool)> = (1..=40).map(|l| (l, true)).collect();
        let none: Vec<(u32, bool)> = (1..=40).map(|l| (l, false)).collect();
        let (alarms, rest) = alarms_for(Some(&rep(true, &all)), &rep(true, &none));
        assert_eq!(alarms.len(), MAX_ALARMS_PER_POLL + 1);
        assert_eq!(rest, 40 - MAX_ALARMS_PER_POLL as u64);
        assert_eq!(alarms.last().unwrap().kind, ALARM_SUPPRESSED);
        assert!(alarms.last().unwrap().message.contains("32 more"));
    }

    #[test]
    fn hostile_answers_are_cut_down() {
        let lines: Vec<Value> = (0..5000)
            .map(|i| json!({"LineNumber": (i % 3).to_string(), "RegistrationStatus": "Registered", "SIPAddress": "x".repeat(10_000)}))
            .collect();
        let l = parse_lines(&Value::Array(lines));
        assert_eq!(l.len(), 3, "duplicate line numbers count once");
        assert!(l.iter().all(|x| x.uri.chars().count() == MAX_URI));
        let many: Vec<Value> = (1..5000).map(|i| json!({"LineNumber": i})).collect();
        assert_eq!(parse_lines(&Value::Array(many)).len(), MAX_LINES);
        assert_eq!(clean("a\u{1b}[2Jb", 10), "a\u{fffd}[2Jb");
        assert_eq!(clean(&"é".repeat(100), 5).chars().count(), 5);
        assert_eq!(
            clean_mac("00:04:F2:AB:CD:EF").as_deref(),
            Some("0004f2abcdef")
        );
        assert_eq!(clean_mac("x".repeat(1 << 20).as_str()), None);
        assert_eq!(clean_mac("0004f2"), None);
        assert_eq!(
            parse_uptime(&json!({"UpTimeSinceLastReboot": "18446744073709551615 Day 0:0:0"})),
            None
        );
        assert_eq!(
            parse_uptime(
                &json!({"UpTime": {"Days": u64::MAX, "Hours": 1, "Minutes": 0, "Seconds": 0}})
            ),
            None
        );
    }

    /// A cloud that takes `device-status` batches and refuses (400) any batch carrying the alarm
    /// `REFUSED`, as one that finds it malformed; it keeps the ids of what it took.
    #[derive(Default)]
    struct StatusCloud {
        /// Refusals of the refused alarm sent alone (the relay looking for the record to set aside).
        refused_alone: AtomicU64,
        /// Batches refused because they carried it, alone or not.
        refused: AtomicU64,
        reports: Mutex<Vec<String>>,
        alarms: Mutex<Vec<String>>,
    }

    const REFUSED: &str = "a1-refused";

    impl StatusCloud {
        /// Serves on 127.0.0.1:0 (bound before it returns, so it takes connections at once).
        async fn start() -> (Arc<StatusCloud>, String) {
            use axum::{Json, extract::State, http::StatusCode};
            async fn device_status(
                State(cloud): State<Arc<StatusCloud>>,
                Json(b): Json<DeviceStatusBatch>,
            ) -> (StatusCode, Json<Value>) {
                if b.alarms.iter().any(|a| a.id == REFUSED) {
                    cloud.refused.fetch_add(1, Ordering::Relaxed);
                    if b.alarms.len() == 1 && b.reports.is_empty() && b.stats.is_empty() {
                        cloud.refused_alone.fetch_add(1, Ordering::Relaxed);
                    }
                    let e = json!({"error": {"code": "bad_request", "message": "malformed alarm"}});
                    return (StatusCode::BAD_REQUEST, Json(e));
                }
                let mut reports = cloud.reports.lock().unwrap();
                reports.extend(b.reports.into_iter().map(|r| r.address));
                let mut alarms = cloud.alarms.lock().unwrap();
                alarms.extend(b.alarms.into_iter().map(|a| a.id));
                (StatusCode::OK, Json(json!({})))
            }
            let cloud = Arc::new(StatusCloud::default());
            let app = axum::Router::new()
                .route(PATH_DEVICE_STATUS, axum::routing::post(device_status))
                .with_state(cloud.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            (cloud, url)
        }

        fn took(&self, report: &str, alarm: &str) -> bool {
            self.reports.lock().unwrap().iter().any(|r| r == report)
                && self.alarms.lock().unwrap().iter().any(|a| a == alarm)
        }
    }

    /// A relay's context and device plane on a fresh state directory, talking to `cloud_url`.
    fn plane_for(cloud_url: &str) -> (Ctx, Arc<DevicePlane>, tempfile::TempDir) {
        crate::devices::plane_for_test(
            cloud_url,
            "subnets = [\"10.0.0.0/24\"]\npoll_interval = \"1m\"\n",
        )
    }

    /// Stores an alarm and has the reporter count it, as a poll that raised it does.
    fn store_alarm(ctx: &Ctx, plane: &DevicePlane, id: &str) {
        let a = Alarm {
            id: id.into(),
            address: "10.0.0.9".into(),
            mac: None,
            kind: ALARM_DEVICE_OFFLINE.into(),
            line: None,
            message: "device offline".into(),
            at: "2026-01-01T00:00:00Z".into(),
        };
        let value = serde_json::to_vec(&a).unwrap();
        let w = Write::Alarm {
            id: id.into(),
            value,
        };
        ctx.store.write_batch(&[w]).unwrap();
        plane.registry.alarm_stored();
    }

    /// Waits (at most 20 s) until `probe` answers, failing at once if the reporter has ended.
    async fn while_reporting<T>(
        what: &str,
        job: &mut tokio::task::JoinHandle<Result<()>>,
        mut probe: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = probe() {
                return v;
            }
            if job.is_finished() {
                panic!("the reporter ended before {what}: {:?}", job.await);
            }
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The chaos harness's find (19e9ba8): the cloud refuses an alarm for good while the disk under
    /// the store is full, so the alarm cannot be set aside yet. The reporter (and with it the
    /// monitoring job) goes on, the alarm stays pending, and once the store takes writes again it
    /// is set aside and reports flow as before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_alarm_waits_out_a_full_disk_instead_of_stopping_the_reporter() {
        let (cloud, url) = StatusCloud::start().await;
        let (ctx, plane, _dir) = plane_for(&url);
        ctx.sessions.set("token".into());
        store_alarm(&ctx, &plane, REFUSED);
        plane
            .registry
            .lock()
            .unsent
            .insert("10.0.0.9".into(), rep(true, &[(1, true)]));
        ctx.store.set_disk_full(true);
        let stop = CancellationToken::new();
        let mut job = tokio::spawn(reporter(ctx.clone(), plane.clone(), stop.clone()));

        // Refused alone, not set aside (the store refuses the write), refused again.
        while_reporting("the alarm was refused twice", &mut job, || {
            (cloud.refused_alone.load(Ordering::Relaxed) >= 2).then_some(())
        })
        .await;
        assert!(ctx.store.trouble().is_some_and(|t| t.disk_full));
        // The store is read whenever it is open again (at most a second after a failed write).
        let (pending, rejected) = while_reporting("the store read", &mut job, || {
            Some((ctx.store.alarms_len().ok()?, ctx.store.rejected_len().ok()?))
        })
        .await;
        assert_eq!((pending, rejected), (1, 0), "the alarm stays pending");
        assert_eq!(plane.registry.pending_alarms(), 1);
        assert_eq!(plane.registry.records_rejected.load(Ordering::Relaxed), 0);

        // Space returns: the next refusal sets it aside.
        ctx.store.set_disk_full(false);
        while_reporting("the alarm set aside", &mut job, || {
            (plane.registry.records_rejected.load(Ordering::Relaxed) == 1).then_some(())
        })
        .await;
        assert_eq!(plane.registry.pending_alarms(), 0);
        assert_eq!(ctx.store.alarms_len().unwrap(), 0);
        assert_eq!(ctx.store.rejected_len().unwrap(), 1);
        let refusals = cloud.refused.load(Ordering::Relaxed);

        // Later reports and alarms flow.
        let later = DeviceReport {
            address: "10.0.0.10".into(),
            ..rep(false, &[])
        };
        plane
            .registry
            .lock()
            .unsent
            .insert(later.address.clone(), later);
        store_alarm(&ctx, &plane, "a2-later");
        while_reporting("a later report and alarm delivered", &mut job, || {
            cloud.took("10.0.0.10", "a2-later").then_some(())
        })
        .await;
        // The store commits the removal before the reporter counts it: wait for both.
        while_reporting("the delivered alarm removed", &mut job, || {
            (ctx.store.alarms_len().ok()? == 0 && plane.registry.pending_alarms() == 0)
                .then_some(())
        })
        .await;
        assert_eq!(
            cloud.refused.load(Ordering::Relaxed),
            refusals,
            "the alarm set aside is not sent again"
        );
        assert!(ctx.store.trouble().is_none());
        stop.cancel();
        job.await.unwrap().unwrap();
    }

    #[test]
    fn offsets_spread_inside_the_period() {
        let p = Duration::from_secs(300);
        let offs: Vec<Duration> = (0..1000)
            .map(|i| offset(&format!("127.0.{}.{}", i / 250, i % 250 + 1), p))
            .collect();
        assert!(offs.iter().all(|o| *o < p));
        let first_half = offs.iter().filter(|o| **o < p / 2).count();
        assert!((400..600).contains(&first_half), "{first_half}");
    }
}
