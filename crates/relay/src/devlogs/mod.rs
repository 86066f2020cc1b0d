//! Device logs kept on the relay: the `<mac>-app.log` and `<mac>-boot.log` files phones upload to
//! their provisioning server through the edge, copied here while the cloud says it does not take
//! device logs itself (the tenant's `log_upload` setting, carried in heartbeat answers).
//!
//! Why a shared service and not part of a job: the edge writes the logs (its provisioning handler
//! tees each upload on its way upstream), the device plane reads them (one-click export, the
//! cloud's `get_device_logs`), operations list and export them (`ucrelay logs`), and the agent
//! hears the cloud's setting. Jobs never import one another, so the store of logs sits beside
//! `store` and `cache`, owned by none of them, and each reaches it the way it reaches those.
//!
//! Layout: `<state_dir>/device-logs/<mac>/<time>-app.log`, one file per upload. An upload is
//! written to a temporary file while it streams past (never held in memory) and kept only when the
//! upstream accepted it (2xx) and the body arrived whole, so a PUT challenged with 401 and sent
//! again is kept once. Per device at most `[diagnostics].device_logs_max_per_device` (100 MB):
//! the upload that would pass it is dropped, collection for that device stops by itself and says
//! so (a warning, a `device_logs_capped` alarm to the cloud, `ucrelay logs`), until its logs are
//! deleted or have all expired. Files older than `device_logs_keep` (7 days) are deleted.

use crate::protocol::Alarm;
use crate::store::{Store, Write};
use crate::util::time::rfc3339;
use bytes::Bytes;
use serde::Serialize;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::PollSender;
use tracing::{debug, info, warn};

/// The store setting that remembers the cloud's last word.
const SETTING: &str = "log_upload";
/// Marker file of a device whose collection stopped at the cap.
const CAPPED: &str = "CAPPED";
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Chunks of one upload waiting for the disk; past it the upload waits (bounded memory).
const QUEUE: usize = 8;

/// Which log a device uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    App,
    Boot,
}

impl LogKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LogKind::App => "app",
            LogKind::Boot => "boot",
        }
    }
}

/// `<mac>-app.log` or `<mac>-boot.log` as the last segment of a request path: the device's MAC
/// (12 hex digits, lower case) and which log.
pub fn log_upload_name(path: &str) -> Option<(String, LogKind)> {
    let name = path.rsplit('/').next()?.to_ascii_lowercase();
    let (mac, kind) = if let Some(m) = name.strip_suffix("-app.log") {
        (m, LogKind::App)
    } else if let Some(m) = name.strip_suffix("-boot.log") {
        (m, LogKind::Boot)
    } else {
        return None;
    };
    valid_mac(mac).then(|| (mac.to_string(), kind))
}

/// 12 hex digits, lower case.
pub fn valid_mac(mac: &str) -> bool {
    mac.len() == 12
        && mac
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A MAC as people write it (`00:04:F2:...`, `0004-f2...`) in the form the relay keys by.
pub fn normalise_mac(s: &str) -> Option<String> {
    let m: String = s
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | '.'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    valid_mac(&m).then_some(m)
}

#[derive(Debug, Default)]
struct Dev {
    /// Kept plus in flight.
    bytes: u64,
    files: u64,
    capped: Option<String>,
    last_upload: Option<SystemTime>,
}

struct Inner {
    devices: HashMap<String, Dev>,
    total: u64,
    last_prune: Option<Instant>,
}

/// One device's logs, as `ucrelay logs` lists them.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceLogSummary {
    pub mac: String,
    pub files: u64,
    pub bytes: u64,
    /// When collection stopped at the per-device cap (None while collecting).
    pub capped_at: Option<String>,
    pub last_upload: Option<String>,
}

/// The whole store, for `ucrelay logs` and `status`.
#[derive(Debug, Clone, Serialize)]
pub struct LogsReport {
    /// True while the cloud says it does not take device logs: uploads are copied here.
    pub collecting: bool,
    pub max_per_device: u64,
    pub max_total: u64,
    pub keep_s: u64,
    pub bytes: u64,
    pub devices: Vec<DeviceLogSummary>,
}

/// Why a chunk could not be kept.
enum Refusal {
    /// The device reached its cap now (first time): say so.
    CappedNow,
    /// Already capped, or the total is full: nothing new to say.
    Quiet,
}

pub struct DeviceLogs {
    dir: PathBuf,
    store: Store,
    max_per_device: u64,
    max_total: u64,
    keep: Duration,
    collecting: AtomicBool,
    inner: Mutex<Inner>,
}

