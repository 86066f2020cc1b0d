//! The image catalog (`--images DIR`) and the server of its files (`GET|HEAD /files/<name>`).
//!
//! Every regular file directly in DIR is one image with one file: not recursive, symbolic links
//! followed, dotfiles, empty files and names that are not plain URL path segments skipped. A file
//! is hashed once (on the blocking pool) and its hash kept while its length, mtime and inode stay
//! the same. The directory is never watched: it is rescanned (a listing and one stat per file)
//! when the manifest is asked for, on heartbeats (at most once a second) and on
//! `POST /sim/images/rescan`.
//!
//! File bodies are streamed in chunks and counted as hyper polls them, so a dropped client stops
//! the count. Test hooks (`POST /sim/images/faults`, memory only) flip one byte of chosen files,
//! pace every body to a rate, turn Range support off, or fail every request with a status.
//!
//! Hostile and CDN hooks, in the same settings: the manifest can list any URL for a file
//! (another host, loopback, a pre-signed URL with a query), `/files/<name>` can answer with a
//! redirect, and the cloud can play a CDN origin: files served without the bearer token but only
//! with the right `signature` query parameter (a pre-signed URL), refusing requests that carry
//! credentials as S3 does. Every request that carries an `Authorization` header is counted per
//! name, whatever its answer: an origin that must never see the relay's token shows 0.

use super::Shared;
use super::api::{self, ApiError, ApiResult};
use super::provisioning::http_date;
use crate::protocol::{CloudMessage, ErrorCode, Image, ImageFile, ImageManifest};
use anyhow::Context as _;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{self, Read as _};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tracing::{debug, info, warn};

/// `product` of every published image.
pub const PRODUCT: &str = "sim";
/// Prefix of the URL path under which the relay's edge serves a published file to devices.
pub const DEVICE_PREFIX: &str = "/images/";
/// Prefix of the URL (relative to the cloud) from which the relay fetches a published file.
pub const FILES_PREFIX: &str = "/files/";
/// Heartbeats rescan the directory at most this often.
pub const HEARTBEAT_RESCAN: Duration = Duration::from_secs(1);
/// Longest published name (the relay takes image ids of up to 200 characters).
const MAX_NAME: usize = 200;
/// Size of the pieces a body is sent in when it is not paced.
const CHUNK: usize = 64 * 1024;
/// A paced body goes out in pieces of about 1/PACE_SLICES of a second's worth of bytes.
const PACE_SLICES: u64 = 20;
/// Read size while hashing.
const HASH_BUF: usize = 1 << 20;
/// A file still changing after this many hashing attempts is left out of this scan.
const HASH_ATTEMPTS: usize = 3;

/// Whether a directory entry's name is published: a plain URL path segment (RFC 3986 unreserved
/// characters only, so it needs no escaping in `path` or `url`) that is not a dotfile.
pub fn is_publishable(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// What must stay the same for a cached hash to be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    len: u64,
    mtime: Option<SystemTime>,
    /// Catches a file replaced by rename with the same length and mtime (`cp -p`, `rsync`).
    ino: u64,
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> FileKey {
        #[cfg(unix)]
        let ino = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let ino = 0;
        FileKey {
            len: meta.len(),
            mtime: meta.modified().ok(),
            ino,
        }
    }
}

/// One published file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    path: PathBuf,
    key: FileKey,
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: String,
}

impl Entry {
    pub fn size(&self) -> u64 {
        self.key.len
    }

    pub fn device_path(&self) -> String {
        format!("{DEVICE_PREFIX}{}", self.name)
    }

    fn image(&self) -> Image {
        Image {
            id: self.name.clone(),
            product: PRODUCT.into(),
            version: self.sha256[..12].to_owned(),
            files: vec![ImageFile {
                path: self.device_path(),
                size: self.size(),
                sha256: self.sha256.clone(),
                url: format!("{FILES_PREFIX}{}", self.name),
            }],
        }
    }
}

#[derive(Default)]
struct Catalog {
    /// By name, which is also the image id: the manifest comes out sorted by id.
    entries: BTreeMap<String, Arc<Entry>>,
    revision: u64,
    /// End of the last successful scan.
    scanned_at: Option<Instant>,
}

