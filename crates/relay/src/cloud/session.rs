//! The cloud session: the bearer token the management agent obtained at registration, shared by
//! every job that calls the cloud. The agent alone registers; any job that sees the token refused
//! (401) invalidates it, which wakes the agent to register again.

use std::sync::Arc;
use tokio::sync::watch;

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
    pub fn new() -> Sessions {
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

    /// Installs a new session (only the management agent registers).
    pub fn set(&self, token: String) -> Session {
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

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new()
    }
}
