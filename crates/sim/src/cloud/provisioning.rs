//! The tenant's provisioning tree (`--provisioning DIR`): what Poly phones fetch and upload, served
//! the way a real provisioning server does it, so that the relay's edge can be tested against it.
//!
//! Every request whose path is not under `/relay/` or `/sim/` lands here when the tree is on. Rules:
//! - the path is percent-decoded and checked before anything else: `..` segments, backslashes, NUL
//!   and control characters get 400; nothing outside DIR is ever read, written or removed (symbolic
//!   links leading out of DIR are refused with 403);
//! - then authentication: `PlcmSpIp`/`PlcmSpIp` by Basic or Digest (RFC 7616, MD5, `qop=auth` or
//!   the legacy RFC 2069 form); anything else gets 401 with a Digest and a Basic challenge;
//! - GET/HEAD stream a file (404 when missing), PUT streams the body into a temporary file beside
//!   the target and renames it (201 new, 204 replaced; at most [`MAX_UPLOAD`] bytes), DELETE
//!   removes a file (204, 404 when missing).
//!
//! The last [`LOG_LEN`] requests are kept with the proxy-relevant headers exactly as received, for
//! tests (`GET /sim/provisioning/log`).

use super::Shared;
use anyhow::Context as _;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use axum::response::Response;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use md5::Digest as _;
use serde::Serialize;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{debug, info, warn};

/// Realm of both challenges.
pub const REALM: &str = "ucrelay-sim";
/// The phones' default provisioning account.
pub const USER: &str = "PlcmSpIp";
pub const PASSWORD: &str = "PlcmSpIp";
/// Largest accepted upload; beyond it PUT gets 413.
pub const MAX_UPLOAD: u64 = 1 << 30;
/// How many requests `GET /sim/provisioning/log` keeps.
pub const LOG_LEN: usize = 100;
/// How long a Digest nonce is good for; after that it is answered with `stale=true`.
pub const NONCE_TTL: Duration = Duration::from_secs(300);
/// Most nonces remembered at once (each 401 hands one out).
const MAX_NONCES: usize = 10_000;
/// Expired nonces are remembered this much longer than [`NONCE_TTL`], to answer `stale=true`.
const NONCE_FORGET_AFTER: Duration = Duration::from_secs(4 * 300);
/// Size of the chunks a file is sent in.
const CHUNK: usize = 64 * 1024;
/// Longest pause allowed between two pieces of an upload.
const UPLOAD_IDLE: Duration = Duration::from_secs(60);
/// A refused request's body is read and dropped up to this size, so that the connection can be
/// kept alive (a proxy in front pools connections); a bigger one closes the connection.
const DRAIN_LIMIT: usize = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);
/// Longest path segment and deepest path taken.
const MAX_SEGMENT: usize = 255;
const MAX_DEPTH: usize = 32;

/// The provisioning tree of a running cloud.
pub(crate) struct Provisioning {
    /// Canonical path of DIR.
    root: PathBuf,
    nonces: Mutex<Nonces>,
}

impl Provisioning {
    /// Creates DIR when missing; it must be a directory.
    pub fn open(dir: &Path) -> anyhow::Result<Provisioning> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --provisioning {}", dir.display()))?;
        let root = dir
            .canonicalize()
            .with_context(|| format!("cannot open --provisioning {}", dir.display()))?;
        anyhow::ensure!(
            root.is_dir(),
            "--provisioning {} is not a directory",
            dir.display()
        );
        info!(dir = %root.display(), "sim cloud: serving the provisioning tree");
        Ok(Provisioning {
            root,
            nonces: Mutex::new(Nonces::default()),
        })
    }

    fn nonces(&self) -> std::sync::MutexGuard<'_, Nonces> {
        self.nonces.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether a path belongs to the cloud's own API rather than to the provisioning tree.
pub(crate) fn is_reserved(path: &str) -> bool {
    ["/relay", "/sim"].iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// One line of `GET /sim/provisioning/log`: the request as received.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LogEntry {
    pub method: String,
    /// Path and query exactly as in the request line (not decoded).
    pub path: String,
    pub status: u16,
    pub user_agent: Option<String>,
    pub x_forwarded_for: Option<String>,
    pub x_forwarded_proto: Option<String>,
    pub x_forwarded_host: Option<String>,
    pub host: Option<String>,
    /// RFC 7239 `Forwarded` and `Via`, should a proxy add them instead.
    pub forwarded: Option<String>,
    pub via: Option<String>,
    /// Scheme of the `Authorization` header received: "none", "basic" or "digest" (whether it was
    /// accepted shows in `status`).
    pub auth: &'static str,
}