/// The catalog of one cloud. Without `--images` it stays empty with revision 0.
pub struct Images {
    dir: Option<PathBuf>,
    catalog: Mutex<Catalog>,
    /// One scan at a time; taken on the blocking pool, never across an `.await`.
    scanning: Mutex<()>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The revision of a catalog: the first 8 bytes of a SHA-256 over the sorted (name, sha256) list,
/// so that the same directory gives the same revision in every process; 0 only when empty.
fn revision_of(entries: &BTreeMap<String, Arc<Entry>>) -> u64 {
    if entries.is_empty() {
        return 0;
    }
    let mut h = Sha256::new();
    for (name, e) in entries {
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update(e.sha256.as_bytes());
        h.update(b"\n");
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first).max(1)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Hashes a file; `None` when it kept changing while being read.
fn hash_file(path: &std::path::Path) -> io::Result<Option<(String, FileKey)>> {
    let mut buf = vec![0u8; HASH_BUF];
    for _ in 0..HASH_ATTEMPTS {
        let mut file = std::fs::File::open(path)?;
        let before = FileKey::of(&file.metadata()?);
        let mut h = Sha256::new();
        let mut total = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            h.update(&buf[..n]);
            total += n as u64;
        }
        // By path, not by handle: a file renamed over this one shows up as a new inode.
        let after = FileKey::of(&std::fs::metadata(path)?);
        if before == after && total == before.len {
            return Ok(Some((hex(&h.finalize()), before)));
        }
    }
    Ok(None)
}

impl Images {
    /// Creates DIR when missing (it must be a directory) and scans it once, so that the catalog
    /// is complete before the first request.
    pub async fn open(dir: Option<PathBuf>) -> anyhow::Result<Arc<Images>> {
        let dir = match dir {
            None => None,
            Some(dir) => Some(
                tokio::task::spawn_blocking(move || -> anyhow::Result<PathBuf> {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("cannot create --images {}", dir.display()))?;
                    let meta = std::fs::metadata(&dir)
                        .with_context(|| format!("cannot open --images {}", dir.display()))?;
                    anyhow::ensure!(
                        meta.is_dir(),
                        "--images {} is not a directory",
                        dir.display()
                    );
                    Ok(dir)
                })
                .await
                .context("image directory check")??,
            ),
        };
        let images = Arc::new(Images {
            dir,
            catalog: Mutex::new(Catalog::default()),
            scanning: Mutex::new(()),
        });
        if let Some(dir) = &images.dir {
            images.rescan().await?;
            let cat = relock(&images.catalog);
            info!(dir = %dir.display(), images = cat.entries.len(), revision = cat.revision, "sim cloud: publishing images");
        }
        Ok(images)
    }

    pub fn revision(&self) -> u64 {
        relock(&self.catalog).revision
    }

    /// The manifest as the relay gets it.
    pub fn manifest(&self) -> ImageManifest {
        let cat = relock(&self.catalog);
        ImageManifest {
            revision: cat.revision,
            images: cat.entries.values().map(|e| e.image()).collect(),
        }
    }

    pub fn entries(&self) -> Vec<Arc<Entry>> {
        relock(&self.catalog).entries.values().cloned().collect()
    }

    fn lookup(&self, name: &str) -> Option<Arc<Entry>> {
        relock(&self.catalog).entries.get(name).cloned()
    }

    /// Rescans the directory now; returns the revision.
    pub async fn rescan(self: &Arc<Self>) -> anyhow::Result<u64> {
        self.scan(None).await
    }

    /// Rescans unless the last scan ended less than `age` ago; returns the revision.
    pub async fn rescan_if_older(self: &Arc<Self>, age: Duration) -> anyhow::Result<u64> {
        self.scan(Some(age)).await
    }

    fn fresh(&self, age: Option<Duration>) -> bool {
        age.is_some_and(|age| {
            relock(&self.catalog)
                .scanned_at
                .is_some_and(|t| t.elapsed() < age)
        })
    }

