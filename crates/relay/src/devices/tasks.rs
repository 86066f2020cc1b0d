//! Scheduled tasks: stored durably when the cloud sends them, started at their time whether or not
//! the cloud is reachable then, fanned out to their targets with bounded concurrency and a deadline
//! per target. Every finished target is stored (with its result in the outbox) in one transaction, so
//! after `kill -9` the relay resumes the unfinished targets and never re-runs a finished one.
//!
//! Bounded: at most [`MAX_OPEN_TASKS`] tasks are scheduled or executing at once (one more is
//! answered busy), and a finished task is forgotten, with its per-target results,
//! `[devices].task_retention` after it ended.
//!
//! Memory follows the open work, not the history: only scheduled and executing tasks are held in
//! memory ([`Book`]). A task that ends leaves memory once its final record is stored; from then on
//! the store is its only copy, and what reads finished tasks (`ucrelay tasks`, a task the cloud
//! sends again, a further grant, the expiry) reads them there, a page at a time. A start reads the
//! open tasks into memory and only counts the finished ones.

use super::DevicePlane;
use super::actions;
use crate::ctx::Ctx;
use crate::protocol::{
    Command, DEVICE_COMMANDS, Outcome, ResultRecord, TaskCounts, TaskProgress, TaskSpec,
};
use crate::store::{Store, Write};
use crate::util::time::{parse_rfc3339, rfc3339};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Most targets one task may have (a tenant's whole fleet).
pub const MAX_TARGETS: usize = 100_000;
/// Most tasks scheduled or executing at once; one more is answered busy.
pub const MAX_OPEN_TASKS: usize = 1000;
/// Task records read per page when walking the store (at start, for `ucrelay tasks`, for expiry).
const PAGE: usize = 256;
/// ...and no more bytes than this per page past its first record.
const PAGE_BYTES: usize = 4 << 20;
/// How long a task that stopped on an error waits before the scheduler resumes it.
const RESUME_AFTER_ERROR: Duration = Duration::from_secs(5);
/// How often a task waiting for its store to take writes again looks.
const STORE_WAIT: Duration = Duration::from_secs(1);
/// Below this many finished targets the failure threshold is not judged yet.
const THRESHOLD_SAMPLE: u64 = 10;

/// A task as the relay keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub spec: TaskSpec,
    /// `scheduled`, `executing`, `done`, `halted`, `cancelled`, `rejected`.
    pub status: String,
    #[serde(default)]
    pub reason: String,
    pub created_at: String,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Progress record sequence (see [`TaskProgress::seq`]).
    pub seq: u64,
    pub total: u64,
    #[serde(default)]
    pub success: u64,
    #[serde(default)]
    pub failure: u64,
    #[serde(default)]
    pub not_applicable: u64,
}

impl TaskRecord {
    fn finished(&self) -> u64 {
        self.success + self.failure + self.not_applicable
    }
}

/// One finished target, as stored and shown by `ucrelay tasks show`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubResult {
    pub result: Outcome,
    #[serde(default)]
    pub reason: String,
    pub finished_at: String,
}

struct Entry {
    rec: TaskRecord,
    running: bool,
    in_progress: u64,
    halted: bool,
    /// Bumped whenever the task's targets change (a further grant, a lease taken back): its
    /// executor then rebuilds the list of targets it has yet to start.
    epoch: u64,
    /// Targets the running executor has started (finished ones included); empty when not running.
    started: HashSet<String>,
    /// When the current lease was stored here: a lease list older than this says nothing of it.
    lease_since: Instant,
    /// When the cloud last confirmed the lease (a grant, a heartbeat answer, a `hello`).
    confirmed: Option<Instant>,
    /// The lease was taken back and no new one came: the task ends `revoked`.
    revoked: bool,
    /// The executor waits for the lease to be confirmed (shown by `ucrelay tasks`).
    paused: bool,
}

impl Entry {
    fn new(rec: TaskRecord, confirmed: Option<Instant>) -> Entry {
        Entry {
            rec,
            running: false,
            in_progress: 0,
            halted: false,
            epoch: 0,
            started: HashSet::new(),
            lease_since: Instant::now(),
            confirmed,
            revoked: false,
            paused: false,
        }
    }

    /// Whether a target of this task may start now: always without a lease; with one, only while
    /// the channel is up and the cloud confirmed the lease less than half a lease ago.
    fn lease_allows(&self, channel_up: bool) -> bool {
        match self.rec.spec.lease_s {
            None => true,
            Some(s) => {
                let half = Duration::from_millis(s.saturating_mul(500).max(100));
                channel_up && self.confirmed.is_some_and(|c| c.elapsed() < half)
            }
        }
    }
}

/// The tasks the relay works on: the open ones (scheduled, executing) in memory, mirrored in the
/// store at each state change; finished ones in the store only.
pub struct Book {
    tasks: Mutex<Held>,
    store: Store,
    wake: Notify,
    /// Wakes executors waiting for a lease to be confirmed.
    lease_wake: Notify,
}

/// What [`Book`] holds under its lock.
struct Held {
    /// Open tasks by id (and, for a moment, one that ended while its final record is stored).
    open: BTreeMap<String, Entry>,
    /// Finished tasks in the store and not in memory: the `done` of [`Book::counts`] without a
    /// read of the store. Changed only with `open`, under the same lock.
    finished: u64,
    /// Finished tasks the expiry is deleting from the store now: a grant does not bring them back
    /// (their finished targets are going, so the task would run them again).
    pruning: HashSet<String>,
}

impl Held {
    /// Task `id` ended and its final record (sequence `seq`) is stored: it leaves memory, unless
    /// it changed meanwhile (a grant reopened it).
    fn settle(&mut self, id: &str, seq: u64) {
        if self
            .open
            .get(id)
            .is_some_and(|e| e.rec.seq == seq && is_final(&e.rec.status))
        {
            self.open.remove(id);
            self.finished += 1;
        }
    }
}

impl std::ops::Deref for Held {
    type Target = BTreeMap<String, Entry>;
    fn deref(&self) -> &Self::Target {
        &self.open
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.open
    }
}

/// What listing and expiry read of a stored task: everything but its targets, which may be many.
#[derive(Deserialize)]
struct Head {
    id: String,
    status: String,
    #[serde(default)]
    reason: String,
    created_at: String,
    #[serde(default)]
    started_at: Option<String>,
    #[serde(default)]
    finished_at: Option<String>,
    total: u64,
    #[serde(default)]
    success: u64,
    #[serde(default)]
    failure: u64,
    #[serde(default)]
    not_applicable: u64,
    spec: HeadSpec,
}

#[derive(Deserialize)]
struct HeadSpec {
    #[serde(default)]
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    lease_s: Option<u64>,
    #[serde(default)]
    lease_id: Option<String>,
}

impl Head {
    fn of(r: &TaskRecord) -> Head {
        Head {
            id: r.id.clone(),
            status: r.status.clone(),
            reason: r.reason.clone(),
            created_at: r.created_at.clone(),
            started_at: r.started_at.clone(),
            finished_at: r.finished_at.clone(),
            total: r.total,
            success: r.success,
            failure: r.failure,
            not_applicable: r.not_applicable,
            spec: HeadSpec {
                name: r.spec.name.clone(),
                kind: r.spec.kind.clone(),
                payload: Value::Null,
                at: r.spec.at.clone(),
                lease_s: r.spec.lease_s,
                lease_id: r.spec.lease_id.clone(),
            },
        }
    }

    fn leased(&self) -> bool {
        self.spec.lease_id.is_some() && self.spec.lease_s.is_some()
    }
}

/// Walks every stored task record a page at a time: memory holds one page, never the history.
fn each_page<E: From<crate::store::StoreError>>(
    store: &Store,
    mut f: impl FnMut(Vec<(String, Vec<u8>)>) -> Result<(), E>,
) -> Result<(), E> {
    let mut after: Option<String> = None;
    loop {
        let page = store.tasks_page(after.as_deref(), PAGE, PAGE_BYTES)?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        after = Some(last.clone());
        f(page)?;
    }
}

