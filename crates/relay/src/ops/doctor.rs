//! `ucrelay doctor`: walks the path from this machine to the cloud and to the devices, one step at a
//! time, and says for each whether it works and, when not, what to do. It is what an admin runs
//! when `status` says something is wrong (or when there is no relay running to ask).
//!
//! The whole run is bounded: every network step has its own deadline, and all of them together stay
//! under [`BUDGET`]; a step that no longer fits is skipped and says so. Steps that need an earlier
//! one (TLS needs TCP) are skipped when it failed, so one cause gives one failure, not five.
//!
//! Exit code: 0 when nothing failed (warnings do not change it), 1 when any step failed.

use crate::cloud::{self, CloudClient};
use crate::config::{CloudConfig, Config};
use crate::protocol::{ErrorCode, PATH_REGISTER, PROTOCOL_VERSION, RegisterRequest};
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Everything doctor does fits in this.
pub const BUDGET: Duration = Duration::from_secs(15);
const ADMIN_DEADLINE: Duration = Duration::from_secs(2);
const DNS_DEADLINE: Duration = Duration::from_secs(3);
const TCP_DEADLINE: Duration = Duration::from_secs(3);
const TLS_DEADLINE: Duration = Duration::from_secs(3);
const REGISTER_DEADLINE: Duration = Duration::from_secs(4);
const DEVICE_DEADLINE: Duration = Duration::from_millis(1500);
/// Clock skew limits against the cloud's `Date`.
const SKEW_WARN: Duration = Duration::from_secs(30);
const SKEW_FAIL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
    Skip,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
            Level::Skip => "skip",
        }
    }
}

/// One step's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Stable name: config, certificate, dns, tcp, tls, pin, clock, edge-port, disk, admin-socket,
    /// devices.
    pub name: &'static str,
    pub level: Level,
    pub message: String,
    /// What to do about it (warn and fail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub exit_code: u8,
    pub elapsed_ms: u64,
    pub checks: Vec<Step>,
}

impl Report {
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Messages quote the cloud, DNS and devices: escaped for the terminal.
        use crate::util::text::printable;
        for s in &self.checks {
            out.push_str(&format!(
                "{:<5} {}: {}\n",
                s.level.label(),
                s.name,
                printable(&s.message)
            ));
            if let Some(h) = &s.hint {
                out.push_str(&format!("      fix: {}\n", printable(h)));
            }
        }
        let count = |l: Level| self.checks.iter().filter(|s| s.level == l).count();
        out.push_str(&format!(
            "{} ok, {} warnings, {} failed, {} skipped in {:.1} s\n",
            count(Level::Ok),
            count(Level::Warn),
            count(Level::Fail),
            count(Level::Skip),
            self.elapsed_ms as f64 / 1000.0
        ));
        out
    }
}

/// Collects steps and keeps the time budget.
struct Run {
    started: Instant,
    steps: Vec<Step>,
    step_started: Instant,
}

impl Run {
    fn remaining(&self) -> Duration {
        BUDGET.saturating_sub(self.started.elapsed())
    }

    /// The deadline for the next network step: its own, or what is left of the budget (keeping a
    /// little for the local steps after it).
    fn deadline(&self, own: Duration) -> Option<Duration> {
        let left = self.remaining().saturating_sub(Duration::from_millis(500));
        (left >= Duration::from_millis(200)).then(|| own.min(left))
    }

    fn begin(&mut self) {
        self.step_started = Instant::now();
    }

    fn push(&mut self, name: &'static str, level: Level, message: String, hint: Option<String>) {
        self.steps.push(Step {
            name,
            level,
            message,
            hint,
            elapsed_ms: self.step_started.elapsed().as_millis() as u64,
        });
        self.step_started = Instant::now();
    }
    fn ok(&mut self, name: &'static str, message: impl Into<String>) {
        self.push(name, Level::Ok, message.into(), None);
    }
    fn warn(&mut self, name: &'static str, message: impl Into<String>, hint: impl Into<String>) {
        self.push(name, Level::Warn, message.into(), Some(hint.into()));
    }
    fn fail(&mut self, name: &'static str, message: impl Into<String>, hint: impl Into<String>) {
        self.push(name, Level::Fail, message.into(), Some(hint.into()));
    }
    fn skip(&mut self, name: &'static str, message: impl Into<String>) {
        self.push(name, Level::Skip, message.into(), None);
    }
    fn out_of_time(&mut self, name: &'static str) {
        self.skip(
            name,
            format!("skipped: doctor's {} s budget is used up", BUDGET.as_secs()),
        );
    }