    async fn scan(self: &Arc<Self>, age: Option<Duration>) -> anyhow::Result<u64> {
        if self.dir.is_none() || self.fresh(age) {
            return Ok(self.revision());
        }
        // The scan commits its result itself: a caller that goes away (client dropped) does not
        // throw away hashing work.
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.scan_blocking(age))
            .await
            .context("image scanner")?
    }

    fn scan_blocking(&self, age: Option<Duration>) -> anyhow::Result<u64> {
        let Some(dir) = &self.dir else {
            return Ok(0);
        };
        let _one = relock(&self.scanning);
        // Someone else may have scanned while this one waited.
        if self.fresh(age) {
            return Ok(self.revision());
        }
        let old = relock(&self.catalog).entries.clone();
        let mut next = BTreeMap::new();
        let listing = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list --images {}", dir.display()))?;
        for dirent in listing {
            let dirent =
                dirent.with_context(|| format!("cannot list --images {}", dir.display()))?;
            let Some(name) = dirent.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !is_publishable(&name) {
                continue;
            }
            let path = dirent.path();
            // Follows symbolic links: a link to a regular file publishes that file.
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    debug!(file = %path.display(), error = %e, "image skipped: cannot stat");
                    continue;
                }
            };
            // Empty files are skipped: the relay refuses a manifest listing a file of size 0.
            if !meta.is_file() || meta.len() == 0 {
                continue;
            }
            let key = FileKey::of(&meta);
            let (sha256, key) = match old.get(&name) {
                Some(e) if e.key == key => (e.sha256.clone(), key),
                _ => match hash_file(&path) {
                    Ok(Some((sha, key))) if key.len > 0 => {
                        debug!(file = %path.display(), sha256 = %sha, "image hashed");
                        (sha, key)
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => {
                        warn!(file = %path.display(), "image skipped: it kept changing while being hashed");
                        continue;
                    }
                    Err(e) => {
                        warn!(file = %path.display(), error = %e, "image skipped: cannot read it");
                        continue;
                    }
                },
            };
            next.insert(
                name.clone(),
                Arc::new(Entry {
                    name,
                    path,
                    key,
                    sha256,
                }),
            );
        }
        let revision = revision_of(&next);
        let mut cat = relock(&self.catalog);
        if cat.revision != revision {
            info!(
                images = next.len(),
                revision,
                previous = cat.revision,
                "image catalog changed"
            );
        }
        cat.entries = next;
        cat.revision = revision;
        cat.scanned_at = Some(Instant::now());
        Ok(revision)
    }
}

// ---------------------------------------------------------------------------------------------
// Test hooks and counters.

/// Settings of `POST /sim/images/faults`. Posting replaces all of them; an omitted field is off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFaults {
    /// Files served with the byte at offset `len / 2` XOR 0xFF (same length, wrong SHA-256).
    #[serde(default)]
    pub corrupt: BTreeSet<String>,
    /// Every file body is paced to this many bytes a second (read at every piece, so a change
    /// applies to bodies already under way).
    #[serde(default)]
    pub rate_bytes_per_s: Option<u64>,
    /// Range and If-Range are ignored: 200 with the whole file, `Accept-Ranges: none`.
    #[serde(default)]
    pub no_range: bool,
    /// Every `/files` request is answered with this status (400-599) before anything else.
    #[serde(default)]
    pub fail_status: Option<u16>,
    /// The URL the manifest lists for a file, by name, instead of `/files/<name>`: absolute
    /// (another origin) or a path with a query.
    #[serde(default)]
    pub urls: BTreeMap<String, String>,
    /// `/files/<name>` answers `302 Found` with this `Location` (checked after the token, unless
    /// `anonymous`).
    #[serde(default)]
    pub redirects: BTreeMap<String, String>,
    /// A CDN origin: `/files` needs no bearer token, and a request that carries an
    /// `Authorization` header anyway is refused with 400 (and counted).
    #[serde(default)]
    pub anonymous: bool,
    /// Pre-signed URLs: `/files/<name>` is served only when the query carries
    /// `signature=<this>`; otherwise 403.
    #[serde(default)]
    pub signature: Option<String>,
}

