//! Forwarding to the provisioning upstream: the request goes on unchanged apart from what a proxy
//! must change (hop-by-hop headers dropped, Host rewritten, X-Forwarded-* added), bodies stream both
//! ways, nothing is cached. Upstream connections are pooled and kept alive.

use super::{EdgeBody, text_response};
use crate::config::{CloudUrl, ProvisioningConfig};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::IpAddr;
use std::time::Duration;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

pub struct Upstream {
    base: CloudUrl,
    client: Client<Connector, Incoming>,
    timeout: Duration,
    // Worked out once, not per request.
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    host: HeaderValue,
}

/// Headers that describe one connection, not the message: never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

impl Upstream {
    pub fn new(cfg: &ProvisioningConfig) -> anyhow::Result<Upstream> {
        let base = CloudUrl::parse(&cfg.upstream)
            .map_err(|e| anyhow::anyhow!("provisioning.upstream: {e}"))?;
        let tls = crate::cloud::client_tls_config(cfg.ca_file.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(https);
        let bad = |e: String| anyhow::anyhow!("provisioning.upstream: {e}");
        Ok(Upstream {
            scheme: if base.tls {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            authority: base
                .connect_target()
                .parse()
                .map_err(|e| bad(format!("{e}")))?,
            host: HeaderValue::from_str(&base.authority()).map_err(|e| bad(format!("{e}")))?,
            base,
            client,
            timeout: cfg.timeout,
        })
    }

    /// The upstream URI for a request: the device's path and query, unchanged, after the
    /// upstream's base path (none, usually, so the path is reused as it is).
    fn upstream_uri(&self, uri: &http::Uri) -> Result<http::Uri, String> {
        let pq = match (self.base.base_path.is_empty(), uri.path_and_query()) {
            (true, Some(pq)) => pq.clone(),
            (true, None) => http::uri::PathAndQuery::from_static("/"),
            (false, pq) => {
                let tail = pq.map(|p| p.as_str()).unwrap_or("/");
                self.base.path(tail).parse().map_err(|e| format!("{e}"))?
            }
        };
        let mut p = http::uri::Parts::default();
        p.scheme = Some(self.scheme.clone());
        p.authority = Some(self.authority.clone());
        p.path_and_query = Some(pq);
        http::Uri::from_parts(p).map_err(|e| e.to_string())
    }

    pub fn describe(&self) -> String {
        self.base.to_string()
    }

    /// Sends `req` upstream and returns its answer, or a 502/504 of our own.
    pub async fn forward(
        &self,
        req: Request<Incoming>,
        client_ip: IpAddr,
        proto: &'static str,
    ) -> Response<EdgeBody> {
        let (parts, body) = req.into_parts();
        let uri = match self.upstream_uri(&parts.uri) {
            Ok(u) => u,
            Err(e) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot forward this request: {e}"),
                );
            }
        };
        let mut headers = parts.headers;
        let original_host = headers.get(header::HOST).cloned();
        strip_hop_by_hop(&mut headers);
        // The relay already answered the device's Expect; the upstream gets the body straight away.
        headers.remove(header::EXPECT);
        headers.remove(header::HOST);
        append_forwarded_for(&mut headers, client_ip);
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        if let Some(h) = original_host {
            headers.insert(X_FORWARDED_HOST, h);
        }
        headers.insert(header::HOST, self.host.clone());
        let mut builder = Request::builder()
            .method(parts.method)
            .uri(uri)
            .version(http::Version::HTTP_11);
        if let Some(h) = builder.headers_mut() {
            *h = headers;
        }
        let up_req = match builder.body(body) {
            Ok(r) => r,
            Err(e) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot forward this request: {e}"),
                );
            }
        };
        match tokio::time::timeout(self.timeout, self.client.request(up_req)).await {
            Err(_) => text_response(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "provisioning server did not answer within {}",
                    humantime::format_duration(self.timeout)
                ),
            ),
            Ok(Err(e)) => {
                let why = if e.is_connect() {
                    "cannot connect to the provisioning server"
                } else {
                    "provisioning server failed"
                };
                tracing::warn!(upstream = %self.base, error = %error_chain(&e), "{why}");
                text_response(StatusCode::BAD_GATEWAY, why)
            }
            Ok(Ok(resp)) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(
                    parts,
                    body.map_err(|e| Box::new(e) as super::BoxError).boxed(),
                )
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Names listed in Connection are hop-by-hop too; most requests carry none.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, ip: IpAddr) {
    let name = X_FORWARDED_FOR;
    let value = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_end_to_end_ones_stay() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("authorization", "Digest x"),
            ("www-authenticate", "Basic realm=x"),
            (
                "user-agent",
                "FileTransport PolycomVVX-VVX_411-UA/6.4.7.4560 Type/Application",
            ),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "user-agent", "www-authenticate"]);
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.7".parse().unwrap());
        append_forwarded_for(&mut h, "10.0.0.8".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.7, 10.0.0.8");
    }
}
