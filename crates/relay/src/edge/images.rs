//! The image handler: serves verified files from the image cache to devices: GET and HEAD, one byte range (206, or 416 when
//! it cannot be met), ETag from the SHA-256, Last-Modified, If-None-Match and If-Range. The file is
//! streamed in fixed-size chunks, so memory per download stays the same whatever the file's size.

use super::body::{BoxError, EdgeBody, text_response};
use super::conn::SocketState;
use crate::cache::{Catalog, Lookup};
use crate::util::time::http_date;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Incoming;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

/// One TLS record's worth: a bigger read only waits in buffers, and at a thousand downloads at
/// once every kilobyte held per connection counts.
const CHUNK: usize = 16 * 1024;

/// The answer for `path` when it is an image path: the file once verified, else 503 with
/// `Retry-After` while it syncs. `None` when the cache does not list the path.
pub async fn answer(
    cache: &Arc<Catalog>,
    req: &Request<Incoming>,
    socket: &Arc<SocketState>,
    path: &str,
) -> Option<Response<EdgeBody>> {
    match cache.lookup(path) {
        Lookup::Ready { file, sha256, size } => {
            Some(serve(cache, req, Some(socket.clone()), path, &file, &sha256, size).await)
        }
        Lookup::NotReady { done, size } => {
            cache
                .stats
                .refused_not_synced
                .fetch_add(1, Ordering::Relaxed);
            let pct = (done * 100).checked_div(size).unwrap_or(0);
            let mut r = text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "{path} is still syncing to this relay ({pct}% done); it is served once verified"
                ),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
            Some(r)
        }
        Lookup::Unknown => None,
    }
}

/// Answers one request for a verified file.
async fn serve(
    catalog: &Arc<Catalog>,
    req: &http::Request<hyper::body::Incoming>,
    socket: Option<Arc<SocketState>>,
    device_path: &str,
    file: &Path,
    sha256: &str,
    size: u64,
) -> Response<EdgeBody> {
    let (method, headers) = (req.method(), req.headers());
    if method != Method::GET && method != Method::HEAD {
        let mut r = text_response(StatusCode::METHOD_NOT_ALLOWED, "image files are read-only");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let etag = format!("\"{sha256}\"");
    let modified = std::fs::metadata(file)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut base = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, http_date(modified))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, content_type(device_path));

    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        && inm.split(',').any(|t| {
            t.trim() == etag || t.trim() == "*" || t.trim().trim_start_matches("W/") == etag
        })
    {
        return finish(
            base.status(StatusCode::NOT_MODIFIED),
            Empty::new().map_err(|n| match n {}).boxed(),
        );
    }

    // A Range applies only when If-Range (if any) still names this exact file.
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .map(|v| v.to_str().map(|s| s.trim() == etag).unwrap_or(false))
        .unwrap_or(true);
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) if if_range_ok => match parse_range(r, size) {
            RangeSpec::None => None,
            RangeSpec::Unsatisfiable => {
                let r = base
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{size}"));
                return finish(r, Empty::new().map_err(|n| match n {}).boxed());
            }
            RangeSpec::Range(a, b) => Some((a, b)),
        },
        _ => None,
    };
    let (status, start, len) = match range {
        Some((a, b)) => {
            base = base.header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{size}"));
            (StatusCode::PARTIAL_CONTENT, a, b - a + 1)
        }
        None => (StatusCode::OK, 0, size),
    };
    base = base.status(status).header(header::CONTENT_LENGTH, len);
    if method == Method::HEAD {
        return finish(base, Empty::new().map_err(|n| match n {}).boxed());
    }
    // The cap on devices downloading at once: past it, ask them to come back.
    let Some(slot) = catalog.try_serve() else {
        catalog.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
        let mut r = text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many devices are downloading images; retry shortly",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
        return r;
    };
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(file = %file.display(), error = %e, "cannot open a synced image file");
            return text_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cached image file unreadable",
            );
        }
    };
    catalog
        .stats
        .downloads_total
        .fetch_add(1, Ordering::Relaxed);
    let chunks = FileChunks {
        file: f,
        pos: start,
        end: start + len,
        socket,
        guard: ActiveGuard {
            catalog: catalog.clone(),
            _slot: slot,
        },
    };
    finish(base, BodyExt::boxed(StreamBody::new(chunks)))
}

