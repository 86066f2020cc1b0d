//! The download agent against the reference cloud's image side (`--images DIR`): syncing and
//! serving on the edge (ranges, validators), resuming after SIGKILL, corrupt upstream bytes, quota
//! refusals, 100 concurrent device downloads, a full disk, `images verify`, dropped and newly
//! published images (heartbeat and channel). The devices are real curl processes (and, for the
//! concurrent case, an in-test rustls client); the relay is a child process.

use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::process::Command;

const FQDN: &str = "relay.test";

/// Long enough for five failed attempts with the agent's per-file backoff (1 s doubling, full
/// jitter: at most 1 + 2 + 4 + 8 s) plus the downloads themselves.
const FAIL_LIMIT: Duration = Duration::from_secs(40);
const SYNC_LIMIT: Duration = Duration::from_secs(20);

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    fastrand::fill(&mut v);
    v
}

// ---------------------------------------------------------------------------------------------
// Fixture: a temp dir, the reference cloud publishing `<dir>/published`, a PKI for the edge.

struct Fx {
    cloud: TestCloud,
    pki: ucrelay_sim::pki::DemoPki,
    published: PathBuf,
    /// Relay logs, printed (tail) when the test panics.
    logs: std::sync::Mutex<Vec<PathBuf>>,
    dir: tempfile::TempDir,
}

impl Drop for Fx {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for log in self.logs.lock().unwrap().iter() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            // Routine heartbeat lines would push everything else out of the tail.
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("heartbeat ok"))
                .collect();
            let from = lines.len().saturating_sub(80);
            eprintln!(
                "----- {} (last {} lines) -----",
                log.display(),
                lines.len() - from
            );
            for l in &lines[from..] {
                eprintln!("{l}");
            }
        }
    }
}

impl Fx {
    async fn new() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let published = dir.path().join("published");
        std::fs::create_dir_all(&published).unwrap();
        let mut args = cloud_args();
        args.images = Some(published.clone());
        let cloud = TestCloud::start(args).await;
        std::fs::create_dir_all(dir.path().join("pki")).unwrap();
        let pki = ucrelay_sim::pki::make(&dir.path().join("pki"), FQDN).unwrap();
        Fx {
            cloud,
            pki,
            published,
            logs: Default::default(),
            dir,
        }
    }

    /// Publishes `size` random bytes as `name` (written aside, then renamed into place, so the
    /// cloud never sees a half-written file). Returns the bytes.
    fn publish(&self, name: &str, size: usize) -> Vec<u8> {
        let data = random_bytes(size);
        let tmp = self.published.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, &data).unwrap();
        std::fs::rename(&tmp, self.published.join(name)).unwrap();
        data
    }

    /// A relay config in `<dir>/<name>` with an edge, `[images]` (`images` lines) and devices.
    fn config(&self, name: &str, images: &str) -> RelayConfig {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut cfg = RelayConfig::new(&d, &self.cloud.url());
        cfg.extra = format!(
            "\n[edge]\nlisten = \"127.0.0.1:0\"\nfqdn = [\"{FQDN}\"]\npfx = {:?}\npfx_password_file = {:?}\n\n\
             [images]\n{images}\n\n[devices]\nsubnets = [\"127.0.0.0/8\"]\n",
            self.pki.pfx, self.pki.password_file,
        );
        cfg
    }

    /// Starts the relay and waits until its edge reports the port it bound.
    async fn start(&self, cfg: &RelayConfig) -> Node {
        let relay = Relay::start(cfg).await;
        self.logs.lock().unwrap().push(relay.log.clone());
        let s = relay
            .wait_status("edge bound to its port", |s| {
                s["edge"]["listen"]
                    .as_str()
                    .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                    .is_some_and(|a| a.port() != 0)
            })
            .await;
        let port = s["edge"]["listen"]
            .as_str()
            .unwrap()
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .port();
        Node {
            relay,
            port,
            ca: self.pki.ca_pem.clone(),
            cache: cfg.state_dir().join("images"),
            scratch: cfg.dir.clone(),
        }
    }

    /// The cloud's per-file counters for `name` (`GET /sim/images`).
    async fn served(&self, name: &str) -> Value {
        let list = self.cloud.get("/sim/images").await;
        list.as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in /sim/images: {list}"))
    }

    async fn faults(&self, faults: Value) {
        let r = self.cloud.post("/sim/images/faults", faults.clone()).await;
        assert!(r.get("error").is_none(), "faults {faults} refused: {r}");
    }
}

