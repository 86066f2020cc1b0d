//! `ucrelay sim phones`: a fleet of simulated Poly desk phones speaking the device REST API, each
//! on its own loopback address, for the relay's tests, the demo and benchmarks.
//!
//! One listener on `0.0.0.0:PORT` serves every phone: a connection belongs to the phone whose
//! address it was made to (its local address), and a connection to any other address is reset at
//! once. TLS and plain HTTP share the port: a first byte of 0x16 (a TLS handshake record) means
//! TLS, anything else is plain HTTP. Each phone has its own key pair and self-signed certificate
//! (CN = its MAC), made on its first TLS connection: kept across reboots, replaced by a factory
//! reset, as real phones do. The test API can make a phone present an impostor's certificate
//! (another host took over its address), and make it answer like a hostile device.
//!
//! What a phone does is in `model` (state and rules) and `api` (the HTTP side). Besides the device
//! API, every phone answers a test API under `/sim/` (no authentication, no faults): its state,
//! fault injection, line registration, parameter changes by source, and fleet-wide counters.
//!
//! Built for 50,000 phones in one process: a phone is a small struct behind its own mutex in one
//! vector indexed by address offset, and seeded parameters are computed rather than stored.

mod api;
pub mod model;
pub mod uplink;

pub use model::{CallSnapshot, Fault, FaultMode, Hostile, LineSnapshot, PhoneState, Source};

use anyhow::{Context as _, bail};
use hyper_util::rt::{TokioIo, TokioTimer};
use model::{Fleet, Phone};
use serde::Serialize;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Most phones one simulator runs (a 16 million address /8 would need gigabytes).
pub const MAX_PHONES: usize = 1_000_000;

/// Options of `ucrelay sim phones`.
#[derive(clap::Args, Debug, Clone)]
pub struct PhonesOptions {
    /// How many phones.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Address of the first phone; the others follow (IP+1, IP+2, ...).
    #[arg(long, default_value = "127.0.0.10", value_name = "IP")]
    pub base_ip: Ipv4Addr,
    /// Port every phone listens on (TLS and plain HTTP); 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Admin password of the device API (user `Polycom`).
    #[arg(long, default_value = "456")]
    pub admin_password: String,
    /// How long a phone stays down when it reboots.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub reboot_time: Duration,
    /// SIP lines per phone.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=model::MAX_LINES as i64))]
    pub lines: u8,
    /// Fault every phone starts with.
    #[arg(long, value_enum, default_value_t = FaultMode::None)]
    pub fault: FaultMode,
    /// Delay of the `slow` fault, milliseconds.
    #[arg(long, default_value_t = model::DEFAULT_SLOW_MS)]
    pub fault_delay_ms: u32,
    /// Allow phone addresses outside 127.0.0.0/8 (they must be configured on this host).
    #[arg(long)]
    pub allow_non_loopback: bool,
    /// Bytes per second a background packet capture grows by (it stops by itself at its
    /// bufferSize or duration).
    #[arg(long, default_value_t = model::DEFAULT_CAPTURE_RATE)]
    pub capture_rate: u64,
    /// The phones' provisioning server, e.g. the relay's edge (`https://relay.example/`): after
    /// every boot each phone fetches its configuration there and PUTs its boot and app logs.
    #[arg(long, value_name = "URL")]
    pub provisioning: Option<String>,
    /// A CA certificate (PEM) the phones trust for the relay's edge (capture uploads and
    /// provisioning), besides the system's.
    #[arg(long, value_name = "FILE")]
    pub relay_ca: Option<std::path::PathBuf>,
    /// Resolve HOST to IP:PORT without DNS (like curl --resolve); repeatable.
    #[arg(long = "resolve", value_name = "HOST=IP:PORT")]
    pub resolve: Vec<String>,
    /// Every device API answer takes this long, picked at random in the range for each request
    /// (`50-200` milliseconds, or one number): the processing time of a real phone.
    #[arg(long, value_name = "MS[-MS]", value_parser = parse_delay_range)]
    pub answer_delay_ms: Option<(u32, u32)>,
}