/// A file range as body frames, one chunk per poll. Reads are positioned reads (`pread`) on the
/// connection's own task: a firmware image being served to a fleet sits in the page cache, where
/// a 16 KiB read takes microseconds, and going through the blocking pool for each chunk would
/// cost more than the read. The next chunk is read only when the device's socket has taken the
/// previous one (`SocketState::poll_writable`), so a download holds one chunk, in hyper or as a
/// TLS record in rustls, however big the file and however slow the device.
struct FileChunks {
    file: std::fs::File,
    pos: u64,
    end: u64,
    /// The device's socket: the next chunk waits until it has taken the last one.
    socket: Option<Arc<SocketState>>,
    guard: ActiveGuard,
}

impl futures_util::Stream for FileChunks {
    type Item = Result<hyper::body::Frame<Bytes>, BoxError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::os::unix::fs::FileExt;
        use std::task::Poll;
        if self.pos >= self.end {
            return Poll::Ready(None);
        }
        if let Some(s) = &self.socket {
            std::task::ready!(s.poll_writable(cx));
        }
        let n = CHUNK.min((self.end - self.pos) as usize);
        let mut buf = bytes::BytesMut::zeroed(n);
        match self.file.read_at(&mut buf, self.pos) {
            Ok(0) => Poll::Ready(Some(Err("cached image file ended early".into()))),
            Ok(k) => {
                buf.truncate(k);
                self.pos += k as u64;
                self.guard
                    .catalog
                    .stats
                    .bytes_served
                    .fetch_add(k as u64, Ordering::Relaxed);
                Poll::Ready(Some(Ok(hyper::body::Frame::data(buf.freeze()))))
            }
            Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
        }
    }
}

/// Ends an active download when the body is done or the device goes away (the slot counts it).
struct ActiveGuard {
    catalog: Arc<Catalog>,
    _slot: crate::cache::ServeSlot,
}

fn finish(b: http::response::Builder, body: EdgeBody) -> Response<EdgeBody> {
    b.body(body)
        .unwrap_or_else(|e| text_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))
}

/// What a `Range` header asks of a file, as [`parse_range`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// No usable single range: the whole file is answered (200).
    None,
    /// The range starts past the end: 416.
    Unsatisfiable,
    /// Inclusive first and last byte.
    Range(u64, u64),
}

/// One byte range per RFC 9110 §14.1.2. Several ranges are answered with the whole file. Public
/// for the fuzz targets and the corpus replay test; a `Range(a, b)` always has `a <= b < size`.
pub fn parse_range(v: &str, size: u64) -> RangeSpec {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return RangeSpec::None;
    };
    if spec.contains(',') {
        return RangeSpec::None;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::None;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // The last b bytes.
        let Ok(n) = b.parse::<u64>() else {
            return RangeSpec::None;
        };
        if n == 0 || size == 0 {
            return RangeSpec::Unsatisfiable;
        }
        return RangeSpec::Range(size.saturating_sub(n), size - 1);
    }
    let Ok(first) = a.parse::<u64>() else {
        return RangeSpec::None;
    };
    let last = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(l) if l >= first => l.min(size.saturating_sub(1)),
            _ => return RangeSpec::None,
        }
    };
    if first >= size {
        RangeSpec::Unsatisfiable
    } else {
        RangeSpec::Range(first, last)
    }
}

fn content_type(path: &str) -> &'static str {
    let lower = path.to_ascii_lowercase();
    match lower.rsplit('.').next().unwrap_or("") {
        "cfg" | "xml" => "application/xml",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        "txt" | "log" => "text/plain",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |s: &str| match parse_range(s, 1000) {
            RangeSpec::None => "none".to_string(),
            RangeSpec::Unsatisfiable => "416".to_string(),
            RangeSpec::Range(a, b) => format!("{a}-{b}"),
        };
        assert_eq!(r("bytes=0-99"), "0-99");
        assert_eq!(r("bytes=900-"), "900-999");
        assert_eq!(r("bytes=-100"), "900-999");
        assert_eq!(r("bytes=-5000"), "0-999");
        assert_eq!(r("bytes=990-5000"), "990-999");
        assert_eq!(r("bytes=1000-"), "416");
        assert_eq!(r("bytes=-0"), "416");
        assert_eq!(r("bytes=5-1"), "none");
        assert_eq!(r("bytes=0-1,5-6"), "none");
        assert_eq!(r("items=0-1"), "none");
    }
}
