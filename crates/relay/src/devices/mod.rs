//! The device plane: device-control commands and scheduled tasks against LAN devices over their REST
//! API, and monitoring of every known device.
//!
//! Safety first: an address outside `[devices].subnets` is refused before any packet is sent, so the
//! cloud cannot use the relay as an open proxy. One request at a time per device (phones answer 403
//! to a second one), a deadline on every step, bounded concurrency everywhere: one relay-wide cap
//! on device sessions (`[devices].max_sessions`) covers commands, tasks and polls together. A
//! device's key is pinned on first contact (`identity`), and a device presenting another key gets
//! no password.

pub mod actions;
pub mod backups;
pub mod captures;
pub mod client;
pub mod export;
pub mod health;
pub mod identity;
pub mod monitor;
pub mod probe;
pub mod tasks;

use crate::config::DevicesConfig;
use crate::ctx::Ctx;
use crate::protocol::{Command, Outcome, ResultRecord};
use crate::store::Write;
use crate::util::live::Live;
use crate::util::secret::Secret;
use crate::util::time::rfc3339;
use anyhow::Result;
use client::{DeviceClient, DeviceError, Session, Target};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Factory admin password of the phones, used when neither the command nor the config gives one.
pub const FACTORY_ADMIN_PASSWORD: &str = "456";
/// A result payload bigger than this goes to the cloud as an artifact, so results batches stay
/// small whatever a device returns.
pub const MAX_INLINE_PAYLOAD: usize = 32 * 1024;

/// A batch of writes for the group-commit recorder and where to say it is durable.
type Recording = (Vec<Write>, oneshot::Sender<Result<(), String>>);

/// Shared state of the device plane. Cheap to share (`Arc`).
pub struct DevicePlane {
    /// `[devices]` as in force: a reload replaces what it can apply live (subnets, the admin
    /// password, task concurrency and deadlines); read it per piece of work with [`Self::cfg`].
    cfg: Arc<Live<DevicesConfig>>,
    pub client: DeviceClient,
    pub store: crate::store::Store,
    /// Where captures, exports and large results wait for upload.
    pub artifacts: Arc<crate::artifacts::Artifacts>,
    /// The device logs the relay keeps (read for exports and `get_device_logs`).
    pub logs: Arc<crate::devlogs::DeviceLogs>,
    locks: Mutex<HashMap<Target, Weak<tokio::sync::Mutex<()>>>>,
    pub registry: monitor::Registry,
    pub tasks: tasks::Book,
    /// Pinned device keys (`identity = "tofu"`).
    pub pins: identity::Pins,
    /// Relay-wide cap on device sessions: commands, task targets and polls all take a permit.
    sessions: Arc<Semaphore>,
    /// `[devices].max_sessions` as the relay started (the semaphore's size; a change waits for a
    /// restart).
    max_sessions: usize,
    recorder: mpsc::Sender<Recording>,
    recorder_rx: Mutex<Option<mpsc::Receiver<Recording>>>,
}

impl DevicePlane {
    pub fn new(
        live: Arc<Live<DevicesConfig>>,
        store: &crate::store::Store,
        artifacts: Arc<crate::artifacts::Artifacts>,
        logs: Arc<crate::devlogs::DeviceLogs>,
    ) -> Result<Arc<DevicePlane>> {
        let (tx, rx) = mpsc::channel(4096);
        let cfg = live.get();
        Ok(Arc::new(DevicePlane {
            client: DeviceClient::new(&cfg)?,
            store: store.clone(),
            artifacts,
            logs,
            locks: Mutex::new(HashMap::new()),
            registry: monitor::Registry::load(store, &cfg)?,
            cfg: live,
            tasks: tasks::Book::load(store)?,
            pins: identity::Pins::load(store)?,
            sessions: Arc::new(Semaphore::new(cfg.max_sessions)),
            max_sessions: cfg.max_sessions,
            recorder: tx,
            recorder_rx: Mutex::new(Some(rx)),
        }))
    }

    /// `[devices]` as in force now.
    pub fn cfg(&self) -> Arc<DevicesConfig> {
        self.cfg.get()
    }