    fn finish(self) -> Report {
        let failed = self.steps.iter().any(|s| s.level == Level::Fail);
        Report {
            ok: !failed,
            exit_code: u8::from(failed),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            checks: self.steps,
        }
    }
}

/// What the running relay said on its admin socket, if it answered.
struct Running {
    status: serde_json::Value,
}

/// Runs every step against the config at `config_path`; `socket` overrides the config's admin
/// socket.
pub async fn run(config_path: &Path, socket: Option<&Path>) -> Report {
    let mut r = Run {
        started: Instant::now(),
        steps: Vec::new(),
        step_started: Instant::now(),
    };

    // 1. Config.
    let config = match Config::load(config_path) {
        Ok(c) => {
            r.ok("config", format!("{} is valid", c.path.display()));
            c
        }
        Err(e) => {
            r.fail(
                "config",
                e.to_string(),
                "fix the named field; `ucrelay check` lists every problem",
            );
            for name in [
                "certificate",
                "dns",
                "tcp",
                "tls",
                "pin",
                "clock",
                "edge-port",
                "disk",
                "admin-socket",
                "devices",
            ] {
                r.skip(name, "skipped: the config does not load");
            }
            return r.finish();
        }
    };
    let socket: PathBuf = socket
        .map(Path::to_path_buf)
        .unwrap_or_else(|| config.admin.socket.clone());

    // The running relay, when there is one: several steps ask it.
    let running = match r.deadline(ADMIN_DEADLINE) {
        Some(d) => tokio::time::timeout(
            d,
            super::admin::get_json::<serde_json::Value>(&socket, "/v1/status"),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map(|status| Running { status }),
        None => None,
    };
    r.begin();

    // 2. Certificate.
    certificate(&mut r, &config);

    // 3-5. DNS, TCP, TLS.
    let cloud_cfg = &config.cloud;
    let reachable = dns_tcp_tls(&mut r, cloud_cfg).await;

    // 6-7. PIN and clock.
    pin_and_clock(&mut r, &config, reachable, running.as_ref()).await;

    // 8. Edge port.
    edge_port(&mut r, &config, running.as_ref()).await;

    // 9. Disk.
    disk(&mut r, &config);

    // 10. Admin socket.
    admin_socket(&mut r, &socket, running.as_ref());

    // 11. Devices.
    devices(&mut r, &socket, running.as_ref()).await;

    r.finish()
}

fn certificate(r: &mut Run, config: &Config) {
    use crate::edge::cert::{self, Level as CertLevel};
    let Some(e) = &config.edge else {
        r.skip("certificate", "no [edge] section: no certificate needed");
        return;
    };
    let report = cert::load(
        &e.pfx,
        e.pfx_password_file.as_deref(),
        &e.fqdn,
        SystemTime::now(),
    );
    let fails: Vec<_> = report
        .checks
        .iter()
        .filter(|c| c.level == CertLevel::Fail)
        .collect();
    let warns: Vec<_> = report
        .checks
        .iter()
        .filter(|c| c.level == CertLevel::Warn)
        .collect();
    let validity = report
        .checks
        .iter()
        .find(|c| c.rule == "validity")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    if !fails.is_empty() {
        let what = fails
            .iter()
            .map(|c| format!("{}: {}", c.rule, c.message))
            .collect::<Vec<_>>()
            .join("; ");
        r.fail(
            "certificate",
            format!("{} fails: {what}", e.pfx.display()),
            "`ucrelay check` shows every rule; reissue or re-export the PFX, then `ucrelay reload`",
        );
    } else if !warns.is_empty() {
        let what = warns
            .iter()
            .map(|c| format!("{}: {}", c.rule, c.message))
            .collect::<Vec<_>>()
            .join("; ");
        r.warn(
            "certificate",
            what,
            "renew the certificate before it expires, then `ucrelay reload`",
        );
    } else {
        r.ok(
            "certificate",
            format!("{} passes every rule; {validity}", e.pfx.display()),
        );
    }
}

/// DNS, then TCP (to the proxy when one is set), then TLS. Returns whether the cloud is reachable
/// enough for the PIN step to be worth trying.
async fn dns_tcp_tls(r: &mut Run, cfg: &CloudConfig) -> bool {
    let host = cfg.url.host.trim_start_matches('[').trim_end_matches(']');
    let via_proxy = cfg.proxy.is_some();

    // DNS of the cloud host (the proxy resolves it when there is one, so failing here is a warning).
    let mut resolves = true;
    if host.parse::<IpAddr>().is_ok() {
        r.skip(
            "dns",
            format!("cloud host {host} is an IP address: nothing to resolve"),
        );
    } else {
        match r.deadline(DNS_DEADLINE) {
            None => r.out_of_time("dns"),
            Some(d) => match resolve(host, d).await {
                Ok(msg) => r.ok("dns", msg),
                Err(why) if via_proxy => r.warn(
                    "dns",
                    format!("{host} does not resolve here: {why}"),
                    "fine if only the proxy can resolve it; otherwise check /etc/resolv.conf",
                ),
                Err(why) => {
                    resolves = false;
                    r.fail(
                        "dns",
                        format!("{host} does not resolve: {why}"),
                        "check the host name in [cloud].url and the DNS servers in /etc/resolv.conf",
                    )
                }
            },
        }
    }
    if !resolves {
        r.skip("tcp", "skipped: the cloud's name does not resolve");
        r.skip("tls", "skipped: no TCP connection");
        return false;
    }

    // TCP: to the proxy, or straight to the cloud.
    let (target, what) = match &cfg.proxy {
        Some(p) => (p.address(), "proxy"),
        None => (cfg.url.connect_target(), "cloud"),
    };
    let Some(d) = r.deadline(TCP_DEADLINE) else {
        r.out_of_time("tcp");
        r.out_of_time("tls");
        return false;
    };
    let t0 = Instant::now();
    let mut tcp = match tokio::time::timeout(d, cloud::tcp_connect(&target, "connect", d)).await {
        Err(_) => {
            r.fail(
                "tcp",
                format!("no answer from the {what} at {target} within {d:?}"),
                tcp_hint(via_proxy),
            );
            r.skip("tls", "skipped: no TCP connection");
            return false;
        }
        Ok(Err(e)) => {
            r.fail(
                "tcp",
                format!("cannot connect to the {what} at {target}: {e}"),
                tcp_hint(via_proxy),
            );
            r.skip("tls", "skipped: no TCP connection");
            return false;
        }
        Ok(Ok((tcp, _))) => tcp,
    };
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| target.clone());
    if let Some(p) = &cfg.proxy {
        let tunnel = tokio::time::timeout(
            d.saturating_sub(t0.elapsed())
                .max(Duration::from_millis(100)),
            cloud::proxy_connect(&mut tcp, p, &cfg.url.connect_target()),
        )
        .await;
        match tunnel {
            Ok(Ok(())) => r.ok(
                "tcp",
                format!(
                    "connected to the proxy {peer}, which opened a tunnel to {} ({} ms)",
                    cfg.url.connect_target(),
                    t0.elapsed().as_millis()
                ),
            ),
            Ok(Err(e)) => {
                r.fail(
                    "tcp",
                    format!("connected to the proxy {peer}, but {e}"),
                    "check the proxy's credentials and that it allows CONNECT to the cloud's port",
                );
                r.skip("tls", "skipped: no tunnel through the proxy");
                return false;
            }
            Err(_) => {
                r.fail(
                    "tcp",
                    format!("the proxy {peer} did not answer CONNECT within {d:?}"),
                    "check [cloud].proxy",
                );
                r.skip("tls", "skipped: no tunnel through the proxy");
                return false;
            }
        }
    } else {
        r.ok(
            "tcp",
            format!(
                "connected to the cloud at {peer} ({} ms)",
                t0.elapsed().as_millis()
            ),
        );
    }

    if !cfg.url.tls {
        r.warn(
            "tls",
            "cloud URL is plain http: nothing is encrypted",
            "use an https:// URL outside a lab",
        );
        return true;
    }
    match r.deadline(TLS_DEADLINE) {
        None => {
            r.out_of_time("tls");
            false
        }
        Some(d) => tls_step(r, cfg, tcp, d).await,
    }
}