/// `50-200` or `120` (milliseconds).
fn parse_delay_range(s: &str) -> Result<(u32, u32), String> {
    let num = |t: &str| {
        t.trim()
            .parse::<u32>()
            .map_err(|_| format!("{t:?} is not a number of milliseconds"))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(s)?, num(s)?),
    };
    if lo > hi || hi > 60_000 {
        return Err(format!("{s:?}: want MIN-MAX with MIN <= MAX <= 60000"));
    }
    Ok((lo, hi))
}

impl PhonesOptions {
    /// `count` phones from `base_ip` with the command line's defaults, on a random port.
    pub fn new(count: usize, base_ip: Ipv4Addr) -> PhonesOptions {
        PhonesOptions {
            count,
            base_ip,
            port: 0,
            admin_password: "456".into(),
            reboot_time: Duration::from_secs(3),
            lines: 2,
            fault: FaultMode::None,
            fault_delay_ms: model::DEFAULT_SLOW_MS,
            allow_non_loopback: false,
            answer_delay_ms: None,
            capture_rate: model::DEFAULT_CAPTURE_RATE,
            provisioning: None,
            relay_ca: None,
            resolve: Vec::new(),
        }
    }

    /// The uplink the options describe (`--provisioning`, `--relay-ca`, `--resolve`).
    pub fn uplink(&self) -> anyhow::Result<uplink::Uplink> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject as _;
        let mut u = uplink::Uplink {
            provisioning: self.provisioning.clone(),
            ..Default::default()
        };
        if let Some(p) = &self.provisioning {
            crate::phone::ProvClient::new(p, "000000000000")
                .with_context(|| format!("--provisioning {p}"))?;
        }
        if let Some(ca) = &self.relay_ca {
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("--relay-ca {}", ca.display()))?
            {
                u.roots.push(
                    c.with_context(|| format!("--relay-ca {}", ca.display()))?
                        .to_vec(),
                );
            }
        }
        for r in &self.resolve {
            let (host, addr) = r
                .split_once('=')
                .with_context(|| format!("--resolve {r:?} is not HOST=IP:PORT"))?;
            let addr: SocketAddr = addr
                .parse()
                .with_context(|| format!("--resolve {r:?} is not HOST=IP:PORT"))?;
            u.resolve.insert(host.to_ascii_lowercase(), addr);
        }
        Ok(u)
    }

    /// Checks the options; the error names the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.count == 0 {
            bail!("--count must be at least 1");
        }
        if self.count > MAX_PHONES {
            bail!("--count {} is more than {MAX_PHONES} phones", self.count);
        }
        let first = u32::from(self.base_ip);
        let Some(last) = u32::try_from(self.count - 1)
            .ok()
            .and_then(|n| first.checked_add(n))
            .map(Ipv4Addr::from)
        else {
            bail!(
                "--count {} phones from --base-ip {} run past 255.255.255.255",
                self.count,
                self.base_ip
            );
        };
        let loopback = self.base_ip.is_loopback() && last.is_loopback();
        if !self.allow_non_loopback && !loopback {
            bail!(
                "phone addresses {}..{} leave 127.0.0.0/8 (loopback); choose a --base-ip and --count inside it, or pass --allow-non-loopback if those addresses are configured on this host",
                self.base_ip,
                last
            );
        }
        if self.base_ip.is_unspecified() || self.base_ip.is_multicast() || last.is_broadcast() {
            bail!("--base-ip {} cannot be a phone address", self.base_ip);
        }
        if !(1..=model::MAX_LINES).contains(&self.lines) {
            bail!("--lines must be 1 to {}", model::MAX_LINES);
        }
        if self.admin_password.is_empty() {
            bail!("--admin-password must not be empty");
        }
        Ok(())
    }
}

/// Fleet-wide counters (`GET /sim/stats`, [`Phones::stats`]).
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    tls_connections: AtomicU64,
    /// Made to an address that is not a phone.
    rejected_connections: AtomicU64,
    /// Reset because the phone was rebooting or refusing.
    reset_connections: AtomicU64,
    requests: AtomicU64,
    busy_refusals: AtomicU64,
    auth_failures: AtomicU64,
    /// Reboots started, all phones together (a phone rebooted twice counts twice).
    reboots: AtomicU64,
    /// Device-API requests being handled now, fleet-wide, and the most there ever were at once.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
}