/// Per-file counters of `GET /sim/images`. Kept by file name for the life of the process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FileCounters {
    /// Body bytes handed to the connection (GET only).
    pub bytes_served: u64,
    /// GET and HEAD requests naming this file, whatever the answer.
    pub requests: u64,
    /// Those of them that carried a Range header (honoured or not).
    pub range_requests: u64,
    /// `/files` requests for this name that carried an `Authorization` header, whatever the
    /// answer (redirects, refusals and unknown names included).
    pub authorization_seen: u64,
}

fn count_request(shared: &Shared, name: &str, ranged: bool) {
    let mut rt = shared.lock();
    let c = rt.image_counters.entry(name.to_owned()).or_default();
    c.requests += 1;
    if ranged {
        c.range_requests += 1;
    }
}

/// `GET /sim/images`: the catalog with its counters, sorted by id.
pub async fn sim_list(State(shared): State<Arc<Shared>>) -> Json<Vec<Value>> {
    let entries = shared.images.entries();
    let rt = shared.lock();
    Json(
        entries
            .iter()
            .map(|e| {
                let c = rt.image_counters.get(&e.name).copied().unwrap_or_default();
                json!({
                    "id": e.name,
                    "path": e.device_path(),
                    "size": e.size(),
                    "sha256": e.sha256,
                    "bytes_served": c.bytes_served,
                    "requests": c.requests,
                    "range_requests": c.range_requests,
                    "authorization_seen": c.authorization_seen,
                })
            })
            .collect(),
    )
}

async fn rescan_or_500(shared: &Arc<Shared>) -> ApiResult<u64> {
    shared.images.rescan().await.map_err(|e| {
        warn!(error = %format!("{e:#}"), "sim cloud: image rescan failed");
        ApiError::internal("cannot read the image directory")
    })
}

/// The manifest, after a rescan (`GET /relay/v1/images` once authenticated), with the URLs
/// the `urls` hook names in place of `/files/<name>`.
pub async fn manifest(shared: &Arc<Shared>) -> ApiResult<ImageManifest> {
    rescan_or_500(shared).await?;
    let mut m = shared.images.manifest();
    let urls = shared.lock().image_faults.urls.clone();
    for img in &mut m.images {
        if let Some(u) = urls.get(&img.id) {
            for f in &mut img.files {
                f.url = u.clone();
            }
        }
    }
    Ok(m)
}

/// `POST /sim/images/rescan` → the manifest.
pub async fn sim_rescan(State(shared): State<Arc<Shared>>) -> ApiResult<Json<ImageManifest>> {
    manifest(&shared).await.map(Json)
}

/// `GET /sim/images/faults`.
pub async fn sim_get_faults(State(shared): State<Arc<Shared>>) -> Json<ImageFaults> {
    Json(shared.lock().image_faults.clone())
}

