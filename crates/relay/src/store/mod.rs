//! The embedded store (redb, one file in `state_dir`): the relay's identity, the command inbox and the
//! results outbox. Every write is one durable transaction, so what was committed survives `kill -9`.
//!
//! Calls are synchronous (a commit fsyncs); async code goes through [`Store::run`], which moves the
//! work to the blocking pool. Large blobs (firmware) never live here: only their metadata.
//!
//! A full disk (or any I/O error) is survived, not fatal. redb refuses every operation after an
//! I/O error (`PreviousIo`) until the database is closed and opened again, so the store does that
//! itself: the first operation that fails with an I/O error closes the database (waiting for the
//! operations in flight, which hold it shared), records why in [`Store::trouble`], and the next
//! operation opens it again, at most once a second. Until that succeeds every operation fails at
//! once with [`StoreError::Unavailable`], so callers refuse new work instead of blocking, and what
//! was committed before stays committed. The trouble clears with the first write that commits.

mod error;

pub use error::{StoreError, error_chain};

use crate::protocol::{Command, ResultRecord};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

type Result<T, E = StoreError> = std::result::Result<T, E>;

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Results not yet acknowledged by the cloud, keyed by an increasing sequence number (send order).
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Commands acknowledged to the cloud whose result is not stored yet, keyed by command id.
const INBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("inbox");
/// Results the cloud refused as malformed (400): kept for inspection, never retried.
const REJECTED: TableDefinition<u64, &[u8]> = TableDefinition::new("rejected");
/// Download agent: the applied manifest and sync notes, by name.
const IMAGE_META: TableDefinition<&str, &[u8]> = TableDefinition::new("image_meta");
/// Download agent: one record per image file, keyed by its SHA-256.
const IMAGE_FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("image_files");
/// Commands already finished (id -> unix seconds), so a command the cloud sends again is not re-run.
const DONE: TableDefinition<&str, u64> = TableDefinition::new("done");
/// Device plane: scheduled tasks by task id (JSON owned by `devices::tasks`).
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// Device plane: finished targets of a task, keyed (task id, target): a target listed here is never
/// run again, even after a crash.
const TASK_TARGETS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("task_targets");
/// Device plane: known devices by address (JSON owned by `devices`).
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// Device plane: monitoring alarms not yet acknowledged by the cloud, by alarm id.
const ALARMS: TableDefinition<&str, &[u8]> = TableDefinition::new("alarms");
/// Device plane: the certificate key pinned for each device, by the socket address the relay dials
/// (JSON owned by `devices::identity`).
const DEVICE_PINS: TableDefinition<&str, &[u8]> = TableDefinition::new("device_pins");
/// Artifacts stored on disk and not yet confirmed by the cloud, by artifact id (JSON owned by
/// `artifacts`); the file itself lives in `<state_dir>/artifacts/`.
const ARTIFACTS: TableDefinition<&str, &[u8]> = TableDefinition::new("artifacts");
/// Configuration backups, keyed (MAC, backup id); ids sort by time (JSON owned by
/// `devices::backups`).
const BACKUPS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("backups");
/// Packet captures running on devices, by capture id (JSON owned by `devices::captures`).
const CAPTURES: TableDefinition<&str, &[u8]> = TableDefinition::new("captures");
/// How long finished command ids are remembered.
const DONE_KEEP: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

const SCHEMA_VERSION: &str = "1";
pub const DB_FILE: &str = "ucrelay.redb";

#[derive(Clone)]
pub struct Store {
    inner: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    /// The open database; `None` after an I/O error closed it, until it is opened again. Every
    /// operation holds it shared for its whole length, so closing waits for them.
    db: RwLock<Option<Database>>,
    /// Why the store cannot be written now, if it cannot.
    trouble: Mutex<Option<Trouble>>,
    /// When an open was last tried while the database was closed.
    last_open: Mutex<Option<Instant>>,
    /// Tests only: the disk is full (see [`Store::set_disk_full`]).
    #[cfg(test)]
    disk_full: std::sync::atomic::AtomicBool,
}

/// Why the store cannot take writes now: shown by `ucrelay status` and sent in heartbeats.
#[derive(Debug, Clone, PartialEq)]
pub struct Trouble {
    /// The filesystem under the store is full (ENOSPC, EDQUOT): it recovers once space returns.
    pub disk_full: bool,
    pub message: String,
    pub since: SystemTime,
}

/// Copies entries of a string-keyed table in order: at most `max`, and past the first no more than
/// `max_bytes` of values.
fn take_bounded<'a>(
    entries: impl Iterator<
        Item = std::result::Result<
            (
                redb::AccessGuard<'a, &'static str>,
                redb::AccessGuard<'a, &'static [u8]>,
            ),
            redb::StorageError,
        >,
    >,
    max: usize,
    max_bytes: usize,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for e in entries.take(max) {
        let (k, v) = e?;
        bytes = bytes.saturating_add(v.value().len());
        if !out.is_empty() && bytes > max_bytes {
            break;
        }
        out.push((k.value().to_string(), v.value().to_vec()));
    }
    Ok(out)
}

/// How often a closed database is opened again (each attempt may repair the file).
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// redb keeps every page it touched in memory up to its cache size, 1 GiB by default: the relay's
/// memory would grow with its store for as long as it runs. Pages it drops are still in the
/// kernel's page cache, so a miss costs a `pread`, not a disk read. 1 MiB holds the B-tree's upper
/// levels and the pages being written: a 50,000-device monitoring cycle peaked at 92.5 MB with it
/// (97.1 MB with 4 MiB), for about 1 s more on a 50,000-target task.
const CACHE_BYTES: usize = 1 << 20;