    /// Parses a target and checks it is inside the device subnets. No packet is sent either way.
    pub fn check_target(&self, s: &str) -> Result<Target, String> {
        let t = Target::parse(s)?;
        if !self.cfg().allows(t.ip) {
            return Err(format!(
                "{t} is outside [devices].subnets; refused, nothing was sent"
            ));
        }
        Ok(t)
    }

    /// The password for a device: the command's, else the configured default, else the factory one.
    pub fn password(&self, given: Option<&str>) -> Secret {
        match given {
            Some(p) if !p.is_empty() => Secret::new(p),
            _ => self
                .cfg()
                .admin_password
                .clone()
                .unwrap_or_else(|| Secret::new(FACTORY_ADMIN_PASSWORD)),
        }
    }

    /// Serialises work on one device: phones refuse a second concurrent request.
    pub async fn lock(&self, t: &Target) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            let m = match map.get(t).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(t.clone(), Arc::downgrade(&m));
                    m
                }
            };
            if map.len() > 8192 {
                map.retain(|_, w| w.strong_count() > 0);
            }
            m
        };
        m.lock_owned().await
    }

    /// Device sessions open now (each holds a permit of `[devices].max_sessions`).
    pub fn sessions_open(&self) -> usize {
        self.max_sessions - self.sessions.available_permits()
    }

    /// A device session permit, for work that holds the device lock itself (take the lock first).
    pub async fn session_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, DeviceError> {
        self.sessions
            .acquire()
            .await
            .map_err(|_| DeviceError::Timeout("the relay is stopping"))
    }

    /// Runs `work` on `target` with the device lock and a session permit held, within `deadline`
    /// (a miss is `DeviceError::Timeout(what)`). The lock comes first: a permit is never held while
    /// waiting for a device, so permit holders always progress. Waiting for the lock or a permit
    /// is the relay's own queue, not the device's slowness: it does not count against `deadline`.
    pub async fn with_device<T>(
        &self,
        target: &Target,
        deadline: Duration,
        what: &'static str,
        work: impl std::future::Future<Output = Result<T, DeviceError>>,
    ) -> Result<T, DeviceError> {
        let _guard = self.lock(target).await;
        let _permit = self.session_permit().await?;
        tokio::time::timeout(deadline, work)
            .await
            .unwrap_or(Err(DeviceError::Timeout(what)))
    }

    /// Opens a session with `target` under the identity rules. A first key (or the new key after a
    /// factory reset) is stored before this returns, so it is pinned before the first request
    /// carries the password; a refused key is recorded with its alarm.
    pub async fn open(&self, target: &Target, password: &Secret) -> Result<Session, DeviceError> {
        let pin_addr = self.client.pin_address(target);
        let expect = self
            .client
            .pins_keys()
            .then(|| self.pins.expect(&pin_addr, SystemTime::now()));
        match self.client.session(target, password, expect).await {
            Ok(s) => {
                if let Some(seen) = s.observed_key() {
                    match self.pins.observed(&pin_addr, seen) {
                        // Fail closed: a pin that is not durable would be forgotten by a restart.
                        Ok(o) => self.apply(o).await.map_err(DeviceError::Store)?,
                        // Another contact pinned a different key meanwhile: the session is
                        // dropped here, before its first request.
                        Err(pinned) => {
                            let e = DeviceError::IdentityChanged(Box::new(client::KeyChange {
                                address: pin_addr.clone(),
                                pinned,
                                seen,
                            }));
                            let mac = self.registry.mac_of(&target.to_string());
                            let o = self.pins.refused(&pin_addr, seen, mac);
                            if let Err(why) = self.apply(o).await {
                                warn!(device = %target, error = %why, "cannot store the identity change");
                            }
                            return Err(e);
                        }
                    }
                }
                Ok(s)
            }
            Err(e) => {
                if let DeviceError::IdentityChanged(change) = &e {
                    let mac = self.registry.mac_of(&target.to_string());
                    let o = self.pins.refused(&pin_addr, change.seen, mac);
                    if let Err(why) = self.apply(o).await {
                        warn!(device = %target, error = %why, "cannot store the identity change");
                    }
                }
                Err(e)
            }
        }
    }

    /// Stores a pin decision (and its alarm) in one group commit.
    async fn apply(&self, o: identity::Outcome) -> Result<(), String> {
        let mut writes = o.writes;
        let alarm = o.alarm;
        if let Some(a) = &alarm {
            writes.push(Write::Alarm {
                id: a.id.clone(),
                value: serde_json::to_vec(a).map_err(|e| e.to_string())?,
            });
        }
        if writes.is_empty() {
            return Ok(());
        }
        self.record(writes).await?;
        if alarm.is_some() {
            self.registry.alarm_stored();
        }
        Ok(())
    }

    /// Accepts a new key for the device at `address` (the admin's `ucrelay devices trust`, the
    /// cloud's `device_trust`): `fingerprint` when given, else the changed key last seen, else the
    /// pin is forgotten. Returns what was done.
    pub async fn trust(
        &self,
        address: &str,
        fingerprint: Option<&str>,
        by: identity::TrustedBy,
    ) -> Result<String, String> {
        if !self.client.pins_keys() {
            return Err(format!(
                "device keys are not pinned: [devices].identity is \"{}\"",
                self.client.identity().as_str()
            ));
        }
        let target = self.check_target(address)?;
        let fingerprint = fingerprint.map(identity::Fingerprint::parse).transpose()?;
        let pin_addr = self.client.pin_address(&target);
        let (said, o) = self.pins.trust(&pin_addr, fingerprint, by)?;
        self.apply(o)
            .await
            .map_err(|e| format!("cannot store the decision: {e}"))?;
        Ok(said)
    }

    /// The `device_trust` command from the cloud.
    pub async fn trust_command(&self, cmd: &Command) -> ResultRecord {
        let target = cmd.params.get("target").and_then(Value::as_str);
        let fingerprint = match cmd.params.get("fingerprint") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(f)) => Ok(Some(f.as_str())),
            Some(_) => Err("fingerprint must be a string of 64 hex digits".to_string()),
        };
        let outcome = match (target, fingerprint) {
            (None, _) => Err("params.target is required (the device's IP or IP:PORT)".into()),
            (_, Err(e)) => Err(e),
            (Some(t), Ok(f)) => self.trust(t, f, identity::TrustedBy::Cloud).await,
        };
        let (result, reason, payload) = match outcome {
            Ok(said) => (
                Outcome::Success,
                String::new(),
                serde_json::json!({ "done": said }),
            ),
            Err(why) => (Outcome::Failure, why, Value::Null),
        };
        ResultRecord {
            result_id: uuid::Uuid::new_v4().to_string(),
            command_id: cmd.id.clone(),
            target: target.map(|t| t.chars().take(64).collect()),
            name: cmd.name.clone(),
            result,
            reason,
            payload,
            finished_at: rfc3339(SystemTime::now()),
            progress: None,
        }
    }

    /// The identity state of the device at `address` (as the registry lists it), for
    /// `ucrelay devices`: `unpinned`, `pinned`, `changed` (a different key was refused) or
    /// `expect_new` (after a factory reset the relay ran); `off` when keys are not pinned.
    pub fn identity_of(&self, address: &str) -> Value {
        if !self.client.pins_keys() {
            return serde_json::json!({ "state": "off", "mode": self.client.identity().as_str() });
        }
        let Ok(t) = Target::parse(address) else {
            return serde_json::json!({ "state": "unpinned" });
        };
        match self.pins.get(&self.client.pin_address(&t)) {
            None => serde_json::json!({ "state": "unpinned" }),
            Some(p) => {
                let state = if p.changed.is_some() {
                    "changed"
                } else if p.expect_new_until.is_some() {
                    "expect_new"
                } else {
                    "pinned"
                };
                serde_json::json!({
                    "state": state,
                    "key": p.key,
                    "since": p.since,
                    "how": p.how,
                    "changed": p.changed,
                })
            }
        }
    }

    /// What `ucrelay devices` shows: every known device with its last poll and identity, the
    /// counts, and the device plane's limits and counters.
    pub fn report(&self) -> Value {
        use std::sync::atomic::Ordering::Relaxed;
        let reg = &self.registry;
        let mut devices = reg.list();
        for d in &mut devices {
            let id = self.identity_of(d["address"].as_str().unwrap_or(""));
            d["identity"] = id;
        }
        serde_json::json!({
            "enabled": self.cfg().enabled,
            "poll_interval_s": self.cfg().poll_interval.as_secs(),
            "identity": self.client.identity().as_str(),
            "counts": reg.counts(),
            "polls": reg.polls.load(Relaxed),
            "sessions_open": self.sessions_open(),
            "max_sessions": self.max_sessions,
            "alarms_pending": reg.pending_alarms(),
            "alarms_suppressed": reg.alarms_suppressed.load(Relaxed),
            "alarms_dropped": reg.alarms_dropped.load(Relaxed),
            "records_rejected": reg.records_rejected.load(Relaxed),
            "devices": devices,
        })
    }

    /// Runs one operation on one device with the device lock and a session permit held and the
    /// given deadline. A payload too big for a results batch leaves as an artifact.
    pub async fn run_op(
        &self,
        target: &Target,
        password: &Secret,
        op: &actions::Op,
        deadline: std::time::Duration,
        command_id: &str,
    ) -> actions::Done {
        const DEADLINE: &str = "the command's deadline";
        let deadline = deadline + op.extra_time();
        let r = self
            .with_device(target, deadline, DEADLINE, async {
                if *op == actions::Op::Probe {
                    return Ok(probe::probe(self, target, password).await);
                }
                let until = std::time::Instant::now() + deadline;
                let mut s = self.open(target, password).await?;
                let cx = actions::OpCx {
                    plane: self,
                    target,
                    command_id,
                    deadline: until,
                    password,
                };
                Ok(actions::perform(op, &mut s, &cx).await)
            })
            .await;
        let mut done = match r {
            Ok(d) => d,
            Err(e @ DeviceError::Timeout(DEADLINE)) => actions::Done {
                result: Outcome::Failure,
                reason: format!(
                    "device did not finish within {}",
                    humantime::format_duration(deadline)
                ),
                payload: Value::Null,
                cause: Some(e),
            },
            Err(e) => e.into(),
        };
        // A factory reset the relay ran: the device comes back with a new key, accept it once.
        if matches!(op, actions::Op::Reset(actions::ResetMode::Factory))
            && done.result == Outcome::Success
            && self.client.pins_keys()
        {
            let o = self.pins.expect_new(&self.client.pin_address(target));
            if let Err(e) = self.apply(o).await {
                warn!(device = %target, error = %e, "cannot store the factory reset's key expectation");
            }
        }
        // A device that answered (even with an error) is one we know about.
        if !done.cause.as_ref().is_some_and(DeviceError::is_unreachable) {
            self.registry.learn(target, None);
        }
        self.shrink(&mut done, command_id, target).await;
        done
    }

    /// Moves a payload too big for a results batch into an artifact, leaving its reference.
    async fn shrink(&self, done: &mut actions::Done, command_id: &str, target: &Target) {
        let Ok(bytes) = serde_json::to_vec(&done.payload) else {
            return;
        };
        if bytes.len() <= MAX_INLINE_PAYLOAD {
            return;
        }
        let meta = crate::artifacts::Meta::new(
            "result",
            format!(
                "{command_id}-{}.json",
                target.to_string().replace([':', '[', ']'], "_")
            ),
            "application/json",
        )
        .device(Some(target.to_string()), None)
        .command(Some(command_id.to_string()));
        done.payload = match self.artifacts.put(meta, bytes.into()).await {
            Ok(r) => {
                json!({"artifact": r, "note": "the payload was too large for a results batch; it is in the artifact"})
            }
            Err(e) => {
                done.result = Outcome::Failure;
                done.reason = format!(
                    "the result was too large for a results batch and cannot be kept as an artifact: {e}"
                );
                Value::Null
            }
        };
    }

    /// True while the store refuses writes for now (a full disk): recording can be tried again.
    pub fn store_refuses(&self) -> bool {
        self.store.trouble().is_some()
    }

    /// Stores writes in one group commit shared with other callers; returns once durable.
    pub async fn record(&self, writes: Vec<Write>) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.recorder
            .send((writes, tx))
            .await
            .map_err(|_| "the recorder has stopped".to_string())?;
        rx.await
            .map_err(|_| "the recorder has stopped".to_string())?
    }

    /// Records a health outcome of a device (configuration update, upgrade) and raises the alarm it
    /// calls for, stored until the cloud has it.
    pub async fn note_health(&self, target: &Target, mac: Option<String>, h: health::Health) {
        let Some(alarm) = self.registry.note_health(target, mac, &h) else {
            return;
        };
        warn!(device = %alarm.address, mac = ?alarm.mac, kind = %alarm.kind, "{}", alarm.message);
        let value = serde_json::to_vec(&alarm).unwrap_or_default();
        match self
            .record(vec![Write::Alarm {
                id: alarm.id.clone(),
                value,
            }])
            .await
        {
            Ok(()) => self.registry.alarm_stored(),
            Err(e) => warn!(error = %e, "cannot store an alarm"),
        }
    }

    /// Executes a command about what the relay keeps for a device (backups, logs), without
    /// contacting it.
    pub async fn relay_command(&self, cmd: &Command) -> ResultRecord {
        let done = export::kept(self, cmd).await;
        ResultRecord {
            result_id: uuid::Uuid::new_v4().to_string(),
            command_id: cmd.id.clone(),
            target: cmd
                .params
                .get("target")
                .and_then(Value::as_str)
                .map(str::to_owned),
            name: cmd.name.clone(),
            result: done.result,
            reason: done.reason,
            payload: done.payload,
            finished_at: rfc3339(SystemTime::now()),
            progress: None,
        }
    }

    /// Executes a device command from the channel (`params.target` names the device).
    pub async fn command(&self, cmd: &Command) -> ResultRecord {
        let mut rec = ResultRecord {
            result_id: uuid::Uuid::new_v4().to_string(),
            command_id: cmd.id.clone(),
            target: None,
            name: cmd.name.clone(),
            result: Outcome::Failure,
            reason: String::new(),
            payload: Value::Null,
            finished_at: String::new(),
            progress: None,
        };
        let target = cmd
            .params
            .get("target")
            .and_then(Value::as_str)
            .map(str::to_owned);
        rec.target = target.clone();
        let done = self.command_inner(cmd, target.as_deref()).await;
        rec.result = done.result;
        rec.reason = done.reason;
        rec.payload = done.payload;
        rec.finished_at = rfc3339(SystemTime::now());
        rec
    }

    async fn command_inner(&self, cmd: &Command, target: Option<&str>) -> actions::Done {
        let fail = |reason: String| actions::Done {
            result: Outcome::Failure,
            reason,
            payload: Value::Null,
            cause: None,
        };
        if !self.cfg().enabled {
            return actions::Done {
                result: Outcome::NotApplicable,
                reason: "the device plane is off: relay.toml has no [devices] section".into(),
                payload: Value::Null,
                cause: None,
            };
        }
        let Some(target) = target else {
            return fail("params.target is required (the device's IP or IP:PORT)".into());
        };
        let target = match self.check_target(target) {
            Ok(t) => t,
            Err(why) => {
                warn!(command_id = %cmd.id, device = %target, "{why}");
                return fail(why);
            }
        };
        let mut params = cmd.params.clone();
        let password = match params.as_object_mut() {
            Some(m) => {
                m.remove("target");
                match m.remove("password") {
                    Some(Value::String(p)) => Some(p),
                    Some(_) => return fail("password must be a string".into()),
                    None => None,
                }
            }
            None => None,
        };
        let op = match actions::parse(&cmd.name, &params) {
            Ok(op) => op,
            Err(why) => return fail(format!("bad parameters: {why}")),
        };
        let password = self.password(password.as_deref());
        info!(command_id = %cmd.id, device = %target, name = %cmd.name, "device command");
        let done = self
            .run_op(&target, &password, &op, self.cfg().target_timeout, &cmd.id)
            .await;
        info!(command_id = %cmd.id, device = %target, result = done.result.as_str(), reason = %done.reason, "device command finished");
        done
    }
}