/// Finished tasks in the store whose end is before `cutoff`.
fn expired_in(store: &Store, cutoff: SystemTime) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    each_page::<anyhow::Error>(store, |page| {
        for (id, bytes) in page {
            let Ok(h) = serde_json::from_slice::<Head>(&bytes) else {
                continue;
            };
            let ended = h.finished_at.as_deref().and_then(parse_rfc3339);
            if is_final(&h.status) && ended.is_some_and(|t| t < cutoff) {
                ids.push(id);
            }
        }
        Ok(())
    })?;
    Ok(ids)
}

fn unique_targets(spec: &TaskSpec) -> Vec<String> {
    let mut seen = HashSet::new();
    spec.targets
        .iter()
        .map(|t| t.trim().to_string())
        .filter(|t| seen.insert(t.clone()))
        .collect()
}

/// Splits the device password out of a task payload: it is used, never stored in results.
fn payload_parts(payload: &Value) -> (Value, Option<String>) {
    let mut p = payload.clone();
    let pw = p
        .as_object_mut()
        .and_then(|m| m.remove("password"))
        .and_then(|v| v.as_str().map(str::to_owned));
    (p, pw)
}

/// The payload as shown to admins: the device password masked.
pub fn public_payload(payload: &Value) -> Value {
    let mut p = payload.clone();
    if let Some(m) = p.as_object_mut() {
        if m.contains_key("password") {
            m.insert("password".into(), json!("***"));
        }
        if let Some(Value::Object(params)) = m.get_mut("params") {
            for (k, v) in params.iter_mut() {
                if actions::is_secret_param(k) {
                    *v = json!("***");
                }
            }
        }
    }
    p
}

/// Whether a task is over: nothing of it runs again unless the cloud grants it more targets.
/// (`revoked` too: its unfinished targets went to another relay.)
fn is_final(status: &str) -> bool {
    matches!(
        status,
        "done" | "halted" | "cancelled" | "rejected" | "revoked"
    )
}

/// A task that is over keeps no secret: its payload becomes what admins see (the device password
/// and secret parameters masked), in memory and in the store. True when something was masked.
fn forget_secrets(rec: &mut TaskRecord) -> bool {
    let public = public_payload(&rec.spec.payload);
    let changed = public != rec.spec.payload;
    rec.spec.payload = public;
    changed
}

/// Checks a task before it is accepted; the reason names what is wrong.
pub fn validate(spec: &TaskSpec) -> Result<(), String> {
    if !DEVICE_COMMANDS.contains(&spec.kind.as_str()) {
        return Err(format!(
            "type {:?} is not one of {}",
            spec.kind,
            DEVICE_COMMANDS.join(", ")
        ));
    }
    let n = unique_targets(spec).len();
    if n == 0 {
        return Err("targets must list at least one device".into());
    }
    if n > MAX_TARGETS {
        return Err(format!("{n} targets; at most {MAX_TARGETS} per task"));
    }
    if let Some(at) = &spec.at {
        at.parse::<jiff::Timestamp>()
            .map_err(|e| format!("at {at:?} is not an RFC 3339 time: {e}"))?;
    }
    if spec.failure_threshold_pct.is_some_and(|p| p > 100) {
        return Err("failure_threshold_pct must be 0 to 100".into());
    }
    if spec.concurrency == Some(0) {
        return Err("concurrency must be at least 1".into());
    }
    if spec.target_timeout_s == Some(0) {
        return Err("target_timeout_s must be at least 1".into());
    }
    let (payload, _) = payload_parts(&spec.payload);
    actions::parse(&spec.kind, &payload).map(|_| ())
}

fn due_at(spec: &TaskSpec) -> Option<SystemTime> {
    let ts = spec.at.as_ref()?.parse::<jiff::Timestamp>().ok()?;
    let secs = ts.as_second();
    if secs <= 0 {
        return None;
    }
    let nanos = u32::try_from(ts.subsec_nanosecond()).unwrap_or(0);
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(u64::try_from(secs).ok()?, nanos))
}

fn progress_record(rec: &TaskRecord, in_progress: u64) -> ResultRecord {
    let result = match rec.status.as_str() {
        "rejected" | "halted" => Outcome::Failure,
        _ => Outcome::Success,
    };
    ResultRecord {
        result_id: uuid::Uuid::new_v4().to_string(),
        command_id: rec.id.clone(),
        target: None,
        name: "task".into(),
        result,
        reason: rec.reason.clone(),
        payload: json!({"name": rec.spec.name, "type": rec.spec.kind}),
        finished_at: rfc3339(SystemTime::now()),
        progress: Some(TaskProgress {
            seq: rec.seq,
            status: rec.status.clone(),
            total: rec.total,
            success: rec.success,
            failure: rec.failure,
            not_applicable: rec.not_applicable,
            in_progress,
        }),
    }
}

fn task_write(rec: &TaskRecord) -> Write {
    Write::Task {
        id: rec.id.clone(),
        value: serde_json::to_vec(rec).unwrap_or_default(),
    }
}