fn tcp_hint(via_proxy: bool) -> &'static str {
    if via_proxy {
        "check [cloud].proxy (address, port) and the firewall between this machine and the proxy"
    } else {
        "check [cloud].url, the firewall (outbound TCP to the cloud), or set [cloud].proxy if the WAN is only reachable through one"
    }
}

/// Resolves `host` asking each configured nameserver in turn, so the answer names the one that
/// gave it. Falls back to the system resolver (/etc/hosts, nsswitch) when none answers.
async fn resolve(host: &str, deadline: Duration) -> Result<String, String> {
    use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    let started = Instant::now();
    let left = || deadline.saturating_sub(started.elapsed());
    let mut tried = Vec::new();
    if let Ok((conf, mut opts)) = hickory_resolver::system_conf::read_system_conf() {
        let (domain, search, servers) = conf.into_parts();
        let mut ips: Vec<IpAddr> = Vec::new();
        for s in &servers {
            if !ips.contains(&s.ip) {
                ips.push(s.ip);
            }
        }
        opts.use_hosts_file = ResolveHosts::Never;
        opts.attempts = 1;
        let per = deadline / (ips.len().max(1) as u32 + 1);
        opts.timeout = per.max(Duration::from_millis(300));
        for ip in ips {
            if left() < Duration::from_millis(100) {
                break;
            }
            let one = ResolverConfig::from_parts(
                domain.clone(),
                search.clone(),
                vec![NameServerConfig::udp_and_tcp(ip)],
            );
            let resolver = match hickory_resolver::Resolver::builder_with_config(
                one,
                TokioRuntimeProvider::default(),
            )
            .with_options(opts.clone())
            .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tried.push(format!("{ip}: {e}"));
                    continue;
                }
            };
            match tokio::time::timeout(left().min(per * 2), resolver.lookup_ip(host)).await {
                Ok(Ok(found)) => {
                    let addrs: Vec<String> = found.iter().map(|a| a.to_string()).collect();
                    if !addrs.is_empty() {
                        return Ok(format!(
                            "{host} → {} (answered by nameserver {ip})",
                            addrs.join(", ")
                        ));
                    }
                    tried.push(format!("{ip}: no addresses"));
                }
                Ok(Err(e)) => tried.push(format!("{ip}: {e}")),
                Err(_) => tried.push(format!("{ip}: no answer in time")),
            }
        }
    }
    // /etc/hosts and anything else nsswitch knows.
    if left() >= Duration::from_millis(100)
        && let Ok(Ok(found)) =
            tokio::time::timeout(left(), tokio::net::lookup_host((host, 0u16))).await
    {
        let addrs: Vec<String> = found.map(|a| a.ip().to_string()).collect();
        if !addrs.is_empty() {
            let note = if tried.is_empty() {
                String::new()
            } else {
                format!("; the nameservers did not answer: {}", tried.join("; "))
            };
            return Ok(format!(
                "{host} → {} (from the system resolver, e.g. /etc/hosts{note})",
                addrs.join(", ")
            ));
        }
    }
    Err(if tried.is_empty() {
        "no nameserver configured and the system resolver has no address".into()
    } else {
        tried.join("; ")
    })
}

