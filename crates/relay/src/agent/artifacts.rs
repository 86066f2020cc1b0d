//! The artifact uploader: hands the files in the artifact store to the cloud, oldest first, one at
//! a time, in chunks that resume where the cloud's copy ends.
//!
//! For each file: `POST /relay/v1/artifacts` announces it (again after a restart: the answer says
//! how much the cloud holds), then `PUT /relay/v1/artifacts/{id}` sends the next chunk from the
//! cloud's offset with `Content-Range`, until the cloud says `complete` with the SHA-256 it
//! computed. Only when that equals the file's own is the file deleted. An interruption (a dropped
//! connection, a cloud restart, a relay `kill -9`) costs at most the chunk in flight: the next try
//! asks for the offset and goes on from there.

use crate::cloud::{CloudError, Sessions, status_error};
use crate::ctx::Ctx;
use crate::protocol::{ArtifactOffer, ArtifactStatus, ErrorCode, PATH_ARTIFACTS};
use crate::util::backoff::Backoff;
use anyhow::Result;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Bytes per `PUT`: small enough to finish well within a request deadline on a slow WAN.
pub const CHUNK: u64 = 1024 * 1024;
/// Even without a wake-up, look at the store this often.
const SWEEP: Duration = Duration::from_secs(30);

/// Why one upload attempt stopped.
#[derive(Debug)]
enum Stop {
    Cloud(CloudError),
    /// The cloud's answer makes no sense for this file (another size, another hash).
    Mismatch(String),
    Local(String),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Cloud(e) => write!(f, "{e}"),
            Stop::Mismatch(w) | Stop::Local(w) => f.write_str(w),
        }
    }
}

impl From<CloudError> for Stop {
    fn from(e: CloudError) -> Stop {
        Stop::Cloud(e)
    }
}