/// Handles one provisioning request (the tree is on and the path is not reserved).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    prov: &Provisioning,
    req: Request<Body>,
) -> Response {
    let (parts, body) = req.into_parts();
    let auth_scheme = presented_scheme(&parts.headers);
    let (resp, unauthorized) = answer(
        &shared,
        prov,
        &parts.method,
        &parts.uri,
        &parts.headers,
        body,
    )
    .await;
    let entry = LogEntry {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
        status: resp.status().as_u16(),
        user_agent: header_text(&parts.headers, header::USER_AGENT.as_str()),
        x_forwarded_for: header_text(&parts.headers, "x-forwarded-for"),
        x_forwarded_proto: header_text(&parts.headers, "x-forwarded-proto"),
        x_forwarded_host: header_text(&parts.headers, "x-forwarded-host"),
        host: header_text(&parts.headers, header::HOST.as_str()),
        forwarded: header_text(&parts.headers, header::FORWARDED.as_str()),
        via: header_text(&parts.headers, header::VIA.as_str()),
        auth: auth_scheme,
    };
    debug!(method = %entry.method, path = %entry.path, status = entry.status, "provisioning request");
    {
        let mut rt = shared.lock();
        rt.db.p.stats.provisioning_requests += 1;
        if unauthorized {
            rt.db.p.stats.provisioning_unauthorized += 1;
        }
        if rt.prov_log.len() >= LOG_LEN {
            rt.prov_log.pop_front();
        }
        rt.prov_log.push_back(entry);
        rt.changed();
    }
    resp
}

/// The answer, and whether it is an authentication challenge.
async fn answer(
    shared: &Arc<Shared>,
    prov: &Provisioning,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> (Response, bool) {
    let segments = match safe_segments(uri.path()) {
        Ok(s) => s,
        Err(why) => {
            let resp = text(StatusCode::BAD_REQUEST, &format!("refused path: {why}"));
            return (drain_then(body, headers, resp).await, false);
        }
    };
    match authenticate(prov, method, uri, headers, Instant::now()) {
        Auth::Granted => {}
        Auth::Denied { stale } => {
            let resp = challenge(prov, stale);
            return (drain_then(body, headers, resp).await, true);
        }
    }
    let target = segments.iter().fold(prov.root.clone(), |p, s| p.join(s));
    let resp = match *method {
        Method::GET | Method::HEAD => serve(shared, prov, target, *method == Method::HEAD).await,
        Method::PUT => return (upload(shared, prov, segments, headers, body).await, false),
        Method::DELETE => remove(prov, target).await,
        _ => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("method {method} is not allowed here"),
            );
            r.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, PUT, DELETE"),
            );
            r
        }
    };
    (drain_then(body, headers, resp).await, false)
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// A short plain-text answer.
fn text(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "{} {}: {message}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Reads and drops the body of a refused request (up to [`DRAIN_LIMIT`]) so that the connection
/// stays usable; when it is bigger, or the client waits for `100 Continue`, the connection is
/// closed after the answer instead.
async fn drain_then(body: Body, headers: &HeaderMap, mut resp: Response) -> Response {
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let drained = if expects_continue {
        false
    } else {
        let limited = http_body_util::Limited::new(body, DRAIN_LIMIT);
        matches!(
            tokio::time::timeout(DRAIN_TIME, limited.collect()).await,
            Ok(Ok(_))
        )
    };
    if !drained {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// Paths.

/// The decoded, checked segments of a request path, or why it is refused. Empty and `.` segments
/// are dropped; `..`, backslashes, NUL and other control characters are refused, also when
/// percent-encoded.
pub(crate) fn safe_segments(raw: &str) -> Result<Vec<String>, &'static str> {
    if !raw.starts_with('/') {
        return Err("the path must start with /");
    }
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| "the path is not UTF-8 once decoded")?;
    if decoded.contains('\\') {
        return Err("backslash in the path");
    }
    if decoded.chars().any(char::is_control) {
        return Err("NUL or control character in the path");
    }
    let mut segments = Vec::new();
    for s in decoded.split('/') {
        match s {
            "" | "." => {}
            ".." => return Err("'..' in the path"),
            s if s.len() > MAX_SEGMENT => return Err("path segment too long"),
            s => segments.push(s.to_owned()),
        }
    }
    if segments.len() > MAX_DEPTH {
        return Err("path too deep");
    }
    Ok(segments)
}

/// Why a path cannot be used, as an HTTP answer.
#[derive(Debug)]
enum FsRefusal {
    NotFound,
    /// A symbolic link leads out of the tree.
    Outside,
    /// A directory where a file is needed, or a file where a directory is needed.
    Conflict(&'static str),
    Io(io::Error),
}

impl From<io::Error> for FsRefusal {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::NotFound {
            FsRefusal::NotFound
        } else {
            FsRefusal::Io(e)
        }
    }
}

impl FsRefusal {
    fn response(self, what: &str) -> Response {
        match self {
            FsRefusal::NotFound => text(StatusCode::NOT_FOUND, &format!("no such file: {what}")),
            FsRefusal::Outside => text(
                StatusCode::FORBIDDEN,
                &format!("{what} leads out of the provisioning tree"),
            ),
            FsRefusal::Conflict(why) => text(StatusCode::CONFLICT, &format!("{what}: {why}")),
            FsRefusal::Io(e) => {
                warn!(error = %e, path = what, "sim cloud: provisioning tree I/O error");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot access the provisioning tree",
                )
            }
        }
    }
}

