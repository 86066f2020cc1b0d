//! The direct path: the edge's own HTTP/1 for the request that makes up nearly all provisioning
//! traffic, a GET or HEAD without a body for a file the upstream has.
//!
//! Such a request is forwarded without building a request or header map on either side: the
//! device's head is parsed in place, rewritten into the upstream's head (hop-by-hop headers
//! dropped, Host replaced, X-Forwarded-* added, everything else in the device's order and
//! spelling), and the upstream's answer goes back with its head rewritten the same way, the
//! framing headers written by the relay (one Content-Length, or chunked), and its body passed
//! through as it came while the relay follows the framing to find its end. That is what nginx's
//! proxy module does, and it spends less per request than a general HTTP stack that turns each
//! message into a typed request and back.
//!
//! Everything else takes the long way: a request with a body, an upgrade, an `Expect`, HTTP/1.0,
//! an image or upload path, a target `http::Uri` would refuse, a head that does not parse,
//! anything this module is not certain of. The connection is then handed, with the bytes already
//! read, to the general server (`hyper`), which answers it and every later request on it. An
//! upstream answer the relay cannot frame with certainty (two different lengths, a transfer
//! coding other than chunked, a 101, a length list such as `5, 5`) is a 502, never passed on.
//! Besides that, what the device sees differs from the general server's answer in the header order
//! and spelling, which are the upstream's, and for an answer without a length or chunks, which
//! goes to the device as it came and closes its connection (the general server would chunk it).

use super::{Fail, Upstream};
use crate::edge::conn::DeviceConn;
use crate::edge::router;
use std::borrow::Cow;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Headers a device request may carry on the direct path; more goes the long way.
const MAX_HEADERS: usize = 64;
/// Headers an upstream answer may carry.
const UP_MAX_HEADERS: usize = 100;
/// The largest upstream answer head taken.
const UP_MAX_HEAD: usize = 64 * 1024;
/// Bytes read from the upstream at a time while a body streams.
const READ_CHUNK: usize = 16 * 1024;
/// Room for an answer's head and a typical config file in one read; also about what a connection
/// keeps of each buffer between requests.
const FIRST_READ: usize = 8 * 1024;
/// The longest chunk-size line taken (size, extensions, CRLF), and the longest trailer line.
const MAX_CHUNK_LINE: usize = 4096;

/// Request headers the relay writes itself (or, for `Expect`, has answered).
const REWRITTEN: [&str; 5] = [
    "expect",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// Whether `name` describes one connection only (RFC 9110 §7.6.1), as the general path's list has it.
fn hop_by_hop(name: &str) -> bool {
    super::HOP_BY_HOP
        .iter()
        .any(|h| h.as_str().eq_ignore_ascii_case(name))
}

fn is_one_of(name: &str, list: &[&str]) -> bool {
    list.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// How the direct path left a connection.
pub(crate) enum Served<I> {
    /// Closed, or the device is gone.
    Closed,
    /// A request it does not take: the general server goes on from the bytes already read.
    Handoff(Rewind<I>),
}

/// A device stream with bytes already read from it put back in front.
pub(crate) struct Rewind<I> {
    prefix: Vec<u8>,
    at: usize,
    inner: I,
}

impl<I> Rewind<I> {
    pub(crate) fn new(prefix: Vec<u8>, inner: I) -> Rewind<I> {
        Rewind {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One device request the direct path takes, worked out from its head.
struct Plan<'c> {
    upstream: Cow<'c, Arc<Upstream>>,
    head_len: usize,
    is_head: bool,
    /// The device asked to close after this answer.
    close: bool,
    /// For the access line: the path without the query, the phone's MAC.
    path: String,
    mac: Option<String>,
}

/// What a device head says, once it has all arrived.
enum Step<'c> {
    Partial,
    Take(Plan<'c>),
    Handoff,
}

/// Reads the device head in `buf` and, when the direct path takes it, writes the upstream's head
/// into `up_head`.
fn plan<'c>(conn: &'c DeviceConn, buf: &[u8], up_head: &mut Vec<u8>) -> Step<'c> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Step::Partial,
        Err(_) => return Step::Handoff,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Step::Handoff;
    };
    // Only the characters the general server's URI parser takes without complaint, and no
    // fragment; anything else gets its answer (a 400, mostly) there.
    if !target_chars_plain(target) {
        return Step::Handoff;
    }
    let is_head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Step::Handoff,
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut close = false;
    let mut host = None;
    let mut forwarded_for = None;
    let mut user_agent = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if h.value.trim_ascii() != b"0" {
                return Step::Handoff;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Step::Handoff;
        } else if name.eq_ignore_ascii_case("connection") {
            // Only the two options every client sends; any other name would be one more
            // hop-by-hop header to drop, which the long way knows how to do.
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                    return Step::Handoff;
                }
            }
        } else if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Step::Handoff;
            }
            host = Some(h.value);
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            if forwarded_for.is_none() {
                forwarded_for = Some(h.value);
            }
        } else if name.eq_ignore_ascii_case("user-agent") && user_agent.is_none() {
            user_agent = Some(std::str::from_utf8(h.value).unwrap_or(""));
        }
    }
    let Some(upstream) = router::plain_upstream(conn, path, query) else {
        return Step::Handoff;
    };

    up_head.clear();
    up_head.extend_from_slice(method.as_bytes());
    up_head.push(b' ');
    if !upstream.base.base_path.is_empty() {
        up_head.extend_from_slice(upstream.base.base_path.as_bytes());
    }
    up_head.extend_from_slice(target.as_bytes());
    up_head.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        if hop_by_hop(h.name) || is_one_of(h.name, &REWRITTEN) {
            continue;
        }
        push_header(up_head, h.name.as_bytes(), h.value);
    }
    push_header(up_head, b"host", upstream.host.as_bytes());
    let ip = conn.peer.ip();
    up_head.extend_from_slice(b"x-forwarded-for: ");
    // A previous hop's list is kept when it is plain text, as `HeaderValue::to_str` has it.
    if let Some(prev) = forwarded_for.map(<[u8]>::trim_ascii)
        && !prev.is_empty()
        && prev
            .iter()
            .all(|b| *b == b'\t' || (b' '..=b'~').contains(b))
    {
        up_head.extend_from_slice(prev);
        up_head.extend_from_slice(b", ");
    }
    let _ = write!(up_head, "{ip}\r\n");
    push_header(up_head, b"x-forwarded-proto", conn.scheme.as_bytes());
    if let Some(h) = host {
        push_header(up_head, b"x-forwarded-host", h);
    }
    up_head.extend_from_slice(b"\r\n");
    Step::Take(Plan {
        upstream,
        head_len,
        is_head,
        close,
        path: path.to_string(),
        mac: user_agent.and_then(router::mac_in_user_agent),
    })
}

