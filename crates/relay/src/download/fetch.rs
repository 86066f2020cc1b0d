//! Fetching one image file: resume from the partial file with Range, hash while writing, check the
//! SHA-256, fsync, rename into place, record it. A file that fails its hash is discarded, never kept.

use crate::cache::{Catalog, hash_file, hash_prefix, hex};
use crate::cloud::CloudError;
use crate::ctx::Ctx;
use crate::protocol::ErrorCode;
use crate::util::bytes::human_bytes;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Attempts per file in one sync round before it is marked failed (the round after retries it).
const ATTEMPTS: u32 = 5;
/// No byte for this long from the cloud: the download is abandoned and resumed.
const STALL: Duration = Duration::from_secs(30);

/// A shared byte-rate limit for all downloads from the cloud: a token bucket with half a second of
/// burst, honest at the sender. The rate is given with each call, so a reload that changes
/// `[images].bandwidth_limit` applies to the next chunk. What the WAN carries is what the limiter
/// lets through plus what is buffered ahead of it (the socket's receive buffer, and one read in
/// the HTTP reader), so each download's socket gets a small receive buffer
/// ([`RateLimit::recv_buffer`]): at any moment the bytes sent since a download began stay within
/// `limit × (elapsed + 1 s)`.
#[derive(Clone, Default)]
pub struct RateLimit {
    /// Tokens and when they were last counted; None until the first limited call.
    bucket: Arc<tokio::sync::Mutex<Option<(f64, Instant)>>>,
}

/// The bucket holds at most this many seconds of the rate.
const BURST_S: f64 = 0.5;

impl RateLimit {
    /// The receive buffer for one download's socket at `bytes_per_s` with `parallel` downloads: a
    /// tenth of a second of the rate shared among them, at least 4 KiB, at most 4 MiB; None
    /// without a limit. The kernel doubles what is asked, and the HTTP reader may hold one read
    /// of that much more, so the downloads hold at most 0.4 s of the rate ahead of the limiter;
    /// with its 0.5 s of burst that is within the one second allowed.
    pub fn recv_buffer(bytes_per_s: Option<u64>, parallel: usize) -> Option<u32> {
        let share = bytes_per_s? as f64 / 10.0 / parallel.max(1) as f64;
        Some(share.clamp(4096.0, 4.0 * 1024.0 * 1024.0) as u32)
    }

    /// Waits until `n` bytes may pass at `bytes_per_s` (no wait when unlimited).
    pub async fn take(&self, n: usize, bytes_per_s: Option<u64>) {
        let Some(r) = bytes_per_s else { return };
        let rate = r as f64;
        let mut bucket = self.bucket.lock().await;
        let now = Instant::now();
        let (tokens, last) = bucket.unwrap_or((rate * BURST_S, now));
        let mut tokens =
            (tokens + now.duration_since(last).as_secs_f64() * rate).min(rate * BURST_S);
        tokens -= n as f64;
        *bucket = Some((tokens, now));
        if tokens < 0.0 {
            // Holding the lock while waiting keeps the order fair between downloads.
            tokio::time::sleep(Duration::from_secs_f64(-tokens / rate)).await;
        }
    }
}

/// Why one download attempt failed: most failures are retried; a download the origin rules
/// refuse (see `cloud::origin`) would be refused again, so it fails the file at once.
#[derive(Debug)]
enum Fail {
    Retry(String),
    Refused(String),
}

impl From<String> for Fail {
    fn from(s: String) -> Fail {
        Fail::Retry(s)
    }
}

impl From<&str> for Fail {
    fn from(s: &str) -> Fail {
        Fail::Retry(s.to_string())
    }
}

