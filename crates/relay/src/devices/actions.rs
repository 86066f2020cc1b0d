//! Device actions: what a device command or a task target does to one device. Each command type is
//! validated into an [`Op`] before anything is sent, then performed over one REST session. Pure
//! validation is separate from I/O, so bad parameters are answered without touching the network.

use super::DevicePlane;
use super::client::{DeviceError, Session, Target};
use crate::protocol::Outcome;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Most parameters one `get_params` may ask for (the devices' own limit).
pub const MAX_GET_PARAMS: usize = 20;
pub(crate) const MAX_SET_PARAMS: usize = 200;
pub(crate) const MAX_CONFIG_EXPORT: usize = 1024 * 1024;
/// Shortest and longest packet capture a one-click export may take, seconds.
pub const EXPORT_CAPTURE_S: std::ops::RangeInclusive<u32> = 5..=600;

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `safeReboot`, or `safeRestart` (application restart) when `restart`.
    Reboot {
        restart: bool,
    },
    Reset(ResetMode),
    Dial {
        destination: String,
        line: u32,
        kind: &'static str,
    },
    GetParams(Vec<String>),
    SetParams(BTreeMap<String, String>),
    GetConfig(ConfigSource),
    CaptureScreen {
        screen: String,
    },
    PacketCapture(Capture),
    /// `check_sync`, and `upgrade` (a check-sync after which the device must run `expect_firmware`).
    CheckSync {
        expect_firmware: Option<String>,
    },
    /// Network diagnostics: ICMP echo, TCP, TLS and one REST call, each timed.
    Probe,
    /// One-click export: configuration, logs, device state and, optionally, a packet capture of
    /// `capture_s` seconds, in one tar.gz artifact.
    Export {
        capture_s: Option<u32>,
    },
    /// Pushes a stored configuration backup back (`latest` or a backup id).
    RestoreBackup {
        backup: String,
    },
}

impl Op {
    /// Time the operation may take beyond the usual per-target deadline (a capture in an export).
    pub fn extra_time(&self) -> Duration {
        match self {
            Op::Export { capture_s: Some(s) } => Duration::from_secs(u64::from(*s) + 30),
            _ => Duration::ZERO,
        }
    }
}

/// What an operation knows besides its device session: the device plane (artifacts, backups,
/// logs, captures), the device, the command or task it belongs to, and when it must be done.
pub struct OpCx<'a> {
    pub plane: &'a DevicePlane,
    pub target: &'a Target,
    pub command_id: &'a str,
    pub deadline: Instant,
    /// The password the operation uses (a capture remembers it to stop itself later).
    pub password: &'a crate::util::secret::Secret,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ResetMode {
    Web,
    Local,
    Device,
    WebLocalDevice,
    Factory,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConfigSource {
    ConfigFiles,
    Local,
    Web,
    Device,
    AllButDevice,
}

impl ConfigSource {
    pub(crate) fn index(self) -> u8 {
        match self {
            ConfigSource::ConfigFiles => 0,
            ConfigSource::Local => 1,
            ConfigSource::Web => 2,
            ConfigSource::Device => 3,
            ConfigSource::AllButDevice => 4,
        }
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            ConfigSource::ConfigFiles => "config_files",
            ConfigSource::Local => "local",
            ConfigSource::Web => "web",
            ConfigSource::Device => "device",
            ConfigSource::AllButDevice => "all_but_device",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Capture {
    Start {
        filter: String,
        max_size_mb: u32,
        duration_min: u32,
    },
    /// Stop and keep the file (the device uploads it).
    Stop,
    /// Stop and drop the file.
    Cancel,
}

fn obj(params: &Value) -> Result<&serde_json::Map<String, Value>, String> {
    match params {
        Value::Object(m) => Ok(m),
        Value::Null => {
            static EMPTY: std::sync::LazyLock<serde_json::Map<String, Value>> =
                std::sync::LazyLock::new(serde_json::Map::new);
            Ok(&EMPTY)
        }
        _ => Err("params must be a JSON object".into()),
    }
}

fn opt_str<'a>(
    m: &'a serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(format!("{key} must be a string")),
    }
}

fn opt_u32(m: &serde_json::Map<String, Value>, key: &str) -> Result<Option<u32>, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| format!("{key} must be a whole number")),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("{key} must be a whole number, got {s:?}")),
        Some(_) => Err(format!("{key} must be a whole number")),
    }
}

