//! The device-facing HTTPS edge against a real nginx upstream, with curl, `openssl s_client` and a
//! rustls client as the phones: byte-identical round trips, 401 challenges, 502/504, TLS versions,
//! certificate checks at start, reload (good and refused), hostile input, the connection cap and the
//! legacy plain-HTTP listener.

use crate::nginx::{self, Nginx};
use crate::pki::{self, Bundle, Pki};
use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

const FQDN: &str = "relay.test";
const MAC: &str = "0004f2e765da";
const POLY_UA: &str =
    "FileTransport PolycomVVX-VVX_411-UA/6.4.7.4560 (SN:0004f2e765da) Type/Application";
const CREDS: &str = "PlcmSpIp:PlcmSpIp";

// ---------------------------------------------------------------------------------------------
// Fixture: a temp dir, the reference cloud, a PKI with one good certificate, relays with an [edge].

struct Setup {
    dir: tempfile::TempDir,
    cloud: TestCloud,
    pki: Pki,
    cert: Bundle,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let cloud = TestCloud::start(cloud_args()).await;
        let pki = Pki::new(&dir.path().join("pki")).await;
        let cert = pki.server("good", &[FQDN]).await;
        Setup {
            dir,
            cloud,
            pki,
            cert,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    async fn nginx(&self) -> Nginx {
        Nginx::start(&self.path("nginx")).await
    }

    /// The relay's config in `<dir>/<name>/relay.toml` (not started).
    fn config(&self, name: &str, spec: &EdgeSpec) -> RelayConfig {
        let d = self.path(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut cfg = RelayConfig::new(&d, &self.cloud.url());
        cfg.extra = spec.toml();
        cfg
    }

    /// Starts a relay with `spec` and waits until its edge reports the ports it bound.
    async fn relay(&self, name: &str, spec: &EdgeSpec) -> EdgeRelay {
        let cfg = self.config(name, spec);
        let relay = Relay::start(&cfg).await;
        let s = relay
            .wait_status("edge bound to its ports", |s| {
                addr_port(&s["edge"]["listen"]).is_some_and(|p| p != 0)
            })
            .await;
        let port = addr_port(&s["edge"]["listen"]).unwrap();
        let legacy_port = addr_port(&s["edge"]["legacy_http_listen"]);
        EdgeRelay {
            relay,
            port,
            legacy_port,
            device: Device {
                ca: self.pki.ca.clone(),
                port,
                scratch: cfg.dir.clone(),
            },
        }
    }
}

fn addr_port(v: &Value) -> Option<u16> {
    v.as_str()?.parse::<SocketAddr>().ok().map(|a| a.port())
}

/// What goes after `[admin]` in relay.toml.
struct EdgeSpec {
    pfx: PathBuf,
    password_file: PathBuf,
    upstream: String,
    /// Extra lines for `[edge]`.
    edge: String,
    /// Extra lines for `[provisioning]`.
    provisioning: String,
    subnets: Vec<String>,
}

impl EdgeSpec {
    fn new(cert: &Bundle, upstream: &str) -> EdgeSpec {
        EdgeSpec {
            pfx: cert.pfx.clone(),
            password_file: cert.password_file.clone(),
            upstream: upstream.to_string(),
            edge: String::new(),
            provisioning: String::new(),
            subnets: vec!["127.0.0.0/8".into()],
        }
    }

    fn toml(&self) -> String {
        let subnets: Vec<String> = self.subnets.iter().map(|s| format!("{s:?}")).collect();
        format!(
            "\n[edge]\nlisten = \"127.0.0.1:0\"\nfqdn = [\"{FQDN}\"]\npfx = {pfx:?}\npfx_password_file = {pass:?}\n{edge}\n\
             [provisioning]\nupstream = \"{up}\"\n{prov}\n\
             [devices]\nsubnets = [{subnets}]\n",
            pfx = self.pfx,
            pass = self.password_file,
            edge = self.edge,
            up = self.upstream,
            prov = self.provisioning,
            subnets = subnets.join(", "),
        )
    }
}

struct EdgeRelay {
    relay: Relay,
    port: u16,
    legacy_port: Option<u16>,
    device: Device,
}

impl EdgeRelay {
    async fn edge(&self) -> Value {
        self.relay.status().await["edge"].clone()
    }

    /// Waits until the access log has a line holding every one of `needles`; returns it.
    async fn access_line(&self, needles: &[&str]) -> String {
        wait_for(
            &format!("an access log line with {needles:?}"),
            Duration::from_secs(10),
            || async {
                self.relay
                    .logs()
                    .lines()
                    .find(|l| {
                        l.contains("ucrelay::access") && needles.iter().all(|n| l.contains(n))
                    })
                    .map(str::to_string)
            },
        )
        .await
    }

    async fn reload_cli(&self) -> (i32, String, String) {
        run_cli(&["reload", "--socket", self.relay.socket.to_str().unwrap()]).await
    }
}

/// The `mac` field of an access log line, with any quoting removed.
fn mac_of(line: &str) -> Option<String> {
    let field = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("mac="))?;
    Some(field.trim_matches('"').to_string())
}

fn count(edge: &Value, key: &str) -> u64 {
    edge[key]
        .as_u64()
        .unwrap_or_else(|| panic!("edge.{key} missing from status: {edge}"))
}

// ---------------------------------------------------------------------------------------------
// The device side: curl, openssl s_client, a rustls client.

struct Device {
    ca: PathBuf,
    port: u16,
    scratch: PathBuf,
}

static SCRATCH: AtomicU64 = AtomicU64::new(0);

struct Reply {
    /// 0 when no HTTP answer came (curl prints 000).
    status: u16,
    head: String,
    body_file: PathBuf,
    stderr: String,
    elapsed: Duration,
}

impl Reply {
    /// A header of the final response (after any 100 Continue).
    fn header(&self, name: &str) -> Option<String> {
        crate::support::final_header(&self.head, name)
    }

    fn body(&self) -> Vec<u8> {
        std::fs::read(&self.body_file).unwrap_or_default()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body()).into_owned()
    }
}

impl Device {
    fn url(&self, path: &str) -> String {
        format!("https://{FQDN}:{}{path}", self.port)
    }

    /// Runs curl as a phone would: trusting only the test root CA, resolving the relay's FQDN to
    /// loopback. `args` must include the URL.
    async fn curl(&self, args: &[&str]) -> Reply {
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let head = self.scratch.join(format!("curl-{n}.head"));
        let body_file = self.scratch.join(format!("curl-{n}.body"));
        let resolve = format!("{FQDN}:{}:127.0.0.1", self.port);
        let started = Instant::now();
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            Command::new(peer("curl"))
                .args(["-sS", "--max-time", "20", "--cacert"])
                .arg(&self.ca)
                .args(["--resolve", &resolve, "-D"])
                .arg(&head)
                .arg("-o")
                .arg(&body_file)
                .args(["-w", "%{http_code}"])
                .args(args)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("curl finishes in time")
        .expect("run curl");
        Reply {
            status: String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0),
            head: std::fs::read_to_string(&head).unwrap_or_default(),
            body_file,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        }
    }

    async fn tls(&self) -> Tls {
        tls_connect(&self.ca, self.port).await
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

fn tls_connector(ca: &Path) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A TCP connection to the edge from the loopback address `from` (127.0.0.0/8 is all this
/// machine's: each address is a different host to the relay).
async fn tcp_from(from: &str, port: u16) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    sock.connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap()
}

/// A verified TLS connection to the edge, as a device that knows it as `relay.test`.
async fn tls_connect(ca: &Path, port: u16) -> Tls {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tls_over(ca, tcp).await
}

async fn tls_over(ca: &Path, tcp: TcpStream) -> Tls {
    let name = rustls_pki_types::ServerName::try_from(FQDN).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        tls_connector(ca).connect(name, tcp),
    )
    .await
    .expect("TLS handshake in time")
    .expect("TLS handshake with the edge")
}

