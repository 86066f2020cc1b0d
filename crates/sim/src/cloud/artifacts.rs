//! Artifacts at the reference cloud: the files relays hand over outside the results path
//! (captures, exports, log bundles), uploaded in chunks that resume after an interruption.
//!
//! - `POST /relay/v1/artifacts` takes an `ArtifactOffer` and answers what the cloud holds of it
//!   (nothing yet, or the bytes from an earlier attempt). Offering it again is harmless; another
//!   size or hash under the same id is a conflict.
//! - `GET /relay/v1/artifacts/{id}` answers the same status: `received` is where the next chunk
//!   starts.
//! - `PUT /relay/v1/artifacts/{id}` with `Content-Range: bytes FIRST-LAST/SIZE` appends a chunk;
//!   FIRST must be `received` (else 409 with the offset in the message). Bytes are written to disk
//!   as they arrive and fsync'd, so a chunk cut short still counts for what arrived: the offset is
//!   the length of the file on disk, which is also what survives a `kill -9`. With the last byte
//!   the cloud hashes the file: the announced SHA-256 makes it `complete`; anything else is
//!   dropped and answered 422 `checksum_mismatch`.
//!
//! The files live beside the state file (`<state-file>.artifacts/`), or in a temporary directory
//! without one. Test hooks: `GET /sim/artifacts`, `GET /sim/artifacts/{id}[/content]`, and
//! `POST /sim/artifacts/faults` (`stall_after`: stop reading uploads once the cloud holds that many
//! bytes of an artifact, as a dying cloud would; `corrupt_next`: flip a byte of the next chunk).

use super::Shared;
use super::api::{
    ApiError, ApiResult, bearer_relay, fault_gate, parse, parse_or_empty, persist, read_body,
};
use super::state::{ArtifactRecord, fmt_time};
use crate::protocol::{ArtifactOffer, ArtifactStatus, ErrorCode, PATH_ARTIFACTS};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt as _;
use tracing::{info, warn};

/// Largest artifact taken.
pub const MAX_ARTIFACT: u64 = 512 << 20;