impl Book {
    /// Loads the open tasks (counts of executing ones rebuilt from their finished targets) and
    /// counts the finished ones, reading the store a page at a time: a store with a long history
    /// costs a walk at start, not memory.
    pub fn load(store: &Store) -> Result<Book> {
        let mut open = BTreeMap::new();
        let mut finished = 0u64;
        let mut scrubbed = 0usize;
        each_page::<anyhow::Error>(store, |page| {
            // Finished tasks stored by a build that kept their passwords lose them now.
            let mut scrub = Vec::new();
            for (id, bytes) in page {
                let head: Head = match serde_json::from_slice(&bytes) {
                    Ok(h) => h,
                    Err(e) => {
                        error!(task_id = %id, error = %e, "unreadable task record; skipped");
                        continue;
                    }
                };
                if is_final(&head.status) {
                    finished += 1;
                    if public_payload(&head.spec.payload) != head.spec.payload
                        && let Ok(mut rec) = serde_json::from_slice::<TaskRecord>(&bytes)
                        && forget_secrets(&mut rec)
                    {
                        scrub.push(task_write(&rec));
                    }
                    continue;
                }
                let mut rec: TaskRecord = match serde_json::from_slice(&bytes) {
                    Ok(r) => r,
                    Err(e) => {
                        error!(task_id = %id, error = %e, "unreadable task record; skipped");
                        continue;
                    }
                };
                if rec.status == "executing" {
                    rec.success = 0;
                    rec.failure = 0;
                    rec.not_applicable = 0;
                    store.task_targets_each(&id, |_, v| {
                        if let Ok(sub) = serde_json::from_slice::<SubResult>(v) {
                            match sub.result {
                                Outcome::Success => rec.success += 1,
                                Outcome::Failure => rec.failure += 1,
                                Outcome::NotApplicable => rec.not_applicable += 1,
                            }
                        }
                    })?;
                }
                open.insert(id, Entry::new(rec, None));
            }
            if !scrub.is_empty() {
                scrubbed += scrub.len();
                store.write_batch(&scrub)?;
            }
            Ok(())
        })?;
        if scrubbed > 0 {
            info!(
                tasks = scrubbed,
                "finished tasks still held device passwords; removed them from the store"
            );
        }
        Ok(Book {
            tasks: Mutex::new(Held {
                open,
                finished,
                pruning: HashSet::new(),
            }),
            store: store.clone(),
            wake: Notify::new(),
            lease_wake: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the relay holds task `id`, open (in memory) or finished (in the store).
    async fn known(&self, id: &str) -> Result<bool, crate::store::StoreError> {
        if self.lock().contains_key(id) {
            return Ok(true);
        }
        let id = id.to_owned();
        self.store.run(move |s| s.task_exists(&id)).await
    }

    /// Tasks scheduled or executing.
    pub fn open(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| !is_final(&e.rec.status))
            .count()
    }

    /// Tasks held in memory: the open ones (and one that ended, while its end is stored).
    pub fn in_memory(&self) -> usize {
        self.lock().len()
    }

    /// See [`Held::settle`].
    fn settle(&self, id: &str, seq: u64) {
        self.lock().settle(id, seq);
    }

    pub fn counts(&self) -> TaskCounts {
        let book = self.lock();
        let mut c = TaskCounts {
            done: book.finished,
            ..TaskCounts::default()
        };
        for e in book.values() {
            match e.rec.status.as_str() {
                "scheduled" => c.scheduled += 1,
                "executing" => c.executing += 1,
                _ => c.done += 1,
            }
        }
        c
    }

    /// Summaries for `ucrelay tasks`, newest first: the open tasks from memory, the finished ones
    /// from the store.
    pub async fn list(&self) -> Result<Vec<Value>, crate::store::StoreError> {
        // Memory first: a task that ends meanwhile shows as it was, not twice.
        let open: Vec<(String, Value)> = self
            .lock()
            .iter()
            .map(|(id, e)| (id.clone(), summary(e)))
            .collect();
        let skip: HashSet<String> = open.iter().map(|(id, _)| id.clone()).collect();
        let mut v = self
            .store
            .run(move |s| {
                let mut out = Vec::new();
                each_page::<crate::store::StoreError>(s, |page| {
                    for (id, bytes) in page {
                        if skip.contains(&id) {
                            continue;
                        }
                        if let Ok(h) = serde_json::from_slice::<Head>(&bytes) {
                            out.push(stored_summary(&h));
                        }
                    }
                    Ok(())
                })?;
                Ok::<_, crate::store::StoreError>(out)
            })
            .await?;
        v.extend(open.into_iter().map(|(_, s)| s));
        v.sort_by(|a, b| b["created_at"].as_str().cmp(&a["created_at"].as_str()));
        Ok(v)
    }

    /// One task and its summary: from memory while open, else from the store.
    pub async fn get(
        &self,
        id: &str,
    ) -> Result<Option<(TaskRecord, Value)>, crate::store::StoreError> {
        if let Some(found) = self.lock().get(id).map(|e| (e.rec.clone(), summary(e))) {
            return Ok(Some(found));
        }
        let key = id.to_owned();
        let Some(bytes) = self.store.run(move |s| s.task(&key)).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice::<TaskRecord>(&bytes)
            .ok()
            .map(|rec| {
                let s = stored_summary(&Head::of(&rec));
                (rec, s)
            }))
    }

    /// Unfinished targets of leased tasks: the relay's share of the fleet's task work.
    pub fn leased_open(&self) -> u64 {
        self.lock()
            .values()
            .filter(|e| {
                e.rec.spec.lease_s.is_some()
                    && matches!(e.rec.status.as_str(), "scheduled" | "executing")
            })
            .map(|e| e.rec.total.saturating_sub(e.rec.finished()))
            .sum()
    }
}

fn summary(e: &Entry) -> Value {
    let h = Head::of(&e.rec);
    let lease = match () {
        _ if !h.leased() => "none",
        _ if e.revoked => "revoked",
        _ if e.paused => "paused: waiting for the cloud to confirm the lease",
        _ => "held",
    };
    summary_of(&h, e.in_progress, lease)
}

/// The summary of a task only the store holds (nothing of it runs).
fn stored_summary(h: &Head) -> Value {
    let lease = match () {
        _ if !h.leased() => "none",
        _ if h.status == "revoked" => "revoked",
        _ => "held",
    };
    summary_of(h, 0, lease)
}

fn summary_of(r: &Head, in_progress: u64, lease: &str) -> Value {
    json!({
        "id": r.id,
        "name": if r.spec.name.is_empty() { &r.spec.kind } else { &r.spec.name },
        "type": r.spec.kind,
        "status": r.status,
        "reason": r.reason,
        "total": r.total,
        "success": r.success,
        "failure": r.failure,
        "not_applicable": r.not_applicable,
        "in_progress": in_progress,
        "at": r.spec.at,
        "created_at": r.created_at,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "lease": lease,
    })
}

/// What became of a `task` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskAccept {
    /// Stored (or its rejection stored): acknowledge it.
    Stored,
    /// [`MAX_OPEN_TASKS`] are open: answer busy, the cloud sends it again later.
    Busy(String),
    /// Storing failed: no answer, the cloud sends it again.
    Failed,
}

/// Takes a `task` command off the channel: validates and stores it (or its rejection) before the
/// ack. A command naming a task this relay holds already (`task_id`) adds its targets to it.
/// Busy when [`MAX_OPEN_TASKS`] are open (a new task; a further share of one held is taken);
/// Failed when storing failed (no ack: the cloud sends it again).
pub async fn accept(ctx: &Ctx, plane: &DevicePlane, cmd: &Command) -> TaskAccept {
    let now = rfc3339(SystemTime::now());
    let parsed = serde_json::from_value::<TaskSpec>(cmd.params.clone());
    let task_id = parsed
        .as_ref()
        .ok()
        .and_then(|s| s.task_id.clone())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| cmd.id.clone());
    // Finished tasks are in the store only: a task the cloud sends again, or a further share of
    // one that ended, is looked up there.
    let held = match plane.tasks.known(&task_id).await {
        Ok(h) => h,
        Err(e) => {
            error!(task_id = %task_id, error = %format!("{e:#}"), "cannot read the store; task not acknowledged");
            return TaskAccept::Failed;
        }
    };
    if task_id == cmd.id && held {
        info!(task_id = %cmd.id, "task already received; acknowledging again");
        return TaskAccept::Stored;
    }
    if let Ok(spec) = &parsed
        && task_id != cmd.id
        && held
        && plane.cfg().enabled
    {
        return if grant(ctx, plane, cmd, &task_id, spec).await {
            TaskAccept::Stored
        } else {
            TaskAccept::Failed
        };
    }
    let open = plane.tasks.open();
    if open >= MAX_OPEN_TASKS {
        return TaskAccept::Busy(format!(
            "relay busy: {open} tasks are scheduled or executing (at most {MAX_OPEN_TASKS}); not stored, send it again later"
        ));
    }
    let (spec, verdict) = match parsed {
        Ok(spec) => {
            let v = if !plane.cfg().enabled {
                Err("the device plane is off: relay.toml has no [devices] section".to_string())
            } else {
                validate(&spec)
            };
            (spec, v)
        }
        Err(e) => (
            TaskSpec {
                name: String::new(),
                kind: String::new(),
                targets: vec![],
                payload: Value::Null,
                at: None,
                failure_threshold_pct: None,
                concurrency: None,
                target_timeout_s: None,
                task_id: None,
                lease_s: None,
                lease_id: None,
            },
            Err(format!("not a task: {e}")),
        ),
    };
    let mut rec = TaskRecord {
        id: task_id,
        total: unique_targets(&spec).len() as u64,
        spec,
        status: "scheduled".into(),
        reason: String::new(),
        created_at: now.clone(),
        started_at: None,
        finished_at: None,
        seq: 1,
        success: 0,
        failure: 0,
        not_applicable: 0,
    };
    let mut writes = vec![Write::CommandSeen(cmd.id.clone())];
    if let Err(why) = &verdict {
        warn!(task_id = %rec.id, reason = %why, "task rejected");
        rec.status = "rejected".into();
        rec.reason = format!("bad task: {why}");
        rec.finished_at = Some(now);
        forget_secrets(&mut rec);
    }
    writes.push(task_write(&rec));
    writes.push(Write::Result(progress_record(&rec, 0)));
    if let Err(e) = plane.record(writes).await {
        error!(task_id = %rec.id, error = %e, "cannot store task; not acknowledged");
        return TaskAccept::Failed;
    }
    if verdict.is_ok() {
        info!(task_id = %rec.id, r#type = %rec.spec.kind, targets = rec.total, at = ?rec.spec.at, leased = rec.spec.lease_s.is_some(), "task scheduled");
    }
    let _ = ctx;
    {
        let mut book = plane.tasks.lock();
        if verdict.is_ok() {
            book.insert(rec.id.clone(), Entry::new(rec, Some(Instant::now())));
        } else if book.remove(&rec.id).is_some() || !held {
            // Rejected: over before it began, in the store only. (A share of a task held already,
            // sent while the device plane is off, replaces it: counted once.)
            book.finished += 1;
        }
    }
    plane.tasks.wake.notify_one();
    TaskAccept::Stored
}

/// Targets of task `id` that this relay has finished, from the store.
async fn finished_targets(ctx: &Ctx, id: &str) -> Result<HashSet<String>> {
    let id = id.to_owned();
    Ok(ctx
        .store
        .run(move |s| s.task_targets(&id))
        .await?
        .into_iter()
        .map(|(t, _)| t)
        .collect())
}