/// SHA-256 (lowercase hex) of the leaf certificate the server presented.
fn peer_sha256(tls: &Tls) -> String {
    use sha2::Digest;
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("server certificates");
    sha2::Sha256::digest(certs[0].as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn http1(tls: Tls) -> SendRequest<Empty<Bytes>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

async fn get_on(sender: &mut SendRequest<Empty<Bytes>>, port: u16, path: &str) -> (u16, Bytes) {
    sender
        .ready()
        .await
        .expect("the connection is still usable");
    let req = http::Request::get(path)
        .header(http::header::HOST, format!("{FQDN}:{port}"))
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("request on the open connection");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

/// Sends raw bytes over TLS and returns whatever comes back until the server closes (or 10 s).
async fn raw_exchange(ca: &Path, port: u16, request: &[u8]) -> String {
    let mut tls = tls_connect(ca, port).await;
    tls.write_all(request).await.unwrap();
    tls.flush().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(raw: &str) -> Option<u16> {
    raw.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// `openssl s_client` against the edge; returns (exit ok, stdout, stderr).
async fn s_client(dir: &Path, ca: &Path, port: u16, extra: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(peer("openssl"))
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                FQDN,
            ])
            .arg("-CAfile")
            .arg(ca)
            .args(["-verify_return_error", "-showcerts"])
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("s_client finishes in time")
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The fingerprint of the first certificate in s_client's `-showcerts` output (the leaf served).
async fn served_fingerprint(dir: &Path, ca: &Path, port: u16) -> String {
    let (ok, out, err) = s_client(dir, ca, port, &[]).await;
    assert!(ok, "s_client failed: {err}\n{out}");
    pki::fingerprint_of_pem(dir, out.as_bytes()).await
}

async fn sha256sum(path: &Path) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("sha256sum")
            .arg(path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("sha256sum finishes in time")
    .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Replaces `dst` atomically with a copy of `src` (as an admin deploying a renewed PFX would).
fn install(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 1. Round trips.

#[tokio::test]
async fn get_head_put_round_trip_unchanged_with_auth_challenges_and_access_log() {
    let s = Setup::new().await;
    let nginx = s.nginx().await;
    std::fs::write(nginx.docroot.join("open/hello.txt"), "hello from nginx\n").unwrap();
    let cfg_xml = b"<?xml version=\"1.0\"?>\n<APPLICATION APP_FILE_PATH=\"sip.ld\"/>\n";
    std::fs::write(nginx.docroot.join("000000000000.cfg"), cfg_xml).unwrap();
    let r = s
        .relay("relay", &EdgeSpec::new(&s.cert, &nginx.url()))
        .await;
    let d = &r.device;
    let (mut requests, mut ok2xx, mut ok4xx) = (0u64, 0u64, 0u64);

    let rep = d.curl(&[&d.url("/open/hello.txt")]).await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    assert_eq!(rep.text(), "hello from nginx\n");
    (requests, ok2xx) = (requests + 1, ok2xx + 1);

    // No credentials: nginx's challenge reaches the phone unchanged.
    let rep = d.curl(&["-A", POLY_UA, &d.url("/000000000000.cfg")]).await;
    assert_eq!(rep.status, 401, "{}", rep.stderr);
    let challenge = rep
        .header("www-authenticate")
        .expect("WWW-Authenticate passed through");
    assert_eq!(challenge, format!("Basic realm=\"{}\"", nginx::REALM));
    (requests, ok4xx) = (requests + 1, ok4xx + 1);

    let rep = d
        .curl(&["-A", POLY_UA, "-u", CREDS, &d.url("/000000000000.cfg")])
        .await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    assert_eq!(rep.body(), cfg_xml);
    (requests, ok2xx) = (requests + 1, ok2xx + 1);

    // What the upstream saw: method, target with query, end-to-end headers unchanged; Host rewritten;
    // X-Forwarded-* added; hop-by-hop headers (including ones named in Connection) dropped.
    let rep = d
        .curl(&[
            "-u",
            CREDS,
            "-H",
            "X-Custom: kept as is",
            "-H",
            "Connection: keep-alive, X-Hop",
            "-H",
            "X-Hop: must not pass",
            &d.url("/open/echo?a=1&b=%20x"),
        ])
        .await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    let echo = rep.text();
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, CREDS)
    );
    for line in [
        "method=GET".to_string(),
        "uri=/open/echo?a=1&b=%20x".into(),
        format!("host=127.0.0.1:{}", nginx.port),
        "xff=127.0.0.1".into(),
        "xfp=https".into(),
        format!("xfh={FQDN}:{}", r.port),
        format!("authorization={basic}"),
        "x-custom=kept as is".into(),
        "x-hop=".into(),
    ] {
        assert!(
            echo.lines().any(|l| l == line),
            "upstream should see {line:?}:\n{echo}"
        );
    }
    (requests, ok2xx) = (requests + 1, ok2xx + 1);

    // 20 MB up and back down, byte for byte.
    let big = s.path("big.bin");
    let mut data = vec![0u8; 20_000_000];
    fastrand::fill(&mut data);
    std::fs::write(&big, &data).unwrap();
    drop(data);
    let original = sha256sum(&big).await;
    let upload = format!("/uploads/{MAC}/big.bin");
    let rep = d
        .curl(&[
            "-A",
            POLY_UA,
            "-u",
            CREDS,
            "-T",
            big.to_str().unwrap(),
            &d.url(&upload),
        ])
        .await;
    assert_eq!(rep.status, 201, "PUT: {} {}", rep.stderr, rep.text());
    (requests, ok2xx) = (requests + 1, ok2xx + 1);
    let on_disk = nginx.docroot.join(format!("uploads/{MAC}/big.bin"));
    assert_eq!(
        sha256sum(&on_disk).await,
        original,
        "nginx stored the upload unchanged"
    );

    let rep = d.curl(&["-A", POLY_UA, "-u", CREDS, &d.url(&upload)]).await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    assert_eq!(rep.header("content-length").as_deref(), Some("20000000"));
    assert_eq!(
        sha256sum(&rep.body_file).await,
        original,
        "GET returns the upload unchanged"
    );
    (requests, ok2xx) = (requests + 1, ok2xx + 1);

    let rep = d
        .curl(&["-I", "-A", POLY_UA, "-u", CREDS, &d.url(&upload)])
        .await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    assert_eq!(
        rep.header("content-length").as_deref(),
        Some("20000000"),
        "HEAD: {}",
        rep.head
    );
    (requests, ok2xx) = (requests + 1, ok2xx + 1);

    let rep = d
        .curl(&["-X", "DELETE", "-u", CREDS, &d.url(&upload)])
        .await;
    assert_eq!(rep.status, 204, "{}", rep.stderr);
    assert!(!on_disk.exists(), "DELETE reached nginx");
    (requests, ok2xx) = (requests + 1, ok2xx + 1);

    // Access log: one line per request, with the phone's MAC from its User-Agent.
    let line = r
        .access_line(&[
            "method=GET",
            &format!("path={upload}"),
            "status=200",
            "bytes=20000000",
        ])
        .await;
    assert_eq!(mac_of(&line).as_deref(), Some(MAC), "{line}");
    for needle in ["client=127.0.0.1", "duration_ms="] {
        assert!(
            line.contains(needle),
            "access line lacks {needle:?}: {line}"
        );
    }
    let line = r
        .access_line(&["method=PUT", &format!("path={upload}"), "status=201"])
        .await;
    assert_eq!(mac_of(&line).as_deref(), Some(MAC), "{line}");
    let line = r
        .access_line(&["method=GET", "path=/000000000000.cfg", "status=401"])
        .await;
    assert_eq!(mac_of(&line).as_deref(), Some(MAC), "{line}");
    let line = r
        .access_line(&["method=GET", "path=/open/hello.txt", "status=200"])
        .await;
    assert_ne!(
        mac_of(&line).as_deref(),
        Some(MAC),
        "curl's own UA carries no MAC: {line}"
    );

    // Counters.
    let e = wait_for(
        "edge counters to settle",
        Duration::from_secs(10),
        || async {
            let e = r.edge().await;
            (count(&e, "requests") == requests && count(&e, "bytes_out") >= 20_000_000).then_some(e)
        },
    )
    .await;
    assert_eq!(count(&e, "status_2xx"), ok2xx, "{e}");
    assert_eq!(count(&e, "status_4xx"), ok4xx, "{e}");
    assert_eq!(count(&e, "status_5xx"), 0, "{e}");
    assert_eq!(
        count(&e, "connections_total"),
        requests,
        "one curl, one connection: {e}"
    );
    assert_eq!(count(&e, "connections_refused"), 0, "{e}");
    assert_eq!(count(&e, "tls_handshake_failures"), 0, "{e}");
    assert!(count(&e, "bytes_out") < 20_100_000, "{e}");
    assert_eq!(e["fqdn"], serde_json::json!([FQDN]));
    assert!(
        e["upstream"]
            .as_str()
            .is_some_and(|u| u.contains(&format!("127.0.0.1:{}", nginx.port))),
        "{e}"
    );
    assert_eq!(
        pki::normalize_fingerprint(e["certificate_sha256"].as_str().unwrap()),
        s.cert.sha256
    );
    assert!(
        e["certificate_subject"].as_str().unwrap().contains(FQDN),
        "{e}"
    );
    assert!(count(&e, "certificate_days_left") >= 390, "{e}");
    assert!(e["reload_error"].is_null(), "{e}");
}

/// The access log's MAC field in the form the spec gives, `mac=<12 hex>`, unquoted like `client=`
/// and `path=`, so `grep mac=0004f2e765da` finds a phone's requests.
#[tokio::test]
async fn access_log_mac_field_reads_mac_equals_12_hex() {
    let s = Setup::new().await;
    let nginx = s.nginx().await;
    std::fs::write(nginx.docroot.join("open/hello.txt"), "hello\n").unwrap();
    let r = s
        .relay("relay", &EdgeSpec::new(&s.cert, &nginx.url()))
        .await;
    let rep = r
        .device
        .curl(&["-A", POLY_UA, &r.device.url("/open/hello.txt")])
        .await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    let line = r.access_line(&["path=/open/hello.txt", "status=200"]).await;
    assert!(
        line.split_whitespace().any(|f| f == format!("mac={MAC}")),
        "access log field should read mac={MAC}: {line}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Upstream down or silent.

#[tokio::test]
async fn upstream_refused_is_502_and_silent_upstream_is_504() {
    let s = Setup::new().await;

    // Nothing listens on the upstream port.
    let dead = nginx::free_port().await;
    let r = s
        .relay(
            "refused",
            &EdgeSpec::new(&s.cert, &format!("http://127.0.0.1:{dead}")),
        )
        .await;
    let rep = r
        .device
        .curl(&["-A", POLY_UA, &r.device.url("/000000000000.cfg")])
        .await;
    assert_eq!(rep.status, 502, "{}", rep.stderr);
    assert!(
        rep.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{}",
        rep.head
    );
    let body = rep.text();
    assert!(
        !body.trim().is_empty() && body.len() < 1024,
        "a short text body: {body:?}"
    );
    assert!(
        rep.elapsed < Duration::from_secs(4),
        "refused connect answered at once: {:?}",
        rep.elapsed
    );
    let line = r.access_line(&["status=502"]).await;
    assert_eq!(mac_of(&line).as_deref(), Some(MAC), "{line}");
    // A HEAD gets the 502 without its body, and the connection stays in step for the next request.
    let mut phone = http1(tls_connect(&s.pki.ca, r.port).await).await;
    let (p, body) = request_on(&mut phone, r.port, http::Method::HEAD, "/head.cfg", &[])
        .await
        .unwrap();
    assert_eq!((p.status.as_u16(), body.len()), (502, 0));
    let (p, body) = request_on(&mut phone, r.port, http::Method::GET, "/after.cfg", &[])
        .await
        .unwrap();
    assert_eq!(p.status, 502);
    assert!(body.starts_with(b"502 Bad Gateway: "), "{body:?}");

    // An upstream that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c); // kept open, never read or written
        }
    });
    let mut spec = EdgeSpec::new(&s.cert, &format!("http://{silent_addr}"));
    spec.provisioning = "timeout = \"500ms\"\nconnect_timeout = \"500ms\"\n".into();
    let r2 = s.relay("silent", &spec).await;
    let rep = r2.device.curl(&[&r2.device.url("/000000000000.cfg")]).await;
    assert_eq!(rep.status, 504, "{}", rep.stderr);
    assert!(
        rep.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{}",
        rep.head
    );
    let body = rep.text();
    assert!(
        !body.trim().is_empty() && body.len() < 1024,
        "a short text body: {body:?}"
    );
    assert!(
        rep.elapsed >= Duration::from_millis(450) && rep.elapsed < Duration::from_secs(5),
        "504 after the 500 ms timeout, took {:?}",
        rep.elapsed
    );
    held.abort();

    for (relay, answered) in [(&r, 3), (&r2, 1)] {
        let e = relay.edge().await;
        assert_eq!(count(&e, "status_5xx"), answered, "{e}");
        assert_eq!(count(&e, "requests"), answered, "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. TLS versions and PFX encodings.

#[tokio::test]
async fn tls12_and_tls13_work_tls11_is_refused_and_legacy_pfx_serves() {
    let s = Setup::new().await;
    let nginx = s.nginx().await;
    std::fs::write(nginx.docroot.join("open/hello.txt"), "hello\n").unwrap();
    let r = s
        .relay("modern", &EdgeSpec::new(&s.cert, &nginx.url()))
        .await;
    let work = s.path("modern");

    for (flag, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (ok, out, err) = s_client(&work, &s.pki.ca, r.port, &[flag]).await;
        assert!(ok, "{name} handshake failed: {err}\n{out}");
        assert!(
            out.contains(&format!("New, {name}, Cipher is")),
            "{name} negotiated:\n{out}"
        );
        assert!(
            out.contains("Verify return code: 0 (ok)"),
            "chain verifies to the root:\n{out}"
        );
        assert_eq!(
            pki::fingerprint_of_pem(&work, out.as_bytes()).await,
            s.cert.sha256
        );
    }
    let before = count(&r.edge().await, "tls_handshake_failures");
    // The client really offers TLS 1.1 only (its own security level would otherwise forbid it).
    let (ok, out, err) = s_client(
        &work,
        &s.pki.ca,
        r.port,
        &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
    )
    .await;
    assert!(!ok, "TLS 1.1 must be refused:\n{out}\n{err}");
    assert!(!out.contains("New, TLSv1.1"), "{out}");
    r.relay
        .wait_status("the refused handshake to be counted", |st| {
            st["edge"]["tls_handshake_failures"].as_u64() > Some(before)
        })
        .await;
    let (ok, _, err) = s_client(
        &work,
        &s.pki.ca,
        r.port,
        &["-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"],
    )
    .await;
    assert!(!ok, "TLS 1.0 must be refused: {err}");

    // The same certificate exported with `-legacy` (RC2/3DES, SHA-1 MAC) loads and serves.
    let mut spec = EdgeSpec::new(&s.cert, &nginx.url());
    spec.pfx = s.cert.legacy_pfx.clone();
    let legacy = s.relay("legacy", &spec).await;
    assert_eq!(
        served_fingerprint(&s.path("legacy"), &s.pki.ca, legacy.port).await,
        s.cert.sha256
    );
    let rep = legacy
        .device
        .curl(&[&legacy.device.url("/open/hello.txt")])
        .await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    assert_eq!(rep.text(), "hello\n");
}

// ---------------------------------------------------------------------------------------------
// 4. Bad certificates at start.

/// `(level, rule, message)` for each `certificate <rule>: <message>` line of `ucrelay check`.
fn cert_lines(out: &str) -> Vec<(String, String, String)> {
    out.lines()
        .filter_map(|l| {
            let (level, rest) = l.split_once("certificate ")?;
            let (rule, msg) = rest.split_once(": ")?;
            Some((level.trim().to_string(), rule.to_string(), msg.to_string()))
        })
        .collect()
}

#[tokio::test]
async fn check_names_each_bad_certificate_rule() {
    let s = Setup::new().await;
    let upstream = "http://127.0.0.1:9";
    let good = EdgeSpec::new(&s.cert, upstream);
    let (leaf_only, no_eku, other_name, ip_only, expired) = tokio::join!(
        s.pki.leaf_only("leaf-only", &[FQDN]),
        s.pki.without_server_auth("no-eku", &[FQDN]),
        s.pki.server("other-name", &["other.test"]),
        s.pki.ip_only("ip-only"),
        s.pki.expired("expired", &[FQDN]),
    );

    // The good one: every rule reported, all ok.
    let cfg = s.config("check-good", &good).write();
    let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}{err}");
    let lines = cert_lines(&out);
    for rule in [
        "pfx-file",
        "pfx-password",
        "private-key",
        "key-match",
        "chain",
        "eku-server-auth",
        "ip-identity",
        &format!("fqdn {FQDN}"),
        "validity",
    ] {
        assert!(
            lines.iter().any(|(lvl, r, _)| lvl == "ok" && r == rule),
            "`ok  certificate {rule}:` expected:\n{out}"
        );
    }
    assert!(!out.lines().any(|l| l.starts_with("fail")), "{out}");

    let spec_for = |b: &Bundle| EdgeSpec::new(b, upstream);
    let mut wrong_password = EdgeSpec::new(&s.cert, upstream);
    wrong_password.password_file = s.pki.wrong_password_file("wrong");
    let mut missing = EdgeSpec::new(&s.cert, upstream);
    missing.pfx = s.path("no-such.pfx");
    let cases: Vec<(&str, EdgeSpec, String)> = vec![
        ("missing-file", missing, "pfx-file".into()),
        ("wrong-password", wrong_password, "pfx-password".into()),
        ("leaf-only", spec_for(&leaf_only), "chain".into()),
        ("no-eku", spec_for(&no_eku), "eku-server-auth".into()),
        ("other-name", spec_for(&other_name), format!("fqdn {FQDN}")),
        ("ip-only", spec_for(&ip_only), "ip-identity".into()),
        ("expired", spec_for(&expired), "validity".into()),
    ];
    for (name, spec, rule) in &cases {
        let cfg = s.config(&format!("check-{name}"), spec).write();
        let (code, out, err) = run_cli(&["check", "--config", cfg.to_str().unwrap()]).await;
        assert_eq!(code, 1, "check must fail for {name}:\n{out}{err}");
        let lines = cert_lines(&out);
        let hit = lines.iter().find(|(lvl, r, _)| lvl == "fail" && r == rule);
        let (_, _, msg) =
            hit.unwrap_or_else(|| panic!("{name}: `fail  certificate {rule}:` expected:\n{out}"));
        assert!(
            !msg.trim().is_empty(),
            "{name}: the failure says why:\n{out}"
        );
        assert!(
            out.lines().any(|l| l.starts_with("fail  certificate ")
                && l.contains(&format!("certificate {rule}: "))),
            "{name}: line format `fail  certificate <rule>: <message>`:\n{out}"
        );
        // Only the broken rule fails (an IP-only certificate also covers no FQDN), so each case
        // really isolates its rule: e.g. the rcgen-made expired leaf still chains correctly.
        let mut failed: Vec<&str> = lines
            .iter()
            .filter(|(lvl, _, _)| lvl == "fail")
            .map(|(_, r, _)| r.as_str())
            .collect();
        failed.sort_unstable();
        let fqdn_rule = format!("fqdn {FQDN}");
        let expected: Vec<&str> = match *name {
            "ip-only" => vec![fqdn_rule.as_str(), "ip-identity"],
            _ => vec![rule.as_str()],
        };
        assert_eq!(failed, expected, "{name}: failing rules:\n{out}");
    }
}

/// `ucrelay run` with a bad certificate exits 1, and its error names the failing rule.
#[tokio::test]
async fn run_refuses_a_bad_certificate_naming_the_rule() {
    let s = Setup::new().await;
    let upstream = "http://127.0.0.1:9";
    let (other_name, expired) = tokio::join!(
        s.pki.server("other-name", &["other.test"]),
        s.pki.expired("expired", &[FQDN]),
    );
    let cases = [
        (
            "other-name",
            EdgeSpec::new(&other_name, upstream),
            format!("fqdn {FQDN}"),
        ),
        (
            "expired",
            EdgeSpec::new(&expired, upstream),
            "validity".to_string(),
        ),
    ];
    for (name, spec, rule) in &cases {
        let cfg = s.config(&format!("run-{name}"), spec).write();
        let out = tokio::time::timeout(
            Duration::from_secs(15),
            Command::new(bin())
                .args(["run", "--config"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("`ucrelay run` with the {name} certificate did not exit"))
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(rule.as_str()),
            "{name}: stderr should name {rule:?}: {err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Reload.

#[tokio::test]
async fn reload_swaps_the_certificate_for_new_handshakes_and_refuses_a_bad_one() {
    let s = Setup::new().await;
    let nginx = s.nginx().await;
    std::fs::write(nginx.docroot.join("open/hello.txt"), "hello\n").unwrap();
    // The configured PFX path is a copy the test replaces, like an admin deploying a renewal.
    let live_pfx = s.path("live.pfx");
    let live_pass = s.path("live.pfx.pass");
    install(&s.cert.pfx, &live_pfx);
    install(&s.cert.password_file, &live_pass);
    let mut spec = EdgeSpec::new(&s.cert, &nginx.url());
    spec.pfx = live_pfx.clone();
    spec.password_file = live_pass.clone();
    let (renewed, expired, other_name, third) = tokio::join!(
        s.pki.server("renewed", &[FQDN]),
        s.pki.expired("expired", &[FQDN]),
        s.pki.server("other-name", &["other.test"]),
        s.pki.server("third", &[FQDN]),
    );
    let r = s.relay("relay", &spec).await;
    r.relay.wait_healthy().await;
    let first = s.cert.sha256.clone();

    // A connection opened before the reload, already used once.
    let old_tls = r.device.tls().await;
    assert_eq!(peer_sha256(&old_tls), first);
    let mut old_conn = http1(old_tls).await;
    assert_eq!(
        get_on(&mut old_conn, r.port, "/open/hello.txt").await.0,
        200
    );

    // A renewed certificate: reload applies it to new handshakes only.
    install(&renewed.pfx, &live_pfx);
    install(&renewed.password_file, &live_pass);
    let (code, out, err) = r.reload_cli().await;
    assert_eq!(code, 0, "reload with a good certificate: {out}{err}");
    let e = r.edge().await;
    assert_eq!(
        pki::normalize_fingerprint(e["certificate_sha256"].as_str().unwrap()),
        renewed.sha256
    );
    assert!(e["reload_error"].is_null(), "{e}");
    let new_tls = r.device.tls().await;
    assert_eq!(
        peer_sha256(&new_tls),
        renewed.sha256,
        "new handshakes get the new certificate"
    );
    assert_eq!(
        served_fingerprint(&s.path("relay"), &s.pki.ca, r.port).await,
        renewed.sha256
    );
    let mut new_conn = http1(new_tls).await;
    assert_eq!(
        get_on(&mut new_conn, r.port, "/open/hello.txt").await,
        (200, Bytes::from("hello\n"))
    );
    let (status, body) = get_on(&mut old_conn, r.port, "/open/hello.txt").await;
    assert_eq!(
        (status, &body[..]),
        (200, &b"hello\n"[..]),
        "the pre-reload connection keeps working"
    );

    // An expired one: refused, the renewed one keeps serving, and status says why.
    install(&expired.pfx, &live_pfx);
    install(&expired.password_file, &live_pass);
    let (code, out, err) = r.reload_cli().await;
    assert_eq!(
        code, 1,
        "reload with an expired certificate must fail: {out}{err}"
    );
    let said = format!("{out}{err}");
    assert!(
        said.contains("validity") || said.contains("expired"),
        "reload should say why: {said}"
    );
    let st = r.relay.status().await;
    assert_eq!(st["healthy"], false, "{st}");
    let problems: Vec<&str> = st["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("certificate reload refused")),
        "{problems:?}"
    );
    let e = &st["edge"];
    assert!(
        e["reload_error"].as_str().is_some_and(|w| !w.is_empty()),
        "{e}"
    );
    assert_eq!(
        pki::normalize_fingerprint(e["certificate_sha256"].as_str().unwrap()),
        renewed.sha256
    );
    assert_eq!(
        peer_sha256(&r.device.tls().await),
        renewed.sha256,
        "the old certificate still serves"
    );
    let (code, out, _) = run_cli(&["status", "--socket", r.relay.socket.to_str().unwrap()]).await;
    assert_eq!(code, 1, "status exits 1 while unhealthy: {out}");
    assert!(out.contains("certificate reload refused"), "{out}");

    // A certificate for the wrong name, by SIGHUP: refused the same way.
    install(&other_name.pfx, &live_pfx);
    install(&other_name.password_file, &live_pass);
    let expired_error = e["reload_error"].clone();
    r.relay.signal("HUP");
    let st = r
        .relay
        .wait_status("the SIGHUP reload to refuse the wrong name", |st| {
            let now = &st["edge"]["reload_error"];
            now.is_string() && *now != expired_error
        })
        .await;
    let why = st["edge"]["reload_error"].as_str().unwrap();
    assert!(
        why.contains(FQDN),
        "the refusal names the uncovered name: {why}"
    );
    assert_eq!(st["healthy"], false, "{st}");
    assert_eq!(peer_sha256(&r.device.tls().await), renewed.sha256);

    // A good one by SIGHUP: applied, and the relay is healthy again.
    install(&third.pfx, &live_pfx);
    install(&third.password_file, &live_pass);
    r.relay.signal("HUP");
    r.relay
        .wait_status("the SIGHUP reload to apply a good certificate", |st| {
            st["edge"]["certificate_sha256"]
                .as_str()
                .is_some_and(|h| pki::normalize_fingerprint(h) == third.sha256)
                && st["edge"]["reload_error"].is_null()
                && st["healthy"] == true
        })
        .await;
    assert_eq!(peer_sha256(&r.device.tls().await), third.sha256);
    let (status, _) = get_on(&mut old_conn, r.port, "/open/hello.txt").await;
    assert_eq!(status, 200, "the first connection survived every reload");
}

// ---------------------------------------------------------------------------------------------
// 6. Hostile input.

#[tokio::test]
async fn slowloris_oversized_heads_long_uris_and_traversal_are_contained() {
    let s = Setup::new().await;
    let nginx = s.nginx().await;
    std::fs::write(nginx.docroot.join("open/hello.txt"), "hello\n").unwrap();
    let mut spec = EdgeSpec::new(&s.cert, &nginx.url());
    spec.edge = "header_timeout = \"1s\"\n".into();
    let r = s.relay("relay", &spec).await;
    let d = &r.device;

    // Slowloris: 10 TLS connections trickling a request head, 2 stalled mid-handshake.
    let mut slow = tokio::task::JoinSet::new();
    for i in 0..10 {
        let mut tls = d.tls().await;
        tls.write_all(
            format!("GET /open/hello.txt HTTP/1.1\r\nHost: {FQDN}\r\nX-Slow-{i}: ").as_bytes(),
        )
        .await
        .unwrap();
        tls.flush().await.unwrap();
        let opened = Instant::now();
        slow.spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(tls);
            let trickle = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(150)).await; // keeps it slow
                    if wr.write_all(b"z").await.is_err() || wr.flush().await.is_err() {
                        break;
                    }
                }
            };
            let mut buf = [0u8; 256];
            tokio::select! {
                _ = rd.read(&mut buf) => {}
                _ = trickle => {}
            }
            (opened, Instant::now())
        });
    }
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(("127.0.0.1", r.port)).await.unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01]).await.unwrap(); // the start of a ClientHello, then nothing
        let opened = Instant::now();
        slow.spawn(async move {
            let mut buf = [0u8; 256];
            let _ = tcp.read(&mut buf).await;
            (opened, Instant::now())
        });
    }
    r.relay
        .wait_status("12 slow connections open", |st| {
            st["edge"]["connections_open"].as_u64() >= Some(12)
        })
        .await;
    let rep = d.curl(&[&d.url("/open/hello.txt")]).await;
    let curl_done = Instant::now();
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    assert_eq!(rep.text(), "hello\n");
    assert!(
        rep.elapsed < Duration::from_millis(900),
        "served promptly: {:?}",
        rep.elapsed
    );
    let closed = tokio::time::timeout(Duration::from_secs(6), slow.join_all())
        .await
        .expect("slow connections are closed after header_timeout");
    for (opened, at) in &closed {
        assert!(
            *at > curl_done,
            "the slow connections were still open while curl was served"
        );
        let lived = at.duration_since(*opened);
        assert!(
            lived >= Duration::from_millis(800) && lived < Duration::from_secs(4),
            "closed {lived:?} after opening; header_timeout is 1 s"
        );
    }

    // header_timeout also ends a keep-alive connection that sits idle after a request.
    let mut kept = http1(d.tls().await).await;
    assert_eq!(get_on(&mut kept, r.port, "/open/hello.txt").await.0, 200);
    let idle_from = Instant::now();
    wait_for(
        "the idle keep-alive connection to be closed",
        Duration::from_secs(5),
        || async { kept.is_closed().then_some(()) },
    )
    .await;
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(800),
        "closed after {idle:?}, before header_timeout (1 s)"
    );

    // An oversized head (64 KiB cookie; max_header_size is 32 KiB): 431 or closed, never forwarded.
    let cookie = format!("Cookie: big={}", "c".repeat(64 * 1024));
    let rep = d
        .curl(&["-H", &cookie, &d.url("/open/hello.txt?evil-cookie")])
        .await;
    assert!(
        rep.status == 431 || rep.status == 0,
        "oversized head: {} {}",
        rep.status,
        rep.stderr
    );
    let rep = d.curl(&[&d.url("/open/hello.txt")]).await;
    assert_eq!(rep.status, 200, "the edge keeps serving: {}", rep.stderr);

    // A request target over 8 KiB.
    let long = format!("/open/evil-long-{}", "a".repeat(9000));
    let rep = d.curl(&[&d.url(&long)]).await;
    assert_eq!(rep.status, 414, "{}", rep.stderr);

    // Traversal and smuggling in the path: 400 before routing.
    for path in [
        "/open/../evil1.cfg",
        "/open/%2e%2e/evil2.cfg",
        "/open/%2E%2E%2Fevil3.cfg",
        "/open/.%2e/evil4.cfg",
        "/open/evil5%2fx.cfg",
        "/open/evil6%5c..%5cx.cfg",
        "/open/./evil7.cfg",
        "/open/evil8%00.cfg",
        "/open/evil9%0d%0aX-Injected:%201",
        "/evil10/..",
    ] {
        let rep = d.curl(&["--path-as-is", &d.url(path)]).await;
        assert_eq!(rep.status, 400, "{path}: {}", rep.stderr);
        assert!(!rep.text().trim().is_empty(), "{path}: the 400 says why");
    }
    // Bytes curl would not send: a literal backslash and a raw control character.
    for target in ["/open/evil11\\..\\x.cfg", "/open/evil12\u{1}.cfg"] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: {FQDN}\r\nConnection: close\r\n\r\n");
        let raw = raw_exchange(&s.pki.ca, r.port, req.as_bytes()).await;
        assert_eq!(status_of(&raw), Some(400), "{target:?}: {raw:?}");
    }

    // None of it reached nginx; a request after it all did.
    let rep = d.curl(&[&d.url("/open/hello.txt?after-hostile")]).await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    wait_for(
        "nginx to log the last request",
        Duration::from_secs(10),
        || async { nginx.access_log().contains("after-hostile").then_some(()) },
    )
    .await;
    let log = nginx.access_log();
    assert!(
        !log.contains("evil"),
        "hostile requests reached the upstream:\n{log}"
    );
    assert!(r.relay.child.id().is_some(), "the relay is still running");
}

