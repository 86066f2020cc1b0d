//! Configuration: the TOML file as written (`raw`, serde, unknown fields rejected), checked by
//! `validate` into the typed `Config` the rest of the daemon uses.
//!
//! All of the file is checked before anything starts. Every error names the file, the field and what
//! is wrong with it. Runtime code never sees a raw value or a "must be set by now" `Option`.

mod raw;
mod validate;

use crate::util::secret::Secret;
use ipnet::IpNet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(120);
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);
pub const DEFAULT_PIN_RETRY_INTERVAL: Duration = Duration::from_secs(300);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(60);
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2 * 3600);
/// Commands held at once (running or waiting) before the relay answers `busy`.
pub const DEFAULT_COMMAND_QUEUE: usize = 1024;
/// Device sessions open at once, relay-wide.
pub const DEFAULT_MAX_SESSIONS: usize = 256;
/// How long finished tasks are kept.
pub const DEFAULT_TASK_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_MAX_IMAGES: u32 = 40;
pub const DEFAULT_MAX_TOTAL: u64 = 30 * 1000 * 1000 * 1000;
pub const DEFAULT_EDGE_LISTEN: &str = "0.0.0.0:443";
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Enough for a site of phones behind one NAT address, far from the whole edge.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;
pub const DEFAULT_ADMIN_SOCKET_NAME: &str = "admin.sock";
pub const DEFAULT_DEVICE_SUBNETS: [&str; 3] = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"];
pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_ARTIFACTS_MAX_TOTAL: u64 = 1000 * 1000 * 1000;
pub const DEFAULT_DEVICE_LOGS_MAX_PER_DEVICE: u64 = 100 * 1000 * 1000;
pub const DEFAULT_DEVICE_LOGS_MAX_TOTAL: u64 = 5 * 1000 * 1000 * 1000;
pub const DEFAULT_DEVICE_LOGS_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// A configuration problem: which file, which field (dotted path), and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct Error {
    pub file: PathBuf,
    /// Dotted path such as `cloud.heartbeat_interval`; empty for whole-file problems.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.message
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validated.

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from (absolute), for messages.
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub cloud: CloudConfig,
    pub admin: AdminConfig,
    pub edge: Option<EdgeConfig>,
    pub provisioning: Option<ProvisioningConfig>,
    pub images: Option<ImagesConfig>,
    pub devices: DevicesConfig,
    pub diagnostics: DiagnosticsConfig,
}

/// `[diagnostics]`: what the relay keeps for support work, and how much of it. Always in force
/// (defaults when the section is absent): artifacts wait here for upload, device logs are kept only
/// when the cloud says it does not take them.
#[derive(Debug, Clone)]
pub struct DiagnosticsConfig {
    /// Local space for artifacts waiting for upload (captures, exports); beyond it a new one is
    /// refused with a clear error.
    pub artifacts_max_total: u64,
    /// Device logs kept per device; reaching it stops collection for that device.
    pub device_logs_max_per_device: u64,
    /// Device logs kept for all devices together.
    pub device_logs_max_total: u64,
    /// How long a kept device log stays.
    pub device_logs_keep: Duration,
}