/// Most recordings one transaction takes.
const RECORDER_BATCH: usize = 1024;
/// Under load the recorder waits this long for company before it commits, so a burst of pins and
/// results shares one fsync instead of paying one per handful (Postgres's `commit_delay` idea).
/// A write that comes alone commits at once.
const COMMIT_LINGER: Duration = Duration::from_millis(3);

/// Group commit: writes arriving together share one transaction (one fsync). After a batch of more
/// than one, the next batch lingers up to [`COMMIT_LINGER`] for more writes: a 50,000-target task
/// then commits about 30 times a second instead of several hundred.
async fn recorder(ctx: Ctx, plane: Arc<DevicePlane>, shutdown: CancellationToken) -> Result<()> {
    let Some(mut rx) = plane
        .recorder_rx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return Ok(());
    };
    let mut busy = false;
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = shutdown.cancelled() => None,
        };
        let Some(first) = first else {
            return Ok(());
        };
        let mut batch = vec![first];
        while batch.len() < RECORDER_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if busy {
            let linger = tokio::time::sleep(COMMIT_LINGER);
            tokio::pin!(linger);
            while batch.len() < RECORDER_BATCH {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => batch.push(m),
                        None => break,
                    },
                    _ = &mut linger => break,
                }
            }
        }
        busy = batch.len() > 1;
        let (writes, acks): (Vec<Vec<Write>>, Vec<_>) = batch.into_iter().unzip();
        let writes: Vec<Write> = writes.into_iter().flatten().collect();
        let has_results = writes
            .iter()
            .any(|w| matches!(w, Write::Result(_) | Write::CommandDone(_)));
        let outcome = ctx
            .store
            .run(move |s| s.write_batch(&writes))
            .await
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "cannot store device-plane results");
        }
        for ack in acks {
            let _ = ack.send(outcome.clone());
        }
        if has_results && outcome.is_ok() {
            ctx.results_wake.notify_one();
        }
    }
}