fn open_db(path: &Path) -> Result<Database> {
    match Database::builder().set_cache_size(CACHE_BYTES).create(path) {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(StoreError::InUse {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(StoreError::Open {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl Store {
    /// Opens (or creates) the store in `state_dir`, creating the directory when needed. Fails clearly
    /// when another process holds it.
    pub fn open(state_dir: &Path) -> Result<Store> {
        create_private_dir(state_dir).map_err(|source| StoreError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(DB_FILE);
        // The store holds the relay's token and the device passwords tasks carry while they run:
        // owner only, whatever the umask, also for a file an older build created looser.
        private_file(&path).map_err(|source| StoreError::Private {
            path: path.clone(),
            source,
        })?;
        let db = open_db(&path)?;
        let store = Store {
            inner: Arc::new(Shared {
                path,
                db: RwLock::new(Some(db)),
                trouble: Mutex::new(None),
                last_open: Mutex::new(None),
                #[cfg(test)]
                disk_full: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        match store.init() {
            Ok(()) => {}
            // Starting on a full disk: what is stored stays readable; writes wait for space.
            Err(e) if e.is_disk_full() => {
                tracing::warn!(error = %format!("{e:#}"), "the disk under the store is full; starting anyway, new work is refused until space returns");
            }
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Why the store cannot take writes now (a full disk, an I/O error), or `None` when it can.
    pub fn trouble(&self) -> Option<Trouble> {
        self.inner
            .trouble
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs one operation on the open database (opening it again first if an I/O error closed
    /// it). An I/O error closes it for the next operation to reopen; a write that commits clears
    /// the recorded trouble.
    fn with<T>(&self, write: bool, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        self.ensure_open()?;
        let outcome = {
            let guard = self.inner.db.read().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(db) => f(db),
                None => return Err(self.unavailable()),
            }
        };
        match &outcome {
            Ok(_) if write => {
                let mut t = self.inner.trouble.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(old) = t.take() {
                    tracing::info!(was = %old.message, "the store takes writes again");
                }
            }
            Ok(_) => {}
            Err(e) if e.closes_database() => self.close_after(e),
            Err(_) => {}
        }
        outcome
    }

    fn read<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        self.with(false, f)
    }

    fn write<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        #[cfg(test)]
        if self
            .inner
            .disk_full
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return self.with(true, |_| {
                let enospc = std::io::Error::from_raw_os_error(nix::libc::ENOSPC);
                Err(StoreError::Db(redb::Error::Io(enospc)))
            });
        }
        self.with(true, f)
    }

    /// Tests only: while `full`, every durable write fails with `ENOSPC` as on a full disk, and the
    /// store takes the path a real one takes (it closes, records the trouble, opens again); reads
    /// work whenever the database is open. Nothing of this is in a build that is not a test.
    #[cfg(test)]
    pub(crate) fn set_disk_full(&self, full: bool) {
        self.inner
            .disk_full
            .store(full, std::sync::atomic::Ordering::Relaxed);
    }

    /// A write whose commit is not durable (`Durability::None`): redb writes nothing to the file
    /// for it yet, so its success says nothing about the disk and does not clear the trouble.
    fn write_lazily<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        self.with(false, f)
    }

    fn unavailable(&self) -> StoreError {
        let t = self.trouble();
        StoreError::Unavailable {
            path: self.inner.path.clone(),
            disk_full: t.as_ref().is_some_and(|t| t.disk_full),
            reason: t
                .map(|t| t.message)
                .unwrap_or_else(|| "closed after an I/O error".into()),
        }
    }

    /// Records why the store failed; a later `PreviousIo` does not hide the first cause.
    fn note(&self, e: &StoreError) {
        let mut t = self.inner.trouble.lock().unwrap_or_else(|e| e.into_inner());
        let disk_full = e.is_disk_full();
        let keep = matches!(&*t, Some(old) if old.disk_full && !disk_full);
        if !keep {
            let since = t.as_ref().map_or_else(SystemTime::now, |old| old.since);
            *t = Some(Trouble {
                disk_full,
                message: if disk_full {
                    format!(
                        "the disk under the store {} is full; new commands and tasks are refused until space returns",
                        self.inner.path.display()
                    )
                } else {
                    format!(
                        "store {} failed: {}",
                        self.inner.path.display(),
                        error_chain(e)
                    )
                },
                since,
            });
        }
    }

    /// Closes the database after an I/O error (waiting for the operations in flight).
    fn close_after(&self, e: &StoreError) {
        self.note(e);
        let mut db = self.inner.db.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = db.take() {
            tracing::warn!(error = %error_chain(e), "store I/O failed; closing it to open it again");
            drop(old);
        }
    }

    /// Opens the database again if an I/O error closed it, at most once every [`REOPEN_EVERY`].
    fn ensure_open(&self) -> Result<()> {
        if self
            .inner
            .db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let mut db = self.inner.db.write().unwrap_or_else(|e| e.into_inner());
        if db.is_some() {
            return Ok(());
        }
        {
            let mut last = self
                .inner
                .last_open
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                return Err(self.unavailable());
            }
            *last = Some(Instant::now());
        }
        match open_db(&self.inner.path) {
            Ok(opened) => {
                tracing::info!(path = %self.inner.path.display(), "store opened again");
                *db = Some(opened);
                drop(db);
                // Opening after an I/O error repairs the file. Under the chaos soak the relay's own
                // memory rose by 1-2 MB at such a reopen (a 3 MB store); what the repair freed
                // would otherwise wait for the daemon's next trim, up to a minute. (Not under the
                // lock: readers and writers need not wait for it.)
                crate::util::memory::trim();
                Ok(())
            }
            Err(e) => {
                drop(db);
                self.note(&e);
                Err(self.unavailable())
            }
        }
    }

    /// Proves the store works end to end with a tiny durable write (through fsync). The daemon
    /// runs it for the watchdog (an answer, even a refusal, means the store is alive; no answer
    /// means it hangs) and, while the store reports trouble, every couple of seconds: the write
    /// that commits is what clears the trouble once space returns.
    pub fn probe(&self) -> Result<()> {
        self.write(|db| {
            let tx = db.begin_write()?;
            tx.open_table(META)?
                .insert("alive_at", unix_now().to_string().as_str())?;
            tx.commit()?;
            Ok(())
        })
    }

    fn init(&self) -> Result<()> {
        self.write(Self::init_tables)
    }

    fn init_tables(db: &Database) -> Result<()> {
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let existing = meta.get("schema_version")?.map(|v| v.value().to_string());
            match existing.as_deref() {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(StoreError::Schema {
                        found: other.to_string(),
                        known: SCHEMA_VERSION,
                    });
                }
            }
            tx.open_table(OUTBOX)?;
            tx.open_table(INBOX)?;
            tx.open_table(REJECTED)?;
            tx.open_table(IMAGE_META)?;
            tx.open_table(IMAGE_FILES)?;
            tx.open_table(TASKS)?;
            tx.open_table(TASK_TARGETS)?;
            tx.open_table(DEVICES)?;
            tx.open_table(ALARMS)?;
            tx.open_table(DEVICE_PINS)?;
            tx.open_table(ARTIFACTS)?;
            tx.open_table(BACKUPS)?;
            tx.open_table(CAPTURES)?;
            // Forget finished command ids past the keep period.
            let cutoff = unix_now().saturating_sub(DONE_KEEP.as_secs());
            tx.open_table(DONE)?.retain(|_, at| at >= cutoff)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Runs blocking store work off the async runtime. The work may fail with its own error type,
    /// as long as a [`StoreError`] converts into it.
    pub async fn run<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Store) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| E::from(StoreError::Task(e.to_string())))?
    }

    /// The relay id recorded in the store under `state_dir`, read without creating or changing
    /// anything. None when there is no store yet; an error when it cannot be read (a running relay
    /// holds it, or permissions).
    pub fn peek_relay_id(state_dir: &Path) -> Result<Option<String>> {
        let path = state_dir.join(DB_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let db = match redb::ReadOnlyDatabase::open(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::InUse { path });
            }
            Err(source) => return Err(StoreError::Open { path, source }),
        };
        let tx = db.begin_read()?;
        let meta = match tx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(meta.get("relay_id")?.map(|v| v.value().to_string()))
    }

    /// The relay's identity: generated on first start, then always the same. Read without a
    /// write when it exists, so a relay starts on a full disk.
    pub fn relay_id(&self) -> Result<String> {
        let existing = self.read(|db| {
            let tx = db.begin_read()?;
            Ok(tx
                .open_table(META)?
                .get("relay_id")?
                .map(|v| v.value().to_string()))
        })?;
        if let Some(id) = existing {
            return Ok(id);
        }
        self.write(|db| {
            let tx = db.begin_write()?;
            let id = {
                let mut meta = tx.open_table(META)?;
                let existing = meta.get("relay_id")?.map(|v| v.value().to_string());
                match existing {
                    Some(id) => id,
                    None => {
                        let id = uuid::Uuid::new_v4().to_string();
                        meta.insert("relay_id", id.as_str())?;
                        id
                    }
                }
            };
            tx.commit()?;
            Ok(id)
        })
    }

    /// Stores a command before it is acknowledged to the cloud.
    pub fn inbox_put(&self, cmd: &Command) -> Result<()> {
        self.write(|db| {
            let bytes = serde_json::to_vec(cmd)?;
            let tx = db.begin_write()?;
            tx.open_table(INBOX)?
                .insert(cmd.id.as_str(), bytes.as_slice())?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Forgets the finished command ids remembered for longer than [`DONE_KEEP`] (a start does it
    /// too; a relay that runs for months does it every hour, or the table grows with every command
    /// it ever ran). Returns how many were forgotten.
    pub fn forget_old_commands(&self) -> Result<u64> {
        self.forget_commands_before(unix_now().saturating_sub(DONE_KEEP.as_secs()))
    }

    fn forget_commands_before(&self, cutoff: u64) -> Result<u64> {
        self.write(|db| {
            let tx = db.begin_write()?;
            let gone = {
                let mut done = tx.open_table(DONE)?;
                let before = done.len()?;
                done.retain(|_, at| at >= cutoff)?;
                before - done.len()?
            };
            tx.commit()?;
            Ok(gone)
        })
    }

    /// Whether a command id is pending or finished: a command the cloud sends again (its ack was
    /// lost) is acknowledged again but never run twice.
    pub fn command_seen(&self, id: &str) -> Result<bool> {
        self.read(|db| {
            let tx = db.begin_read()?;
            Ok(tx.open_table(INBOX)?.get(id)?.is_some() || tx.open_table(DONE)?.get(id)?.is_some())
        })
    }

    pub fn inbox_all(&self) -> Result<Vec<Command>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(INBOX)?;
            let mut out = Vec::new();
            for entry in table.iter()? {
                let (_, v) = entry?;
                match serde_json::from_slice::<Command>(v.value()) {
                    Ok(cmd) => out.push(cmd),
                    Err(e) => tracing::warn!(error = %e, "skipping unreadable inbox entry"),
                }
            }
            Ok(out)
        })
    }

    /// Stores a result in the outbox and, in the same transaction, drops its command from the inbox:
    /// a command is never both finished and pending.
    pub fn finish(&self, rec: &ResultRecord) -> Result<()> {
        self.write(|db| {
            let bytes = serde_json::to_vec(rec)?;
            let tx = db.begin_write()?;
            {
                let mut outbox = tx.open_table(OUTBOX)?;
                let next = outbox.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
                outbox.insert(next, bytes.as_slice())?;
                tx.open_table(INBOX)?.remove(rec.command_id.as_str())?;
                tx.open_table(DONE)?
                    .insert(rec.command_id.as_str(), unix_now())?;
            }
            tx.commit()?;
            // The name comes from the cloud: only names this relay knows become label values, so a
            // cloud cannot grow the metric without bound.
            let name = if crate::protocol::is_known_command(&rec.name) {
                rec.name.as_str()
            } else {
                "other"
            };
            crate::util::metrics::global()
                .commands
                .inc(&[("name", name), ("result", rec.result.as_str())]);
            Ok(())
        })
    }

    /// The oldest results, with their outbox keys: at most `max` of them and, past the first, no
    /// more than `max_bytes` of stored JSON together (a record larger than that goes alone).
    pub fn outbox_batch(&self, max: usize, max_bytes: usize) -> Result<Vec<(u64, ResultRecord)>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(OUTBOX)?;
            let mut out = Vec::new();
            let mut bytes = 0usize;
            for entry in table.iter()?.take(max) {
                let (k, v) = entry?;
                bytes = bytes.saturating_add(v.value().len());
                if !out.is_empty() && bytes > max_bytes {
                    break;
                }
                match serde_json::from_slice::<ResultRecord>(v.value()) {
                    Ok(rec) => out.push((k.value(), rec)),
                    Err(e) => {
                        tracing::error!(key = k.value(), error = %e, "unreadable outbox entry kept for inspection")
                    }
                }
            }
            Ok(out)
        })
    }

    /// Drops results the cloud acknowledged.
    ///
    /// The removal is not made durable on its own: it rides on the next durable commit (the next
    /// result, pin or task write) or on a clean close. A `kill -9` in between brings the removed
    /// results back and they are sent again, which the cloud drops by result id. So a busy outbox
    /// costs no fsync per batch; the device plane's results pay the only one.
    pub fn outbox_remove(&self, keys: &[u64]) -> Result<()> {
        self.write_lazily(|db| {
            let mut tx = db.begin_write()?;
            tx.set_durability(redb::Durability::None)
                .map_err(redb::Error::from)?;
            {
                let mut table = tx.open_table(OUTBOX)?;
                for k in keys {
                    table.remove(*k)?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Moves a result the cloud refused for good out of the outbox, so it cannot block the rest.
    pub fn outbox_reject(&self, key: u64, reason: &str) -> Result<()> {
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut outbox = tx.open_table(OUTBOX)?;
                let entry = outbox.remove(key)?.map(|v| v.value().to_vec());
                if let Some(bytes) = entry {
                    let mut rec: serde_json::Value =
                        serde_json::from_slice(&bytes).unwrap_or_default();
                    rec["rejected_because"] = serde_json::Value::String(reason.to_string());
                    tx.open_table(REJECTED)?
                        .insert(key, serde_json::to_vec(&rec)?.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub fn rejected_len(&self) -> Result<u64> {
        self.read(|db| {
            let tx = db.begin_read()?;
            Ok(tx.open_table(REJECTED)?.len()?)
        })
    }

    pub fn outbox_len(&self) -> Result<u64> {
        self.read(|db| {
            let tx = db.begin_read()?;
            Ok(tx.open_table(OUTBOX)?.len()?)
        })
    }
}

/// Creates `dir` (and missing parents) with mode 0700, whatever the umask. An existing directory
/// is left as it is: under systemd its mode is the unit's `StateDirectoryMode`.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // `mode` is filtered by the umask; say it again explicitly.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Creates `path` empty with mode 0600 when missing; an existing file loses any group or other
/// permission bits.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

impl Store {
    pub fn image_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            Ok(tx
                .open_table(IMAGE_META)?
                .get(key)?
                .map(|v| v.value().to_vec()))
        })
    }

    /// Sets (or with `None` removes) a download-agent note.
    pub fn set_image_meta(&self, key: &str, value: Option<&[u8]>) -> Result<()> {
        self.set_in(IMAGE_META, key, value)
    }

    pub fn image_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.all_of(IMAGE_FILES)
    }

    /// Writes (or with `None` deletes) one image file record, durably.
    pub fn set_image_file(&self, sha256: &str, value: Option<&[u8]>) -> Result<()> {
        self.set_in(IMAGE_FILES, sha256, value)
    }
}

/// One write in a group commit (see [`Store::write_batch`]).
#[derive(Debug)]
pub enum Write {
    /// A result for the outbox.
    Result(ResultRecord),
    /// A channel command's result: outbox, inbox entry dropped, id remembered (like [`Store::finish`]).
    CommandDone(ResultRecord),
    /// A command id to remember as handled without a result of its own.
    CommandSeen(String),
    /// A task record (insert or replace).
    Task {
        id: String,
        value: Vec<u8>,
    },
    /// A finished target of a task.
    TaskTarget {
        task: String,
        target: String,
        value: Vec<u8>,
    },
    Device {
        address: String,
        value: Vec<u8>,
    },
    Alarm {
        id: String,
        value: Vec<u8>,
    },
    /// A device's pinned key (insert or replace), or `None` to forget it.
    Pin {
        address: String,
        value: Option<Vec<u8>>,
    },
}

impl Store {
    /// Applies many writes in one durable transaction: one fsync for a whole burst of task results,
    /// instead of one per target.
    pub fn write_batch(&self, writes: &[Write]) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut outbox = tx.open_table(OUTBOX)?;
                let mut inbox = tx.open_table(INBOX)?;
                let mut done = tx.open_table(DONE)?;
                let mut tasks = tx.open_table(TASKS)?;
                let mut targets = tx.open_table(TASK_TARGETS)?;
                let mut devices = tx.open_table(DEVICES)?;
                let mut alarms = tx.open_table(ALARMS)?;
                let mut pins = tx.open_table(DEVICE_PINS)?;
                let mut next = outbox.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
                let now = unix_now();
                for w in writes {
                    match w {
                        Write::Result(rec) => {
                            outbox.insert(next, serde_json::to_vec(rec)?.as_slice())?;
                            next += 1;
                        }
                        Write::CommandDone(rec) => {
                            outbox.insert(next, serde_json::to_vec(rec)?.as_slice())?;
                            next += 1;
                            inbox.remove(rec.command_id.as_str())?;
                            done.insert(rec.command_id.as_str(), now)?;
                        }
                        Write::CommandSeen(id) => {
                            inbox.remove(id.as_str())?;
                            done.insert(id.as_str(), now)?;
                        }
                        Write::Task { id, value } => {
                            tasks.insert(id.as_str(), value.as_slice())?;
                        }
                        Write::TaskTarget {
                            task,
                            target,
                            value,
                        } => {
                            targets.insert((task.as_str(), target.as_str()), value.as_slice())?;
                        }
                        Write::Device { address, value } => {
                            devices.insert(address.as_str(), value.as_slice())?;
                        }
                        Write::Alarm { id, value } => {
                            alarms.insert(id.as_str(), value.as_slice())?;
                        }
                        Write::Pin { address, value } => match value {
                            Some(v) => {
                                pins.insert(address.as_str(), v.as_slice())?;
                            }
                            None => {
                                pins.remove(address.as_str())?;
                            }
                        },
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Writes (or with `None` deletes) one record of a table keyed by text, durably.
    fn set_in(
        &self,
        def: TableDefinition<&str, &[u8]>,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<()> {
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(def)?;
                match value {
                    Some(v) => {
                        t.insert(key, v)?;
                    }
                    None => {
                        t.remove(key)?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn all_of(&self, def: TableDefinition<&str, &[u8]>) -> Result<Vec<(String, Vec<u8>)>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(def)?;
            let mut out = Vec::new();
            for e in t.iter()? {
                let (k, v) = e?;
                out.push((k.value().to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    pub fn tasks_all(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.all_of(TASKS)
    }

    /// Task records in id order after `after` (from the first without): at most `max` of them and,
    /// past the first, no more than `max_bytes` together. Walking the tasks a page at a time holds
    /// one page in memory, not the store's whole history.
    pub fn tasks_page(
        &self,
        after: Option<&str>,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        use std::ops::Bound;
        self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(TASKS)?;
            let from = match after {
                Some(a) => Bound::Excluded(a),
                None => Bound::Unbounded,
            };
            take_bounded(t.range::<&str>((from, Bound::Unbounded))?, max, max_bytes)
        })
    }

    pub fn task(&self, id: &str) -> Result<Option<Vec<u8>>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            Ok(tx.open_table(TASKS)?.get(id)?.map(|v| v.value().to_vec()))
        })
    }

    /// Whether a task record is stored (without copying it out).
    pub fn task_exists(&self, id: &str) -> Result<bool> {
        self.read(|db| {
            let tx = db.begin_read()?;
            Ok(tx.open_table(TASKS)?.get(id)?.is_some())
        })
    }

    /// The finished targets of one task.
    pub fn task_targets(&self, task: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        self.task_targets_each(task, |target, v| out.push((target.to_string(), v.to_vec())))?;
        Ok(out)
    }

    /// Calls `f` with each finished target of one task (target, stored value), in target order,
    /// without collecting them.
    pub fn task_targets_each(&self, task: &str, mut f: impl FnMut(&str, &[u8])) -> Result<()> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(TASK_TARGETS)?;
            for e in t.range((task, "")..)? {
                let (k, v) = e?;
                let (tk, target) = k.value();
                if tk != task {
                    break;
                }
                f(target, v.value());
            }
            Ok(())
        })
    }

    pub fn devices_all(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.all_of(DEVICES)
    }

    pub fn devices_remove(&self, addresses: &[String]) -> Result<()> {
        if addresses.is_empty() {
            return Ok(());
        }
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(DEVICES)?;
                for a in addresses {
                    t.remove(a.as_str())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub fn alarms_all(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.all_of(ALARMS)
    }

    /// Pending alarms in id order: at most `max`, and past the first no more than `max_bytes`.
    pub fn alarms_batch(&self, max: usize, max_bytes: usize) -> Result<Vec<(String, Vec<u8>)>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(ALARMS)?;
            take_bounded(t.iter()?, max, max_bytes)
        })
    }

    pub fn alarms_len(&self) -> Result<u64> {
        self.read(|db| {
            let tx = db.begin_read()?;
            Ok(tx.open_table(ALARMS)?.len()?)
        })
    }

    /// Moves an alarm the cloud refused for good (400, 413) out of the pending alarms into the
    /// rejected table, kept for inspection, so it cannot block the others.
    pub fn alarm_reject(&self, id: &str, reason: &str) -> Result<()> {
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut alarms = tx.open_table(ALARMS)?;
                let entry = alarms.remove(id)?.map(|v| v.value().to_vec());
                if let Some(bytes) = entry {
                    let mut rec: serde_json::Value =
                        serde_json::from_slice(&bytes).unwrap_or_default();
                    rec["rejected_because"] = serde_json::Value::String(reason.to_string());
                    rec["record"] = serde_json::Value::String("alarm".into());
                    let mut rejected = tx.open_table(REJECTED)?;
                    let next = rejected.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
                    rejected.insert(next, serde_json::to_vec(&rec)?.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub fn pins_all(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.all_of(DEVICE_PINS)
    }

    /// Forgets finished tasks and their per-target results. Each id stays known as a handled
    /// command (from now), so a cloud that sends the task again does not run it a second time.
    pub fn tasks_prune(&self, ids: &[String]) -> Result<u64> {
        self.write(|db| {
            if ids.is_empty() {
                return Ok(0);
            }
            let tx = db.begin_write()?;
            let mut targets_removed = 0u64;
            {
                let mut tasks = tx.open_table(TASKS)?;
                let mut targets = tx.open_table(TASK_TARGETS)?;
                let mut done = tx.open_table(DONE)?;
                let now = unix_now();
                for id in ids {
                    tasks.remove(id.as_str())?;
                    let keys: Vec<String> = {
                        let mut keys = Vec::new();
                        for e in targets.range((id.as_str(), "")..)? {
                            let (k, _) = e?;
                            let (tk, target) = k.value();
                            if tk != id.as_str() {
                                break;
                            }
                            keys.push(target.to_string());
                        }
                        keys
                    };
                    for t in &keys {
                        targets.remove((id.as_str(), t.as_str()))?;
                    }
                    targets_removed += keys.len() as u64;
                    done.insert(id.as_str(), now)?;
                }
            }
            tx.commit()?;
            Ok(targets_removed)
        })
    }

    pub fn alarms_remove(&self, ids: &[String]) -> Result<()> {
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(ALARMS)?;
                for id in ids {
                    t.remove(id.as_str())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }
}

impl Store {
    /// A setting the relay keeps for itself (`meta` table), e.g. the cloud's last word on device
    /// logs.
    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            Ok(tx
                .open_table(META)?
                .get(key)?
                .map(|v| v.value().to_string()))
        })
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.write(|db| {
            let tx = db.begin_write()?;
            tx.open_table(META)?.insert(key, value)?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn artifacts_all(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.all_of(ARTIFACTS)
    }

    /// Writes (or with `None` deletes) one artifact record, durably.
    pub fn set_artifact(&self, id: &str, value: Option<&[u8]>) -> Result<()> {
        self.set_in(ARTIFACTS, id, value)
    }

    /// The backups of one device, oldest first.
    pub fn backups(&self, mac: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(BACKUPS)?;
            let mut out = Vec::new();
            for e in t.range((mac, "")..)? {
                let (k, v) = e?;
                let (m, id) = k.value();
                if m != mac {
                    break;
                }
                out.push((id.to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// Adds a backup and, in the same transaction, drops the oldest ones beyond `keep`. Returns the
    /// ids dropped.
    pub fn backup_add(
        &self,
        mac: &str,
        id: &str,
        value: &[u8],
        keep: usize,
    ) -> Result<Vec<String>> {
        self.write(|db| {
            let tx = db.begin_write()?;
            let dropped = {
                let mut t = tx.open_table(BACKUPS)?;
                t.insert((mac, id), value)?;
                let mut ids = Vec::new();
                for e in t.range((mac, "")..)? {
                    let (k, _) = e?;
                    let (m, id) = k.value();
                    if m != mac {
                        break;
                    }
                    ids.push(id.to_string());
                }
                let extra = ids.len().saturating_sub(keep);
                let dropped: Vec<String> = ids.into_iter().take(extra).collect();
                for d in &dropped {
                    t.remove((mac, d.as_str()))?;
                }
                dropped
            };
            tx.commit()?;
            Ok(dropped)
        })
    }

    /// Removes one backup; false when there was none.
    pub fn backup_remove(&self, mac: &str, id: &str) -> Result<bool> {
        self.write(|db| {
            let tx = db.begin_write()?;
            let found = tx.open_table(BACKUPS)?.remove((mac, id))?.is_some();
            tx.commit()?;
            Ok(found)
        })
    }

    /// Every device with at least one backup, and how many.
    pub fn backup_counts(&self) -> Result<Vec<(String, u64)>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(BACKUPS)?;
            let mut out: Vec<(String, u64)> = Vec::new();
            for e in t.iter()? {
                let (k, _) = e?;
                let (m, _) = k.value();
                match out.last_mut() {
                    Some((last, n)) if last == m => *n += 1,
                    _ => out.push((m.to_string(), 1)),
                }
            }
            Ok(out)
        })
    }

    pub fn captures_all(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.all_of(CAPTURES)
    }

    /// Writes (or with `None` deletes) one capture record, durably.
    pub fn set_capture(&self, id: &str, value: Option<&[u8]>) -> Result<()> {
        self.set_in(CAPTURES, id, value)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Outcome;

    fn rec(id: &str, cmd: &str) -> ResultRecord {
        ResultRecord {
            result_id: id.into(),
            command_id: cmd.into(),
            target: None,
            name: "ping".into(),
            result: Outcome::Success,
            reason: String::new(),
            payload: serde_json::Value::Null,
            finished_at: "2026-01-01T00:00:00Z".into(),
            progress: None,
        }
    }

    #[test]
    fn state_dir_and_store_are_owner_only_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/state");
        // The umask is process-wide; this test only ever loosens what it checks.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let opened = Store::open(&state);
        nix::sys::stat::umask(old);
        drop(opened.unwrap());
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(DB_FILE)), 0o600);
        // A store an older build left group- and world-readable is tightened at the next open.
        std::fs::set_permissions(state.join(DB_FILE), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        drop(Store::open(&state).unwrap());
        assert_eq!(mode(&state.join(DB_FILE)), 0o600);
    }

    /// The chaos soak's first find (`3e1f821`): redb keeps every page it reads, up to its cache
    /// size, 1 GiB unless told otherwise, so a relay's memory followed the size of its store.
    /// Reading a 48 MiB file through the relay's `open_db` must leave the heap where it was.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn reading_a_large_store_does_not_keep_it_in_memory() {
        use crate::util::memory;
        const BIG: TableDefinition<u64, &[u8]> = TableDefinition::new("big");
        const RECORDS: u64 = 48 * 1024;
        // The write phase allocates too: the whole test keeps the allocator tests out.
        let _alone = memory::ALONE.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.redb");
        {
            let db = open_db(&path).unwrap();
            let value = [5u8; 1024];
            for chunk in 0..RECORDS / 4096 {
                let tx = db.begin_write().unwrap();
                {
                    let mut t = tx.open_table(BIG).unwrap();
                    for i in chunk * 4096..(chunk + 1) * 4096 {
                        t.insert(i, &value[..]).unwrap();
                    }
                }
                tx.commit().unwrap();
            }
        }
        let before = memory::heap().expect("glibc gives its account").in_use;
        let db = open_db(&path).unwrap();
        let tx = db.begin_read().unwrap();
        let t = tx.open_table(BIG).unwrap();
        let mut read = 0usize;
        for row in t.range::<u64>(..).unwrap() {
            read += row.unwrap().1.value().len();
        }
        let after = memory::heap().expect("glibc gives its account").in_use;
        assert_eq!(read, 48 << 20);
        // The cache is 1 MiB (1.6 MB in use measured here); other tests allocate meanwhile in this
        // process, so this holds the cache to some bound well under the file, not to 1 MiB.
        // Without a bound, the open and the walk kept 70 MB.
        assert!(
            after < before.saturating_add(12 << 20),
            "heap in use went from {before} to {after} bytes reading a 48 MiB store"
        );
        drop((t, tx, db));
    }

    #[test]
    fn identity_is_stable_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = Store::open(dir.path()).unwrap().relay_id().unwrap();
        let again = Store::open(dir.path()).unwrap().relay_id().unwrap();
        assert_eq!(id, again);
    }

    #[test]
    fn second_open_is_refused_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path())
            .err()
            .expect("second open must fail");
        assert!(
            err.to_string().contains("in use by another ucrelay"),
            "{err:#}"
        );
    }

    #[test]
    fn inbox_to_outbox_is_atomic_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let cmd = Command {
            id: "c1".into(),
            name: "ping".into(),
            params: serde_json::Value::Null,
        };
        s.inbox_put(&cmd).unwrap();
        assert!(s.command_seen("c1").unwrap());
        assert!(!s.command_seen("c2").unwrap());
        s.finish(&rec("r1", "c1")).unwrap();
        s.finish(&rec("r2", "c2")).unwrap();
        assert!(s.inbox_all().unwrap().is_empty());
        assert!(
            s.command_seen("c2").unwrap(),
            "finished commands stay known"
        );
        let batch = s.outbox_batch(10, usize::MAX).unwrap();
        let ids: Vec<_> = batch.iter().map(|(_, r)| r.result_id.as_str()).collect();
        assert_eq!(ids, ["r1", "r2"]);
        s.outbox_remove(&[batch[0].0]).unwrap();
        assert_eq!(s.outbox_len().unwrap(), 1);
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let left = s.outbox_batch(10, usize::MAX).unwrap();
        assert_eq!(left[0].1.result_id, "r2");
        s.outbox_reject(left[0].0, "bad").unwrap();
        assert_eq!((s.outbox_len().unwrap(), s.rejected_len().unwrap()), (0, 1));
    }

    #[test]
    fn only_a_durable_write_says_the_store_takes_writes_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.finish(&rec("r1", "c1")).unwrap();
        s.finish(&rec("r2", "c2")).unwrap();
        s.note(&StoreError::Schema {
            found: "test".into(),
            known: "test",
        });
        assert!(s.trouble().is_some());
        // Removing delivered results commits without writing the file: it proves nothing.
        let batch = s.outbox_batch(1, usize::MAX).unwrap();
        s.outbox_remove(&[batch[0].0]).unwrap();
        assert!(
            s.trouble().is_some(),
            "a non-durable commit cleared the trouble"
        );
        // A durable write does.
        s.finish(&rec("r3", "c3")).unwrap();
        assert!(s.trouble().is_none());
        // The removal became durable with it: gone after a reopen.
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let ids: Vec<_> = s
            .outbox_batch(10, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.result_id)
            .collect();
        assert_eq!(ids, ["r2", "r3"]);
    }

    #[test]
    fn outbox_batches_are_bounded_by_bytes_but_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut big = rec("big", "c0");
        big.payload = serde_json::json!("x".repeat(10_000));
        s.finish(&big).unwrap();
        for i in 1..5 {
            s.finish(&rec(&format!("r{i}"), &format!("c{i}"))).unwrap();
        }
        // The first record is over the byte budget on its own: it goes alone.
        let b = s.outbox_batch(100, 1000).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].1.result_id, "big");
        s.outbox_remove(&[b[0].0]).unwrap();
        let one = serde_json::to_vec(&rec("r1", "c1")).unwrap().len();
        let b = s.outbox_batch(100, one * 2 + 10).unwrap();
        assert_eq!(
            b.len(),
            2,
            "two small records fit the budget, the third does not"
        );
        assert_eq!(s.outbox_batch(3, usize::MAX).unwrap().len(), 3);
    }

    #[test]
    fn pruned_tasks_leave_their_id_known() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.write_batch(&[
            Write::CommandSeen("t1".into()),
            Write::Task {
                id: "t1".into(),
                value: b"{}".to_vec(),
            },
            Write::TaskTarget {
                task: "t1".into(),
                target: "10.0.0.1".into(),
                value: b"{}".to_vec(),
            },
            Write::TaskTarget {
                task: "t1".into(),
                target: "10.0.0.2".into(),
                value: b"{}".to_vec(),
            },
            Write::Task {
                id: "t2".into(),
                value: b"{}".to_vec(),
            },
            Write::TaskTarget {
                task: "t2".into(),
                target: "10.0.0.1".into(),
                value: b"{}".to_vec(),
            },
        ])
        .unwrap();
        assert_eq!(s.tasks_prune(&["t1".into()]).unwrap(), 2);
        assert!(s.task("t1").unwrap().is_none());
        assert!(s.task_targets("t1").unwrap().is_empty());
        assert!(s.command_seen("t1").unwrap());
        assert_eq!(
            s.task_targets("t2").unwrap().len(),
            1,
            "other tasks untouched"
        );
    }

    #[test]
    fn finished_command_ids_are_forgotten_after_the_keep_period_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.write_batch(&[Write::CommandSeen("c1".into())]).unwrap();
        s.finish(&rec("r2", "c2")).unwrap();
        assert_eq!(s.forget_old_commands().unwrap(), 0, "both are recent");
        assert!(s.command_seen("c1").unwrap() && s.command_seen("c2").unwrap());
        // A week and a moment later (without a restart): both forgotten.
        assert_eq!(s.forget_commands_before(unix_now() + 1).unwrap(), 2);
        assert!(!s.command_seen("c1").unwrap() && !s.command_seen("c2").unwrap());
    }

    #[test]
    fn tasks_are_walked_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let writes: Vec<Write> = (0..10)
            .map(|i| Write::Task {
                id: format!("t{i}"),
                value: vec![b'x'; 100],
            })
            .collect();
        s.write_batch(&writes).unwrap();
        let keys = |page: Vec<(String, Vec<u8>)>| -> Vec<String> {
            page.into_iter().map(|(k, _)| k).collect()
        };
        assert_eq!(
            keys(s.tasks_page(None, 3, usize::MAX).unwrap()),
            ["t0", "t1", "t2"]
        );
        assert_eq!(
            keys(s.tasks_page(Some("t2"), 3, usize::MAX).unwrap()),
            ["t3", "t4", "t5"]
        );
        // Bounded by bytes too, but never empty.
        assert_eq!(
            keys(s.tasks_page(Some("t5"), 10, 250).unwrap()),
            ["t6", "t7"]
        );
        assert_eq!(keys(s.tasks_page(Some("t5"), 10, 1).unwrap()), ["t6"]);
        assert!(s.tasks_page(Some("t9"), 10, usize::MAX).unwrap().is_empty());
        assert!(s.task_exists("t4").unwrap());
        assert!(!s.task_exists("t10").unwrap());
    }

    #[test]
    fn backups_rotate_per_device() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for i in 0..6 {
            let dropped = s.backup_add("aa", &format!("b{i}"), b"x", 5).unwrap();
            assert_eq!(
                dropped,
                if i == 5 {
                    vec!["b0".to_string()]
                } else {
                    vec![]
                }
            );
        }
        s.backup_add("ab", "b9", b"y", 5).unwrap();
        let ids: Vec<String> = s
            .backups("aa")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(ids, ["b1", "b2", "b3", "b4", "b5"]);
        assert_eq!(s.backups("ab").unwrap().len(), 1);
        assert_eq!(
            s.backup_counts().unwrap(),
            vec![("aa".to_string(), 5), ("ab".to_string(), 1)]
        );
        assert!(s.backup_remove("aa", "b3").unwrap());
        assert!(!s.backup_remove("aa", "b3").unwrap());
        assert_eq!(s.setting("x").unwrap(), None);
        s.set_setting("x", "1").unwrap();
        assert_eq!(s.setting("x").unwrap().as_deref(), Some("1"));
    }
}