/// A firmware version: digits, letters, dots, dashes (`6.4.7.4560`).
fn opt_firmware(m: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match opt_str(m, key)? {
        None => Ok(None),
        Some(v)
            if !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c)) =>
        {
            Ok(Some(v.to_string()))
        }
        Some(v) => Err(format!(
            "{key} {v:?} is not a firmware version like 6.4.7.4560"
        )),
    }
}

fn param_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 256
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-[]".contains(c))
}

/// True for parameter names whose values must never appear in logs, results or admin views:
/// passwords, secrets, tokens, credentials, PINs and keys. Names are split into words at dots,
/// underscores, dashes, brackets and lower-to-upper case changes (`reg.1.auth.password`,
/// `apps.restapi.apiKey`, `sec.TLS.customDeviceKey`).
///
/// A "key" is a secret when it ends the name (`wifi.wep.key`), when a word that qualifies a
/// cryptographic key comes before it (`privateKey`, `api_key`, `device.key.1`), or when it is a
/// compound of such a word (`apikey`, `psk`); a phone's line keys, soft keys and key
/// assignments (`lineKey.1.category`, `softkey.feature.x`, `key.3.function`) are settings, not
/// secrets. When in doubt, masked.
pub fn is_secret_param(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    if [
        "passw",
        "passwd",
        "secret",
        "token",
        "credential",
        "passphrase",
        "passcode",
    ]
    .iter()
    .any(|w| lower.contains(w))
    {
        return true;
    }
    let words = param_words(name);
    let meaningful: Vec<&str> = words
        .iter()
        .map(String::as_str)
        .filter(|w| !w.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    meaningful.iter().enumerate().any(|(i, w)| match *w {
        "pin" => i + 1 == meaningful.len(),
        "psk" | "pwd" => true,
        "key" => {
            i + 1 == meaningful.len() || (i > 0 && KEY_QUALIFIERS.contains(&meaningful[i - 1]))
        }
        w => w
            .strip_suffix("key")
            .is_some_and(|q| KEY_QUALIFIERS.contains(&q)),
    })
}

/// Words that make the "key" after them a cryptographic key or an API key.
const KEY_QUALIFIERS: &[&str] = &[
    "private",
    "api",
    "access",
    "secret",
    "shared",
    "preshared",
    "pre",
    "encryption",
    "encrypt",
    "crypt",
    "crypto",
    "session",
    "auth",
    "license",
    "licence",
    "wep",
    "wpa",
    "wpa2",
    "aes",
    "sign",
    "signing",
    "master",
    "device",
    "client",
    "ssh",
    "hmac",
    "srtp",
    "tls",
    "sec",
    "wifi",
];

/// `sec.TLS.customDeviceKey` → `sec`, `tls`, `custom`, `device`, `key`.
fn param_words(name: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if !c.is_alphanumeric() {
            if !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
            }
            prev_lower = false;
            continue;
        }
        if c.is_uppercase() && prev_lower && !cur.is_empty() {
            words.push(std::mem::take(&mut cur));
        }
        prev_lower = c.is_lowercase() || c.is_ascii_digit();
        cur.extend(c.to_lowercase());
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// Validates a command's parameters (without `target` / `password`, which the caller takes).
pub fn parse(kind: &str, params: &Value) -> Result<Op, String> {
    let m = obj(params)?;
    match kind {
        "reboot" => match opt_str(m, "mode")?.unwrap_or("reboot") {
            "reboot" => Ok(Op::Reboot { restart: false }),
            "restart" => Ok(Op::Reboot { restart: true }),
            other => Err(format!(
                "mode {other:?} is not \"reboot\" (full reboot) or \"restart\" (application restart)"
            )),
        },
        "reset" => {
            let mode = opt_str(m, "mode")?
                .ok_or("mode is required: web, local, device, web_local_device or factory")?;
            Ok(Op::Reset(match mode {
                "web" => ResetMode::Web,
                "local" => ResetMode::Local,
                "device" => ResetMode::Device,
                "web_local_device" | "all" => ResetMode::WebLocalDevice,
                "factory" => ResetMode::Factory,
                other => {
                    return Err(format!(
                        "mode {other:?} is not one of web, local, device, web_local_device, factory"
                    ));
                }
            }))
        }
        "dial" => {
            let destination = opt_str(m, "destination")?
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .ok_or("destination is required")?;
            if destination.len() > 256 || destination.chars().any(char::is_control) {
                return Err("destination must be at most 256 printable characters".into());
            }
            let kind = match opt_str(m, "type")?
                .unwrap_or("TEL")
                .to_ascii_uppercase()
                .as_str()
            {
                "TEL" => "TEL",
                "SIP" => "SIP",
                "H323" => "H323",
                other => return Err(format!("type {other:?} is not SIP, TEL or H323")),
            };
            let line = opt_u32(m, "line")?.unwrap_or(1);
            if !(1..=48).contains(&line) {
                return Err(format!("line {line} is out of range (1 to 48)"));
            }
            Ok(Op::Dial {
                destination: destination.to_string(),
                line,
                kind,
            })
        }
        "get_params" => {
            let list = match m.get("params") {
                Some(Value::Array(a)) => a,
                _ => return Err("params must be a list of parameter names".into()),
            };
            if list.is_empty() || list.len() > MAX_GET_PARAMS {
                return Err(format!(
                    "params lists {} names; 1 to {MAX_GET_PARAMS} are allowed per command",
                    list.len()
                ));
            }
            let mut names = Vec::new();
            for v in list {
                match v.as_str() {
                    Some(n) if param_name_ok(n) => names.push(n.to_string()),
                    _ => return Err(format!("{v} is not a parameter name")),
                }
            }
            Ok(Op::GetParams(names))
        }
        "set_params" => {
            let map = match m.get("params") {
                Some(Value::Object(o)) => o,
                _ => {
                    return Err("params must be an object of parameter names to values".into());
                }
            };
            if map.is_empty() || map.len() > MAX_SET_PARAMS {
                return Err(format!(
                    "params sets {} values; 1 to {MAX_SET_PARAMS} are allowed",
                    map.len()
                ));
            }
            let mut out = BTreeMap::new();
            for (k, v) in map {
                if !param_name_ok(k) {
                    return Err(format!("{k:?} is not a parameter name"));
                }
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => if *b { "1" } else { "0" }.to_string(),
                    _ => return Err(format!("value of {k} must be a string, number or bool")),
                };
                if v.len() > 4096 {
                    return Err(format!("value of {k} is longer than 4096 characters"));
                }
                out.insert(k.clone(), v);
            }
            Ok(Op::SetParams(out))
        }
        "get_config" => {
            let source = opt_str(m, "source")?
                .ok_or("source is required: config_files, local, web, device or all_but_device")?;
            Ok(Op::GetConfig(match source {
                "config_files" => ConfigSource::ConfigFiles,
                "local" => ConfigSource::Local,
                "web" => ConfigSource::Web,
                "device" => ConfigSource::Device,
                "all_but_device" => ConfigSource::AllButDevice,
                other => {
                    return Err(format!(
                        "source {other:?} is not one of config_files, local, web, device, all_but_device"
                    ));
                }
            }))
        }
        "capture_screen" => {
            let screen = opt_str(m, "screen")?.unwrap_or("mainScreen");
            if !matches!(screen, "mainScreen" | "em/1" | "em/2" | "em/3") {
                return Err(format!(
                    "screen {screen:?} is not mainScreen, em/1, em/2 or em/3"
                ));
            }
            Ok(Op::CaptureScreen {
                screen: screen.to_string(),
            })
        }
        "packet_capture" => {
            let action =
                opt_str(m, "action")?.ok_or("action is required: start, stop or cancel")?;
            Ok(Op::PacketCapture(match action {
                "start" => {
                    let filter = opt_str(m, "filter")?.unwrap_or("").trim().to_string();
                    if filter.len() > 256 || filter.chars().any(char::is_control) {
                        return Err("filter must be at most 256 printable characters".into());
                    }
                    let max_size_mb = opt_u32(m, "max_size_mb")?.unwrap_or(10);
                    if !(1..=10).contains(&max_size_mb) {
                        return Err(format!(
                            "max_size_mb {max_size_mb} is out of range (1 to 10)"
                        ));
                    }
                    let duration_min = opt_u32(m, "duration_min")?.unwrap_or(60);
                    if !(1..=2880).contains(&duration_min) {
                        return Err(format!(
                            "duration_min {duration_min} is out of range (1 to 2880)"
                        ));
                    }
                    Capture::Start {
                        filter,
                        max_size_mb,
                        duration_min,
                    }
                }
                "stop" => Capture::Stop,
                "cancel" => Capture::Cancel,
                other => return Err(format!("action {other:?} is not start, stop or cancel")),
            }))
        }
        "check_sync" => Ok(Op::CheckSync {
            expect_firmware: opt_firmware(m, "expect_firmware")?,
        }),
        "upgrade" => Ok(Op::CheckSync {
            expect_firmware: Some(opt_firmware(m, "firmware")?.ok_or(
                "firmware is required: the version the device must run after the upgrade",
            )?),
        }),
        "probe" => Ok(Op::Probe),
        "export_device" => {
            let capture_s = opt_u32(m, "capture_s")?;
            if let Some(c) = capture_s
                && !EXPORT_CAPTURE_S.contains(&c)
            {
                return Err(format!(
                    "capture_s {c} is out of range ({} to {} seconds)",
                    EXPORT_CAPTURE_S.start(),
                    EXPORT_CAPTURE_S.end()
                ));
            }
            Ok(Op::Export { capture_s })
        }
        "restore_config_backup" => {
            let backup = opt_str(m, "backup_id")?
                .ok_or("backup_id is required (a backup id, or \"latest\")")?;
            if !super::backups::valid_id(backup) && backup != "latest" {
                return Err(format!("backup_id {backup:?} is not a backup id"));
            }
            Ok(Op::RestoreBackup {
                backup: backup.to_string(),
            })
        }
        other => Err(format!("{other:?} is not a device command")),
    }
}