impl Default for DiagnosticsConfig {
    fn default() -> Self {
        DiagnosticsConfig {
            artifacts_max_total: DEFAULT_ARTIFACTS_MAX_TOTAL,
            device_logs_max_per_device: DEFAULT_DEVICE_LOGS_MAX_PER_DEVICE,
            device_logs_max_total: DEFAULT_DEVICE_LOGS_MAX_TOTAL,
            device_logs_keep: DEFAULT_DEVICE_LOGS_KEEP,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CloudConfig {
    pub url: CloudUrl,
    pub tenant_id: String,
    pub pin: PinSource,
    pub heartbeat_interval: Duration,
    pub proxy: Option<ProxyConfig>,
    pub ca_file: Option<PathBuf>,
    pub ping_interval: Duration,
    pub pin_retry_interval: Duration,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub reconnect_max: Duration,
    /// The addresses the relay reports to the cloud (which places it in a site by them); empty:
    /// discovered (the edge's listen addresses, else the host's interface addresses).
    pub addresses: Vec<std::net::IpAddr>,
    /// Commands from the channel held at once, running or waiting to run; one more is answered
    /// `busy` on the channel, neither stored nor acknowledged, so the cloud sends it again later.
    pub command_queue: usize,
}

/// Where the PIN comes from. A file is read again before every registration attempt, so an admin who
/// fixes it needs no restart.
#[derive(Debug, Clone)]
pub enum PinSource {
    Inline(Secret),
    File(PathBuf),
}

impl PinSource {
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            PinSource::Inline(s) => Ok(s.clone()),
            PinSource::File(p) => read_secret_file(p),
        }
    }
}

/// Largest secret file read (a PIN, a password: a few bytes in practice).
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a one-line secret file (PIN, password), trimming the trailing newline.
pub fn read_secret_file(p: &Path) -> Result<Secret, String> {
    use std::io::Read;
    let file = std::fs::File::open(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    // Bounded: a path to /dev/zero or a log file must be an error, not all of memory.
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(format!(
            "{} is larger than {MAX_SECRET_FILE} bytes; it should hold one secret",
            p.display()
        ));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", p.display()))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(format!("{} is empty", p.display()));
    }
    Ok(Secret::new(value))
}

/// A parsed `http://` or `https://` base URL.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash ("" for none).
    pub base_path: String,
}

impl CloudUrl {
    pub fn parse(s: &str) -> Result<CloudUrl, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(other) => return Err(format!("scheme {other:?} is not supported (use https://)")),
            None => return Err("missing scheme (use https://host)".into()),
        };
        let host = uri.host().filter(|h| !h.is_empty()).ok_or("missing host")?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if uri.query().is_some() {
            return Err("must not contain a query".into());
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(CloudUrl {
            tls,
            host,
            port,
            base_path,
        })
    }

    /// `host:port` as used in Host headers and CONNECT lines.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    pub fn connect_target(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{host}:{}", self.port)
    }

    pub fn path(&self, p: &str) -> String {
        format!("{}{}", self.base_path, p)
    }
}

impl fmt::Display for CloudUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.base_path)
    }
}

/// An HTTP proxy reached with CONNECT for every cloud connection.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub host: String,
    pub port: u16,
    /// `user:password` from the URL, sent as Proxy-Authorization: Basic.
    pub credentials: Option<Secret>,
}

impl ProxyConfig {
    pub fn parse(s: &str) -> Result<ProxyConfig, String> {
        let rest = s
            .strip_prefix("http://")
            .ok_or("must start with http:// (a CONNECT proxy)")?;
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err("must not contain a path".into());
        }
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((cred, hp)) => (Some(Secret::new(cred)), hp),
            None => (None, rest),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?)
            }
            _ => (hostport, 3128),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("missing host".into());
        }
        Ok(ProxyConfig {
            host: host.to_string(),
            port,
            credentials,
        })
    }

    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub socket: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub listen: SocketAddr,
    pub fqdn: Vec<String>,
    /// The local certificate. `None`: the edge waits for the certificate the cloud uploads for
    /// the tenant (kept in the state dir once it passed every rule).
    pub pfx: Option<PathBuf>,
    pub pfx_password_file: Option<PathBuf>,
    pub legacy_http_listen: Option<SocketAddr>,
    /// Open device connections at most; one more gets 503 at once.
    pub max_connections: usize,
    /// Open connections from one client address (an IPv6 client by its /64) at most.
    pub max_connections_per_ip: usize,
    /// Deadline for the TLS handshake and for each request's headers (slowloris, idle keep-alive).
    pub header_timeout: Duration,
    /// A connection that moves no byte for this long is closed.
    pub idle_timeout: Duration,
    /// Largest request head (request line + headers) in bytes.
    pub max_header_size: usize,
}