/// A running relay with an edge.
struct Node {
    relay: Relay,
    port: u16,
    ca: PathBuf,
    /// `<state_dir>/images`.
    cache: PathBuf,
    scratch: PathBuf,
}

static SCRATCH: AtomicU64 = AtomicU64::new(0);

struct Reply {
    /// 0 when no HTTP answer came.
    status: u16,
    head: String,
    body: Vec<u8>,
    stderr: String,
}

impl Reply {
    /// A header of the final response.
    fn header(&self, name: &str) -> Option<String> {
        crate::support::final_header(&self.head, name)
    }
}

impl Node {
    fn socket(&self) -> &str {
        self.relay.socket.to_str().unwrap()
    }

    /// The `images` object of the status report.
    async fn images(&self) -> Value {
        self.relay.status().await["images"].clone()
    }

    async fn wait_images(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(what, limit, || async {
            let s = self.images().await;
            pred(&s).then_some(s)
        })
        .await
    }

    /// Waits until every listed image is synced and `ids` are exactly the listed ones.
    async fn wait_synced(&self, ids: &[&str], limit: Duration) -> Value {
        let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        want.sort();
        self.wait_images(&format!("images {ids:?} synced"), limit, |i| {
            let Some(list) = i["images"].as_array() else {
                return false;
            };
            let mut got: Vec<String> = list
                .iter()
                .filter_map(|x| x["id"].as_str().map(str::to_string))
                .collect();
            got.sort();
            got == want && list.iter().all(|x| x["state"] == "synced")
        })
        .await
    }

    /// curl as a phone: trusting only the test CA, `relay.test` resolved to loopback.
    async fn curl(&self, path: &str, args: &[&str]) -> Reply {
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let head = self.scratch.join(format!("curl-{n}.head"));
        let body = self.scratch.join(format!("curl-{n}.body"));
        let resolve = format!("{FQDN}:{}:127.0.0.1", self.port);
        let url = format!("https://{FQDN}:{}{path}", self.port);
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            Command::new(peer("curl"))
                .args(["-sS", "--max-time", "20", "--cacert"])
                .arg(&self.ca)
                .args(["--resolve", &resolve, "-D"])
                .arg(&head)
                .arg("-o")
                .arg(&body)
                .args(["-w", "%{http_code}"])
                .args(args)
                .arg(&url)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("curl finishes in time")
        .expect("run curl");
        let r = Reply {
            status: String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0),
            head: std::fs::read_to_string(&head).unwrap_or_default(),
            body: std::fs::read(&body).unwrap_or_default(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        let _ = std::fs::remove_file(&head);
        let _ = std::fs::remove_file(&body);
        r
    }

    async fn get(&self, path: &str) -> Reply {
        self.curl(path, &[]).await
    }

    /// A GET that must answer 200 with exactly `want`.
    async fn assert_serves(&self, path: &str, want: &[u8]) {
        let r = self.get(path).await;
        assert_eq!(r.status, 200, "GET {path}: {}\n{}", r.head, r.stderr);
        assert_eq!(r.body.len(), want.len(), "GET {path}: length");
        assert_eq!(
            hex_sha256(&r.body),
            hex_sha256(want),
            "GET {path}: bytes differ"
        );
    }

    /// A GET of a listed but unverified path: 503 with Retry-After, never file bytes.
    async fn assert_not_ready(&self, path: &str, data: &[u8]) {
        let r = self.get(path).await;
        assert_eq!(
            r.status, 503,
            "GET {path} before it is verified: {}",
            r.head
        );
        let retry = r.header("retry-after").expect("503 carries Retry-After");
        assert!(
            retry.parse::<u64>().is_ok_and(|s| s > 0),
            "Retry-After {retry:?}"
        );
        assert!(r.header("etag").is_none(), "no ETag on a 503: {}", r.head);
        assert!(
            r.body.len() < 4096 && (r.body.is_empty() || !data.starts_with(&r.body)),
            "the 503 must not carry the file's bytes"
        );
    }

    async fn wait_status_healthy(&self) -> Value {
        self.relay
            .wait_status("relay healthy", |s| s["healthy"] == true)
            .await
    }

    fn cached(&self, sha256: &str) -> PathBuf {
        self.cache.join("files").join(sha256)
    }
}

fn image<'a>(images: &'a Value, id: &str) -> Option<&'a Value> {
    images["images"].as_array()?.iter().find(|i| i["id"] == id)
}

