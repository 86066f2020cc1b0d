//! Commands from the channel: stored before they are acknowledged, run, and their result stored in
//! the outbox in the same transaction that drops them from the inbox.
//!
//! Relay-level commands live here (`ping`, `relay_status`); device commands join with the device
//! plane. An unknown name is acknowledged and answered `not_applicable`, so a newer cloud learns what
//! this relay cannot do instead of waiting.

use crate::ctx::Ctx;
use crate::ops::report::StatusReport;
use crate::protocol::{
    Command, DEVICE_COMMANDS, Outcome, RelayMessage, ResultRecord, TASK_CANCEL_COMMAND,
    TASK_COMMAND, TASK_UPDATE_COMMAND,
};
use crate::util::time::rfc3339;
use anyhow::Result;
use std::sync::{Arc, LazyLock};
use std::time::SystemTime;
use tokio::sync::Semaphore;
use tracing::{error, info, warn};

/// At most this many commands run at once; the rest wait their turn (they are already stored).
static RUNNING: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(64)));

/// Takes a command off the channel. Returns the ack to send, once the command is durably stored.
pub async fn accept(ctx: &Ctx, cmd: Command) -> Option<RelayMessage> {
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
            Ok(false) if crate::devices::tasks::accept(ctx, &ctx.devices, &cmd).await => {
                Some(RelayMessage::Ack { id })
            }
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
                Ok(true)
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
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let Ok(_permit) = RUNNING.clone().acquire_owned().await else {
            return;
        };
        let rec = execute(&ctx, &cmd).await;
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
            ctx.outbox_wake.notify_one();
        }
        Err(e) => {
            error!(command_id = %id, error = %format!("{e:#}"), "cannot store command result")
        }
    }
}

fn record(
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

async fn execute(ctx: &Ctx, cmd: &Command) -> ResultRecord {
    let task_op =
        |done: crate::devices::ops::Done| record(cmd, done.result, done.reason, done.payload);
    match cmd.name.as_str() {
        name if DEVICE_COMMANDS.contains(&name) => ctx.devices.command(cmd).await,
        TASK_CANCEL_COMMAND => {
            task_op(crate::devices::tasks::cancel(&ctx.devices, &cmd.params).await)
        }
        TASK_UPDATE_COMMAND => {
            task_op(crate::devices::tasks::update(&ctx.devices, &cmd.params).await)
        }
        "ping" => record(
            cmd,
            Outcome::Success,
            "",
            serde_json::json!({ "echo": cmd.params, "relay_time": rfc3339(SystemTime::now()) }),
        ),
        "relay_status" => {
            let pending = ctx.store.run(|s| s.outbox_len()).await.unwrap_or(0);
            let report = StatusReport::build(ctx, pending);
            match serde_json::to_value(report) {
                Ok(v) => record(cmd, Outcome::Success, "", v),
                Err(e) => record(
                    cmd,
                    Outcome::Failure,
                    format!("cannot encode status: {e}"),
                    serde_json::Value::Null,
                ),
            }
        }
        other => {
            warn!(command_id = %cmd.id, name = %other, "unknown command");
            record(
                cmd,
                Outcome::NotApplicable,
                format!(
                    "unknown command {other:?} (ucrelay {} does not support it)",
                    env!("CARGO_PKG_VERSION")
                ),
                serde_json::Value::Null,
            )
        }
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