#[derive(Debug, Clone)]
pub struct ProvisioningConfig {
    pub upstream: String,
    /// Extra CA bundle for an HTTPS upstream (beside the system roots).
    pub ca_file: Option<PathBuf>,
    /// Answer deadline (response headers) before the device gets 504.
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ImagesConfig {
    pub dir: PathBuf,
    pub max_images: u32,
    pub max_total: u64,
    /// Bytes per second, shared by all downloads from the cloud.
    pub bandwidth_limit: Option<u64>,
    /// Files downloaded from the cloud at the same time.
    pub parallel: usize,
    /// Devices downloading images from the edge at the same time; more get 503 + Retry-After.
    pub max_downloads: usize,
    /// Free disk to leave untouched beside the cache, in bytes.
    pub min_free: u64,
    /// How often the manifest is fetched even without a hint from the cloud.
    pub sync_interval: Duration,
    /// Local-time window in which downloads from the cloud may run; always when absent.
    pub sync_window: Option<SyncWindow>,
}

/// A daily window in local time, `"22:00-06:00"`; it may wrap past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncWindow {
    /// Minutes after local midnight.
    pub start: u32,
    pub end: u32,
}

impl SyncWindow {
    pub fn parse(s: &str) -> Result<SyncWindow, String> {
        let hm = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let bad = || format!("{s:?} is not a window like \"22:00-06:00\" (local time)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (start, end) = (hm(a).ok_or_else(bad)?, hm(b).ok_or_else(bad)?);
        if start == end {
            return Err(format!("{s:?} is empty: start and end are the same"));
        }
        Ok(SyncWindow { start, end })
    }

    pub fn contains(&self, minute_of_day: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute_of_day)
        } else {
            minute_of_day >= self.start || minute_of_day < self.end
        }
    }

    /// Minutes until the window next opens (0 when open now).
    pub fn minutes_until_open(&self, minute_of_day: u32) -> u32 {
        if self.contains(minute_of_day) {
            0
        } else {
            (self.start + 1440 - minute_of_day) % 1440
        }
    }

    /// Minutes after local midnight, now.
    pub fn now_local() -> u32 {
        let z = jiff::ZonedDateTime::now();
        z.hour() as u32 * 60 + z.minute() as u32
    }
}

impl fmt::Display for SyncWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

#[derive(Debug, Clone)]
pub struct DevicesConfig {
    /// False when relay.toml has no `[devices]` section: device commands are then answered
    /// `not_applicable` and nothing is polled.
    pub enabled: bool,
    pub subnets: Vec<IpNet>,
    pub poll_interval: Duration,
    pub admin_password: Option<Secret>,
    /// `https` (default) or `http` for the device REST API.
    pub scheme: DeviceScheme,
    /// Verify device certificates against this CA. Absent (default): not verified, since phones
    /// present vendor-signed certificates named after their MAC, not their address.
    pub ca_file: Option<PathBuf>,
    /// Deadline for one REST request to a device (connect, TLS, answer).
    pub request_timeout: Duration,
    /// Devices polled at once.
    pub poll_concurrency: usize,
    /// Task targets worked on at once (a task may ask for fewer).
    pub task_concurrency: usize,
    /// Deadline for one target of a task (all its requests together).
    pub target_timeout: Duration,
    /// Poll known devices every `poll_interval` (default on).
    pub monitoring: bool,
    /// How often each device's CPU and memory (`device/stats`) are read, apart from status polls.
    pub stats_interval: Duration,
    /// How a device's TLS certificate is checked before the admin password is sent.
    pub identity: DeviceIdentity,
    /// Device sessions (connections) open at once across commands, tasks and polls.
    pub max_sessions: usize,
    /// Finished tasks (and their per-target results) are forgotten this long after they ended.
    pub task_retention: Duration,
}

/// `[devices].identity`: what the relay checks of a device's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceIdentity {
    /// Trust on first use: the key a device presents first is pinned; a different key later is
    /// refused in the handshake, before any credentials are sent (the SSH model).
    Tofu,
    /// The chain must lead to `ca_file` (the name is not checked: device certificates name the MAC).
    Ca,
    /// Any certificate (the handshake signature is still checked). Also what plain HTTP gets.
    Off,
}