/// Keeps of task `id`'s targets only those this relay has started (finished or running now): the
/// rest were given to another relay. Returns how many were dropped.
async fn drop_unstarted(ctx: &Ctx, plane: &DevicePlane, id: &str) -> Result<usize> {
    let finished = finished_targets(ctx, id).await?;
    let mut book = plane.tasks.lock();
    let Some(e) = book.get_mut(id) else {
        return Ok(0);
    };
    let before = e.rec.spec.targets.len();
    let started = &e.started;
    e.rec
        .spec
        .targets
        .retain(|t| finished.contains(t.trim()) || started.contains(t.trim()));
    let dropped = before - e.rec.spec.targets.len();
    e.rec.total = unique_targets(&e.rec.spec).len() as u64;
    e.epoch += 1;
    Ok(dropped)
}

/// A further share of a task this relay holds: the targets join the task (under the same lease,
/// or under a new one that replaces a lease taken back), and the task runs again if it had ended.
async fn grant(ctx: &Ctx, plane: &DevicePlane, cmd: &Command, id: &str, spec: &TaskSpec) -> bool {
    if !plane.tasks.lock().contains_key(id) {
        // A task that ended is in the store only: it comes back into memory for the grant.
        let key = id.to_owned();
        let stored = match ctx.store.run(move |s| s.task(&key)).await {
            Ok(b) => b.and_then(|b| serde_json::from_slice::<TaskRecord>(&b).ok()),
            Err(e) => {
                error!(task_id = %id, error = %format!("{e:#}"), "cannot read the task; not acknowledged");
                return false;
            }
        };
        let Some(rec) = stored else {
            return false;
        };
        let mut book = plane.tasks.lock();
        if book.pruning.contains(id) {
            warn!(task_id = %id, "a further share of a task past its retention, being forgotten now; not acknowledged");
            return false;
        }
        if !book.contains_key(id) {
            book.insert(id.to_owned(), Entry::new(rec, None));
            book.finished = book.finished.saturating_sub(1);
        }
    }
    let new_lease = plane
        .tasks
        .lock()
        .get(id)
        .is_some_and(|e| e.rec.spec.lease_id != spec.lease_id);
    if new_lease {
        // The cloud opens a new lease only after taking the old one back.
        if let Err(e) = drop_unstarted(ctx, plane, id).await {
            error!(task_id = %id, error = %format!("{e:#}"), "cannot read the task's finished targets; not acknowledged");
            return false;
        }
    }
    let rec = {
        let mut book = plane.tasks.lock();
        let Some(e) = book.get_mut(id) else {
            // It ended and left memory meanwhile: the cloud sends the share again.
            warn!(task_id = %id, "the task ended while a further share was applied; not acknowledged");
            return false;
        };
        let have: HashSet<String> = e
            .rec
            .spec
            .targets
            .iter()
            .map(|t| t.trim().to_owned())
            .collect();
        let added: Vec<String> = unique_targets(spec)
            .into_iter()
            .filter(|t| !have.contains(t))
            .collect();
        let n = added.len();
        e.rec.spec.targets.extend(added);
        // The same task: its payload again (with the device password a finished task forgot).
        e.rec.spec.payload = spec.payload.clone();
        e.rec.spec.lease_id = spec.lease_id.clone();
        e.rec.spec.lease_s = spec.lease_s;
        e.rec.total = unique_targets(&e.rec.spec).len() as u64;
        e.epoch += 1;
        e.confirmed = Some(Instant::now());
        e.lease_since = Instant::now();
        e.revoked = false;
        if matches!(e.rec.status.as_str(), "done" | "revoked") && n > 0 {
            e.rec.status = "executing".into();
            e.rec.finished_at = None;
            e.rec.reason.clear();
        }
        if is_final(&e.rec.status) {
            // Still over: it keeps no password.
            forget_secrets(&mut e.rec);
        }
        e.rec.seq += 1;
        info!(task_id = %id, added = n, total = e.rec.total, "task granted more targets");
        e.rec.clone()
    };
    let writes = vec![
        Write::CommandSeen(cmd.id.clone()),
        task_write(&rec),
        Write::Result(progress_record(&rec, 0)),
    ];
    if let Err(e) = plane.record(writes).await {
        error!(task_id = %id, error = %e, "cannot store the task's new targets; not acknowledged");
        return false;
    }
    plane.tasks.settle(id, rec.seq);
    plane.tasks.wake.notify_one();
    plane.tasks.lease_wake.notify_waiters();
    true
}

/// The cloud listed the leases this relay holds (as of `as_of`): a listed lease is confirmed; a
/// leased task stored before `as_of` whose lease is missing was handed to another relay, and its
/// unstarted targets are dropped.
pub fn leases(ctx: &Ctx, plane: &Arc<DevicePlane>, list: &[String], as_of: Instant) {
    let mut revoke = Vec::new();
    {
        let mut book = plane.tasks.lock();
        for (id, e) in book.iter_mut() {
            let (Some(lease), Some(_)) = (&e.rec.spec.lease_id, e.rec.spec.lease_s) else {
                continue;
            };
            if !matches!(e.rec.status.as_str(), "scheduled" | "executing") || e.revoked {
                continue;
            }
            if list.iter().any(|l| l == lease) {
                if e.confirmed.is_none_or(|c| c < as_of) {
                    e.confirmed = Some(as_of);
                }
            } else if e.lease_since < as_of {
                e.revoked = true;
                e.confirmed = None;
                revoke.push(id.clone());
            }
        }
    }
    plane.tasks.lease_wake.notify_waiters();
    for id in revoke {
        let (ctx, plane) = (ctx.clone(), plane.clone());
        tokio::spawn(async move {
            match drop_unstarted(&ctx, &plane, &id).await {
                Ok(n) => {
                    warn!(task_id = %id, dropped = n, "the cloud took this task's lease back (another relay has its unfinished targets); starting none of them");
                    plane.tasks.lease_wake.notify_waiters();
                    plane.tasks.wake.notify_one();
                    // A task nobody runs now is closed here; a running one closes when its
                    // executor has nothing left.
                    let rec = {
                        let mut book = plane.tasks.lock();
                        match book.get_mut(&id) {
                            Some(e) if !e.running && e.revoked => {
                                close_revoked(&mut e.rec);
                                Some(e.rec.clone())
                            }
                            _ => None,
                        }
                    };
                    if let Some(rec) = rec {
                        match store_change(&plane, &rec).await {
                            Ok(()) => plane.tasks.settle(&id, rec.seq),
                            Err(e) => {
                                error!(task_id = %id, error = %e, "cannot store the task's end")
                            }
                        }
                    }
                }
                Err(e) => {
                    error!(task_id = %id, error = %format!("{e:#}"), "cannot drop the task's unstarted targets")
                }
            }
        });
    }
}

fn close_revoked(rec: &mut TaskRecord) {
    forget_secrets(rec);
    rec.status = "revoked".into();
    rec.reason = "the cloud gave this task's unfinished targets to another relay".into();
    rec.finished_at = Some(rfc3339(SystemTime::now()));
    rec.seq += 1;
}

/// `task_cancel`: only while scheduled.
pub async fn cancel(plane: &DevicePlane, params: &Value) -> actions::Done {
    let Some(id) = params.get("task_id").and_then(Value::as_str) else {
        return fail("params.task_id is required");
    };
    let rec = {
        let mut book = plane.tasks.lock();
        let e = match scheduled(&mut book, id, "cancelled") {
            Ok(e) => e,
            Err(done) => return done,
        };
        e.map(|e| {
            e.rec.status = "cancelled".into();
            e.rec.reason = "cancelled by the cloud".into();
            e.rec.seq += 1;
            e.rec.finished_at = Some(rfc3339(SystemTime::now()));
            forget_secrets(&mut e.rec);
            e.rec.clone()
        })
    };
    let Some(rec) = rec else {
        return not_held(plane, id, "cancelled").await;
    };
    match store_change(plane, &rec).await {
        Ok(()) => {
            plane.tasks.settle(id, rec.seq);
            info!(task_id = %id, "task cancelled");
            actions::Done {
                result: Outcome::Success,
                reason: String::new(),
                payload: json!({"task_id": id, "status": "cancelled"}),
                cause: None,
            }
        }
        Err(e) => fail(&format!("cannot store the cancellation: {e}")),
    }
}