/// Whether every byte of a request target is one `http::Uri` takes as it is: its path and query
/// tables (http 1.x `PathAndQuery`), without `#`, which it would cut off.
fn target_chars_plain(target: &str) -> bool {
    let mut in_query = false;
    target.bytes().all(|b| match b {
        b'?' => {
            in_query = true;
            true
        }
        b'#' => false,
        _ if in_query => matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E),
        _ => matches!(
            b,
            0x21 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7A | 0x7C | 0x7E | b'"' | b'{' | b'}'
        ),
    })
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How an upstream answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// An upstream answer's head, already rewritten for the device into `out`.
struct Answer {
    status: u16,
    head_len: usize,
    framing: Framing,
    /// The upstream connection can carry another request once this body has been read.
    reusable: bool,
}

/// Why an upstream exchange failed before its answer's head.
enum HeadError {
    /// Not a byte came back (a kept-alive connection the upstream had closed): safe to retry.
    Nothing(String),
    Bad(String),
}

/// Sends `head` and reads the answer's head into `buf`, writing the device's head into `out`.
async fn send_and_read(
    io: &mut super::UpIo,
    head: &[u8],
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    plan_is_head: bool,
    close: bool,
) -> Result<Answer, HeadError> {
    if let Err(e) = io.write_all(head).await {
        return Err(HeadError::Nothing(e.to_string()));
    }
    if let Err(e) = io.flush().await {
        return Err(HeadError::Nothing(e.to_string()));
    }
    buf.clear();
    let mut received = false;
    loop {
        if !buf.is_empty() {
            match read_answer_head(buf, out, plan_is_head, close) {
                Ok(Some(answer)) => return Ok(answer),
                Ok(None) => {}
                Err(e) => return Err(HeadError::Bad(e)),
            }
            if buf.len() > UP_MAX_HEAD {
                return Err(HeadError::Bad(format!(
                    "answer head over {} KiB",
                    UP_MAX_HEAD / 1024
                )));
            }
        }
        buf.reserve(FIRST_READ);
        match io.read_buf(buf).await {
            Ok(0) if !received => {
                return Err(HeadError::Nothing(
                    "the upstream closed the connection".into(),
                ));
            }
            Ok(0) => return Err(HeadError::Bad("the answer's head was cut short".into())),
            Ok(_) => received = true,
            Err(e) if !received => return Err(HeadError::Nothing(e.to_string())),
            Err(e) => return Err(HeadError::Bad(e.to_string())),
        }
    }
}

