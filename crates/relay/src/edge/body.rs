//! The bodies the edge answers with: its own short text answers, and the access-log wrapper every
//! answer passes through, which writes one log line when the body is done.

use super::conn::DeviceConn;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type EdgeBody = BoxBody<Bytes, BoxError>;

/// A short plain-text answer of the edge's own (errors, refusals).
pub fn text_response(status: StatusCode, text: &str) -> Response<EdgeBody> {
    let body = text_body(status, text);
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The text of the edge's own answers: `502 Bad Gateway: why`.
pub fn text_body(status: StatusCode, text: &str) -> String {
    format!(
        "{} {}: {text}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

pub(super) struct AccessLine {
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub mac: Option<String>,
    pub started: Instant,
}

/// Passes the response body through, counting bytes, and writes the access log line when the body
/// is done (or the device went away), so the line has the real byte count and duration.
pub(super) struct AccessLogBody {
    pub inner: EdgeBody,
    pub bytes: u64,
    pub line: Option<AccessLine>,
    pub conn: Arc<DeviceConn>,
}

impl Body for AccessLogBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(d) = frame.data_ref()
        {
            self.bytes += d.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AccessLogBody {
    fn drop(&mut self) {
        if let Some(l) = self.line.take() {
            self.conn
                .edge
                .stats
                .local()
                .bytes_out
                .fetch_add(self.bytes, Ordering::Relaxed);
            crate::util::logwriter::log_access(&crate::util::logwriter::AccessRecord {
                method: l.method.as_str(),
                path: &l.path,
                status: l.status,
                bytes: self.bytes,
                duration_ms: l.started.elapsed().as_millis() as u64,
                client: self.conn.peer.ip(),
                mac: l.mac.as_deref(),
            });
        }
    }
}