/// `task_update`: replaces the given fields of a scheduled task.
pub async fn update(plane: &DevicePlane, params: &Value) -> actions::Done {
    let Some(id) = params.get("task_id").and_then(Value::as_str) else {
        return fail("params.task_id is required");
    };
    let rec = {
        let mut book = plane.tasks.lock();
        match scheduled(&mut book, id, "edited") {
            Ok(Some(e)) => Some(edit(e, params)),
            Ok(None) => None,
            Err(done) => return done,
        }
    };
    let rec = match rec {
        None => return not_held(plane, id, "edited").await,
        Some(Err(done)) => return done,
        Some(Ok(rec)) => rec,
    };
    match store_change(plane, &rec).await {
        Ok(()) => {
            info!(task_id = %id, "task edited");
            plane.tasks.wake.notify_one();
            actions::Done {
                result: Outcome::Success,
                reason: String::new(),
                payload: json!({"task_id": id, "status": "scheduled", "at": rec.spec.at, "total": rec.total}),
                cause: None,
            }
        }
        Err(e) => fail(&format!("cannot store the edit: {e}")),
    }
}

/// Applies a `task_update` to a scheduled task; the refusal says why not.
fn edit(e: &mut Entry, params: &Value) -> Result<TaskRecord, actions::Done> {
    let mut spec =
        serde_json::to_value(&e.rec.spec).map_err(|e| fail(&format!("cannot edit: {e}")))?;
    if let (Some(dst), Some(src)) = (spec.as_object_mut(), params.as_object()) {
        for (k, v) in src {
            if k != "task_id" {
                dst.insert(k.clone(), v.clone());
            }
        }
    }
    let spec: TaskSpec =
        serde_json::from_value(spec).map_err(|e| fail(&format!("bad task fields: {e}")))?;
    validate(&spec).map_err(|why| fail(&format!("bad task: {why}")))?;
    e.rec.total = unique_targets(&spec).len() as u64;
    e.rec.spec = spec;
    e.rec.seq += 1;
    Ok(e.rec.clone())
}

/// The task named by `task_cancel` or `task_update`, if it is still scheduled (`verb` says what
/// was asked, for the refusal); `None` when memory does not hold it (see [`not_held`]).
fn scheduled<'a>(
    book: &'a mut BTreeMap<String, Entry>,
    id: &str,
    verb: &str,
) -> Result<Option<&'a mut Entry>, actions::Done> {
    let Some(e) = book.get_mut(id) else {
        return Ok(None);
    };
    if e.rec.status != "scheduled" || e.running {
        return Err(not_scheduled(id, &e.rec.status, verb));
    }
    Ok(Some(e))
}

fn not_scheduled(id: &str, status: &str, verb: &str) -> actions::Done {
    fail(&format!(
        "task {id} is {status}; only a scheduled task can be {verb}"
    ))
}

/// The refusal for a `task_cancel` or `task_update` naming a task memory does not hold: one that
/// ended (in the store only) or one the relay never had.
async fn not_held(plane: &DevicePlane, id: &str, verb: &str) -> actions::Done {
    let key = id.to_owned();
    match plane.store.run(move |s| s.task(&key)).await {
        Ok(Some(bytes)) => match serde_json::from_slice::<Head>(&bytes) {
            Ok(h) => not_scheduled(id, &h.status, verb),
            Err(e) => fail(&format!("task {id} cannot be read: {e}")),
        },
        Ok(None) => fail(&format!("unknown task {id:?}")),
        Err(e) => fail(&format!("cannot read the task: {e}")),
    }
}

/// Stores a changed task together with the progress record that tells the cloud.
async fn store_change(plane: &DevicePlane, rec: &TaskRecord) -> Result<(), String> {
    plane
        .record(vec![
            task_write(rec),
            Write::Result(progress_record(rec, 0)),
        ])
        .await
        .map_err(|e| e.to_string())
}

fn fail(why: &str) -> actions::Done {
    actions::Done {
        result: Outcome::Failure,
        reason: why.to_string(),
        payload: Value::Null,
        cause: None,
    }
}

/// Forgets the finished tasks past `[devices].task_retention`. They are found in the store, read a
/// page at a time; memory holds only open tasks, which are never pruned.
async fn prune(ctx: &Ctx, plane: &DevicePlane) -> Result<()> {
    let retention = plane.cfg().task_retention;
    let Some(cutoff) = SystemTime::now().checked_sub(retention) else {
        return Ok(());
    };
    let ids = ctx.store.run(move |s| expired_in(s, cutoff)).await?;
    // A task a grant brought back into memory meanwhile is open again: kept.
    // Those not in memory are marked, under the same lock, so that no grant brings one back while
    // its records are deleted.
    let ids: Vec<String> = {
        let mut book = plane.tasks.lock();
        let ids: Vec<String> = ids
            .into_iter()
            .filter(|id| !book.contains_key(id))
            .collect();
        book.pruning.extend(ids.iter().cloned());
        ids
    };
    if ids.is_empty() {
        return Ok(());
    }
    let n = ids.len();
    let batch = ids.clone();
    let pruned = ctx.store.run(move |s| s.tasks_prune(&batch)).await;
    {
        let mut book = plane.tasks.lock();
        for id in &ids {
            book.pruning.remove(id);
        }
        if pruned.is_ok() {
            book.finished = book.finished.saturating_sub(n as u64);
        }
    }
    let targets = pruned?;
    info!(
        tasks = n,
        targets,
        retention = %humantime::format_duration(retention),
        "finished tasks past their retention forgotten"
    );
    Ok(())
}

/// How often finished tasks are looked at for pruning: a tenth of the retention, between 1 s and
/// an hour.
fn prune_every(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// The scheduler: starts each task at its time (and resumes tasks a restart interrupted), and
/// forgets finished tasks past their retention.
pub async fn run(ctx: Ctx, plane: Arc<DevicePlane>, shutdown: CancellationToken) -> Result<()> {
    let mut running = tokio::task::JoinSet::new();
    let mut next_prune = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_prune {
            if let Err(e) = prune(&ctx, &plane).await {
                warn!(error = %format!("{e:#}"), "cannot prune finished tasks; trying again later");
            }
            // The retention is read each time: a reload may change it.
            next_prune = tokio::time::Instant::now() + prune_every(plane.cfg().task_retention);
        }
        let now = SystemTime::now();
        let mut next: Option<SystemTime> = None;
        let mut start = Vec::new();
        {
            let mut book = plane.tasks.lock();
            for (id, e) in book.iter_mut() {
                let runnable = match e.rec.status.as_str() {
                    "executing" => true,
                    "scheduled" => match due_at(&e.rec.spec) {
                        Some(t) if t > now => {
                            next = Some(next.map_or(t, |n| n.min(t)));
                            false
                        }
                        _ => true,
                    },
                    _ => false,
                };
                if runnable && !e.running {
                    e.running = true;
                    start.push(id.clone());
                }
            }
        }
        for id in start {
            running.spawn(execute(ctx.clone(), plane.clone(), id, shutdown.clone()));
        }
        let wait = next
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::from_secs(60))
            .min(Duration::from_secs(60))
            .min(next_prune.saturating_duration_since(tokio::time::Instant::now()));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = plane.tasks.wake.notified() => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
            _ = shutdown.cancelled() => break,
        }
    }
    // Targets in flight finish or hit their deadline; unstarted ones wait for the next start.
    let drain = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        running.abort_all();
    }
    Ok(())
}

async fn execute(ctx: Ctx, plane: Arc<DevicePlane>, id: String, shutdown: CancellationToken) {
    let ended = match execute_inner(&ctx, &plane, &id, &shutdown).await {
        Ok(ended) => ended,
        Err(e) => {
            error!(task_id = %id, error = %format!("{e:#}"), "task stopped; it resumes in a moment (or after a restart)");
            // Not at once: the scheduler would start it again in a tight loop.
            crate::util::backoff::sleep_or_shutdown(RESUME_AFTER_ERROR, &shutdown).await;
            None
        }
    };
    // Under one lock: a grant cannot bring the task back from the store between it leaving
    // memory and its executor letting go of it.
    let mut book = plane.tasks.lock();
    if let Some(e) = book.get_mut(&id) {
        e.running = false;
        e.in_progress = 0;
    }
    if let Some(seq) = ended {
        // Its end is stored: the task leaves memory (unless a grant reopened it meanwhile).
        book.settle(&id, seq);
    }
}

