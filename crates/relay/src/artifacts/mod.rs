//! Artifacts: the files the relay hands to the cloud outside the results path (screen and packet
//! captures, configuration exports and backups, device log bundles, one-click exports, and result
//! payloads too big for a results batch).
//!
//! A shared service like the store and the image cache, owned by no job: the device plane and the
//! edge (a device uploading its packet capture) put files in, the management agent uploads them
//! (`agent::artifacts`), operations show them. None of them has to know the others.
//!
//! A file is written to `<state_dir>/artifacts/tmp/`, hashed while it is written, fsync'd, renamed
//! into `<state_dir>/artifacts/` and only then recorded in the store, so after `kill -9` a file is
//! either whole and recorded, or gone. It is deleted only once the cloud says it holds every byte
//! and the SHA-256 it computed is the one announced. Local space is bounded by
//! `[diagnostics].artifacts_max_total`: a file that would go past it is refused, with the reason,
//! while it is being written (nothing half-written stays).
//!
//! It also keeps the edge's one-time upload slots: the device plane opens a slot (a random path
//! that one device address may use once, before a deadline) and gives the device its URL; the
//! edge streams what that device sends into an artifact and tells the waiting device plane.

use crate::protocol::{ArtifactOffer, ArtifactRef};
use crate::store::{Store, StoreError};
use crate::util::bytes::human_bytes;
use crate::util::time::rfc3339;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{Notify, oneshot};
use tracing::{info, warn};

/// Free disk left untouched beside the artifacts (the store and the logs need room too).
const DISK_MARGIN: u64 = 64 * 1024 * 1024;
/// Path prefix of the edge's upload slots.
pub const UPLOAD_PREFIX: &str = "/ucrelay-upload/";
/// Most upload slots open at once (each is one device about to upload a capture).
const MAX_SLOTS: usize = 4096;

/// What an artifact is, for the cloud and for people.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub name: String,
    pub kind: String,
    pub content_type: String,
    pub command_id: Option<String>,
    pub target: Option<String>,
    pub mac: Option<String>,
}

impl Meta {
    pub fn new(kind: &str, name: impl Into<String>, content_type: &str) -> Meta {
        Meta {
            name: name.into(),
            kind: kind.into(),
            content_type: content_type.into(),
            ..Meta::default()
        }
    }

    pub fn device(mut self, target: Option<String>, mac: Option<String>) -> Meta {
        self.target = target;
        self.mac = mac;
        self
    }

    pub fn command(mut self, id: Option<String>) -> Meta {
        self.command_id = id;
        self
    }
}

/// Why an artifact could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(
        "the relay's artifact store is full: this file needs {} more, but {} of [diagnostics].artifacts_max_total ({}) are taken by {count} file(s) waiting for upload to the cloud",
        human_bytes(*needed), human_bytes(*held), human_bytes(*max)
    )]
    Full {
        needed: u64,
        held: u64,
        max: u64,
        count: u64,
    },
    #[error("not enough free disk under {}: {} free", dir.display(), human_bytes(*free))]
    DiskFull { dir: PathBuf, free: u64 },
    #[error("cannot write artifact file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot record the artifact")]
    Store(#[from] StoreError),
}

impl ArtifactError {
    /// The artifact error inside an I/O error that a writer (tar, gzip) passed through, or the I/O
    /// error itself.
    pub fn from_io(e: std::io::Error, path: &Path) -> ArtifactError {
        if !e.get_ref().is_some_and(|i| i.is::<ArtifactError>()) {
            return ArtifactError::Io {
                path: path.to_path_buf(),
                source: e,
            };
        }
        match e
            .into_inner()
            .map(|inner| inner.downcast::<ArtifactError>())
        {
            Some(Ok(a)) => *a,
            _ => ArtifactError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other("write failed"),
            },
        }
    }
}

