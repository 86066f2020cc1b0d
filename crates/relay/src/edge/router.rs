//! Routing one device request: the checks every request passes (legacy subnets, the request target),
//! then the image cache when the path is an image, else the provisioning upstream. Counts and times
//! the answer and wraps it for the access log.

use super::body::{AccessLine, AccessLogBody, EdgeBody, text_response};
use super::conn::DeviceConn;
use super::images;
use super::provisioning::Upstream;
use super::uploads;
use crate::util::paths;
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Routes one request: checks, then the image cache or the upstream.
pub(super) async fn handle(conn: Arc<DeviceConn>, req: Request<Incoming>) -> Response<EdgeBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mac = device_mac(req.headers());
    let resp = route(&conn, req).await;
    let status = resp.status();
    count_answer(conn.edge.stats.local(), status.as_u16());
    crate::util::metrics::global().edge_request(status.as_u16(), started.elapsed());
    let (parts, body) = resp.into_parts();
    let logged = AccessLogBody {
        inner: body,
        bytes: 0,
        line: Some(AccessLine {
            method,
            path,
            status: status.as_u16(),
            mac,
            started,
        }),
        conn,
    };
    Response::from_parts(parts, logged.boxed())
}

async fn route(conn: &Arc<DeviceConn>, req: Request<Incoming>) -> Response<EdgeBody> {
    let edge = &conn.edge;
    let peer = conn.peer;
    // The legacy listener already closed strangers at accept; a reload that narrowed the subnets
    // since this connection was accepted is honoured here.
    if conn.scheme == "http" && !edge.devices.get().allows(peer.ip().to_canonical()) {
        edge.stats
            .local()
            .legacy_forbidden
            .fetch_add(1, Ordering::Relaxed);
        return text_response(
            StatusCode::FORBIDDEN,
            &format!(
                "plain HTTP is only for devices inside [devices].subnets; {} is not",
                peer.ip()
            ),
        );
    }
    let decoded = match paths::check(req.uri().path(), req.uri().query()) {
        Err(paths::PathError::TooLong) => {
            return text_response(StatusCode::URI_TOO_LONG, "request target too long");
        }
        Err(paths::PathError::Bad(why)) => return text_response(StatusCode::BAD_REQUEST, why),
        Ok(p) => p,
    };
    if uploads::is_upload(req.uri().path()) {
        return uploads::answer(edge.artifacts.get(), req, peer.ip()).await;
    }
    if let Some(cache) = edge.images.get()
        && let Some(answer) = images::answer(cache, &req, &conn.socket, &decoded).await
    {
        return answer;
    }
    match upstream_of(conn) {
        Some(up) => up.forward(req, conn).await,
        None => text_response(
            StatusCode::NOT_FOUND,
            "no provisioning upstream is configured on this relay",
        ),
    }
}

/// The upstream a request for `path` goes to when forwarding is all that applies to it: it passes
/// the checks `route` makes and is neither an upload nor an image path. `None` sends the request
/// the long way, through `route`, which answers every other case. Borrowed from the connection
/// unless a reload changed the upstream since it started.
pub(crate) fn plain_upstream<'c>(
    conn: &'c DeviceConn,
    path: &str,
    query: Option<&str>,
) -> Option<Cow<'c, Arc<Upstream>>> {
    let edge = &conn.edge;
    if conn.scheme == "http" && !edge.devices.get().allows(conn.peer.ip().to_canonical()) {
        return None;
    }
    let decoded = paths::check(path, query).ok()?;
    if uploads::is_upload(path) {
        return None;
    }
    if let Some(cache) = edge.images.get()
        && cache.lists(&decoded)
    {
        return None;
    }
    upstream_of(conn)
}

/// The connection's upstream, unless a reload has changed it since the connection started.
fn upstream_of(conn: &DeviceConn) -> Option<Cow<'_, Arc<Upstream>>> {
    if conn.upstream.0 == conn.edge.upstream.generation() {
        conn.upstream.1.as_ref().map(Cow::Borrowed)
    } else {
        conn.edge.upstream.get().1.map(Cow::Owned)
    }
}

/// Counts one answered request by its status class.
pub(crate) fn count_answer(stats: &super::EdgeCounters, status: u16) {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let counter = match status {
        200..=299 => &stats.status_2xx,
        300..=399 => &stats.status_3xx,
        400..=499 => &stats.status_4xx,
        _ => &stats.status_5xx,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The MAC from a phone's User-Agent, `... (SN:0004f2e765da) ...`, when present.
fn device_mac(headers: &http::HeaderMap) -> Option<String> {
    mac_in_user_agent(headers.get(header::USER_AGENT)?.to_str().ok()?)
}

/// The MAC in a User-Agent value.
pub(crate) fn mac_in_user_agent(ua: &str) -> Option<String> {
    let rest = &ua[ua.find("(SN:")? + 4..];
    let mac: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    (mac.len() == 12).then(|| mac.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_from_user_agent() {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::USER_AGENT,
            "FileTransport PolycomSoundStationIP-SSIP_5000-UA/4.0.3.7562 (SN:0004F2E765DA) Type/Application".parse().unwrap(),
        );
        assert_eq!(device_mac(&h).as_deref(), Some("0004f2e765da"));
        h.insert(header::USER_AGENT, "curl/8.0".parse().unwrap());
        assert_eq!(device_mac(&h), None);
    }
}