/// Where `path` really is (symbolic links followed), provided that stays inside `root`.
fn inside(root: &Path, path: &Path) -> Result<PathBuf, FsRefusal> {
    let real = path.canonicalize()?;
    if real.starts_with(root) {
        Ok(real)
    } else {
        Err(FsRefusal::Outside)
    }
}

/// For a PUT: makes sure the directories leading to the target exist inside the tree (creating
/// them), and returns the directory the target goes in.
fn prepare_parent(root: &Path, segments: &[String]) -> Result<PathBuf, FsRefusal> {
    let mut dir = root.to_path_buf();
    for s in segments.iter().take(segments.len().saturating_sub(1)) {
        let next = dir.join(s);
        match std::fs::symlink_metadata(&next) {
            Ok(m) if m.is_dir() => dir = next,
            Ok(m) if m.file_type().is_symlink() => {
                let real = inside(root, &next)?;
                if !real.is_dir() {
                    return Err(FsRefusal::Conflict("a file is in the way of a directory"));
                }
                dir = real;
            }
            Ok(_) => return Err(FsRefusal::Conflict("a file is in the way of a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match std::fs::create_dir(&next) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && next.is_dir() => {}
                    Err(e) => return Err(FsRefusal::Io(e)),
                }
                dir = next;
            }
            Err(e) => return Err(FsRefusal::Io(e)),
        }
    }
    Ok(dir)
}

// ---------------------------------------------------------------------------------------------
// GET, HEAD, PUT, DELETE.

fn content_type(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("cfg" | "xml") => "application/xml",
        Some("log") => "text/plain",
        _ => "application/octet-stream",
    }
}

async fn serve(shared: &Arc<Shared>, prov: &Provisioning, target: PathBuf, head: bool) -> Response {
    let what = display(prov, &target);
    let root = prov.root.clone();
    let opened = tokio::task::spawn_blocking(move || -> Result<_, FsRefusal> {
        let real = inside(&root, &target)?;
        let file = std::fs::File::open(&real)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(FsRefusal::NotFound);
        }
        Ok((file, meta, real))
    })
    .await;
    let (file, meta, real) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return e.response(&what),
        Err(e) => return FsRefusal::Io(io::Error::other(e)).response(&what),
    };
    let len = meta.len();
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type(&real))
        .header(header::CONTENT_LENGTH, len);
    if let Ok(modified) = meta.modified() {
        builder = builder.header(header::LAST_MODIFIED, http_date(modified));
    }
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(file_stream(
            tokio::fs::File::from_std(file),
            len,
            shared.clone(),
        ))
    };
    builder
        .body(body)
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "cannot build the answer"))
}