/// A copy of the fleet-wide counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PhonesStats {
    pub phones: usize,
    pub connections: u64,
    pub tls_connections: u64,
    pub rejected_connections: u64,
    pub reset_connections: u64,
    pub requests: u64,
    pub busy_refusals: u64,
    pub auth_failures: u64,
    pub reboots: u64,
    /// Device-API requests handled at once, fleet-wide, at the most (since start or the last
    /// `reset_peak`).
    pub peak_in_flight: u64,
}

/// What every connection and handler shares.
struct Inner {
    fleet: Fleet,
    phones: Vec<Mutex<Phone>>,
    /// `Polycom:<admin password>`, as Basic credentials decode.
    credentials: String,
    counters: Counters,
    /// Cancelled at shutdown.
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// `--answer-delay-ms`.
    answer_delay: Option<(u32, u32)>,
    /// Where the phones send captures and logs, and whom they trust.
    uplink: std::sync::RwLock<uplink::Uplink>,
}

impl Inner {
    /// The lock of one phone; a panic elsewhere must not take the phone down for good.
    fn phone(&self, idx: usize) -> MutexGuard<'_, Phone> {
        self.phones[idx].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a reboot of `idx`. Its open connections are reset a moment later, once the
    /// acknowledgement has had time to go out.
    fn reboot(self: &Arc<Self>, idx: usize, now: Instant) {
        self.counters.reboots.fetch_add(1, Ordering::Relaxed);
        let token = self.phone(idx).start_reboot(&self.fleet, now);
        info!(phone = %self.fleet.ip(idx), down_for = ?self.fleet.reboot_time, "phone rebooting");
        if let Some(token) = token {
            self.tracker.spawn(async move {
                tokio::time::sleep(ACK_GRACE).await;
                token.cancel();
            });
        }
        // Back up, a phone provisions: configuration, then its boot and app logs.
        if self.uplink().provisioning.is_some() {
            let me = self.clone();
            let wait = self.fleet.reboot_time + Duration::from_millis(100);
            self.tracker.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => me.provision(idx).await,
                    _ = me.cancel.cancelled() => {}
                }
            });
        }
    }

    fn uplink(&self) -> uplink::Uplink {
        self.uplink
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A provisioning round of phone `idx`: GET `<mac>.cfg`, PUT `<mac>-boot.log` and
    /// `<mac>-app.log`. Failures are only logged (a phone keeps trying at its next boot).
    async fn provision(&self, idx: usize) {
        let u = self.uplink();
        let Some(base) = u.provisioning.clone() else {
            return;
        };
        let mac = model::mac(idx);
        let fw = self.phone(idx).firmware();
        let ip = IpAddr::V4(self.fleet.ip(idx));
        let client = match u.client(&base, ip, &mac, model::model(idx), &fw) {
            Ok(c) => c,
            Err(e) => {
                warn!(phone = %ip, error = %format!("{e:#}"), "cannot provision");
                return;
            }
        };
        let cfg = client.get(&format!("{mac}.cfg")).await;
        let boot = client
            .put(
                &format!("{mac}-boot.log"),
                uplink::log_text("boot", &mac, 600),
            )
            .await;
        let app = client
            .put(
                &format!("{mac}-app.log"),
                uplink::log_text("app", &mac, 1500),
            )
            .await;
        let mut p = self.phone(idx);
        for r in [&boot, &app].into_iter().flatten() {
            p.log_uploads += 1;
            p.last_upload_status = Some(r.status);
        }
        drop(p);
        debug!(phone = %ip, cfg = ?cfg.map(|r| r.status).ok(), boot = ?boot.map(|r| r.status).ok(), app = ?app.map(|r| r.status).ok(), "phone provisioned");
    }

    /// PUTs a log of about `bytes` bytes to the provisioning server now; returns the status.
    async fn upload_log(&self, idx: usize, kind: &str, bytes: usize) -> anyhow::Result<u16> {
        let u = self.uplink();
        let base = u.provisioning.clone().ok_or_else(|| {
            anyhow::anyhow!("the phones have no provisioning server (--provisioning)")
        })?;
        let mac = model::mac(idx);
        let fw = self.phone(idx).firmware();
        let client = u.client(
            &base,
            IpAddr::V4(self.fleet.ip(idx)),
            &mac,
            model::model(idx),
            &fw,
        )?;
        let r = client
            .put(
                &format!("{mac}-{kind}.log"),
                uplink::log_text(kind, &mac, bytes),
            )
            .await?;
        let mut p = self.phone(idx);
        p.log_uploads += 1;
        p.last_upload_status = Some(r.status);
        Ok(r.status)
    }

    /// The TLS identity phone `idx` presents now: its own key (made at start, new after a factory
    /// reset, made on first use then) or, while swapped, an impostor's. The key is made outside the phone's lock.
    fn tls(&self, idx: usize) -> anyhow::Result<Arc<model::PhoneTls>> {
        let (generation, swapped) = {
            let p = self.phone(idx);
            if let Some(t) = p.current_tls() {
                return Ok(t.clone());
            }
            (p.key_generation, p.swapped)
        };
        let made = Arc::new(make_tls(idx, generation, swapped)?);
        let mut p = self.phone(idx);
        if let Some(t) = p.current_tls() {
            // Someone else made it meanwhile.
            return Ok(t.clone());
        }
        if p.key_generation == generation && p.swapped == swapped {
            if swapped {
                p.impostor = Some(made.clone());
            } else {
                p.tls = Some(made.clone());
            }
        }
        // Reset or swapped meanwhile: this connection still gets what it asked for.
        Ok(made)
    }

    fn set_identity(&self, idx: usize, swapped: bool) {
        let token = {
            let mut p = self.phone(idx);
            if p.swapped == swapped {
                return;
            }
            p.swapped = swapped;
            // An impostor's certificate is made fresh each time one takes over.
            if swapped {
                p.impostor = None;
            }
            p.take_conn_token()
        };
        if let Some(t) = token {
            t.cancel();
        }
    }

    fn set_fault(&self, idx: usize, fault: Fault) {
        let token = {
            let mut p = self.phone(idx);
            p.fault = fault;
            // Refusing applies to connections already open as well.
            if fault.mode == FaultMode::Refuse {
                p.take_conn_token()
            } else {
                None
            }
        };
        if let Some(t) = token {
            t.cancel();
        }
    }
}

