//! The reference cloud's data and the pure rules applied to it: tenants and their PIN window,
//! bearer tokens, relays, commands, results with de-duplication, tasks and their totals, device
//! lists, device reports and alarms, counters, and the state file.
//!
//! No networking and no clock here: every rule that depends on time takes `now` so that tests can
//! move time freely. The only I/O is reading and atomically writing the state file.

use crate::protocol::{
    Alarm, ArtifactOffer, DeviceEntry, DeviceList, DeviceReport, DeviceStats, HeartbeatRequest,
    Outcome, ResultRecord, TASK_COMMAND, TASK_UPDATE_COMMAND, TaskProgress, TaskSpec,
};
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Version of the state file layout; bumped when an older file could not be read correctly.
/// Fields added later (tasks, devices, reports, alarms) default to empty, so files written before
/// them still load as format 1.
pub const STATE_FORMAT: u32 = 1;

/// How many tokens one relay may hold at once. Re-registering does not revoke older tokens (a relay
/// whose answer was lost may still use one), but the list must not grow without end.
pub const MAX_TOKENS_PER_RELAY: usize = 8;

/// Formats a time as RFC 3339 (UTC, milliseconds). Clamped to the range humantime can print, so
/// that absurd durations given on the command line (`--pin-grace 100000years`) cannot panic.
pub fn fmt_time(t: SystemTime) -> String {
    // 9999-12-31T23:59:59Z, the last second humantime formats.
    let max = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    let t = t.clamp(UNIX_EPOCH, max);
    humantime::format_rfc3339_millis(t).to_string()
}

/// `t + d` without the panic `SystemTime + Duration` has on overflow.
pub fn add_time(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d)
        .unwrap_or(UNIX_EPOCH + Duration::from_secs(253_402_300_799))
}

/// Serde helpers storing `SystemTime` as RFC 3339 text, readable in the state file.
mod time_text {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&fmt_time(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }

    pub mod opt {
        use super::*;

        pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_some(&fmt_time(*t)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<SystemTime>, D::Error> {
            let text: Option<String> = Option::deserialize(d)?;
            text.map(|t| humantime::parse_rfc3339(&t).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

/// One tenant and its PIN history. `generation` counts resets: a token remembers the generation of
/// the PIN it was obtained with, which is how tokens die with their PIN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    pub pin: String,
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub old_pin: Option<String>,
    #[serde(default, with = "time_text::opt")]
    pub old_pin_valid_until: Option<SystemTime>,
    #[serde(default, with = "time_text::opt")]
    pub last_reset: Option<SystemTime>,
    /// Tenant setting: device logs are uploaded to the cloud. Off, relays keep them instead
    /// (carried in heartbeat answers as `log_upload`).
    #[serde(default = "yes")]
    pub log_upload: bool,
}

fn yes() -> bool {
    true
}

/// Which PIN of a tenant a registration used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinMatch {
    Current,
    /// The PIN from before the last reset, still inside its grace window.
    Previous,
}

/// Why a PIN was refused; the message tells the relay's admin what happened, in plain words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinRefusal {
    /// The PIN replaced by the last reset; its grace window ended at the given time.
    Expired(SystemTime),
    /// Any other PIN.
    Wrong,
}

/// Why a PIN reset was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetTooSoon {
    pub last_reset: SystemTime,
    pub next_allowed: SystemTime,
}

impl Tenant {
    pub fn new(pin: impl Into<String>) -> Self {
        Tenant {
            pin: pin.into(),
            generation: 0,
            old_pin: None,
            old_pin_valid_until: None,
            last_reset: None,
            log_upload: true,
        }
    }

    /// The PIN rules: the current PIN is always accepted; after a reset the previous PIN is accepted
    /// until `reset time + grace` (exclusive), then refused.
    pub fn check_pin(&self, pin: &str, now: SystemTime) -> Result<PinMatch, PinRefusal> {
        if pin == self.pin {
            return Ok(PinMatch::Current);
        }
        if let (Some(old), Some(until)) = (&self.old_pin, self.old_pin_valid_until)
            && pin == old
        {
            return if now < until {
                Ok(PinMatch::Previous)
            } else {
                Err(PinRefusal::Expired(until))
            };
        }
        Err(PinRefusal::Wrong)
    }

    /// Sets `new_pin` as the tenant's PIN; the current one stays valid for `grace`. Refused while
    /// the last reset is younger than `cooldown`. Returns the end of the old PIN's grace window.
    pub fn reset_pin(
        &mut self,
        new_pin: String,
        now: SystemTime,
        grace: Duration,
        cooldown: Duration,
    ) -> Result<SystemTime, ResetTooSoon> {
        if let Some(last) = self.last_reset {
            let next_allowed = add_time(last, cooldown);
            if now < next_allowed {
                return Err(ResetTooSoon {
                    last_reset: last,
                    next_allowed,
                });
            }
        }
        let until = add_time(now, grace);
        self.old_pin = Some(std::mem::replace(&mut self.pin, new_pin));
        self.old_pin_valid_until = Some(until);
        self.last_reset = Some(now);
        self.generation += 1;
        Ok(until)
    }

    /// Whether a token obtained with the PIN of `generation` is still good. Tokens of the current PIN
    /// are; tokens of the previous PIN (obtained with it during the grace window, or before the
    /// reset) die when that PIN's grace window ends, so a relay with a stale PIN finds out.
    pub fn token_generation_valid(&self, generation: u64, now: SystemTime) -> bool {
        if generation == self.generation {
            return true;
        }
        generation + 1 == self.generation
            && self.old_pin_valid_until.is_some_and(|until| now < until)
    }

    /// The generation to record in a token obtained with `m`.
    pub fn generation_of(&self, m: PinMatch) -> u64 {
        match m {
            PinMatch::Current => self.generation,
            PinMatch::Previous => self.generation.saturating_sub(1),
        }
    }
}

/// A six-digit PIN different from the ones the tenant has now.
pub fn new_pin(tenant: &Tenant) -> String {
    loop {
        let pin = format!("{:06}", fastrand::u32(0..1_000_000));
        if pin != tenant.pin && tenant.old_pin.as_deref() != Some(pin.as_str()) {
            return pin;
        }
    }
}

/// A bearer token handed out at registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub relay_id: String,
    pub tenant_id: String,
    /// Tenant PIN generation the token was obtained with (see [`Tenant::token_generation_valid`]).
    pub pin_generation: u64,
    /// Obtained with the previous PIN during its grace window.
    #[serde(default)]
    pub old_pin: bool,
    #[serde(with = "time_text")]
    pub issued_at: SystemTime,
}

