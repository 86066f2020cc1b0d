//! Commands from the channel: stored before they are acknowledged, run, and their result stored in
//! the outbox in the same transaction that drops them from the inbox.
//!
//! `ping` is the agent's own command; every other one goes to [`Dispatch::execute`], which knows
//! the device commands, task edits and `relay_status`, and answers an unknown name
//! `not_applicable`, so a newer cloud learns what this relay cannot do instead of waiting.
//!
//! Every command runs as a task on the [`Runner`]'s tracker, never detached: shutdown waits for
//! them.
//!
//! A command takes a queue slot before it is stored and acknowledged (`[cloud].command_queue`
//! slots, held until its result is stored). With every slot taken the relay answers the frame with
//! an `error` of code `busy` and keeps nothing: the cloud still owns the command and sends it again
//! later, backing off. So a flood from the cloud costs the relay a bounded queue, never unbounded
//! memory or store.

use super::{Dispatch, TaskAccept};
use crate::ctx::Ctx;
use crate::protocol::{
    ChannelErrorCode, Command, Outcome, RelayMessage, ResultRecord, TASK_COMMAND,
};
use crate::util::time::rfc3339;
use anyhow::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// At most this many commands run at once; the rest wait their turn (they are already stored).
const RUNNING_MAX: usize = 64;

/// Runs the commands the channel hands over, each on a tracked task.
pub struct Runner {
    dispatch: Arc<dyn Dispatch>,
    /// Commands held (waiting or running); a command takes one before it is stored.
    queue: Arc<Semaphore>,
    queue_size: usize,
    /// Commands running.
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
    /// A command was refused because the store could not take it: once the store works again the
    /// channel reconnects, so the cloud sends it again.
    refused: AtomicBool,
}

impl Runner {
    pub fn new(dispatch: Arc<dyn Dispatch>, queue_size: usize) -> Runner {
        Runner {
            dispatch,
            queue: Arc::new(Semaphore::new(queue_size)),
            queue_size,
            slots: Arc::new(Semaphore::new(RUNNING_MAX.min(queue_size))),
            tasks: TaskTracker::new(),
            refused: AtomicBool::new(false),
        }
    }

    /// True (once) when commands were refused for want of storage and the store works again:
    /// the channel should reconnect so that the cloud sends them again.
    pub fn take_refused_if_recovered(&self, ctx: &Ctx) -> bool {
        self.refused.load(Ordering::Relaxed)
            && ctx.store.trouble().is_none()
            && self.refused.swap(false, Ordering::Relaxed)
    }

    fn refuse(&self, ctx: &Ctx, id: String, why: String) -> Option<RelayMessage> {
        self.refused.store(true, Ordering::Relaxed);
        let reason = ctx.store.trouble().map(|t| t.message).unwrap_or(why);
        warn!(command_id = %id, reason = %reason, "command refused: it cannot be stored now");
        Some(RelayMessage::Error {
            id: Some(id),
            code: ChannelErrorCode::StorageUnavailable,
            message: format!("not acknowledged: {reason}"),
        })
    }

    /// Waits for every command that started to finish.
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Takes a command off the channel. Returns the ack to send, once the command is durably
    /// stored.
    pub async fn accept(&self, ctx: &Ctx, cmd: Command) -> Option<RelayMessage> {
        accept(self, ctx, cmd).await
    }
}

/// The answer to a command the relay cannot take now.
fn busy(ctx: &Ctx, id: String, why: String) -> RelayMessage {
    ctx.status.lock().commands_busy += 1;
    warn!(command_id = %id, "{why}");
    RelayMessage::Error {
        id: Some(id),
        code: ChannelErrorCode::Busy,
        message: why,
    }
}

