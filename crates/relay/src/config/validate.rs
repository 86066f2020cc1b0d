//! From the file as written to the typed `Config`: one function per section, each returning the
//! first problem it finds as an [`Error`] that names the field. Relative paths resolve against the
//! config file's directory; secret files and CA bundles are opened, so a path that cannot be read is
//! a config error, not a surprise at run time.

use super::raw::{
    RawAdmin, RawCloud, RawConfig, RawDevices, RawDiagnostics, RawEdge, RawImages, RawProvisioning,
};
use super::*;

type Result<T> = std::result::Result<T, Error>;

/// What every section's checks share: where the file is, for errors and relative paths.
struct Check<'a> {
    path: &'a Path,
    base: &'a Path,
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

impl Check<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error {
            file: self.path.to_path_buf(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// A humantime duration within `min..=max`, or `default` when absent.
    fn duration(
        &self,
        field: &str,
        v: &Option<String>,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Result<Duration> {
        let Some(s) = v else { return Ok(default) };
        let d = humantime::parse_duration(s).map_err(|e| {
            self.err(
                field,
                format!("invalid duration {s:?}: {e} (use e.g. \"30s\", \"2m\")"),
            )
        })?;
        if d < min || d > max {
            return Err(self.err(
                field,
                format!(
                    "{s:?} is out of range ({} to {})",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            ));
        }
        Ok(d)
    }

    /// A count within `1..=max`, or `default` when absent.
    fn count(&self, field: &str, v: Option<usize>, default: usize, max: usize) -> Result<usize> {
        match v {
            None => Ok(default),
            Some(n) if (1..=max).contains(&n) => Ok(n),
            Some(n) => Err(self.err(field, format!("{n} is out of range (1 to {max})"))),
        }
    }

    /// A CA bundle path, resolved and checked to hold PEM certificates.
    fn ca_file(&self, field: &str, p: Option<PathBuf>) -> Result<Option<PathBuf>> {
        let Some(p) = p else { return Ok(None) };
        let p = self.resolve(&p);
        check_pem_certs(&p).map_err(|m| self.err(field, m))?;
        Ok(Some(p))
    }

    fn addr(&self, field: &str, s: &str) -> Result<SocketAddr> {
        parse_addr(s).map_err(|m| self.err(field, m))
    }

    fn bytes(&self, field: &str, s: &str) -> Result<u64> {
        parse_bytes(s).map_err(|m| self.err(field, m))
    }
}

/// Parses and validates config text as if read from `path`.
pub(super) fn config(text: &str, path: &Path) -> Result<Config> {
    let base = path.parent().unwrap_or(Path::new("/"));
    let v = Check { path, base };
    let raw = parse(&v, text)?;
    if raw.state_dir.as_os_str().is_empty() {
        return Err(v.err("state_dir", "must not be empty"));
    }
    let state_dir = v.resolve(&raw.state_dir);
    Ok(Config {
        path: path.to_path_buf(),
        cloud: cloud(&v, raw.cloud)?,
        admin: admin(&v, raw.admin, &state_dir)?,
        edge: raw.edge.map(|e| edge(&v, e)).transpose()?,
        provisioning: raw.provisioning.map(|p| provisioning(&v, p)).transpose()?,
        images: raw.images.map(|i| images(&v, i, &state_dir)).transpose()?,
        devices: devices(&v, raw.devices)?,
        diagnostics: diagnostics(&v, raw.diagnostics)?,
        state_dir,
    })
}

/// The TOML, deserialised; an unknown key is named by its full dotted path.
fn parse(v: &Check, text: &str) -> Result<RawConfig> {
    let de = toml::de::Deserializer::parse(text).map_err(|e| v.err("", toml_message(text, &e)))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let message = toml_message(text, &inner);
        match unknown_field_name(inner.message()) {
            Some(name) if field == "." || field.is_empty() => v.err(&name, "unknown field"),
            Some(name) if field == name || field.ends_with(&format!(".{name}")) => {
                v.err(&field, "unknown field")
            }
            Some(name) => v.err(&format!("{field}.{name}"), "unknown field"),
            None => v.err(if field == "." { "" } else { &field }, message),
        }
    })
}

fn cloud(v: &Check, c: RawCloud) -> Result<CloudConfig> {
    let url = CloudUrl::parse(&c.url).map_err(|m| v.err("cloud.url", m))?;
    if c.tenant_id.is_empty() {
        return Err(v.err("cloud.tenant_id", "must not be empty"));
    }
    if !c
        .tenant_id
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        || c.tenant_id.len() > 128
    {
        return Err(v.err(
            "cloud.tenant_id",
            "may only contain letters, digits, '-', '_' and '.' (at most 128)",
        ));
    }
    let pin = match (c.pin, c.pin_file) {
        (Some(_), Some(_)) => {
            return Err(v.err("cloud.pin", "set either pin or pin_file, not both"));
        }
        (None, None) => return Err(v.err("cloud.pin", "missing: set pin or pin_file")),
        (Some(p), None) if p.trim().is_empty() => {
            return Err(v.err("cloud.pin", "must not be empty"));
        }
        (Some(p), None) => PinSource::Inline(Secret::new(p.trim())),
        (None, Some(f)) => {
            let f = v.resolve(&f);
            read_secret_file(&f).map_err(|m| v.err("cloud.pin_file", m))?;
            PinSource::File(f)
        }
    };
    Ok(CloudConfig {
        url,
        tenant_id: c.tenant_id,
        pin,
        heartbeat_interval: v.duration(
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
            .map_err(|m| v.err("cloud.proxy", m))?,
        ca_file: v.ca_file("cloud.ca_file", c.ca_file)?,
        ping_interval: v.duration(
            "cloud.ping_interval",
            &c.ping_interval,
            DEFAULT_PING_INTERVAL,
            ms(50),
            secs(300),
        )?,
        pin_retry_interval: v.duration(
            "cloud.pin_retry_interval",
            &c.pin_retry_interval,
            DEFAULT_PIN_RETRY_INTERVAL,
            ms(100),
            secs(24 * 3600),
        )?,
        connect_timeout: v.duration(
            "cloud.connect_timeout",
            &c.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
            ms(50),
            secs(120),
        )?,
        request_timeout: v.duration(
            "cloud.request_timeout",
            &c.request_timeout,
            DEFAULT_REQUEST_TIMEOUT,
            ms(50),
            secs(600),
        )?,
        reconnect_max: v.duration(
            "cloud.reconnect_max",
            &c.reconnect_max,
            DEFAULT_RECONNECT_MAX,
            ms(100),
            secs(3600),
        )?,
        addresses: match c.addresses {
            None => Vec::new(),
            Some(list) if list.len() > 64 => {
                return Err(v.err("cloud.addresses", "at most 64 addresses"));
            }
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    a.trim().parse::<std::net::IpAddr>().map_err(|_| {
                        v.err(
                            &format!("cloud.addresses[{i}]"),
                            format!("{a:?} is not an IP address"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        },
        command_queue: v.count(
            "cloud.command_queue",
            c.command_queue,
            DEFAULT_COMMAND_QUEUE,
            65_536,
        )?,
    })
}

fn admin(v: &Check, a: Option<RawAdmin>, state_dir: &Path) -> Result<AdminConfig> {
    let a = a.unwrap_or_default();
    Ok(AdminConfig {
        socket: a
            .socket
            .map(|p| v.resolve(&p))
            .unwrap_or_else(|| state_dir.join(DEFAULT_ADMIN_SOCKET_NAME)),
        metrics_listen: a
            .metrics_listen
            .map(|s| v.addr("admin.metrics_listen", &s))
            .transpose()?,
    })
}

fn edge(v: &Check, e: RawEdge) -> Result<EdgeConfig> {
    if e.fqdn.is_empty() {
        return Err(v.err("edge.fqdn", "must list at least one FQDN the devices use"));
    }
    for (i, name) in e.fqdn.iter().enumerate() {
        validate_fqdn(name).map_err(|m| v.err(&format!("edge.fqdn[{i}]"), m))?;
    }
    Ok(EdgeConfig {
        listen: v.addr(
            "edge.listen",
            e.listen.as_deref().unwrap_or(DEFAULT_EDGE_LISTEN),
        )?,
        fqdn: e.fqdn,
        pfx_password_file: match (&e.pfx, e.pfx_password_file) {
            (None, Some(_)) => {
                return Err(v.err(
                    "edge.pfx_password_file",
                    "is set but edge.pfx is not: set pfx too, or remove both to use the certificate uploaded in the cloud",
                ));
            }
            (_, p) => p.map(|p| v.resolve(&p)),
        },
        pfx: e.pfx.map(|p| v.resolve(&p)),
        legacy_http_listen: e
            .legacy_http_listen
            .map(|s| v.addr("edge.legacy_http_listen", &s))
            .transpose()?,
        max_connections: match e.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(0) => return Err(v.err("edge.max_connections", "must be at least 1")),
            Some(n) => n,
        },
        max_connections_per_ip: match e.max_connections_per_ip {
            None => DEFAULT_MAX_CONNECTIONS_PER_IP,
            Some(0) => return Err(v.err("edge.max_connections_per_ip", "must be at least 1")),
            Some(n) => n,
        },
        header_timeout: v.duration(
            "edge.header_timeout",
            &e.header_timeout,
            secs(10),
            ms(50),
            secs(300),
        )?,
        idle_timeout: v.duration(
            "edge.idle_timeout",
            &e.idle_timeout,
            secs(60),
            ms(100),
            secs(3600),
        )?,
        max_header_size: match &e.max_header_size {
            None => 16 * 1024,
            Some(s) => {
                let n = v.bytes("edge.max_header_size", s)?;
                if !(8192..=1 << 20).contains(&n) {
                    return Err(v.err(
                        "edge.max_header_size",
                        format!("{s:?} must be between 8KiB and 1MiB"),
                    ));
                }
                n as usize
            }
        },
    })
}

fn provisioning(v: &Check, p: RawProvisioning) -> Result<ProvisioningConfig> {
    CloudUrl::parse(&p.upstream).map_err(|m| v.err("provisioning.upstream", m))?;
    Ok(ProvisioningConfig {
        upstream: p.upstream,
        ca_file: v.ca_file("provisioning.ca_file", p.ca_file)?,
        timeout: v.duration(
            "provisioning.timeout",
            &p.timeout,
            secs(30),
            ms(50),
            secs(600),
        )?,
        connect_timeout: v.duration(
            "provisioning.connect_timeout",
            &p.connect_timeout,
            secs(5),
            ms(50),
            secs(60),
        )?,
    })
}

fn images(v: &Check, i: RawImages, state_dir: &Path) -> Result<ImagesConfig> {
    let max_images = i.max_images.unwrap_or(DEFAULT_MAX_IMAGES);
    if max_images == 0 {
        return Err(v.err("images.max_images", "must be at least 1"));
    }
    let max_total = match &i.max_total {
        None => DEFAULT_MAX_TOTAL,
        Some(s) => v.bytes("images.max_total", s)?,
    };
    let bandwidth_limit = match &i.bandwidth_limit {
        None => None,
        Some(s) => {
            let per = s
                .strip_suffix("/s")
                .or_else(|| s.strip_suffix("/S"))
                .ok_or_else(|| {
                    v.err(
                        "images.bandwidth_limit",
                        format!("{s:?} must be a rate such as \"20MB/s\""),
                    )
                })?;
            Some(v.bytes("images.bandwidth_limit", per)?)
        }
    };
    Ok(ImagesConfig {
        dir: i
            .dir
            .map(|p| v.resolve(&p))
            .unwrap_or_else(|| state_dir.join("images")),
        max_images,
        max_total,
        bandwidth_limit,
        parallel: match i.parallel {
            None => 2,
            Some(n @ 1..=16) => n,
            Some(_) => return Err(v.err("images.parallel", "must be between 1 and 16")),
        },
        max_downloads: match i.max_downloads {
            None => 1000,
            Some(0) => return Err(v.err("images.max_downloads", "must be at least 1")),
            Some(n) => n,
        },
        min_free: match &i.min_free {
            None => 512 * 1000 * 1000,
            Some(s) => v.bytes("images.min_free", s)?,
        },
        sync_window: i
            .sync_window
            .as_deref()
            .map(SyncWindow::parse)
            .transpose()
            .map_err(|m| v.err("images.sync_window", m))?,
        sync_interval: v.duration(
            "images.sync_interval",
            &i.sync_interval,
            secs(3600),
            secs(1),
            secs(7 * 24 * 3600),
        )?,
    })
}

/// `[devices]`; absent, the device plane is off but the subnets still default (the legacy listener
/// and every device check use them).
fn devices(v: &Check, d: Option<RawDevices>) -> Result<DevicesConfig> {
    let enabled = d.is_some();
    let d = d.unwrap_or_default();
    let subnets = match d.subnets {
        None => DEFAULT_DEVICE_SUBNETS
            .iter()
            .map(|s| s.parse().expect("default subnets are valid"))
            .collect(),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<IpNet>().map_err(|e| {
                    v.err(
                        &format!("devices.subnets[{i}]"),
                        format!("{s:?} is not a CIDR: {e}"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let admin_password = match (d.admin_password, d.admin_password_file) {
        (Some(_), Some(_)) => {
            return Err(v.err(
                "devices.admin_password",
                "set either admin_password or admin_password_file, not both",
            ));
        }
        (Some(p), None) => Some(Secret::new(p)),
        (None, Some(f)) => Some(
            read_secret_file(&v.resolve(&f))
                .map_err(|m| v.err("devices.admin_password_file", m))?,
        ),
        (None, None) => None,
    };
    let scheme = match d.scheme.as_deref() {
        None | Some("https") => DeviceScheme::Https,
        Some("http") => DeviceScheme::Http,
        Some(other) => {
            return Err(v.err(
                "devices.scheme",
                format!("{other:?} is not \"https\" or \"http\""),
            ));
        }
    };
    let ca_file = v.ca_file("devices.ca_file", d.ca_file)?;
    let identity = match (d.identity.as_deref(), scheme, &ca_file) {
        // Absent: pin on first use, or check the CA when one is given (what ca_file always meant).
        (None, DeviceScheme::Https, None) => DeviceIdentity::Tofu,
        (None, DeviceScheme::Https, Some(_)) => DeviceIdentity::Ca,
        (None, DeviceScheme::Http, _) => DeviceIdentity::Off,
        (Some("off"), _, None) => DeviceIdentity::Off,
        (Some(mode @ ("tofu" | "ca")), DeviceScheme::Http, _) => {
            return Err(v.err(
                "devices.identity",
                format!("{mode:?} needs scheme = \"https\": plain HTTP carries no device identity"),
            ));
        }
        (Some("tofu"), _, None) => DeviceIdentity::Tofu,
        (Some("ca"), _, Some(_)) => DeviceIdentity::Ca,
        (Some("ca"), _, None) => {
            return Err(v.err(
                "devices.identity",
                "\"ca\" needs devices.ca_file: the CA that signs the device certificates",
            ));
        }
        (Some("tofu" | "off"), _, Some(_)) => {
            return Err(v.err(
                "devices.ca_file",
                "is used only with identity = \"ca\"; remove it or set identity = \"ca\"",
            ));
        }
        (Some(other), _, _) => {
            return Err(v.err(
                "devices.identity",
                format!("{other:?} is not \"tofu\", \"ca\" or \"off\""),
            ));
        }
    };
    Ok(DevicesConfig {
        enabled,
        subnets,
        poll_interval: v.duration(
            "devices.poll_interval",
            &d.poll_interval,
            DEFAULT_POLL_INTERVAL,
            secs(1),
            secs(7 * 24 * 3600),
        )?,
        admin_password,
        scheme,
        ca_file,
        request_timeout: v.duration(
            "devices.request_timeout",
            &d.request_timeout,
            secs(10),
            ms(100),
            secs(300),
        )?,
        poll_concurrency: v.count("devices.poll_concurrency", d.poll_concurrency, 64, 4096)?,
        task_concurrency: v.count("devices.task_concurrency", d.task_concurrency, 256, 4096)?,
        target_timeout: v.duration(
            "devices.target_timeout",
            &d.target_timeout,
            secs(60),
            ms(100),
            secs(3600),
        )?,
        monitoring: d.monitoring.unwrap_or(true),
        stats_interval: v.duration(
            "devices.stats_interval",
            &d.stats_interval,
            DEFAULT_STATS_INTERVAL,
            secs(1),
            secs(7 * 24 * 3600),
        )?,
        identity,
        max_sessions: v.count(
            "devices.max_sessions",
            d.max_sessions,
            DEFAULT_MAX_SESSIONS,
            4096,
        )?,
        task_retention: v.duration(
            "devices.task_retention",
            &d.task_retention,
            DEFAULT_TASK_RETENTION,
            secs(1),
            secs(10 * 365 * 24 * 3600),
        )?,
    })
}

/// `[diagnostics]`; absent, every limit has its default.
fn diagnostics(v: &Check, d: Option<RawDiagnostics>) -> Result<DiagnosticsConfig> {
    let d = d.unwrap_or_default();
    let size = |field: &str, s: &Option<String>, default: u64, min: u64| -> Result<u64> {
        let Some(s) = s else { return Ok(default) };
        let n = v.bytes(field, s)?;
        if n < min {
            return Err(v.err(field, format!("{s:?} is too small (at least {min} bytes)")));
        }
        Ok(n)
    };
    let per_device = size(
        "diagnostics.device_logs_max_per_device",
        &d.device_logs_max_per_device,
        DEFAULT_DEVICE_LOGS_MAX_PER_DEVICE,
        1024,
    )?;
    let total = size(
        "diagnostics.device_logs_max_total",
        &d.device_logs_max_total,
        DEFAULT_DEVICE_LOGS_MAX_TOTAL,
        1024,
    )?;
    if total < per_device {
        return Err(v.err(
            "diagnostics.device_logs_max_total",
            "must be at least diagnostics.device_logs_max_per_device",
        ));
    }
    Ok(DiagnosticsConfig {
        artifacts_max_total: size(
            "diagnostics.artifacts_max_total",
            &d.artifacts_max_total,
            DEFAULT_ARTIFACTS_MAX_TOTAL,
            1024 * 1024,
        )?,
        device_logs_max_per_device: per_device,
        device_logs_max_total: total,
        device_logs_keep: v.duration(
            "diagnostics.device_logs_keep",
            &d.device_logs_keep,
            DEFAULT_DEVICE_LOGS_KEEP,
            secs(60),
            secs(366 * 24 * 3600),
        )?,
    })
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
fn check_pem_certs(path: &Path) -> std::result::Result<(), String> {
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

fn parse_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an address like 0.0.0.0:443"))
}

fn validate_fqdn(name: &str) -> std::result::Result<(), String> {
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