/// What one operation came to.
#[derive(Debug, Clone)]
pub struct Done {
    pub result: Outcome,
    pub reason: String,
    pub payload: Value,
    /// The device error behind a failure, kept typed for whoever must tell kinds of failure apart
    /// (an unreachable device is not one the relay has learnt about).
    pub cause: Option<DeviceError>,
}

impl Done {
    pub(crate) fn fail(reason: impl Into<String>) -> Done {
        Done {
            result: Outcome::Failure,
            reason: reason.into(),
            payload: Value::Null,
            cause: None,
        }
    }

    pub(crate) fn ok(payload: Value) -> Done {
        Done {
            result: Outcome::Success,
            reason: String::new(),
            payload,
            cause: None,
        }
    }
}

impl From<DeviceError> for Done {
    fn from(e: DeviceError) -> Done {
        let result = match &e {
            DeviceError::Api(code) if code == "4004" => Outcome::NotApplicable,
            _ => Outcome::Failure,
        };
        Done {
            result,
            reason: e.to_string(),
            payload: Value::Null,
            cause: Some(e),
        }
    }
}

/// A JSON API call, retried a couple of times when the device says it is busy with another request.
pub(crate) async fn call(
    s: &mut Session,
    path: &str,
    data: Option<Value>,
    get: bool,
) -> Result<Value, DeviceError> {
    let mut delay = Duration::from_millis(500);
    for attempt in 0.. {
        let r = if get {
            s.get(path).await
        } else {
            s.post(path, data.clone()).await
        };
        match r {
            Err(DeviceError::Busy) if attempt < 2 => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other.map(|r| r.data),
        }
    }
    unreachable!("the loop returns")
}

