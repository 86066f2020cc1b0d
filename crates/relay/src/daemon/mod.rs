//! The daemon: opens the store, binds listeners, runs the long-lived jobs under one supervisor, and
//! shuts everything down along one path. It is the one place that knows every job: it hands each
//! its state as the argument of its `run`, and wires the management agent to the others through
//! `dispatch::Jobs`.
//!
//! Order matters: everything that can fail on bad config or a busy state dir fails before any job
//! starts. A job that ends on its own is a bug or a fatal error (the store broke): the daemon then
//! stops the rest and exits non-zero so systemd restarts it.

use crate::cloud::CloudClient;
use crate::config::Config;
use crate::ctx::Ctx;
use crate::edge::{self, Edge};
use crate::store::Store;
use crate::util::live::Live;
use crate::{agent, ops};

mod dispatch;
pub mod reload;
use anyhow::{Context, Result, anyhow};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

/// How long jobs get to finish after shutdown starts, before they are aborted.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// Starts the relay and runs until `shutdown` is cancelled (Ok) or a job dies (Err).
/// `ready` is called once the store is open and every listener is bound.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    ready: impl FnOnce(&ops::Running),
) -> Result<()> {
    // Again for an embedder (the demo) whose runtime was built elsewhere; a no-op when repeated.
    crate::util::memory::tune();
    // `[devices]` as in force, shared by every job that reads the device subnets.
    let devices_cfg = Arc::new(Live::new(config.devices.clone()));
    // The certificate is checked before anything else starts: a relay with a bad one must not run.
    let edge = Edge::new(&config, devices_cfg.clone())?;
    let store = Store::open(&config.state_dir)?;
    let images = match &config.images {
        Some(cfg) => {
            let cat =
                crate::cache::Catalog::open(cfg, &store).context("cannot open the image cache")?;
            if let Some(e) = &edge {
                let _ = e.images.set(cat.clone());
            }
            Some(cat)
        }
        None => None,
    };
    let relay_id = store
        .relay_id()
        .context("cannot read the relay id from the store")?;
    let artifacts = crate::artifacts::Artifacts::open(
        &config.state_dir,
        config.diagnostics.artifacts_max_total,
        &store,
    )
    .context("cannot open the artifact store")?;
    let device_logs =
        crate::devlogs::DeviceLogs::open(&config.state_dir, &config.diagnostics, &store)
            .context("cannot open the device log store")?;
    if let Some(e) = &edge {
        let _ = e.artifacts.set(artifacts.clone());
        let _ = e.logs.set(device_logs.clone());
    }
    let devices = crate::devices::DevicePlane::new(
        devices_cfg.clone(),
        &store,
        artifacts.clone(),
        device_logs.clone(),
    )
    .context("cannot set up the device plane")?;
    let cloud = CloudClient::new(&config.cloud).context("cannot set up the cloud connection")?;
    let edge_listeners = match &edge {
        Some(e) => Some(e.bind().await?),
        None => None,
    };
    // Devices upload files they are asked for (packet captures) to the edge, by its name.
    if let Some(base) = edge.as_ref().and_then(|e| e.public_base()) {
        artifacts.set_upload_base(base);
    }
    let admin_listener = ops::admin::bind(&config.admin.socket).await?;
    let metrics_listener = match config.admin.metrics_listen {
        Some(addr) => Some(ops::metrics::bind(addr).await?),
        None => None,
    };
    let hup = reload::hangup().context("cannot install the SIGHUP handler")?;
    if !config.cloud.url.tls {
        warn!(url = %config.cloud.url, "cloud URL is plain http: traffic to the cloud is not encrypted (labs only)");
    }
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    let ctx = Ctx::new(
        config,
        devices_cfg,
        store,
        cloud,
        relay_id,
        artifacts,
        device_logs,
    );
    let running = ops::Running {
        ctx: ctx.clone(),
        images: images.clone(),
        devices: devices.clone(),
        edge: edge.clone(),
        reload: reload_tx,
        reload_state: Arc::default(),
    };
    let dispatch = Arc::new(dispatch::Jobs {
        running: running.clone(),
    });
    info!(
        version = crate::util::build::VERSION,
        relay_id = %ctx.relay_id,
        cloud = %ctx.config.cloud.url,
        tenant = %ctx.config.cloud.tenant_id,
        proxy = ?ctx.config.cloud.proxy.as_ref().map(|p| p.address()),
        admin_socket = %ctx.config.admin.socket.display(),
        "ucrelay starting"
    );

    // The jobs' own token, cancelled only by the supervisor: a job that ends before that is a failure,
    // never a side effect of the signal racing the job's exit.
    let jobs = CancellationToken::new();
    let mut set = JoinSet::new();
    spawn(
        &mut set,
        "agent",
        agent::run(ctx.clone(), agent::Agent { dispatch }, jobs.clone()),
    );
    spawn(
        &mut set,
        "admin",
        ops::admin::serve(admin_listener, running.clone(), jobs.clone()),
    );
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "metrics, /healthz and /ready listening");
        }
        spawn(
            &mut set,
            "metrics",
            ops::metrics::serve(listener, running.clone(), jobs.clone()),
        );
    }
    if let (Some(edge), Some(listeners)) = (edge, edge_listeners) {
        spawn(&mut set, "edge", edge::run(edge, listeners, jobs.clone()));
    }
    if let Some(cat) = images {
        spawn(
            &mut set,
            "download",
            crate::download::run(ctx.clone(), cat, jobs.clone()),
        );
    }
    spawn(
        &mut set,
        "devices",
        crate::devices::run(ctx.clone(), devices, jobs.clone()),
    );
    spawn(
        &mut set,
        "reload",
        reload::run(running.clone(), hup, reload_rx, jobs.clone()),
    );
    spawn(&mut set, "store", store_recovery(ctx.clone(), jobs.clone()));
    ready(&running);
    let mut last_status = ops::systemd::summary(&running);
    ops::systemd::ready(&last_status);

    let outcome = supervise(&running, &shutdown, &mut set, &mut last_status).await;
    ops::systemd::stopping();
    if let Err(e) = &outcome {
        error!(error = %format!("{e:#}"), "stopping the relay");
    }
    jobs.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(joined) = set.join_next().await {
            if let Ok((name, Err(e))) = joined {
                warn!(job = name, error = %format!("{e:#}"), "job ended with an error during shutdown");
            }
        }
    })
    .await;
    if drained.is_err() {
        warn!("jobs still running after {SHUTDOWN_GRACE:?}; aborting them");
        set.abort_all();
        while set.join_next().await.is_some() {}
    }
    let _ = std::fs::remove_file(&ctx.config.admin.socket);
    // Dropping the last handles closes the store cleanly.
    drop(running);
    drop(ctx);
    info!("stopped");
    outcome
}