/// What the cloud knows about one relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayRecord {
    pub relay_id: String,
    pub tenant_id: String,
    pub hostname: String,
    pub version: String,
    #[serde(default)]
    pub fqdn: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The device subnets the relay said it serves; `None` when it did not say (an older relay).
    #[serde(default)]
    pub subnets: Option<Vec<String>>,
    #[serde(default)]
    pub registrations: u64,
    #[serde(with = "time_text")]
    pub registered_at: SystemTime,
    #[serde(default)]
    pub heartbeats: u64,
    #[serde(default, with = "time_text::opt")]
    pub last_heartbeat: Option<SystemTime>,
    #[serde(default)]
    pub last_heartbeat_request: Option<HeartbeatRequest>,
    #[serde(default)]
    pub channel_connections: u64,
}

impl RelayRecord {
    /// Active while the last heartbeat is younger than `inactive_after`. A heartbeat stamped in the
    /// future (the clock went back) counts as fresh.
    pub fn is_active(&self, now: SystemTime, inactive_after: Duration) -> bool {
        match self.last_heartbeat {
            None => false,
            Some(last) => now
                .duration_since(last)
                .map(|age| age < inactive_after)
                .unwrap_or(true),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    Queued,
    Sent,
    Acked,
    Done,
}

impl CommandState {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Acked => "acked",
            CommandState::Done => "done",
        }
    }
}

/// A command created through the test API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub id: String,
    pub relay_id: String,
    pub name: String,
    #[serde(default)]
    pub params: serde_json::Value,
    pub state: CommandState,
    #[serde(default)]
    pub result: Option<ResultRecord>,
    #[serde(with = "time_text")]
    pub created_at: SystemTime,
}

impl CommandRecord {
    /// States only move forward: an ack arriving after the result (the relay may post a result
    /// before the ack frame is read) must not turn `done` back into `acked`.
    pub fn advance(&mut self, to: CommandState) {
        if to > self.state {
            self.state = to;
        }
    }
}

/// A result as received, with the relay that reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResult {
    pub relay_id: String,
    pub record: ResultRecord,
}

/// Counters shown by `GET /sim/stats`. Persisted with the rest so that they stay consistent with
/// the stored results across a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    pub image_bytes_served: u64,
    pub heartbeats: u64,
    pub results_received: u64,
    pub duplicate_results: u64,
    pub registrations: u64,
    pub registrations_rejected: u64,
    pub channel_connections: u64,
    pub faulted_requests: u64,
    pub device_status_reports: u64,
    /// Frames from relays that were not a valid `RelayMessage`.
    pub channel_bad_frames: u64,
    /// Requests to the provisioning tree (`--provisioning`), whatever their answer.
    pub provisioning_requests: u64,
    /// Authentication challenges (401) sent by the provisioning tree.
    pub provisioning_unauthorized: u64,
    /// Body bytes received by PUT into the provisioning tree.
    pub provisioning_bytes_in: u64,
    /// Body bytes sent by GET from the provisioning tree.
    pub provisioning_bytes_out: u64,
    /// Device reports received in device-status batches (each counted, also when it replaces an
    /// older report of the same device).
    pub device_reports: u64,
    /// Distinct alarms received.
    pub alarms: u64,
    /// Alarms received again (same id): retries after a lost answer.
    pub duplicate_alarms: u64,
    /// Results for a task target that already had one from another relay (a relay that ran a
    /// target the cloud had moved away from it): stored, never counted in the task's totals.
    pub duplicate_target_results: u64,
    /// Task targets moved from a silent relay to another one.
    pub targets_moved: u64,
    /// CPU/memory readings received in device-status batches.
    pub device_stats: u64,
    /// Artifacts received whole with the announced SHA-256.
    pub artifacts_complete: u64,
    /// Artifact bytes received (chunks sent again after an interruption count again).
    pub artifact_bytes_received: u64,
    /// Artifacts whose bytes did not hash to the announced SHA-256 (dropped; sent again).
    pub artifact_checksum_mismatches: u64,
    /// Commands a relay answered `busy` on its channel (sent again after a backoff).
    pub busy_answers: u64,
    /// Batches refused with 413 because one record was over the per-record limit.
    pub records_too_large: u64,
}

/// An artifact a relay announced, and how far its upload is. The bytes are in the artifact
/// directory beside the state file; what is on disk is what the cloud holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub relay_id: String,
    pub offer: ArtifactOffer,
    /// `partial` or `complete`.
    pub state: String,
    /// Computed once every byte was in.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Every byte written for this artifact, including chunks sent again.
    #[serde(default)]
    pub bytes_received_total: u64,
    #[serde(default)]
    pub puts: u64,
    #[serde(with = "time_text")]
    pub created_at: SystemTime,
    #[serde(default, with = "time_text::opt")]
    pub completed_at: Option<SystemTime>,
}

/// A task created through the test API. Its state and totals are not stored here: they come
/// from the results the relays report, indexed at load (see [`TaskView`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    /// The relay of the first lease ("" when no relay could take any target).
    pub relay_id: String,
    /// As last accepted by the relay (a successful `task_update` replaces fields).
    pub spec: TaskSpec,
    #[serde(with = "time_text")]
    pub created_at: SystemTime,
    /// Which relay holds which targets. Empty in state files from before the fleet: then
    /// `relay_id` holds all of them.
    #[serde(default)]
    pub leases: Vec<LeaseRecord>,
    /// Set when the targets can move between relays (another relay could reach some of them).
    #[serde(default)]
    pub lease_s: Option<u64>,
}

impl TaskRecord {
    /// Whether `relay_id` holds or held any of this task's targets.
    pub fn involves(&self, relay_id: &str) -> bool {
        if self.leases.is_empty() {
            return self.relay_id == relay_id;
        }
        self.leases.iter().any(|l| l.relay_id == relay_id)
    }
}