// ---------------------------------------------------------------------------------------------
// 7. Connection cap.

#[tokio::test]
async fn over_max_connections_gets_503_at_once() {
    let s = Setup::new().await;
    let nginx = s.nginx().await;
    std::fs::write(nginx.docroot.join("open/hello.txt"), "hello\n").unwrap();
    let mut spec = EdgeSpec::new(&s.cert, &nginx.url());
    spec.edge = "max_connections = 2\n".into();
    let r = s.relay("relay", &spec).await;
    let d = &r.device;

    let idle_a = d.tls().await;
    let idle_b = d.tls().await;
    r.relay
        .wait_status("two idle connections open", |st| {
            st["edge"]["connections_open"].as_u64() == Some(2)
        })
        .await;

    let rep = d.curl(&[&d.url("/open/hello.txt")]).await;
    assert_eq!(rep.status, 503, "{}", rep.stderr);
    assert!(
        rep.elapsed < Duration::from_secs(3),
        "refused at once: {:?}",
        rep.elapsed
    );
    // The 503 comes right after the handshake, without waiting for a request.
    let mut third = d.tls().await;
    let mut buf = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf)).await;
    let raw = String::from_utf8_lossy(&buf);
    assert_eq!(status_of(&raw), Some(503), "{raw:?}");
    assert!(
        ended.is_ok(),
        "the refused connection is closed after the 503"
    );
    let e = r.edge().await;
    assert_eq!(count(&e, "connections_refused"), 2, "{e}");
    assert_eq!(count(&e, "status_5xx"), 2, "{e}");

    // A slot frees up when a device leaves.
    drop(idle_a);
    r.relay
        .wait_status("one connection open", |st| {
            st["edge"]["connections_open"].as_u64() == Some(1)
        })
        .await;
    let rep = d.curl(&[&d.url("/open/hello.txt")]).await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    drop(idle_b);
}