pub async fn run(ctx: Ctx, sessions: Arc<Sessions>, shutdown: CancellationToken) -> Result<()> {
    let mut session_rx = sessions.subscribe();
    let mut waiting: HashMap<String, (Instant, Backoff)> = HashMap::new();
    loop {
        if let Some(session) = sessions.current() {
            let artifacts = ctx.artifacts.clone();
            let pending = tokio::task::spawn_blocking(move || artifacts.pending())
                .await?
                .unwrap_or_default();
            waiting.retain(|id, _| pending.iter().any(|o| &o.artifact_id == id));
            for offer in pending {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                if waiting
                    .get(&offer.artifact_id)
                    .is_some_and(|(at, _)| *at > Instant::now())
                {
                    continue;
                }
                let attempt = upload(&ctx, &session.token, &offer);
                let outcome = tokio::select! {
                    r = attempt => r,
                    _ = shutdown.cancelled() => return Ok(()),
                };
                match outcome {
                    Ok(()) => {
                        waiting.remove(&offer.artifact_id);
                        let id = offer.artifact_id.clone();
                        let a = ctx.artifacts.clone();
                        let _ = tokio::task::spawn_blocking(move || a.remove(&id)).await;
                        ctx.artifacts.set_upload(|u| {
                            u.uploading = None;
                            u.uploaded += 1;
                            u.last_error = None;
                        });
                        info!(artifact = %offer.artifact_id, name = %offer.name, bytes = offer.size, "artifact delivered; the cloud confirmed its SHA-256; local copy deleted");
                    }
                    Err(stop) => {
                        if let Stop::Cloud(e) = &stop
                            && e.code() == Some(ErrorCode::TokenInvalid)
                        {
                            sessions.invalidate(session.generation);
                        }
                        let entry = waiting.entry(offer.artifact_id.clone()).or_insert_with(|| {
                            (
                                Instant::now(),
                                Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
                            )
                        });
                        let d = entry.1.next_delay();
                        entry.0 = Instant::now() + d;
                        let why = stop.to_string();
                        warn!(artifact = %offer.artifact_id, name = %offer.name, error = %why, retry_in = ?d, "artifact upload stopped; it resumes from the cloud's offset");
                        ctx.artifacts.set_upload(|u| {
                            u.uploading = None;
                            u.last_error = Some(format!("{}: {why}", offer.name));
                        });
                        if sessions.current().is_none() {
                            break;
                        }
                    }
                }
            }
        }
        let next_retry = waiting
            .values()
            .map(|(at, _)| at.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(SWEEP)
            .min(SWEEP);
        tokio::select! {
            _ = ctx.artifacts.wake.notified() => {}
            changed = session_rx.changed() => if changed.is_err() { return Ok(()) },
            _ = tokio::time::sleep(next_retry) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

fn item_path(id: &str) -> String {
    format!("{PATH_ARTIFACTS}/{id}")
}

/// Reads `len` bytes at `from` of a stored artifact.
async fn read_chunk(ctx: &Ctx, id: &str, from: u64, len: u64) -> Result<Bytes, Stop> {
    use std::io::{Read, Seek, SeekFrom};
    let path = ctx.artifacts.path(id);
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)?;
        f.seek(SeekFrom::Start(from))?;
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        f.read_exact(&mut buf)?;
        Ok::<_, std::io::Error>(Bytes::from(buf))
    })
    .await
    .map_err(|e| Stop::Local(e.to_string()))?
    .map_err(|e| Stop::Local(format!("cannot read the artifact file: {e}")))
}

/// One attempt at delivering one artifact, from wherever the cloud's copy ends.
async fn upload(ctx: &Ctx, token: &str, offer: &ArtifactOffer) -> Result<(), Stop> {
    let mut st: ArtifactStatus = ctx
        .cloud
        .json(http::Method::POST, PATH_ARTIFACTS, Some(token), Some(offer))
        .await?;
    if st.received > 0 && st.state != "complete" {
        info!(artifact = %offer.artifact_id, from = st.received, of = offer.size, "resuming an artifact upload");
    }
    loop {
        if st.size != offer.size || st.received > offer.size {
            return Err(Stop::Mismatch(format!(
                "the cloud's copy does not match this file (size {} / received {} for a file of {} bytes)",
                st.size, st.received, offer.size
            )));
        }
        if st.state == "complete" {
            return match st.sha256.as_deref() {
                Some(h) if h == offer.sha256 => Ok(()),
                other => Err(Stop::Mismatch(format!(
                    "the cloud says it has the file but names SHA-256 {other:?}, not {}",
                    offer.sha256
                ))),
            };
        }
        let from = st.received;
        let len = CHUNK.min(offer.size - from);
        if len == 0 {
            return Err(Stop::Mismatch(
                "the cloud holds every byte but has not confirmed the file".into(),
            ));
        }
        let chunk = read_chunk(ctx, &offer.artifact_id, from, len).await?;
        ctx.artifacts.set_upload(|u| {
            u.uploading = Some(offer.artifact_id.clone());
            u.sent = from;
        });
        let range = format!("bytes {from}-{}/{}", from + len - 1, offer.size);
        let (status, body) = ctx
            .cloud
            .send_bytes(
                http::Method::PUT,
                &item_path(&offer.artifact_id),
                Some(token),
                chunk,
                "application/octet-stream",
                &[(http::header::CONTENT_RANGE, range)],
            )
            .await?;
        if (200..300).contains(&status) {
            st = serde_json::from_slice(&body).map_err(|e| {
                Stop::Cloud(crate::cloud::CloudError::BadBody {
                    detail: format!("artifact status: {e}"),
                    source: None,
                })
            })?;
            debug!(artifact = %offer.artifact_id, received = st.received, of = offer.size, "artifact chunk delivered");
            continue;
        }
        let e = status_error(status, &body);
        match e.code() {
            // Another offset than ours (a chunk half-stored before an interruption): ask.
            Some(ErrorCode::Conflict) => {
                st = ctx
                    .cloud
                    .json::<(), ArtifactStatus>(
                        http::Method::GET,
                        &item_path(&offer.artifact_id),
                        Some(token),
                        None,
                    )
                    .await?;
                // Same offset as before: the cloud is busy with this file; try later.
                if st.received == from && st.state != "complete" {
                    return Err(Stop::Cloud(e));
                }
            }
            // The cloud forgot it: announce it again.
            Some(ErrorCode::NotFound) => {
                st = ctx
                    .cloud
                    .json(http::Method::POST, PATH_ARTIFACTS, Some(token), Some(offer))
                    .await?;
            }
            _ => return Err(Stop::Cloud(e)),
        }
    }
}