#[derive(Default)]
struct Usage {
    /// Bytes of recorded files.
    held: u64,
    /// Bytes being written (not recorded yet).
    reserved: u64,
    count: u64,
}

/// What the uploader is doing, for `ucrelay status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UploadState {
    pub uploading: Option<String>,
    pub sent: u64,
    pub uploaded: u64,
    pub last_error: Option<String>,
}

/// Artifacts as `ucrelay status` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactsReport {
    pub pending: u64,
    pub bytes: u64,
    pub max_total: u64,
    #[serde(flatten)]
    pub upload: UploadState,
    pub files: Vec<ArtifactOffer>,
}

/// A device upload the edge will take: from one address, once, before `expires`.
pub struct UploadSlot {
    pub from: IpAddr,
    pub meta: Meta,
    pub max_bytes: u64,
    expires: Instant,
    done: oneshot::Sender<Result<ArtifactRef, String>>,
}

impl UploadSlot {
    /// Tells whoever opened the slot how the upload ended.
    pub fn finish(self, outcome: Result<ArtifactRef, String>) {
        let _ = self.done.send(outcome);
    }
}

/// Why the edge refuses an upload.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotRefusal {
    /// Unknown, used or expired: answered as not found.
    Unknown,
    /// The slot belongs to another device address.
    WrongAddress,
}

