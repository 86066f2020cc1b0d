//! The management agent: the relay's link to the cloud. Registration and heartbeats, the command
//! channel, the results outbox, and the artifact uploader.
//!
//! Three loops share the cloud session (`cloud::Sessions`). The heartbeat loop owns registration:
//! it is the only one that creates a session. The others use the current token and, when the cloud
//! says it is no longer valid (401), invalidate it, which wakes the heartbeat loop to register again.
//!
//! The agent knows none of the other jobs. What it needs from them (running a device command,
//! taking a task, what the heartbeat reports, passing on the revisions the cloud announces) it asks
//! through [`Dispatch`], which the daemon implements over the jobs it started.

mod artifacts;
mod channel;
mod commands;
mod heartbeat;
mod outbox;

pub use commands::record;

use crate::ctx::Ctx;
use crate::protocol::{AgentState, Command, DeviceCounts, ImageState, ResultRecord, TaskCounts};
use anyhow::Result;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What the management agent asks of the rest of the relay.
pub trait Dispatch: Send + Sync + 'static {
    /// Takes a scheduled task (a `task` command): stored durably (ack it), refused for now (answer
    /// busy), or not stored (no answer: the cloud sends it again).
    fn accept_task<'a>(&'a self, cmd: &'a Command) -> BoxFuture<'a, TaskAccept>;
    /// Runs a command that is not the agent's own (`ping` is) to its result.
    fn execute<'a>(&'a self, cmd: &'a Command) -> BoxFuture<'a, ResultRecord>;
    /// What the next heartbeat says about the other jobs.
    fn report(&self) -> JobsReport;
    /// The cloud announced the revision of the image manifest (heartbeat answer, `images_sync`).
    fn images_revision(&self, revision: u64, asked: bool);
    /// The cloud announced the revision of the device list (heartbeat answer).
    fn devices_revision(&self, revision: u64);
    /// The cloud listed the task leases this relay holds (heartbeat answer or `hello`): leases
    /// stored before `as_of` and missing from the list were taken back.
    fn leases(&self, leases: &[String], as_of: std::time::Instant);
}

/// The device subnets this relay reports: its `[devices].subnets`, or none when the device plane
/// is off.
pub fn reported_subnets(config: &crate::config::Config) -> Option<Vec<String>> {
    Some(if config.devices.enabled {
        config
            .devices
            .subnets
            .iter()
            .map(|n| n.to_string())
            .collect()
    } else {
        Vec::new()
    })
}

/// The addresses this relay reports, which the cloud places it in a site by: `[cloud].addresses`
/// when set, else the edge's listen addresses when they name one, else the host's interface
/// addresses (loopback and link-local left out).
pub fn reported_addresses(config: &crate::config::Config) -> Vec<String> {
    if !config.cloud.addresses.is_empty() {
        return config
            .cloud
            .addresses
            .iter()
            .map(|a| a.to_string())
            .collect();
    }
    let mut out: Vec<String> = Vec::new();
    if let Some(e) = &config.edge {
        for a in std::iter::once(e.listen).chain(e.legacy_http_listen) {
            let ip = a.ip();
            if !ip.is_unspecified() && !out.contains(&ip.to_string()) {
                out.push(ip.to_string());
            }
        }
    }
    if out.is_empty() {
        out = crate::util::net::interface_addresses()
            .into_iter()
            .map(|a| a.to_string())
            .collect();
    }
    out
}

/// What became of a `task` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskAccept {
    /// Stored (or its rejection stored): acknowledge it.
    Stored,
    /// Too many tasks are open; answer `busy`, the cloud sends it again later.
    Busy(String),
    /// Storing failed: no answer, the cloud sends it again.
    Failed,
}

/// The other jobs, as a heartbeat reports them.
#[derive(Debug, Clone, Default)]
pub struct JobsReport {
    pub download: AgentState,
    pub provisioning: AgentState,
    pub images: Vec<ImageState>,
    pub devices: DeviceCounts,
    pub tasks: TaskCounts,
}

/// The agent's own state, handed to [`run`].
pub struct Agent {
    pub dispatch: Arc<dyn Dispatch>,
}

/// Runs the management agent until shutdown. Expected failures (cloud down, PIN rejected) are handled
/// inside with backoff; an error here means something is broken beyond retrying (the store).
///
/// Commands that are running when shutdown comes are waited for before this returns (the daemon's
/// grace period bounds the wait); one cut short is reported as interrupted at the next start.
pub async fn run(ctx: Ctx, agent: Agent, shutdown: CancellationToken) -> Result<()> {
    let runner = commands::Runner::new(agent.dispatch.clone(), ctx.config.cloud.command_queue);
    let sessions = ctx.sessions.clone();
    // Commands a crash interrupted get their failure result; on a full disk that waits for space
    // while everything else runs.
    let recovery = async {
        loop {
            match commands::recover_interrupted(&ctx).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.downcast_ref::<crate::store::StoreError>()
                        .is_some_and(|s| s.is_transient()) =>
                {
                    tracing::warn!(error = %format!("{e:#}"), "interrupted commands wait for the store");
                    if !crate::util::backoff::sleep_or_shutdown(
                        std::time::Duration::from_secs(2),
                        &shutdown,
                    )
                    .await
                    {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    };
    let loops = tokio::try_join!(
        recovery,
        heartbeat::run(
            ctx.clone(),
            sessions.clone(),
            agent.dispatch.clone(),
            shutdown.clone()
        ),
        channel::run(
            ctx.clone(),
            sessions.clone(),
            &runner,
            agent.dispatch.as_ref(),
            shutdown.clone()
        ),
        outbox::run(ctx.clone(), sessions.clone(), shutdown.clone()),
        artifacts::run(ctx.clone(), sessions.clone(), shutdown.clone()),
    );
    runner.drain().await;
    loops.map(|_| ())
}
