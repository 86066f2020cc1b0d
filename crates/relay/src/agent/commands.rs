//! Commands from the channel: stored before they are acknowledged, run, and their result stored in
//! the outbox in the same transaction that drops them from the inbox.
//!
//! `ping` is the agent's own command; every other one goes to [`Dispatch::execute`], which knows
//! the device commands, task edits and `relay_status`, and answers an unknown name
//! `not_applicable`, so a newer cloud learns what this relay cannot do instead of waiting.
//!
//! Every command runs as a task on the [`Runner`]'s tracker, never detached: shutdown waits for
//! them.

use super::Dispatch;
use crate::ctx::Ctx;
use crate::protocol::{Command, Outcome, RelayMessage, ResultRecord, TASK_COMMAND};
use crate::util::time::rfc3339;
use anyhow::Result;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// At most this many commands run at once; the rest wait their turn (they are already stored).
const RUNNING_MAX: usize = 64;

/// Runs the commands the channel hands over, each on a tracked task.
pub struct Runner {
    dispatch: Arc<dyn Dispatch>,
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
}

impl Runner {
    pub fn new(dispatch: Arc<dyn Dispatch>) -> Runner {
        Runner {
            dispatch,
            slots: Arc::new(Semaphore::new(RUNNING_MAX)),
            tasks: TaskTracker::new(),
        }
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

async fn accept(runner: &Runner, ctx: &Ctx, cmd: Command) -> Option<RelayMessage> {
    ctx.status.lock().commands_received += 1;
    let id = cmd.id.clone();
    // A task is stored as a task (it outlives restarts and resumes), not as a one-shot command.
    if cmd.name == TASK_COMMAND {
        let seen = {
            let id = id.clone();
            ctx.store.run(move |s| s.command_seen(&id)).await
        };
        return match seen {
            Ok(true) => Some(RelayMessage::Ack { id }),
            Ok(false) if runner.dispatch.accept_task(&cmd).await => Some(RelayMessage::Ack { id }),
            Ok(false) => None,
            Err(e) => {
                error!(command_id = %id, error = %format!("{e:#}"), "cannot read the store; not acknowledged");
                None
            }
        };
    }
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
        Err(e) => {
            // No ack: the cloud sends it again later.
            error!(command_id = %id, error = %format!("{e:#}"), "cannot store command; not acknowledged");
            return None;
        }
    }
    info!(command_id = %id, name = %cmd.name, "command received");
    let (ctx, dispatch, slots) = (ctx.clone(), runner.dispatch.clone(), runner.slots.clone());
    runner.tasks.spawn(async move {
        let Ok(_permit) = slots.acquire_owned().await else {
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
    match ctx.store.run(move |s| s.finish(&rec)).await {
        Ok(()) => {
            info!(command_id = %id, result = outcome.as_str(), "command finished");
            ctx.results_wake.notify_one();
        }
        Err(e) => {
            error!(command_id = %id, error = %format!("{e:#}"), "cannot store command result")
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