/// Records the chain the server presented, then verifies it like the relay would (system roots
/// plus `[cloud].ca_file`).
#[derive(Debug)]
struct Recorder {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    chain: Mutex<Vec<rustls::pki_types::CertificateDer<'static>>>,
}

impl rustls::client::danger::ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().unwrap_or_else(|e| e.into_inner()) = chain;
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn verifier(roots: rustls::RootCertStore) -> Option<Arc<rustls::client::WebPkiServerVerifier>> {
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .ok()
}

/// The roots the relay trusts for the cloud: the system store plus `ca_file`.
fn relay_roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    // The same errors the relay would stop on (unreadable ca_file, empty store).
    cloud::client_tls_config(ca_file).map_err(|e| format!("{e:#}"))?;
    let mut roots = system_roots();
    if let Some(p) = ca_file {
        roots.add_parsable_certificates(pem_certs(p));
    }
    Ok(roots)
}

fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    roots
}

fn pem_certs(p: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(p)
        .map(|it| it.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

/// The public CAs as the distribution ships them (Debian's ca-certificates keeps Mozilla's list
/// apart from locally added CAs). None where the distribution does not keep them apart.
fn public_roots() -> Option<rustls::RootCertStore> {
    let dir = Path::new("/usr/share/ca-certificates/mozilla");
    let mut roots = rustls::RootCertStore::empty();
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        roots.add_parsable_certificates(pem_certs(&entry.path()));
    }
    (!roots.is_empty()).then_some(roots)
}

fn names(der: &[u8]) -> (String, String) {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => (c.subject().to_string(), c.issuer().to_string()),
        Err(_) => ("?".into(), "?".into()),
    }
}