/// Syncs one file with a few attempts; records the final state. Returns true when synced.
pub async fn sync_file(
    ctx: &Ctx,
    catalog: &Arc<Catalog>,
    limiter: &RateLimit,
    sha256: &str,
    size: u64,
    url: &str,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff =
        crate::util::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        if shutdown.is_cancelled() || !in_window(catalog) {
            return false;
        }
        match download(ctx, catalog, limiter, sha256, size, url, shutdown).await {
            Ok(()) => {
                let (c, s) = (catalog.clone(), sha256.to_string());
                return match ctx
                    .store
                    .run(move |st| c.set_state(st, &s, "synced", None))
                    .await
                {
                    Ok(()) => {
                        info!(sha256, size, "image file synced and verified");
                        true
                    }
                    Err(e) => {
                        warn!(sha256, error = %format!("{e:#}"), "cannot record a synced file");
                        false
                    }
                };
            }
            Err(Fail::Refused(why)) => {
                warn!(sha256, url, reason = %why, "image download refused; not retried until the manifest changes");
                last = why;
                break;
            }
            Err(Fail::Retry(e)) => {
                last = e;
                if shutdown.is_cancelled() {
                    return false;
                }
                let d = backoff.next_delay();
                warn!(sha256, attempt, error = %last, retry_in = ?d, "image download failed");
                if attempt < ATTEMPTS && !crate::util::backoff::sleep_or_shutdown(d, shutdown).await
                {
                    return false;
                }
            }
        }
    }
    let (c, s, why) = (catalog.clone(), sha256.to_string(), last.clone());
    let _ = ctx
        .store
        .run(move |st| c.set_state(st, &s, "failed", Some(why)))
        .await;
    false
}

async fn download(
    ctx: &Ctx,
    catalog: &Arc<Catalog>,
    limiter: &RateLimit,
    sha256: &str,
    size: u64,
    url: &str,
    shutdown: &CancellationToken,
) -> Result<(), Fail> {
    let state = catalog.file_state(sha256).ok_or("file no longer listed")?;
    let part = catalog.partial_path(sha256);
    let done_path = catalog.file_path(sha256);

    // A complete file left by a crash between rename and record: verify it instead of fetching.
    if std::fs::metadata(&done_path).map(|m| m.len()).ok() == Some(size) {
        let p = done_path.clone();
        let actual = tokio::task::spawn_blocking(move || hash_file(&p))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if actual == sha256 {
            state.done.store(size, Ordering::Relaxed);
            return Ok(());
        }
        let _ = std::fs::remove_file(&done_path);
    }

    let mut offset = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if offset > size {
        offset = 0;
        let _ = std::fs::remove_file(&part);
    }
    // Free disk before each file, with the configured headroom (saturating: the size is the
    // cloud's number and min_free the admin's, and no sum of them may wrap into "enough").
    let need = size.saturating_sub(offset);
    let free = crate::util::bytes::free_bytes(&catalog.cfg().dir)
        .map_err(|e| format!("cannot read free disk space: {e}"))?;
    if free < need.saturating_add(catalog.cfg().min_free) {
        catalog.space_short.store(true, Ordering::Relaxed);
        return Err(format!(
            "not enough free disk in {}: need {} plus {} headroom, {} free",
            catalog.cfg().dir.display(),
            human_bytes(need),
            human_bytes(catalog.cfg().min_free),
            human_bytes(free)
        )
        .into());
    }

    // The bytes already on disk count towards the hash.
    let mut hasher = Sha256::new();
    if offset > 0 {
        let p = part.clone();
        let (h, n) = tokio::task::spawn_blocking(move || hash_prefix(&p))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot read the partial file: {e}"))?;
        hasher = h;
        offset = n;
    }
    state.done.store(offset, Ordering::Relaxed);

    if offset < size {
        let token = ctx.sessions.current().map(|s| s.token);
        let lan = ctx.devices_cfg.get().subnets.clone();
        let cfg = catalog.cfg();
        let resp = ctx
            .cloud
            .with_recv_buffer(RateLimit::recv_buffer(cfg.bandwidth_limit, cfg.parallel))
            .get_file(url, token.as_deref(), offset, &lan)
            .await
            .map_err(|e| {
                if e.code() == Some(ErrorCode::TokenInvalid)
                    && let Some(s) = ctx.sessions.current()
                {
                    ctx.sessions.invalidate(s.generation);
                }
                match e {
                    CloudError::Refused { .. } => Fail::Refused(format!("download of {url} {e}")),
                    e => Fail::Retry(format!("download of {url}: {e}")),
                }
            })?;
        let status = resp.status().as_u16();
        let mut file = match status {
            206 => {
                let start = content_range_start(resp.headers());
                if start != Some(offset) {
                    return Err(format!(
                        "cloud answered a range starting at {start:?}, asked for {offset}"
                    )
                    .into());
                }
                tokio::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&part)
                    .await
            }
            200 => {
                if offset > 0 {
                    info!(
                        sha256,
                        offset, "cloud ignored the range; downloading from the start"
                    );
                }
                offset = 0;
                hasher = Sha256::new();
                state.done.store(0, Ordering::Relaxed);
                tokio::fs::File::create(&part).await
            }
            416 => {
                let _ = std::fs::remove_file(&part);
                return Err("cloud refused the resume range (416); starting over".into());
            }
            s => return Err(format!("download of {url}: answered {s}").into()),
        }
        .map_err(|e| format!("cannot open {}: {e}", part.display()))?;
        let mut body = resp.into_body();
        let mut got = offset;
        loop {
            let frame = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = file.flush().await;
                    return Err("relay shutting down; the download resumes at the next start".into());
                }
                f = tokio::time::timeout(STALL, body.frame()) => f,
            };
            let frame = match frame {
                Err(_) => {
                    return Err(format!(
                        "no data from the cloud for {}s; will resume",
                        STALL.as_secs()
                    )
                    .into());
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(format!("download broke at byte {got}: {e}; will resume").into());
                }
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if got.saturating_add(data.len() as u64) > size {
                drop(file);
                let _ = std::fs::remove_file(&part);
                return Err(
                    format!("cloud sent more than the listed {size} bytes; discarded").into(),
                );
            }
            if !in_window(catalog) {
                let _ = file.flush().await;
                return Err("the sync window closed; the download resumes when it opens".into());
            }
            limiter
                .take(data.len(), catalog.cfg().bandwidth_limit)
                .await;
            // A full disk mid-file: the partial file stays for the resume, never served.
            file.write_all(&data)
                .await
                .map_err(|e| write_error(catalog, &part, &e))?;
            hasher.update(&data);
            got += data.len() as u64;
            state.done.store(got, Ordering::Relaxed);
            catalog
                .stats
                .bytes_fetched
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        file.flush()
            .await
            .map_err(|e| write_error(catalog, &part, &e))?;
        file.sync_all()
            .await
            .map_err(|e| write_error(catalog, &part, &e))?;
        if got != size {
            return Err(format!("download ended at {got} of {size} bytes; will resume").into());
        }
    }

    let actual = hex(&hasher.finalize());
    if actual != sha256 {
        let _ = std::fs::remove_file(&part);
        state.done.store(0, Ordering::Relaxed);
        return Err(format!(
            "SHA-256 mismatch: the manifest says {sha256}, the download is {actual}; discarded"
        )
        .into());
    }
    std::fs::rename(&part, &done_path)
        .map_err(|e| format!("cannot move the verified file into place: {e}"))?;
    if let Some(dir) = done_path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Says why a write to the partial file failed; a full disk marks the round short of space.