/// Where the bytes are kept, and one lock per artifact so that two uploads of the same file
/// never interleave.
pub(crate) struct ArtifactFiles {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    busy: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ArtifactFiles {
    pub fn open(state_file: Option<&std::path::Path>) -> anyhow::Result<ArtifactFiles> {
        use anyhow::Context as _;
        let (dir, tmp) = match state_file {
            Some(f) => {
                let mut name = f.as_os_str().to_owned();
                name.push(".artifacts");
                (PathBuf::from(name), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("ucrelay-sim-artifacts-")
                    .tempdir()
                    .context("cannot create a directory for artifacts")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(ArtifactFiles {
            dir,
            _tmp: tmp,
            busy: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn held(&self, id: &str) -> u64 {
        std::fs::metadata(self.path(id))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }
}

/// Test hooks of the upload path; not persisted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ArtifactFaults {
    /// Stop reading an upload once the cloud holds this many bytes of the artifact (the request
    /// then hangs until the cloud shuts down).
    #[serde(default)]
    pub stall_after: Option<u64>,
    /// Flip one byte of the next chunk received.
    #[serde(default)]
    pub corrupt_next: bool,
}

fn status_of(rec: &ArtifactRecord, held: u64) -> ArtifactStatus {
    ArtifactStatus {
        artifact_id: rec.offer.artifact_id.clone(),
        size: rec.offer.size,
        received: if rec.state == "complete" {
            rec.offer.size
        } else {
            held.min(rec.offer.size)
        },
        state: rec.state.clone(),
        sha256: rec.sha256.clone(),
    }
}

fn check_offer(o: &ArtifactOffer) -> ApiResult<()> {
    let id_ok = !o.artifact_id.is_empty()
        && o.artifact_id.len() <= 100
        && o.artifact_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !id_ok {
        return Err(ApiError::bad_request(
            "artifact_id must be 1 to 100 letters, digits, '-' or '_'",
        ));
    }
    if o.name.is_empty()
        || o.name.len() > 255
        || o.name.contains(['/', '\\'])
        || o.name.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            "name must be a file name (1 to 255 characters, no slashes)",
        ));
    }
    if o.size > MAX_ARTIFACT {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::BadRequest,
            format!(
                "{} bytes; this cloud takes artifacts up to {MAX_ARTIFACT} bytes",
                o.size
            ),
        ));
    }
    if o.sha256.len() != 64
        || !o
            .sha256
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    {
        return Err(ApiError::bad_request(
            "sha256 must be 64 lower-case hex digits",
        ));
    }
    if o.kind.is_empty() || o.kind.len() > 64 {
        return Err(ApiError::bad_request("kind must be 1 to 64 characters"));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /relay/v1/artifacts`.
pub(crate) async fn offer(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(r) = fault_gate(&shared, PATH_ARTIFACTS).await {
        return r;
    }
    match offer_inner(&shared, &headers, body).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn offer_inner(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<ArtifactStatus> {
    let relay_id = bearer_relay(shared, headers)?;
    let o: ArtifactOffer = parse(&read_body(body).await?)?;
    check_offer(&o)?;
    let id = o.artifact_id.clone();
    let held = shared.artifact_files.held(&id);
    let (status, generation) = {
        let mut rt = shared.lock();
        if let Some(rec) = rt.db.p.artifacts.get(&id) {
            if rec.relay_id != relay_id || rec.offer.size != o.size || rec.offer.sha256 != o.sha256
            {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    ErrorCode::Conflict,
                    format!("artifact {id} is already known with another owner, size or SHA-256"),
                ));
            }
            return Ok(status_of(rec, held));
        }
        let empty_ok = o.size == 0 && o.sha256 == hex(&Sha256::digest([]));
        let rec = ArtifactRecord {
            relay_id,
            offer: o,
            state: if empty_ok { "complete" } else { "partial" }.into(),
            sha256: empty_ok.then(|| hex(&Sha256::digest([]))),
            bytes_received_total: 0,
            puts: 0,
            created_at: shared.now(),
            completed_at: empty_ok.then(|| shared.now()),
        };
        let status = status_of(&rec, 0);
        info!(artifact = %id, name = %rec.offer.name, kind = %rec.offer.kind, bytes = rec.offer.size, "artifact announced");
        rt.db.p.artifacts.insert(id.clone(), rec);
        (status, rt.changed())
    };
    // A stale file under a fresh id (from a state file written before it) is not this artifact's.
    if held > 0 {
        let _ = std::fs::remove_file(shared.artifact_files.path(&id));
    }
    persist(shared, generation).await?;
    Ok(status)
}

fn own_record(shared: &Shared, relay_id: &str, id: &str) -> ApiResult<ArtifactRecord> {
    let rt = shared.lock();
    match rt.db.p.artifacts.get(id) {
        Some(r) if r.relay_id == relay_id => Ok(r.clone()),
        _ => Err(ApiError::not_found(format!(
            "no artifact {id:?} from this relay"
        ))),
    }
}

/// `GET /relay/v1/artifacts/{id}`.
pub(crate) async fn status(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = fault_gate(&shared, PATH_ARTIFACTS).await {
        return r;
    }
    let relay_id = match bearer_relay(&shared, &headers) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match own_record(&shared, &relay_id, &id) {
        Ok(rec) => Json(status_of(&rec, shared.artifact_files.held(&id))).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `bytes FIRST-LAST/SIZE`.
fn content_range(headers: &HeaderMap) -> ApiResult<(u64, u64, u64)> {
    let bad = || ApiError::bad_request("Content-Range must be \"bytes FIRST-LAST/SIZE\"");
    let v = headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(bad)?;
    let rest = v.trim().strip_prefix("bytes ").ok_or_else(bad)?;
    let (range, total) = rest.split_once('/').ok_or_else(bad)?;
    let (a, b) = range.split_once('-').ok_or_else(bad)?;
    let (a, b, total): (u64, u64, u64) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
        total.trim().parse().map_err(|_| bad())?,
    );
    if b < a || b >= total {
        return Err(bad());
    }
    Ok((a, b, total))
}

/// `PUT /relay/v1/artifacts/{id}`.
pub(crate) async fn put(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    if let Some(r) = fault_gate(&shared, PATH_ARTIFACTS).await {
        return r;
    }
    match put_inner(&shared, &headers, &id, body).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn put_inner(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    id: &str,
    mut body: Body,
) -> ApiResult<ArtifactStatus> {
    let relay_id = bearer_relay(shared, headers)?;
    let rec = own_record(shared, &relay_id, id)?;
    if rec.state == "complete" {
        return Ok(status_of(&rec, rec.offer.size));
    }
    let (first, last, total) = content_range(headers)?;
    if total != rec.offer.size {
        return Err(ApiError::bad_request(format!(
            "Content-Range names a file of {total} bytes; artifact {id} has {}",
            rec.offer.size
        )));
    }
    let lock = shared.artifact_files.lock(id);
    let Ok(_guard) = lock.try_lock() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::Conflict,
            format!("another upload of artifact {id} is in progress"),
        ));
    };
    let path = shared.artifact_files.path(id);
    let held = shared.artifact_files.held(id);
    if first != held {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::Conflict,
            format!("the cloud holds {held} bytes of artifact {id}; send from byte {held}"),
        ));
    }
    let expected = last - first + 1;
    let (stall_after, corrupt) = {
        let mut rt = shared.lock();
        let f = &mut rt.artifact_faults;
        let c = std::mem::take(&mut f.corrupt_next);
        (f.stall_after, c)
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .map_err(|e| ApiError::internal(format!("cannot open the artifact file: {e}")))?;
    let mut written = 0u64;
    let mut corrupt = corrupt;
    let mut broke = None;
    while written < expected {
        let frame = match body.frame().await {
            None => break,
            Some(Err(e)) => {
                broke = Some(e.to_string());
                break;
            }
            Some(Ok(f)) => f,
        };
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        let room = (expected - written) as usize;
        if data.len() > room {
            data.truncate(room);
        }
        if let Some(limit) = stall_after {
            let at = held + written;
            if at + data.len() as u64 >= limit {
                let keep = limit.saturating_sub(at) as usize;
                let _ = file.write_all(&data[..keep.min(data.len())]).await;
                let _ = file.sync_all().await;
                written += keep.min(data.len()) as u64;
                count(shared, id, written);
                warn!(artifact = %id, held = held + written, "injected fault: artifact upload stalls here");
                shared.cancel.cancelled().await;
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Busy,
                    "cloud shutting down",
                ));
            }
        }
        if corrupt && !data.is_empty() {
            let mut v = data.to_vec();
            v[0] ^= 0xff;
            data = v.into();
            corrupt = false;
        }
        file.write_all(&data)
            .await
            .map_err(|e| ApiError::internal(format!("cannot write the artifact file: {e}")))?;
        written += data.len() as u64;
    }
    file.sync_all()
        .await
        .map_err(|e| ApiError::internal(format!("cannot sync the artifact file: {e}")))?;
    drop(file);
    count(shared, id, written);
    if let Some(why) = broke {
        return Err(ApiError::bad_request(format!(
            "the chunk broke off after {written} bytes: {why}"
        )));
    }
    if written < expected {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::Conflict,
            format!(
                "the chunk ended after {written} of {expected} bytes; the cloud holds {}",
                held + written
            ),
        ));
    }
    let now_held = held + written;
    if now_held < rec.offer.size {
        let (st, generation) = {
            let mut rt = shared.lock();
            let st = rt.db.p.artifacts.get(id).map(|r| status_of(r, now_held));
            (st, rt.changed())
        };
        persist(shared, generation).await?;
        return st.ok_or_else(|| ApiError::not_found("artifact vanished"));
    }
    // Every byte is in: check the whole file.
    let p = path.clone();
    let sha = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use std::io::Read as _;
        let mut f = std::fs::File::open(&p)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(hex(&h.finalize()));
            }
            h.update(&buf[..n]);
        }
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(format!("cannot read the artifact file: {e}")))?;
    let matched = sha == rec.offer.sha256;
    if !matched {
        let _ = std::fs::remove_file(&path);
    }
    let (st, generation) = {
        let mut rt = shared.lock();
        let now = shared.now();
        if matched {
            rt.db.p.stats.artifacts_complete += 1;
        } else {
            rt.db.p.stats.artifact_checksum_mismatches += 1;
        }
        let st = rt.db.p.artifacts.get_mut(id).map(|r| {
            if matched {
                r.state = "complete".into();
                r.sha256 = Some(sha.clone());
                r.completed_at = Some(now);
            }
            status_of(r, if matched { now_held } else { 0 })
        });
        (st, rt.changed())
    };
    persist(shared, generation).await?;
    if matched {
        info!(artifact = %id, bytes = now_held, "artifact complete; SHA-256 matches");
        st.ok_or_else(|| ApiError::not_found("artifact vanished"))
    } else {
        warn!(artifact = %id, "artifact bytes do not match the announced SHA-256; dropped");
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::ChecksumMismatch,
            format!(
                "the {now_held} bytes received hash to {sha}, not {}; send the file again",
                rec.offer.sha256
            ),
        ))
    }
}

fn count(shared: &Shared, id: &str, written: u64) {
    let mut rt = shared.lock();
    rt.db.p.stats.artifact_bytes_received += written;
    if let Some(r) = rt.db.p.artifacts.get_mut(id) {
        r.bytes_received_total += written;
        r.puts += 1;
    }
    rt.changed();
}

fn view(shared: &Shared, rec: &ArtifactRecord) -> Value {
    let o = &rec.offer;
    json!({
        "artifact_id": o.artifact_id,
        "relay_id": rec.relay_id,
        "name": o.name,
        "kind": o.kind,
        "content_type": o.content_type,
        "size": o.size,
        "sha256": o.sha256,
        "command_id": o.command_id,
        "target": o.target,
        "mac": o.mac,
        "state": rec.state,
        "received": status_of(rec, shared.artifact_files.held(&o.artifact_id)).received,
        "sha256_verified": rec.sha256,
        "bytes_received_total": rec.bytes_received_total,
        "puts": rec.puts,
        "created_at": fmt_time(rec.created_at),
        "completed_at": rec.completed_at.map(fmt_time),
    })
}

/// `GET /sim/artifacts`: every artifact, oldest first.
pub(crate) async fn sim_list(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let recs: Vec<ArtifactRecord> = shared.lock().db.p.artifacts.values().cloned().collect();
    let mut list: Vec<Value> = recs.iter().map(|r| view(&shared, r)).collect();
    list.sort_by(|a, b| a["created_at"].as_str().cmp(&b["created_at"].as_str()));
    Json(Value::Array(list))
}

/// `GET /sim/artifacts/{id}`.
pub(crate) async fn sim_get(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let rec = shared
        .lock()
        .db
        .p
        .artifacts
        .get(&id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("unknown artifact {id:?}")))?;
    Ok(Json(view(&shared, &rec)))
}

/// `GET /sim/artifacts/{id}/content`: the file, once complete.
pub(crate) async fn sim_content(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    let rec = shared.lock().db.p.artifacts.get(&id).cloned();
    match rec {
        Some(r) if r.state == "complete" => match tokio::fs::read(shared.artifact_files.path(&id))
            .await
        {
            Ok(bytes) => (
                [(header::CONTENT_TYPE, r.offer.content_type.clone())],
                bytes,
            )
                .into_response(),
            Err(e) => ApiError::internal(format!("cannot read the artifact: {e}")).into_response(),
        },
        Some(_) => ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::Conflict,
            "the artifact is not complete",
        )
        .into_response(),
        None => ApiError::not_found(format!("unknown artifact {id:?}")).into_response(),
    }
}

pub(crate) async fn sim_get_faults(State(shared): State<Arc<Shared>>) -> Json<ArtifactFaults> {
    Json(shared.lock().artifact_faults.clone())
}

pub(crate) async fn sim_set_faults(
    State(shared): State<Arc<Shared>>,
    body: Body,
) -> ApiResult<Json<ArtifactFaults>> {
    let f: ArtifactFaults = parse_or_empty(&read_body(body).await?)?;
    shared.lock().artifact_faults = f.clone();
    info!(?f, "artifact faults set");
    Ok(Json(f))
}