/// `POST /sim/images/faults`: replaces the settings, answers them.
pub async fn sim_set_faults(
    State(shared): State<Arc<Shared>>,
    body: Body,
) -> ApiResult<Json<ImageFaults>> {
    let faults: ImageFaults = api::parse_or_empty(&api::read_body(body).await?)?;
    if let Some(s) = faults.fail_status
        && !(400..=599).contains(&s)
    {
        return Err(ApiError::bad_request(format!(
            "fail_status must be an error status (400-599), got {s}"
        )));
    }
    if faults.rate_bytes_per_s == Some(0) {
        return Err(ApiError::bad_request(
            "rate_bytes_per_s must be at least 1 (null for no limit)",
        ));
    }
    if faults.signature.as_deref() == Some("") {
        return Err(ApiError::bad_request(
            "signature must not be empty (null for none)",
        ));
    }
    if let Some((name, _)) = faults
        .redirects
        .iter()
        .find(|(_, l)| l.is_empty() || HeaderValue::from_str(l).is_err())
    {
        return Err(ApiError::bad_request(format!(
            "redirect of {name:?} must be a usable Location"
        )));
    }
    info!(?faults, "image faults set");
    shared.lock().image_faults = faults.clone();
    Ok(Json(faults))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncRequest {
    #[serde(default)]
    relay_id: Option<String>,
}

/// `POST /sim/images/sync {"relay_id"?}`: rescans, then sends `images_sync` with the revision down
/// the relay's channel; answered once the frame is on the socket.
pub async fn sim_sync(State(shared): State<Arc<Shared>>, body: Body) -> ApiResult<Json<Value>> {
    let req: SyncRequest = api::parse_or_empty(&api::read_body(body).await?)?;
    let revision = rescan_or_500(&shared).await?;
    let text = serde_json::to_string(&CloudMessage::ImagesSync { revision })
        .map_err(|e| ApiError::internal(format!("cannot encode images_sync: {e}")))?;
    let relay_id = api::send_frame(&shared, req.relay_id, text).await?;
    info!(%relay_id, revision, "images_sync sent");
    Ok(Json(
        json!({"relay_id": relay_id, "revision": revision, "sent": true}),
    ))
}

// ---------------------------------------------------------------------------------------------
// Serving files.

/// What a Range header asks of a file of a given length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// 200 with the whole file: no Range, one this server ignores (not `bytes`, malformed,
    /// several ranges), or an If-Range that does not match.
    Full,
    /// 206 with bytes `first..=last`.
    Partial { first: u64, last: u64 },
    /// 416.
    Unsatisfiable,
}

/// Digits only; saturates instead of failing on overflow (a huge position is still a position).
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// RFC 9110 section 14 for one range: `bytes=a-b`, `bytes=a-`, `bytes=-n`.
pub fn parse_range(value: &str, len: u64) -> RangeAnswer {
    let value = value.trim();
    let Some((unit, spec)) = value.split_once('=') else {
        return RangeAnswer::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return match digits(b) {
            None => RangeAnswer::Full,
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if len == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial {
                first: len.saturating_sub(n),
                last: len - 1,
            },
        };
    }
    let Some(first) = digits(a) else {
        return RangeAnswer::Full;
    };
    let last = if b.is_empty() {
        u64::MAX
    } else {
        match digits(b) {
            Some(last) if last >= first => last,
            _ => return RangeAnswer::Full,
        }
    };
    if first >= len {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Partial {
        first,
        last: last.min(len - 1),
    }
}

/// If-Range: the Range is honoured only when the validator is our strong ETag (a date never
/// matches: a conservative reading of RFC 9110 section 13.1.5).
fn if_range_allows(headers: &HeaderMap, etag: &str) -> bool {
    match headers.get(header::IF_RANGE) {
        None => true,
        Some(v) => v.to_str().is_ok_and(|v| v.trim() == etag),
    }
}

fn fail_code(status: StatusCode) -> ErrorCode {
    match status.as_u16() {
        401 => ErrorCode::TokenInvalid,
        404 => ErrorCode::NotFound,
        409 => ErrorCode::Conflict,
        429 | 503 => ErrorCode::Busy,
        400..=499 => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    }
}

/// The file behind `name`, opened and checked to still be what the catalog hashed. A miss or a
/// changed file triggers one rescan.
async fn open_checked(
    shared: &Arc<Shared>,
    name: &str,
) -> ApiResult<Option<(std::fs::File, Arc<Entry>)>> {
    let mut rescanned = false;
    loop {
        if let Some(entry) = shared.images.lookup(name) {
            let (path, want) = (entry.path.clone(), entry.key);
            let opened =
                tokio::task::spawn_blocking(move || -> io::Result<Option<std::fs::File>> {
                    let file = std::fs::File::open(&path)?;
                    let key = FileKey::of(&file.metadata()?);
                    Ok((key == want).then_some(file))
                })
                .await;
            match opened {
                Ok(Ok(Some(file))) => return Ok(Some((file, entry))),
                Ok(Ok(None)) => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
                Ok(Err(e)) => {
                    warn!(file = %entry.path.display(), error = %e, "cannot open image file");
                    return Err(ApiError::internal(format!("cannot open {name}")));
                }
                Err(e) => return Err(ApiError::internal(format!("file opener: {e}"))),
            }
            if rescanned {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Busy,
                    format!("{name} is changing on the server; try again"),
                ));
            }
        } else if rescanned {
            return Ok(None);
        }
        rescan_or_500(shared).await?;
        rescanned = true;
    }
}