/// The first `len` bytes of `file`, in chunks, counted in `provisioning_bytes_out` as they go.
fn file_stream(
    file: tokio::fs::File,
    len: u64,
    shared: Arc<Shared>,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures_util::stream::try_unfold(
        (file, len, shared),
        |(mut file, remaining, shared)| async move {
            if remaining == 0 {
                return Ok(None);
            }
            let want = usize::try_from(remaining).map_or(CHUNK, |r| r.min(CHUNK));
            let mut buf = vec![0u8; want];
            let n = file.read(&mut buf).await?;
            if n == 0 {
                // Content-Length is already sent: ending early makes hyper drop the connection,
                // which is what the client must see.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while being served",
                ));
            }
            buf.truncate(n);
            {
                let mut rt = shared.lock();
                rt.db.p.stats.provisioning_bytes_out += n as u64;
                rt.changed();
            }
            Ok(Some((
                Bytes::from(buf),
                (file, remaining - n as u64, shared),
            )))
        },
    )
}

async fn upload(
    shared: &Arc<Shared>,
    prov: &Provisioning,
    segments: Vec<String>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let what = format!("/{}", segments.join("/"));
    let Some(name) = segments.last().cloned() else {
        return drain_then(
            body,
            headers,
            text(StatusCode::CONFLICT, "cannot PUT onto the tree's root"),
        )
        .await;
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_UPLOAD) {
        return too_large();
    }

    // The directories first (inside the tree), then a temporary file beside the target.
    let root = prov.root.clone();
    let prepared = tokio::task::spawn_blocking(move || -> Result<_, FsRefusal> {
        let dir = prepare_parent(&root, &segments)?;
        let target = dir.join(&name);
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
            return Err(FsRefusal::Conflict("is a directory"));
        }
        let tmp = tempfile::Builder::new()
            .prefix(".ucrelay-put-")
            .tempfile_in(&dir)?;
        let file = tmp.as_file().try_clone()?;
        Ok((tmp, file, target))
    })
    .await;
    let (tmp, file, target) = match prepared {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return drain_then(body, headers, e.response(&what)).await,
        Err(e) => return FsRefusal::Io(io::Error::other(e)).response(&what),
    };

    // The body, streamed to the temporary file. On any early return `tmp` is dropped, which
    // removes the file.
    let mut file = tokio::fs::File::from_std(file);
    let mut body = body;
    let mut total: u64 = 0;
    loop {
        let frame = match tokio::time::timeout(UPLOAD_IDLE, body.frame()).await {
            Err(_) => {
                let mut r = text(StatusCode::REQUEST_TIMEOUT, "upload stalled");
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                debug!(error = %e, path = %what, "sim cloud: upload interrupted");
                return text(StatusCode::BAD_REQUEST, "upload interrupted");
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total += data.len() as u64;
        {
            let mut rt = shared.lock();
            rt.db.p.stats.provisioning_bytes_in += data.len() as u64;
            rt.changed();
        }
        if total > MAX_UPLOAD {
            return too_large();
        }
        if let Err(e) = file.write_all(&data).await {
            return FsRefusal::Io(e).response(&what);
        }
    }
    if let Err(e) = file.flush().await {
        return FsRefusal::Io(e).response(&what);
    }
    drop(file);

    let root = prov.root.clone();
    let placed = tokio::task::spawn_blocking(move || -> Result<bool, FsRefusal> {
        // Checked again: the tree may have changed while the body came in.
        if let Some(parent) = target.parent() {
            inside(&root, parent)?;
        }
        let existed = match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => return Err(FsRefusal::Conflict("is a directory")),
            Ok(_) => true,
            Err(_) => false,
        };
        tmp.persist(&target).map_err(|e| FsRefusal::Io(e.error))?;
        Ok(existed)
    })
    .await;
    match placed {
        Ok(Ok(existed)) => {
            debug!(path = %what, bytes = total, replaced = existed, "provisioning upload stored");
            let status = if existed {
                StatusCode::NO_CONTENT
            } else {
                StatusCode::CREATED
            };
            let mut r = Response::new(Body::empty());
            *r.status_mut() = status;
            r
        }
        Ok(Err(e)) => e.response(&what),
        Err(e) => FsRefusal::Io(io::Error::other(e)).response(&what),
    }
}