/// Targets of a task given to one relay. Opened by a `task` command (its id is the lease id),
/// extended by further `task` commands naming it, taken back (`revoked_at`) when the relay has
/// been silent past the lease; the unfinished targets then go to other relays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub lease_id: String,
    pub relay_id: String,
    pub targets: Vec<String>,
    #[serde(with = "time_text")]
    pub granted_at: SystemTime,
    #[serde(default, with = "time_text::opt")]
    pub revoked_at: Option<SystemTime>,
}

/// A certificate uploaded for a tenant (`POST /sim/certificates`), and each relay's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertificateRecord {
    pub upload_id: String,
    pub tenant_id: String,
    #[serde(with = "time_text")]
    pub created_at: SystemTime,
    /// relay id -> the `install_certificate` command sent to it.
    pub commands: BTreeMap<String, String>,
}

/// The revision a relay's monitoring share was last given, and what it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShareRevision {
    pub revision: u64,
    pub fingerprint: u64,
}

/// An alarm as received, with the relay that raised it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredAlarm {
    pub relay_id: String,
    #[serde(flatten)]
    pub alarm: Alarm,
}

/// Everything the state file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    pub format: u32,
    #[serde(default)]
    pub tenants: BTreeMap<String, Tenant>,
    #[serde(default)]
    pub relays: BTreeMap<String, RelayRecord>,
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Target of test-API calls that name no relay.
    #[serde(default)]
    pub last_registered: Option<String>,
    #[serde(default)]
    pub commands: Vec<CommandRecord>,
    #[serde(default)]
    pub results: Vec<StoredResult>,
    #[serde(default)]
    pub stats: Stats,
    #[serde(default)]
    pub tasks: Vec<TaskRecord>,
    /// Each tenant's device list, with its revision.
    #[serde(default)]
    pub device_lists: BTreeMap<String, DeviceList>,
    /// The latest report of each device, by address.
    #[serde(default)]
    pub device_reports: BTreeMap<String, DeviceReport>,
    /// Every distinct alarm, in arrival order.
    #[serde(default)]
    pub alarms: Vec<StoredAlarm>,
    /// Sites of every tenant.
    #[serde(default)]
    pub sites: Vec<super::fleet::Site>,
    /// Each relay's monitoring share revision (kept so that a restart never reuses a revision
    /// for other content).
    #[serde(default)]
    pub share_revisions: BTreeMap<String, ShareRevision>,
    /// Certificate uploads, oldest first; the last one of a tenant also goes to relays that
    /// register later.
    #[serde(default)]
    pub certificates: Vec<CertificateRecord>,
    /// The latest CPU/memory reading of each device, by address.
    #[serde(default)]
    pub device_stats: BTreeMap<String, DeviceStats>,
    /// Artifacts by id.
    #[serde(default)]
    pub artifacts: BTreeMap<String, ArtifactRecord>,
}

impl Default for Persisted {
    fn default() -> Self {
        Persisted {
            format: STATE_FORMAT,
            tenants: BTreeMap::new(),
            relays: BTreeMap::new(),
            tokens: BTreeMap::new(),
            last_registered: None,
            commands: Vec::new(),
            results: Vec::new(),
            stats: Stats::default(),
            tasks: Vec::new(),
            device_lists: BTreeMap::new(),
            device_reports: BTreeMap::new(),
            alarms: Vec::new(),
            sites: Vec::new(),
            share_revisions: BTreeMap::new(),
            certificates: Vec::new(),
            device_stats: BTreeMap::new(),
            artifacts: BTreeMap::new(),
        }
    }
}

/// Outcome of taking in one results batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestOutcome {
    pub accepted: Vec<String>,
    pub duplicates: u64,
}

/// What the relays have reported about one task, as indexes into [`Persisted::results`]: kept
/// up to date as results arrive, so that reading a task never scans all results.
#[derive(Debug, Default)]
pub struct TaskView {
    /// How many distinct targets the task names: counted when it is added or edited, not at every
    /// summary (a tenant's task list is read often, and a task can name 50,000).
    pub targets: u64,
    /// Each relay's progress record with the highest `progress.seq`.
    pub progress: HashMap<String, usize>,
    /// The result of each target, in the order targets first reported.
    pub results: Vec<usize>,
    by_target: HashMap<String, usize>,
    pub success: u64,
    pub failure: u64,
    pub not_applicable: u64,
    /// Target results with a new result id for a target that had already reported: a relay that
    /// ran a finished target again (the latest one counts; this says it happened).
    pub repeats: u64,
}

impl TaskView {
    fn of(task: &TaskRecord) -> TaskView {
        TaskView {
            targets: unique_count(&task.spec.targets),
            ..TaskView::default()
        }
    }

    fn count(&mut self, outcome: Outcome, add: bool) {
        let n = match outcome {
            Outcome::Success => &mut self.success,
            Outcome::Failure => &mut self.failure,
            Outcome::NotApplicable => &mut self.not_applicable,
        };
        *n = if add { *n + 1 } else { n.saturating_sub(1) };
    }

    /// Whether `target` has a result.
    pub fn has(&self, target: &str) -> bool {
        self.by_target.contains_key(target)
    }
}

/// A task's state and totals as the test API shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskSummary {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub relay_id: String,
    /// `queued` (not yet acknowledged by the relay), `scheduled` (acknowledged, no progress
    /// reported yet), `rejected` (the relay answered the task with a failure), or the status of
    /// the relay's latest progress record.
    pub status: String,
    /// Why the relay rejected the task, when it did.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub total: u64,
    pub success: u64,
    pub failure: u64,
    pub not_applicable: u64,
    pub in_progress: u64,
    pub at: Option<String>,
    pub created_at: String,
    /// `seq` of the latest progress record (0 before the first).
    pub progress_seq: u64,
    /// Targets reported more than once (by distinct results): should stay 0.
    pub repeated_reports: u64,
}

/// Outcome of taking in one device-status batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusOutcome {
    pub reports: u64,
    pub new_alarms: u64,
    pub duplicate_alarms: u64,
}