/// Runs the binary with a deadline; (exit code, stdout, stderr), or None when it did not finish.
async fn cli(args: &[&str], limit: Duration) -> Option<(i32, String, String)> {
    let out = tokio::time::timeout(
        limit,
        Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .unwrap();
    Some((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `ucrelay images sync --wait`, which must finish (in 20 s) once its sync round is over.
async fn sync_wait(node: &Node) -> (i32, String, String) {
    let before = node.images().await["last_sync"].clone();
    let r = cli(
        &["images", "sync", "--socket", node.socket(), "--wait"],
        Duration::from_secs(20),
    )
    .await;
    match r {
        Some(r) => r,
        None => {
            let now = node.images().await;
            panic!(
                "`ucrelay images sync --wait` did not return within 20 s (last_sync when it started \
                 {before}, now {}; images {})",
                now["last_sync"], now["images"]
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Sync and serve.

#[tokio::test]
async fn two_images_sync_and_are_served_with_ranges_and_validators() {
    let fx = Fx::new().await;
    let sip = fx.publish("sip.ld", 3 * 1024 * 1024 + 17);
    let fw = fx.publish("fw.bin", 2 * 1000 * 1000);
    let node = fx.start(&fx.config("relay", "")).await;
    node.wait_synced(&["fw.bin", "sip.ld"], SYNC_LIMIT).await;

    // `ucrelay images --json`: the contract shape, with what the files really are.
    let (code, out, err) = run_cli(&["images", "--socket", node.socket(), "--json"]).await;
    assert_eq!(code, 0, "all synced: exit 0\n{out}\n{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert!(listed["refused"].is_null(), "{listed}");
    for (name, data) in [("sip.ld", &sip), ("fw.bin", &fw)] {
        let img = image(&listed, name).unwrap_or_else(|| panic!("{name} listed: {listed}"));
        assert_eq!(img["state"], "synced");
        assert_eq!(img["bytes_done"], data.len() as u64);
        assert_eq!(img["bytes_total"], data.len() as u64);
        let files = img["files"].as_array().unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0]["path"], format!("/images/{name}"));
        assert_eq!(files[0]["size"], data.len() as u64);
        assert_eq!(files[0]["sha256"], hex_sha256(data));
        assert!(node.cached(&hex_sha256(data)).is_file());
    }

    // Whole files, byte-identical, typed as firmware.
    for (name, data) in [("sip.ld", &sip), ("fw.bin", &fw)] {
        let path = format!("/images/{name}");
        let r = node.get(&path).await;
        assert_eq!(r.status, 200, "{}", r.stderr);
        assert_eq!(hex_sha256(&r.body), hex_sha256(data), "GET {path}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/octet-stream"),
            "{path}"
        );
    }

    let sha = hex_sha256(&sip);
    let size = sip.len();
    let etag = format!("\"{sha}\"");

    // HEAD: the metadata and no body.
    let h = node.curl("/images/sip.ld", &["-I"]).await;
    assert_eq!(h.status, 200, "{}", h.stderr);
    assert_eq!(h.header("content-length"), Some(size.to_string()));
    assert_eq!(h.header("etag"), Some(etag.clone()));
    assert_eq!(h.header("accept-ranges").as_deref(), Some("bytes"));
    let lm = h.header("last-modified").expect("Last-Modified");
    assert!(
        lm.ends_with(" GMT") && lm.len() == 29,
        "IMF-fixdate: {lm:?}"
    );

    // One range.
    let r = node
        .curl("/images/sip.ld", &["-H", "Range: bytes=100-199"])
        .await;
    assert_eq!(r.status, 206, "{}", r.head);
    assert_eq!(r.body, &sip[100..200]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 100-199/{size}"))
    );
    assert_eq!(r.header("content-length").as_deref(), Some("100"));

    // A suffix range.
    let r = node
        .curl("/images/sip.ld", &["-H", "Range: bytes=-10"])
        .await;
    assert_eq!(r.status, 206, "{}", r.head);
    assert_eq!(r.body, &sip[size - 10..]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {}-{}/{size}", size - 10, size - 1))
    );

    // Past the end: 416 naming the size.
    let r = node
        .curl("/images/sip.ld", &["-H", &format!("Range: bytes={size}-")])
        .await;
    assert_eq!(r.status, 416, "{}", r.head);
    assert_eq!(r.header("content-range"), Some(format!("bytes */{size}")));

    // The device already has it.
    let r = node
        .curl("/images/sip.ld", &["-H", &format!("If-None-Match: {etag}")])
        .await;
    assert_eq!(r.status, 304, "{}", r.head);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(etag.clone()));

    // If-Range with another file's ETag: the range is dropped, the whole file comes.
    let r = node
        .curl(
            "/images/sip.ld",
            &["-H", "If-Range: \"0000\"", "-H", "Range: bytes=0-9"],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(hex_sha256(&r.body), sha);
    // ...and with this file's ETag, the range is honoured.
    let r = node
        .curl(
            "/images/sip.ld",
            &["-H", &format!("If-Range: {etag}"), "-H", "Range: bytes=0-9"],
        )
        .await;
    assert_eq!(r.status, 206, "{}", r.head);
    assert_eq!(r.body, &sip[..10]);

    // A path no image lists goes to the provisioning upstream; there is none here.
    let r = node.get("/images/not-published.bin").await;
    assert_eq!(r.status, 404, "{}", r.head);
    assert!(r.header("etag").is_none());

    let images = node.images().await;
    assert!(
        images["bytes_served"].as_u64().unwrap() >= (sip.len() + fw.len()) as u64,
        "{images}"
    );
    assert!(images["bytes_fetched"].as_u64().unwrap() >= (sip.len() + fw.len()) as u64);
}

// ---------------------------------------------------------------------------------------------
// 2. SIGKILL mid-file, restart, resume with Range.

#[tokio::test]
async fn sigkill_mid_file_resumes_without_refetching() {
    let fx = Fx::new().await;
    let data = fx.publish("big.bin", 6_000_000);
    let size = data.len() as u64;
    // Slow enough that the checks below happen well before the file completes.
    fx.faults(json!({"rate_bytes_per_s": 1_000_000})).await;
    let cfg = fx.config("relay", "");
    let mut node = fx.start(&cfg).await;

    let images = node
        .wait_images("big.bin past 1.5 MB", SYNC_LIMIT, |i| {
            image(i, "big.bin").is_some_and(|x| x["bytes_done"].as_u64() > Some(1_500_000))
        })
        .await;
    let img = image(&images, "big.bin").unwrap();
    assert_eq!(img["state"], "syncing", "{img}");
    assert!(img["bytes_done"].as_u64().unwrap() < size, "{img}");

    // Not verified yet: devices are told to come back.
    node.assert_not_ready("/images/big.bin", &data).await;

    node.relay.signal("KILL");
    node.relay.wait_exit(Duration::from_secs(10)).await;
    let partial = node
        .cache
        .join("partial")
        .join(format!("{}.part", hex_sha256(&data)));
    let kept = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    assert!(
        kept > 1_000_000,
        "the partial file survives the kill ({kept} bytes)"
    );

    fx.faults(json!({})).await;
    let node = fx.start(&cfg).await;
    node.wait_synced(&["big.bin"], SYNC_LIMIT).await;

    let c = fx.served("big.bin").await;
    let served = c["bytes_served"].as_u64().unwrap();
    assert!(
        served < size + 1_000_000,
        "the cloud sent {served} bytes for a {size}-byte file: what was on disk was fetched again ({c})"
    );
    assert!(c["requests"].as_u64() >= Some(2), "{c}");
    assert!(
        c["range_requests"].as_u64() >= Some(1),
        "the resume is a range request: {c}"
    );
    node.assert_serves("/images/big.bin", &data).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Corrupt bytes upstream.

#[tokio::test]
async fn corrupt_upstream_file_fails_and_is_never_served_then_recovers() {
    let fx = Fx::new().await;
    let data = fx.publish("bad.bin", 1_000_000);
    let sha = hex_sha256(&data);
    fx.faults(json!({"corrupt": ["bad.bin"]})).await;
    let node = fx.start(&fx.config("relay", "")).await;

    let images = node
        .wait_images("bad.bin failed", FAIL_LIMIT, |i| {
            image(i, "bad.bin").is_some_and(|x| x["state"] == "failed")
        })
        .await;
    let img = image(&images, "bad.bin").unwrap();
    let reason = img["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("SHA-256"), "reason names the hash: {img}");
    assert_eq!(img["files"][0]["state"], "failed", "{img}");
    assert!(!node.cached(&sha).exists(), "bad bytes are never kept");

    node.assert_not_ready("/images/bad.bin", &data).await;

    let status = node.relay.status().await;
    assert_eq!(status["healthy"], false, "{status}");
    let problems = status["problems"].to_string();
    assert!(
        problems.contains("bad.bin") && problems.contains("SHA-256"),
        "problems explain the failure: {problems}"
    );

    fx.faults(json!({})).await;
    let (code, out, err) = sync_wait(&node).await;
    assert_eq!(code, 0, "sync --wait after the fix\n{out}\n{err}");
    let images = node.images().await;
    assert_eq!(
        image(&images, "bad.bin").unwrap()["state"],
        "synced",
        "{images}"
    );
    node.assert_serves("/images/bad.bin", &data).await;
    let status = node.wait_status_healthy().await;
    assert!(status["problems"].as_array().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// 4. A manifest over quota is refused whole.

#[tokio::test]
async fn manifest_over_quota_is_refused_whole() {
    let fx = Fx::new().await;
    fx.publish("a.bin", 100_000);
    fx.publish("b.bin", 100_000);
    let by_count = fx.start(&fx.config("by-count", "max_images = 1")).await;
    let by_size = fx
        .start(&fx.config("by-size", "max_total = \"150KB\""))
        .await;

    for (node, limit) in [(&by_count, "max_images"), (&by_size, "max_total")] {
        let images = node
            .wait_images(&format!("manifest refused for {limit}"), SYNC_LIMIT, |i| {
                i["refused"].is_string()
            })
            .await;
        let why = images["refused"].as_str().unwrap();
        assert!(why.contains(limit), "refusal names {limit}: {why}");
        assert_eq!(
            images["images"].as_array().map(Vec::len),
            Some(0),
            "nothing of a refused manifest is applied: {images}"
        );

        let status = node.relay.status().await;
        assert_eq!(status["healthy"], false, "{status}");
        let problems = status["problems"].to_string();
        assert!(problems.contains("manifest refused"), "{problems}");
        assert!(problems.contains(limit), "{problems}");

        let (code, out, _) = run_cli(&["images", "--socket", node.socket(), "--json"]).await;
        assert_eq!(code, 1, "a refused manifest: exit 1\n{out}");
        let listed: Value = serde_json::from_str(&out).unwrap();
        assert!(listed["refused"].as_str().unwrap().contains(limit));

        // Nothing was fetched or served.
        assert_eq!(images["bytes_fetched"], 0, "{images}");
        let r = node.get("/images/a.bin").await;
        assert_eq!(r.status, 404, "{}", r.head);
    }
    for name in ["a.bin", "b.bin"] {
        assert_eq!(fx.served(name).await["requests"], 0);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. 100 devices downloading one file at once.

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

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

async fn tls_connect(connector: &tokio_rustls::TlsConnector, port: u16) -> Tls {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(FQDN).unwrap();
    connector.connect(name, tcp).await.expect("TLS handshake")
}

#[tokio::test]
async fn a_hundred_devices_download_one_file_at_once() {
    const N: usize = 100;
    let fx = Fx::new().await;
    let data = Arc::new(fx.publish("sip.ld", 512 * 1024));
    let want = hex_sha256(&data);
    let node = fx.start(&fx.config("relay", "")).await;
    node.wait_synced(&["sip.ld"], SYNC_LIMIT).await;
    let before = node.images().await["bytes_served"].as_u64().unwrap();

    let connector = tls_connector(&node.ca);
    let port = node.port;
    // Every device connects and sends its request before any body is read.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..N {
        let (connector, barrier) = (connector.clone(), barrier.clone());
        set.spawn(async move {
            let tls = tls_connect(&connector, port).await;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            barrier.wait().await;
            let req = http::Request::get("/images/sip.ld")
                .header(http::header::HOST, format!("{FQDN}:{port}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (i, status, body)
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.expect("device task"));
        }
        out
    })
    .await
    .expect("100 downloads finish in time");
    assert_eq!(all.len(), N);
    for (i, status, body) in &all {
        assert_eq!(
            *status,
            200,
            "device {i}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
        assert_eq!(body.len(), data.len(), "device {i}: length");
        assert_eq!(hex_sha256(body), want, "device {i}: bytes differ");
    }
    let images = node
        .wait_images("downloads finished", SYNC_LIMIT, |i| {
            i["downloads_active"] == 0
        })
        .await;
    assert!(
        images["bytes_served"].as_u64().unwrap() - before >= (N * data.len()) as u64,
        "{images}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Not enough free disk.

#[tokio::test]
async fn no_free_disk_fails_the_file_and_the_daemon_keeps_running() {
    let fx = Fx::new().await;
    let data = fx.publish("fw.bin", 500_000);
    let mut node = fx.start(&fx.config("relay", "min_free = \"1000TB\"")).await;

    let images = node
        .wait_images("fw.bin failed", FAIL_LIMIT, |i| {
            image(i, "fw.bin").is_some_and(|x| x["state"] == "failed")
        })
        .await;
    let img = image(&images, "fw.bin").unwrap();
    let reason = img["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("free disk"),
        "reason explains the disk: {img}"
    );

    assert!(
        node.relay.child.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    let status = node.relay.status().await;
    assert_eq!(status["healthy"], false);
    let problems = status["problems"].to_string();
    assert!(
        problems.contains("fw.bin") && problems.contains("free disk"),
        "status explains it: {problems}"
    );
    assert_eq!(status["cloud"]["registered"], true, "{status}");
    node.assert_not_ready("/images/fw.bin", &data).await;
    assert_eq!(
        fx.served("fw.bin").await["bytes_served"],
        0,
        "nothing downloaded"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. `ucrelay images verify`.

#[tokio::test]
async fn verify_quarantines_a_damaged_cached_file_and_refetches_it() {
    let fx = Fx::new().await;
    let data = fx.publish("v.bin", 2_000_000);
    let other = fx.publish("ok.bin", 300_000);
    let sha = hex_sha256(&data);
    let node = fx.start(&fx.config("relay", "")).await;
    node.wait_synced(&["ok.bin", "v.bin"], SYNC_LIMIT).await;

    // A clean cache: exit 0.
    let (code, out, err) = run_cli(&["images", "verify", "--socket", node.socket()]).await;
    assert_eq!(code, 0, "clean cache\n{out}\n{err}");

    // Flip one byte of the cached file.
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(node.cached(&sha))
            .unwrap();
        f.seek(SeekFrom::Start(12_345)).unwrap();
        f.write_all(&[data[12_345] ^ 0x01]).unwrap();
        f.sync_all().unwrap();
    }
    let (code, out, err) = run_cli(&["images", "verify", "--socket", node.socket()]).await;
    assert_eq!(code, 1, "a damaged file: exit 1\n{out}\n{err}");
    assert!(out.contains("/images/v.bin"), "names the path: {out}");
    assert!(
        !out.contains("/images/ok.bin"),
        "only the damaged one: {out}"
    );
    let quarantined = std::fs::read_dir(node.cache.join("quarantine"))
        .unwrap()
        .count();
    assert_eq!(quarantined, 1, "the damaged file is kept aside");

    node.wait_synced(&["ok.bin", "v.bin"], SYNC_LIMIT).await;
    node.assert_serves("/images/v.bin", &data).await;
    node.assert_serves("/images/ok.bin", &other).await;
    let (code, out, _) = run_cli(&["images", "verify", "--socket", node.socket()]).await;
    assert_eq!(code, 0, "clean again\n{out}");
}

// ---------------------------------------------------------------------------------------------
// 8. An image dropped from the cloud.

#[tokio::test]
async fn an_image_dropped_from_the_cloud_is_deleted_and_no_longer_served() {
    let fx = Fx::new().await;
    let keep = fx.publish("keep.bin", 400_000);
    let drop = fx.publish("drop.bin", 400_000);
    let node = fx.start(&fx.config("relay", "")).await;
    node.wait_synced(&["drop.bin", "keep.bin"], SYNC_LIMIT)
        .await;
    let dropped = node.cached(&hex_sha256(&drop));
    assert!(dropped.is_file());
    node.assert_serves("/images/drop.bin", &drop).await;

    std::fs::remove_file(fx.published.join("drop.bin")).unwrap();
    let m = fx.cloud.post("/sim/images/rescan", json!({})).await;
    assert_eq!(m["images"].as_array().unwrap().len(), 1, "{m}");

    let (code, out, err) = sync_wait(&node).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, _) = run_cli(&["images", "--socket", node.socket(), "--json"]).await;
    assert_eq!(code, 0, "{out}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert!(image(&listed, "drop.bin").is_none(), "{listed}");
    assert!(image(&listed, "keep.bin").is_some(), "{listed}");
    assert!(
        !dropped.exists(),
        "the dropped file is deleted from the cache"
    );

    let r = node.get("/images/drop.bin").await;
    assert_eq!(
        r.status, 404,
        "no longer an image (no upstream): {}",
        r.head
    );
    assert!(r.header("etag").is_none(), "{}", r.head);
    node.assert_serves("/images/keep.bin", &keep).await;
}

// ---------------------------------------------------------------------------------------------
// 9. New images are picked up without any CLI call.

#[tokio::test]
async fn a_new_image_is_picked_up_through_the_heartbeat() {
    let fx = Fx::new().await;
    fx.publish("one.bin", 200_000);
    let node = fx.start(&fx.config("relay", "")).await;
    node.wait_synced(&["one.bin"], SYNC_LIMIT).await;

    let two = fx.publish("two.bin", 300_000);
    node.wait_synced(&["one.bin", "two.bin"], SYNC_LIMIT).await;
    node.assert_serves("/images/two.bin", &two).await;
}

#[tokio::test]
async fn a_new_image_is_picked_up_through_the_channel_message() {
    let fx = Fx::new().await;
    fx.publish("one.bin", 200_000);
    let mut cfg = fx.config("relay", "");
    // Heartbeats (which would also carry the new revision) out of the way.
    cfg.heartbeat_interval = "1h";
    let node = fx.start(&cfg).await;
    node.wait_synced(&["one.bin"], SYNC_LIMIT).await;
    node.relay
        .wait_status("channel connected", |s| {
            s["cloud"]["channel"] == "connected"
        })
        .await;

    let two = fx.publish("two.bin", 300_000);
    let sent = fx.cloud.post("/sim/images/sync", json!({})).await;
    assert_eq!(sent["sent"], true, "{sent}");
    node.wait_synced(&["one.bin", "two.bin"], Duration::from_secs(10))
        .await;
    // The channel message is what triggered it (log lines reach the file within 100 ms).
    wait_for(
        "the relay's log of the cloud's sync request",
        Duration::from_secs(10),
        || async {
            node.relay
                .logs()
                .contains("cloud asked for an image sync")
                .then_some(())
        },
    )
    .await;
    node.assert_serves("/images/two.bin", &two).await;
}

// ---------------------------------------------------------------------------------------------
// 10. `images sync --wait` when there is nothing to fetch.

#[tokio::test]
async fn sync_wait_returns_promptly_when_everything_is_synced() {
    let fx = Fx::new().await;
    fx.publish("one.bin", 100_000);
    let node = fx.start(&fx.config("relay", "")).await;
    node.wait_synced(&["one.bin"], SYNC_LIMIT).await;
    for round in 1..=2 {
        let before = node.images().await["last_sync"].clone();
        let r = cli(
            &["images", "sync", "--socket", node.socket(), "--wait"],
            Duration::from_secs(8),
        )
        .await;
        let Some((code, out, err)) = r else {
            let after = node.images().await;
            panic!(
                "round {round}: `images sync --wait` did not return within 8 s with everything synced \
                 (last_sync before {before}, now {}; images {})",
                after["last_sync"], after["images"]
            );
        };
        assert_eq!(code, 0, "round {round}\n{out}\n{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// 9. A full disk under the cache mid-download, and a bandwidth limit honest at the sender.

#[tokio::test]
#[ignore = "needs root: mounts a small tmpfs for the image cache"]
async fn a_full_cache_disk_mid_download_keeps_the_partial_never_serves_it_and_resumes() {
    let fx = Fx::new().await;
    let size = 4_000_000;
    let data = fx.publish("big.bin", size);
    let sha = hex_sha256(&data);
    let cache = fx.dir.path().join("cache");
    let fs = Tmpfs::mount(&cache, "6m");
    let mut node = fx
        .start(&fx.config(
            "relay",
            &format!("dir = {cache:?}\nbandwidth_limit = \"1MB/s\"\nmin_free = \"1B\""),
        ))
        .await;
    let part = cache.join("partial").join(format!("{sha}.part"));
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    wait_for("the download under way", SYNC_LIMIT, || async {
        (len(&part) > 300_000).then_some(())
    })
    .await;

    // The disk fills up while the file is coming in.
    fs.fill();
    wait_for(
        "the download stopped for want of space",
        Duration::from_secs(20),
        || async {
            node.relay
                .logs()
                .contains("not enough free disk")
                .then_some(())
        },
    )
    .await;
    let kept = len(&part);
    assert!(
        kept > 300_000,
        "the partial file is kept for the resume ({kept} bytes)"
    );
    assert!(
        !node.cached(&sha).exists(),
        "nothing unverified is in files/"
    );
    node.assert_not_ready("/images/big.bin", &data).await;
    // The disk stays full past the download's own attempts (about 15 s), so the sync round ends
    // short of space.
    wait_for(
        "the sync round ended short of space",
        Duration::from_secs(40),
        || async {
            image(&node.images().await, "big.bin")
                .is_some_and(|i| i["state"] == "failed")
                .then_some(())
        },
    )
    .await;
    assert!(
        node.relay.child.try_wait().unwrap().is_none(),
        "the relay keeps running"
    );
    assert_eq!(len(&part), kept, "the partial file is kept as it was");

    // Space returns: the download resumes from the partial file, by itself, within seconds (a
    // round short of space is tried again after 5 s, not after the sync's retry backoff, which
    // draws 3-30 s and grows). The partial file only grows from what was kept (never truncated
    // to start over) until it is verified.
    fs.release();
    let released = std::time::Instant::now();
    let deadline = released + Duration::from_secs(40);
    let mut resumed = false;
    loop {
        if let Ok(m) = std::fs::metadata(&part) {
            assert!(
                m.len() >= kept,
                "the partial file went from {kept} back to {} bytes",
                m.len()
            );
            resumed |= m.len() > kept;
        }
        let synced = image(&node.images().await, "big.bin").is_some_and(|i| i["state"] == "synced");
        if synced {
            break;
        }
        assert!(
            resumed || released.elapsed() < Duration::from_secs(12),
            "the download had not resumed 12 s after space returned ({kept} bytes kept)"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "big.bin synced after space returned"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.assert_serves("/images/big.bin", &data).await;
    let served = fx.served("big.bin").await;
    assert!(
        served["range_requests"].as_u64() >= Some(1),
        "resumed with a Range request: {served}"
    );
    drop(node);
    drop(fs);
}

/// Bytes each of the cloud's connections on `port` has had acknowledged by its peer, by peer
/// address: the sender kernel's own count of what crossed the wire (`ss -ti`).
fn acked_by_peer(port: u16) -> Vec<(String, u64)> {
    let out = std::process::Command::new(peer("ss"))
        .args(["-tinH", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            // Recv-Q Send-Q Local Peer: the peer is the second address.
            current = line
                .split_whitespace()
                .filter(|t| t.contains(':'))
                .nth(1)
                .map(str::to_string);
        } else if let Some(peer) = &current {
            let acked = line
                .split_whitespace()
                .find_map(|t| t.strip_prefix("bytes_acked:"))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            out.push((peer.clone(), acked));
        }
    }
    out
}

#[tokio::test]
async fn the_bandwidth_limit_holds_at_the_sender() {
    let fx = Fx::new().await;
    let size = 3_000_000usize;
    let data = fx.publish("fw.bin", size);
    let limit = 1_000_000f64;
    let port = fx.cloud.addr.port();
    let node = fx
        .start(&fx.config("relay", "bandwidth_limit = \"1MB/s\"\nparallel = 1"))
        .await;
    // Watch the download's connection at the cloud from the moment it appears.
    let mut first_seen: std::collections::HashMap<String, std::time::Instant> = Default::default();
    let mut worst = 0f64;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut download = None;
    loop {
        let now = std::time::Instant::now();
        for (peer_addr, acked) in acked_by_peer(port) {
            let since = *first_seen.entry(peer_addr.clone()).or_insert(now);
            let allowed = limit * (now.duration_since(since).as_secs_f64() + 1.0);
            worst = worst.max(acked as f64 / allowed);
            if acked > 100_000 {
                download = Some(peer_addr);
            }
        }
        let done = node.images().await["images"]
            .as_array()
            .is_some_and(|l| l.iter().any(|i| i["state"] == "synced"));
        if done || now > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(download.is_some(), "the download's connection was seen");
    assert!(
        worst <= 1.1,
        "the cloud sent {:.0}% of limit × (elapsed + 1 s) at one point: the kernel took a burst the limit forbids",
        worst * 100.0
    );
    // And the limit is a limit, not a stall: the file arrives at close to the rate.
    node.wait_synced(&["fw.bin"], Duration::from_secs(10)).await;
    node.assert_serves("/images/fw.bin", &data).await;
}
