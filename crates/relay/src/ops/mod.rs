//! Local operations: the admin socket and what the CLI shows an admin (status, images, devices,
//! tasks), `doctor` and `diag`, the metrics endpoint, and the daemon's notifications to systemd.
//!
//! Operations sit above the jobs: they read what each job publishes (its report, its counters) and
//! pass on an admin's requests (sync images now, reload). No job imports `ops`.

pub mod admin;
pub mod diag;
pub mod doctor;
pub mod metrics;
pub mod report;
pub mod systemd;
pub mod views;

use crate::cache::Catalog;
use crate::ctx::Ctx;
use crate::devices::DevicePlane;
use crate::edge::Edge;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// The running relay as operations see it: the shared services ([`Ctx`], reached through `Deref`)
/// and the state each job publishes.
#[derive(Clone)]
pub struct Running {
    pub ctx: Ctx,
    /// The image cache, when the download agent runs.
    pub images: Option<Arc<Catalog>>,
    pub devices: Arc<DevicePlane>,
    /// The device-facing edge, when `[edge]` is configured.
    pub edge: Option<Arc<Edge>>,
    /// Asks the daemon to reload config and certificate; the answer comes back on the oneshot.
    pub reload: mpsc::Sender<oneshot::Sender<ReloadOutcome>>,
    /// What the last reload left waiting for a restart.
    pub reload_state: Arc<ReloadState>,
}

/// What reloads leave behind for `status`.
#[derive(Default)]
pub struct ReloadState {
    /// Settings the file changes that take effect only after a restart (field names).
    pub restart_needed: std::sync::Mutex<Vec<String>>,
}

impl std::ops::Deref for Running {
    type Target = Ctx;

    fn deref(&self) -> &Ctx {
        &self.ctx
    }
}

/// What a reload did, line by line, and whether everything asked for was applied.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReloadOutcome {
    /// True when everything the file says is in force: nothing refused, nothing waiting for a
    /// restart.
    pub ok: bool,
    /// Every line's message, in order.
    pub messages: Vec<String>,
    /// The same lines, each with what became of it.
    #[serde(default)]
    pub lines: Vec<ReloadLine>,
    /// Settings that take effect only after a restart.
    #[serde(default)]
    pub restart_needed: Vec<String>,
}

/// One line of a reload: `applied`, `refused`, `restart` or `unchanged`, and what.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReloadLine {
    pub outcome: String,
    pub message: String,
}