/// The persisted data plus the indexes rebuilt from it at load.
#[derive(Debug, Default)]
pub struct Db {
    pub p: Persisted,
    command_index: HashMap<String, usize>,
    seen_results: HashSet<String>,
    task_index: HashMap<String, usize>,
    /// Parallel to `p.tasks`.
    task_views: Vec<TaskView>,
    seen_alarms: HashSet<String>,
}

impl Db {
    pub fn new(p: Persisted) -> Self {
        let command_index = p
            .commands
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.clone(), i))
            .collect();
        let seen_results = p
            .results
            .iter()
            .map(|r| r.record.result_id.clone())
            .collect();
        let task_index = p
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.clone(), i))
            .collect();
        let task_views = p.tasks.iter().map(TaskView::of).collect();
        let seen_alarms = p.alarms.iter().map(|a| a.alarm.id.clone()).collect();
        let mut db = Db {
            p,
            command_index,
            seen_results,
            task_index,
            task_views,
            seen_alarms,
        };
        for i in 0..db.p.results.len() {
            db.index_task_result(i);
        }
        db
    }

    pub fn command(&self, id: &str) -> Option<&CommandRecord> {
        self.command_index
            .get(id)
            .and_then(|&i| self.p.commands.get(i))
    }

    pub fn command_mut(&mut self, id: &str) -> Option<&mut CommandRecord> {
        self.command_index
            .get(id)
            .and_then(|&i| self.p.commands.get_mut(i))
    }

    pub fn add_command(&mut self, cmd: CommandRecord) {
        self.command_index
            .insert(cmd.id.clone(), self.p.commands.len());
        self.p.commands.push(cmd);
    }

    /// A command the relay answered `busy`: not delivered after all, it waits to be sent again.
    pub fn requeue(&mut self, id: &str, relay_id: &str) -> bool {
        match self.command_mut(id) {
            Some(c) if c.relay_id == relay_id && c.state == CommandState::Sent => {
                c.state = CommandState::Queued;
                true
            }
            _ => false,
        }
    }

    /// Commands of `relay_id` waiting to be sent (never sent, or answered `busy`), oldest first.
    pub fn queued_commands(&self, relay_id: &str) -> Vec<usize> {
        self.p
            .commands
            .iter()
            .enumerate()
            .filter(|(_, c)| c.relay_id == relay_id && c.state == CommandState::Queued)
            .map(|(i, _)| i)
            .collect()
    }

    /// Commands to (re)send when `relay_id` connects: those never sent, and those sent on an earlier
    /// connection but not acknowledged (delivery is at least once; the relay de-duplicates by id).
    pub fn undelivered_commands(&self, relay_id: &str) -> Vec<usize> {
        self.p
            .commands
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.relay_id == relay_id
                    && matches!(c.state, CommandState::Queued | CommandState::Sent)
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Takes in a results batch from `relay_id`: a result id never seen is stored (and completes its
    /// command when that command belongs to the relay); a known one is only counted as a duplicate.
    ///
    /// A task's per-target results and progress records do not complete the task's command (they
    /// only show the relay has it); they are indexed for the task instead. A successful result of a
    /// `task_update` command applies the update to the cloud's copy of the task.
    pub fn ingest_results(&mut self, relay_id: &str, records: Vec<ResultRecord>) -> IngestOutcome {
        let mut accepted = Vec::with_capacity(records.len());
        let mut duplicates = 0;
        for record in records {
            accepted.push(record.result_id.clone());
            if !self.seen_results.insert(record.result_id.clone()) {
                duplicates += 1;
                self.p.stats.duplicate_results += 1;
                continue;
            }
            self.p.stats.results_received += 1;
            let task_part = record.target.is_some() || record.progress.is_some();
            let mut update = None;
            if let Some(cmd) = self.command_mut(&record.command_id)
                && cmd.relay_id == relay_id
            {
                if task_part && cmd.name == TASK_COMMAND {
                    cmd.advance(CommandState::Acked);
                } else {
                    cmd.advance(CommandState::Done);
                    cmd.result = Some(record.clone());
                    if cmd.name == TASK_UPDATE_COMMAND && record.result == Outcome::Success {
                        update = Some(cmd.params.clone());
                    }
                }
            }
            if let Some(params) = update {
                self.apply_task_update(&params);
            }
            self.p.results.push(StoredResult {
                relay_id: relay_id.to_owned(),
                record,
            });
            self.index_task_result(self.p.results.len() - 1);
        }
        IngestOutcome {
            accepted,
            duplicates,
        }
    }

    /// Adds stored result `i` to its task's view when it is a task's progress record or target
    /// result from a relay that holds or held targets of the task (or the cloud's own answer for
    /// a target no relay can reach, `relay_id` ""). A target counts once: a later result from the
    /// same relay replaces its earlier one, a result from another relay is a duplicate.
    fn index_task_result(&mut self, i: usize) {
        let results = &self.p.results;
        let stored = &results[i];
        let Some(&t) = self.task_index.get(&stored.record.command_id) else {
            return;
        };
        let from_cloud = stored.relay_id.is_empty();
        if !from_cloud && !self.p.tasks[t].involves(&stored.relay_id) {
            return;
        }
        let view = &mut self.task_views[t];
        if let Some(progress) = &stored.record.progress {
            let newer = view.progress.get(&stored.relay_id).is_none_or(|&j| {
                results[j]
                    .record
                    .progress
                    .as_ref()
                    .is_none_or(|old| progress.seq >= old.seq)
            });
            if newer {
                view.progress.insert(stored.relay_id.clone(), i);
            }
        } else if let Some(target) = &stored.record.target {
            match view.by_target.get(target) {
                Some(&pos) => {
                    view.repeats += 1;
                    let old = view.results[pos];
                    if results[old].relay_id == stored.relay_id {
                        view.count(results[old].record.result, false);
                        view.results[pos] = i;
                        view.count(stored.record.result, true);
                    } else {
                        self.p.stats.duplicate_target_results += 1;
                    }
                }
                None => {
                    view.by_target.insert(target.clone(), view.results.len());
                    view.results.push(i);
                    view.count(stored.record.result, true);
                }
            }
        }
    }

    /// Replaces the fields a `task_update` names (everything but `task_id`) in the task's spec.
    /// An update that would not make a valid spec changes nothing.
    fn apply_task_update(&mut self, params: &serde_json::Value) {
        let Some(id) = params.get("task_id").and_then(|v| v.as_str()) else {
            return;
        };
        let Some(&t) = self.task_index.get(id) else {
            return;
        };
        let Ok(serde_json::Value::Object(mut spec)) = serde_json::to_value(&self.p.tasks[t].spec)
        else {
            return;
        };
        if let Some(fields) = params.as_object() {
            for (k, v) in fields.iter().filter(|(k, _)| k.as_str() != "task_id") {
                spec.insert(k.clone(), v.clone());
            }
        }
        if let Ok(new) = serde_json::from_value::<TaskSpec>(serde_json::Value::Object(spec)) {
            // An edit can change the targets: count them again.
            self.task_views[t].targets = unique_count(&new.targets);
            self.p.tasks[t].spec = new;
        }
    }

    /// Stores a result the cloud made itself (a target no relay can reach) and counts it for its
    /// task; it is not a result received, so the counters stay as they are.
    pub fn add_cloud_result(&mut self, stored: StoredResult) {
        self.seen_results.insert(stored.record.result_id.clone());
        self.p.results.push(stored);
        self.index_task_result(self.p.results.len() - 1);
    }

    pub fn add_task(&mut self, task: TaskRecord) {
        self.task_index.insert(task.id.clone(), self.p.tasks.len());
        self.task_views.push(TaskView::of(&task));
        self.p.tasks.push(task);
    }

    /// Index of task `id` in `p.tasks`.
    pub fn task_index(&self, id: &str) -> Option<usize> {
        self.task_index.get(id).copied()
    }

    pub fn task_view(&self, t: usize) -> &TaskView {
        &self.task_views[t]
    }

    /// The newest progress record of task `t` (of any relay holding it).
    pub fn task_progress(&self, t: usize) -> Option<&TaskProgress> {
        self.task_views[t]
            .progress
            .values()
            .filter_map(|&i| self.p.results[i].record.progress.as_ref())
            .max_by_key(|p| p.seq)
    }

    pub fn task_summary(&self, t: usize) -> TaskSummary {
        let task = &self.p.tasks[t];
        let view = &self.task_views[t];
        let cmd = self.command(&task.id);
        let holders: HashSet<&str> = if task.leases.is_empty() {
            [task.relay_id.as_str()].into_iter().collect()
        } else {
            task.leases.iter().map(|l| l.relay_id.as_str()).collect()
        };
        let progress: Vec<&TaskProgress> = view
            .progress
            .values()
            .filter_map(|&i| self.p.results[i].record.progress.as_ref())
            .collect();
        let targets = view.targets;
        let (status, reason, total) = if holders.len() <= 1 && !self.cloud_answered(t) {
            // One relay holds the task: its own word, as it reports it.
            let latest = progress.iter().max_by_key(|p| p.seq);
            let rejection = cmd
                .and_then(|c| c.result.as_ref())
                .filter(|r| r.result == Outcome::Failure);
            let (status, reason) = match (latest, rejection) {
                (Some(p), _) => (p.status.clone(), String::new()),
                (None, Some(r)) => ("rejected".to_owned(), r.reason.clone()),
                (None, None) => {
                    let acked = cmd.is_some_and(|c| c.state >= CommandState::Acked);
                    let s = if acked { "scheduled" } else { "queued" };
                    (s.to_owned(), String::new())
                }
            };
            let total = latest.map_or(targets, |p| p.total);
            (status, reason, total)
        } else {
            (
                self.fleet_status(t, &progress, targets),
                String::new(),
                targets,
            )
        };
        TaskSummary {
            id: task.id.clone(),
            name: task.spec.name.clone(),
            kind: task.spec.kind.clone(),
            relay_id: task.relay_id.clone(),
            status,
            reason,
            total,
            success: view.success,
            failure: view.failure,
            not_applicable: view.not_applicable,
            in_progress: progress
                .iter()
                .filter(|p| p.status == "executing")
                .map(|p| p.in_progress)
                .sum(),
            at: task.spec.at.clone(),
            created_at: fmt_time(task.created_at),
            progress_seq: progress.iter().map(|p| p.seq).max().unwrap_or(0),
            repeated_reports: view.repeats,
        }
    }

    /// Whether the cloud itself answered some target of task `t` (no relay could reach it).
    fn cloud_answered(&self, t: usize) -> bool {
        self.task_views[t]
            .results
            .iter()
            .any(|&i| self.p.results[i].relay_id.is_empty())
    }

    /// The state of a task spread over several relays: done once every target has a result,
    /// else what the relays holding it report, the busiest state first.
    fn fleet_status(&self, t: usize, progress: &[&TaskProgress], targets: u64) -> String {
        let view = &self.task_views[t];
        let has = |s: &str| progress.iter().any(|p| p.status == s);
        if view.results.len() as u64 >= targets {
            return if has("halted") { "halted" } else { "done" }.to_owned();
        }
        for s in ["executing", "scheduled", "halted", "cancelled", "rejected"] {
            if has(s) {
                return s.to_owned();
            }
        }
        let task = &self.p.tasks[t];
        let acked = task.leases.iter().any(|l| {
            self.command(&l.lease_id)
                .is_some_and(|c| c.state >= CommandState::Acked)
        });
        match (acked, view.results.is_empty()) {
            (false, true) => "queued",
            (_, false) => "executing",
            (true, true) => "scheduled",
        }
        .to_owned()
    }

    /// Replaces a tenant's device list; returns the new revision.
    pub fn set_devices(&mut self, tenant: &str, devices: Vec<DeviceEntry>) -> u64 {
        let list = self.p.device_lists.entry(tenant.to_owned()).or_default();
        list.revision += 1;
        list.devices = devices;
        list.revision
    }

    /// Revision of a tenant's device list (0 before the first).
    pub fn devices_revision(&self, tenant: &str) -> u64 {
        self.p.device_lists.get(tenant).map_or(0, |l| l.revision)
    }

    /// Takes in a device-status batch: each report replaces the device's previous one; an alarm
    /// is kept once, by id.
    pub fn ingest_device_status(
        &mut self,
        relay_id: &str,
        reports: Vec<DeviceReport>,
        alarms: Vec<Alarm>,
        stats: Vec<DeviceStats>,
    ) -> StatusOutcome {
        let mut out = StatusOutcome {
            reports: reports.len() as u64,
            ..Default::default()
        };
        self.p.stats.device_reports += out.reports;
        self.p.stats.device_stats += stats.len() as u64;
        for st in stats {
            self.p.device_stats.insert(st.address.clone(), st);
        }
        for r in reports {
            self.p.device_reports.insert(r.address.clone(), r);
        }
        for a in alarms {
            if self.seen_alarms.insert(a.id.clone()) {
                out.new_alarms += 1;
                self.p.alarms.push(StoredAlarm {
                    relay_id: relay_id.to_owned(),
                    alarm: a,
                });
            } else {
                out.duplicate_alarms += 1;
            }
        }
        self.p.stats.alarms += out.new_alarms;
        self.p.stats.duplicate_alarms += out.duplicate_alarms;
        out
    }

    /// Records a new token for a relay, dropping that relay's oldest ones beyond
    /// [`MAX_TOKENS_PER_RELAY`] and any token of any relay that can never be valid again.
    pub fn add_token(&mut self, token: String, rec: TokenRecord, now: SystemTime) {
        let tenants = &self.p.tenants;
        self.p.tokens.retain(|_, t| {
            tenants
                .get(&t.tenant_id)
                .is_some_and(|ten| ten.token_generation_valid(t.pin_generation, now))
        });
        let mut mine: Vec<(SystemTime, String)> = self
            .p
            .tokens
            .iter()
            .filter(|(_, t)| t.relay_id == rec.relay_id)
            .map(|(k, t)| (t.issued_at, k.clone()))
            .collect();
        mine.sort();
        let excess = (mine.len() + 1).saturating_sub(MAX_TOKENS_PER_RELAY);
        for (_, k) in mine.into_iter().take(excess) {
            self.p.tokens.remove(&k);
        }
        self.p.tokens.insert(token, rec);
    }

    /// The relay a valid token belongs to, or `None` (unknown, or its PIN's grace window is over).
    pub fn authenticate(&self, token: &str, now: SystemTime) -> Option<&TokenRecord> {
        let rec = self.p.tokens.get(token)?;
        let tenant = self.p.tenants.get(&rec.tenant_id)?;
        tenant
            .token_generation_valid(rec.pin_generation, now)
            .then_some(rec)
    }
}

/// How many distinct targets a list names (duplicates and surrounding blanks count once).
pub fn unique_count(targets: &[String]) -> u64 {
    targets
        .iter()
        .map(|t| t.trim())
        .collect::<HashSet<_>>()
        .len() as u64
}

/// Reads a state file. `Ok(None)` when it does not exist; an error naming the file otherwise.
pub fn load(path: &Path) -> anyhow::Result<Option<Persisted>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read state file {}", path.display()));
        }
    };
    let p: Persisted = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "state file {} is corrupt (not the cloud's JSON state)",
            path.display()
        )
    })?;
    anyhow::ensure!(
        p.format == STATE_FORMAT,
        "state file {} has format {}, this build reads format {STATE_FORMAT}",
        path.display(),
        p.format
    );
    Ok(Some(p))
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file: a temporary
/// file in the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let ctx = || format!("cannot write state file {}", path.display());
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(ctx)?;
    tmp.write_all(bytes).with_context(ctx)?;
    tmp.as_file().sync_all().with_context(ctx)?;
    tmp.persist(path).map_err(|e| e.error).with_context(ctx)?;
    // The rename is only durable once the directory entry is.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Plain words for a duration in messages: "24 hours", "30 minutes", else humantime's form.