/// Parses the answer head at the start of `buf`. Interim (1xx) answers are dropped from `buf`.
/// `Ok(None)` while the head is incomplete.
fn read_answer_head(
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    is_head: bool,
    close: bool,
) -> Result<Option<Answer>, String> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; UP_MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("invalid answer head: {e}")),
        };
        let (Some(code), Some(version)) = (resp.code, resp.version) else {
            return Err("invalid answer head".into());
        };
        if code < 100 {
            return Err(format!("invalid status {code}"));
        }
        if code == 101 {
            return Err("the upstream switched protocols unasked".into());
        }
        if (100..200).contains(&code) {
            buf.drain(..head_len);
            continue;
        }
        let mut reusable = version == 1;
        let mut lengths = None::<u64>;
        let mut chunked = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let n = parse_length(h.value).ok_or("invalid Content-Length")?;
                if lengths.is_some_and(|m| m != n) {
                    return Err("conflicting Content-Length headers".into());
                }
                lengths = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                if chunked || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err(format!(
                        "unsupported Transfer-Encoding {:?}",
                        String::from_utf8_lossy(h.value)
                    ));
                }
                chunked = true;
            } else if h.name.eq_ignore_ascii_case("connection")
                && h.value
                    .split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                reusable = false;
            }
        }
        let framing = if is_head || code == 204 || code == 304 {
            Framing::Empty
        } else if chunked {
            if lengths.is_some() {
                // Both: the chunks decide (RFC 9112 §6.3), and the connection is not reused.
                reusable = false;
            }
            Framing::Chunked
        } else if let Some(n) = lengths {
            Framing::Length(n)
        } else {
            reusable = false;
            Framing::Close
        };

        // The device's head: the status line, the end-to-end headers, and the framing.
        out.clear();
        let _ = write!(out, "HTTP/1.1 {code} ");
        let reason = resp.reason.filter(|r| !r.is_empty()).or_else(|| {
            http::StatusCode::from_u16(code)
                .ok()
                .and_then(|s| s.canonical_reason())
        });
        out.extend_from_slice(reason.unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        // The framing headers are the relay's own: one Content-Length, or chunked and no length
        // (never both, whatever the upstream sent). A bodiless answer keeps the upstream's
        // length, once (a HEAD's is the GET's).
        let mut dated = false;
        for h in resp.headers.iter() {
            if hop_by_hop(h.name)
                || h.name.eq_ignore_ascii_case("content-length")
                || named_in_connection(resp.headers, h.name)
            {
                continue;
            }
            dated |= h.name.eq_ignore_ascii_case("date");
            push_header(out, h.name.as_bytes(), h.value);
        }
        if !dated {
            push_header(out, b"date", http_date().as_bytes());
        }
        match (framing, lengths) {
            (Framing::Length(n), _) | (Framing::Empty, Some(n)) => {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            (Framing::Chunked, _) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            (Framing::Empty | Framing::Close, _) => {}
        }
        if close || framing == Framing::Close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        return Ok(Some(Answer {
            status: code,
            head_len,
            framing,
            reusable,
        }));
    }
}

/// An upstream answer as the direct path reads it, for the fuzz harness: the status, the head the
/// device would get and where the body ends in `data` (`None`: not within it). `Ok(None)` while
/// the head is incomplete; `Err` for an answer the relay refuses (502).
pub fn probe_answer(data: &[u8], is_head: bool) -> Result<Option<Probed>, String> {
    let mut buf = data.to_vec();
    let mut out = Vec::new();
    let Some(a) = read_answer_head(&mut buf, &mut out, is_head, false)? else {
        return Ok(None);
    };
    // `buf` lost the interim answers before the final head.
    let skipped = data.len() - buf.len();
    let rest = &buf[a.head_len..];
    let end = match a.framing {
        Framing::Empty => Some(0),
        Framing::Length(n) => usize::try_from(n).ok().filter(|n| *n <= rest.len()),
        Framing::Chunked => Chunks::default().scan(rest).map_err(str::to_string)?,
        Framing::Close => None,
    };
    Ok(Some(Probed {
        status: a.status,
        head: out,
        body_end: end.map(|e| skipped + a.head_len + e),
    }))
}

/// What [`probe_answer`] found.
pub struct Probed {
    pub status: u16,
    pub head: Vec<u8>,
    pub body_end: Option<usize>,
}

/// Now as an HTTP date, made once a second per thread (a recipient passing on an answer without
/// a Date adds one, RFC 9110 §6.6.1).
fn http_date() -> std::rc::Rc<str> {
    thread_local! {
        static NOW: std::cell::RefCell<(u64, std::rc::Rc<str>)> =
            std::cell::RefCell::new((u64::MAX, std::rc::Rc::from("")));
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    NOW.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, std::rc::Rc::from(httpdate::fmt_http_date(now)));
        }
        cached.1.clone()
    })
}

/// Whether the answer's `Connection` header names `name` (which makes it hop-by-hop).
fn named_in_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