#[tokio::test]
async fn one_host_cannot_hold_the_edge_not_even_in_tls_handshakes() {
    let s = Setup::new().await;
    let nginx = s.nginx().await;
    std::fs::write(nginx.docroot.join("open/hello.txt"), "hello\n").unwrap();
    let mut spec = EdgeSpec::new(&s.cert, &nginx.url());
    spec.edge = "max_connections_per_ip = 4\nheader_timeout = \"2s\"\n".into();
    let r = s.relay("relay", &spec).await;
    let d = &r.device;

    // The hog, 127.0.0.2: connections that never begin their TLS handshake still hold slots.
    let mut hog = Vec::new();
    for _ in 0..4 {
        hog.push(tcp_from("127.0.0.2", d.port).await);
    }
    r.relay
        .wait_status("the hog's four connections open", |st| {
            st["edge"]["connections_open"].as_u64() == Some(4)
        })
        .await;
    // A fifth from the same host is refused at once, saying why.
    let mut fifth = tls_over(&d.ca, tcp_from("127.0.0.2", d.port).await).await;
    let mut buf = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), fifth.read_to_end(&mut buf)).await;
    let raw = String::from_utf8_lossy(&buf);
    assert_eq!(status_of(&raw), Some(503), "{raw:?}");
    assert!(
        raw.contains("too many connections from your host"),
        "{raw:?}"
    );
    assert!(
        ended.is_ok(),
        "the refused connection is closed after the 503"
    );
    // Meanwhile a phone on another address is served.
    let rep = d
        .curl(&["--interface", "127.0.0.3", &d.url("/open/hello.txt")])
        .await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    let e = r.edge().await;
    assert_eq!(count(&e, "connections_refused_per_ip"), 1, "{e}");
    // The handshakes that never came are cut at header_timeout, and the slots come back.
    let started = Instant::now();
    r.relay
        .wait_status("the hog's connections closed", |st| {
            st["edge"]["connections_open"].as_u64() == Some(0)
        })
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for mut c in hog {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "the relay closed the stalled handshake"
        );
    }
    let mut again = tls_over(&d.ca, tcp_from("127.0.0.2", d.port).await).await;
    again
        .write_all(b"GET /open/hello.txt HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), again.read_to_end(&mut buf)).await;
    assert_eq!(status_of(&String::from_utf8_lossy(&buf)), Some(200));
}