fn write_error(catalog: &Catalog, part: &std::path::Path, e: &std::io::Error) -> String {
    if matches!(
        e.raw_os_error(),
        Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT)
    ) {
        catalog.space_short.store(true, Ordering::Relaxed);
        format!(
            "not enough free disk: cannot write {}: {e}; the partial file is kept and the download resumes when space returns",
            part.display()
        )
    } else {
        format!("cannot write {}: {e}", part.display())
    }
}

fn in_window(catalog: &Catalog) -> bool {
    catalog
        .cfg()
        .sync_window
        .is_none_or(|w| w.contains(crate::config::SyncWindow::now_local()))
}

fn content_range_start(h: &http::HeaderMap) -> Option<u64> {
    let v = h.get(http::header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.strip_prefix("bytes ")?;
    rest.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONTENT_RANGE,
            "bytes 100-199/200".parse().unwrap(),
        );
        assert_eq!(content_range_start(&h), Some(100));
        h.insert(http::header::CONTENT_RANGE, "bytes */200".parse().unwrap());
        assert_eq!(content_range_start(&h), None);
    }

    #[tokio::test]
    async fn rate_limit_paces() {
        let rl = RateLimit::default();
        let t = Instant::now();
        for _ in 0..3 {
            rl.take(100_000, Some(100_000)).await;
        }
        // Half a second of burst, then 100 KB/s.
        assert!(
            t.elapsed() >= Duration::from_millis(2400),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(RateLimit::recv_buffer(Some(100_000), 1), Some(10_000));
        assert_eq!(RateLimit::recv_buffer(Some(1000), 2), Some(4096));
        assert_eq!(RateLimit::recv_buffer(None, 2), None);
    }
}