impl DeviceLogs {
    /// Opens `<state_dir>/device-logs`, counting what is there and clearing half-written uploads.
    pub fn open(
        state_dir: &Path,
        cfg: &crate::config::DiagnosticsConfig,
        store: &Store,
    ) -> anyhow::Result<Arc<DeviceLogs>> {
        use anyhow::Context;
        let dir = state_dir.join("device-logs");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        let mut devices = HashMap::new();
        let mut total = 0;
        for e in std::fs::read_dir(&dir)?.flatten() {
            let mac = e.file_name().to_string_lossy().into_owned();
            if !valid_mac(&mac) || !e.path().is_dir() {
                continue;
            }
            let mut d = Dev::default();
            for f in std::fs::read_dir(e.path())?.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.starts_with(".incoming-") {
                    let _ = std::fs::remove_file(f.path());
                } else if name == CAPPED {
                    d.capped = std::fs::read_to_string(f.path())
                        .ok()
                        .map(|s| s.trim().to_string());
                } else if let Ok(m) = f.metadata() {
                    d.bytes += m.len();
                    d.files += 1;
                    let mtime = m.modified().ok();
                    if mtime > d.last_upload {
                        d.last_upload = mtime;
                    }
                }
            }
            total += d.bytes;
            devices.insert(mac, d);
        }
        let log_upload = store.setting(SETTING)?.is_none_or(|v| v != "false");
        Ok(Arc::new(DeviceLogs {
            dir,
            store: store.clone(),
            max_per_device: cfg.device_logs_max_per_device,
            max_total: cfg.device_logs_max_total,
            keep: cfg.device_logs_keep,
            collecting: AtomicBool::new(!log_upload),
            inner: Mutex::new(Inner {
                devices,
                total,
                last_prune: None,
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True while uploads are copied here.
    pub fn collecting(&self) -> bool {
        self.collecting.load(Ordering::Relaxed)
    }

    /// The cloud's `log_upload` setting, from a heartbeat answer. Remembered in the store, so a
    /// restarted relay keeps collecting before its first heartbeat.
    pub fn set_cloud_setting(&self, log_upload: bool) {
        let collect = !log_upload;
        if self.collecting.swap(collect, Ordering::Relaxed) == collect {
            return;
        }
        if collect {
            info!("the cloud does not take device logs: the relay keeps the logs devices upload");
        } else {
            info!("the cloud takes device logs: the relay stops keeping copies");
        }
        if let Err(e) = self
            .store
            .set_setting(SETTING, if log_upload { "true" } else { "false" })
        {
            warn!(error = %format!("{e:#}"), "cannot remember the cloud's log setting");
        }
    }

    /// Starts copying one upload from a device at `peer`, when the relay collects and the
    /// device has not reached its cap. The edge tees the request body into the handle.
    pub fn begin(self: &Arc<Self>, mac: &str, kind: LogKind, peer: IpAddr) -> Option<LogUpload> {
        if !self.collecting() || !valid_mac(mac) {
            return None;
        }
        {
            let g = self.lock();
            if g.devices.get(mac).is_some_and(|d| d.capped.is_some()) {
                return None;
            }
            if g.total >= self.max_total {
                debug!(%mac, "device log store full ([diagnostics].device_logs_max_total); not kept");
                return None;
            }
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let (verdict_tx, verdict_rx) = oneshot::channel();
        let me = self.clone();
        let mac = mac.to_string();
        tokio::spawn(async move { me.write_upload(mac, kind, peer, rx, verdict_rx).await });
        Some(LogUpload {
            tx: PollSender::new(tx),
            verdict: Some(verdict_tx),
            ended: false,
        })
    }

    fn reserve(&self, mac: &str, n: u64) -> Result<(), Refusal> {
        let mut g = self.lock();
        if g.total.saturating_add(n) > self.max_total {
            return Err(Refusal::Quiet);
        }
        let max = self.max_per_device;
        let d = g.devices.entry(mac.to_string()).or_default();
        if d.capped.is_some() {
            return Err(Refusal::Quiet);
        }
        if d.bytes.saturating_add(n) > max {
            d.capped = Some(rfc3339(SystemTime::now()));
            return Err(Refusal::CappedNow);
        }
        d.bytes += n;
        g.total += n;
        Ok(())
    }

    fn unreserve(&self, mac: &str, n: u64) {
        let mut g = self.lock();
        g.total = g.total.saturating_sub(n);
        if let Some(d) = g.devices.get_mut(mac) {
            d.bytes = d.bytes.saturating_sub(n);
        }
    }

    async fn write_upload(
        self: Arc<Self>,
        mac: String,
        kind: LogKind,
        peer: IpAddr,
        mut rx: mpsc::Receiver<Piece>,
        verdict: oneshot::Receiver<bool>,
    ) {
        self.prune_if_due().await;
        let dev_dir = self.dir.join(&mac);
        let tmp = dev_dir.join(format!(".incoming-{}", uuid::Uuid::new_v4().simple()));
        let mut file = match tokio::fs::create_dir_all(&dev_dir).await {
            Ok(()) => tokio::fs::File::create(&tmp).await.ok(),
            Err(_) => None,
        };
        if file.is_none() {
            warn!(%mac, dir = %dev_dir.display(), "cannot write device logs here; upload not kept");
        }
        let mut kept = 0u64;
        let mut ended = false;
        while let Some(piece) = rx.recv().await {
            let (chunk, last) = match piece {
                Piece::Data(b) => (b, false),
                Piece::Last(b) => (b, true),
                Piece::End => {
                    ended = true;
                    break;
                }
            };
            ended = last;
            if file.is_none() {
                if last {
                    break;
                }
                continue;
            }
            match self.reserve(&mac, chunk.len() as u64) {
                Ok(()) => kept += chunk.len() as u64,
                Err(r) => {
                    // Drop what this upload wrote; keep draining so the device's PUT flows on.
                    file = None;
                    if matches!(r, Refusal::CappedNow) {
                        self.say_capped(&mac, peer).await;
                    }
                    if last {
                        break;
                    }
                    continue;
                }
            }
            if let Some(f) = file.as_mut()
                && let Err(e) = f.write_all(&chunk).await
            {
                warn!(%mac, error = %e, "cannot write a device log; upload not kept");
                file = None;
            }
            if last {
                break;
            }
        }
        let accepted = ended && file.is_some() && verdict.await.unwrap_or(false);
        let mut kept_file = false;
        if accepted
            && let Some(mut f) = file.take()
            && f.flush().await.is_ok()
        {
            drop(f);
            let name = format!(
                "{}-{}.log",
                jiff::Timestamp::now().strftime("%Y%m%dT%H%M%S%.3fZ"),
                kind.as_str()
            );
            kept_file = tokio::fs::rename(&tmp, dev_dir.join(name)).await.is_ok();
        }
        if kept_file {
            let mut g = self.lock();
            let d = g.devices.entry(mac.clone()).or_default();
            d.files += 1;
            d.last_upload = Some(SystemTime::now());
            debug!(%mac, kind = kind.as_str(), bytes = kept, "device log kept");
        } else {
            let _ = tokio::fs::remove_file(&tmp).await;
            self.unreserve(&mac, kept);
        }
    }

    /// Collection for `mac` stopped at its cap: remembered on disk, logged, and an alarm for the
    /// cloud.
    async fn say_capped(&self, mac: &str, peer: IpAddr) {
        let at = rfc3339(SystemTime::now());
        let message = format!(
            "device {mac} ({peer}) reached the relay's device log cap ([diagnostics].device_logs_max_per_device, {}): its logs are no longer kept until they are deleted (ucrelay logs {mac} --delete) or expire",
            crate::util::bytes::human_bytes(self.max_per_device)
        );
        warn!(%mac, device = %peer, "{message}");
        let marker = self.dir.join(mac).join(CAPPED);
        let _ = tokio::fs::write(&marker, format!("{at}\n")).await;
        let alarm = Alarm {
            id: uuid::Uuid::new_v4().to_string(),
            address: peer.to_string(),
            mac: Some(mac.to_string()),
            kind: "device_logs_capped".into(),
            line: None,
            message,
            at,
        };
        let store = self.store.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let value = serde_json::to_vec(&alarm).unwrap_or_default();
            store.write_batch(&[Write::Alarm {
                id: alarm.id.clone(),
                value,
            }])
        })
        .await;
        if !matches!(stored, Ok(Ok(()))) {
            warn!(%mac, "cannot store the device_logs_capped alarm");
        }
    }

    /// Deletes files older than the keep period (at most every few minutes).
    async fn prune_if_due(self: &Arc<Self>) {
        {
            let mut g = self.lock();
            if g.last_prune.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
                return;
            }
            g.last_prune = Some(Instant::now());
        }
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.prune()).await;
    }

    /// Deletes expired files; a device left with none collects again.
    pub fn prune(&self) {
        let Some(cutoff) = SystemTime::now().checked_sub(self.keep) else {
            return;
        };
        let macs: Vec<String> = self.lock().devices.keys().cloned().collect();
        for mac in macs {
            let Ok(rd) = std::fs::read_dir(self.dir.join(&mac)) else {
                continue;
            };
            let mut freed = 0u64;
            let mut removed = 0u64;
            let mut left = 0u64;
            for f in rd.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name == CAPPED || name.starts_with(".incoming-") {
                    continue;
                }
                let Ok(m) = f.metadata() else { continue };
                if m.modified().is_ok_and(|t| t < cutoff) && std::fs::remove_file(f.path()).is_ok()
                {
                    freed += m.len();
                    removed += 1;
                } else {
                    left += 1;
                }
            }
            let mut g = self.lock();
            g.total = g.total.saturating_sub(freed);
            if let Some(d) = g.devices.get_mut(&mac) {
                d.bytes = d.bytes.saturating_sub(freed);
                d.files = d.files.saturating_sub(removed);
                if left == 0 && d.capped.is_some() {
                    d.capped = None;
                    let _ = std::fs::remove_file(self.dir.join(&mac).join(CAPPED));
                    info!(%mac, "device logs expired; collection for this device resumes");
                }
            }
        }
    }

    pub fn report(&self) -> LogsReport {
        let g = self.lock();
        let mut devices: Vec<DeviceLogSummary> = g
            .devices
            .iter()
            .filter(|(_, d)| d.files > 0 || d.capped.is_some())
            .map(|(mac, d)| DeviceLogSummary {
                mac: mac.clone(),
                files: d.files,
                bytes: d.bytes,
                capped_at: d.capped.clone(),
                last_upload: d.last_upload.map(rfc3339),
            })
            .collect();
        devices.sort_by(|a, b| a.mac.cmp(&b.mac));
        LogsReport {
            collecting: self.collecting(),
            max_per_device: self.max_per_device,
            max_total: self.max_total,
            keep_s: self.keep.as_secs(),
            bytes: g.total,
            devices,
        }
    }

    /// The kept log files of one device, oldest first: (file name, path, size).
    pub fn files(&self, mac: &str) -> Vec<(String, PathBuf, u64)> {
        if !valid_mac(mac) {
            return Vec::new();
        }
        let mut v: Vec<(String, PathBuf, u64)> = std::fs::read_dir(self.dir.join(mac))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|f| {
                let name = f.file_name().to_string_lossy().into_owned();
                if name == CAPPED || name.starts_with('.') {
                    return None;
                }
                let len = f.metadata().ok()?.len();
                Some((name, f.path(), len))
            })
            .collect();
        v.sort();
        v
    }

