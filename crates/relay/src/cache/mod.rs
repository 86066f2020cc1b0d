//! The image cache: the firmware files on disk and the index of what they are. A shared service,
//! like the store: the download agent fills it, the edge serves from it, operations report on it
//! and verify it. It knows nothing of where files come from.
//!
//! Layout under `[images].dir`: `files/<sha256>` verified files, `partial/<sha256>.part` downloads
//! in progress, `quarantine/` files that failed `images verify`. Files are stored by content, so one
//! file in two images is stored once. A file is servable ([`Lookup::Ready`]) only once its SHA-256
//! matched and it was moved into `files/`.

use crate::protocol::{ImageManifest, ImageState};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::ImagesConfig;
use crate::util::live::Live;

/// State of one file, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub sha256: String,
    pub size: u64,
    /// `synced`, `syncing`, `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A file as the catalog tracks it in memory.
#[derive(Debug)]
pub struct FileState {
    pub size: u64,
    pub state: RwLock<(String, Option<String>)>,
    /// Bytes verified or downloaded so far (for progress).
    pub done: AtomicU64,
}

impl FileState {
    pub fn state(&self) -> (String, Option<String>) {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_synced(&self) -> bool {
        self.state.read().unwrap_or_else(|e| e.into_inner()).0 == "synced"
    }
}

#[derive(Default)]
struct Inner {
    manifest: ImageManifest,
    files: HashMap<String, Arc<FileState>>,
    /// Device path -> SHA-256.
    paths: HashMap<String, String>,
    refused: Option<String>,
    last_sync: Option<(SystemTime, Result<(), String>)>,
    /// Sync rounds started and finished since start (lets `images sync --wait` find its round).
    rounds_started: u64,
    rounds: u64,
    /// The revision of the last refused manifest, so a heartbeat repeating it does not refetch it.
    refused_revision: Option<u64>,
}

/// Counters for the image serving side, shown in status.
#[derive(Default, Debug)]
pub struct ServeStats {
    pub downloads_active: AtomicU64,
    pub downloads_total: AtomicU64,
    pub bytes_served: AtomicU64,
    pub refused_busy: AtomicU64,
    pub refused_not_synced: AtomicU64,
    pub bytes_fetched: AtomicU64,
}

/// The image cache: what is listed, what is ready, where it lives.
pub struct Catalog {
    /// `[images]` as in force: a reload replaces the limits (the directory stays until a restart).
    cfg: Live<ImagesConfig>,
    inner: RwLock<Inner>,
    /// Asks the agent to fetch the manifest and sync now.
    pub wake: Notify,
    pub stats: ServeStats,
    /// A download of the current sync round stopped for want of disk space: the agent looks again
    /// within seconds instead of backing off, so it resumes as soon as space returns.
    pub space_short: std::sync::atomic::AtomicBool,
}

/// One device download from the edge, counted in `downloads_active` until dropped.
pub struct ServeSlot {
    catalog: Arc<Catalog>,
}

impl Drop for ServeSlot {
    fn drop(&mut self) {
        self.catalog
            .stats
            .downloads_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a device path resolves to.
pub enum Lookup {
    /// Not an image path: the request goes to the provisioning upstream.
    Unknown,
    /// Listed but not verified yet: the device must wait.
    NotReady { done: u64, size: u64 },
    Ready {
        file: PathBuf,
        sha256: String,
        size: u64,
    },
}

impl Catalog {
    /// `[images]` as in force now.
    pub fn cfg(&self) -> Arc<ImagesConfig> {
        self.cfg.get()
    }

    /// Installs `[images]` as a reload left it (the caller keeps `dir` as it was).
    pub fn set_cfg(&self, cfg: ImagesConfig) {
        self.cfg.set(cfg);
    }

    /// A slot for one device download from the edge, under `[images].max_downloads` in force
    /// now; None when that many are under way.
    pub fn try_serve(self: &Arc<Self>) -> Option<ServeSlot> {
        let max = self.cfg().max_downloads as u64;
        let before = self.stats.downloads_active.fetch_add(1, Ordering::Relaxed);
        let slot = ServeSlot {
            catalog: self.clone(),
        };
        if before >= max {
            // Dropping the slot gives the count back.
            return None;
        }
        Some(slot)
    }

    /// Opens the cache directory and the recorded state, with cheap checks: a file recorded as synced
    /// must exist with its size; stray partial and unlisted files are removed.
    pub fn open(cfg: &ImagesConfig, store: &crate::store::Store) -> Result<Arc<Catalog>> {
        for d in ["files", "partial", "quarantine"] {
            std::fs::create_dir_all(cfg.dir.join(d))
                .with_context(|| format!("cannot create {}", cfg.dir.join(d).display()))?;
        }
        let manifest: ImageManifest = match store.image_meta("manifest")? {
            Some(b) => serde_json::from_slice(&b).context("unreadable manifest in the store")?,
            None => ImageManifest::default(),
        };
        let refused = store
            .image_meta("refused")?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let records: HashMap<String, FileRecord> = store
            .image_files()?
            .into_iter()
            .filter_map(|(k, v)| serde_json::from_slice(&v).ok().map(|r| (k, r)))
            .collect();
        let cat = Catalog {
            cfg: Live::new(cfg.clone()),
            inner: RwLock::new(Inner::default()),
            wake: Notify::new(),
            stats: ServeStats::default(),
            space_short: std::sync::atomic::AtomicBool::new(false),
        };
        let mut inner = Inner {
            refused,
            ..Default::default()
        };
        let mut wanted = HashSet::new();
        for img in &manifest.images {
            for f in &img.files {
                wanted.insert(f.sha256.clone());
                inner.paths.insert(f.path.clone(), f.sha256.clone());
                if inner.files.contains_key(&f.sha256) {
                    continue;
                }
                let complete = cat.file_path(&f.sha256);
                let on_disk = std::fs::metadata(&complete).map(|m| m.len()).ok();
                let rec = records.get(&f.sha256);
                let (state, reason, done) = match (rec.map(|r| r.state.as_str()), on_disk) {
                    (Some("synced"), Some(len)) if len == f.size => ("synced", None, f.size),
                    (Some("synced"), _) => {
                        warn!(sha256 = %f.sha256, path = %f.path, "cached image file missing or of the wrong size; fetching it again");
                        let _ = std::fs::remove_file(&complete);
                        ("syncing", None, 0)
                    }
                    (Some("failed"), _) => (
                        "failed",
                        rec.and_then(|r| r.reason.clone()),
                        cat.partial_len(&f.sha256),
                    ),
                    // A complete file not yet recorded (a crash after the rename) is verified again before use.
                    (_, _) => ("syncing", None, cat.partial_len(&f.sha256)),
                };
                inner.files.insert(
                    f.sha256.clone(),
                    Arc::new(FileState {
                        size: f.size,
                        state: RwLock::new((state.to_string(), reason)),
                        done: AtomicU64::new(done),
                    }),
                );
            }
        }
        inner.manifest = manifest;
        cat.remove_strays(&wanted);
        *cat.inner.write().unwrap_or_else(|e| e.into_inner()) = inner;
        Ok(Arc::new(cat))
    }

    pub fn file_path(&self, sha256: &str) -> PathBuf {
        self.cfg().dir.join("files").join(sha256)
    }

    pub fn partial_path(&self, sha256: &str) -> PathBuf {
        self.cfg()
            .dir
            .join("partial")
            .join(format!("{sha256}.part"))
    }

    pub(crate) fn partial_len(&self, sha256: &str) -> u64 {
        std::fs::metadata(self.partial_path(sha256))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Deletes cached and partial files the manifest does not list (never served, never kept).
    fn remove_strays(&self, wanted: &HashSet<String>) {
        for (sub, suffix) in [("files", ""), ("partial", ".part")] {
            let Ok(entries) = std::fs::read_dir(self.cfg().dir.join(sub)) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let sha = name.strip_suffix(suffix).unwrap_or(&name);
                if !wanted.contains(sha) {
                    info!(file = %e.path().display(), "removing an image file the manifest no longer lists");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Whether `path` is an image path of the cache (synced or not).
    pub fn lists(&self, path: &str) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .paths
            .get(path)
            .is_some_and(|sha| inner.files.contains_key(sha))
    }

    /// Resolves a device path.
    pub fn lookup(&self, path: &str) -> Lookup {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let Some(sha) = inner.paths.get(path) else {
            return Lookup::Unknown;
        };
        let Some(f) = inner.files.get(sha) else {
            return Lookup::Unknown;
        };
        if f.is_synced() {
            Lookup::Ready {
                file: self.file_path(sha),
                sha256: sha.clone(),
                size: f.size,
            }
        } else {
            Lookup::NotReady {
                done: f.done.load(Ordering::Relaxed),
                size: f.size,
            }
        }
    }

    pub fn revision(&self) -> u64 {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .manifest
            .revision
    }

    /// Whether a revision the cloud announces is news: neither applied nor already refused.
    pub fn is_new_revision(&self, revision: u64) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        revision != inner.manifest.revision && Some(revision) != inner.refused_revision
    }

    /// Sync rounds started so far; a round numbered above this one starts after the call.
    pub fn rounds_started(&self) -> u64 {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .rounds_started
    }

    /// Per-image states for heartbeats and `ucrelay images`.
    pub fn report(&self) -> CatalogReport {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let images = inner
            .manifest
            .images
            .iter()
            .map(|img| {
                let mut state = "synced";
                let mut reason = None;
                let (mut done, mut total) = (0, 0);
                let files = img
                    .files
                    .iter()
                    .map(|f| {
                        let (st, why) = inner
                            .files
                            .get(&f.sha256)
                            .map(|s| s.state())
                            .unwrap_or(("syncing".into(), None));
                        let d = inner
                            .files
                            .get(&f.sha256)
                            .map(|s| s.done.load(Ordering::Relaxed))
                            .unwrap_or(0);
                        done += d.min(f.size);
                        total += f.size;
                        match st.as_str() {
                            "failed" => {
                                state = "failed";
                                if reason.is_none() {
                                    reason = why.clone();
                                }
                            }
                            "syncing" if state != "failed" => state = "syncing",
                            _ => {}
                        }
                        FileReport {
                            path: f.path.clone(),
                            size: f.size,
                            sha256: f.sha256.clone(),
                            state: st,
                            reason: why,
                        }
                    })
                    .collect();
                ImageReport {
                    id: img.id.clone(),
                    product: img.product.clone(),
                    version: img.version.clone(),
                    state: state.to_string(),
                    bytes_done: done,
                    bytes_total: total,
                    reason,
                    files,
                }
            })
            .collect();
        CatalogReport {
            revision: inner.manifest.revision,
            refused: inner.refused.clone(),
            last_sync: inner
                .last_sync
                .as_ref()
                .map(|(t, _)| crate::util::time::rfc3339(*t)),
            last_sync_error: inner.last_sync.as_ref().and_then(|(_, r)| r.clone().err()),
            sync_rounds: inner.rounds,
            downloads_active: self.stats.downloads_active.load(Ordering::Relaxed),
            bytes_served: self.stats.bytes_served.load(Ordering::Relaxed),
            bytes_fetched: self.stats.bytes_fetched.load(Ordering::Relaxed),
            images,
        }
    }

    pub fn heartbeat_states(&self) -> Vec<ImageState> {
        self.report()
            .images
            .into_iter()
            .map(|i| ImageState {
                id: i.id,
                state: i.state,
                bytes_done: i.bytes_done,
                bytes_total: i.bytes_total,
                reason: i.reason,
            })
            .collect()
    }

    pub(crate) fn set_state(
        &self,
        store: &crate::store::Store,
        sha256: &str,
        state: &str,
        reason: Option<String>,
    ) -> Result<()> {
        let size = {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            let Some(f) = inner.files.get(sha256) else {
                return Ok(());
            };
            *f.state.write().unwrap_or_else(|e| e.into_inner()) =
                (state.to_string(), reason.clone());
            f.size
        };
        let rec = FileRecord {
            sha256: sha256.to_string(),
            size,
            state: state.to_string(),
            reason,
        };
        Ok(store.set_image_file(sha256, Some(&serde_json::to_vec(&rec)?))?)
    }

    /// Applies an accepted manifest: records it, indexes its paths, drops what it no longer lists.
    pub(crate) fn apply(&self, store: &crate::store::Store, m: ImageManifest) -> Result<()> {
        let mut wanted = HashSet::new();
        let mut paths = HashMap::new();
        let mut sizes = HashMap::new();
        for img in &m.images {
            for f in &img.files {
                wanted.insert(f.sha256.clone());
                paths.insert(f.path.clone(), f.sha256.clone());
                sizes.insert(f.sha256.clone(), f.size);
            }
        }
        store.set_image_meta("manifest", Some(&serde_json::to_vec(&m)?))?;
        store.set_image_meta("refused", None)?;
        let dropped: Vec<String> = {
            let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
            let dropped = inner
                .files
                .keys()
                .filter(|k| !wanted.contains(*k))
                .cloned()
                .collect();
            inner.files.retain(|k, _| wanted.contains(k));
            for (sha, size) in &sizes {
                inner.files.entry(sha.clone()).or_insert_with(|| {
                    Arc::new(FileState {
                        size: *size,
                        state: RwLock::new(("syncing".into(), None)),
                        done: AtomicU64::new(self.partial_len(sha)),
                    })
                });
            }
            inner.paths = paths;
            inner.manifest = m;
            inner.refused = None;
            inner.refused_revision = None;
            dropped
        };
        for sha in dropped {
            info!(sha256 = %sha, "image file dropped from the manifest; deleting it");
            store.set_image_file(&sha, None)?;
            let _ = std::fs::remove_file(self.file_path(&sha));
            let _ = std::fs::remove_file(self.partial_path(&sha));
        }
        Ok(())
    }

    pub(crate) fn refuse(
        &self,
        store: &crate::store::Store,
        revision: u64,
        why: &str,
    ) -> Result<()> {
        store.set_image_meta("refused", Some(why.as_bytes()))?;
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.refused = Some(why.to_string());
        inner.refused_revision = Some(revision);
        Ok(())
    }

    /// Files still to fetch: (sha256, size, url).
    pub(crate) fn pending(&self) -> Vec<(String, u64, String)> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for img in &inner.manifest.images {
            for f in &img.files {
                if let Some(st) = inner.files.get(&f.sha256)
                    && !st.is_synced()
                    && seen.insert(f.sha256.clone())
                {
                    out.push((f.sha256.clone(), f.size, f.url.clone()));
                }
            }
        }
        out
    }

    pub(crate) fn file_state(&self, sha256: &str) -> Option<Arc<FileState>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .files
            .get(sha256)
            .cloned()
    }

    /// Counts a sync round as started (`images sync --wait` waits for a round that started after it
    /// asked).
    pub(crate) fn start_round(&self) {
        self.space_short.store(false, Ordering::Relaxed);
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .rounds_started += 1;
    }

    pub(crate) fn note_sync(&self, result: Result<(), String>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.last_sync = Some((SystemTime::now(), result));
        inner.rounds += 1;
    }

    /// Re-hashes every synced file; a file that no longer matches is moved to `quarantine/` and fetched
    /// again. Returns (checked, quarantined paths).
    pub fn verify(&self, store: &crate::store::Store) -> Result<(u64, Vec<String>)> {
        let synced: Vec<(String, Vec<String>)> = {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            inner
                .files
                .iter()
                .filter(|(_, f)| f.is_synced())
                .map(|(sha, _)| {
                    let paths = inner
                        .paths
                        .iter()
                        .filter(|(_, s)| *s == sha)
                        .map(|(p, _)| p.clone())
                        .collect();
                    (sha.clone(), paths)
                })
                .collect()
        };
        let mut bad = Vec::new();
        for (sha, paths) in &synced {
            let file = self.file_path(sha);
            let actual = hash_file(&file).unwrap_or_else(|e| format!("unreadable: {e}"));
            if &actual != sha {
                let dest = self.cfg().dir.join("quarantine").join(format!(
                    "{sha}.{}",
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                ));
                warn!(sha256 = %sha, actual = %actual, quarantine = %dest.display(), "cached image file no longer matches its SHA-256");
                let _ = std::fs::rename(&file, &dest);
                if let Some(f) = self.file_state(sha) {
                    f.done.store(0, Ordering::Relaxed);
                }
                self.set_state(
                    store,
                    sha,
                    "syncing",
                    Some("failed verification; fetching again".into()),
                )?;
                bad.extend(paths.iter().cloned());
            }
        }
        Ok((synced.len() as u64, bad))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogReport {
    pub revision: u64,
    pub refused: Option<String>,
    pub last_sync: Option<String>,
    pub last_sync_error: Option<String>,
    /// Sync rounds finished since the relay started.
    pub sync_rounds: u64,
    pub downloads_active: u64,
    pub bytes_served: u64,
    pub bytes_fetched: u64,
    pub images: Vec<ImageReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageReport {
    pub id: String,
    pub product: String,
    pub version: String,
    /// `synced`, `syncing`, `failed`.
    pub state: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub reason: Option<String>,
    pub files: Vec<FileReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileReport {
    /// The URL path devices download it under from the edge.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub state: String,
    pub reason: Option<String>,
}

/// SHA-256 of a file, lower-case hex.
pub fn hash_file(path: &std::path::Path) -> std::io::Result<String> {
    Ok(hex(&hash_prefix(path)?.0.finalize()))
}

/// The running hash of everything in a file, and how many bytes that was (for resuming).
pub(crate) fn hash_prefix(path: &std::path::Path) -> std::io::Result<(Sha256, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            return Ok((h, n));
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