pub fn plain_duration(d: Duration) -> String {
    let s = d.as_secs();
    let unit = |n: u64, word: &str| {
        if n == 1 {
            format!("1 {word}")
        } else {
            format!("{n} {word}s")
        }
    };
    if d.subsec_nanos() == 0 && s > 0 && s.is_multiple_of(3600) {
        unit(s / 3600, "hour")
    } else if d.subsec_nanos() == 0 && s > 0 && s.is_multiple_of(60) {
        unit(s / 60, "minute")
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// Checks that `s` looks like an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`).
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|x| x.iter().all(u8::is_ascii_digit));
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || !matches!(b[10], b'T' | b't' | b' ')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Outcome;

    const H: Duration = Duration::from_secs(3600);

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn pin_window_rules() {
        let mut t = Tenant::new("111111");
        assert_eq!(t.check_pin("111111", t0()), Ok(PinMatch::Current));
        assert_eq!(t.check_pin("999999", t0()), Err(PinRefusal::Wrong));

        let until = t.reset_pin("222222".into(), t0(), 24 * H, 24 * H).unwrap();
        assert_eq!(until, t0() + 24 * H);
        // New PIN at once; old PIN inside the grace window only.
        assert_eq!(t.check_pin("222222", t0()), Ok(PinMatch::Current));
        assert_eq!(t.check_pin("111111", t0() + H), Ok(PinMatch::Previous));
        assert_eq!(
            t.check_pin("111111", t0() + 24 * H - Duration::from_millis(1)),
            Ok(PinMatch::Previous)
        );
        assert_eq!(
            t.check_pin("111111", t0() + 24 * H),
            Err(PinRefusal::Expired(until))
        );
        assert_eq!(t.check_pin("222222", t0() + 48 * H), Ok(PinMatch::Current));
    }

    #[test]
    fn reset_cooldown() {
        let mut t = Tenant::new("111111");
        t.reset_pin("222222".into(), t0(), 24 * H, 24 * H).unwrap();
        let err = t
            .reset_pin("333333".into(), t0() + 23 * H, 24 * H, 24 * H)
            .unwrap_err();
        assert_eq!(
            err,
            ResetTooSoon {
                last_reset: t0(),
                next_allowed: t0() + 24 * H
            }
        );
        assert_eq!(t.pin, "222222", "a refused reset changes nothing");
        t.reset_pin("333333".into(), t0() + 24 * H, 24 * H, 24 * H)
            .unwrap();
        // Only the PIN just replaced is in its grace window; the one before is gone.
        assert_eq!(t.check_pin("222222", t0() + 25 * H), Ok(PinMatch::Previous));
        assert_eq!(t.check_pin("111111", t0() + 25 * H), Err(PinRefusal::Wrong));
        // No cooldown: back-to-back resets work.
        t.reset_pin("444444".into(), t0() + 24 * H, H, Duration::ZERO)
            .unwrap();
        assert_eq!(t.generation, 3);
    }

    #[test]
    fn huge_durations_do_not_panic() {
        let mut t = Tenant::new("111111");
        let until = t
            .reset_pin("2".into(), t0(), Duration::MAX, Duration::MAX)
            .unwrap();
        assert!(fmt_time(until).starts_with("9999-12-31T23:59:59"));
        assert!(t.reset_pin("3".into(), t0() + H, H, Duration::MAX).is_err());
        assert_eq!(fmt_time(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    fn db_with_tenant() -> Db {
        let mut p = Persisted::default();
        p.tenants.insert("acme".into(), Tenant::new("111111"));
        Db::new(p)
    }

    fn token(relay: &str, generation: u64, at: SystemTime) -> TokenRecord {
        TokenRecord {
            relay_id: relay.into(),
            tenant_id: "acme".into(),
            pin_generation: generation,
            old_pin: false,
            issued_at: at,
        }
    }

    #[test]
    fn tokens_die_with_their_pin() {
        let mut db = db_with_tenant();
        db.add_token("before-reset".into(), token("r1", 0, t0()), t0());
        assert!(db.authenticate("before-reset", t0()).is_some());
        assert!(db.authenticate("nope", t0()).is_none());

        let tenant = db.p.tenants.get_mut("acme").unwrap();
        let until = tenant
            .reset_pin("222222".into(), t0() + H, 24 * H, 24 * H)
            .unwrap();
        // A token obtained with the old PIN during the grace window.
        let m = tenant.check_pin("111111", t0() + 2 * H).unwrap();
        let g = tenant.generation_of(m);
        assert_eq!((m, g), (PinMatch::Previous, 0));
        db.add_token(
            "with-old".into(),
            token("r2", g, t0() + 2 * H),
            t0() + 2 * H,
        );
        db.add_token(
            "with-new".into(),
            token("r3", 1, t0() + 2 * H),
            t0() + 2 * H,
        );

        let just_before = until - Duration::from_millis(1);
        for k in ["before-reset", "with-old", "with-new"] {
            assert!(
                db.authenticate(k, just_before).is_some(),
                "{k} inside the grace window"
            );
        }
        assert!(db.authenticate("before-reset", until).is_none());
        assert!(db.authenticate("with-old", until).is_none());
        assert!(db.authenticate("with-new", until + 100 * H).is_some());

        // Dead tokens are dropped at the next registration.
        db.add_token("later".into(), token("r3", 1, until), until);
        assert_eq!(db.p.tokens.len(), 2);
    }

    #[test]
    fn tokens_per_relay_are_capped() {
        let mut db = db_with_tenant();
        for i in 0..(MAX_TOKENS_PER_RELAY as u64 + 3) {
            let at = t0() + Duration::from_secs(i);
            db.add_token(format!("t{i}"), token("r1", 0, at), at);
        }
        db.add_token("other".into(), token("r2", 0, t0()), t0());
        assert_eq!(db.p.tokens.len(), MAX_TOKENS_PER_RELAY + 1);
        assert!(db.authenticate("t0", t0()).is_none(), "oldest dropped");
        assert!(
            db.authenticate(&format!("t{}", MAX_TOKENS_PER_RELAY + 2), t0())
                .is_some()
        );
    }

    fn result(id: &str, cmd: &str) -> ResultRecord {
        ResultRecord {
            result_id: id.into(),
            command_id: cmd.into(),
            target: None,
            name: "ping".into(),
            result: Outcome::Success,
            reason: String::new(),
            payload: serde_json::json!({"rtt_ms": 1}),
            finished_at: "2026-01-01T00:00:00Z".into(),
            progress: None,
        }
    }

    fn command(id: &str, relay: &str) -> CommandRecord {
        CommandRecord {
            id: id.into(),
            relay_id: relay.into(),
            name: "ping".into(),
            params: serde_json::json!({}),
            state: CommandState::Sent,
            result: None,
            created_at: t0(),
        }
    }

    #[test]
    fn results_are_deduplicated() {
        let mut db = db_with_tenant();
        db.add_command(command("c1", "r1"));
        db.add_command(command("c2", "r2"));
        let out = db.ingest_results(
            "r1",
            vec![result("a", "c1"), result("b", "c2"), result("a", "c1")],
        );
        assert_eq!(
            out,
            IngestOutcome {
                accepted: vec!["a".into(), "b".into(), "a".into()],
                duplicates: 1
            }
        );
        assert_eq!(db.command("c1").unwrap().state, CommandState::Done);
        assert_eq!(
            db.command("c1").unwrap().result.as_ref().unwrap().result_id,
            "a"
        );
        // A result naming another relay's command is stored but does not complete that command.
        assert_eq!(db.command("c2").unwrap().state, CommandState::Sent);

        // A retry after a lost answer changes nothing but the duplicate count.
        let before = db.p.results.clone();
        let out = db.ingest_results("r1", vec![result("a", "c1"), result("b", "c2")]);
        assert_eq!(out.duplicates, 2);
        assert_eq!(db.p.results, before);
        assert_eq!(
            (db.p.stats.results_received, db.p.stats.duplicate_results),
            (2, 3)
        );

        // An ack after the result does not move the command back.
        db.command_mut("c1").unwrap().advance(CommandState::Acked);
        assert_eq!(db.command("c1").unwrap().state, CommandState::Done);
    }

    #[test]
    fn state_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.json");
        assert!(load(&path).unwrap().is_none());

        let mut db = db_with_tenant();
        db.p.tenants
            .get_mut("acme")
            .unwrap()
            .reset_pin("222222".into(), t0(), 24 * H, 24 * H)
            .unwrap();
        db.add_token("tok".into(), token("r1", 1, t0()), t0());
        db.p.relays.insert(
            "r1".into(),
            RelayRecord {
                relay_id: "r1".into(),
                tenant_id: "acme".into(),
                hostname: "vm1".into(),
                version: "0.1.0".into(),
                fqdn: vec!["relay.corp".into()],
                addresses: vec![],
                subnets: None,
                registrations: 2,
                registered_at: t0(),
                heartbeats: 5,
                last_heartbeat: Some(t0() + Duration::from_millis(1500)),
                last_heartbeat_request: Some(HeartbeatRequest {
                    seq: 5,
                    ..Default::default()
                }),
                channel_connections: 1,
            },
        );
        db.p.last_registered = Some("r1".into());
        db.add_command(command("c1", "r1"));
        db.ingest_results("r1", vec![result("a", "c1")]);

        write_atomic(&path, &serde_json::to_vec_pretty(&db.p).unwrap()).unwrap();
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back, db.p);
        // Indexes are rebuilt: de-duplication survives the restart.
        let mut db2 = Db::new(back);
        assert_eq!(
            db2.ingest_results("r1", vec![result("a", "c1")]).duplicates,
            1
        );
        assert_eq!(db2.command("c1").unwrap().state, CommandState::Done);

        std::fs::write(&path, b"{not json").unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("cloud.json"), "{err}");
    }

    #[test]
    fn files_from_before_the_device_plane_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.json");
        let mut db = db_with_tenant();
        db.add_command(command("c1", "r1"));
        let mut v = serde_json::to_value(&db.p).unwrap();
        let m = v.as_object_mut().unwrap();
        for k in [
            "tasks",
            "device_lists",
            "device_reports",
            "alarms",
            "device_stats",
            "artifacts",
        ] {
            m.remove(k).unwrap();
        }
        let stats = m["stats"].as_object_mut().unwrap();
        for k in [
            "device_reports",
            "alarms",
            "duplicate_alarms",
            "artifacts_complete",
        ] {
            stats.remove(k).unwrap();
        }
        for t in m["tenants"].as_object_mut().unwrap().values_mut() {
            t.as_object_mut().unwrap().remove("log_upload").unwrap();
        }
        write_atomic(&path, &serde_json::to_vec(&v).unwrap()).unwrap();
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back, db.p);
    }

    #[test]
    fn task_view_follows_results() {
        let mut db = db_with_tenant();
        db.add_command(CommandRecord {
            name: TASK_COMMAND.into(),
            ..command("t1", "r1")
        });
        db.add_task(TaskRecord {
            id: "t1".into(),
            relay_id: "r1".into(),
            spec: TaskSpec {
                name: "n".into(),
                kind: "reboot".into(),
                targets: vec!["a".into(), "b".into(), "c".into()],
                payload: serde_json::json!({}),
                at: None,
                failure_threshold_pct: None,
                concurrency: None,
                target_timeout_s: None,
                task_id: None,
                lease_s: None,
                lease_id: None,
            },
            created_at: t0(),
            leases: Vec::new(),
            lease_s: None,
        });
        let target = |id: &str, t: &str, outcome: Outcome| ResultRecord {
            target: Some(t.into()),
            result: outcome,
            ..result(id, "t1")
        };
        let prog = |id: &str, seq: u64, status: &str| ResultRecord {
            progress: Some(TaskProgress {
                seq,
                status: status.into(),
                total: 3,
                ..Default::default()
            }),
            ..result(id, "t1")
        };
        let t = db.task_index("t1").unwrap();
        assert_eq!(
            db.task_summary(t).status,
            "queued",
            "sent, not acknowledged"
        );
        db.ingest_results(
            "r1",
            vec![
                target("1", "a", Outcome::Failure),
                prog("p2", 2, "executing"),
                target("2", "b", Outcome::Success),
                prog("p1", 1, "scheduled"),
                target("3", "a", Outcome::Success),
            ],
        );
        // Another relay's results for the task are stored but not counted.
        db.ingest_results("r2", vec![target("4", "c", Outcome::Failure)]);
        let s = db.task_summary(t);
        assert_eq!(
            (s.status.as_str(), s.success, s.failure, s.progress_seq),
            ("executing", 2, 0, 2)
        );
        assert_eq!(db.task_view(t).results.len(), 2);
        assert_eq!(db.command("t1").unwrap().state, CommandState::Acked);
        // Rebuilt identically from the stored results.
        let db2 = Db::new(db.p.clone());
        assert_eq!(db2.task_summary(t), s);
    }

    #[test]
    fn activity_and_words() {
        let mut r = RelayRecord {
            relay_id: "r".into(),
            tenant_id: "acme".into(),
            hostname: String::new(),
            version: String::new(),
            fqdn: vec![],
            addresses: vec![],
            subnets: None,
            registrations: 1,
            registered_at: t0(),
            heartbeats: 0,
            last_heartbeat: None,
            last_heartbeat_request: None,
            channel_connections: 0,
        };
        let ten_min = Duration::from_secs(600);
        assert!(!r.is_active(t0(), ten_min));
        r.last_heartbeat = Some(t0());
        assert!(r.is_active(t0() + Duration::from_secs(599), ten_min));
        assert!(!r.is_active(t0() + ten_min, ten_min));
        assert!(r.is_active(t0() - H, ten_min));

        assert_eq!(plain_duration(24 * H), "24 hours");
        assert_eq!(plain_duration(H), "1 hour");
        assert_eq!(plain_duration(Duration::from_secs(120)), "2 minutes");
        assert_eq!(plain_duration(Duration::from_secs(5)), "5s");

        assert!(is_rfc3339("2026-01-01T00:00:00Z"));
        assert!(is_rfc3339("2026-01-01T00:00:00.123456Z"));
        assert!(is_rfc3339("2026-01-01T00:00:00+02:00"));
        assert!(!is_rfc3339("2026-01-01"));
        assert!(!is_rfc3339("2026-01-01T00:00:00"));
        assert!(!is_rfc3339("2026-01-01T00:00:00.Z"));
        assert!(!is_rfc3339("yesterday at noon, roughly"));
    }
}