/// A Content-Length value: digits only, no sign, no overflow.
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Follows a chunked body as it passes through, to find where it ends; the bytes themselves go
/// on unchanged.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    /// Data bytes left in the current chunk.
    left: u64,
    /// Bytes of the current size or trailer line so far.
    line: usize,
    size: u64,
    digits: usize,
    /// Past the size's digits: whitespace, then `;` extensions or the line's end.
    after_size: bool,
    in_ext: bool,
    /// Data bytes seen, for the access line.
    data: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunks {
    /// Reads `data`; returns where the body ends in it, once it does.
    fn scan(&mut self, data: &[u8]) -> Result<Option<usize>, &'static str> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                ChunkState::Size => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err("chunk size line too long");
                    }
                    if b == b'\r' {
                        if self.digits == 0 {
                            return Err("chunk size missing");
                        }
                        self.state = ChunkState::SizeLf;
                    } else if self.in_ext {
                        if b == b'\n' {
                            return Err("bare LF in chunk size line");
                        }
                    } else if b == b';' {
                        if self.digits == 0 {
                            return Err("chunk size missing");
                        }
                        self.in_ext = true;
                    } else if b == b' ' || b == b'\t' {
                        if self.digits == 0 {
                            return Err("chunk size missing");
                        }
                        self.after_size = true;
                    } else if self.after_size {
                        return Err("invalid chunk size");
                    } else {
                        let d = (b as char).to_digit(16).ok_or("invalid chunk size")?;
                        self.digits += 1;
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(d)))
                            .ok_or("chunk size overflows")?;
                    }
                }
                ChunkState::SizeLf => {
                    expect(b, b'\n', "chunk size line not ended by CRLF")?;
                    self.left = self.size;
                    self.state = if self.size == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data
                    };
                    (self.size, self.digits, self.line) = (0, 0, 0);
                    (self.after_size, self.in_ext) = (false, false);
                }
                ChunkState::Data => {
                    let take =
                        (data.len() - i).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                    self.left -= take as u64;
                    self.data += take as u64;
                    i += take;
                    if self.left == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => {
                    expect(b, b'\r', "chunk data not followed by CRLF")?;
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    expect(b, b'\n', "chunk data not followed by CRLF")?;
                    self.state = ChunkState::Size;
                }
                ChunkState::TrailerStart => {
                    self.state = if b == b'\r' {
                        ChunkState::EndLf
                    } else if b == b'\n' {
                        return Err("bare LF in trailers");
                    } else {
                        self.line = 1;
                        ChunkState::Trailer
                    };
                }
                ChunkState::Trailer => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err("trailer line too long");
                    }
                    if b == b'\r' {
                        self.state = ChunkState::TrailerLf;
                    } else if b == b'\n' {
                        return Err("bare LF in trailers");
                    }
                }
                ChunkState::TrailerLf => {
                    expect(b, b'\n', "trailer line not ended by CRLF")?;
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::EndLf => {
                    expect(b, b'\n', "chunked body not ended by CRLF")?;
                    self.state = ChunkState::Done;
                    return Ok(Some(i + 1));
                }
                ChunkState::Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok((self.state == ChunkState::Done).then_some(data.len()))
    }
}