/// How long a rebooting phone keeps its connections open so that the acknowledgement leaves.
const ACK_GRACE: Duration = Duration::from_millis(50);
/// How long a new connection may take to send its first byte, and a TLS handshake to finish.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request head may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an open request gets to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// A running fleet. Dropping it stops it too, without waiting.
pub struct Phones {
    port: u16,
    inner: Arc<Inner>,
}

impl Phones {
    /// The port every phone listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn len(&self) -> usize {
        self.inner.fleet.count
    }

    pub fn is_empty(&self) -> bool {
        self.inner.fleet.count == 0
    }

    /// IP address of phone `idx` (not checked against the count).
    pub fn ip(&self, idx: usize) -> Ipv4Addr {
        self.inner.fleet.ip(idx)
    }

    /// Socket address of phone `idx`'s API.
    pub fn addr(&self, idx: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip(idx)), self.port)
    }

    /// Every phone's API address, in index order.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        (0..self.len()).map(|i| self.addr(i))
    }

    /// The phone at `ip`, if any.
    pub fn index_of(&self, ip: IpAddr) -> Option<usize> {
        match ip {
            IpAddr::V4(v4) => self.inner.fleet.index_of(v4),
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .and_then(|v4| self.inner.fleet.index_of(v4)),
        }
    }

    pub fn mac(&self, idx: usize) -> String {
        model::mac(idx)
    }

    /// The state of phone `idx`, as `GET /sim/state` shows it. Panics when `idx` is out of range.
    pub fn state(&self, idx: usize) -> PhoneState {
        self.inner
            .phone(idx)
            .snapshot(&self.inner.fleet, Instant::now())
    }

    /// Whether phone `idx` is down (rebooting).
    pub fn is_down(&self, idx: usize) -> bool {
        self.inner.phone(idx).is_down(Instant::now())
    }

    pub fn set_fault(&self, idx: usize, fault: Fault) {
        self.inner.set_fault(idx, fault);
    }

    pub fn set_fault_all(&self, fault: Fault) {
        for idx in 0..self.len() {
            self.inner.set_fault(idx, fault);
        }
    }

    /// Registers or unregisters line `line` (1-based) of phone `idx`.
    pub fn set_line_registered(
        &self,
        idx: usize,
        line: u8,
        registered: bool,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=self.inner.fleet.lines).contains(&line),
            "line {line} does not exist (the phones have {} lines)",
            self.inner.fleet.lines
        );
        self.inner.phone(idx).set_line_registered(line, registered);
        Ok(())
    }

    /// Sets a parameter of phone `idx` in `source` (as the provisioning server, the web UI, ...
    /// would). `Source::Default` cannot be changed and is ignored.
    pub fn set_param(&self, idx: usize, source: Source, name: &str, value: &str) {
        self.inner
            .phone(idx)
            .set_param(&self.inner.fleet, source, name, value, Instant::now());
    }

    /// Reboots phone `idx` as `safeReboot` would.
    pub fn reboot(&self, idx: usize) {
        self.inner.reboot(idx, Instant::now());
    }

    /// Where the phones send captures and logs, and whom they trust (changeable while running:
    /// the relay's edge may start after the phones).
    pub fn set_uplink(&self, u: uplink::Uplink) {
        *self.inner.uplink.write().unwrap_or_else(|e| e.into_inner()) = u;
    }

    /// Phone `idx` PUTs a log of about `bytes` bytes (`kind` app or boot) to its provisioning
    /// server now; the HTTP status.
    pub async fn upload_log(&self, idx: usize, kind: &str, bytes: usize) -> anyhow::Result<u16> {
        self.inner.upload_log(idx, kind, bytes).await
    }

    /// Offers phone `idx` a firmware at its next configuration update; with `fail` the upgrade
    /// fails (it reboots and comes back on the old one).
    pub fn offer_firmware(&self, idx: usize, firmware: &str, fail: bool) {
        self.inner.phone(idx).offer = Some(Box::new(model::Offer {
            firmware: firmware.to_owned(),
            fail,
        }));
    }

    /// Makes phone `idx` refuse configuration updates (status 4003) while `refuse`.
    pub fn refuse_config_updates(&self, idx: usize, refuse: bool) {
        self.inner.phone(idx).refuse_config_updates = refuse;
    }

    /// Fleet-wide counters.
    pub fn stats(&self) -> PhonesStats {
        stats(&self.inner)
    }

    /// Phone `idx`'s TLS certificate (DER) as presented now, for clients that want to pin it.
    pub fn certificate_der(&self, idx: usize) -> anyhow::Result<Vec<u8>> {
        Ok(self.inner.tls(idx)?.cert_der.clone())
    }

    /// SHA-256 of the key phone `idx` presents now (lowercase hex), making it if needed.
    pub fn key_fingerprint(&self, idx: usize) -> anyhow::Result<String> {
        Ok(self.inner.tls(idx)?.key_sha256.clone())
    }

    /// Makes phone `idx` present an impostor's certificate (another host took over its address),
    /// or its own again. Open connections are reset.
    pub fn set_swapped(&self, idx: usize, swapped: bool) {
        self.inner.set_identity(idx, swapped);
    }

    /// Makes phone `idx` answer like a hostile device (or like a phone again with `None`).
    pub fn set_hostile(&self, idx: usize, hostile: Hostile) {
        self.inner.phone(idx).hostile = hostile;
    }

    /// Starts counting the peak of concurrent requests again from the requests in flight now.
    pub fn reset_peak(&self) {
        let c = &self.inner.counters;
        c.peak_in_flight
            .store(c.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Stops accepting, closes every connection and returns once all of that is done.
    pub async fn shutdown(self) {
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.inner.tracker.wait())
            .await
            .is_err()
        {
            warn!("sim phones: some connections did not close within 10s");
        }
    }
}