/// `GET|HEAD /files/{name}` (bearer token, unless the hooks make this a CDN origin).
pub async fn serve_file(
    State(shared): State<Arc<Shared>>,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let name = name.map(|Path(n)| n).unwrap_or_default();
    // Counted before anything can answer: the canary's evidence.
    if headers.contains_key(header::AUTHORIZATION) {
        let mut rt = shared.lock();
        rt.image_counters
            .entry(name.clone())
            .or_default()
            .authorization_seen += 1;
        warn!(%name, "a /files request carried an Authorization header");
    }
    if let Some(r) = api::fault_gate(&shared, FILES_PREFIX).await {
        return r;
    }
    let ranged = headers.contains_key(header::RANGE);
    let faults = shared.lock().image_faults.clone();
    if let Some(status) = faults.fail_status {
        if shared.images.lookup(&name).is_some() {
            count_request(&shared, &name, ranged);
        }
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        debug!(%name, %status, "injected /files failure");
        return ApiError::new(
            status,
            fail_code(status),
            format!("injected failure: every /files request gets {status}"),
        )
        .into_response();
    }
    if let Err(e) = origin_gate(&shared, &name, &uri, &headers, &faults) {
        return e.into_response();
    }
    if let Some(location) = faults.redirects.get(&name) {
        count_request(&shared, &name, ranged);
        debug!(%name, %location, "redirecting a /files request");
        let mut r = StatusCode::FOUND.into_response();
        if let Ok(v) = HeaderValue::from_str(location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        return r;
    }
    match serve_inner(&shared, name, method == Method::HEAD, &headers, &faults).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Who may fetch: the relay with its bearer token, or (as a CDN origin) anyone with the right
/// signature and no credentials.
fn origin_gate(
    shared: &Shared,
    name: &str,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    faults: &ImageFaults,
) -> ApiResult<()> {
    if faults.anonymous {
        if headers.contains_key(header::AUTHORIZATION) {
            return Err(ApiError::bad_request(
                "this origin serves pre-signed URLs only: a request must not carry credentials",
            ));
        }
    } else {
        api::bearer_relay(shared, headers)?;
    }
    if let Some(want) = &faults.signature {
        let given = uri.query().unwrap_or("").split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == "signature").then_some(v)
        });
        if given != Some(want.as_str()) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::BadRequest,
                format!("{name}: missing or wrong signature in the URL"),
            ));
        }
    }
    Ok(())
}