    /// Writes one device's logs as a tar.gz into `out` (blocking I/O). Returns the files written.
    pub fn write_tar_gz<W: std::io::Write>(&self, mac: &str, out: W) -> std::io::Result<usize> {
        let files = self.files(mac);
        let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        for (name, path, _) in &files {
            tar.append_path_with_name(path, format!("{mac}/{name}"))?;
        }
        tar.into_inner()?.finish()?.flush()?;
        Ok(files.len())
    }

    /// Deletes one device's logs; its collection starts again. Returns the bytes freed.
    pub fn delete(&self, mac: &str) -> std::io::Result<u64> {
        if !valid_mac(mac) {
            return Ok(0);
        }
        let dir = self.dir.join(mac);
        let mut freed = 0;
        for (_, path, len) in self.files(mac) {
            std::fs::remove_file(path)?;
            freed += len;
        }
        let _ = std::fs::remove_file(dir.join(CAPPED));
        let _ = std::fs::remove_dir(&dir);
        let mut g = self.lock();
        g.total = g.total.saturating_sub(freed);
        g.devices.remove(mac);
        info!(%mac, bytes = freed, "device logs deleted; collection for this device starts again");
        Ok(freed)
    }
}

/// A piece of an upload on its way to the disk.
enum Piece {
    Data(Bytes),
    /// The last chunk: the body is whole with it.
    Last(Bytes),
    End,
}