pub async fn perform(op: &Op, s: &mut Session, cx: &OpCx<'_>) -> Done {
    match run(op, s, cx).await {
        Ok(d) => d,
        Err(e) => e.into(),
    }
}

/// What `device/info` says, in the relay's terms.
#[derive(Debug, Clone, Default)]
pub struct Info {
    pub mac: Option<String>,
    pub model: String,
    pub firmware: String,
    pub uptime_s: Option<u64>,
    pub raw: Value,
}

pub async fn device_info(s: &mut Session) -> Result<Info, DeviceError> {
    let raw = call(s, "/api/v1/mgmt/device/info", None, true).await?;
    Ok(Info::from_raw(raw))
}

impl Info {
    /// Reads `device/info` data as the device sent it; fields it lacks are left empty.
    pub fn from_raw(raw: Value) -> Info {
        Info {
            mac: raw
                .get("MACAddress")
                .and_then(Value::as_str)
                .map(|m| m.to_ascii_lowercase())
                .filter(|m| crate::devlogs::valid_mac(m)),
            model: raw
                .get("ModelNumber")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            firmware: super::monitor::parse_firmware(&raw),
            uptime_s: super::monitor::parse_uptime(&raw),
            raw,
        }
    }
}

async fn run(op: &Op, s: &mut Session, cx: &OpCx<'_>) -> Result<Done, DeviceError> {
    match op {
        Op::Reboot { restart } => {
            let path = if *restart {
                "/api/v1/mgmt/safeRestart"
            } else {
                "/api/v1/mgmt/safeReboot"
            };
            call(s, path, None, false).await?;
            Ok(Done::ok(
                json!({"requested": if *restart { "restart" } else { "reboot" }}),
            ))
        }
        Op::Reset(mode) => {
            let paths: &[&str] = match mode {
                ResetMode::Web => &["/api/v1/mgmt/configReset/web"],
                ResetMode::Local => &["/api/v1/mgmt/configReset/local"],
                ResetMode::Device => &["/api/v1/mgmt/configReset/device"],
                ResetMode::WebLocalDevice => &[
                    "/api/v1/mgmt/configReset/web",
                    "/api/v1/mgmt/configReset/local",
                    "/api/v1/mgmt/configReset/device",
                ],
                ResetMode::Factory => &["/api/v1/mgmt/factoryReset"],
            };
            for p in paths {
                call(s, p, None, false).await?;
            }
            Ok(Done::ok(json!({"cleared": paths.len()})))
        }
        Op::Dial {
            destination,
            line,
            kind,
        } => {
            call(
                s,
                "/api/v1/callctrl/dial",
                Some(json!({"Dest": destination, "Line": line.to_string(), "Type": kind})),
                false,
            )
            .await?;
            Ok(Done::ok(json!({"destination": destination, "line": line})))
        }
        Op::GetParams(names) => {
            let data = call(s, "/api/v1/mgmt/config/get", Some(json!(names)), false).await?;
            let mut found = serde_json::Map::new();
            let mut missing = Vec::new();
            for n in names {
                match data.get(n) {
                    Some(v) => {
                        let value = if is_secret_param(n) {
                            json!("***")
                        } else {
                            v.get("Value").cloned().unwrap_or(Value::Null)
                        };
                        found.insert(
                            n.clone(),
                            json!({"value": value, "source": v.get("Source").cloned().unwrap_or(Value::Null)}),
                        );
                    }
                    None => missing.push(n.clone()),
                }
            }
            Ok(Done::ok(json!({"params": found, "unknown": missing})))
        }
        Op::SetParams(map) => {
            call(s, "/api/v1/mgmt/config/set", Some(json!(map)), false).await?;
            Ok(Done::ok(json!({"set": map.keys().collect::<Vec<_>>()})))
        }
        Op::GetConfig(source) => super::backups::get_config(s, cx, *source).await,
        Op::CaptureScreen { screen } => {
            match s.get_raw(&format!("/captureScreen/{screen}")).await {
                Ok((ctype, body)) => {
                    let ctype = if ctype.is_empty() {
                        "image/bmp".to_string()
                    } else {
                        ctype
                    };
                    let info = device_info(s).await.ok();
                    let mac = info.and_then(|i| i.mac);
                    let ext = if ctype.contains("png") { "png" } else { "bmp" };
                    let name = format!(
                        "{}_{}_{}.{ext}",
                        mac.as_deref().unwrap_or("device"),
                        screen.replace('/', "-"),
                        super::captures::file_stamp(std::time::SystemTime::now())
                    );
                    let meta = crate::artifacts::Meta::new("screen_capture", name, &ctype)
                        .device(Some(cx.target.to_string()), mac)
                        .command(Some(cx.command_id.to_string()));
                    match cx.plane.artifacts.put(meta, body).await {
                        Ok(r) => Ok(Done::ok(json!({
                            "screen": screen,
                            "content_type": r.content_type,
                            "bytes": r.size,
                            "artifact": r,
                        }))),
                        Err(e) => Ok(Done::fail(format!("cannot keep the screen capture: {e}"))),
                    }
                }
                Err(DeviceError::Busy) => Ok(Done::fail(
                    "screen capture refused (HTTP 403): turn on up.screenCapture.enabled and Screen Capture on the device",
                )),
                Err(e) => Err(e),
            }
        }
        Op::PacketCapture(c) => super::captures::perform(s, cx, c).await,
        Op::CheckSync { expect_firmware } => {
            super::health::check_sync(s, cx, expect_firmware.as_deref()).await
        }
        Op::Export { capture_s } => super::export::export(s, cx, *capture_s).await,
        Op::RestoreBackup { backup } => super::backups::restore(s, cx, backup).await,
        // Run before any session is opened (see `DevicePlane::run_op`).
        Op::Probe => Ok(Done::fail("probe runs without a REST session")),
    }
}