/// The byte a chunked body must have here, or why it is refused.
fn expect(b: u8, want: u8, why: &'static str) -> Result<(), &'static str> {
    if b == want { Ok(()) } else { Err(why) }
}

/// Sends the request on the held connection, a pooled one or a new one. A kept-alive connection
/// that turns out to be closed before a byte of the answer came back is replaced by a new one,
/// once: the request (a GET or HEAD) is safe to send again.
async fn exchange(
    up: &Upstream,
    held: Option<(super::UpIo, Instant)>,
    head: &[u8],
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    plan: &Plan<'_>,
    close: bool,
) -> Result<(Answer, super::UpIo), Fail> {
    // The connection the last request used is checked like a pooled one: its idle time, and bytes
    // the upstream sent past that answer's end or its close (a read that does not wait; after a
    // short read tokio knows nothing is pending, so it usually costs no system call).
    let reused = held
        .filter(|(_, at)| at.elapsed() < super::lane::IDLE)
        .and_then(|(mut io, _)| super::lane::still_open(&mut io).then_some(io))
        .or_else(|| up.raw_pool.take());
    let (mut io, fresh) = match reused {
        Some(io) => (io, false),
        None => (up.connect_io().await?, true),
    };
    match send_and_read(&mut io, head, buf, out, plan.is_head, close).await {
        Ok(a) => Ok((a, io)),
        Err(HeadError::Nothing(why)) if !fresh => {
            debug!(upstream = %up.base, %why, "a kept-alive upstream connection was gone; using a new one");
            let mut io = up.connect_io().await?;
            match send_and_read(&mut io, head, buf, out, plan.is_head, close).await {
                Ok(a) => Ok((a, io)),
                Err(HeadError::Nothing(why) | HeadError::Bad(why)) => Err(Fail::Upstream(why)),
            }
        }
        Err(HeadError::Nothing(why) | HeadError::Bad(why)) => Err(Fail::Upstream(why)),
    }
}

/// How a body relay ended short.
enum Cut {
    /// The device is gone.
    Device,
    /// The upstream broke the answer off or framed it wrongly.
    Upstream(String),
    /// The body was framed wrongly from its first bytes: nothing went to the device.
    Refused(String),
}

/// What a body relay sent.
struct Relayed {
    /// Body bytes (data bytes for a chunked body), for the access line.
    bytes: u64,
    /// The upstream sent nothing past the answer's end.
    clean: bool,
}

/// Sends the device head in `out` and the body after it: what came with the head in
/// `buf[head_len..]`, then what the upstream sends, until the framing says the body ended.
async fn relay_body<D, U>(
    dev: &mut D,
    up: &mut U,
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    head_len: usize,
    framing: Framing,
) -> Result<Relayed, (Cut, u64)>
where
    D: AsyncWrite + Unpin,
    U: AsyncRead + Unpin,
{
    let rest = buf.get(head_len..).unwrap_or_default();
    let mut sent = 0u64;
    let clean = match framing {
        Framing::Empty => {
            write(dev, out, 0).await?;
            rest.is_empty()
        }
        Framing::Length(n) => {
            let take = usize::try_from(n).map_or(rest.len(), |n| n.min(rest.len()));
            out.extend_from_slice(&rest[..take]);
            let clean = rest.len() == take;
            sent = take as u64;
            write(dev, out, 0).await?;
            let mut left = n - take as u64;
            while left > 0 {
                buf.clear();
                buf.reserve(READ_CHUNK);
                let want = left.min(READ_CHUNK as u64);
                match (&mut *up).take(want).read_buf(buf).await {
                    Ok(0) => return Err((Cut::Upstream("the body was cut short".into()), sent)),
                    Ok(got) => left -= got as u64,
                    Err(e) => return Err((Cut::Upstream(e.to_string()), sent)),
                }
                write(dev, buf, sent).await?;
                sent += buf.len() as u64;
            }
            clean
        }
        Framing::Chunked => {
            let mut chunks = Chunks::default();
            let end = chunks.scan(rest).map_err(|e| (Cut::Refused(e.into()), 0))?;
            out.extend_from_slice(&rest[..end.unwrap_or(rest.len())]);
            let mut clean = end.is_none_or(|e| e == rest.len());
            write(dev, out, 0).await?;
            if end.is_none() {
                loop {
                    buf.clear();
                    buf.reserve(READ_CHUNK);
                    match up.read_buf(buf).await {
                        Ok(0) => {
                            return Err((
                                Cut::Upstream("the body was cut short".into()),
                                chunks.data,
                            ));
                        }
                        Ok(_) => {}
                        Err(e) => return Err((Cut::Upstream(e.to_string()), chunks.data)),
                    }
                    let end = chunks
                        .scan(buf)
                        .map_err(|e| (Cut::Upstream(e.into()), chunks.data))?;
                    if let Some(end) = end {
                        clean = end == buf.len();
                        buf.truncate(end);
                        write(dev, buf, chunks.data).await?;
                        break;
                    }
                    write(dev, buf, chunks.data).await?;
                }
            }
            sent = chunks.data;
            clean
        }
        Framing::Close => {
            out.extend_from_slice(rest);
            sent = rest.len() as u64;
            write(dev, out, 0).await?;
            loop {
                buf.clear();
                buf.reserve(READ_CHUNK);
                match up.read_buf(buf).await {
                    Ok(0) => break,
                    Ok(got) => {
                        write(dev, buf, sent).await?;
                        sent += got as u64;
                    }
                    Err(e) => return Err((Cut::Upstream(e.to_string()), sent)),
                }
            }
            false
        }
    };
    Ok(Relayed { bytes: sent, clean })
}

/// Writes to the device and flushes, so that nothing waits in the TLS layer while the next
/// piece is read from the upstream.
async fn write<D: AsyncWrite + Unpin>(
    dev: &mut D,
    data: &[u8],
    sent: u64,
) -> Result<(), (Cut, u64)> {
    dev.write_all(data).await.map_err(|_| (Cut::Device, sent))?;
    dev.flush().await.map_err(|_| (Cut::Device, sent))
}

/// The edge's own short answer (502, 504), as `body::text_response` words it; the body's length,
/// which a HEAD answer announces without sending.
fn own_answer(
    out: &mut Vec<u8>,
    status: http::StatusCode,
    text: &str,
    is_head: bool,
    close: bool,
) -> u64 {
    let body = crate::edge::body::text_body(status, text);
    out.clear();
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .as_bytes(),
    );
    push_header(out, b"date", http_date().as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if is_head {
        return 0;
    }
    out.extend_from_slice(body.as_bytes());
    body.len() as u64
}

/// Counts and logs one answered request, as the router does for the long way.
fn record(conn: &DeviceConn, plan: &Plan<'_>, status: u16, bytes: u64, started: Instant) {
    let stats = conn.edge.stats.local();
    router::count_answer(stats, status);
    stats.bytes_out.fetch_add(bytes, Ordering::Relaxed);
    crate::util::logwriter::log_access(&crate::util::logwriter::AccessRecord {
        method: if plan.is_head { "HEAD" } else { "GET" },
        path: &plan.path,
        status,
        bytes,
        duration_ms: started.elapsed().as_millis() as u64,
        client: conn.peer.ip(),
        mac: plan.mac.as_deref(),
    });
}

/// Serves the device connection's requests for as long as the direct path takes them.
pub(crate) async fn serve<I>(
    conn: &Arc<DeviceConn>,
    mut io: I,
    shutdown: &CancellationToken,
    header_timeout: Duration,
    max_head: usize,
) -> Served<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    // A token of the connection's own: waiting on the relay-wide one would have every
    // connection take the same lock for each request.
    let shutdown = shutdown.child_token();
    let mut buf: Vec<u8> = Vec::new();
    let mut up_head = Vec::new();
    let mut up_buf = Vec::new();
    let mut out = Vec::new();
    // The upstream connection the requests use, kept between them, and the upstream it belongs
    // to (a reference taken once, not per request).
    let mut lane: Option<(super::UpIo, Instant)> = None;
    let mut owner: Option<Arc<Upstream>> = None;
    let served = loop {
        // A whole request head, or the reason there is none. As in the general server, the
        // header deadline runs from the moment the connection waits for a request, so it also
        // closes a kept-alive connection that sends no next one.
        let deadline = tokio::time::Instant::now() + header_timeout;
        let plan = loop {
            if shutdown.is_cancelled() {
                // No new request once the relay shuts down, pipelined or half-read ones included.
                buf.clear();
                break None;
            }
            if !buf.is_empty() {
                match plan(conn, &buf, &mut up_head) {
                    Step::Take(p) => break Some(p),
                    Step::Handoff => break None,
                    Step::Partial if buf.len() >= max_head => break None,
                    Step::Partial => {}
                }
            }
            buf.reserve(4096);
            let limit = max_head.saturating_sub(buf.len()).max(1) as u64;
            let mut take = (&mut io).take(limit);
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, take.read_buf(&mut buf)) => match r {
                    Ok(r) => r,
                    Err(_) => {
                        debug!(peer = %conn.peer, "no complete request head within {header_timeout:?}");
                        Ok(0)
                    }
                },
                _ = shutdown.cancelled() => Ok(0),
            };
            match read {
                Ok(0) | Err(_) => {
                    buf.clear();
                    break None;
                }
                Ok(_) => {}
            }
        };
        let Some(plan) = plan else {
            if buf.is_empty() {
                break Served::Closed;
            }
            break Served::Handoff(Rewind::new(std::mem::take(&mut buf), io));
        };
        let started = Instant::now();
        let up: &Arc<Upstream> = &plan.upstream;
        if !owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, up)) {
            // First request, or a reload replaced the upstream: a held lane goes back to the pool
            // of the upstream it belongs to.
            if let (Some(old), Some((io, at))) = (owner.take(), lane.take()) {
                old.raw_pool.put(io, at);
            }
            owner = Some(up.clone());
        }
        // The answer in flight when the relay shuts down is its last on this connection.
        let close = plan.close || shutdown.is_cancelled();
        let exchange = exchange(
            up,
            lane.take(),
            &up_head,
            &mut up_buf,
            &mut out,
            &plan,
            close,
        );
        let answered = tokio::time::timeout(up.timeout, exchange).await;
        // A shutdown that began while the upstream answered makes this the last answer too.
        let said_close = close;
        let close = close || shutdown.is_cancelled();
        let (answer, mut up_io) = match answered {
            Ok(Ok(a)) => a,
            failed => {
                let (status, text) = match failed {
                    Ok(Err(fail)) => {
                        let (why, detail) = match fail {
                            Fail::Connect(d) => ("cannot connect to the provisioning server", d),
                            Fail::Upstream(d) => ("provisioning server failed", d),
                        };
                        tracing::warn!(upstream = %up.base, error = %detail, "{why}");
                        (http::StatusCode::BAD_GATEWAY, why.to_string())
                    }
                    _ => (
                        http::StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "provisioning server did not answer within {}",
                            humantime::format_duration(up.timeout)
                        ),
                    ),
                };
                crate::util::metrics::global().edge_request(status.as_u16(), started.elapsed());
                let bytes = own_answer(&mut out, status, &text, plan.is_head, close);
                let ok = io.write_all(&out).await.is_ok() && io.flush().await.is_ok();
                record(conn, &plan, status.as_u16(), bytes, started);
                buf.drain(..plan.head_len);
                if !ok || close {
                    let _ = io.shutdown().await;
                    break Served::Closed;
                }
                continue;
            }
        };
        if close && !said_close && answer.framing != Framing::Close {
            // `out` holds the device head alone so far: say close before its empty line.
            out.truncate(out.len().saturating_sub(2));
            out.extend_from_slice(b"connection: close\r\n\r\n");
        }
        let head_at = started.elapsed();
        let relayed = relay_body(
            &mut io,
            &mut up_io,
            &mut up_buf,
            &mut out,
            answer.head_len,
            answer.framing,
        )
        .await;
        buf.drain(..plan.head_len);
        // What a large answer or head grew is not kept for the connection's idle time.
        for (b, keep) in [
            (&mut up_buf, FIRST_READ),
            (&mut out, 2 * FIRST_READ),
            (&mut up_head, FIRST_READ),
        ] {
            if b.capacity() > keep {
                *b = Vec::new();
            }
        }
        if buf.is_empty() && buf.capacity() > FIRST_READ {
            buf = Vec::new();
        }
        let status = match &relayed {
            Err((Cut::Refused(_), _)) => http::StatusCode::BAD_GATEWAY.as_u16(),
            _ => answer.status,
        };
        crate::util::metrics::global().edge_request(status, head_at);
        match relayed {
            Ok(r) => {
                record(conn, &plan, answer.status, r.bytes, started);
                if answer.reusable && r.clean {
                    lane = Some((up_io, Instant::now()));
                }
                if close || answer.framing == Framing::Close {
                    let _ = io.shutdown().await;
                    break Served::Closed;
                }
            }
            Err((Cut::Refused(why), _)) => {
                // Nothing went to the device yet: it gets a 502, as for a head the relay refused.
                tracing::warn!(upstream = %up.base, error = %why, "provisioning server failed");
                let bytes = own_answer(
                    &mut out,
                    http::StatusCode::BAD_GATEWAY,
                    "provisioning server failed",
                    plan.is_head,
                    close,
                );
                let ok = io.write_all(&out).await.is_ok() && io.flush().await.is_ok();
                record(conn, &plan, status, bytes, started);
                if !ok || close {
                    let _ = io.shutdown().await;
                    break Served::Closed;
                }
            }
            Err((cut, bytes)) => {
                record(conn, &plan, answer.status, bytes, started);
                if let Cut::Upstream(why) = cut {
                    tracing::warn!(upstream = %up.base, error = %why, "provisioning server broke off an answer");
                }
                // The device has part of an answer: only closing tells it so.
                break Served::Closed;
            }
        }
    };
    if let (Some(owner), Some((io, at))) = (owner, lane) {
        owner.raw_pool.put(io, at);
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `body` cut into pieces of `step` bytes; the end offset in the whole.
    fn scan_in_steps(body: &[u8], step: usize) -> Result<Option<usize>, &'static str> {
        let mut chunks = Chunks::default();
        let mut at = 0;
        for piece in body.chunks(step) {
            if let Some(end) = chunks.scan(piece)? {
                return Ok(Some(at + end));
            }
            at += piece.len();
        }
        Ok(None)
    }

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_and_trailers_end_however_it_arrives() {
        let body =
            b"5\r\nhello\r\n1a;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-sum: 1\r\n\r\n";
        for step in [1, 2, 3, 7, body.len()] {
            let mut with_more = body.to_vec();
            with_more.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            assert_eq!(
                scan_in_steps(&with_more, step),
                Ok(Some(body.len())),
                "step {step}"
            );
        }
        let mut chunks = Chunks::default();
        chunks.scan(body).unwrap();
        assert_eq!(chunks.data, 31);
        assert_eq!(scan_in_steps(b"0\r\n\r\n", 1), Ok(Some(5)));
        assert_eq!(scan_in_steps(b"5\r\nhel", 2), Ok(None), "not over yet");
    }

    #[test]
    fn a_chunked_body_framed_wrongly_is_refused() {
        for bad in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"ffffffffffffffffff\r\n",
            b"0\r\n\n",
            b";ext\r\n",
            b"5 6\r\nhello\r\n",
        ] {
            assert!(
                scan_in_steps(bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(scan_in_steps(long.as_bytes(), 64).is_err());
    }

    fn answer(
        raw: &[u8],
        is_head: bool,
        close: bool,
    ) -> (Result<Option<Answer>, String>, String, Vec<u8>) {
        let mut buf = raw.to_vec();
        let mut out = Vec::new();
        let a = read_answer_head(&mut buf, &mut out, is_head, close);
        (a, String::from_utf8(out).unwrap(), buf)
    }

    #[test]
    fn an_answer_head_loses_its_hop_by_hop_headers_and_keeps_the_rest_as_written() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nDate: Mon, 07 Dec 2026 18:00:00 GMT\r\nContent-Length: 5\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Polycom-Config: Yes\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nhello";
        let (a, head, buf) = answer(raw, false, false);
        let a = a.unwrap().unwrap();
        assert_eq!(
            (a.status, a.framing, a.reusable),
            (200, Framing::Length(5), true)
        );
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nDate: Mon, 07 Dec 2026 18:00:00 GMT\r\nX-Polycom-Config: Yes\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\ncontent-length: 5\r\n\r\n"
        );
        assert_eq!(
            &buf[a.head_len..],
            b"hello",
            "the interim answer was dropped"
        );

        let (a, head, _) = answer(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            true,
        );
        let a = a.unwrap().unwrap();
        assert_eq!(a.framing, Framing::Chunked);
        assert!(
            head.ends_with("transfer-encoding: chunked\r\nconnection: close\r\n\r\n"),
            "{head}"
        );

        let (a, head, _) = answer(b"HTTP/1.1 200 OK\r\nServer: old\r\n\r\n", false, false);
        let a = a.unwrap().unwrap();
        assert_eq!((a.framing, a.reusable), (Framing::Close, false));
        assert!(head.ends_with("connection: close\r\n\r\n"));

        for (raw, is_head) in [
            (&b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"[..], true),
            (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", false),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        ] {
            let (a, _, _) = answer(raw, is_head, false);
            let a = a.unwrap().unwrap();
            assert_eq!((a.framing, a.reusable), (Framing::Empty, true));
        }
        let (a, _, _) = answer(
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
            false,
            false,
        );
        assert!(
            !a.unwrap().unwrap().reusable,
            "an HTTP/1.0 upstream connection is not kept"
        );
        let (a, _, _) = answer(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
            false,
            false,
        );
        assert!(!a.unwrap().unwrap().reusable);
        let (a, _, _) = answer(b"HTTP/1.1 200 OK\r\nContent-Len", false, false);
        assert!(a.unwrap().is_none(), "incomplete");
    }

    #[test]
    fn an_answer_framed_ambiguously_is_refused() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
            b"HTTP/1.1 000 Zero\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
        ] {
            let (a, _, _) = answer(raw, false, false);
            assert!(a.is_err(), "{:?}", String::from_utf8_lossy(raw));
        }
        let (a, head, _) = answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            false,
        );
        let a = a.unwrap().unwrap();
        assert_eq!(
            (a.framing, a.reusable),
            (Framing::Chunked, false),
            "the chunks decide"
        );
        assert!(
            !head.to_ascii_lowercase().contains("content-length"),
            "never both: {head}"
        );
        // A Connection header naming the length does not take the framing away.
        let (a, head, _) = answer(
            b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
            false,
            false,
        );
        assert_eq!(a.unwrap().unwrap().framing, Framing::Length(2));
        assert_eq!(head.matches("content-length: 2\r\n").count(), 1, "{head}");
        assert!(
            head.contains("\r\ndate: "),
            "a Date is added when missing: {head}"
        );
    }

    #[test]
    fn targets_the_general_uri_parser_would_refuse_or_cut_go_the_long_way() {
        for ok in [
            "/",
            "/0004f2e765da.cfg",
            "/a/b-c_d.~x?q=1&r=%20s",
            "/{x}\"y\"",
            "/p?`{|}",
        ] {
            assert!(target_chars_plain(ok), "{ok}");
        }
        for bad in [
            "/a<b>.cfg",
            "/a`b",
            "/a b",
            "/x.ld#frag",
            "/p?q=\"x\"",
            "/p?<",
            "/\u{e9}",
        ] {
            assert!(!target_chars_plain(bad), "{bad}");
        }
    }

    #[test]
    fn the_relays_own_answer_to_a_head_request_has_no_body() {
        let mut out = Vec::new();
        let n = own_answer(&mut out, http::StatusCode::BAD_GATEWAY, "down", true, false);
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(n, 0);
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        assert!(text.contains("content-length: 22\r\n"), "{text}");
        let n = own_answer(&mut out, http::StatusCode::BAD_GATEWAY, "down", false, true);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(n, 22);
        assert!(text.ends_with("\r\n\r\n502 Bad Gateway: down\n"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
    }

    #[test]
    fn lengths_are_digits_only() {
        assert_eq!(parse_length(b" 42 "), Some(42));
        assert_eq!(parse_length(b"0"), Some(0));
        for bad in [&b""[..], b"+1", b"1e3", b"0x10", b"18446744073709551616"] {
            assert_eq!(
                parse_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn a_rewound_stream_gives_back_what_was_read_then_the_rest() {
        let (near, mut far) = tokio::io::duplex(64);
        far.write_all(b" world").await.unwrap();
        drop(far);
        let mut io = Rewind::new(b"hello".to_vec(), near);
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }

    /// A body relay over in-memory pipes: what the device gets and what the relay says.
    async fn relay(
        framing: Framing,
        first: &[u8],
        later: &[u8],
    ) -> (Result<(u64, bool), u64>, Vec<u8>) {
        let (mut up_far, mut up) = tokio::io::duplex(1 << 16);
        up_far.write_all(later).await.unwrap();
        drop(up_far);
        let mut dev = Vec::new();
        let mut buf = first.to_vec();
        let mut out = b"HEAD\r\n".to_vec();
        let r = relay_body(&mut dev, &mut up, &mut buf, &mut out, 0, framing).await;
        (r.map(|r| (r.bytes, r.clean)).map_err(|(_, n)| n), dev)
    }

    #[tokio::test]
    async fn bodies_pass_through_unchanged_and_end_where_their_framing_says() {
        let (r, dev) = relay(Framing::Length(10), b"hello", b"world!").await;
        assert_eq!(r, Ok((10, true)));
        assert_eq!(dev, b"HEAD\r\nhelloworld");
        let (r, dev) = relay(Framing::Length(3), b"hello", b"").await;
        assert_eq!(
            r,
            Ok((3, false)),
            "bytes past the end: the connection is not kept"
        );
        assert_eq!(dev, b"HEAD\r\nhel");
        let (r, _) = relay(Framing::Length(10), b"hello", b"").await;
        assert_eq!(r, Err(5), "cut short");
        let (r, dev) = relay(Framing::Chunked, b"3\r\nabc\r", b"\n0\r\n\r\n").await;
        assert_eq!(r, Ok((3, true)));
        assert_eq!(dev, b"HEAD\r\n3\r\nabc\r\n0\r\n\r\n");
        let (r, _) = relay(Framing::Chunked, b"3\r\nabc\r\n", b"").await;
        assert_eq!(r, Err(3));
        let (r, dev) = relay(Framing::Chunked, b"zz\r\n", b"").await;
        assert_eq!(r, Err(0));
        assert!(
            dev.is_empty(),
            "nothing sent: the device can still get a 502"
        );
        let (r, dev) = relay(Framing::Close, b"to ", b"the end").await;
        assert_eq!(r, Ok((10, false)));
        assert_eq!(dev, b"HEAD\r\nto the end");
        let (r, dev) = relay(Framing::Empty, b"", b"").await;
        assert_eq!(r, Ok((0, true)));
        assert_eq!(dev, b"HEAD\r\n");
    }
}