/// One upload being copied: the edge sends each chunk of the request body as it passes, then says
/// whether the upstream accepted the request. Dropped before the end, nothing is kept.
pub struct LogUpload {
    tx: PollSender<Piece>,
    verdict: Option<oneshot::Sender<bool>>,
    ended: bool,
}

impl LogUpload {
    /// Ready to take the next chunk (the disk keeps up); the body waits otherwise.
    pub fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        // A writer that is gone takes nothing more: never hold the device's upload for it.
        self.tx.poll_reserve(cx).map(|_| ())
    }

    /// Hands over a chunk (after `poll_ready` said ready).
    pub fn send(&mut self, chunk: Bytes) {
        let _ = self.tx.send_item(Piece::Data(chunk));
    }

    /// Hands over the last chunk: the body is whole with it (after `poll_ready` said ready).
    /// A body whose length is known ends with its last chunk, and is not polled again.
    pub fn send_last(&mut self, chunk: Bytes) {
        if !self.ended {
            self.ended = true;
            let _ = self.tx.send_item(Piece::Last(chunk));
        }
    }

    /// The body arrived whole (after `poll_ready` said ready).
    pub fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            let _ = self.tx.send_item(Piece::End);
        }
    }

    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Takes the sender of the upstream's verdict (true: 2xx), which the request's forwarder keeps.
    pub fn take_verdict(&mut self) -> Option<oneshot::Sender<bool>> {
        self.verdict.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_names() {
        assert_eq!(
            log_upload_name("/logs/0004F2000001-app.log"),
            Some(("0004f2000001".into(), LogKind::App))
        );
        assert_eq!(
            log_upload_name("/0004f2000001-boot.log"),
            Some(("0004f2000001".into(), LogKind::Boot))
        );
        assert_eq!(log_upload_name("/0004f2000001-phone.cfg"), None);
        assert_eq!(log_upload_name("/0004f200001-app.log"), None);
        assert_eq!(log_upload_name("/../../etc-app.log"), None);
        assert_eq!(
            normalise_mac("00:04:F2:00:00:01").as_deref(),
            Some("0004f2000001")
        );
        assert_eq!(normalise_mac("0004f2"), None);
    }

    async fn upload(logs: &Arc<DeviceLogs>, mac: &str, body: &[u8], accepted: bool) {
        let mut up = logs
            .begin(mac, LogKind::App, "10.0.0.9".parse().unwrap())
            .expect("collecting");
        let verdict = up.take_verdict().unwrap();
        for chunk in body.chunks(100) {
            std::future::poll_fn(|cx| up.poll_ready(cx)).await;
            up.send(Bytes::copy_from_slice(chunk));
        }
        std::future::poll_fn(|cx| up.poll_ready(cx)).await;
        up.end();
        let _ = verdict.send(accepted);
        drop(up);
    }

    #[tokio::test]
    async fn uploads_are_kept_when_accepted_and_the_cap_stops_collection() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cfg = crate::config::DiagnosticsConfig {
            device_logs_max_per_device: 1000,
            ..Default::default()
        };
        let logs = DeviceLogs::open(dir.path(), &cfg, &store).unwrap();
        let mac = "0004f2000001";
        assert!(
            logs.begin(mac, LogKind::App, "10.0.0.9".parse().unwrap())
                .is_none()
        );
        logs.set_cloud_setting(false);
        upload(&logs, mac, &[b'a'; 400], true).await;
        upload(&logs, mac, &[b'b'; 400], false).await;
        let wait = |files: usize| {
            let logs = logs.clone();
            async move {
                for _ in 0..200 {
                    if logs.files(mac).len() == files {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("expected {files} files");
            }
        };
        wait(1).await;
        upload(&logs, mac, &[b'c'; 400], true).await;
        wait(2).await;
        // The third would pass 1000 bytes: dropped, collection stops, an alarm is stored.
        upload(&logs, mac, &[b'd'; 400], true).await;
        for _ in 0..200 {
            if logs.report().devices[0].capped_at.is_some()
                && !store.alarms_all().unwrap().is_empty()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r = logs.report();
        assert_eq!((r.devices[0].files, r.devices[0].bytes), (2, 800), "{r:?}");
        assert!(r.devices[0].capped_at.is_some());
        assert!(
            logs.begin(mac, LogKind::App, "10.0.0.9".parse().unwrap())
                .is_none()
        );
        assert_eq!(store.alarms_all().unwrap().len(), 1);
        // Survives a reopen; deleting starts collection again.
        drop(logs);
        let logs = DeviceLogs::open(dir.path(), &cfg, &store).unwrap();
        assert!(logs.collecting());
        assert!(logs.report().devices[0].capped_at.is_some());
        let mut tgz = Vec::new();
        assert_eq!(logs.write_tar_gz(mac, &mut tgz).unwrap(), 2);
        assert_eq!(logs.delete(mac).unwrap(), 800);
        assert!(
            logs.begin(mac, LogKind::App, "10.0.0.9".parse().unwrap())
                .is_some()
        );
    }
}