pub struct Artifacts {
    dir: PathBuf,
    tmp: PathBuf,
    store: Store,
    max_total: u64,
    usage: Mutex<Usage>,
    /// Wakes the uploader when a file is recorded.
    pub wake: Notify,
    upload: Mutex<UploadState>,
    slots: Mutex<HashMap<String, UploadSlot>>,
    /// `https://<fqdn>[:port]`, once the edge is bound.
    upload_base: RwLock<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Artifacts {
    /// Opens `<state_dir>/artifacts`: clears what a crash left half-written, drops files no record
    /// names and records whose file is gone.
    pub fn open(state_dir: &Path, max_total: u64, store: &Store) -> anyhow::Result<Arc<Artifacts>> {
        use anyhow::Context;
        let dir = state_dir.join("artifacts");
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        restrict(&dir);
        for e in std::fs::read_dir(&tmp)?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let mut usage = Usage::default();
        let mut known = std::collections::HashSet::new();
        for (id, bytes) in store.artifacts_all()? {
            let offer: Option<ArtifactOffer> = serde_json::from_slice(&bytes).ok();
            let path = dir.join(&id);
            match (offer, std::fs::metadata(&path)) {
                (Some(o), Ok(m)) if m.len() == o.size => {
                    usage.held += o.size;
                    usage.count += 1;
                    known.insert(id);
                }
                _ => {
                    warn!(artifact = %id, "artifact record without its file (or a damaged one); dropped");
                    store.set_artifact(&id, None)?;
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_file() && !known.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if usage.count > 0 {
            info!(
                files = usage.count,
                bytes = usage.held,
                "artifacts waiting for upload to the cloud"
            );
        }
        Ok(Arc::new(Artifacts {
            dir,
            tmp,
            store: store.clone(),
            max_total,
            usage: Mutex::new(usage),
            wake: Notify::new(),
            upload: Mutex::new(UploadState::default()),
            slots: Mutex::new(HashMap::new()),
            upload_base: RwLock::new(None),
        }))
    }

    /// Starts a new artifact file. Blocking I/O: call it (and write) off the async runtime.
    pub fn create(self: &Arc<Self>, meta: Meta) -> Result<ArtifactWriter, ArtifactError> {
        let free = crate::util::bytes::free_bytes(&self.dir).unwrap_or(u64::MAX);
        if free < DISK_MARGIN {
            return Err(ArtifactError::DiskFull {
                dir: self.dir.clone(),
                free,
            });
        }
        let id = uuid::Uuid::new_v4().to_string();
        let path = self.tmp.join(&id);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| ArtifactError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(ArtifactWriter {
            owner: self.clone(),
            id,
            meta,
            file: Some(std::io::BufWriter::with_capacity(64 * 1024, file)),
            tmp_path: path,
            hasher: Sha256::new(),
            written: 0,
            finished: false,
        })
    }

    /// Stores `bytes` as one artifact (off the async runtime).
    pub async fn put(
        self: &Arc<Self>,
        meta: Meta,
        bytes: bytes::Bytes,
    ) -> Result<ArtifactRef, ArtifactError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut w = me.create(meta)?;
            w.write_chunk(&bytes)?;
            w.finish()
        })
        .await
        .map_err(|e| ArtifactError::Io {
            path: self.tmp.clone(),
            source: std::io::Error::other(e.to_string()),
        })?
    }

    fn reserve(&self, n: u64) -> Result<(), ArtifactError> {
        let mut u = lock(&self.usage);
        let total = u.held.saturating_add(u.reserved).saturating_add(n);
        if total > self.max_total {
            return Err(ArtifactError::Full {
                needed: n,
                held: u.held.saturating_add(u.reserved),
                max: self.max_total,
                count: u.count,
            });
        }
        u.reserved += n;
        Ok(())
    }

    fn release(&self, reserved: u64) {
        let mut u = lock(&self.usage);
        u.reserved = u.reserved.saturating_sub(reserved);
    }

    /// The file of a recorded artifact.
    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Recorded artifacts, oldest first.
    pub fn pending(&self) -> Result<Vec<ArtifactOffer>, StoreError> {
        let mut v: Vec<ArtifactOffer> = self
            .store
            .artifacts_all()?
            .into_iter()
            .filter_map(|(_, b)| serde_json::from_slice(&b).ok())
            .collect();
        v.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then(a.artifact_id.cmp(&b.artifact_id))
        });
        Ok(v)
    }

    /// Deletes an artifact: the cloud confirmed it, or its capture was cancelled. Returns whether
    /// it was still here.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let Some(bytes) = self
            .store
            .artifacts_all()?
            .into_iter()
            .find(|(k, _)| k == id)
            .map(|(_, v)| v)
        else {
            return Ok(false);
        };
        let size = serde_json::from_slice::<ArtifactOffer>(&bytes)
            .map(|o| o.size)
            .unwrap_or(0);
        self.store.set_artifact(id, None)?;
        let _ = std::fs::remove_file(self.path(id));
        let mut u = lock(&self.usage);
        u.held = u.held.saturating_sub(size);
        u.count = u.count.saturating_sub(1);
        Ok(true)
    }

    pub fn set_upload(&self, f: impl FnOnce(&mut UploadState)) {
        f(&mut lock(&self.upload));
    }

    /// Counts and the uploader's state, from memory (cheap enough for every status).
    pub fn summary(&self) -> ArtifactsReport {
        let u = lock(&self.usage);
        ArtifactsReport {
            pending: u.count,
            bytes: u.held,
            max_total: self.max_total,
            upload: lock(&self.upload).clone(),
            files: Vec::new(),
        }
    }

    /// [`Self::summary`] with every file waiting (reads the store: blocking).
    pub fn report(&self) -> ArtifactsReport {
        let files = self.pending().unwrap_or_default();
        ArtifactsReport {
            files,
            ..self.summary()
        }
    }

    // ----- the edge's upload slots

    /// Where devices reach the relay's edge (`https://<fqdn>[:port]`); set by the daemon once the
    /// edge is bound. Without it the relay cannot take device uploads.
    pub fn set_upload_base(&self, base: String) {
        *self.upload_base.write().unwrap_or_else(|e| e.into_inner()) = Some(base);
    }

    pub fn upload_base(&self) -> Option<String> {
        self.upload_base
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Opens a one-time upload slot for a device at `from`; returns the URL to give it and where
    /// the outcome will arrive.
    pub fn open_slot(
        &self,
        from: IpAddr,
        meta: Meta,
        max_bytes: u64,
        ttl: Duration,
    ) -> Result<(String, oneshot::Receiver<Result<ArtifactRef, String>>), String> {
        let base = self.upload_base().ok_or_else(|| {
            "the device uploads its file to the relay's edge, and this relay has no [edge]"
                .to_string()
        })?;
        let token = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let url = format!("{base}{UPLOAD_PREFIX}{token}/{}", meta.name);
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let mut slots = lock(&self.slots);
        slots.retain(|_, s| s.expires > now && !s.done.is_closed());
        if slots.len() >= MAX_SLOTS {
            return Err(format!(
                "{MAX_SLOTS} device uploads are already expected; try again later"
            ));
        }
        slots.insert(
            token,
            UploadSlot {
                from,
                meta,
                max_bytes,
                expires: now + ttl,
                done: tx,
            },
        );
        Ok((url, rx))
    }

    /// Takes the slot behind `token` for a device at `peer`: one use only.
    pub fn take_slot(&self, token: &str, peer: IpAddr) -> Result<UploadSlot, SlotRefusal> {
        let mut slots = lock(&self.slots);
        let now = Instant::now();
        match slots.get(token) {
            None => Err(SlotRefusal::Unknown),
            Some(s) if s.expires <= now || s.done.is_closed() => {
                slots.remove(token);
                Err(SlotRefusal::Unknown)
            }
            Some(s) if s.from != peer => Err(SlotRefusal::WrongAddress),
            Some(_) => slots.remove(token).ok_or(SlotRefusal::Unknown),
        }
    }
}