impl Drop for Phones {
    fn drop(&mut self) {
        self.inner.cancel.cancel();
    }
}

fn stats(inner: &Inner) -> PhonesStats {
    let c = &inner.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    PhonesStats {
        phones: inner.fleet.count,
        connections: get(&c.connections),
        tls_connections: get(&c.tls_connections),
        rejected_connections: get(&c.rejected_connections),
        reset_connections: get(&c.reset_connections),
        requests: get(&c.requests),
        busy_refusals: get(&c.busy_refusals),
        auth_failures: get(&c.auth_failures),
        reboots: get(&c.reboots),
        peak_in_flight: get(&c.peak_in_flight),
    }
}

/// Starts the fleet: binds `0.0.0.0:PORT` and serves until `shutdown` is cancelled (or
/// [`Phones::shutdown`]).
pub async fn start(opts: PhonesOptions, shutdown: CancellationToken) -> anyhow::Result<Phones> {
    opts.validate()?;
    let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, opts.port));
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let port = listener
        .local_addr()
        .context("listener has no local address")?
        .port();

    let uplink = opts.uplink()?;
    let fleet = Fleet {
        base: opts.base_ip,
        count: opts.count,
        lines: opts.lines,
        reboot_time: opts.reboot_time,
        capture_rate: opts.capture_rate,
    };
    let now = Instant::now();
    let fault = Fault {
        mode: opts.fault,
        delay_ms: opts.fault_delay_ms,
    };
    let phones = (0..opts.count)
        .map(|i| {
            let mut p = Phone::new(i, now, &fleet);
            p.fault = fault;
            Mutex::new(p)
        })
        .collect();
    let inner = Arc::new(Inner {
        fleet,
        phones,
        credentials: format!("Polycom:{}", opts.admin_password),
        counters: Counters::default(),
        cancel: shutdown.child_token(),
        tracker: TaskTracker::new(),
        answer_delay: opts.answer_delay_ms,
        uplink: std::sync::RwLock::new(uplink),
    });
    make_keys(&inner).await?;
    inner.tracker.spawn(accept_loop(listener, inner.clone()));
    // Phones that provision do a first round as they come up, spread over a few seconds.
    if inner.uplink().provisioning.is_some() {
        let spread = Duration::from_millis((opts.count as u64 * 10).min(10_000));
        for idx in 0..opts.count {
            let me = inner.clone();
            let wait = spread.mul_f64(idx as f64 / opts.count as f64);
            inner.tracker.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => me.provision(idx).await,
                    _ = me.cancel.cancelled() => {}
                }
            });
        }
    }
    info!(port, count = opts.count, first = %opts.base_ip, "sim phones started");
    Ok(Phones { port, inner })
}

