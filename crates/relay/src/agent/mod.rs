//! The management agent: registration and heartbeats, the command channel, and the results outbox.
//!
//! Three loops share one [`Sessions`] cell. The heartbeat loop owns registration: it is the only one
//! that creates a session. The others use the current token and, when the cloud says it is no longer
//! valid (401), invalidate it, which wakes the heartbeat loop to register again.

mod channel;
mod commands;
mod heartbeat;
mod outbox;

use crate::ctx::Ctx;
use anyhow::Result;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A registration: the cloud's bearer token, and a generation number so that a stale 401 (about an
/// older token) cannot throw away a newer session.
#[derive(Clone, Debug)]
pub struct Session {
    pub token: Arc<str>,
    pub generation: u64,
}

pub struct Sessions {
    tx: watch::Sender<Option<Session>>,
}

impl Sessions {
    pub(crate) fn new() -> Sessions {
        Sessions {
            tx: watch::channel(None).0,
        }
    }

    pub fn current(&self) -> Option<Session> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Session>> {
        self.tx.subscribe()
    }

    fn set(&self, token: String) -> Session {
        let generation = self
            .tx
            .borrow()
            .as_ref()
            .map(|s| s.generation + 1)
            .unwrap_or(1);
        let s = Session {
            token: token.into(),
            generation,
        };
        self.tx.send_replace(Some(s.clone()));
        s
    }

    /// Drops the session if it is still the one the caller used.
    pub fn invalidate(&self, generation: u64) {
        self.tx.send_if_modified(|cur| match cur {
            Some(s) if s.generation == generation => {
                *cur = None;
                true
            }
            _ => false,
        });
    }
}

/// Runs the management agent until shutdown. Expected failures (cloud down, PIN rejected) are handled
/// inside with backoff; an error here means something is broken beyond retrying (the store).
pub async fn run(ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
    commands::recover_interrupted(&ctx).await?;
    let sessions = ctx.sessions.clone();
    tokio::try_join!(
        heartbeat::run(ctx.clone(), sessions.clone(), shutdown.clone()),
        channel::run(ctx.clone(), sessions.clone(), shutdown.clone()),
        outbox::run(ctx.clone(), sessions.clone(), shutdown.clone()),
    )?;
    Ok(())
}