impl DeviceIdentity {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceIdentity::Tofu => "tofu",
            DeviceIdentity::Ca => "ca",
            DeviceIdentity::Off => "off",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceScheme {
    Https,
    Http,
}

impl DevicesConfig {
    /// True when `ip` is inside one of the configured device subnets.
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.subnets.iter().any(|n| n.contains(&ip))
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string(&abs).map_err(|e| Error {
            file: abs.clone(),
            field: String::new(),
            message: format!("cannot read config: {e}"),
        })?;
        Config::from_str_at(&text, &abs)
    }

    /// Parses and validates config text as if read from `path` (relative paths resolve against its
    /// directory). Pure apart from checking that referenced secret files are readable.
    pub fn from_str_at(text: &str, path: &Path) -> Result<Config, Error> {
        validate::config(text, path)
    }
}

/// Parses sizes like "30GB", "512MiB", "1024" (bytes). Decimal units are powers of 1000, binary ones
/// of 1024.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"30GB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        "t" | "tb" => 1000u64.pow(4),
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} must be at least one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
state_dir = "/var/lib/ucrelay"
[cloud]
url = "https://cloud.example.com"
tenant_id = "acme"
pin = "123456"
"#;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::from_str_at(text, Path::new("/etc/ucrelay/relay.toml"))
    }

    fn field_of(text: &str) -> String {
        parse(text).expect_err("config should be rejected").field
    }

    #[test]
    fn a_secret_file_is_read_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("pin");
        std::fs::write(&ok, "123456\n").unwrap();
        assert_eq!(read_secret_file(&ok).unwrap().expose(), "123456");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'7'; MAX_SECRET_FILE as usize + 1]).unwrap();
        let e = read_secret_file(&big).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
        // An endless file ends at the bound too.
        let e = read_secret_file(Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.cloud.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
        assert_eq!(
            c.cloud.url,
            CloudUrl {
                tls: true,
                host: "cloud.example.com".into(),
                port: 443,
                base_path: "".into()
            }
        );
        assert_eq!(c.admin.socket, PathBuf::from("/var/lib/ucrelay/admin.sock"));
        assert!(c.edge.is_none() && c.images.is_none() && c.provisioning.is_none());
        assert_eq!(c.devices.subnets.len(), 3);
    }

    #[test]
    fn full_brief_shape_parses() {
        let text = r#"
state_dir = "state"
[cloud]
url = "http://127.0.0.1:8080/base/"
tenant_id = "acme"
pin = "1"
heartbeat_interval = "5s"
proxy = "http://user:pw@proxy.corp:3128"
[admin]
socket = "/run/ucrelay/admin.sock"
metrics_listen = "127.0.0.1:9464"
[edge]
listen = "0.0.0.0:443"
fqdn = ["relay1.corp.example"]
pfx = "relay.pfx"
pfx_password_file = "/etc/ucrelay/relay.pfx.pass"
legacy_http_listen = "0.0.0.0:80"
[provisioning]
upstream = "https://acme.prov.cloud.example.com"
[images]
max_images = 40
max_total = "30GB"
bandwidth_limit = "20MB/s"
[devices]
subnets = ["10.0.0.0/8", "127.0.0.0/8"]
poll_interval = "2h"
admin_password = "789"
"#;
        let c = parse(text).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/etc/ucrelay/state"));
        assert_eq!(c.cloud.url.base_path, "/base");
        assert_eq!(
            c.cloud.url.path("/relay/v1/register"),
            "/base/relay/v1/register"
        );
        assert_eq!(c.cloud.url.authority(), "127.0.0.1:8080");
        let p = c.cloud.proxy.unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(p.credentials.unwrap().expose(), "user:pw");
        assert_eq!(
            c.edge.unwrap().pfx,
            Some(PathBuf::from("/etc/ucrelay/relay.pfx"))
        );
        let i = c.images.unwrap();
        assert_eq!(
            (i.max_total, i.bandwidth_limit),
            (30_000_000_000, Some(20_000_000))
        );
        assert_eq!(c.devices.poll_interval, Duration::from_secs(7200));
    }

    #[test]
    fn each_error_names_its_field() {
        let cases: &[(&str, &str)] = &[
            ("heartbeat_interval = \"2x\"", "cloud.heartbeat_interval"),
            ("heartbeat_interval = 5", "cloud.heartbeat_interval"),
            ("hearbeat_interval = \"5s\"", "cloud.hearbeat_interval"),
            ("proxy = \"socks5://x\"", "cloud.proxy"),
            ("ping_interval = \"0s\"", "cloud.ping_interval"),
            ("pin_file = \"/nonexistent/pin\"", "cloud.pin"),
            ("addresses = [\"10.0.0.300\"]", "cloud.addresses[0]"),
            (
                "addresses = [\"10.0.0.1\", \"relay.corp\"]",
                "cloud.addresses[1]",
            ),
            ("addresses = \"10.0.0.1\"", "cloud.addresses"),
        ];
        for (line, field) in cases {
            let text = MINIMAL.replace("pin = \"123456\"", &format!("pin = \"123456\"\n{line}"));
            assert_eq!(&field_of(&text), field, "for {line}");
        }
        assert_eq!(
            field_of(&MINIMAL.replace("https://cloud", "ftp://cloud")),
            "cloud.url"
        );
        assert_eq!(
            field_of(&MINIMAL.replace("acme", "ac me")),
            "cloud.tenant_id"
        );
        assert_eq!(
            field_of(&MINIMAL.replace("pin = \"123456\"", "")),
            "cloud.pin"
        );
        assert_eq!(
            field_of(&MINIMAL.replace("pin = \"123456\"", "pin_file = \"/nonexistent/pin\"")),
            "cloud.pin_file"
        );
        assert_eq!(
            field_of(&format!(
                "{MINIMAL}\n[edge]\nfqdn = [\"10.0.0.1\"]\npfx = \"x.pfx\"\n"
            )),
            "edge.fqdn[0]"
        );
        assert_eq!(
            field_of(&format!("{MINIMAL}\n[edge]\nfqdn = []\npfx = \"x.pfx\"\n")),
            "edge.fqdn"
        );
        assert_eq!(
            field_of(&format!("{MINIMAL}\n[images]\nmax_total = \"lots\"\n")),
            "images.max_total"
        );
        assert_eq!(
            field_of(&format!(
                "{MINIMAL}\n[devices]\nsubnets = [\"10.0.0.0/33\"]\n"
            )),
            "devices.subnets[0]"
        );
        assert_eq!(field_of(&format!("{MINIMAL}\n[bogus]\nx = 1\n")), "bogus");
        assert_eq!(
            field_of(&MINIMAL.replace("state_dir", "state_dri")),
            "state_dri"
        );
        let e = parse(&MINIMAL.replace("tenant_id = \"acme\"", "")).unwrap_err();
        assert!(e.message.contains("tenant_id"), "{e}");
    }

    #[test]
    fn fleet_keys() {
        // An [edge] without pfx waits for the cloud's certificate; addresses are reported as given.
        let c = parse(&format!(
            "{}\n[edge]\nfqdn = [\"relay.corp.example\"]\n",
            MINIMAL.replace(
                "pin = \"123456\"",
                "pin = \"123456\"\naddresses = [\"10.1.2.3\", \"fd00::5\"]"
            )
        ))
        .unwrap();
        let e = c.edge.unwrap();
        assert_eq!(e.pfx, None);
        assert_eq!(
            c.cloud.addresses,
            vec![
                "10.1.2.3".parse::<std::net::IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        // A password file without a pfx means nothing: named as the field to fix.
        assert_eq!(
            field_of(&format!(
                "{MINIMAL}\n[edge]\nfqdn = [\"relay.corp.example\"]\npfx_password_file = \"/etc/ucrelay/p\"\n"
            )),
            "edge.pfx_password_file"
        );
        assert!(parse(MINIMAL).unwrap().cloud.addresses.is_empty());
    }

    #[test]
    fn device_identity_and_limits() {
        let dev = |extra: &str| parse(&format!("{MINIMAL}\n[devices]\n{extra}\n"));
        let c = dev("").unwrap();
        assert_eq!(
            c.devices.identity,
            DeviceIdentity::Tofu,
            "pinned by default"
        );
        assert_eq!(c.devices.max_sessions, DEFAULT_MAX_SESSIONS);
        assert_eq!(c.devices.task_retention, DEFAULT_TASK_RETENTION);
        assert_eq!(c.cloud.command_queue, DEFAULT_COMMAND_QUEUE);
        assert_eq!(
            dev("scheme = \"http\"").unwrap().devices.identity,
            DeviceIdentity::Off,
            "plain HTTP has no identity"
        );
        assert_eq!(
            dev("identity = \"off\"").unwrap().devices.identity,
            DeviceIdentity::Off
        );
        let c = dev("task_retention = \"2s\"\nmax_sessions = 4").unwrap();
        assert_eq!(c.devices.task_retention, Duration::from_secs(2));
        assert_eq!(c.devices.max_sessions, 4);
        for (extra, field, says) in [
            ("identity = \"trust\"", "devices.identity", "not"),
            ("identity = \"ca\"", "devices.identity", "ca_file"),
            (
                "identity = \"tofu\"\nscheme = \"http\"",
                "devices.identity",
                "plain HTTP",
            ),
            ("max_sessions = 0", "devices.max_sessions", "out of range"),
            (
                "task_retention = \"0s\"",
                "devices.task_retention",
                "out of range",
            ),
        ] {
            let e = dev(extra).unwrap_err();
            assert_eq!(e.field, field, "{extra}");
            assert!(e.message.contains(says), "{extra}: {e}");
        }
        let e = parse(&MINIMAL.replace("pin = \"123456\"", "pin = \"123456\"\ncommand_queue = 0"))
            .unwrap_err();
        assert_eq!(e.field, "cloud.command_queue");
    }

    #[test]
    fn malformed_toml_reports_line() {
        let e = parse("state_dir = \"x\"\n[cloud\n").unwrap_err();
        assert!(e.message.contains("line 2"), "{e}");
        assert!(
            e.to_string().starts_with("/etc/ucrelay/relay.toml: "),
            "{e}"
        );
    }

    #[test]
    fn sync_windows() {
        let w = SyncWindow::parse("22:00-06:00").unwrap();
        assert!(
            w.contains(23 * 60)
                && w.contains(5 * 60 + 59)
                && !w.contains(6 * 60)
                && !w.contains(12 * 60)
        );
        assert_eq!(w.minutes_until_open(21 * 60), 60);
        assert_eq!(w.minutes_until_open(23 * 60), 0);
        let day = SyncWindow::parse("09:30-17:00").unwrap();
        assert!(day.contains(9 * 60 + 30) && !day.contains(17 * 60));
        assert_eq!(day.minutes_until_open(18 * 60), 15 * 60 + 30);
        assert_eq!(day.to_string(), "09:30-17:00");
        for bad in ["22-06", "25:00-01:00", "10:00-10:00", "x"] {
            assert!(SyncWindow::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("30GB").unwrap(), 30_000_000_000);
        assert_eq!(parse_bytes("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("1.5 kb").unwrap(), 1500);
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("0.5").is_err(), "rounds to zero bytes");
        assert!(parse_bytes("10 parsecs").is_err());
    }

    #[test]
    fn proxy_urls() {
        assert!(ProxyConfig::parse("https://p:1").is_err());
        let p = ProxyConfig::parse("http://[::1]:8888").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.address()),
            ("::1", 8888, "[::1]:8888".to_string())
        );
        assert_eq!(ProxyConfig::parse("http://proxy").unwrap().port, 3128);
    }
}