fn too_large() -> Response {
    let mut r = text(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("an upload may have at most {MAX_UPLOAD} bytes"),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn remove(prov: &Provisioning, target: PathBuf) -> Response {
    let what = display(prov, &target);
    let root = prov.root.clone();
    let removed = tokio::task::spawn_blocking(move || -> Result<(), FsRefusal> {
        if let Some(parent) = target.parent() {
            inside(&root, parent)?;
        }
        let m = std::fs::symlink_metadata(&target)?;
        if m.is_dir() {
            return Err(FsRefusal::Conflict("is a directory"));
        }
        std::fs::remove_file(&target)?;
        Ok(())
    })
    .await;
    match removed {
        Ok(Ok(())) => {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Ok(Err(e)) => e.response(&what),
        Err(e) => FsRefusal::Io(io::Error::other(e)).response(&what),
    }
}

/// The request path of a file of the tree, for messages.
fn display(prov: &Provisioning, path: &Path) -> String {
    match path.strip_prefix(&prov.root) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => path.display().to_string(),
    }
}

/// An HTTP date (RFC 9110 IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`).
pub(crate) fn http_date(t: std::time::SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .ok()
        .and_then(|ts| {
            jiff::fmt::rfc2822::DateTimePrinter::new()
                .timestamp_to_rfc9110_string(&ts)
                .ok()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Authentication.

/// Digest nonces handed out, with the time each was issued.
#[derive(Default)]
pub(crate) struct Nonces {
    issued: HashMap<String, Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NonceState {
    Fresh,
    /// Known but older than [`NONCE_TTL`].
    Expired,
    Unknown,
}

impl Nonces {
    pub fn issue(&mut self, now: Instant) -> String {
        if self.issued.len() >= MAX_NONCES {
            self.issued
                .retain(|_, at| now.saturating_duration_since(*at) < NONCE_FORGET_AFTER);
        }
        if self.issued.len() >= MAX_NONCES
            && let Some(oldest) = self
                .issued
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone())
        {
            self.issued.remove(&oldest);
        }
        let nonce = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        self.issued.insert(nonce.clone(), now);
        nonce
    }

    pub fn check(&self, nonce: &str, now: Instant) -> NonceState {
        match self.issued.get(nonce) {
            Some(at) if now.saturating_duration_since(*at) < NONCE_TTL => NonceState::Fresh,
            Some(_) => NonceState::Expired,
            None => NonceState::Unknown,
        }
    }
}

enum Auth {
    Granted,
    /// `stale`: the Digest answer was right but for a nonce no longer (or never) valid.
    Denied {
        stale: bool,
    },
}

/// The scheme of the `Authorization` header: "none", "basic" or "digest".
fn presented_scheme(headers: &HeaderMap) -> &'static str {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return "none";
    };
    let scheme = v
        .as_bytes()
        .split(|b| *b == b' ')
        .next()
        .unwrap_or_default();
    if scheme.eq_ignore_ascii_case(b"basic") {
        "basic"
    } else if scheme.eq_ignore_ascii_case(b"digest") {
        "digest"
    } else {
        "none"
    }
}

fn authenticate(
    prov: &Provisioning,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    now: Instant,
) -> Auth {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Auth::Denied { stale: false };
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        let ok = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .is_ok_and(|raw| same(&raw, format!("{USER}:{PASSWORD}").as_bytes()));
        return if ok {
            Auth::Granted
        } else {
            Auth::Denied { stale: false }
        };
    }
    if !scheme.eq_ignore_ascii_case("digest") {
        return Auth::Denied { stale: false };
    }
    let params: HashMap<String, String> = parse_params(rest)
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let get = |k: &str| params.get(k).map(String::as_str);
    let (Some(username), Some(realm), Some(nonce), Some(digest_uri), Some(response)) = (
        get("username"),
        get("realm"),
        get("nonce"),
        get("uri"),
        get("response"),
    ) else {
        return Auth::Denied { stale: false };
    };
    if username != USER || realm != REALM {
        return Auth::Denied { stale: false };
    }
    if get("algorithm").is_some_and(|a| !a.eq_ignore_ascii_case("md5")) {
        return Auth::Denied { stale: false };
    }
    // The uri must name this very request: its origin form, or the absolute form it came in.
    let origin = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    if digest_uri != origin && *uri != *digest_uri {
        return Auth::Denied { stale: false };
    }
    let ha1 = md5_hex(&format!("{USER}:{REALM}:{PASSWORD}"));
    let ha2 = md5_hex(&format!("{method}:{digest_uri}"));
    let expected = match get("qop") {
        None => md5_hex(&format!("{ha1}:{nonce}:{ha2}")),
        Some(q) if q.eq_ignore_ascii_case("auth") => {
            let (Some(nc), Some(cnonce)) = (get("nc"), get("cnonce")) else {
                return Auth::Denied { stale: false };
            };
            md5_hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:{q}:{ha2}"))
        }
        Some(_) => return Auth::Denied { stale: false },
    };
    if !same(
        expected.as_bytes(),
        response.to_ascii_lowercase().as_bytes(),
    ) {
        return Auth::Denied { stale: false };
    }
    match prov.nonces().check(nonce, now) {
        NonceState::Fresh => Auth::Granted,
        NonceState::Expired | NonceState::Unknown => Auth::Denied { stale: true },
    }
}

/// 401 with a Digest and a Basic challenge (in that order).
fn challenge(prov: &Provisioning, stale: bool) -> Response {
    let nonce = prov.nonces().issue(Instant::now());
    let digest = format!(
        "Digest realm=\"{REALM}\", qop=\"auth\", nonce=\"{nonce}\", algorithm=MD5{}",
        if stale { ", stale=true" } else { "" }
    );
    let mut r = text(StatusCode::UNAUTHORIZED, "authentication required");
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&digest) {
        h.append(header::WWW_AUTHENTICATE, v);
    }
    h.append(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"ucrelay-sim\""),
    );
    r
}