/// Runs task `id` until it has nothing left to start. Returns the sequence of the final record it
/// stored when the task ended (`None` when it stopped short: shutdown, new targets).
async fn execute_inner(
    ctx: &Ctx,
    plane: &Arc<DevicePlane>,
    id: &str,
    shutdown: &CancellationToken,
) -> Result<Option<u64>> {
    // scheduled -> executing, durably, before the first target is touched.
    let (rec, fresh) = {
        let mut book = plane.tasks.lock();
        let Some(e) = book.get_mut(id) else {
            return Ok(None);
        };
        let fresh = e.rec.status == "scheduled";
        if fresh {
            e.rec.status = "executing".into();
            e.rec.started_at = Some(rfc3339(SystemTime::now()));
            e.rec.seq += 1;
        }
        (e.rec.clone(), fresh)
    };
    if fresh {
        plane
            .record(vec![
                task_write(&rec),
                Write::Result(progress_record(&rec, 0)),
            ])
            .await
            .map_err(anyhow::Error::msg)?;
        info!(task_id = %id, r#type = %rec.spec.kind, targets = rec.total, "task started");
    } else {
        info!(task_id = %id, finished = rec.finished(), of = rec.total, "task resumed after a restart");
    }
    let finished = finished_targets(ctx, id).await?;
    let (payload, password) = payload_parts(&rec.spec.payload);
    let op = Arc::new(actions::parse(&rec.spec.kind, &payload).map_err(anyhow::Error::msg)?);
    let password = plane.password(password.as_deref());
    let limit = rec
        .spec
        .concurrency
        .map(|c| c as usize)
        .unwrap_or(plane.cfg().task_concurrency)
        .clamp(1, plane.cfg().task_concurrency);
    let deadline = rec
        .spec
        .target_timeout_s
        .map(Duration::from_secs)
        .unwrap_or(plane.cfg().target_timeout);
    let sem = Arc::new(Semaphore::new(limit));
    let mut work = tokio::task::JoinSet::new();
    let mut interrupted = false;
    // What is left to start: rebuilt from the task's targets whenever they change (a further
    // grant, a lease taken back).
    let mut epoch = u64::MAX;
    let mut todo: std::collections::VecDeque<String> = Default::default();
    {
        let mut book = plane.tasks.lock();
        if let Some(e) = book.get_mut(id) {
            e.started = finished;
        }
    }
    loop {
        {
            let book = plane.tasks.lock();
            let Some(e) = book.get(id) else {
                break;
            };
            if e.epoch != epoch {
                epoch = e.epoch;
                todo = unique_targets(&e.rec.spec)
                    .into_iter()
                    .filter(|t| !e.started.contains(t))
                    .collect();
            }
        }
        let Some(target) = todo.pop_front() else {
            // Nothing to start: wait for what runs, then look once more for new targets.
            if work.is_empty() {
                let same = plane.tasks.lock().get(id).is_none_or(|e| e.epoch == epoch);
                if same {
                    break;
                }
                continue;
            }
            // (Not `wake`: that one is the scheduler's.)
            tokio::select! {
                r = work.join_next() => if let Some(r) = r { r??; },
                _ = plane.tasks.lease_wake.notified() => {}
            }
            continue;
        };
        // A leased task starts a target only while the cloud confirms the lease.
        match lease_gate(ctx, plane, id, epoch, shutdown).await {
            Gate::Go => {}
            Gate::Changed => {
                todo.push_front(target);
                continue;
            }
            Gate::Stop => {
                interrupted = true;
                break;
            }
        }
        // No new target while the store cannot record its result (a full disk): the device would
        // be acted on with nowhere to put the outcome.
        let mut waited = false;
        while ctx.store.trouble().is_some() && !shutdown.is_cancelled() {
            if !waited {
                info!(task_id = %id, "task paused: the store cannot record results now");
                waited = true;
            }
            crate::util::backoff::sleep_or_shutdown(STORE_WAIT, shutdown).await;
        }
        if waited && !shutdown.is_cancelled() {
            info!(task_id = %id, "task resumed: the store takes writes again");
        }
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => p?,
            _ = shutdown.cancelled() => { interrupted = true; break; }
        };
        let halted = {
            let mut book = plane.tasks.lock();
            match book.get_mut(id) {
                Some(e) if e.epoch == epoch => {
                    e.started.insert(target.clone());
                    e.halted
                }
                // The targets changed while waiting for a slot: look again.
                _ => {
                    todo.push_front(target);
                    continue;
                }
            }
        };
        let plane = plane.clone();
        let op = op.clone();
        let password = password.clone();
        let task_id = id.to_string();
        let kind = rec.spec.kind.clone();
        let threshold = rec.spec.failure_threshold_pct;
        work.spawn(async move {
            let _permit = permit;
            if let Some(e) = plane.tasks.lock().get_mut(&task_id) {
                e.in_progress += 1;
            }
            let done = if halted {
                actions::Done {
                    result: Outcome::NotApplicable,
                    reason: format!(
                        "not run: the task halted because more than {}% of its targets failed",
                        threshold.unwrap_or(0)
                    ),
                    payload: Value::Null,
                    cause: None,
                }
            } else {
                match plane.check_target(&target) {
                    Err(why) => fail(&why),
                    Ok(t) => plane.run_op(&t, &password, &op, deadline, &task_id).await,
                }
            };
            finish_target(&plane, &task_id, &kind, &target, done).await
        });
        // Reap as we go so memory stays flat on huge tasks.
        while let Some(r) = work.try_join_next() {
            r??;
        }
    }
    while let Some(r) = work.join_next().await {
        r??;
    }
    if let Some(e) = plane.tasks.lock().get_mut(id) {
        e.started = HashSet::new();
        e.paused = false;
    }
    if interrupted {
        info!(task_id = %id, "relay stopping; the task's unfinished targets resume at the next start");
        return Ok(None);
    }
    let rec = {
        let mut book = plane.tasks.lock();
        let Some(e) = book.get_mut(id) else {
            return Ok(None);
        };
        if e.epoch != epoch {
            // Targets came in after the last look: the scheduler starts the task again.
            return Ok(None);
        }
        // The targets are done with the password: it leaves memory and, with this write, the store.
        forget_secrets(&mut e.rec);
        if e.revoked {
            close_revoked(&mut e.rec);
            e.rec.clone()
        } else {
            e.rec.status = if e.halted { "halted" } else { "done" }.into();
            if e.halted {
                e.rec.reason = format!(
                    "halted: {} of {} finished targets failed (threshold {}%)",
                    e.rec.failure,
                    e.rec.finished(),
                    e.rec.spec.failure_threshold_pct.unwrap_or(0)
                );
            }
            e.rec.finished_at = Some(rfc3339(SystemTime::now()));
            e.rec.seq += 1;
            e.rec.clone()
        }
    };
    plane
        .record(vec![
            task_write(&rec),
            Write::Result(progress_record(&rec, 0)),
        ])
        .await
        .map_err(anyhow::Error::msg)?;
    info!(task_id = %id, status = %rec.status, success = rec.success, failure = rec.failure, not_applicable = rec.not_applicable, "task finished");
    Ok(Some(rec.seq))
}

/// What the lease allows a leased task's executor to do next.
enum Gate {
    Go,
    /// The task's targets changed while waiting: rebuild the list first.
    Changed,
    /// The relay is stopping.
    Stop,
}