/// The daemon's main loop: waits for the shutdown signal or a job's end, keeps systemd's status
/// line current, and pets the watchdog only after the store has answered a read in time, so a
/// relay whose store or runtime is wedged gets restarted instead of looking alive.
async fn supervise(
    ctx: &ops::Running,
    shutdown: &CancellationToken,
    set: &mut JoinSet<(&'static str, Result<()>)>,
    last_status: &mut String,
) -> Result<()> {
    let watchdog = ops::systemd::watchdog_interval();
    // Without a watchdog the tick still refreshes the status line; the interval is then arbitrary.
    let mut pet = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    pet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status_tick = tokio::time::interval(STATUS_REFRESH);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trim_tick = tokio::time::interval(MEMORY_TRIM);
    trim_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The store's answer must come well within the pet interval.
    let store_deadline = watchdog
        .map(|w| (w / 2).min(Duration::from_secs(5)))
        .unwrap_or(Duration::from_secs(5));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                info!("shutdown requested; stopping");
                return Ok(());
            }
            Some(joined) = set.join_next() => return Err(match joined {
                Ok((name, Ok(()))) => anyhow!("job {name} stopped unexpectedly"),
                Ok((name, Err(e))) => e.context(format!("job {name} failed")),
                Err(e) if e.is_panic() => anyhow!("a job panicked: {e}"),
                Err(e) => anyhow!("a job was cancelled: {e}"),
            }),
            _ = pet.tick(), if watchdog.is_some() => {
                match store_answers(ctx, store_deadline).await {
                    Ok(()) => ops::systemd::watchdog(),
                    Err(e) => warn!(error = %format!("{e:#}"), "store health check failed; not petting the systemd watchdog"),
                }
            }
            // Inline: well under a millisecond, and a blocking-pool thread would be one more arena.
            _ = trim_tick.tick() => {
                crate::util::memory::trim();
            }
            _ = status_tick.tick() => {
                let now = ops::systemd::summary(ctx);
                if now != *last_status {
                    ops::systemd::status(&now);
                    *last_status = now;
                }
            }
        }
    }
}

