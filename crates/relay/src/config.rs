//! Configuration: the TOML file as written (`Raw*`, serde, unknown fields rejected) and the validated
//! `Config` the rest of the daemon uses.
//!
//! All of the file is checked before anything starts. Every error names the file, the field and what
//! is wrong with it. Runtime code never sees a raw value or a "must be set by now" `Option`.

use crate::util::secret::Secret;
use ipnet::IpNet;
use serde::Deserialize;
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
pub const DEFAULT_MAX_IMAGES: u32 = 40;
pub const DEFAULT_MAX_TOTAL: u64 = 30 * 1000 * 1000 * 1000;
pub const DEFAULT_EDGE_LISTEN: &str = "0.0.0.0:443";
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_ADMIN_SOCKET_NAME: &str = "admin.sock";
pub const DEFAULT_DEVICE_SUBNETS: [&str; 3] = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"];

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
// Raw: the file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: PathBuf,
    cloud: RawCloud,
    admin: Option<RawAdmin>,
    edge: Option<RawEdge>,
    provisioning: Option<RawProvisioning>,
    images: Option<RawImages>,
    devices: Option<RawDevices>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloud {
    url: String,
    tenant_id: String,
    pin: Option<String>,
    pin_file: Option<PathBuf>,
    heartbeat_interval: Option<String>,
    proxy: Option<String>,
    ca_file: Option<PathBuf>,
    ping_interval: Option<String>,
    pin_retry_interval: Option<String>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    reconnect_max: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    socket: Option<PathBuf>,
    metrics_listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdge {
    listen: Option<String>,
    fqdn: Vec<String>,
    pfx: PathBuf,
    pfx_password_file: Option<PathBuf>,
    legacy_http_listen: Option<String>,
    max_connections: Option<usize>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_header_size: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvisioning {
    upstream: String,
    ca_file: Option<PathBuf>,
    timeout: Option<String>,
    connect_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImages {
    dir: Option<PathBuf>,
    max_images: Option<u32>,
    max_total: Option<String>,
    bandwidth_limit: Option<String>,
    parallel: Option<usize>,
    max_downloads: Option<usize>,
    min_free: Option<String>,
    sync_interval: Option<String>,
    sync_window: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevices {
    subnets: Option<Vec<String>>,
    poll_interval: Option<String>,
    admin_password: Option<String>,
    admin_password_file: Option<PathBuf>,
    scheme: Option<String>,
    ca_file: Option<PathBuf>,
    request_timeout: Option<String>,
    poll_concurrency: Option<usize>,
    task_concurrency: Option<usize>,
    target_timeout: Option<String>,
    monitoring: Option<bool>,
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

/// Reads a one-line secret file (PIN, password), trimming the trailing newline.
pub fn read_secret_file(p: &Path) -> Result<Secret, String> {
    let text =
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
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
    pub pfx: PathBuf,
    pub pfx_password_file: Option<PathBuf>,
    pub legacy_http_listen: Option<SocketAddr>,
    /// Open device connections at most; one more gets 503 at once.
    pub max_connections: usize,
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
        let err = |field: &str, message: String| Error {
            file: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let de =
            toml::de::Deserializer::parse(text).map_err(|e| err("", toml_message(text, &e)))?;
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let message = toml_message(text, &inner);
            // Name an unknown key by its full dotted path, whatever form serde reports it in.
            match unknown_field_name(inner.message()) {
                Some(name) if field == "." || field.is_empty() => {
                    err(&name, "unknown field".into())
                }
                Some(name) if field == name || field.ends_with(&format!(".{name}")) => {
                    err(&field, "unknown field".into())
                }
                Some(name) => err(&format!("{field}.{name}"), "unknown field".into()),
                None => err(if field == "." { "" } else { &field }, message),
            }
        })?;
        let base = path.parent().unwrap_or(Path::new("/"));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        if raw.state_dir.as_os_str().is_empty() {
            return Err(err("state_dir", "must not be empty".into()));
        }
        let state_dir = resolve(&raw.state_dir);

        // [cloud]
        let c = raw.cloud;
        let url = CloudUrl::parse(&c.url).map_err(|m| err("cloud.url", m))?;
        if c.tenant_id.is_empty() {
            return Err(err("cloud.tenant_id", "must not be empty".into()));
        }
        if !c
            .tenant_id
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            || c.tenant_id.len() > 128
        {
            return Err(err(
                "cloud.tenant_id",
                "may only contain letters, digits, '-', '_' and '.' (at most 128)".into(),
            ));
        }
        let pin = match (c.pin, c.pin_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "cloud.pin",
                    "set either pin or pin_file, not both".into(),
                ));
            }
            (None, None) => return Err(err("cloud.pin", "missing: set pin or pin_file".into())),
            (Some(p), None) if p.trim().is_empty() => {
                return Err(err("cloud.pin", "must not be empty".into()));
            }
            (Some(p), None) => PinSource::Inline(Secret::new(p.trim())),
            (None, Some(f)) => {
                let f = resolve(&f);
                read_secret_file(&f).map_err(|m| err("cloud.pin_file", m))?;
                PinSource::File(f)
            }
        };
        let dur =
            |field: &str, v: &Option<String>, default: Duration, min: Duration, max: Duration| {
                let Some(s) = v else { return Ok(default) };
                let d = humantime::parse_duration(s).map_err(|e| {
                    err(
                        field,
                        format!("invalid duration {s:?}: {e} (use e.g. \"30s\", \"2m\")"),
                    )
                })?;
                if d < min || d > max {
                    return Err(err(
                        field,
                        format!(
                            "{s:?} is out of range ({} to {})",
                            humantime::format_duration(min),
                            humantime::format_duration(max)
                        ),
                    ));
                }
                Ok(d)
            };
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        let cloud = CloudConfig {
            url,
            tenant_id: c.tenant_id,
            pin,
            heartbeat_interval: dur(
                "cloud.heartbeat_interval",
                &c.heartbeat_interval,
                DEFAULT_HEARTBEAT_INTERVAL,
                ms(100),
                secs(3600),
            )?,
            proxy: c
                .proxy
                .as_deref()
                .map(ProxyConfig::parse)
                .transpose()
                .map_err(|m| err("cloud.proxy", m))?,
            ca_file: c.ca_file.map(|p| resolve(&p)),
            ping_interval: dur(
                "cloud.ping_interval",
                &c.ping_interval,
                DEFAULT_PING_INTERVAL,
                ms(50),
                secs(300),
            )?,
            pin_retry_interval: dur(
                "cloud.pin_retry_interval",
                &c.pin_retry_interval,
                DEFAULT_PIN_RETRY_INTERVAL,
                ms(100),
                secs(24 * 3600),
            )?,
            connect_timeout: dur(
                "cloud.connect_timeout",
                &c.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
                ms(50),
                secs(120),
            )?,
            request_timeout: dur(
                "cloud.request_timeout",
                &c.request_timeout,
                DEFAULT_REQUEST_TIMEOUT,
                ms(50),
                secs(600),
            )?,
            reconnect_max: dur(
                "cloud.reconnect_max",
                &c.reconnect_max,
                DEFAULT_RECONNECT_MAX,
                ms(100),
                secs(3600),
            )?,
        };
        if let Some(ca) = &cloud.ca_file {
            check_pem_certs(ca).map_err(|m| err("cloud.ca_file", m))?;
        }

        // [admin]
        let admin = match raw.admin {
            None => AdminConfig {
                socket: state_dir.join(DEFAULT_ADMIN_SOCKET_NAME),
                metrics_listen: None,
            },
            Some(a) => AdminConfig {
                socket: a
                    .socket
                    .map(|p| resolve(&p))
                    .unwrap_or_else(|| state_dir.join(DEFAULT_ADMIN_SOCKET_NAME)),
                metrics_listen: a
                    .metrics_listen
                    .map(|s| parse_addr(&s))
                    .transpose()
                    .map_err(|m| err("admin.metrics_listen", m))?,
            },
        };

        // [edge]
        let edge = match raw.edge {
            None => None,
            Some(e) => {
                if e.fqdn.is_empty() {
                    return Err(err(
                        "edge.fqdn",
                        "must list at least one FQDN the devices use".into(),
                    ));
                }
                for (i, name) in e.fqdn.iter().enumerate() {
                    validate_fqdn(name).map_err(|m| err(&format!("edge.fqdn[{i}]"), m))?;
                }
                Some(EdgeConfig {
                    listen: parse_addr(e.listen.as_deref().unwrap_or(DEFAULT_EDGE_LISTEN))
                        .map_err(|m| err("edge.listen", m))?,
                    fqdn: e.fqdn,
                    pfx: resolve(&e.pfx),
                    pfx_password_file: e.pfx_password_file.map(|p| resolve(&p)),
                    legacy_http_listen: e
                        .legacy_http_listen
                        .map(|s| parse_addr(&s))
                        .transpose()
                        .map_err(|m| err("edge.legacy_http_listen", m))?,
                    max_connections: match e.max_connections {
                        None => DEFAULT_MAX_CONNECTIONS,
                        Some(0) => {
                            return Err(err("edge.max_connections", "must be at least 1".into()));
                        }
                        Some(n) => n,
                    },
                    header_timeout: dur(
                        "edge.header_timeout",
                        &e.header_timeout,
                        secs(10),
                        ms(50),
                        secs(300),
                    )?,
                    idle_timeout: dur(
                        "edge.idle_timeout",
                        &e.idle_timeout,
                        secs(60),
                        ms(100),
                        secs(3600),
                    )?,
                    max_header_size: match &e.max_header_size {
                        None => 16 * 1024,
                        Some(v) => {
                            let n = parse_bytes(v).map_err(|m| err("edge.max_header_size", m))?;
                            if !(8192..=1 << 20).contains(&n) {
                                return Err(err(
                                    "edge.max_header_size",
                                    format!("{v:?} must be between 8KiB and 1MiB"),
                                ));
                            }
                            n as usize
                        }
                    },
                })
            }
        };

        // [provisioning]
        let provisioning = match raw.provisioning {
            None => None,
            Some(p) => {
                CloudUrl::parse(&p.upstream).map_err(|m| err("provisioning.upstream", m))?;
                let ca_file = p.ca_file.map(|f| resolve(&f));
                if let Some(ca) = &ca_file {
                    check_pem_certs(ca).map_err(|m| err("provisioning.ca_file", m))?;
                }
                Some(ProvisioningConfig {
                    upstream: p.upstream,
                    ca_file,
                    timeout: dur(
                        "provisioning.timeout",
                        &p.timeout,
                        secs(30),
                        ms(50),
                        secs(600),
                    )?,
                    connect_timeout: dur(
                        "provisioning.connect_timeout",
                        &p.connect_timeout,
                        secs(5),
                        ms(50),
                        secs(60),
                    )?,
                })
            }
        };

        // [images]
        let images = match raw.images {
            None => None,
            Some(i) => {
                let max_images = i.max_images.unwrap_or(DEFAULT_MAX_IMAGES);
                if max_images == 0 {
                    return Err(err("images.max_images", "must be at least 1".into()));
                }
                let max_total = match &i.max_total {
                    None => DEFAULT_MAX_TOTAL,
                    Some(s) => parse_bytes(s).map_err(|m| err("images.max_total", m))?,
                };
                let bandwidth_limit = match &i.bandwidth_limit {
                    None => None,
                    Some(s) => {
                        let per = s
                            .strip_suffix("/s")
                            .or_else(|| s.strip_suffix("/S"))
                            .ok_or("")
                            .map_err(|_| {
                                err(
                                    "images.bandwidth_limit",
                                    format!("{s:?} must be a rate such as \"20MB/s\""),
                                )
                            })?;
                        Some(parse_bytes(per).map_err(|m| err("images.bandwidth_limit", m))?)
                    }
                };
                Some(ImagesConfig {
                    dir: i
                        .dir
                        .map(|p| resolve(&p))
                        .unwrap_or_else(|| state_dir.join("images")),
                    max_images,
                    max_total,
                    bandwidth_limit,
                    parallel: match i.parallel {
                        None => 2,
                        Some(n @ 1..=16) => n,
                        Some(_) => {
                            return Err(err("images.parallel", "must be between 1 and 16".into()));
                        }
                    },
                    max_downloads: match i.max_downloads {
                        None => 1000,
                        Some(0) => {
                            return Err(err("images.max_downloads", "must be at least 1".into()));
                        }
                        Some(n) => n,
                    },
                    min_free: match &i.min_free {
                        None => 512 * 1000 * 1000,
                        Some(v) => parse_bytes(v).map_err(|m| err("images.min_free", m))?,
                    },
                    sync_window: i
                        .sync_window
                        .as_deref()
                        .map(SyncWindow::parse)
                        .transpose()
                        .map_err(|m| err("images.sync_window", m))?,
                    sync_interval: dur(
                        "images.sync_interval",
                        &i.sync_interval,
                        secs(3600),
                        secs(1),
                        secs(7 * 24 * 3600),
                    )?,
                })
            }
        };

        // [devices]
        let devices = {
            let enabled = raw.devices.is_some();
            let d = raw.devices.unwrap_or(RawDevices {
                subnets: None,
                poll_interval: None,
                admin_password: None,
                admin_password_file: None,
                scheme: None,
                ca_file: None,
                request_timeout: None,
                poll_concurrency: None,
                task_concurrency: None,
                target_timeout: None,
                monitoring: None,
            });
            let subnets = match d.subnets {
                None => DEFAULT_DEVICE_SUBNETS
                    .iter()
                    .map(|s| s.parse().expect("default subnets are valid"))
                    .collect(),
                Some(list) => {
                    let mut out = Vec::new();
                    for (i, s) in list.iter().enumerate() {
                        out.push(s.parse::<IpNet>().map_err(|e| {
                            err(
                                &format!("devices.subnets[{i}]"),
                                format!("{s:?} is not a CIDR: {e}"),
                            )
                        })?);
                    }
                    out
                }
            };
            let admin_password = match (d.admin_password, d.admin_password_file) {
                (Some(_), Some(_)) => {
                    return Err(err(
                        "devices.admin_password",
                        "set either admin_password or admin_password_file, not both".into(),
                    ));
                }
                (Some(p), None) => Some(Secret::new(p)),
                (None, Some(f)) => Some(
                    read_secret_file(&resolve(&f))
                        .map_err(|m| err("devices.admin_password_file", m))?,
                ),
                (None, None) => None,
            };
            let scheme = match d.scheme.as_deref() {
                None | Some("https") => DeviceScheme::Https,
                Some("http") => DeviceScheme::Http,
                Some(other) => {
                    return Err(err(
                        "devices.scheme",
                        format!("{other:?} is not \"https\" or \"http\""),
                    ));
                }
            };
            let ca_file = d.ca_file.map(|f| resolve(&f));
            if let Some(ca) = &ca_file {
                check_pem_certs(ca).map_err(|m| err("devices.ca_file", m))?;
            }
            let count = |field: &str, v: Option<usize>, default: usize, max: usize| match v {
                None => Ok(default),
                Some(n) if (1..=max).contains(&n) => Ok(n),
                Some(n) => Err(err(field, format!("{n} is out of range (1 to {max})"))),
            };
            DevicesConfig {
                enabled,
                subnets,
                poll_interval: dur(
                    "devices.poll_interval",
                    &d.poll_interval,
                    DEFAULT_POLL_INTERVAL,
                    secs(1),
                    secs(7 * 24 * 3600),
                )?,
                admin_password,
                scheme,
                ca_file,
                request_timeout: dur(
                    "devices.request_timeout",
                    &d.request_timeout,
                    secs(10),
                    ms(100),
                    secs(300),
                )?,
                poll_concurrency: count("devices.poll_concurrency", d.poll_concurrency, 64, 4096)?,
                task_concurrency: count("devices.task_concurrency", d.task_concurrency, 256, 4096)?,
                target_timeout: dur(
                    "devices.target_timeout",
                    &d.target_timeout,
                    secs(60),
                    ms(100),
                    secs(3600),
                )?,
                monitoring: d.monitoring.unwrap_or(true),
            }
        };

        Ok(Config {
            path: path.to_path_buf(),
            state_dir,
            cloud,
            admin,
            edge,
            provisioning,
            images,
            devices,
        })
    }
}

fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{msg} (line {line})")
        }
        None => msg,
    }
}

/// Extracts `name` from serde's "unknown field `name`, expected ...".
fn unknown_field_name(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// A CA bundle must be a readable PEM file with at least one certificate.
fn check_pem_certs(path: &Path) -> Result<(), String> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut n = 0;
    for cert in iter {
        cert.map_err(|e| format!("{}: not a PEM certificate bundle: {e}", path.display()))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(())
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an address like 0.0.0.0:443"))
}

fn validate_fqdn(name: &str) -> Result<(), String> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{name:?} is an IP address; devices must use a DNS name"
        ));
    }
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid DNS name"))
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
        assert_eq!(c.edge.unwrap().pfx, PathBuf::from("/etc/ucrelay/relay.pfx"));
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