/// The device plane's long-lived work: the group-commit recorder, the task scheduler and monitoring.
pub async fn run(ctx: Ctx, plane: Arc<DevicePlane>, shutdown: CancellationToken) -> Result<()> {
    let mut set = tokio::task::JoinSet::new();
    // The recorder outlives the others so their last writes still land.
    let rec_stop = CancellationToken::new();
    set.spawn(recorder(ctx.clone(), plane.clone(), rec_stop.clone()));
    let work = async {
        tokio::try_join!(
            tasks::run(ctx.clone(), plane.clone(), shutdown.clone()),
            monitor::run(ctx.clone(), plane.clone(), shutdown.clone()),
            captures::run(plane.clone(), shutdown.clone()),
        )
    };
    let r = work.await;
    rec_stop.cancel();
    while set.join_next().await.is_some() {}
    r.map(|_| ())
}

/// A relay's context and device plane on a fresh state directory, for the unit tests of the
/// plane's jobs: `cloud_url` is where the cloud client points, `devices` the `[devices]` lines.
#[cfg(test)]
pub(crate) fn plane_for_test(
    cloud_url: &str,
    devices: &str,
) -> (Ctx, Arc<DevicePlane>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "state_dir = {:?}\n[cloud]\nurl = \"{cloud_url}\"\ntenant_id = \"acme\"\npin = \"123456\"\n[devices]\n{devices}",
        dir.path().join("state")
    );
    let config = crate::config::Config::from_str_at(&text, &dir.path().join("relay.toml")).unwrap();
    let store = crate::store::Store::open(&config.state_dir).unwrap();
    let artifacts = crate::artifacts::Artifacts::open(
        &config.state_dir,
        config.diagnostics.artifacts_max_total,
        &store,
    )
    .unwrap();
    let logs =
        crate::devlogs::DeviceLogs::open(&config.state_dir, &config.diagnostics, &store).unwrap();
    let live = Arc::new(Live::new(config.devices.clone()));
    let plane = DevicePlane::new(live.clone(), &store, artifacts.clone(), logs.clone()).unwrap();
    let cloud = crate::cloud::CloudClient::new(&config.cloud).unwrap();
    let ctx = Ctx::new(config, live, store, cloud, "r1".into(), artifacts, logs);
    (ctx, plane, dir)
}