async fn serve_inner(
    shared: &Arc<Shared>,
    name: String,
    head: bool,
    headers: &HeaderMap,
    faults: &ImageFaults,
) -> ApiResult<Response> {
    let not_found = || ApiError::not_found(format!("no such image file: {name}"));
    if !is_publishable(&name) {
        return Err(not_found());
    }
    let Some((file, entry)) = open_checked(shared, &name).await? else {
        return Err(not_found());
    };
    count_request(shared, &name, headers.contains_key(header::RANGE));

    let len = entry.size();
    let etag = format!("\"{}\"", entry.sha256);
    let answer = match headers.get(header::RANGE) {
        _ if faults.no_range => RangeAnswer::Full,
        None => RangeAnswer::Full,
        Some(_) if !if_range_allows(headers, &etag) => RangeAnswer::Full,
        // Not text: not a range this server understands.
        Some(v) => v
            .to_str()
            .map_or(RangeAnswer::Full, |v| parse_range(v, len)),
    };
    let accept_ranges = if faults.no_range { "none" } else { "bytes" };
    let mut common = HeaderMap::new();
    common.insert(
        header::ACCEPT_RANGES,
        HeaderValue::from_static(accept_ranges),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        common.insert(header::ETAG, v);
    }
    if let Some(Ok(v)) = entry
        .key
        .mtime
        .map(|t| HeaderValue::from_str(&http_date(t)))
    {
        common.insert(header::LAST_MODIFIED, v);
    }

    let (status, start, end) = match answer {
        RangeAnswer::Unsatisfiable => {
            let mut r = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::BadRequest,
                format!("range not satisfiable: {name} has {len} bytes"),
            )
            .into_response();
            r.headers_mut().extend(common);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
        RangeAnswer::Full => (StatusCode::OK, 0, len),
        RangeAnswer::Partial { first, last } => (StatusCode::PARTIAL_CONTENT, first, last + 1),
    };

    let body = if head {
        Body::empty()
    } else {
        let mut file = tokio::fs::File::from_std(file);
        if start > 0 {
            file.seek(io::SeekFrom::Start(start))
                .await
                .map_err(|e| ApiError::internal(format!("cannot seek in {name}: {e}")))?;
        }
        let flip_at = (faults.corrupt.contains(&name) && len > 0).then_some(len / 2);
        Body::from_stream(body_stream(Sending {
            file,
            pos: start,
            end,
            flip_at,
            name: name.clone(),
            shared: shared.clone(),
            pace: None,
        }))
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.extend(common);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    debug!(%name, status = status.as_u16(), start, end, head, "serving image file");
    Ok(r)
}

/// Pacing state of a throttled body: `sent` bytes since `since` at `rate`.
#[derive(Debug, Clone, Copy)]
struct Pace {
    rate: u64,
    since: tokio::time::Instant,
    sent: u64,
}

/// A body being sent: bytes `pos..end` of `file`.
struct Sending {
    file: tokio::fs::File,
    pos: u64,
    end: u64,
    flip_at: Option<u64>,
    name: String,
    shared: Arc<Shared>,
    pace: Option<Pace>,
}

/// The body, piece by piece. Each piece is counted (stats and per file) when hyper polls for it,
/// i.e. when it is handed to the connection; a client that goes away stops the polling.
fn body_stream(s: Sending) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures_util::stream::try_unfold(s, |mut s| async move {
        if s.pos >= s.end {
            return Ok(None);
        }
        let remaining = s.end - s.pos;
        let mut want = usize::try_from(remaining).map_or(CHUNK, |r| r.min(CHUNK));
        let rate = s.shared.lock().image_faults.rate_bytes_per_s;
        match rate {
            None => s.pace = None,
            Some(rate) => {
                // A new or changed rate starts a new pacing window.
                let pace = match s.pace {
                    Some(p) if p.rate == rate => p,
                    _ => Pace {
                        rate,
                        since: tokio::time::Instant::now(),
                        sent: 0,
                    },
                };
                s.pace = Some(pace);
                let slice = usize::try_from((rate / PACE_SLICES).max(1)).unwrap_or(CHUNK);
                want = want.min(slice);
                // Piece k goes out once the pieces before it have had their time at `rate`.
                let nanos = u128::from(pace.sent) * 1_000_000_000 / u128::from(rate);
                let due = u64::try_from(nanos)
                    .ok()
                    .and_then(|n| pace.since.checked_add(Duration::from_nanos(n)));
                tokio::select! {
                    _ = async {
                        match due {
                            Some(due) => tokio::time::sleep_until(due).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                    _ = s.shared.cancel.cancelled() => {
                        return Err(io::Error::other("cloud shutting down"));
                    }
                }
            }
        }
        let mut buf = vec![0u8; want];
        let n = s.file.read(&mut buf).await?;
        if n == 0 {
            // Content-Length is already sent: ending early makes hyper drop the connection,
            // which is what the client must see.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being served",
            ));
        }
        buf.truncate(n);
        if let Some(at) = s.flip_at
            && (s.pos..s.pos + n as u64).contains(&at)
        {
            buf[(at - s.pos) as usize] ^= 0xFF;
        }
        s.pos += n as u64;
        if let Some(p) = &mut s.pace {
            p.sent += n as u64;
        }
        {
            let mut rt = s.shared.lock();
            rt.db.p.stats.image_bytes_served += n as u64;
            rt.image_counters
                .entry(s.name.clone())
                .or_default()
                .bytes_served += n as u64;
            // Written by the flusher: `image_bytes_served` is part of the persisted stats.
            rt.changed();
        }
        Ok(Some((Bytes::from(buf), s)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishable_names() {
        for n in ["sip.ld", "a", "fw-6.4.7_b~1.bin", "UPPER.BIN"] {
            assert!(is_publishable(n), "{n}");
        }
        for n in [
            "",
            ".hidden",
            ".",
            "..",
            "a b",
            "a%20b",
            "a/b",
            "a?b",
            "é.bin",
            &"x".repeat(201),
        ] {
            assert!(!is_publishable(n), "{n:?}");
        }
    }

    #[test]
    fn ranges() {
        use RangeAnswer::*;
        let p = |first, last| Partial { first, last };
        let cases: &[(&str, u64, RangeAnswer)] = &[
            ("bytes=0-9", 100, p(0, 9)),
            ("bytes=10-19", 100, p(10, 19)),
            ("BYTES = 5-5", 100, p(5, 5)),
            ("bytes=90-", 100, p(90, 99)),
            ("bytes=90-1000", 100, p(90, 99)),
            ("bytes=-10", 100, p(90, 99)),
            ("bytes=-1000", 100, p(0, 99)),
            ("bytes=99-99", 100, p(99, 99)),
            ("bytes=100-", 100, Unsatisfiable),
            ("bytes=100-200", 100, Unsatisfiable),
            ("bytes=99999999999999999999999-", 100, Unsatisfiable),
            ("bytes=-0", 100, Unsatisfiable),
            ("bytes=0-", 0, Unsatisfiable),
            ("bytes=-5", 0, Unsatisfiable),
            // Ignored: 200 with the whole file.
            ("bytes=0-1,5-6", 100, Full),
            ("bytes=9-1", 100, Full),
            ("bytes=a-b", 100, Full),
            ("bytes=+1-2", 100, Full),
            ("bytes=-", 100, Full),
            ("bytes 0-9", 100, Full),
            ("items=0-9", 100, Full),
            ("bytes=5", 100, Full),
        ];
        for (value, len, want) in cases {
            assert_eq!(parse_range(value, *len), *want, "{value} of {len}");
        }
    }

    #[test]
    fn if_range() {
        let etag = "\"abc\"";
        let mut h = HeaderMap::new();
        assert!(if_range_allows(&h, etag));
        h.insert(header::IF_RANGE, HeaderValue::from_static("\"abc\""));
        assert!(if_range_allows(&h, etag));
        h.insert(header::IF_RANGE, HeaderValue::from_static("\"abd\""));
        assert!(!if_range_allows(&h, etag));
        h.insert(header::IF_RANGE, HeaderValue::from_static("W/\"abc\""));
        assert!(!if_range_allows(&h, etag));
        h.insert(
            header::IF_RANGE,
            HeaderValue::from_static("Mon, 01 Jan 2026 00:00:00 GMT"),
        );
        assert!(!if_range_allows(&h, etag));
    }

    #[test]
    fn revision_is_stable_and_content_bound() {
        let entry = |name: &str, sha: &str| {
            (
                name.to_owned(),
                Arc::new(Entry {
                    name: name.into(),
                    path: PathBuf::from(name),
                    key: FileKey {
                        len: 1,
                        mtime: None,
                        ino: 0,
                    },
                    sha256: sha.into(),
                }),
            )
        };
        let a: BTreeMap<_, _> = [entry("a", "11"), entry("b", "22")].into();
        let same: BTreeMap<_, _> = [entry("b", "22"), entry("a", "11")].into();
        let changed: BTreeMap<_, _> = [entry("a", "11"), entry("b", "23")].into();
        let renamed: BTreeMap<_, _> = [entry("a", "11"), entry("c", "22")].into();
        assert_eq!(revision_of(&BTreeMap::new()), 0);
        assert_ne!(revision_of(&a), 0);
        assert_eq!(revision_of(&a), revision_of(&same));
        assert_ne!(revision_of(&a), revision_of(&changed));
        assert_ne!(revision_of(&a), revision_of(&renamed));
    }
}