/// Waits until task `id` may start a target: at once without a lease; with one, while the channel
/// is up and the cloud confirmed the lease less than half a lease ago (the cloud gives the targets
/// of a relay silent for a whole lease to another relay: pausing at half leaves the margin).
async fn lease_gate(
    ctx: &Ctx,
    plane: &DevicePlane,
    id: &str,
    epoch: u64,
    shutdown: &CancellationToken,
) -> Gate {
    let mut said = false;
    loop {
        let channel_up = ctx.status.lock().channel == crate::ctx::ChannelState::Connected;
        {
            let mut book = plane.tasks.lock();
            let Some(e) = book.get_mut(id) else {
                return Gate::Stop;
            };
            if e.epoch != epoch {
                return Gate::Changed;
            }
            if e.lease_allows(channel_up) {
                if e.paused {
                    e.paused = false;
                    info!(task_id = %id, "lease confirmed: the task goes on");
                }
                return Gate::Go;
            }
            e.paused = true;
        }
        if !said {
            said = true;
            info!(task_id = %id, channel_up, "leased task paused until the cloud confirms the lease (another relay may take its targets)");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Gate::Stop,
            _ = plane.tasks.lease_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Stores one target's outcome (sub-result + outbox record, one group commit), then counts it.
async fn finish_target(
    plane: &DevicePlane,
    task_id: &str,
    kind: &str,
    target: &str,
    done: actions::Done,
) -> Result<()> {
    let now = rfc3339(SystemTime::now());
    let sub = SubResult {
        result: done.result,
        reason: done.reason.clone(),
        finished_at: now.clone(),
    };
    let rec = ResultRecord {
        result_id: uuid::Uuid::new_v4().to_string(),
        command_id: task_id.to_string(),
        target: Some(target.to_string()),
        name: kind.to_string(),
        result: done.result,
        reason: done.reason,
        payload: done.payload,
        finished_at: now,
        progress: None,
    };
    let writes = || -> Result<Vec<Write>> {
        Ok(vec![
            Write::TaskTarget {
                task: task_id.to_string(),
                target: target.to_string(),
                value: serde_json::to_vec(&sub)?,
            },
            Write::Result(rec.clone()),
        ])
    };
    // The device has acted: keep its outcome in memory until the store takes it (a full disk
    // recovers), rather than drop it and run the target again after a restart.
    let mut backoff =
        crate::util::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        match plane.record(writes()?).await {
            Ok(()) => break,
            Err(e) if plane.store_refuses() => {
                let d = backoff.next_delay();
                warn!(task_id, target, error = %e, retry_in = ?d, "cannot record a target's result yet");
                tokio::time::sleep(d).await;
            }
            Err(e) => return Err(anyhow::Error::msg(e)),
        }
    }
    let mut book = plane.tasks.lock();
    if let Some(e) = book.get_mut(task_id) {
        e.in_progress = e.in_progress.saturating_sub(1);
        match sub.result {
            Outcome::Success => e.rec.success += 1,
            Outcome::Failure => e.rec.failure += 1,
            Outcome::NotApplicable => e.rec.not_applicable += 1,
        }
        if let Some(pct) = e.rec.spec.failure_threshold_pct {
            let judged = e.rec.success + e.rec.failure;
            if !e.halted
                && judged >= THRESHOLD_SAMPLE.min(e.rec.total)
                && e.rec.failure * 100 > u64::from(pct) * judged
            {
                e.halted = true;
                warn!(
                    task_id,
                    failure = e.rec.failure,
                    of = judged,
                    threshold_pct = pct,
                    "failure threshold exceeded; halting the task's remaining targets"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: &str, targets: &[&str], payload: Value) -> TaskSpec {
        TaskSpec {
            name: String::new(),
            kind: kind.into(),
            targets: targets.iter().map(|s| s.to_string()).collect(),
            payload,
            at: None,
            failure_threshold_pct: None,
            concurrency: None,
            target_timeout_s: None,
            task_id: None,
            lease_s: None,
            lease_id: None,
        }
    }

    #[test]
    fn tasks_are_validated_before_acceptance() {
        assert!(validate(&spec("reboot", &["10.0.0.1"], Value::Null)).is_ok());
        assert!(validate(&spec("explode", &["10.0.0.1"], Value::Null)).is_err());
        assert!(validate(&spec("reboot", &[], Value::Null)).is_err());
        assert!(
            validate(&spec("reset", &["10.0.0.1"], json!({"mode": "x"})))
                .unwrap_err()
                .contains("mode")
        );
        let mut s = spec("reboot", &["10.0.0.1"], Value::Null);
        s.at = Some("tomorrow".into());
        assert!(validate(&s).is_err());
        s.at = Some("2030-01-01T00:00:00Z".into());
        assert!(validate(&s).is_ok());
        s.failure_threshold_pct = Some(101);
        assert!(validate(&s).is_err());
    }

    #[test]
    fn duplicate_targets_count_once_and_password_is_split_off() {
        let s = spec(
            "reboot",
            &["10.0.0.1", " 10.0.0.1", "10.0.0.2"],
            Value::Null,
        );
        assert_eq!(unique_targets(&s), vec!["10.0.0.1", "10.0.0.2"]);
        let (p, pw) = payload_parts(&json!({"mode": "restart", "password": "s3cret"}));
        assert_eq!(pw.as_deref(), Some("s3cret"));
        assert_eq!(p, json!({"mode": "restart"}));
    }

    #[test]
    fn a_lease_allows_targets_only_while_confirmed_and_connected() {
        let rec = |lease_s: Option<u64>| {
            let mut sp = spec("reboot", &["10.0.0.1"], Value::Null);
            sp.lease_s = lease_s;
            sp.lease_id = lease_s.map(|_| "l1".to_string());
            TaskRecord {
                id: "t".into(),
                total: 1,
                spec: sp,
                status: "executing".into(),
                reason: String::new(),
                created_at: String::new(),
                started_at: None,
                finished_at: None,
                seq: 1,
                success: 0,
                failure: 0,
                not_applicable: 0,
            }
        };
        // Not leased: runs whatever the link.
        assert!(Entry::new(rec(None), None).lease_allows(false));
        // Leased: confirmed recently and connected, or nothing.
        let e = Entry::new(rec(Some(10)), Some(Instant::now()));
        assert!(e.lease_allows(true));
        assert!(!e.lease_allows(false), "channel down: paused");
        assert!(
            !Entry::new(rec(Some(10)), None).lease_allows(true),
            "never confirmed"
        );
        let old = Instant::now().checked_sub(Duration::from_secs(6));
        if let Some(old) = old {
            assert!(
                !Entry::new(rec(Some(10)), Some(old)).lease_allows(true),
                "confirmed more than half a lease ago"
            );
        }
    }

    /// A relay's device plane on a fresh state directory, with its recorder and scheduler
    /// running; `[devices].subnets` is 127.0.99.0/24, so a task aimed elsewhere fails each target
    /// at once without a packet sent.
    struct Plane {
        ctx: Ctx,
        plane: Arc<DevicePlane>,
        stop: CancellationToken,
        jobs: tokio::task::JoinSet<Result<()>>,
        _dir: tempfile::TempDir,
    }

    impl Plane {
        async fn start() -> Plane {
            let (ctx, plane, dir) = crate::devices::plane_for_test(
                "https://cloud.example.com",
                "subnets = [\"127.0.99.0/24\"]\nmonitoring = false\n",
            );
            let stop = CancellationToken::new();
            let mut jobs = tokio::task::JoinSet::new();
            jobs.spawn(super::super::recorder(
                ctx.clone(),
                plane.clone(),
                stop.clone(),
            ));
            jobs.spawn(run(ctx.clone(), plane.clone(), stop.clone()));
            Plane {
                ctx,
                plane,
                stop,
                jobs,
                _dir: dir,
            }
        }

        async fn accept(&self, id: &str, params: Value) -> TaskAccept {
            let cmd = Command {
                id: id.into(),
                name: "task".into(),
                params,
            };
            accept(&self.ctx, &self.plane, &cmd).await
        }

        /// Waits (polling the book, at most 20 s) until `pred` holds of its counts.
        async fn wait_counts(&self, pred: impl Fn(&TaskCounts) -> bool) -> TaskCounts {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let c = self.plane.tasks.counts();
                if pred(&c) {
                    return c;
                }
                assert!(Instant::now() < deadline, "counts never got there: {c:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// A plane where task `id` (one target) has finished and left memory.
        async fn with_finished_task(id: &str) -> Plane {
            let p = Plane::start().await;
            let first = json!({"type": "check_sync", "targets": ["10.9.9.1"]});
            assert_eq!(p.accept(id, first).await, TaskAccept::Stored);
            p.wait_counts(|c| c.done == 1).await;
            p.wait_in_memory(0).await;
            p
        }

        /// A task counts as done once its final record is stored; it leaves memory right after.
        async fn wait_in_memory(&self, n: usize) {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let held = self.plane.tasks.in_memory();
                if held == n {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{held} tasks in memory, never {n}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        async fn stop(mut self) {
            self.stop.cancel();
            while let Some(r) = self.jobs.join_next().await {
                r.unwrap().unwrap();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finished_tasks_leave_memory_and_are_read_from_the_store() {
        let p = Plane::start().await;
        let outside = json!({"type": "check_sync", "targets": ["10.9.9.1", "10.9.9.2"]});
        for i in 0..3 {
            assert_eq!(
                p.accept(&format!("t{i}"), outside.clone()).await,
                TaskAccept::Stored
            );
        }
        assert_eq!(
            p.accept("bad", json!({"type": "explode", "targets": ["10.9.9.1"]}))
                .await,
            TaskAccept::Stored
        );
        let later = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1)).to_string();
        assert_eq!(
            p.accept(
                "later",
                json!({"type": "check_sync", "targets": ["127.0.99.1"], "at": later})
            )
            .await,
            TaskAccept::Stored
        );
        let c = p.wait_counts(|c| c.done == 4).await;
        assert_eq!((c.scheduled, c.executing, c.done), (1, 0, 4));
        // Memory holds the open work only: the scheduled task.
        p.wait_in_memory(1).await;

        // `ucrelay tasks` still lists every task, the finished ones from the store.
        let list = p.plane.tasks.list().await.unwrap();
        let status = |id: &str| {
            list.iter()
                .find(|t| t["id"] == id)
                .map(|t| t["status"].as_str().unwrap().to_string())
        };
        assert_eq!(list.len(), 5, "{list:?}");
        for i in 0..3 {
            assert_eq!(status(&format!("t{i}")).as_deref(), Some("done"));
        }
        assert_eq!(status("bad").as_deref(), Some("rejected"));
        assert_eq!(status("later").as_deref(), Some("scheduled"));
        let (rec, summary) = p.plane.tasks.get("t0").await.unwrap().unwrap();
        assert_eq!(rec.spec.targets.len(), 2);
        assert_eq!(
            (summary["failure"].as_u64(), summary["total"].as_u64()),
            (Some(2), Some(2))
        );

        // A finished task the cloud sends again is known from the store: acknowledged, not run.
        assert_eq!(p.accept("t1", outside.clone()).await, TaskAccept::Stored);
        assert_eq!(p.plane.tasks.in_memory(), 1);
        assert_eq!(p.plane.tasks.counts().done, 4);
        // Cancelling a finished one says what it is, as before.
        let done = cancel(&p.plane, &json!({"task_id": "t2"})).await;
        assert_eq!(done.result, Outcome::Failure);
        assert_eq!(
            done.reason,
            "task t2 is done; only a scheduled task can be cancelled"
        );
        let done = cancel(&p.plane, &json!({"task_id": "nope"})).await;
        assert_eq!(done.reason, "unknown task \"nope\"");
        // Cancelling the scheduled one finishes it: memory is empty.
        let done = cancel(&p.plane, &json!({"task_id": "later"})).await;
        assert_eq!(done.result, Outcome::Success, "{}", done.reason);
        assert_eq!(p.plane.tasks.in_memory(), 0);
        assert_eq!(p.plane.tasks.counts().done, 5);
        assert_eq!(p.plane.tasks.list().await.unwrap().len(), 5);
        p.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_grant_does_not_bring_back_a_task_being_forgotten() {
        let p = Plane::with_finished_task("t").await;
        // The expiry has marked it and is deleting its records.
        p.plane.tasks.lock().pruning.insert("t".into());
        let more = json!({"type": "check_sync", "targets": ["10.9.9.2"], "task_id": "t"});
        assert_eq!(p.accept("g1", more).await, TaskAccept::Failed);
        assert_eq!(p.plane.tasks.in_memory(), 0);
        assert_eq!(p.plane.tasks.counts().done, 1);
        p.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_further_grant_brings_a_finished_task_back_and_it_leaves_again() {
        let p = Plane::with_finished_task("t").await;
        let more = json!({"type": "check_sync", "targets": ["10.9.9.2"], "task_id": "t"});
        assert_eq!(p.accept("g1", more).await, TaskAccept::Stored);
        // It ran again, for the new target only, and left memory once more.
        p.wait_counts(|c| c.done == 1 && c.executing == 0).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let rec = loop {
            let (rec, _) = p.plane.tasks.get("t").await.unwrap().unwrap();
            if rec.status == "done" && rec.total == 2 && p.plane.tasks.in_memory() == 0 {
                break rec;
            }
            assert!(Instant::now() < deadline, "{rec:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(rec.failure, 2, "{rec:?}");
        assert_eq!(p.plane.tasks.counts().done, 1);
        p.stop().await;
    }

    fn stored(id: &str, status: &str, targets: usize, payload: Value) -> Write {
        let targets: Vec<&str> = vec!["10.0.0.1"; targets];
        let mut sp = spec("reboot", &targets, payload);
        sp.targets = (0..sp.targets.len())
            .map(|i| format!("10.0.{}.{}", i / 250, i % 250))
            .collect();
        let rec = TaskRecord {
            id: id.into(),
            total: sp.targets.len() as u64,
            spec: sp,
            status: status.into(),
            reason: String::new(),
            created_at: "2026-01-01T00:00:00Z".into(),
            started_at: None,
            finished_at: is_final(status).then(|| "2026-01-02T00:00:00Z".into()),
            seq: 3,
            success: 0,
            failure: 0,
            not_applicable: 0,
        };
        task_write(&rec)
    }

    #[test]
    fn a_restart_on_a_long_history_loads_only_the_open_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // More finished tasks than a page, each with a sizeable target list.
        let mut writes: Vec<Write> = (0..1500)
            .map(|i| {
                stored(
                    &format!("f{i:05}"),
                    FINAL[i % FINAL.len()],
                    200,
                    Value::Null,
                )
            })
            .collect();
        writes.push(stored("open-exec", "executing", 3, Value::Null));
        writes.push(stored("open-sched", "scheduled", 1, Value::Null));
        // Stored by a build that kept the password of a finished task.
        writes.push(stored("f-secret", "done", 1, json!({"password": "s3cret"})));
        for t in ["10.0.0.0", "10.0.0.1"] {
            writes.push(Write::TaskTarget {
                task: "open-exec".into(),
                target: t.into(),
                value: serde_json::to_vec(&SubResult {
                    result: Outcome::Success,
                    reason: String::new(),
                    finished_at: "2026-01-01T00:00:01Z".into(),
                })
                .unwrap(),
            });
        }
        store.write_batch(&writes).unwrap();

        let book = Book::load(&store).unwrap();
        assert_eq!(book.in_memory(), 2, "only the open tasks are in memory");
        let c = book.counts();
        assert_eq!((c.scheduled, c.executing, c.done), (1, 1, 1501));
        assert_eq!(book.open(), 2);
        let b = book.lock();
        let exec = &b["open-exec"].rec;
        assert_eq!(
            (exec.success, exec.total),
            (2, 3),
            "rebuilt from its targets"
        );
        drop(b);
        // The old password is gone from the store, without the record staying in memory.
        let text = String::from_utf8(store.task("f-secret").unwrap().unwrap()).unwrap();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("***"), "{text}");
    }

    const FINAL: &[&str] = &["done", "halted", "cancelled", "rejected", "revoked"];

    #[test]
    fn a_revoked_task_is_finished_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut sp = spec("reboot", &["10.0.0.1"], json!({"password": "s3cret"}));
        sp.lease_s = Some(60);
        sp.lease_id = Some("l1".into());
        let mut rec = TaskRecord {
            id: "t".into(),
            total: 1,
            spec: sp,
            status: "executing".into(),
            reason: String::new(),
            created_at: "2026-01-01T00:00:00Z".into(),
            started_at: None,
            finished_at: None,
            seq: 2,
            success: 0,
            failure: 0,
            not_applicable: 0,
        };
        close_revoked(&mut rec);
        assert_eq!(
            rec.spec.payload,
            json!({"password": "***"}),
            "no secret kept"
        );
        store.write_batch(&[task_write(&rec)]).unwrap();
        let book = Book::load(&store).unwrap();
        // Not one of MAX_OPEN_TASKS for ever, and forgotten after the retention like the others.
        assert_eq!(book.open(), 0);
        assert_eq!(book.counts().done, 1);
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert_eq!(expired_in(&store, later).unwrap(), ["t"]);
    }

    #[test]
    fn due_time_parses_rfc3339() {
        let mut s = spec("reboot", &["10.0.0.1"], Value::Null);
        assert!(due_at(&s).is_none());
        s.at = Some("2030-01-01T00:00:00Z".into());
        assert!(due_at(&s).unwrap() > SystemTime::now());
    }
}
