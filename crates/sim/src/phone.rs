//! A Poly-like provisioning client: what a VVX phone does against its provisioning server, for the
//! demo and the tests that provision through the relay's HTTPS edge.
//!
//! Like a phone it asks without credentials first and answers a 401 with the provisioning account
//! (`PlcmSpIp`/`PlcmSpIp` unless told otherwise), by Digest when the server offers it, else by
//! Basic. It sends the phone's `User-Agent`. Over https it verifies the server's certificate
//! against the system roots plus any root CA it is given, for the URL's host name (also the SNI);
//! there is no way to turn verification off. A resolve override (like curl's `--resolve`) lets
//! tests reach 127.0.0.1 while the certificate is checked for the relay's FQDN.
//!
//! One request per connection; every step (connect, TLS handshake, answer, each piece of the
//! body) has a timeout.

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use md5::Digest as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Default timeout of each step.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The phones' default provisioning account.
pub const DEFAULT_USER: &str = "PlcmSpIp";
pub const DEFAULT_PASSWORD: &str = "PlcmSpIp";
/// Largest answer body read into memory.
pub const MAX_BODY: usize = 256 << 20;

/// A simulated phone provisioning from `base` (see the module documentation).
#[derive(Clone)]
pub struct ProvClient {
    https: bool,
    /// Host name or IP address of the URL (IPv6 without brackets).
    host: String,
    port: u16,
    /// `Host` header value: the URL's host, with its port when not the default one.
    authority: String,
    /// Path prefix of the URL, ending with `/`.
    base_path: String,
    extra_roots: Vec<CertificateDer<'static>>,
    resolve: HashMap<String, SocketAddr>,
    mac: String,
    model: String,
    version: String,
    user: String,
    password: String,
    extra_headers: HeaderMap,
    timeout: Duration,
    tls: OnceLock<Arc<rustls::ClientConfig>>,
    /// The address connections are made from (a simulated phone's own).
    local_ip: Option<std::net::IpAddr>,
}

/// An answer, after the authentication dance.
#[derive(Debug, Clone)]
pub struct ProvResponse {
    pub status: u16,
    /// A 401 came first.
    pub challenged: bool,
    /// Credentials sent with the request that got `status`: "none", "basic" or "digest".
    pub auth_used: &'static str,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The MAC as phones write it: 12 lowercase hex digits (separators `:`, `-`, `.` dropped).
fn normalise_mac(mac: &str) -> anyhow::Result<String> {
    let m: String = mac
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | '.'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if m.len() != 12 || !m.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("MAC address {mac:?} is not 12 hex digits");
    }
    Ok(m)
}