async fn tls_step(r: &mut Run, cfg: &CloudConfig, tcp: tokio::net::TcpStream, d: Duration) -> bool {
    let roots = match relay_roots(cfg.ca_file.as_deref()) {
        Ok(roots) => roots,
        Err(e) => {
            r.fail(
                "tls",
                e,
                "install the ca-certificates package, or fix [cloud].ca_file",
            );
            return false;
        }
    };
    let Some(inner) = verifier(roots) else {
        r.fail(
            "tls",
            "no usable trusted CA certificate",
            "install the ca-certificates package",
        );
        return false;
    };
    let recorder = Arc::new(Recorder {
        inner,
        chain: Mutex::new(Vec::new()),
    });
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(recorder.clone())
                .with_no_client_auth()
        });
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            r.fail("tls", e.to_string(), "this is a bug; please report it");
            return false;
        }
    };
    let host = cfg.url.host.trim_start_matches('[').trim_end_matches(']');
    let Ok(name) = rustls::pki_types::ServerName::try_from(host.to_string()) else {
        r.fail(
            "tls",
            format!("{host} is not a valid TLS server name"),
            "check [cloud].url",
        );
        return false;
    };
    let t0 = Instant::now();
    let shake = tokio::time::timeout(
        d,
        tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name.clone(), tcp),
    )
    .await;
    let chain = recorder
        .chain
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (leaf_subject, leaf_issuer) = chain
        .first()
        .map(|c| names(c))
        .unwrap_or_else(|| ("?".into(), "?".into()));
    match shake {
        Err(_) => {
            r.fail(
                "tls",
                format!("no TLS handshake with {host} within {d:?}"),
                "something on the path accepts TCP but does not speak TLS: check the URL's port and the proxy",
            );
            false
        }
        Ok(Err(e)) if chain.is_empty() => {
            r.fail(
                "tls",
                format!("TLS handshake with {host} failed: {e}"),
                "check that the URL's port speaks HTTPS and that the proxy does not block TLS",
            );
            false
        }
        Ok(Err(e)) => {
            r.fail(
                "tls",
                format!("the certificate for {leaf_subject} issued by {leaf_issuer} is not accepted: {e}"),
                "if a proxy or firewall inspects TLS, put its CA certificate in [cloud].ca_file; otherwise check the URL",
            );
            false
        }
        Ok(Ok(_)) => {
            // Trusted. By what: a public CA, a CA someone added to this machine, or ca_file?
            let now = rustls::pki_types::UnixTime::now();
            use rustls::client::danger::ServerCertVerifier;
            let verifies_with = |roots: rustls::RootCertStore| {
                verifier(roots).is_some_and(|v| {
                    v.verify_server_cert(&chain[0], &chain[1..], &name, &[], now)
                        .is_ok()
                })
            };
            let public = public_roots();
            let took = t0.elapsed().as_millis();
            if public.clone().is_some_and(&verifies_with)
                || (public.is_none() && verifies_with(system_roots()))
            {
                r.ok(
                    "tls",
                    format!("{host} presented {leaf_subject}, issued by {leaf_issuer}, which chains to a public CA ({took} ms)"),
                );
            } else if verifies_with(system_roots()) {
                r.warn(
                    "tls",
                    format!("{host} presented a certificate issued by {leaf_issuer}, which chains to a CA added to this machine's trust store, not a public one: TLS interception?"),
                    "expected behind a TLS-inspecting proxy; otherwise find out who issued it",
                );
            } else {
                r.warn(
                    "tls",
                    format!("{host} presented a certificate issued by {leaf_issuer}, trusted only through [cloud].ca_file, not a public CA: a private cloud or TLS interception"),
                    "expected for a private cloud or a TLS-inspecting proxy; otherwise find out who issued it",
                );
            }
            true
        }
    }
}

