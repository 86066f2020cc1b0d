//! The daemon: opens the store, binds listeners, runs the long-lived jobs under one supervisor, and
//! shuts everything down along one path.
//!
//! Order matters: everything that can fail on bad config or a busy state dir fails before any job
//! starts. A job that ends on its own is a bug or a fatal error (the store broke): the daemon then
//! stops the rest and exits non-zero so systemd restarts it.

use crate::cloud::CloudClient;
use crate::config::Config;
use crate::ctx::Ctx;
use crate::proxy::{self, Edge};
use crate::store::Store;
use crate::{agent, ops, reload};
use anyhow::{Context, Result, anyhow};
use std::future::Future;
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
    ready: impl FnOnce(&Ctx),
) -> Result<()> {
    // The certificate is checked before anything else starts: a relay with a bad one must not run.
    let edge = Edge::new(&config)?;
    let store = Store::open(&config.state_dir)?;
    let images = match &config.images {
        Some(cfg) => {
            let cat = crate::download::Catalog::open(cfg, &store)
                .context("cannot open the image cache")?;
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
    let devices = crate::devices::DevicePlane::new(&config.devices, &store)
        .context("cannot set up the device plane")?;
    let cloud = CloudClient::new(&config.cloud).context("cannot set up the cloud connection")?;
    let edge_listeners = match &edge {
        Some(e) => Some(e.bind().await?),
        None => None,
    };
    let admin_listener = ops::admin::bind(&config.admin.socket).await?;
    if !config.cloud.url.tls {
        warn!(url = %config.cloud.url, "cloud URL is plain http: traffic to the cloud is not encrypted (labs only)");
    }
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    let ctx = Ctx::new(
        config,
        store,
        cloud,
        relay_id,
        crate::ctx::Jobs {
            images: images.clone(),
            devices: devices.clone(),
            edge: edge.clone(),
        },
        reload_tx,
    );
    info!(
        version = env!("CARGO_PKG_VERSION"),
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
    spawn(&mut set, "agent", agent::run(ctx.clone(), jobs.clone()));
    spawn(
        &mut set,
        "admin",
        ops::admin::serve(admin_listener, ctx.clone(), jobs.clone()),
    );
    if let (Some(edge), Some(listeners)) = (edge, edge_listeners) {
        spawn(&mut set, "edge", proxy::run(edge, listeners, jobs.clone()));
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
        reload::run(ctx.clone(), reload_rx, jobs.clone()),
    );
    ready(&ctx);

    let outcome = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            info!("shutdown requested; stopping");
            Ok(())
        }
        Some(joined) = set.join_next() => Err(match joined {
            Ok((name, Ok(()))) => anyhow!("job {name} stopped unexpectedly"),
            Ok((name, Err(e))) => e.context(format!("job {name} failed")),
            Err(e) if e.is_panic() => anyhow!("a job panicked: {e}"),
            Err(e) => anyhow!("a job was cancelled: {e}"),
        }),
    };
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
    // Dropping the last handle closes the store cleanly.
    drop(ctx);
    info!("stopped");
    outcome
}

fn spawn<F>(set: &mut JoinSet<(&'static str, Result<()>)>, name: &'static str, fut: F)
where
    F: Future<Output = Result<()>> + Send + 'static,
{
    set.spawn(async move { (name, fut.await) }.instrument(info_span!("job", name)));
}
