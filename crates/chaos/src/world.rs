//! One run's world: the network, the reference cloud (`ucrelay sim cloud` in its namespace, with a
//! state file so it survives SIGKILL), a fleet of simulated phones (`ucrelay sim phones`), and the
//! relays (`ucrelay run`), each with its store and image cache on a small tmpfs of its own, a
//! certificate it can be made to swap, and a notify socket standing in for systemd's (readiness and
//! the watchdog). Every process is the real binary; the harness only starts, signals and watches.

use crate::cleanup::{self, Undo};
use crate::disk::Tmpfs;
use crate::net::{CLOUD_PORT, Net};
use crate::report::Report;
use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

pub const FQDN: &str = "relay.chaos.test";
pub const TENANT: &str = "chaos";
pub const PIN: &str = "424242";
/// The relays' channel ping interval; a silent channel is dead after three of them.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
/// The relays' `poll_interval` (and `stats_interval`): one monitoring cycle over every phone a
/// minute, so polling is work that flows all the time and a relay's device table (the last report
/// of each phone it polls) is renewed within its first minute, not over ten.
pub const POLL_INTERVAL: Duration = Duration::from_secs(60);
/// What the harness tells each relay its systemd watchdog is (WATCHDOG_USEC).
pub const WATCHDOG: Duration = Duration::from_secs(10);
/// The relays' provisioning timeout: a 504 may come this long after the upstream broke.
pub const PROVISIONING_TIMEOUT: Duration = Duration::from_secs(5);
pub const PHONES: usize = 1000;
pub const PHONE_BASE: [u8; 4] = [127, 77, 0, 1];

/// Sizes of the relays' filesystems.
pub struct Sizes {
    pub store_mb: u64,
    pub cache_mb: u64,
}

pub struct World {
    pub net: Net,
    pub cloud: CloudNode,
    pub phones: PhonesNode,
    pub relays: Vec<Arc<RelayNode>>,
    /// Both CAs: devices trust either, so a certificate swap never breaks them.
    pub ca_der: Vec<Vec<u8>>,
    pub report: Arc<Report>,
    /// The directory the cloud publishes images from.
    pub published: PathBuf,
}

pub struct CloudNode {
    pub addr: SocketAddr,
    args: Vec<String>,
    ns: String,
    bin: PathBuf,
    log: PathBuf,
    child: tokio::sync::Mutex<Option<Child>>,
}