/// While the store refuses writes (a full disk, an I/O error), tries a tiny write every
/// [`STORE_RETRY`]: the first that commits clears the trouble, and everything waiting on the store
/// (tasks, results, refused commands) goes on by itself. Every [`FORGET_COMMANDS`] it forgets the
/// finished command ids past their keep period, so that table does not grow with the relay's
/// uptime.
async fn store_recovery(ctx: Ctx, shutdown: CancellationToken) -> Result<()> {
    let mut next_forget = tokio::time::Instant::now() + FORGET_COMMANDS;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(STORE_RETRY) => {}
        }
        if ctx.store.trouble().is_none() {
            if tokio::time::Instant::now() >= next_forget {
                next_forget = tokio::time::Instant::now() + FORGET_COMMANDS;
                match ctx.store.run(|s| s.forget_old_commands()).await {
                    Ok(0) => {}
                    Ok(n) => info!(
                        commands = n,
                        "finished command ids past their keep period forgotten"
                    ),
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "cannot forget old command ids; trying again later")
                    }
                }
            }
            continue;
        }
        match tokio::time::timeout(STORE_RETRY, ctx.store.run(|s| s.probe())).await {
            Ok(Ok(())) => info!("the store works again"),
            Ok(Err(e)) if e.is_transient() => {}
            Ok(Err(e)) => warn!(error = %format!("{e:#}"), "store probe failed"),
            Err(_) => warn!("the store did not answer a probe within {STORE_RETRY:?}"),
        }
    }
}

/// How often a store that refuses writes is tried again.
const STORE_RETRY: Duration = Duration::from_secs(2);
/// How often finished command ids past their keep period are forgotten while running.
const FORGET_COMMANDS: Duration = Duration::from_secs(3600);

/// How often the status line for systemd is recomputed (sent only when it changed).
const STATUS_REFRESH: Duration = Duration::from_secs(1);
/// How often free allocator memory goes back to the kernel (see `util::memory`).
const MEMORY_TRIM: Duration = Duration::from_secs(30);

/// The store's probe (a tiny durable write, through fsync; a read while it reports a full disk),
/// bounded by `deadline`. A refusal it gives at once (a full disk) is an answer: the relay is
/// alive and says why it refuses work, and a restart would not give the disk space back. A store
/// that does not answer in time hangs, and then only a restart can help.
async fn store_answers(ctx: &Ctx, deadline: Duration) -> Result<()> {
    match tokio::time::timeout(deadline, ctx.store.run(|s| s.probe())).await {
        Err(_) => Err(anyhow!("the store did not answer within {deadline:?}")),
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.is_transient() => Ok(()),
        Ok(Err(e)) => Err(e.into()),
    }
}

fn spawn<F>(set: &mut JoinSet<(&'static str, Result<()>)>, name: &'static str, fut: F)
where
    F: Future<Output = Result<()>> + Send + 'static,
{
    set.spawn(async move { (name, fut.await) }.instrument(info_span!("job", name)));
}