/// Registers for real with the configured tenant and PIN, and reads the cloud's clock from the
/// answer.
async fn pin_and_clock(r: &mut Run, config: &Config, reachable: bool, running: Option<&Running>) {
    if !reachable {
        r.skip("pin", "skipped: the cloud is not reachable");
        r.skip("clock", "skipped: the cloud is not reachable");
        return;
    }
    let cfg = &config.cloud;
    let pin = match cfg.pin.read() {
        Ok(p) => p,
        Err(e) => {
            r.fail(
                "pin",
                format!("cannot read the PIN: {e}"),
                "fix [cloud].pin_file (path, permissions) or set [cloud].pin",
            );
            r.skip("clock", "skipped: no registration");
            return;
        }
    };
    let Some(d) = r.deadline(REGISTER_DEADLINE) else {
        r.out_of_time("pin");
        r.out_of_time("clock");
        return;
    };
    // The relay's own id when it can be found, so the cloud sees no stranger.
    let (relay_id, whose) = match running.and_then(|s| s.status["relay_id"].as_str()) {
        Some(id) => (id.to_string(), "the running relay's id"),
        None => match crate::store::Store::peek_relay_id(&config.state_dir) {
            Ok(Some(id)) => (id, "the relay id from the store"),
            _ => (
                format!("doctor-{}", uuid::Uuid::new_v4().simple()),
                "a throw-away relay id",
            ),
        },
    };
    let req = RegisterRequest {
        protocol: PROTOCOL_VERSION,
        tenant_id: cfg.tenant_id.clone(),
        pin: pin.expose().to_string(),
        relay_id,
        hostname: crate::ctx::hostname(),
        version: env!("CARGO_PKG_VERSION").into(),
        fqdn: config
            .edge
            .as_ref()
            .map(|e| e.fqdn.clone())
            .unwrap_or_default(),
        addresses: Vec::new(),
    };
    let body = match serde_json::to_vec(&req) {
        Ok(b) => bytes::Bytes::from(b),
        Err(e) => {
            r.fail("pin", e.to_string(), "this is a bug; please report it");
            return;
        }
    };
    let mut client = match CloudClient::new(cfg) {
        Ok(c) => c,
        Err(e) => {
            r.fail("pin", format!("{e:#}"), "fix [cloud] in the config");
            r.skip("clock", "skipped: no registration");
            return;
        }
    };
    client.connect_timeout = d;
    client.request_timeout = d;
    let sent = SystemTime::now();
    let answer = tokio::time::timeout(
        d,
        client.request_with_headers(http::Method::POST, PATH_REGISTER, None, body),
    )
    .await;
    let received = SystemTime::now();
    let (status, headers, body) = match answer {
        Err(_) | Ok(Err(cloud::CloudError::Timeout { .. })) => {
            r.fail(
                "pin",
                format!("the cloud did not answer the registration within {d:?}"),
                "the cloud or the path to it is slow or overloaded; try again, check the proxy",
            );
            r.skip("clock", "skipped: no answer from the cloud");
            return;
        }
        Ok(Err(e)) => {
            r.fail(
                "pin",
                format!("registration failed: {e}"),
                "see the tcp and tls steps above",
            );
            r.skip("clock", "skipped: no answer from the cloud");
            return;
        }
        Ok(Ok(a)) => a,
    };
    if (200..300).contains(&status) {
        r.ok(
            "pin",
            format!(
                "the cloud accepted tenant {} and its PIN (registered with {whose})",
                cfg.tenant_id
            ),
        );
    } else {
        let e = cloud::status_error(status, &body);
        match e.code() {
            Some(ErrorCode::PinRejected) => r.fail(
                "pin",
                format!("PIN rejected by cloud for tenant {}: {e}", cfg.tenant_id),
                "put the current PIN from the cloud portal in [cloud].pin_file (after a reset the old PIN works for 24 hours only)",
            ),
            Some(ErrorCode::UnknownTenant) => r.fail(
                "pin",
                format!("the cloud does not know tenant {}: {e}", cfg.tenant_id),
                "check [cloud].tenant_id against the cloud portal",
            ),
            _ => r.fail(
                "pin",
                format!("registration refused: {e}"),
                "check [cloud].url; if a proxy answers instead of the cloud, check the proxy",
            ),
        }
    }

    // Clock: the cloud's Date header (one-second resolution), else the register answer's time.
    let cloud_time = headers
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::util::time::parse_http_date)
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["server_time"].as_str().map(str::to_string))
                .and_then(|t| crate::util::time::parse_rfc3339(&t))
        });
    let Some(cloud_time) = cloud_time else {
        r.skip("clock", "the cloud's answer carries no Date header");
        return;
    };
    let midpoint = sent + received.duration_since(sent).unwrap_or_default() / 2;
    let (skew, ahead) = match midpoint.duration_since(cloud_time) {
        Ok(d) => (d, true),
        Err(e) => (e.duration(), false),
    };
    let secs = skew.as_secs();
    let words = format!(
        "this machine's clock is {secs} s {} the cloud's",
        if ahead { "ahead of" } else { "behind" }
    );
    // The Date header has one-second resolution: up to a second (plus the round trip) is noise.
    if skew > SKEW_FAIL {
        r.fail(
            "clock",
            words,
            "synchronise the clock (systemd-timesyncd or chrony); certificates and tokens depend on it",
        );
    } else if skew > SKEW_WARN {
        r.warn(
            "clock",
            words,
            "enable time synchronisation (timedatectl set-ntp true)",
        );
    } else {
        r.ok(
            "clock",
            format!("within {} s of the cloud's clock", secs.max(1)),
        );
    }
}