/// Masks values of secret parameters (see [`is_secret_param`]) in an exported listing of
/// `name="value"` or `name='value'` pairs. The text comes from the device: any byte may be
/// anywhere, so every cut is at a character boundary found by searching, never computed.
pub(crate) fn mask_config(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // The next `=` followed by a quote opens a value.
    while let Some((eq, quote)) =
        rest.match_indices('=')
            .find_map(|(i, _)| match rest[i + 1..].chars().next() {
                Some(q @ ('"' | '\'')) => Some((i, q)),
                _ => None,
            })
    {
        let before = &rest[..eq];
        let name = before
            .rsplit(|c: char| c.is_whitespace() || c == '<' || c == '"' || c == '\'')
            .next()
            .unwrap_or("");
        out.push_str(before);
        out.push('=');
        out.push(quote);
        let value_and_rest = &rest[eq + 1 + quote.len_utf8()..];
        let end = value_and_rest.find(quote).unwrap_or(value_and_rest.len());
        let (value, after) = value_and_rest.split_at(end);
        if is_secret_param(name) {
            out.push_str("***");
        } else {
            out.push_str(value);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_type_validates() {
        assert_eq!(
            parse("reboot", &Value::Null).unwrap(),
            Op::Reboot { restart: false }
        );
        assert_eq!(
            parse("reboot", &json!({"mode": "restart"})).unwrap(),
            Op::Reboot { restart: true }
        );
        assert!(parse("reboot", &json!({"mode": "now"})).is_err());
        assert_eq!(
            parse("reset", &json!({"mode": "factory"})).unwrap(),
            Op::Reset(ResetMode::Factory)
        );
        assert!(
            parse("reset", &json!({}))
                .unwrap_err()
                .contains("mode is required")
        );
        assert!(
            parse("dial", &json!({}))
                .unwrap_err()
                .contains("destination")
        );
        assert_eq!(
            parse(
                "dial",
                &json!({"destination": "1234", "type": "sip", "line": 2})
            )
            .unwrap(),
            Op::Dial {
                destination: "1234".into(),
                line: 2,
                kind: "SIP"
            }
        );
        assert!(parse("dial", &json!({"destination": "1", "line": 0})).is_err());
        assert!(parse("dial", &json!({"destination": "1", "type": "FAX"})).is_err());
        let names: Vec<String> = (0..21).map(|i| format!("p.{i}")).collect();
        assert!(
            parse("get_params", &json!({"params": names}))
                .unwrap_err()
                .contains("1 to 20")
        );
        assert!(parse("get_params", &json!({"params": ["a b"]})).is_err());
        assert!(parse("set_params", &json!({"params": {}})).is_err());
        assert!(parse("set_params", &json!({"params": {"a": [1]}})).is_err());
        assert_eq!(
            parse("set_params", &json!({"params": {"a.b": 1, "c": true}})).unwrap(),
            Op::SetParams(BTreeMap::from([
                ("a.b".to_string(), "1".to_string()),
                ("c".to_string(), "1".to_string())
            ]))
        );
        assert!(parse("get_config", &json!({"source": "cloud"})).is_err());
        assert_eq!(
            parse("get_config", &json!({"source": "all_but_device"})).unwrap(),
            Op::GetConfig(ConfigSource::AllButDevice)
        );
        assert!(parse("capture_screen", &json!({"screen": "../x"})).is_err());
        assert!(
            parse(
                "packet_capture",
                &json!({"action": "start", "max_size_mb": 11})
            )
            .is_err()
        );
        assert!(
            parse(
                "packet_capture",
                &json!({"action": "start", "duration_min": 2881})
            )
            .is_err()
        );
        assert!(
            parse(
                "packet_capture",
                &json!({"action": "start", "duration_min": 0})
            )
            .is_err()
        );
        assert!(parse("packet_capture", &json!({"action": "stop"})).is_ok());
        assert_eq!(
            parse("check_sync", &json!({})).unwrap(),
            Op::CheckSync {
                expect_firmware: None
            }
        );
        assert_eq!(
            parse("upgrade", &json!({"firmware": "6.4.8.1000"})).unwrap(),
            Op::CheckSync {
                expect_firmware: Some("6.4.8.1000".into())
            }
        );
        assert!(parse("upgrade", &json!({})).is_err());
        assert!(parse("upgrade", &json!({"firmware": "6.4 ; rm"})).is_err());
        assert_eq!(parse("probe", &json!({})).unwrap(), Op::Probe);
        assert!(parse("export_device", &json!({"capture_s": 1})).is_err());
        assert_eq!(
            parse("export_device", &json!({"capture_s": 10})).unwrap(),
            Op::Export {
                capture_s: Some(10)
            }
        );
        assert!(parse("restore_config_backup", &json!({})).is_err());
        assert!(parse("restore_config_backup", &json!({"backup_id": "../x"})).is_err());
        assert!(parse("restore_config_backup", &json!({"backup_id": "latest"})).is_ok());
        assert!(parse("reboot", &json!([1])).is_err());
        assert!(parse("format_disk", &json!({})).is_err());
    }

    #[test]
    fn secrets_are_masked_in_exports() {
        let t = "<x reg.1.auth.password=\"hunter2\" reg.1.address=\"1000\" />";
        let m = mask_config(t);
        assert!(!m.contains("hunter2"));
        assert!(m.contains("reg.1.address=\"1000\""));
        assert!(is_secret_param("device.auth.localAdminPassword"));
        assert!(!is_secret_param("reg.1.address"));
        // Single quotes, keys and tokens too.
        let m = mask_config(
            "<x apps.restapi.apiKey='k-123' sec.token=\"t-456\" lineKey.1.category=\"Line\"/>",
        );
        assert!(!m.contains("k-123") && !m.contains("t-456"), "{m}");
        assert!(m.contains("lineKey.1.category=\"Line\""), "{m}");
    }

    #[test]
    fn exports_with_any_text_never_panic() {
        // A no-break space (two bytes in UTF-8) right before a name, the case that used to cut a
        // character in half, and other multi-byte text around names and values.
        let t = "<x\u{a0}reg.1.auth.password=\"hunter2\"\u{a0}a=\"é\"\u{2003}b.pin='1234'/>";
        let m = mask_config(t);
        assert!(!m.contains("hunter2") && !m.contains("1234"), "{m}");
        assert!(m.contains("a=\"é\""), "{m}");
        for t in [
            "=",
            "=\"",
            "='",
            "x=\"unterminated",
            "\u{a0}=\"\u{a0}",
            "ä=ö\"ü",
            "==\"\"",
        ] {
            let _ = mask_config(t);
        }
        // Every prefix of a mixed text: each cut position is a test of its own.
        let mixed = "<é reg.1.auth.password=\"h\u{a0}i\" k\u{2003}='v' é=\"ü\"";
        for (i, _) in mixed.char_indices() {
            let _ = mask_config(&mixed[..i]);
        }
    }

    #[test]
    fn secret_parameter_names() {
        for secret in [
            "reg.1.auth.password",
            "device.auth.localAdminPassword",
            "voice.voicemail.pin",
            "apps.restapi.apiKey",
            "sec.TLS.customDeviceKey",
            "device.wifi.psk.key",
            "wifi.wep.key",
            "sec.srtp.key.1",
            "provisioning.authToken",
            "sso.client_secret",
            "apps.ucdesktop.credentials",
            "license.key",
            "device.prov.pwd",
            "x.private_key",
            "feature.accesskey",
        ] {
            assert!(is_secret_param(secret), "{secret} should be masked");
        }
        for setting in [
            "reg.1.address",
            "lineKey.1.category",
            "lineKey.reassignment.enabled",
            "softkey.feature.newcall",
            "key.3.function.prim",
            "up.screenCapture.enabled",
            "voIpProt.SIP.outboundProxy.address",
            "mapping.1",
            "keypad.lock",
        ] {
            assert!(!is_secret_param(setting), "{setting} is not a secret");
        }
    }
}
