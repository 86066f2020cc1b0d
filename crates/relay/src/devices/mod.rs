//! The device plane: device-control commands and scheduled tasks against LAN devices over their REST
//! API, and monitoring of every known device.
//!
//! Safety first: an address outside `[devices].subnets` is refused before any packet is sent, so the
//! cloud cannot use the relay as an open proxy. One request at a time per device (phones answer 403
//! to a second one), a deadline on every step, bounded concurrency everywhere.

pub mod actions;
pub mod backups;
pub mod captures;
pub mod client;
pub mod export;
pub mod health;
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
use client::{DeviceClient, DeviceError, Target};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;
use tokio::sync::{mpsc, oneshot};
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

    /// Runs one operation on one device with the device lock held and the given deadline. A
    /// payload too big for a results batch leaves as an artifact.
    pub async fn run_op(
        &self,
        target: &Target,
        password: &Secret,
        op: &actions::Op,
        deadline: std::time::Duration,
        command_id: &str,
    ) -> actions::Done {
        let deadline = deadline + op.extra_time();
        let until = std::time::Instant::now() + deadline;
        let work = async {
            let _guard = self.lock(target).await;
            if *op == actions::Op::Probe {
                return probe::probe(self, target, password).await;
            }
            match self.client.session(target, password).await {
                Ok(mut s) => {
                    let cx = actions::OpCx {
                        plane: self,
                        target,
                        command_id,
                        deadline: until,
                        password,
                    };
                    actions::perform(op, &mut s, &cx).await
                }
                Err(e) => e.into(),
            }
        };
        let mut done = match tokio::time::timeout(deadline, work).await {
            Ok(d) => d,
            Err(_) => actions::Done {
                result: Outcome::Failure,
                reason: format!(
                    "device did not finish within {}",
                    humantime::format_duration(deadline)
                ),
                payload: Value::Null,
                cause: Some(DeviceError::Timeout("the command's deadline")),
            },
        };
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
        if let Err(e) = self
            .record(vec![Write::Alarm {
                id: alarm.id.clone(),
                value,
            }])
            .await
        {
            warn!(error = %e, "cannot store an alarm");
        }
        self.registry.wake_reporter();
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

/// Group commit: writes arriving together share one transaction (one fsync).
async fn recorder(ctx: Ctx, plane: Arc<DevicePlane>, shutdown: CancellationToken) -> Result<()> {
    let Some(mut rx) = plane
        .recorder_rx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return Ok(());
    };
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = shutdown.cancelled() => None,
        };
        let Some(first) = first else {
            return Ok(());
        };
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
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