/// A phone has its key from its first boot, not from its first TLS contact: every phone's key is
/// made before the fleet answers, on every core. Otherwise a benchmark's first wave of handshakes
/// would also pay for 50,000 key generations that no real fleet does at that moment. A factory
/// reset or an impostor still makes its key on first use.
async fn make_keys(inner: &Arc<Inner>) -> anyhow::Result<()> {
    let n = inner.phones.len();
    let workers = std::thread::available_parallelism()
        .map_or(1, |w| w.get())
        .clamp(1, n.max(1));
    let mut set = tokio::task::JoinSet::new();
    for first in 0..workers {
        let me = inner.clone();
        set.spawn_blocking(move || -> anyhow::Result<()> {
            for idx in (first..n).step_by(workers) {
                if me.cancel.is_cancelled() {
                    break;
                }
                me.tls(idx)?;
            }
            Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("a key-making thread failed")??;
    }
    Ok(())
}

/// CLI entry: starts the fleet, prints the readiness line, runs until SIGINT/SIGTERM.
pub async fn main(opts: PhonesOptions) -> anyhow::Result<()> {
    raise_fd_limit(opts.count);
    let phones = start(opts.clone(), CancellationToken::new()).await?;
    {
        use std::io::Write as _;
        let last = phones.ip(phones.len() - 1);
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "ucrelay sim phones ready: {} phones at {}..{} port {} (https and http), admin user Polycom",
            phones.len(),
            opts.base_ip,
            last,
            phones.port()
        )?;
        out.flush()?;
    }
    super::cloud::wait_for_signal().await?;
    phones.shutdown().await;
    Ok(())
}

/// Thousands of phones mean thousands of connections: lift the soft open-file limit to the hard
/// one when it looks too small.
fn raise_fd_limit(count: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let want = (count as u64).saturating_mul(2).saturating_add(1024);
    if soft < want && hard > soft {
        let new = want.min(hard);
        if setrlimit(Resource::RLIMIT_NOFILE, new, hard).is_ok() {
            info!(from = soft, to = new, "raised the open-file limit");
        }
    }
}

/// A new key pair and self-signed certificate for phone `idx`, named after its MAC as device
/// certificates are (an impostor's names the same MAC: only the key tells them apart).
fn make_tls(idx: usize, generation: u32, swapped: bool) -> anyhow::Result<model::PhoneTls> {
    use rcgen::{CertificateParams, DnType, KeyPair};
    use sha2::Digest as _;
    let key = KeyPair::generate().context("cannot make a phone's key")?;
    let mac = model::mac(idx);
    let mut params = CertificateParams::new(vec![format!("{mac}.phone.sim")])?;
    params.distinguished_name.push(DnType::CommonName, mac);
    let cert = params.self_signed(&key)?;
    let cert_der = cert.der().to_vec();
    let key_sha256 = {
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| anyhow::anyhow!("cannot read the phone's own certificate: {e}"))?;
        sha2::Sha256::digest(parsed.tbs_certificate.subject_pki.raw)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .context("cannot build the phones' TLS config")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(model::PhoneTls {
        generation,
        swapped,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        cert_der,
        key_sha256,
    })
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let accepted = tokio::select! {
            _ = inner.cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _peer)) => {
                inner.tracker.spawn(connection(stream, inner.clone()));
            }
            Err(e) => {
                // Typically out of file descriptors: pause instead of spinning on the error.
                warn!(error = %e, "sim phones: accept failed");
                tokio::select! {
                    _ = inner.cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}

/// Closes a connection with a reset (RST), the way a phone that went away looks to a client.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn connection(stream: TcpStream, inner: Arc<Inner>) {
    let idx = match stream.local_addr() {
        Ok(SocketAddr::V4(a)) => inner.fleet.index_of(*a.ip()),
        _ => None,
    };
    let Some(idx) = idx else {
        inner
            .counters
            .rejected_connections
            .fetch_add(1, Ordering::Relaxed);
        reset(stream);
        return;
    };
    let token = {
        let mut p = inner.phone(idx);
        if p.is_down(Instant::now()) || p.fault.mode == FaultMode::Refuse {
            None
        } else {
            Some(p.conn_token())
        }
    };
    let Some(token) = token else {
        inner
            .counters
            .reset_connections
            .fetch_add(1, Ordering::Relaxed);
        reset(stream);
        return;
    };
    inner.counters.connections.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);

    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        r = tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)) => r,
        _ = token.cancelled() => return reset(stream),
        _ = inner.cancel.cancelled() => return,
    };
    match peeked {
        Ok(Ok(1..)) => {}
        _ => return,
    }
    let io = PhoneIo {
        tcp: stream,
        reset: token.clone(),
    };
    if first[0] == 0x16 {
        inner
            .counters
            .tls_connections
            .fetch_add(1, Ordering::Relaxed);
        let tls = match inner.tls(idx) {
            Ok(t) => t,
            Err(e) => {
                warn!(phone = idx, error = %format!("{e:#}"), "sim phones: cannot make the phone's certificate");
                return;
            }
        };
        let handshake = tokio::select! {
            r = tokio::time::timeout(FIRST_BYTE_TIMEOUT, tls.acceptor.accept(io)) => r,
            _ = token.cancelled() => return,
            _ = inner.cancel.cancelled() => return,
        };
        match handshake {
            Ok(Ok(tls)) => serve_http(TokioIo::new(tls), idx, inner, token).await,
            Ok(Err(e)) => debug!(phone = idx, error = %e, "sim phones: TLS handshake failed"),
            Err(_) => debug!(phone = idx, "sim phones: TLS handshake timed out"),
        }
    } else {
        serve_http(TokioIo::new(io), idx, inner, token).await;
    }
}

async fn serve_http<I>(io: I, idx: usize, inner: Arc<Inner>, token: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc_inner = inner.clone();
    let service = hyper::service::service_fn(move |req| {
        let inner = svc_inner.clone();
        async move { api::handle(inner, idx, req).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(phone = idx, error = %e, "sim phones: connection ended with an error");
            }
        }
        // Reboot or `refuse`: dropping the connection resets it (see `PhoneIo`).
        _ = token.cancelled() => {}
        _ = inner.cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await;
        }
    }
}

/// The TCP stream of a phone connection. When dropped after the phone's connection token was
/// cancelled (reboot, `refuse`) it closes with a reset rather than a FIN.
struct PhoneIo {
    tcp: TcpStream,
    reset: CancellationToken,
}

impl Drop for PhoneIo {
    fn drop(&mut self) {
        if self.reset.is_cancelled() {
            let _ = self.tcp.set_zero_linger();
        }
    }
}

impl AsyncRead for PhoneIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for PhoneIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