/// The edge's ports: free to bind, or bound by the running relay.
async fn edge_port(r: &mut Run, config: &Config, running: Option<&Running>) {
    let Some(e) = &config.edge else {
        r.skip("edge-port", "no [edge] section: no device listener");
        return;
    };
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let bound_by_relay = |key: &str, want: SocketAddr| -> bool {
        running
            .and_then(|s| s.status["edge"][key].as_str())
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .is_some_and(|a| a.port() == want.port() || want.port() == 0)
    };
    let mut addrs = vec![("listen", e.listen)];
    if let Some(l) = e.legacy_http_listen {
        addrs.push(("legacy_http_listen", l));
    }
    for (key, addr) in addrs {
        if bound_by_relay(key, addr) {
            notes.push(format!("{addr} is served by the running relay"));
            continue;
        }
        match tokio::net::TcpListener::bind(addr).await {
            Ok(_) => notes.push(format!("{addr} is free to bind")),
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
                notes.push(format!(
                    "{addr} needs CAP_NET_BIND_SERVICE (the unit grants it; this shell has not)"
                ));
            }
            Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
                problems.push(format!("{addr} is in use by another process"));
            }
            Err(err) => problems.push(format!("cannot bind {addr}: {err}")),
        }
    }
    if !problems.is_empty() {
        r.fail(
            "edge-port",
            problems.join("; "),
            "find the other listener with `ss -ltnp` and stop it, or change [edge].listen",
        );
    } else {
        r.ok("edge-port", notes.join("; "));
    }
}

/// Free space where the store and the image cache live, against `[images].max_total`.
fn disk(r: &mut Run, config: &Config) {
    let existing = |p: &Path| -> PathBuf {
        let mut p = p.to_path_buf();
        while !p.exists() {
            match p.parent() {
                Some(parent) => p = parent.to_path_buf(),
                None => break,
            }
        }
        p
    };
    let human = crate::util::bytes::human_bytes;
    let state = existing(&config.state_dir);
    let state_free = match crate::util::bytes::free_bytes(&state) {
        Ok(f) => f,
        Err(e) => {
            r.warn(
                "disk",
                format!("cannot read free space of {}: {e}", state.display()),
                "check that state_dir exists and is readable",
            );
            return;
        }
    };
    let Some(images) = &config.images else {
        if state_free < 100_000_000 {
            r.warn(
                "disk",
                format!(
                    "only {} free for the store in {}",
                    human(state_free),
                    state.display()
                ),
                "free some space on that filesystem",
            );
        } else {
            r.ok(
                "disk",
                format!("{} free in {}", human(state_free), state.display()),
            );
        }
        return;
    };
    let dir = existing(&images.dir);
    let free = crate::util::bytes::free_bytes(&dir).unwrap_or(state_free);
    let cached = dir_size(&images.dir.join("files"));
    // What the cache may still grow by, plus the reserve the download agent keeps untouched.
    let needed = images
        .max_total
        .saturating_sub(cached)
        .saturating_add(images.min_free);
    let msg = format!(
        "{} free in {}, {} cached, images may take up to {} ([images].max_total)",
        human(free),
        dir.display(),
        human(cached),
        human(images.max_total)
    );
    if free < images.min_free {
        r.fail(
            "disk",
            msg,
            "free space on that filesystem or move [images].dir: downloads stop below [images].min_free",
        );
    } else if free < needed {
        r.warn(
            "disk",
            msg,
            "the cache cannot grow to max_total: free space, move [images].dir, or lower [images].max_total",
        );
    } else {
        r.ok("disk", msg);
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn admin_socket(r: &mut Run, socket: &Path, running: Option<&Running>) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = match std::fs::metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            r.warn(
                "admin-socket",
                format!(
                    "{} does not exist: the relay is not running",
                    socket.display()
                ),
                "start it: systemctl start ucrelay (journalctl -u ucrelay says why it stopped)",
            );
            return;
        }
        Err(e) => {
            r.warn(
                "admin-socket",
                format!("cannot inspect {}: {e}", socket.display()),
                "run doctor as root or as a member of the ucrelay group",
            );
            return;
        }
    };
    if !meta.file_type().is_socket() {
        r.fail(
            "admin-socket",
            format!("{} is not a socket", socket.display()),
            "remove the file; the relay creates the socket when it starts",
        );
        return;
    }
    let mode = meta.mode() & 0o777;
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(meta.gid()))
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| meta.gid().to_string());
    let answering = if running.is_some() {
        "the relay answers on it"
    } else {
        "but no relay answered on it"
    };
    let desc = format!(
        "{} mode {mode:04o}, group {group}; {answering}",
        socket.display()
    );
    let ucrelay_group_exists = nix::unistd::Group::from_name("ucrelay")
        .ok()
        .flatten()
        .is_some();
    if mode != 0o660 {
        r.warn(
            "admin-socket",
            desc,
            "the relay sets 0660 itself; something changed it: restart the relay",
        );
    } else if ucrelay_group_exists && group != "ucrelay" {
        r.warn(
            "admin-socket",
            desc,
            "run the relay as Group=ucrelay (the packaged unit does) so admins in that group can use it",
        );
    } else if running.is_none() {
        r.warn(
            "admin-socket",
            desc,
            "a stale socket from a relay that died: systemctl restart ucrelay",
        );
    } else {
        r.ok("admin-socket", desc);
    }
}