impl CloudNode {
    pub async fn start(&self) -> Result<()> {
        let mut slot = self.child.lock().await;
        if slot.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        // `ip netns exec` execs the program (no fork), so the child's pid is the cloud's.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .args(&self.args)
            .env("RUST_LOG", "warn,ucrelay_sim=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the reference cloud")?;
        if let Some(pid) = child.id() {
            cleanup::push(Undo::Kill(pid));
        }
        *slot = Some(child);
        drop(slot);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ucrelay_sim::client::get(self.addr, "/sim/stats")
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the reference cloud did not answer within 30 s (log {})",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and wait until it is gone.
    pub async fn kill(&self) {
        if let Some(mut child) = self.child.lock().await.take() {
            if let Some(pid) = child.id() {
                cleanup::forget(&Undo::Kill(pid));
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        ucrelay_sim::client::get(self.addr, path).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        ucrelay_sim::client::post(self.addr, path, body).await
    }
}

pub struct PhonesNode {
    pub port: u16,
    _child: Child,
}

impl PhonesNode {
    pub fn target(&self, idx: usize) -> String {
        let ip = u32::from(std::net::Ipv4Addr::from(PHONE_BASE)) + idx as u32;
        format!("{}:{}", std::net::Ipv4Addr::from(ip), self.port)
    }
}

/// Readiness and watchdog messages from one relay, as systemd would see them.
#[derive(Default, Debug, Clone)]
pub struct Notified {
    pub ready: Option<Instant>,
    pub last_pet: Option<Instant>,
    pub pets: u64,
}

pub struct Proc {
    pub child: Child,
    pub pid: u32,
    pub started: Instant,
    /// Killed on purpose by the harness (not an unexpected exit).
    pub killed: bool,
}

pub struct RelayNode {
    pub name: String,
    pub idx: usize,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub pfx: PathBuf,
    pub store: Tmpfs,
    pub cache: Tmpfs,
    pub notified: Arc<Mutex<Notified>>,
    notify_path: PathBuf,
    bin: PathBuf,
    pub proc: tokio::sync::Mutex<Option<Proc>>,
    /// Set once the relay registered and reported its id and edge port.
    pub relay_id: Mutex<Option<String>>,
    pub edge_port: Mutex<Option<u16>>,
    pub incarnations: Mutex<u32>,
    /// RSS samples (seconds since the run started, bytes) of the current incarnation.
    pub rss: Mutex<Vec<(f64, u64)>>,
    /// Heap-in-use samples of the current incarnation, from its `status`.
    pub heap: Mutex<Vec<(f64, u64)>>,
    /// The memory verdict of every finished incarnation that lived long enough for one.
    pub rss_history: Mutex<Vec<RssSpan>>,
}

#[derive(Debug, Clone, Copy)]
pub struct RssSpan {
    pub lived_s: f64,
    pub start: u64,
    pub end: u64,
    /// The allocator's live bytes (`status` memory.heap_in_use_bytes), floors over the same two
    /// windows: flat when what grew is free space the allocator kept, rising with a leak.
    pub heap: Option<(u64, u64)>,
}

impl RelayNode {
    pub fn label(&self) -> String {
        format!("relay-{}", self.name)
    }

    /// Starts the relay (if it is not running) and waits for READY=1 and its edge port.
    pub async fn start(&self) -> Result<()> {
        let mut slot = self.proc.lock().await;
        if slot.is_some() {
            return Ok(());
        }
        *self.notified.lock().unwrap_or_else(|e| e.into_inner()) = Notified::default();
        *self.edge_port.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.rss.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.heap.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        // The environment systemd gives the unit, not the harness's: a RUST_BACKTRACE left in an
        // operator's shell makes every error capture a stack walk, which reads the executable's
        // unwind tables into memory and costs CPU the relay never spends in service.
        let child = Command::new(&self.bin)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .args(["run", "--config"])
            .arg(&self.config)
            .env("NOTIFY_SOCKET", &self.notify_path)
            .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start ucrelay run")?;
        let pid = child.id().ok_or_else(|| anyhow!("relay exited at once"))?;
        cleanup::push(Undo::Kill(pid));
        *slot = Some(Proc {
            child,
            pid,
            started: Instant::now(),
            killed: false,
        });
        *self.incarnations.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        drop(slot);
        Ok(())
    }

    /// Waits until the running relay said READY=1 and its status shows the edge's port.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let ready = self
                .notified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ready
                .is_some();
            if ready && let Ok(s) = self.status().await {
                let port = s["edge"]["listen"]
                    .as_str()
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .map(|a| a.port())
                    .filter(|p| *p != 0);
                if let Some(p) = port {
                    *self.edge_port.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                    if let Some(id) = s["relay_id"].as_str() {
                        *self.relay_id.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(id.to_string());
                    }
                    return Ok(());
                }
            }
            {
                let mut slot = self.proc.lock().await;
                match slot.as_mut() {
                    None => bail!("{} was stopped while starting", self.label()),
                    Some(p) => {
                        if let Ok(Some(status)) = p.child.try_wait() {
                            bail!(
                                "{} exited while starting ({status}); see {}",
                                self.label(),
                                self.log.display()
                            );
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} was not ready within {limit:?} (log {})",
                    self.label(),
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL the running relay (if any) and wait for it to be gone.
    pub async fn kill(&self) {
        let mut slot = self.proc.lock().await;
        if let Some(mut p) = slot.take() {
            p.killed = true;
            cleanup::forget(&Undo::Kill(p.pid));
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
            self.close_incarnation(p.started);
        }
        *self.edge_port.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.notified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ready = None;
    }

    /// Keeps the RSS figures of an incarnation that ended.
    pub fn close_incarnation(&self, started: Instant) {
        let samples = std::mem::take(&mut *self.rss.lock().unwrap_or_else(|e| e.into_inner()));
        let heap = std::mem::take(&mut *self.heap.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(span) = rss_span(&samples, &heap, started.elapsed().as_secs_f64()) {
            self.rss_history
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(span);
        }
    }

    pub async fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(p) = self.proc.lock().await.as_ref() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), sig);
        }
    }

    pub async fn pid(&self) -> Option<u32> {
        self.proc.lock().await.as_ref().map(|p| p.pid)
    }

    pub fn port(&self) -> Option<u16> {
        *self.edge_port.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn id(&self) -> Option<String> {
        self.relay_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub async fn status(&self) -> Result<Value> {
        admin_get(&self.socket, "/v1/status").await
    }
}

/// The RSS of an incarnation, as two floors: the lowest sample in the half-minute after warm-up and
/// the lowest in its last half-minute; judged only when it lived long enough for the two windows
/// not to overlap (three minutes). Warm-up is two monitoring cycles ([`POLL_INTERVAL`]): a relay's
/// first start, on an empty store, builds its device table from the cloud's list during the first
/// cycle and renews it in the second; a restart renews what it loaded in the first. The allocator
/// settles and redb's page cache (1 MiB) fills over the same minutes: heaptrack of one lifetime
/// showed 1.50 MB live at 60 s, 1.78 MB at 120 s and 1.88 MB at 172 s, most of it pages redb
/// keeps. Floors, because RSS moves with the work in flight, and what a leak raises is what the
/// relay keeps between bursts: the second one-hour run judged relay-a on a 20-second burst
/// (9.7 MB of buffers while its store came back from a full disk, given back by the next minute)
/// that filled more than half of its last window, so a median said 38.8% growth where the floors
/// (from a 10 s sampler) said 3.9%. A burst longer than the window still counts.
pub fn rss_span(samples: &[(f64, u64)], heap: &[(f64, u64)], lived_s: f64) -> Option<RssSpan> {
    let first = samples.first()?.0;
    let last = samples.last()?.0;
    let (warm, window) = (first + WARM_UP_S, RSS_WINDOW_S);
    if last - window < warm + window {
        return None;
    }
    let in_start = |t: f64| t >= warm && t < warm + window;
    let in_end = |t: f64| t > last - window;
    let start = floor(samples.iter().filter(|(t, _)| in_start(*t)))?;
    let end = floor(samples.iter().filter(|(t, _)| in_end(*t)))?;
    let heap = floor(heap.iter().filter(|(t, _)| in_start(*t)))
        .zip(floor(heap.iter().filter(|(t, _)| in_end(*t))));
    Some(RssSpan {
        lived_s,
        start,
        end,
        heap,
    })
}

/// Seconds after a relay starts before its RSS counts: two monitoring cycles.
const WARM_UP_S: f64 = 2.0 * POLL_INTERVAL.as_secs_f64();
/// Width of the windows whose floors are compared.
const RSS_WINDOW_S: f64 = 30.0;

fn floor<'a>(samples: impl Iterator<Item = &'a (f64, u64)>) -> Option<u64> {
    samples.map(|(_, b)| *b).min()
}

/// Resident memory of a process, bytes.
pub fn rss_of(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// GET on a relay's admin socket (HTTP over a Unix socket), within 5 s.
pub async fn admin_get(socket: &Path, path: &str) -> Result<Value> {
    use http_body_util::BodyExt;
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(path)
            .header(http::header::HOST, "ucrelay")
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("admin API answered {status}");
        }
        Ok::<_, anyhow::Error>(serde_json::from_slice(&body)?)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| anyhow!("admin socket {} did not answer in 5 s", socket.display()))?
}

impl World {
    pub async fn build(
        bin: &Path,
        dir: &Path,
        relays: usize,
        sizes: Sizes,
        report: Arc<Report>,
        rng: &mut fastrand::Rng,
    ) -> Result<World> {
        let net = Net::build(dir, relays, rng).await?;
        // The cloud: images, provisioning tree and state file on the harness's disk.
        let published = dir.join("published");
        let prov = dir.join("provisioning");
        std::fs::create_dir_all(&published)?;
        std::fs::create_dir_all(&prov)?;
        std::fs::write(
            prov.join("000000000000.cfg"),
            "<?xml version=\"1.0\"?>\n<PHONE_CONFIG><ALL device.set=\"1\"/></PHONE_CONFIG>\n",
        )?;
        let cloud = CloudNode {
            addr: SocketAddr::new(net.ctl_ip.into(), CLOUD_PORT),
            args: [
                "sim",
                "cloud",
                "--listen",
                &format!("0.0.0.0:{CLOUD_PORT}"),
                "--tenant",
                TENANT,
                "--pin",
                PIN,
                "--heartbeat-interval",
                "5s",
                "--images",
                published.to_str().unwrap_or_default(),
                "--provisioning",
                prov.to_str().unwrap_or_default(),
                "--state-file",
                dir.join("cloud-state.json").to_str().unwrap_or_default(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            ns: net.ns_cloud.clone(),
            bin: bin.to_path_buf(),
            log: dir.join("cloud.log"),
            child: tokio::sync::Mutex::new(None),
        };
        cloud.start().await?;

        let phones = start_phones(bin, dir).await?;

        // Two certificates for the same name from two CAs: the swap alternates between them.
        let mut ca_der = Vec::new();
        let mut pkis = Vec::new();
        for i in 0..2 {
            let d = dir.join(format!("pki{i}"));
            std::fs::create_dir_all(&d)?;
            let pki = ucrelay_sim::pki::make(&d, FQDN)?;
            let pem = std::fs::read(&pki.ca_pem)?;
            use rustls_pki_types::pem::PemObject;
            let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem)
                .map_err(|e| anyhow!("ca.pem: {e}"))?;
            ca_der.push(der.to_vec());
            pkis.push(pki);
        }

        let mut nodes = Vec::new();
        for (idx, wan) in net.wans.iter().enumerate() {
            let name = ((b'a' + idx as u8) as char).to_string();
            let rdir = dir.join(format!("relay-{name}"));
            std::fs::create_dir_all(&rdir)?;
            let store = Tmpfs::mount(&rdir.join("store"), sizes.store_mb)?;
            let cache = Tmpfs::mount(&rdir.join("cache"), sizes.cache_mb)?;
            let pfx = rdir.join("relay.pfx");
            std::fs::copy(&pkis[0].pfx, &pfx)?;
            std::fs::copy(&pkis[0].password_file, rdir.join("relay.pfx.pass"))?;
            for (i, pki) in pkis.iter().enumerate() {
                std::fs::copy(&pki.pfx, rdir.join(format!("good{i}.pfx")))?;
                std::fs::copy(&pki.password_file, rdir.join(format!("good{i}.pfx.pass")))?;
            }
            let config = rdir.join("relay.toml");
            let cloud_url = format!("http://{}:{CLOUD_PORT}", wan.cloud_ip);
            std::fs::write(
                &config,
                format!(
                    r#"state_dir = "{store}"

[cloud]
url = "{cloud_url}"
tenant_id = "{TENANT}"
pin = "{PIN}"
heartbeat_interval = "5s"
ping_interval = "{ping}s"
reconnect_max = "4s"
connect_timeout = "3s"
request_timeout = "10s"

[admin]
socket = "{socket}"

[edge]
listen = "127.0.0.1:0"
fqdn = ["{FQDN}"]
pfx = "{pfx}"
pfx_password_file = "{pass}"

[provisioning]
upstream = "{cloud_url}"
timeout = "{prov_timeout}s"
connect_timeout = "3s"

[images]
dir = "{cache}"
max_images = 40
max_total = "{max_total}MB"
bandwidth_limit = "2MB/s"
min_free = "1B"
sync_interval = "20s"

[devices]
subnets = ["127.77.0.0/16"]
poll_interval = "{poll}s"
stats_interval = "{poll}s"
admin_password = "456"
request_timeout = "5s"
target_timeout = "15s"
task_concurrency = 32
"#,
                    store = store.path.display(),
                    ping = PING_INTERVAL.as_secs(),
                    poll = POLL_INTERVAL.as_secs(),
                    socket = rdir.join("admin.sock").display(),
                    pfx = pfx.display(),
                    pass = rdir.join("relay.pfx.pass").display(),
                    prov_timeout = PROVISIONING_TIMEOUT.as_secs(),
                    cache = cache.path.display(),
                    max_total = sizes.cache_mb.saturating_sub(4),
                ),
            )?;
            let notify_path = rdir.join("notify.sock");
            let _ = std::fs::remove_file(&notify_path);
            let sock = tokio::net::UnixDatagram::bind(&notify_path)?;
            let notified = Arc::new(Mutex::new(Notified::default()));
            tokio::spawn(listen_notify(sock, notified.clone()));
            nodes.push(Arc::new(RelayNode {
                name,
                idx,
                socket: rdir.join("admin.sock"),
                log: rdir.join("relay.log"),
                config,
                pfx,
                store,
                cache,
                notified,
                notify_path,
                bin: bin.to_path_buf(),
                proc: tokio::sync::Mutex::new(None),
                relay_id: Mutex::new(None),
                edge_port: Mutex::new(None),
                incarnations: Mutex::new(0),
                rss: Mutex::new(Vec::new()),
                heap: Mutex::new(Vec::new()),
                rss_history: Mutex::new(Vec::new()),
                dir: rdir,
            }));
        }
        Ok(World {
            net,
            cloud,
            phones,
            relays: nodes,
            ca_der,
            report,
            published,
        })
    }

    /// Stops every process and takes the network and the mounts down.
    pub async fn teardown(&mut self) {
        for r in &self.relays {
            r.kill().await;
        }
        self.cloud.kill().await;
        for r in &self.relays {
            r.store.unmount();
            r.cache.unmount();
        }
        self.net.teardown();
    }
}

async fn start_phones(bin: &Path, dir: &Path) -> Result<PhonesNode> {
    let base = std::net::Ipv4Addr::from(PHONE_BASE).to_string();
    let mut child = Command::new(bin)
        .args([
            "sim",
            "phones",
            "--count",
            &PHONES.to_string(),
            "--base-ip",
            &base,
        ])
        .args(["--reboot-time", "1s"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("phones.log"))?)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start ucrelay sim phones")?;
    if let Some(pid) = child.id() {
        cleanup::push(Undo::Kill(pid));
    }
    let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = tokio::io::BufReader::new(out).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .map_err(|_| anyhow!("the phones did not start within 60 s"))??
        .ok_or_else(|| anyhow!("the phones exited before starting"))?;
    let port = line
        .split(" port ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("no port in {line:?}"))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(PhonesNode {
        port,
        _child: child,
    })
}

/// systemd's side of the notify protocol for one relay.
async fn listen_notify(sock: tokio::net::UnixDatagram, state: Arc<Mutex<Notified>>) {
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf).await {
        let msg = String::from_utf8_lossy(&buf[..n]);
        let now = Instant::now();
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        for line in msg.lines() {
            match line {
                "READY=1" if st.ready.is_none() => {
                    st.ready = Some(now);
                    st.last_pet = Some(now);
                }
                "WATCHDOG=1" => {
                    st.last_pet = Some(now);
                    st.pets += 1;
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rss_span;

    const MB: u64 = 1_000_000;

    fn series(secs: u32, rss: impl Fn(u32) -> u64) -> Vec<(f64, u64)> {
        (0..=secs).map(|t| (f64::from(t), rss(t))).collect()
    }

    #[test]
    fn a_burst_at_the_end_is_not_growth() {
        // Flat at 22 MB, with a results batch of 4 MB in flight during the last 5 s.
        let s = series(300, |t| if t > 295 { 26 * MB } else { 22 * MB });
        let span = rss_span(&s, &[], 300.0).expect("judged");
        assert_eq!((span.start, span.end), (22 * MB, 22 * MB));
    }

    #[test]
    fn a_burst_over_half_the_last_window_is_not_growth() {
        // The second hour's relay-a: flat at 24 MB, 9 MB of buffers for the last 20 s.
        let s = series(200, |t| if t > 180 { 33 * MB } else { 24 * MB });
        let span = rss_span(&s, &[], 200.0).expect("judged");
        assert_eq!((span.start, span.end), (24 * MB, 24 * MB));
    }

    #[test]
    fn memory_kept_through_the_last_window_is_growth() {
        // Flat at 22 MB, then 3 MB more that stays for the last 40 s.
        let s = series(300, |t| if t > 260 { 25 * MB } else { 22 * MB });
        let span = rss_span(&s, &[], 300.0).expect("judged");
        assert_eq!((span.start, span.end), (22 * MB, 25 * MB));
    }

    #[test]
    fn what_fills_during_warm_up_is_not_growth_and_a_leak_after_it_is() {
        // 20 MB at start, 2 MB more over the first two cycles as the relay settles, then flat.
        let fill = |t: u32| 20 * MB + u64::from(t.min(120)) * 2 * MB / 120;
        let span = rss_span(&series(300, fill), &[], 300.0).expect("judged");
        assert_eq!((span.start, span.end), (22 * MB, 22 * MB));
        // The same, with 20 KB a second kept from then on: 3 MB more between the windows.
        let leak = |t: u32| fill(t) + u64::from(t.saturating_sub(120)) * 20_000;
        let span = rss_span(&series(300, leak), &[], 300.0).expect("judged");
        let growth = (span.end - span.start) as f64 / span.start as f64;
        assert!(growth > 0.10, "{span:?}: {growth}");
    }

    #[test]
    fn the_heap_is_judged_over_the_same_windows() {
        // RSS up 3 MB at 260 s. The heap in use, sampled every 5 s: 1 MB during warm-up, 2 MB in
        // the first window, 3 MB between the windows, 2.5 MB in the last; a 4 MB burst that a
        // single sample caught in each window.
        let s = series(300, |t| if t > 260 { 25 * MB } else { 22 * MB });
        let heap: Vec<(f64, u64)> = (0..=60)
            .map(|i| {
                let t = i * 5;
                let h = match t {
                    130 | 285 => 6 * MB,
                    0..120 => MB,
                    120..150 => 2 * MB,
                    271.. => 5 * MB / 2,
                    _ => 3 * MB,
                };
                (f64::from(t), h)
            })
            .collect();
        let span = rss_span(&s, &heap, 300.0).expect("judged");
        assert_eq!(span.heap, Some((2 * MB, 5 * MB / 2)));
        assert_eq!(rss_span(&s, &[], 300.0).expect("judged").heap, None);
    }

    #[test]
    fn steady_growth_is_seen() {
        // 20 MB growing by 30 KB a second: 29 MB after five minutes.
        let s = series(300, |t| 20 * MB + u64::from(t) * 30_000);
        let span = rss_span(&s, &[], 300.0).expect("judged");
        assert!(span.start < 24 * MB && span.end > 28 * MB, "{span:?}");
    }

    #[test]
    fn a_short_life_is_not_judged() {
        assert!(rss_span(&series(80, |_| 20 * MB), &[], 80.0).is_none());
        assert!(rss_span(&series(179, |_| 20 * MB), &[], 179.0).is_none());
        assert!(rss_span(&[], &[], 0.0).is_none());
    }
}