/// Lowercase hex of the MD5 of `s`.
pub(crate) fn md5_hex(s: &str) -> String {
    let d = md5::Md5::digest(s.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Comparison whose time does not depend on where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `name=value` pairs of an auth-param list (`a=b, c="d \"e\""`); values unquoted.
pub(crate) fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            continue; // a bare word: nothing to take
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((name, value));
    }
    out
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn paths_are_checked() {
        assert_eq!(
            safe_segments("/000000000000.cfg").unwrap(),
            ["000000000000.cfg"]
        );
        assert_eq!(safe_segments("//a/./b%20c/").unwrap(), ["a", "b c"]);
        // An encoded slash only makes another segment: still inside the tree.
        assert_eq!(safe_segments("/%2Fetc/passwd").unwrap(), ["etc", "passwd"]);
        for bad in [
            "/../x",
            "/a/../../x",
            "/%2e%2e/x",
            "/%2E%2E%2Fx",
            "/a\\b",
            "/a%5cb",
            "/a%00b",
            "/a%0ab",
            "x",
            "/%ff",
        ] {
            assert!(safe_segments(bad).is_err(), "{bad} accepted");
        }
        assert!(safe_segments(&format!("/{}", "a".repeat(256))).is_err());
        assert!(safe_segments(&"/a".repeat(33)).is_err());
    }

    #[test]
    fn reserved_paths() {
        for p in ["/relay/v1/register", "/sim/stats", "/sim", "/relay"] {
            assert!(is_reserved(p), "{p}");
        }
        for p in ["/000000000000.cfg", "/simple.cfg", "/relay.cfg", "/x/sim/y"] {
            assert!(!is_reserved(p), "{p}");
        }
    }

    #[test]
    fn nonces_expire_and_are_forgotten() {
        let mut n = Nonces::default();
        let t0 = Instant::now();
        let a = n.issue(t0);
        assert_eq!(a.len(), 64);
        assert_ne!(a, n.issue(t0));
        assert_eq!(
            n.check(&a, t0 + NONCE_TTL - Duration::from_secs(1)),
            NonceState::Fresh
        );
        assert_eq!(n.check(&a, t0 + NONCE_TTL), NonceState::Expired);
        assert_eq!(n.check("made-up", t0), NonceState::Unknown);
        // Bounded: old ones make room.
        for _ in 0..MAX_NONCES + 5 {
            n.issue(t0 + NONCE_FORGET_AFTER);
        }
        assert!(n.issued.len() <= MAX_NONCES);
        assert_eq!(n.check(&a, t0 + NONCE_FORGET_AFTER), NonceState::Unknown);
    }

    #[test]
    fn auth_params_and_dates() {
        assert_eq!(
            parse_params(r#"username="PlcmSpIp", realm="a \"b\"", nc=00000001 ,qop=auth"#),
            [
                ("username".into(), "PlcmSpIp".into()),
                ("realm".into(), "a \"b\"".into()),
                ("nc".into(), "00000001".into()),
                ("qop".into(), "auth".into())
            ]
        );
        assert_eq!(md5_hex(""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
    }
}