// ---------------------------------------------------------------------------------------------
// 8. Legacy plain HTTP.

#[tokio::test]
async fn legacy_http_serves_only_device_subnets() {
    let s = Setup::new().await;
    let nginx = s.nginx().await;
    std::fs::write(nginx.docroot.join("open/hello.txt"), "hello\n").unwrap();

    let mut spec = EdgeSpec::new(&s.cert, &nginx.url());
    spec.edge = "legacy_http_listen = \"127.0.0.1:0\"\n".into();
    let inside = s.relay("inside", &spec).await;
    let legacy = inside
        .legacy_port
        .expect("status shows the bound legacy port");
    assert_ne!(legacy, 0);
    let d = &inside.device;
    let rep = d
        .curl(&[
            "-A",
            POLY_UA,
            &format!("http://127.0.0.1:{legacy}/open/hello.txt"),
        ])
        .await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    assert_eq!(rep.text(), "hello\n");
    let rep = d
        .curl(&[&format!("http://127.0.0.1:{legacy}/open/echo")])
        .await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    assert!(
        rep.text().lines().any(|l| l == "xfp=http"),
        "{}",
        rep.text()
    );
    inside.access_line(&["status=200", MAC]).await;
    let e = inside.edge().await;
    assert_eq!(count(&e, "legacy_forbidden"), 0, "{e}");

    spec.subnets = vec!["10.0.0.0/8".into()];
    let outside = s.relay("outside", &spec).await;
    let legacy = outside.legacy_port.expect("legacy port");
    let d = &outside.device;
    let rep = d
        .curl(&[&format!(
            "http://127.0.0.1:{legacy}/open/hello.txt?legacy-outside"
        )])
        .await;
    // Closed at accept: no answer at all.
    assert_eq!(rep.status, 0, "{}", rep.stderr);
    // Before reading a byte: a client that sends nothing is closed all the same.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", legacy))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
        .await
        .expect("closed at once, not left waiting for a request")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing is sent to a stranger");
    // HTTPS is not restricted by [devices].subnets.
    let rep = d.curl(&[&d.url("/open/hello.txt")]).await;
    assert_eq!(rep.status, 200, "{}", rep.stderr);
    let e = outside.edge().await;
    assert_eq!(count(&e, "legacy_forbidden"), 2, "{e}");
    assert!(
        !nginx.access_log().contains("legacy-outside"),
        "the refused request was not forwarded"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Upstream connections: kept per device connection, pooled between them, replaced when closed.

/// A plain-HTTP upstream that answers every request with `conn=<n> req=<m>` and silently closes
/// each connection after `per_conn` answers (as servers do at their keep-alive limits).
struct CountingUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    closed: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingUpstream {
    async fn start(per_conn: u64) -> CountingUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(tokio::sync::Notify::new());
        let (c, n) = (connections.clone(), closed.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let conn = c.fetch_add(1, Ordering::SeqCst) + 1;
                let n = n.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for req in 1..=per_conn {
                        // One request head (the test sends no bodies).
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 4096];
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        let body = format!("conn={conn} req={req}");
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                            body.len()
                        );
                        if sock.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    drop(sock);
                    n.notify_one();
                });
            }
        });
        CountingUpstream {
            addr,
            connections,
            closed,
            task,
        }
    }
}