async fn accept(runner: &Runner, ctx: &Ctx, cmd: Command) -> Option<RelayMessage> {
    ctx.status.lock().commands_received += 1;
    let id = cmd.id.clone();
    let seen = {
        let id = id.clone();
        ctx.store.run(move |s| s.command_seen(&id)).await
    };
    match seen {
        // Sent again after a lost ack: acknowledged again, never run twice, no slot needed.
        Ok(true) => {
            info!(command_id = %id, "command already received; acknowledging again without running it");
            return Some(RelayMessage::Ack { id });
        }
        Ok(false) => {}
        Err(e) if e.is_transient() => return runner.refuse(ctx, id, e.to_string()),
        Err(e) => {
            error!(command_id = %id, error = %format!("{e:#}"), "cannot read the store; not acknowledged");
            return None;
        }
    }
    // A task is stored as a task (it outlives restarts and resumes), not as a one-shot command.
    if cmd.name == TASK_COMMAND {
        return match runner.dispatch.accept_task(&cmd).await {
            TaskAccept::Stored => Some(RelayMessage::Ack { id }),
            TaskAccept::Busy(why) => Some(busy(ctx, id, why)),
            // The store refuses writes for now (a full disk): refused with the reason.
            TaskAccept::Failed if ctx.store.trouble().is_some() => {
                runner.refuse(ctx, id, "the task cannot be stored".into())
            }
            TaskAccept::Failed => None,
        };
    }
    let Ok(permit) = runner.queue.clone().try_acquire_owned() else {
        let why = format!(
            "relay busy: {} commands are queued or running ([cloud].command_queue); not stored, send it again later",
            runner.queue_size
        );
        return Some(busy(ctx, id, why));
    };
    let stored = {
        let cmd = cmd.clone();
        ctx.store
            .run(move |s| {
                if s.command_seen(&cmd.id)? {
                    return Ok(false);
                }
                s.inbox_put(&cmd)?;
                Ok::<_, crate::store::StoreError>(true)
            })
            .await
    };
    match stored {
        Ok(false) => {
            info!(command_id = %id, "command already received; acknowledging again without running it");
            return Some(RelayMessage::Ack { id });
        }
        Ok(true) => {}
        Err(e) if e.is_transient() => return runner.refuse(ctx, id, e.to_string()),
        Err(e) => {
            // No ack: the cloud sends it again later.
            error!(command_id = %id, error = %format!("{e:#}"), "cannot store command; not acknowledged");
            return None;
        }
    }
    info!(command_id = %id, name = %cmd.name, "command received");
    let (ctx, dispatch, slots) = (ctx.clone(), runner.dispatch.clone(), runner.slots.clone());
    runner.tasks.spawn(async move {
        // The queue slot is held until the result is stored.
        let _queued = permit;
        let Ok(_running) = slots.acquire_owned().await else {
            return;
        };
        let rec = execute(dispatch.as_ref(), &cmd).await;
        finish(&ctx, rec).await;
    });
    Some(RelayMessage::Ack { id })
}

async fn finish(ctx: &Ctx, rec: ResultRecord) {
    let id = rec.command_id.clone();
    let outcome = rec.result;
    let mut backoff = crate::util::backoff::Backoff::new(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(10),
    );
    loop {
        let r = rec.clone();
        match ctx.store.run(move |s| s.finish(&r)).await {
            Ok(()) => {
                info!(command_id = %id, result = outcome.as_str(), "command finished");
                ctx.results_wake.notify_one();
                return;
            }
            // The store refuses writes for now (full disk): the result waits in memory. If the
            // relay stops meanwhile, the command is reported as interrupted at the next start.
            Err(e) if e.is_transient() => {
                let d = backoff.next_delay();
                warn!(command_id = %id, error = %format!("{e:#}"), retry_in = ?d, "cannot store a command result yet");
                tokio::time::sleep(d).await;
            }
            Err(e) => {
                error!(command_id = %id, error = %format!("{e:#}"), "cannot store command result");
                return;
            }
        }
    }
}

/// A result for a relay-level command (no target).
pub fn record(
    cmd: &Command,
    result: Outcome,
    reason: impl Into<String>,
    payload: serde_json::Value,
) -> ResultRecord {
    ResultRecord {
        result_id: uuid::Uuid::new_v4().to_string(),
        command_id: cmd.id.clone(),
        target: None,
        name: cmd.name.clone(),
        result,
        reason: reason.into(),
        payload,
        finished_at: rfc3339(SystemTime::now()),
        progress: None,
    }
}

async fn execute(dispatch: &dyn Dispatch, cmd: &Command) -> ResultRecord {
    match cmd.name.as_str() {
        "ping" => record(
            cmd,
            Outcome::Success,
            "",
            serde_json::json!({ "echo": cmd.params, "relay_time": rfc3339(SystemTime::now()) }),
        ),
        _ => dispatch.execute(cmd).await,
    }
}

/// Commands that were acknowledged but whose result was never stored (the relay died while running
/// them) get a failure result: never run twice, never silently lost.
pub async fn recover_interrupted(ctx: &Ctx) -> Result<()> {
    let pending = ctx.store.run(|s| s.inbox_all()).await?;
    for cmd in pending {
        warn!(command_id = %cmd.id, name = %cmd.name, "command interrupted by a relay restart; reporting failure");
        let rec = record(
            &cmd,
            Outcome::Failure,
            "interrupted by a relay restart; not run again",
            serde_json::Value::Null,
        );
        ctx.store.run(move |s| s.finish(&rec)).await?;
    }
    Ok(())
}
