//! The download agent: keeps the image cache in line with the manifest the cloud lists. It fetches
//! the manifest (at start, when the cloud announces a new revision, on `ucrelay images sync`, every
//! `sync_interval`), refuses it whole when it breaks a limit, and downloads what is missing.
//!
//! A file is served only once its SHA-256 matched. Downloads go to `partial/<sha256>.part`, resume
//! with HTTP Range after an interruption or a restart, are hashed as they arrive, fsync'd, then
//! renamed into `files/<sha256>` and recorded in the store. What the manifest no longer lists is
//! deleted.

mod fetch;
pub mod manifest;

use crate::cache::Catalog;
use crate::ctx::Ctx;
use crate::protocol::{ErrorCode, ImageManifest, PATH_IMAGES};
use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How soon a sync round that ran out of disk space is tried again.
const SPACE_RETRY: Duration = Duration::from_secs(5);

/// Runs the download agent until shutdown: syncs at start, on a wake-up (heartbeat revision change,
/// channel message, `ucrelay images sync`), every `sync_interval`, and retries failures with backoff.
pub async fn run(ctx: Ctx, catalog: Arc<Catalog>, shutdown: CancellationToken) -> Result<()> {
    let mut retry =
        crate::util::backoff::Backoff::new(Duration::from_secs(30), Duration::from_secs(1800));
    let limiter = fetch::RateLimit::default();
    let mut sessions = ctx.sessions.subscribe();
    loop {
        let outcome = sync_once(&ctx, &catalog, &limiter, &shutdown).await;
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let wait = match &outcome {
            Ok(true) => {
                retry.reset();
                catalog.cfg().sync_interval
            }
            Ok(false) => retry.next_delay().min(catalog.cfg().sync_interval),
            Err(e) => {
                warn!(error = %e, "image sync did not finish");
                retry.next_delay().min(catalog.cfg().sync_interval)
            }
        };
        // Short of disk space: look again soon, so the sync resumes as soon as space returns.
        let wait = if catalog
            .space_short
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            wait.min(SPACE_RETRY)
        } else {
            wait
        };
        // Outside the sync window, look again when it opens.
        let wait = match catalog.cfg().sync_window {
            Some(w) if !catalog.pending().is_empty() => {
                let until = w.minutes_until_open(crate::config::SyncWindow::now_local());
                if until > 0 {
                    Duration::from_secs(u64::from(until) * 60)
                } else {
                    wait
                }
            }
            _ => wait,
        };
        catalog.note_sync(outcome.map(|_| ()).map_err(|e| e.to_string()));
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = catalog.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            // The first registration (or a new one) is a good moment to look.
            changed = sessions.changed() => {
                if changed.is_err() { return Ok(()); }
                if sessions.borrow_and_update().is_none() { continue; }
            }
        }
    }
}

/// One sync round. Ok(true) when everything listed is synced.
async fn sync_once(
    ctx: &Ctx,
    catalog: &Arc<Catalog>,
    limiter: &fetch::RateLimit,
    shutdown: &CancellationToken,
) -> Result<bool, String> {
    catalog.start_round();
    let Some(session) = ctx.sessions.current() else {
        return Err("not registered with the cloud yet".into());
    };
    let manifest: ImageManifest = match ctx
        .cloud
        .json::<(), _>(http::Method::GET, PATH_IMAGES, Some(&session.token), None)
        .await
    {
        Ok(m) => m,
        Err(e) => {
            if e.code() == Some(ErrorCode::TokenInvalid) {
                ctx.sessions.invalidate(session.generation);
            }
            return Err(format!("cannot fetch the image manifest: {e}"));
        }
    };
    let store = ctx.store.clone();
    if let Err(why) = manifest::validate(&manifest, &catalog.cfg()) {
        warn!(revision = manifest.revision, reason = %why, "image manifest refused; the previous one stays");
        let (c, w) = (catalog.clone(), why.clone());
        let rev = manifest.revision;
        let _ = store.run(move |s| c.refuse(s, rev, &w)).await;
        return Err(format!("manifest refused: {why}"));
    }
    if manifest.revision != catalog.revision()
        || catalog.report().images.len() != manifest.images.len()
    {
        info!(
            revision = manifest.revision,
            images = manifest.images.len(),
            "applying image manifest"
        );
    }
    {
        let c = catalog.clone();
        store
            .run(move |s| c.apply(s, manifest))
            .await
            .map_err(|e| format!("cannot record the manifest: {e:#}"))?;
    }
    let pending = catalog.pending();
    if pending.is_empty() {
        return Ok(true);
    }
    if let Some(w) = catalog.cfg().sync_window
        && !w.contains(crate::config::SyncWindow::now_local())
    {
        return Err(format!(
            "{} files wait for the sync window {w} (local time)",
            pending.len()
        ));
    }
    let slots = Arc::new(Semaphore::new(catalog.cfg().parallel));
    let mut set = tokio::task::JoinSet::new();
    for (sha, size, url) in pending {
        let (ctx, catalog, limiter, slots, shutdown) = (
            ctx.clone(),
            catalog.clone(),
            limiter.clone(),
            slots.clone(),
            shutdown.clone(),
        );
        set.spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return false;
            };
            fetch::sync_file(&ctx, &catalog, &limiter, &sha, size, &url, &shutdown).await
        });
    }
    let mut all = true;
    while let Some(r) = set.join_next().await {
        all &= r.unwrap_or(false);
    }
    Ok(all)
}