async fn get_text(sender: &mut SendRequest<Empty<Bytes>>, port: u16, i: u32) -> String {
    let path = format!("/file-{i}.cfg");
    let (status, body) = get_on(sender, port, &path).await;
    assert_eq!(status, 200, "{path}: {body:?}");
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn upstream_connections_are_reused_pooled_and_replaced_when_closed() {
    let s = Setup::new().await;
    let up = CountingUpstream::start(3).await;
    let r = s
        .relay(
            "lanes",
            &EdgeSpec::new(&s.cert, &format!("http://{}", up.addr)),
        )
        .await;
    // One device connection: its requests share one upstream connection.
    let mut phone = http1(tls_connect(&s.pki.ca, r.port).await).await;
    let mut seen = Vec::new();
    for i in 1..=3 {
        seen.push(get_text(&mut phone, r.port, i).await);
    }
    assert_eq!(seen, ["conn=1 req=1", "conn=1 req=2", "conn=1 req=3"]);
    // The upstream closes that connection without a word; the next request goes on a new one
    // instead of failing.
    tokio::time::timeout(Duration::from_secs(10), up.closed.notified())
        .await
        .expect("the upstream closed its first connection");
    assert_eq!(get_text(&mut phone, r.port, 4).await, "conn=2 req=1");
    drop(phone);

    // A new device connection picks up the idle upstream connection the first one left behind.
    wait_for(
        "the first phone's upstream connection in the pool",
        Duration::from_secs(10),
        || async { (count(&r.edge().await, "upstream_idle") == 1).then_some(()) },
    )
    .await;
    let mut second = http1(tls_connect(&s.pki.ca, r.port).await).await;
    assert_eq!(get_text(&mut second, r.port, 5).await, "conn=2 req=2");
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    let e = r.edge().await;
    assert_eq!(count(&e, "status_2xx"), 5, "{e}");
    up.task.abort();
}

/// An upstream that answers each path with a different framing, and keeps every request head it
/// read.
struct FramingUpstream {
    addr: SocketAddr,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FramingUpstream {
    async fn start() -> FramingUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = heads.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 4096];
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        let length: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        while buf.len() < length {
                            let mut chunk = [0u8; 4096];
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        }
                        let body: Vec<u8> = buf.drain(..length).collect();
                        seen.lock().unwrap().push(head.clone());
                        let target = head.split(' ').nth(1).unwrap_or("").to_string();
                        let answer: Vec<u8> = match target.as_str() {
                            "/len" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Kind: length\r\n\r\nhello".to_vec(),
                            "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n".to_vec(),
                            "/early" => b"HTTP/1.1 103 Early Hints\r\nLink: </x.cfg>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                            "/not-modified" => b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n".to_vec(),
                            "/echo" => {
                                let mut a = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", head.len() + body.len()).into_bytes();
                                a.extend_from_slice(head.as_bytes());
                                a.extend_from_slice(&body);
                                a
                            }
                            "/until-close" => {
                                let _ = sock.write_all(b"HTTP/1.1 200 OK\r\nX-Kind: close\r\n\r\nto the end").await;
                                return;
                            }
                            "/cut" => {
                                let _ = sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf").await;
                                return;
                            }
                            "/bad-chunks" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
                            "/smuggle" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
                            _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                        };
                        if sock.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FramingUpstream { addr, heads, task }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

async fn request_on(
    sender: &mut SendRequest<Empty<Bytes>>,
    port: u16,
    method: http::Method,
    path: &str,
    extra: &[(&str, &str)],
) -> Result<(http::response::Parts, Bytes), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, format!("{FQDN}:{port}"));
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(req.body(Empty::new()).unwrap()),
    )
    .await
    .map_err(|_| "no answer in 10 s".to_string())?
    .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts, body))
}