/// Owner-only permissions on a directory holding device data (best effort).
fn restrict(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

/// One artifact being written: counted against the cap as it grows, hashed as it goes. Dropped
/// unfinished, it leaves nothing behind.
pub struct ArtifactWriter {
    owner: Arc<Artifacts>,
    id: String,
    meta: Meta,
    file: Option<std::io::BufWriter<std::fs::File>>,
    tmp_path: PathBuf,
    hasher: Sha256,
    written: u64,
    finished: bool,
}

impl ArtifactWriter {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn write_chunk(&mut self, buf: &[u8]) -> Result<(), ArtifactError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.owner.reserve(buf.len() as u64)?;
        self.written += buf.len() as u64;
        let file = self.file.as_mut().expect("open until finished");
        file.write_all(buf).map_err(|source| ArtifactError::Io {
            path: self.tmp_path.clone(),
            source,
        })?;
        self.hasher.update(buf);
        Ok(())
    }

    /// Makes the file durable, moves it into place and records it; from then on it waits for
    /// upload.
    pub fn finish(mut self) -> Result<ArtifactRef, ArtifactError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ArtifactError::Io { path, source }
        };
        let file = self
            .file
            .take()
            .expect("open until finished")
            .into_inner()
            .map_err(|e| ArtifactError::Io {
                path: self.tmp_path.clone(),
                source: e.into_error(),
            })?;
        file.sync_all().map_err(io(&self.tmp_path))?;
        drop(file);
        let sha256 = hex(&self.hasher.clone().finalize());
        let dest = self.owner.path(&self.id);
        std::fs::rename(&self.tmp_path, &dest).map_err(io(&dest))?;
        if let Ok(d) = std::fs::File::open(&self.owner.dir) {
            let _ = d.sync_all();
        }
        let offer = ArtifactOffer {
            artifact_id: self.id.clone(),
            name: self.meta.name.clone(),
            kind: self.meta.kind.clone(),
            content_type: self.meta.content_type.clone(),
            size: self.written,
            sha256: sha256.clone(),
            command_id: self.meta.command_id.clone(),
            target: self.meta.target.clone(),
            mac: self.meta.mac.clone(),
            created_at: rfc3339(SystemTime::now()),
        };
        let value = serde_json::to_vec(&offer).map_err(StoreError::from)?;
        if let Err(e) = self.owner.store.set_artifact(&self.id, Some(&value)) {
            let _ = std::fs::remove_file(&dest);
            return Err(e.into());
        }
        {
            let mut u = lock(&self.owner.usage);
            u.reserved = u.reserved.saturating_sub(self.written);
            u.held += self.written;
            u.count += 1;
        }
        self.finished = true;
        self.owner.wake.notify_one();
        info!(artifact = %self.id, name = %offer.name, kind = %offer.kind, bytes = offer.size, "artifact stored; waiting for upload to the cloud");
        Ok(ArtifactRef {
            artifact_id: offer.artifact_id,
            name: offer.name,
            kind: offer.kind,
            content_type: offer.content_type,
            size: offer.size,
            sha256,
        })
    }
}