impl ProvClient {
    /// `base` is the provisioning server URL (`https://relay-fqdn:port/` or `http://...`, may carry
    /// a path prefix and `user:password@`); `mac` the phone's MAC. Model VVX_411, version
    /// 6.4.7.4560, account PlcmSpIp/PlcmSpIp unless the URL names one.
    pub fn new(base: &str, mac: &str) -> anyhow::Result<ProvClient> {
        let uri: http::Uri = base
            .parse()
            .with_context(|| format!("provisioning URL {base:?} is not a URL"))?;
        let https = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => true,
            Some(s) if s.eq_ignore_ascii_case("http") => false,
            _ => bail!("provisioning URL {base:?} must start with http:// or https://"),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("provisioning URL {base:?} has no host"))?;
        let (userinfo, hostport) = match authority.as_str().rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority.as_str()),
        };
        let host = authority.host();
        anyhow::ensure!(!host.is_empty(), "provisioning URL {base:?} has no host");
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let (mut user, mut password) = (DEFAULT_USER.to_owned(), DEFAULT_PASSWORD.to_owned());
        if let Some(info) = userinfo {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            let (u, p) = info.split_once(':').unwrap_or((info, ""));
            user = decode(u);
            password = decode(p);
        }
        let mut base_path = uri.path().to_owned();
        if !base_path.ends_with('/') {
            base_path.push('/');
        }
        Ok(ProvClient {
            https,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            authority: hostport.to_owned(),
            base_path,
            extra_roots: Vec::new(),
            resolve: HashMap::new(),
            mac: normalise_mac(mac)?,
            model: "VVX_411".into(),
            version: "6.4.7.4560".into(),
            user,
            password,
            extra_headers: HeaderMap::new(),
            timeout: TIMEOUT,
            tls: OnceLock::new(),
            local_ip: None,
        })
    }

    /// Connects from `ip` (a simulated phone's own loopback address), the way a real phone's
    /// requests come from its address.
    pub fn with_local_address(mut self, ip: std::net::IpAddr) -> Self {
        self.local_ip = Some(ip);
        self
    }

    /// Trusts the certificates of a PEM file (in addition to the system roots).
    pub fn with_root_ca_pem(mut self, pem_path: &Path) -> anyhow::Result<Self> {
        let certs = CertificateDer::pem_file_iter(pem_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow!("cannot read root CA {}: {e}", pem_path.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "root CA file {} holds no certificate",
            pem_path.display()
        );
        self.extra_roots.extend(certs);
        self.tls = OnceLock::new();
        Ok(self)
    }

    /// Trusts one DER-encoded certificate (in addition to the system roots).
    pub fn with_root_ca_der(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.extra_roots.push(CertificateDer::from(der.into()));
        self.tls = OnceLock::new();
        self
    }

    /// Connects to `addr` whenever the URL's host is `host` (case-insensitive); the certificate is
    /// still verified for `host`. `addr`'s port is used as is.
    pub fn with_resolve(mut self, host: &str, addr: SocketAddr) -> Self {
        self.resolve.insert(host.to_ascii_lowercase(), addr);
        self
    }

    /// Another phone model (`VVX_411`, `VVX_501`, `Trio_8800`, ...) and software version.
    pub fn with_model(mut self, model: &str, version: &str) -> Self {
        self.model = model.to_owned();
        self.version = version.to_owned();
        self
    }

    /// The provisioning account sent after a 401.
    pub fn with_credentials(mut self, user: &str, password: &str) -> Self {
        self.user = user.to_owned();
        self.password = password.to_owned();
        self
    }

    /// A header sent with every request (e.g. to see what a proxy keeps or rewrites).
    pub fn with_header(mut self, name: &str, value: &str) -> anyhow::Result<Self> {
        let name = HeaderName::try_from(name).with_context(|| format!("header name {name:?}"))?;
        let value =
            HeaderValue::try_from(value).with_context(|| format!("header value {value:?}"))?;
        self.extra_headers.append(name, value);
        Ok(self)
    }

    /// Timeout of each step (default [`TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The MAC, normalised (12 lowercase hex digits).
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// `FileTransport PolycomVVX-VVX_411-UA/6.4.7.4560 (SN:<mac>) Type/Application`.
    pub fn user_agent(&self) -> String {
        let family = self.model.split('_').next().unwrap_or(&self.model);
        format!(
            "FileTransport Polycom{family}-{}-UA/{} (SN:{}) Type/Application",
            self.model, self.version, self.mac
        )
    }

    /// The request path for `path`, taken relative to the URL's path (a leading `/` too).
    pub fn request_path(&self, path: &str) -> String {
        format!("{}{}", self.base_path, path.trim_start_matches('/'))
    }

    /// GET `path`: first without credentials; on 401 once more with the account, by Digest when
    /// offered, else Basic.
    pub async fn get(&self, path: &str) -> anyhow::Result<ProvResponse> {
        self.request(Method::GET, path, None).await
    }

    /// PUT `body` to `path`, with the same authentication dance as [`ProvClient::get`].
    pub async fn put(&self, path: &str, body: Bytes) -> anyhow::Result<ProvResponse> {
        self.request(Method::PUT, path, Some(body)).await
    }

    /// Any method, with the same authentication dance.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<ProvResponse> {
        let target = self.request_path(path);
        let first = self.send(&method, &target, body.clone(), None).await?;
        if first.status != 401 {
            return Ok(first);
        }
        let Some((auth_used, authorization)) =
            self.answer_challenge(&method, &target, &first.headers)
        else {
            return Ok(ProvResponse {
                challenged: true,
                ..first
            });
        };
        let mut second = self
            .send(&method, &target, body, Some(authorization))
            .await?;
        second.challenged = true;
        second.auth_used = auth_used;
        Ok(second)
    }

    /// The boot sequence: GET `<mac>.cfg` (on 404 `000000000000.cfg`), then PUT `<mac>-app.log`.
    /// Returns every exchange as (method, path, status), a 401 answered with credentials included.
    /// Statuses are not judged here; only transport failures are errors.
    pub async fn provision(&self) -> anyhow::Result<Vec<(String, String, u16)>> {
        let mut steps = Vec::new();
        let cfg = format!("{}.cfg", self.mac);
        let r = self.get(&cfg).await?;
        push_steps(&mut steps, "GET", self.request_path(&cfg), &r);
        let (cfg, r) = if r.status == 404 {
            let zeros = "000000000000.cfg".to_owned();
            let r = self.get(&zeros).await?;
            push_steps(&mut steps, "GET", self.request_path(&zeros), &r);
            (zeros, r)
        } else {
            (cfg, r)
        };
        let log = format!("{}-app.log", self.mac);
        let r = self.put(&log, self.boot_log(&cfg, r.status)).await?;
        push_steps(&mut steps, "PUT", self.request_path(&log), &r);
        Ok(steps)
    }

    /// A few lines in the phones' log format `time|module|level|missed|message`.
    fn boot_log(&self, cfg: &str, status: u16) -> Bytes {
        let lines = [
            format!("0000.120|so   |4|00|Boot: {}", self.user_agent()),
            format!(
                "0000.450|cfg  |4|00|Prov|Server {}://{}",
                if self.https { "https" } else { "http" },
                self.authority
            ),
            format!("0001.032|cfg  |4|00|Prov|{cfg}: HTTP {status}"),
            "0001.210|sip  |4|00|Line 1 registration pending".to_owned(),
            "0001.877|app1 |4|00|Application started".to_owned(),
        ];
        Bytes::from(lines.join("\n") + "\n")
    }

    /// The `Authorization` header answering a 401, or `None` when no usable scheme is offered.
    fn answer_challenge(
        &self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
    ) -> Option<(&'static str, HeaderValue)> {
        let challenges: Vec<Challenge> = headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        let digest = challenges.iter().find(|c| {
            c.scheme.eq_ignore_ascii_case("digest")
                && c.param("algorithm")
                    .is_none_or(|a| a.eq_ignore_ascii_case("md5"))
                && c.param("nonce").is_some()
        });
        if let Some(c) = digest {
            let realm = c.param("realm").unwrap_or_default();
            let nonce = c.param("nonce").unwrap_or_default();
            let qop_auth = c
                .param("qop")
                .is_some_and(|q| q.split(',').any(|q| q.trim().eq_ignore_ascii_case("auth")));
            let ha1 = md5_hex(&format!("{}:{realm}:{}", self.user, self.password));
            let ha2 = md5_hex(&format!("{method}:{target}"));
            let mut v = format!(
                "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{target}\"",
                quote(&self.user),
                quote(realm),
                quote(nonce)
            );
            if qop_auth {
                let cnonce = format!("{:016x}", fastrand::u64(..));
                let nc = "00000001";
                let response = md5_hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"));
                v.push_str(&format!(
                    ", response=\"{response}\", qop=auth, nc={nc}, cnonce=\"{cnonce}\""
                ));
            } else {
                let response = md5_hex(&format!("{ha1}:{nonce}:{ha2}"));
                v.push_str(&format!(", response=\"{response}\""));
            }
            if let Some(a) = c.param("algorithm") {
                v.push_str(&format!(", algorithm={a}"));
            }
            if let Some(o) = c.param("opaque") {
                v.push_str(&format!(", opaque=\"{}\"", quote(o)));
            }
            return HeaderValue::try_from(v).ok().map(|v| ("digest", v));
        }
        if challenges
            .iter()
            .any(|c| c.scheme.eq_ignore_ascii_case("basic"))
        {
            use base64::Engine as _;
            let cred = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", self.user, self.password));
            return HeaderValue::try_from(format!("Basic {cred}"))
                .ok()
                .map(|v| ("basic", v));
        }
        None
    }

    /// One exchange on a fresh connection.
    async fn send(
        &self,
        method: &Method,
        target: &str,
        body: Option<Bytes>,
        authorization: Option<HeaderValue>,
    ) -> anyhow::Result<ProvResponse> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(target)
            .header(header::HOST, &self.authority)
            .header(header::USER_AGENT, self.user_agent())
            .header(header::ACCEPT, "*/*")
            .body(Full::new(body.unwrap_or_default()))
            .with_context(|| format!("cannot build {method} {target}"))?;
        let headers = req.headers_mut();
        for (name, value) in &self.extra_headers {
            headers.append(name, value.clone());
        }
        let auth_used = match authorization {
            Some(v) => {
                let scheme = if v.as_bytes().starts_with(b"Digest") {
                    "digest"
                } else {
                    "basic"
                };
                headers.insert(header::AUTHORIZATION, v);
                scheme
            }
            None => "none",
        };
        let what = format!(
            "{method} {}://{}{target}",
            if self.https { "https" } else { "http" },
            self.authority
        );
        let tcp = self.connect().await.with_context(|| what.clone())?;
        let resp = if self.https {
            let tls = self.handshake(tcp).await.with_context(|| what.clone())?;
            self.exchange(tls, req).await
        } else {
            self.exchange(tcp, req).await
        }
        .with_context(|| what.clone())?;
        Ok(ProvResponse {
            auth_used,
            challenged: false,
            ..resp
        })
    }

    async fn connect(&self) -> anyhow::Result<TcpStream> {
        let addrs: Vec<SocketAddr> = match self.resolve.get(&self.host.to_ascii_lowercase()) {
            Some(a) => vec![*a],
            None => tokio::time::timeout(
                self.timeout,
                tokio::net::lookup_host((self.host.as_str(), self.port)),
            )
            .await
            .map_err(|_| {
                anyhow!(
                    "cannot resolve {}: no answer in {:?}",
                    self.host,
                    self.timeout
                )
            })?
            .with_context(|| format!("cannot resolve {}", self.host))?
            .collect(),
        };
        let mut last = anyhow!("{} resolves to no address", self.host);
        for addr in addrs {
            let local = self.local_ip;
            let connect = async move {
                match local {
                    None => TcpStream::connect(addr).await,
                    Some(ip) => {
                        let sock = if addr.is_ipv4() {
                            tokio::net::TcpSocket::new_v4()?
                        } else {
                            tokio::net::TcpSocket::new_v6()?
                        };
                        sock.bind(SocketAddr::new(ip, 0))?;
                        sock.connect(addr).await
                    }
                }
            };
            match tokio::time::timeout(self.timeout, connect).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(e)) => last = anyhow!("cannot connect to {addr}: {e}"),
                Err(_) => {
                    last = anyhow!("cannot connect to {addr}: no answer in {:?}", self.timeout)
                }
            }
        }
        Err(last)
    }

    fn tls_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        if let Some(c) = self.tls.get() {
            return Ok(c.clone());
        }
        let mut roots = rustls::RootCertStore::empty();
        // The system roots, when there are any; a broken system store is not fatal when the
        // server's CA was given explicitly.
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        for cert in &self.extra_roots {
            roots
                .add(cert.clone())
                .map_err(|e| anyhow!("root CA certificate not usable: {e}"))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS configuration")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let config = Arc::new(config);
        let _ = self.tls.set(config.clone());
        Ok(config)
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| anyhow!("{:?} is not a valid TLS server name: {e}", self.host))?;
        let connector = tokio_rustls::TlsConnector::from(self.tls_config()?);
        tokio::time::timeout(self.timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake: no answer in {:?}", self.timeout))?
            .context("TLS handshake failed")
    }

    async fn exchange<I>(&self, io: I, req: Request<Full<Bytes>>) -> anyhow::Result<ProvResponse>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = tokio::time::timeout(
            self.timeout,
            hyper::client::conn::http1::handshake(TokioIo::new(io)),
        )
        .await
        .map_err(|_| anyhow!("HTTP handshake: no answer in {:?}", self.timeout))??;
        let conn = tokio::spawn(conn);
        let result = async {
            let resp = tokio::time::timeout(self.timeout, sender.send_request(req))
                .await
                .map_err(|_| anyhow!("no answer in {:?}", self.timeout))?
                .context("request failed")?;
            let (parts, mut body) = resp.into_parts();
            let mut buf = bytes::BytesMut::new();
            loop {
                let frame = tokio::time::timeout(self.timeout, body.frame())
                    .await
                    .map_err(|_| anyhow!("answer body stalled for {:?}", self.timeout))?;
                let Some(frame) = frame else { break };
                if let Ok(data) = frame.context("reading the answer body")?.into_data() {
                    if buf.len() + data.len() > MAX_BODY {
                        bail!("answer body larger than {MAX_BODY} bytes");
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Ok(ProvResponse {
                status: parts.status.as_u16(),
                challenged: false,
                auth_used: "none",
                headers: parts.headers,
                body: buf.freeze(),
            })
        }
        .await;
        // One request per connection: closing it is the end of the exchange.
        conn.abort();
        result
    }
}

fn push_steps(
    steps: &mut Vec<(String, String, u16)>,
    method: &str,
    path: String,
    r: &ProvResponse,
) {
    if r.challenged && r.auth_used != "none" {
        steps.push((method.to_owned(), path.clone(), 401));
    }
    steps.push((method.to_owned(), path, r.status));
}

/// Lowercase hex of the MD5 of `s`.
fn md5_hex(s: &str) -> String {
    md5::Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `s` made safe inside a quoted-string.
fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq)]
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The challenges of one `WWW-Authenticate` value; several may share one header
/// (`Basic realm="a", Digest realm="b", nonce="c"`).
fn parse_challenges(value: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let b: Vec<char> = value.chars().collect();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        while i < b.len() && (b[i].is_whitespace() || b[i] == ',') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && !b[i].is_whitespace() && b[i] != ',' && b[i] != '=' {
            i += 1;
        }
        let token: String = b[start..i].iter().collect();
        let mut j = i;
        skip_ws(&mut j);
        if j < b.len() && b[j] == '=' && !token.is_empty() {
            // name=value of the current challenge.
            i = j + 1;
            skip_ws(&mut i);
            let mut value = String::new();
            if i < b.len() && b[i] == '"' {
                i += 1;
                while i < b.len() && b[i] != '"' {
                    if b[i] == '\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    value.push(b[i]);
                    i += 1;
                }
                i += 1;
            } else {
                while i < b.len() && b[i] != ',' && !b[i].is_whitespace() {
                    value.push(b[i]);
                    i += 1;
                }
            }
            if let Some(c) = out.last_mut() {
                c.params.push((token, value));
            }
        } else if token.is_empty() {
            i += 1; // a stray '='
        } else {
            out.push(Challenge {
                scheme: token,
                params: Vec::new(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::{self, CloudArgs};
    use hyper::body::Incoming;
    use std::convert::Infallible;

    const MAC: &str = "00:04:F2:E7:65:DA";
    const GUARD: Duration = Duration::from_secs(20);

    async fn prov_cloud(tree: &Path) -> cloud::CloudHandle {
        let mut args = CloudArgs::new("acme", "123456");
        args.provisioning = Some(tree.to_path_buf());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        cloud::start(listener, args).await.unwrap()
    }

    fn steps(list: &[(&str, &str, u16)]) -> Vec<(String, String, u16)> {
        list.iter()
            .map(|(m, p, s)| (m.to_string(), p.to_string(), *s))
            .collect()
    }

    #[test]
    fn identity_and_urls() {
        let c = ProvClient::new("http://127.0.0.1:8080", MAC).unwrap();
        assert_eq!(c.mac(), "0004f2e765da");
        assert_eq!(
            c.user_agent(),
            "FileTransport PolycomVVX-VVX_411-UA/6.4.7.4560 (SN:0004f2e765da) Type/Application"
        );
        assert_eq!(c.request_path("/000000000000.cfg"), "/000000000000.cfg");
        assert_eq!(c.authority, "127.0.0.1:8080");
        let c = ProvClient::new("https://u%40x:p%3Aw@relay.test/prov", MAC)
            .unwrap()
            .with_model("Trio_8800", "7.2.2.1094");
        assert_eq!(
            (c.host.as_str(), c.port, c.authority.as_str()),
            ("relay.test", 443, "relay.test")
        );
        assert_eq!((c.user.as_str(), c.password.as_str()), ("u@x", "p:w"));
        assert_eq!(c.request_path("a.cfg"), "/prov/a.cfg");
        assert!(
            c.user_agent()
                .starts_with("FileTransport PolycomTrio-Trio_8800-UA/7.2.2.1094 ")
        );
        assert!(ProvClient::new("ftp://x/", MAC).is_err());
        assert!(ProvClient::new("http://x/", "0004f2").is_err());
        assert!(ProvClient::new("not a url", MAC).is_err());
    }

    #[test]
    fn challenges_are_parsed_and_answered() {
        assert_eq!(
            parse_challenges(
                r#"Basic realm="a, b", Digest realm="r", nonce="n\"x", qop="auth,auth-int""#
            ),
            [
                Challenge {
                    scheme: "Basic".into(),
                    params: vec![("realm".into(), "a, b".into())]
                },
                Challenge {
                    scheme: "Digest".into(),
                    params: vec![
                        ("realm".into(), "r".into()),
                        ("nonce".into(), "n\"x".into()),
                        ("qop".into(), "auth,auth-int".into())
                    ]
                },
            ]
        );
        let c = ProvClient::new("http://h/", MAC).unwrap();
        let mut h = HeaderMap::new();
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Basic realm="r""#),
        );
        let (scheme, v) = c.answer_challenge(&Method::GET, "/x", &h).unwrap();
        assert_eq!(
            (scheme, v.to_str().unwrap()),
            ("basic", "Basic UGxjbVNwSXA6UGxjbVNwSXA=")
        );
        // Digest is preferred when offered, whatever the order; the legacy form without qop.
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Digest realm="r", nonce="abc""#),
        );
        let (scheme, v) = c.answer_challenge(&Method::GET, "/x", &h).unwrap();
        assert_eq!(scheme, "digest");
        let ha1 = md5_hex("PlcmSpIp:r:PlcmSpIp");
        let ha2 = md5_hex("GET:/x");
        let expect = md5_hex(&format!("{ha1}:abc:{ha2}"));
        assert_eq!(
            v.to_str().unwrap(),
            format!(
                r#"Digest username="PlcmSpIp", realm="r", nonce="abc", uri="/x", response="{expect}""#
            )
        );
        // Nothing usable: no answer.
        let mut h = HeaderMap::new();
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Negotiate"),
        );
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Digest realm="r", nonce="n", algorithm=SHA-512-256"#),
        );
        assert!(c.answer_challenge(&Method::GET, "/x", &h).is_none());
    }

    #[tokio::test]
    async fn provisions_from_the_reference_cloud() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        let cloud = prov_cloud(&tree).await;
        std::fs::write(
            tree.join("000000000000.cfg"),
            b"<APPLICATION CONFIG_FILES=\"\"/>",
        )
        .unwrap();
        let phone = ProvClient::new(&format!("http://{}/", cloud.addr), MAC).unwrap();

        // No <mac>.cfg: the zeros file, then the log upload; each first challenged.
        let transcript = tokio::time::timeout(GUARD, phone.provision())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            transcript,
            steps(&[
                ("GET", "/0004f2e765da.cfg", 401),
                ("GET", "/0004f2e765da.cfg", 404),
                ("GET", "/000000000000.cfg", 401),
                ("GET", "/000000000000.cfg", 200),
                ("PUT", "/0004f2e765da-app.log", 401),
                ("PUT", "/0004f2e765da-app.log", 201),
            ])
        );
        let log = std::fs::read_to_string(tree.join("0004f2e765da-app.log")).unwrap();
        assert!(log.contains("000000000000.cfg: HTTP 200"), "{log}");
        assert!(log.lines().all(|l| l.split('|').count() >= 5), "{log}");

        // With its own file, and a log to replace.
        std::fs::write(tree.join("0004f2e765da.cfg"), b"<APPLICATION/>").unwrap();
        let transcript = tokio::time::timeout(GUARD, phone.provision())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            transcript,
            steps(&[
                ("GET", "/0004f2e765da.cfg", 401),
                ("GET", "/0004f2e765da.cfg", 200),
                ("PUT", "/0004f2e765da-app.log", 401),
                ("PUT", "/0004f2e765da-app.log", 204),
            ])
        );
        let r = phone.get("0004f2e765da.cfg").await.unwrap();
        assert_eq!(
            (r.status, r.challenged, r.auth_used, &r.body[..]),
            (200, true, "digest", &b"<APPLICATION/>"[..])
        );

        // What the cloud saw: the phone's User-Agent, Digest after the challenge.
        let seen = crate::client::get(cloud.addr, "/sim/provisioning/log")
            .await
            .unwrap();
        let seen = seen.as_array().unwrap();
        assert_eq!(seen.len(), 12);
        assert!(
            seen.iter()
                .all(|e| e["user_agent"] == phone.user_agent().as_str())
        );
        let auths: Vec<&str> = seen.iter().map(|e| e["auth"].as_str().unwrap()).collect();
        assert_eq!(&auths[..4], ["none", "digest", "none", "digest"]);

        // Wrong account: the retry is refused too, and that is what comes back.
        let wrong = ProvClient::new(&format!("http://{}/", cloud.addr), MAC)
            .unwrap()
            .with_credentials("PlcmSpIp", "nope");
        let r = wrong.get("0004f2e765da.cfg").await.unwrap();
        assert_eq!((r.status, r.challenged, r.auth_used), (401, true, "digest"));
        cloud.shutdown().await.unwrap();
    }

    /// A CA and a certificate it signed for `names`.
    struct Pki {
        ca_der: CertificateDer<'static>,
        ca_pem: String,
        chain: Vec<CertificateDer<'static>>,
        key_der: Vec<u8>,
    }

    fn pki(ca_name: &str, names: &[&str]) -> Pki {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        Pki {
            ca_der: ca_cert.der().clone(),
            ca_pem: ca_cert.pem(),
            chain: vec![leaf_cert.der().clone()],
            key_der: leaf_key.serialize_der(),
        }
    }

    /// A tiny HTTPS server: 401 (Basic only) without credentials, else 200 with what it saw.
    async fn tls_server(pki: &Pki) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            pki.chain.clone(),
            rustls_pki_types::PrivateKeyDer::Pkcs8(pki.key_der.clone().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // Clients refusing the certificate end here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let sni = sni.clone();
                        async move {
                            let h = |n: header::HeaderName| {
                                req.headers()
                                    .get(n)
                                    .map_or("-", |v| v.to_str().unwrap_or("?"))
                                    .to_owned()
                            };
                            let mut resp = if req.headers().contains_key(header::AUTHORIZATION) {
                                let body = format!(
                                    "sni={sni} host={} path={} auth={} ua={}",
                                    h(header::HOST),
                                    req.uri(),
                                    h(header::AUTHORIZATION),
                                    h(header::USER_AGENT)
                                );
                                http::Response::new(Full::new(Bytes::from(body)))
                            } else {
                                let mut r = http::Response::new(Full::new(Bytes::new()));
                                *r.status_mut() = http::StatusCode::UNAUTHORIZED;
                                r.headers_mut().insert(
                                    header::WWW_AUTHENTICATE,
                                    HeaderValue::from_static("Basic realm=\"tls\""),
                                );
                                r
                            };
                            resp.headers_mut()
                                .insert("x-test", HeaderValue::from_static("1"));
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn https_verifies_the_server_against_the_given_ca() {
        let good = pki("good CA", &["relay.test"]);
        let (addr, server) = tls_server(&good).await;
        let tmp = tempfile::tempdir().unwrap();
        let ca_file = tmp.path().join("ca.pem");
        std::fs::write(&ca_file, &good.ca_pem).unwrap();
        // The port in the URL is not where the server is: the resolve override decides.
        let base = "https://relay.test:8443/";

        let phone = ProvClient::new(base, MAC)
            .unwrap()
            .with_root_ca_pem(&ca_file)
            .unwrap()
            .with_resolve("relay.test", addr);
        let r = tokio::time::timeout(GUARD, phone.get("/0004f2e765da.cfg"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.challenged, r.auth_used), (200, true, "basic"));
        let body = String::from_utf8(r.body.to_vec()).unwrap();
        assert_eq!(
            body,
            format!(
                "sni=relay.test host=relay.test:8443 path=/0004f2e765da.cfg auth=Basic UGxjbVNwSXA6UGxjbVNwSXA= ua={}",
                phone.user_agent()
            )
        );
        assert_eq!(r.headers["x-test"], "1");
        // The same CA given as DER.
        let phone = ProvClient::new(base, MAC)
            .unwrap()
            .with_root_ca_der(good.ca_der.to_vec())
            .with_resolve("relay.test", addr);
        assert_eq!(phone.get("x.cfg").await.unwrap().status, 200);

        // Not trusted: no CA given, another one, or an impostor with the same name.
        let other = pki("other CA", &["relay.test"]);
        let impostor = pki("good CA", &["relay.test"]);
        for phone in [
            ProvClient::new(base, MAC)
                .unwrap()
                .with_resolve("relay.test", addr),
            ProvClient::new(base, MAC)
                .unwrap()
                .with_root_ca_der(other.ca_der.to_vec())
                .with_resolve("relay.test", addr),
            ProvClient::new(base, MAC)
                .unwrap()
                .with_root_ca_der(impostor.ca_der.to_vec())
                .with_resolve("relay.test", addr),
        ] {
            let err = tokio::time::timeout(GUARD, phone.get("x.cfg"))
                .await
                .unwrap()
                .unwrap_err();
            let text = format!("{err:#}");
            assert!(
                text.contains("invalid peer certificate")
                    && (text.contains("UnknownIssuer") || text.contains("BadSignature")),
                "{text}"
            );
        }
        // Trusted CA, but the certificate is not for the name asked for.
        let phone = ProvClient::new("https://other.test/", MAC)
            .unwrap()
            .with_root_ca_der(good.ca_der.to_vec())
            .with_resolve("other.test", addr);
        let err = phone.get("x.cfg").await.unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("not valid for name \"other.test\""), "{text}");
        // A bad CA file is an error at once.
        std::fs::write(&ca_file, "not a certificate").unwrap();
        assert!(
            ProvClient::new(base, MAC)
                .unwrap()
                .with_root_ca_pem(&ca_file)
                .is_err()
        );
        server.abort();
    }
}