#[tokio::test]
async fn the_direct_path_frames_every_answer_and_hands_what_it_does_not_take_to_the_general_server()
{
    let s = Setup::new().await;
    let up = FramingUpstream::start().await;
    let r = s
        .relay(
            "direct",
            &EdgeSpec::new(&s.cert, &format!("http://{}", up.addr)),
        )
        .await;
    let port = r.port;
    use http::Method;

    // One device connection, every framing in turn; hyper's client checks each answer's framing
    // as strictly as a phone would, and the connection must stay usable after each.
    let mut phone = http1(tls_connect(&s.pki.ca, port).await).await;
    let (p, body) = request_on(&mut phone, port, Method::GET, "/len", &[])
        .await
        .unwrap();
    assert_eq!((p.status.as_u16(), &body[..]), (200, &b"hello"[..]));
    assert_eq!(p.headers["x-kind"], "length");
    let (p, body) = request_on(&mut phone, port, Method::GET, "/chunked", &[])
        .await
        .unwrap();
    assert_eq!((p.status.as_u16(), &body[..]), (200, &b"hello"[..]));
    assert_eq!(p.headers["transfer-encoding"], "chunked");
    let (p, body) = request_on(&mut phone, port, Method::GET, "/early", &[])
        .await
        .unwrap();
    assert_eq!(
        (p.status.as_u16(), &body[..]),
        (200, &b"ok"[..]),
        "the interim answer is not passed on"
    );
    let (p, body) = request_on(&mut phone, port, Method::HEAD, "/len", &[])
        .await
        .unwrap();
    assert_eq!((p.status.as_u16(), body.len()), (200, 0));
    assert_eq!(
        p.headers["content-length"], "5",
        "HEAD keeps the length of the body it does not get"
    );
    let (p, body) = request_on(&mut phone, port, Method::GET, "/not-modified", &[])
        .await
        .unwrap();
    assert_eq!((p.status.as_u16(), body.len()), (304, 0));
    let (p, body) = request_on(
        &mut phone,
        port,
        Method::GET,
        "/echo",
        &[
            ("x-custom", "kept as is"),
            ("connection", "keep-alive"),
            ("x-forwarded-for", "10.1.2.3"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(p.status, 200);
    let echo = String::from_utf8_lossy(&body).to_ascii_lowercase();
    for line in [
        "get /echo http/1.1".to_string(),
        format!("host: {}", up.addr),
        "x-custom: kept as is".into(),
        "x-forwarded-for: 10.1.2.3, 127.0.0.1".into(),
        "x-forwarded-proto: https".into(),
        format!("x-forwarded-host: {FQDN}:{port}"),
    ] {
        assert!(
            echo.lines().any(|l| l == line),
            "upstream should see {line:?}:\n{echo}"
        );
    }
    assert!(
        !echo.contains("connection:"),
        "hop-by-hop header forwarded:\n{echo}"
    );
    // A request the direct path does not take (a Connection header naming another header): the
    // general server answers it and what follows, on the same connection.
    let (p, body) = request_on(
        &mut phone,
        port,
        Method::GET,
        "/echo",
        &[("connection", "x-hop"), ("x-hop", "secret")],
    )
    .await
    .unwrap();
    assert_eq!(p.status, 200);
    assert!(
        !String::from_utf8_lossy(&body)
            .to_ascii_lowercase()
            .contains("x-hop")
    );
    let (p, body) = request_on(&mut phone, port, Method::GET, "/chunked", &[])
        .await
        .unwrap();
    assert_eq!((p.status.as_u16(), &body[..]), (200, &b"hello"[..]));

    // Pipelined requests in one write, a POST with a body among them: from there on the general
    // server answers, which frames the last, close-delimited answer its own way.
    let raw = raw_exchange(
        &s.pki.ca,
        port,
        format!(
            "GET /len HTTP/1.1\r\nHost: {FQDN}\r\n\r\nPOST /echo HTTP/1.1\r\nHost: {FQDN}\r\nContent-Length: 4\r\n\r\nbodyGET /until-close HTTP/1.1\r\nHost: {FQDN}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert_eq!(raw.matches("HTTP/1.1 200 OK").count(), 3, "{raw}");
    assert!(raw.contains("\r\n\r\nhello"), "{raw}");
    assert!(
        raw.to_ascii_lowercase().contains("post /echo http/1.1") && raw.contains("body"),
        "{raw}"
    );
    assert!(raw.contains("to the end"), "{raw}");
    // The same close-delimited answer on the direct path: passed on as it came, then closed.
    let raw = raw_exchange(
        &s.pki.ca,
        port,
        format!("GET /until-close HTTP/1.1\r\nHost: {FQDN}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(raw.contains("\r\nconnection: close\r\n"), "{raw}");
    assert!(raw.ends_with("\r\n\r\nto the end"), "{raw}");

    // An answer cut short or framed two ways: the device's connection ends (it cannot be told
    // otherwise mid-body) or gets a 502; never the bytes past a framing the relay cannot trust.
    let mut phone = http1(tls_connect(&s.pki.ca, port).await).await;
    assert!(
        request_on(&mut phone, port, Method::GET, "/cut", &[])
            .await
            .is_err(),
        "a cut body is an error at the device"
    );
    let mut phone = http1(tls_connect(&s.pki.ca, port).await).await;
    let (p, body) = request_on(&mut phone, port, Method::GET, "/smuggle", &[])
        .await
        .unwrap();
    assert_eq!(p.status, 502, "{body:?}");
    let (p, _) = request_on(&mut phone, port, Method::GET, "/len", &[])
        .await
        .unwrap();
    assert_eq!(
        p.status, 200,
        "the device connection stays usable after a 502"
    );
    let (p, _) = request_on(&mut phone, port, Method::GET, "/bad-chunks", &[])
        .await
        .unwrap();
    assert_eq!(
        p.status, 502,
        "chunks broken from the first byte: nothing was sent yet"
    );
    let (p, _) = request_on(&mut phone, port, Method::GET, "/len", &[])
        .await
        .unwrap();
    assert_eq!(p.status, 200);

    let e = r.edge().await;
    assert_eq!(count(&e, "status_5xx"), 2, "{e}");
    assert!(
        up.heads()
            .iter()
            .all(|h| !h.to_ascii_lowercase().contains("x-hop"))
    );
    up.task.abort();
}