impl Write for ArtifactWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_chunk(buf).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for ArtifactWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.file.take();
            let _ = std::fs::remove_file(&self.tmp_path);
            self.owner.release(self.written);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, max: u64) -> (Arc<Artifacts>, Store) {
        let store = Store::open(&dir.join("state")).unwrap();
        (
            Artifacts::open(&dir.join("state"), max, &store).unwrap(),
            store,
        )
    }

    #[test]
    fn files_are_recorded_whole_and_the_cap_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (a, store) = open(dir.path(), 1000);
        let mut w = a
            .create(Meta::new("test", "a.bin", "application/octet-stream"))
            .unwrap();
        w.write_chunk(&[7u8; 600]).unwrap();
        let r = w.finish().unwrap();
        assert_eq!(r.size, 600);
        assert_eq!(r.sha256, hex(&Sha256::digest([7u8; 600])));
        assert_eq!(std::fs::read(a.path(&r.artifact_id)).unwrap().len(), 600);
        // A second file that would pass the cap is refused while written, and leaves nothing.
        let mut w = a.create(Meta::new("test", "b.bin", "x")).unwrap();
        w.write_chunk(&[1u8; 300]).unwrap();
        let e = w.write_chunk(&[1u8; 200]).unwrap_err();
        assert!(e.to_string().contains("artifact store is full"), "{e}");
        drop(w);
        assert_eq!(
            std::fs::read_dir(dir.path().join("state/artifacts/tmp"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(a.report().pending, 1);
        // Reopened: the recorded file is still there; removing it frees the space.
        drop(a);
        let a = Artifacts::open(&dir.path().join("state"), 1000, &store).unwrap();
        assert_eq!(a.pending().unwrap().len(), 1);
        assert!(a.remove(&r.artifact_id).unwrap());
        assert!(!a.path(&r.artifact_id).exists());
        let mut w = a.create(Meta::new("test", "c.bin", "x")).unwrap();
        w.write_chunk(&[1u8; 900]).unwrap();
        w.finish().unwrap();
    }

    #[test]
    fn upload_slots_are_one_time_and_per_address() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _s) = open(dir.path(), 1 << 20);
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        assert!(
            a.open_slot(ip, Meta::default(), 10, Duration::from_secs(5))
                .is_err()
        );
        a.set_upload_base("https://relay.example".into());
        let (url, _rx) = a
            .open_slot(
                ip,
                Meta::new("packet_capture", "x.pcap.tar.gz", "application/gzip"),
                10,
                Duration::from_secs(5),
            )
            .unwrap();
        let token = url
            .strip_prefix(&format!("https://relay.example{UPLOAD_PREFIX}"))
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        assert!(token.len() >= 32);
        assert_eq!(
            a.take_slot(&token, "10.0.0.6".parse().unwrap()).err(),
            Some(SlotRefusal::WrongAddress)
        );
        assert!(a.take_slot(&token, ip).is_ok());
        assert_eq!(a.take_slot(&token, ip).err(), Some(SlotRefusal::Unknown));
        assert_eq!(a.take_slot("nope", ip).err(), Some(SlotRefusal::Unknown));
    }
}