/// Up to five devices the running relay knows, each probed with a TCP connect.
async fn devices(r: &mut Run, socket: &Path, running: Option<&Running>) {
    if running.is_none() {
        r.skip(
            "devices",
            "no device list available: the relay is not running",
        );
        return;
    }
    let Some(d) = r.deadline(DEVICE_DEADLINE) else {
        r.out_of_time("devices");
        return;
    };
    let list = tokio::time::timeout(
        d,
        super::admin::get_json::<serde_json::Value>(socket, "/v1/devices"),
    )
    .await;
    let list = match list {
        Ok(Ok(v)) => v,
        _ => {
            r.skip("devices", "no device list available");
            return;
        }
    };
    let addrs: Vec<String> = list["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|dev| dev["address"].as_str().map(str::to_string))
        .take(5)
        .collect();
    if addrs.is_empty() {
        r.skip("devices", "the relay knows no devices yet");
        return;
    }
    let Some(d) = r.deadline(DEVICE_DEADLINE) else {
        r.out_of_time("devices");
        return;
    };
    let probes = addrs.iter().map(|a| {
        let target = if a.parse::<SocketAddr>().is_ok() {
            a.clone()
        } else {
            format!("{a}:443")
        };
        async move {
            let ok = matches!(
                tokio::time::timeout(d, tokio::net::TcpStream::connect(&target)).await,
                Ok(Ok(_))
            );
            (target, ok)
        }
    });
    let results = futures_util::future::join_all(probes).await;
    let down: Vec<&str> = results
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(t, _)| t.as_str())
        .collect();
    let summary = format!(
        "{} of {} sampled devices accept connections",
        results.len() - down.len(),
        results.len()
    );
    if down.is_empty() {
        r.ok("devices", summary);
    } else {
        r.warn(
            "devices",
            format!("{summary}; unreachable: {}", down.join(", ")),
            "check that the devices are powered and that the relay's network reaches their subnets",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_shrink_to_the_budget() {
        let mut r = Run {
            started: Instant::now(),
            steps: Vec::new(),
            step_started: Instant::now(),
        };
        assert_eq!(
            r.deadline(Duration::from_secs(3)),
            Some(Duration::from_secs(3))
        );
        r.started = Instant::now() - BUDGET + Duration::from_secs(1);
        let d = r.deadline(Duration::from_secs(3)).unwrap();
        assert!(d <= Duration::from_millis(500), "{d:?}");
        r.started = Instant::now() - BUDGET;
        assert_eq!(r.deadline(Duration::from_secs(3)), None);
    }

    #[test]
    fn exit_code_counts_failures_not_warnings() {
        let mut r = Run {
            started: Instant::now(),
            steps: Vec::new(),
            step_started: Instant::now(),
        };
        r.ok("config", "fine");
        r.warn("clock", "a bit off", "sync it");
        assert_eq!(r.finish().exit_code, 0);
        let mut r = Run {
            started: Instant::now(),
            steps: Vec::new(),
            step_started: Instant::now(),
        };
        r.fail("tcp", "refused", "check it");
        let rep = r.finish();
        assert_eq!(rep.exit_code, 1);
        assert!(
            rep.render()
                .contains("fail  tcp: refused\n      fix: check it\n")
        );
    }
}
