//! The HTTP side of a simulated phone: the Poly UC Software REST subset, the two web-server
//! extras (configuration export, screen capture), and the `/sim/` test API.
//!
//! Order of checks for a device request: the phone is up (else the connection is closed), Basic
//! authentication (401), the `error` and `hang` faults, one request at a time (403 `4403`), the
//! `slow` delay, then the endpoint. Answer codes other than 4403 (HTTP 403) and 5000 (HTTP 500) come with HTTP 200, the
//! code in the envelope's `Status` string.

use super::Inner;
use super::model::{self, Code, FaultMode, Hostile, Source};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

type Resp = Response<Full<Bytes>>;

/// What the phones' web server calls itself.
pub const SERVER: &str = "Polycom SoundPoint IP Telephone HTTPd";
/// Largest request body read.
const MAX_BODY: usize = 1 << 20;
/// Most parameter names one `config/get` may ask for.
pub const MAX_GET_PARAMS: usize = 20;

/// Returned by the service to close the connection without an answer (the phone went down).
#[derive(Debug)]
pub(super) struct PhoneDown;

impl std::fmt::Display for PhoneDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("phone is rebooting")
    }
}

impl std::error::Error for PhoneDown {}

/// Clears the phone's busy flag when the request ends, however it ends.
struct BusyGuard {
    inner: Arc<Inner>,
    idx: usize,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.inner.phone(self.idx).busy = false;
    }
}

fn with_headers(mut resp: Resp, content_type: &'static str) -> Resp {
    let h = resp.headers_mut();
    h.insert(header::SERVER, HeaderValue::from_static(SERVER));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn reply(status: StatusCode, body: &Value) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    with_headers(resp, "application/json")
}

/// An envelope with only a `Status` (acknowledgements and errors).
fn code(c: Code) -> Resp {
    reply(StatusCode::OK, &json!({"Status": c.as_str()}))
}

fn ack() -> Resp {
    code(Code::Ok)
}

fn data(v: Value) -> Resp {
    reply(StatusCode::OK, &json!({"Status": "2000", "data": v}))
}

fn not_found() -> Resp {
    reply(StatusCode::NOT_FOUND, &json!({"Status": "4004"}))
}

fn unauthorized() -> Resp {
    let mut resp = reply(StatusCode::UNAUTHORIZED, &json!({}));
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"SPIP Configuration\""),
    );
    resp
}

fn sim_error(status: StatusCode, message: impl Into<String>) -> Resp {
    reply(status, &json!({"error": message.into()}))
}

/// Whether the request carries `Polycom:<admin password>` as Basic credentials.
fn authorized(inner: &Inner, headers: &http::HeaderMap) -> bool {
    use base64::Engine as _;
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .is_ok_and(|d| d == inner.credentials.as_bytes())
}

/// Counts a device-API request as in flight until it is answered.
struct InFlight(Arc<Inner>);

impl InFlight {
    fn start(inner: &Arc<Inner>) -> InFlight {
        let c = &inner.counters;
        let now = c.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        c.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(inner.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every request of a phone connection.
pub(super) async fn handle(
    inner: Arc<Inner>,
    idx: usize,
    req: Request<Incoming>,
) -> Result<Resp, PhoneDown> {
    inner.counters.requests.fetch_add(1, Ordering::Relaxed);
    if inner.phone(idx).is_down(Instant::now()) {
        return Err(PhoneDown);
    }
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    if path == "/sim" || path.starts_with("/sim/") {
        let body = match read_body(body).await {
            Ok(b) => b,
            Err(r) => return Ok(r),
        };
        if parts.method == Method::POST && path == "/sim/logs" {
            return Ok(sim_logs(&inner, idx, &body).await);
        }
        return Ok(sim(&inner, idx, &parts.method, &path, &body));
    }
    let _in_flight = InFlight::start(&inner);
    if !authorized(&inner, &parts.headers) {
        inner.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        return Ok(unauthorized());
    }
    // `error` and `hang` come before the one-request-at-a-time rule: a hanging phone leaves
    // every request hanging, not only the first.
    let fault = inner.phone(idx).fault;
    match fault.mode {
        FaultMode::Error => {
            return Ok(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"Status": "5000"}),
            ));
        }
        FaultMode::Hang => {
            // Unanswered for as long as the fault stays; a reboot or shutdown drops the
            // connection, and this future with it.
            while inner.phone(idx).fault.mode == FaultMode::Hang {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        FaultMode::None | FaultMode::Slow | FaultMode::Refuse => {}
    }
    let slow = {
        let mut p = inner.phone(idx);
        if p.busy {
            drop(p);
            inner.counters.busy_refusals.fetch_add(1, Ordering::Relaxed);
            return Ok(reply(StatusCode::FORBIDDEN, &json!({"Status": "4403"})));
        }
        p.busy = true;
        (p.fault.mode == FaultMode::Slow).then_some(p.fault.delay_ms)
    };
    let _busy = BusyGuard {
        inner: inner.clone(),
        idx,
    };
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return Ok(r),
    };
    if let Some(ms) = slow {
        tokio::time::sleep(Duration::from_millis(ms.into())).await;
    }
    if let Some((lo, hi)) = inner.answer_delay {
        tokio::time::sleep(Duration::from_millis(fastrand::u32(lo..=hi).into())).await;
    }
    let now = Instant::now();
    if inner.phone(idx).is_down(now) {
        return Err(PhoneDown);
    }
    let query = parts.uri.query().unwrap_or("");
    Ok(device(&inner, idx, &parts.method, &path, query, &body, now))
}

async fn read_body(body: Incoming) -> Result<Bytes, Resp> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(_) => Err(reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({"Status": Code::InputTooLarge.as_str()}),
        )),
    }
}

/// The `data` member of a request body; `None` when the body is not JSON or has no `data`.
fn body_data(body: &[u8]) -> Option<Value> {
    let v: Value = serde_json::from_slice(body).ok()?;
    match v {
        Value::Object(mut m) => m.remove("data"),
        _ => None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    DeviceInfo,
    LineInfo,
    CallStatus,
    PollForStatus,
    Reboot,
    FactoryReset,
    ConfigReset,
    ConfigResetSource,
    Dial,
    EndCall,
    ConfigGet,
    ConfigSet,
    UpdateConfiguration,
    UploadBgCapture,
    ExportFile,
    CaptureScreen,
    DeviceStats,
}

fn endpoint(path: &str) -> Option<(Method, Endpoint)> {
    use Endpoint::*;
    let get = |e| Some((Method::GET, e));
    let post = |e| Some((Method::POST, e));
    match path {
        "/api/v1/mgmt/device/info" => get(DeviceInfo),
        "/api/v1/mgmt/device/stats" => get(DeviceStats),
        "/api/v1/mgmt/lineInfo" => get(LineInfo),
        "/api/v1/webCallControl/callStatus" => get(CallStatus),
        "/api/v1/mgmt/pollForStatus" => get(PollForStatus),
        "/api/v1/mgmt/safeReboot" | "/api/v1/mgmt/safeRestart" => post(Reboot),
        "/api/v1/mgmt/factoryReset" => post(FactoryReset),
        "/api/v1/mgmt/configReset" => post(ConfigReset),
        "/api/v1/callctrl/dial" => post(Dial),
        "/api/v1/callctrl/endCall" => post(EndCall),
        "/api/v1/mgmt/config/get" => post(ConfigGet),
        "/api/v1/mgmt/config/set" => post(ConfigSet),
        "/api/v1/mgmt/updateConfiguration" => post(UpdateConfiguration),
        "/api/v1/mgmt/network/uploadBgCapture" => post(UploadBgCapture),
        "/Utilities/configuration/exportFile" => get(ExportFile),
        "/captureScreen/mainScreen" => get(CaptureScreen),
        p if p
            .strip_prefix("/api/v1/mgmt/configReset/")
            .is_some_and(|s| !s.is_empty() && !s.contains('/')) =>
        {
            post(ConfigResetSource)
        }
        _ => None,
    }
}

/// A device request, once authenticated, admitted and past the fault.
fn device(
    inner: &Arc<Inner>,
    idx: usize,
    method: &Method,
    path: &str,
    query: &str,
    body: &[u8],
    now: Instant,
) -> Resp {
    let fleet = &inner.fleet;
    if path.starts_with("/api/") && !inner.phone(idx).api_enabled(fleet) {
        return not_found();
    }
    inner.phone(idx).tick_capture(fleet, now);
    let Some((want, ep)) = endpoint(path) else {
        return not_found();
    };
    let hostile = inner.phone(idx).hostile;
    if hostile != Hostile::None
        && let Some(r) = hostile_answer(inner, idx, hostile, ep)
    {
        return r;
    }
    if method != want {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, &json!({"Status": "4000"}));
        r.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static(if want == Method::GET { "GET" } else { "POST" }),
        );
        return r;
    }
    use Endpoint::*;
    match ep {
        DeviceInfo => data(device_info(inner, idx, now)),
        LineInfo => {
            let p = inner.phone(idx);
            let lines: Vec<Value> = (1..=fleet.lines)
                .map(|line| {
                    let user = model::line_user(idx, line);
                    json!({
                        "LineNumber": line.to_string(),
                        "RegistrationStatus": if p.line_registered(line) { "Registered" } else { "Unregistered" },
                        "Label": user,
                        "LineType": "private",
                        "SIPAddress": model::line_uri(idx, line),
                        "UserID": user,
                        "Protocol": "SIP",
                        "ProxyAddress": model::PBX_DOMAIN,
                        "Port": "5060",
                    })
                })
                .collect();
            data(Value::Array(lines))
        }
        CallStatus => {
            let p = inner.phone(idx);
            match p.call() {
                None => code(Code::NoCall),
                Some(c) => data(json!({
                    "CallHandle": c.handle_hex(),
                    "Type": "Outgoing",
                    "Protocol": if c.kind == "H323" { "H323" } else { "SIP" },
                    "CallState": p.call_state(),
                    "LineId": c.line.to_string(),
                    "RemotePartyName": "",
                    "RemotePartyNumber": c.dest,
                    "DurationInSeconds": now.saturating_duration_since(c.started).as_secs().to_string(),
                    "Ringing": "0",
                    "Muted": "0",
                    "StartTime": "",
                    "UIAppearanceIndex": "1*",
                })),
            }
        }
        PollForStatus => {
            let p = inner.phone(idx);
            let (state, detail) = match (p.call(), p.last_call_end()) {
                (Some(c), _) => (
                    "Active",
                    format!(
                        "Active call duration {}",
                        clock(now.saturating_duration_since(c.started))
                    ),
                ),
                (None, Some(end)) => (
                    "Idle",
                    format!(
                        "Time of last call {} ago",
                        clock(now.saturating_duration_since(end))
                    ),
                ),
                (None, None) => ("Idle", String::new()),
            };
            data(json!({"State": state, "StateData": detail}))
        }
        Reboot => {
            inner.reboot(idx, now);
            ack()
        }
        FactoryReset => {
            inner.phone(idx).factory_reset(fleet, now);
            inner.reboot(idx, now);
            ack()
        }
        ConfigReset => {
            let mut p = inner.phone(idx);
            for s in [Source::Local, Source::Web, Source::Device] {
                p.clear_source(fleet, s, now);
            }
            ack()
        }
        ConfigResetSource => {
            let name = path.rsplit('/').next().unwrap_or("");
            match name {
                "local" | "web" | "device" | "cloud" => {
                    let s = Source::parse(name).expect("listed above");
                    inner.phone(idx).clear_source(fleet, s, now);
                    ack()
                }
                _ => code(Code::InvalidInput),
            }
        }
        Dial => dial(inner, idx, body, now),
        EndCall => {
            let reference = body_data(body)
                .and_then(|d| d.get("Ref").and_then(|r| r.as_str().map(str::to_owned)));
            code(inner.phone(idx).end_call_ref(reference.as_deref(), now))
        }
        ConfigGet => config_get(inner, idx, body),
        ConfigSet => {
            let Some(Value::Object(map)) = body_data(body) else {
                return code(Code::InvalidInput);
            };
            if map.values().any(|v| !v.is_string()) {
                return code(Code::InvalidInput);
            }
            let mut p = inner.phone(idx);
            for (k, v) in &map {
                p.set_param(fleet, Source::Local, k, v.as_str().unwrap_or(""), now);
            }
            ack()
        }
        UpdateConfiguration => {
            let update = inner.phone(idx).config_update();
            match update {
                Err(c) => code(c),
                Ok(reboots) => {
                    if reboots {
                        // Installs the offered firmware: down for a reboot once the ack is out.
                        inner.reboot(idx, now);
                    }
                    ack()
                }
            }
        }
        UploadBgCapture => {
            let url = body_data(body)
                .and_then(|d| d.get("url").and_then(|u| u.as_str().map(str::to_owned)));
            let file = inner.phone(idx).upload_capture(fleet, now);
            match (file, url) {
                (Err(c), _) => code(c),
                // Without a URL the file goes to the provisioning server's capture directory.
                (Ok(_), None) => ack(),
                (Ok(file), Some(url)) => {
                    spawn_capture_upload(inner, idx, file, url);
                    ack()
                }
            }
        }
        DeviceStats => data(device_stats(idx, now)),
        ExportFile => export_file(inner, idx, query),
        CaptureScreen => {
            if !inner.phone(idx).screen_capture_enabled(fleet) {
                return reply(
                    StatusCode::FORBIDDEN,
                    &json!({"Status": Code::NotAllowed.as_str()}),
                );
            }
            let mut resp = Response::new(Full::new(screen_bmp()));
            *resp.status_mut() = StatusCode::OK;
            with_headers(resp, "image/bmp")
        }
    }
}

/// What a hostile phone answers instead of endpoint `ep`; None where it answers like a phone.
fn hostile_answer(inner: &Inner, idx: usize, hostile: Hostile, ep: Endpoint) -> Option<Resp> {
    use Endpoint::*;
    let long = |c: char, n: usize| -> String {
        // Terminal escapes and a newline in the middle: what must never reach an admin's screen.
        let mut s = String::with_capacity(n + 16);
        s.push_str("\u{1b}[2J\u{1b}[31mpwned\n");
        s.extend(std::iter::repeat_n(c, n));
        s
    };
    match (hostile, ep) {
        (Hostile::None, _) => None,
        (Hostile::HugeReplies, _) => {
            static HUGE: OnceLock<Bytes> = OnceLock::new();
            let body = HUGE
                .get_or_init(|| {
                    let mut b = Vec::with_capacity(model::HUGE_REPLY + 64);
                    b.extend_from_slice(br#"{"Status":"2000","data":{"ModelNumber":""#);
                    b.resize(model::HUGE_REPLY - 3, b'A');
                    b.extend_from_slice(br#""}}"#);
                    Bytes::from(b)
                })
                .clone();
            Some(with_headers(
                Response::new(Full::new(body)),
                "application/json",
            ))
        }
        (Hostile::LongStrings, DeviceInfo) => Some(data(json!({
            "ModelNumber": long('M', 40_000),
            "FirmwareRelease": long('F', 40_000),
            "MACAddress": long('0', 40_000),
            "UpTimeSinceLastReboot": "1 Day 0:00:00",
        }))),
        (Hostile::LongStrings, LineInfo) => Some(data(json!([
            {"LineNumber": "1", "RegistrationStatus": "Registered", "SIPAddress": long('u', 60_000)},
            {"LineNumber": "2", "RegistrationStatus": "Registered", "SIPAddress": long('v', 60_000)},
        ]))),
        (Hostile::LongStrings, CallStatus) => Some(data(json!({"CallState": long('c', 60_000)}))),
        (Hostile::Malformed, DeviceInfo) => {
            // Nesting far deeper than any JSON parser should follow.
            let depth = 100_000;
            let mut b = String::with_capacity(depth * 2 + 32);
            b.push_str(r#"{"Status":"2000","data":"#);
            b.extend(std::iter::repeat_n('[', depth));
            b.extend(std::iter::repeat_n(']', depth));
            b.push('}');
            Some(with_headers(
                Response::new(Full::new(Bytes::from(b))),
                "application/json",
            ))
        }
        (Hostile::Malformed, LineInfo) => Some(reply(
            StatusCode::OK,
            &json!({"Status": "2000", "data": {"LineNumber": {"not": "a list"}}}),
        )),
        (Hostile::Malformed, _) => Some(with_headers(
            Response::new(Full::new(Bytes::from_static(
                b"{\"Status\": \"2000\", \"data\": \x00\xff<html>",
            ))),
            "application/json",
        )),
        (Hostile::ManyLines, LineInfo) => {
            let lines: Vec<Value> = (1..=model::MANY_LINES)
                .map(|line| {
                    json!({
                        "LineNumber": line.to_string(),
                        "RegistrationStatus": if line % 2 == 0 { "Registered" } else { "Unregistered" },
                        "SIPAddress": format!("sip:{line}@{}", model::PBX_DOMAIN),
                    })
                })
                .collect();
            Some(data(Value::Array(lines)))
        }
        (Hostile::FlappingLines, LineInfo) => {
            let registered = {
                let mut p = inner.phone(idx);
                p.flap = !p.flap;
                p.flap
            };
            let lines: Vec<Value> = (1..=model::FLAPPING_LINES)
                .map(|line| {
                    json!({
                        "LineNumber": line.to_string(),
                        "RegistrationStatus": if registered { "Registered" } else { "Unregistered" },
                        "SIPAddress": format!("sip:{}{line:02}@{}", 1000 + idx, model::PBX_DOMAIN),
                    })
                })
                .collect();
            Some(data(Value::Array(lines)))
        }
        _ => None,
    }
}

/// The capture upload to the URL the relay gave, from the phone's address, after the answer.
fn spawn_capture_upload(inner: &Arc<Inner>, idx: usize, file: model::CaptureFile, url: String) {
    let me = inner.clone();
    inner.tracker.spawn(async move {
        let ip = me.fleet.ip(idx);
        let mac = model::mac(idx);
        let fw = me.phone(idx).firmware();
        let m = mac.clone();
        let body = tokio::task::spawn_blocking(move || {
            super::uplink::pcap_tar_gz(&m, ip, &file, Instant::now())
        })
        .await;
        let body = match body {
            Ok(Ok(b)) => b,
            _ => return,
        };
        let u = me.uplink();
        let sent = super::uplink::put_url(
            &u,
            &url,
            std::net::IpAddr::V4(ip),
            &mac,
            model::model(idx),
            &fw,
            body,
        );
        let status = tokio::select! {
            r = sent => r,
            _ = me.cancel.cancelled() => return,
        };
        match status {
            Ok(s) => {
                me.phone(idx).last_upload_status = Some(s);
                tracing::debug!(phone = %ip, status = s, "capture uploaded");
            }
            Err(e) => {
                tracing::warn!(phone = %ip, error = %format!("{e:#}"), "capture upload failed")
            }
        }
    });
}

/// `device/stats`: CPU and memory that drift a little with time, different per phone.
fn device_stats(idx: usize, now: Instant) -> Value {
    static START: OnceLock<Instant> = OnceLock::new();
    let t = now
        .saturating_duration_since(*START.get_or_init(Instant::now))
        .as_secs();
    let cpu = 4 + (idx as u64 * 7 + t / 30) % 23;
    let total: u64 = 524_288;
    let used = 200_000 + (idx as u64 * 1_337 + t * 11) % 150_000;
    let reclaim = 40_000 + (idx as u64 * 97) % 20_000;
    json!({
        "CPU": {"Average": cpu.to_string(), "Current": (cpu + 3).to_string()},
        "Memory": {
            "Total": total.to_string(),
            "Used": used.to_string(),
            "Free": (total - used).to_string(),
            "SReclaim": reclaim.to_string(),
        },
    })
}

/// `POST /sim/logs {"kind": "app"|"boot", "bytes": N}`: the phone PUTs a log of about N bytes to
/// its provisioning server now.
async fn sim_logs(inner: &Arc<Inner>, idx: usize, body: &[u8]) -> Resp {
    #[derive(Deserialize)]
    struct LogRequest {
        #[serde(default)]
        kind: Option<String>,
        bytes: usize,
    }
    let req: LogRequest = match parse(body) {
        Ok(r) => r,
        Err((status, message)) => return sim_error(status, message),
    };
    let kind = req.kind.unwrap_or_else(|| "app".into());
    if kind != "app" && kind != "boot" {
        return sim_error(StatusCode::BAD_REQUEST, "kind must be app or boot");
    }
    if req.bytes == 0 || req.bytes > 64 << 20 {
        return sim_error(StatusCode::BAD_REQUEST, "bytes must be 1 to 64 MiB");
    }
    match inner.upload_log(idx, &kind, req.bytes).await {
        Ok(s) => reply(StatusCode::OK, &json!({"status": s})),
        Err(e) => sim_error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

/// `H:MM:SS`.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn device_info(inner: &Inner, idx: usize, now: Instant) -> Value {
    let uptime = inner.phone(idx).uptime(now).as_secs();
    let fw = inner.phone(idx).firmware();
    let (days, hours, minutes, seconds) = (
        uptime / 86_400,
        uptime / 3600 % 24,
        uptime / 60 % 60,
        uptime % 60,
    );
    let mut v = json!({
        "ModelNumber": model::model(idx),
        "DeviceType": "hardwareEndpoint",
        "DeviceVendor": "Polycom",
        "MACAddress": model::mac(idx),
        "IPV4Address": inner.fleet.ip(idx).to_string(),
        "IPV6Address": "::",
        "AttachedHardware": {"EM": []},
    });
    let m = v.as_object_mut().expect("an object");
    if model::newer_firmware(idx) {
        m.insert(
            "Firmware".into(),
            json!({
                "Application": fw,
                "Updater": model::updater(idx),
                "BootBlock": model::boot_block(idx),
            }),
        );
        m.insert(
            "UpTime".into(),
            json!({
                "Days": days.to_string(),
                "Hours": hours.to_string(),
                "Minutes": minutes.to_string(),
                "Seconds": seconds.to_string(),
            }),
        );
    } else {
        m.insert("FirmwareRelease".into(), json!(fw));
        m.insert(
            "UpTimeSinceLastReboot".into(),
            json!(format!("{days} Day {hours}:{minutes:02}:{seconds:02}")),
        );
    }
    v
}

fn dial(inner: &Inner, idx: usize, body: &[u8], now: Instant) -> Resp {
    let Some(Value::Object(d)) = body_data(body) else {
        return code(Code::InvalidInput);
    };
    let Some(dest) = d.get("Dest").and_then(Value::as_str) else {
        return code(Code::InvalidInput);
    };
    let kind = match d.get("Type") {
        None | Some(Value::Null) => "TEL",
        Some(Value::String(t)) => match model::dial_kind(t) {
            Some(k) => k,
            None => return code(Code::InvalidInput),
        },
        Some(_) => return code(Code::InvalidInput),
    };
    let line = match d.get("Line") {
        None | Some(Value::Null) => 1,
        Some(Value::String(s)) => match s.trim().parse::<u64>() {
            Ok(n) => n,
            Err(_) => return code(Code::InvalidInput),
        },
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) => n,
            None => return code(Code::InvalidInput),
        },
        Some(_) => return code(Code::InvalidInput),
    };
    let line = u8::try_from(line).unwrap_or(u8::MAX);
    code(inner.phone(idx).dial(&inner.fleet, dest, line, kind, now))
}

fn config_get(inner: &Inner, idx: usize, body: &[u8]) -> Resp {
    let Some(Value::Array(names)) = body_data(body) else {
        return code(Code::InvalidInput);
    };
    if names.len() > MAX_GET_PARAMS {
        return code(Code::InputTooLarge);
    }
    let Some(names) = names
        .iter()
        .map(Value::as_str)
        .collect::<Option<Vec<&str>>>()
    else {
        return code(Code::InvalidInput);
    };
    let p = inner.phone(idx);
    let mut out = Map::new();
    for name in names {
        if let Some((value, source)) = p.effective(&inner.fleet, name) {
            out.insert(
                name.to_owned(),
                json!({"Value": value, "Source": source.as_str()}),
            );
        }
    }
    data(Value::Object(out))
}

/// `GET /Utilities/configuration/exportFile?source=N`: 0 config files, 1 local, 2 web, 3 device
/// settings, 4 everything but device settings; as a Poly configuration file.
fn export_file(inner: &Inner, idx: usize, query: &str) -> Resp {
    let source = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "source")
        .map(|(_, v)| v);
    let p = inner.phone(idx);
    let fleet = &inner.fleet;
    let (label, params) = match source {
        Some("0") => ("config files", p.source_params(fleet, Source::ConfigFiles)),
        Some("1") => ("local", p.source_params(fleet, Source::Local)),
        Some("2") => ("web", p.source_params(fleet, Source::Web)),
        Some("3") => ("device settings", p.source_params(fleet, Source::Device)),
        Some("4") => (
            "all except device settings",
            p.all_params(fleet, &[Source::Device]),
        ),
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(
                b"source must be 0 (config files), 1 (local), 2 (web), 3 (device settings) or 4 (all except device settings)\n",
            )));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return with_headers(r, "text/plain");
        }
    };
    drop(p);
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n");
    let _ = writeln!(
        out,
        "<!-- {} {}: {} -->",
        model::model(idx),
        model::mac(idx),
        label
    );
    out.push_str("<PHONE_CONFIG>\n  <ALL\n");
    for (k, v) in &params {
        let _ = writeln!(out, "    {k}=\"{}\"", xml_escape(v));
    }
    out.push_str("  />\n</PHONE_CONFIG>\n");
    let resp = Response::new(Full::new(Bytes::from(out)));
    with_headers(resp, "text/plain")
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// A 64x32 24-bit BMP: what `captureScreen` returns.
pub fn screen_bmp() -> Bytes {
    static BMP: OnceLock<Bytes> = OnceLock::new();
    BMP.get_or_init(|| {
        const W: u32 = 64;
        const H: u32 = 32;
        let row = (W * 3).div_ceil(4) * 4;
        let pixels = row * H;
        let mut b = Vec::with_capacity(54 + pixels as usize);
        b.extend_from_slice(b"BM");
        b.extend_from_slice(&(54 + pixels).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&54u32.to_le_bytes());
        b.extend_from_slice(&40u32.to_le_bytes());
        b.extend_from_slice(&(W as i32).to_le_bytes());
        b.extend_from_slice(&(H as i32).to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&24u16.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&pixels.to_le_bytes());
        b.extend_from_slice(&2835u32.to_le_bytes());
        b.extend_from_slice(&2835u32.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        for y in 0..H {
            for x in 0..W {
                // A blue gradient with a light "status bar" along the top.
                let (bl, g, r) = if y >= H - 6 {
                    (230, 230, 230)
                } else {
                    (120 + (x * 2) as u8, 40 + (y * 3) as u8, 20)
                };
                b.extend_from_slice(&[bl, g, r]);
            }
            b.resize(b.len() + (row - W * 3) as usize, 0);
        }
        Bytes::from(b)
    })
    .clone()
}

// ---------------------------------------------------------------------------------------------
// Test API.

#[derive(Deserialize)]
struct FaultRequest {
    mode: FaultMode,
    #[serde(default)]
    delay_ms: Option<u32>,
    /// Another phone to set the fault on (by IP); this phone when absent.
    #[serde(default)]
    phone: Option<std::net::Ipv4Addr>,
}

#[derive(Deserialize)]
struct HostileRequest {
    mode: Hostile,
}

#[derive(Deserialize)]
struct IdentityRequest {
    swapped: bool,
}

#[derive(Deserialize)]
struct LinesRequest {
    line: u8,
    registered: bool,
}

#[derive(Deserialize)]
struct UpgradeRequest {
    firmware: String,
    #[serde(default)]
    fail: bool,
}

#[derive(Deserialize)]
struct ConfigUpdateRequest {
    refuse: bool,
}

#[derive(Deserialize)]
struct ParamsRequest {
    source: String,
    params: std::collections::BTreeMap<String, String>,
}

/// A test-API refusal: status and message.
type SimError = (StatusCode, String);

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, SimError> {
    serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

fn sim(inner: &Arc<Inner>, idx: usize, method: &Method, path: &str, body: &[u8]) -> Resp {
    match sim_inner(inner, idx, method, path, body) {
        Ok(r) => r,
        Err((status, message)) => sim_error(status, message),
    }
}

fn sim_inner(
    inner: &Arc<Inner>,
    idx: usize,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Result<Resp, SimError> {
    let now = Instant::now();
    let fleet = &inner.fleet;
    let state = |i: usize| {
        let s = inner.phone(i).snapshot(fleet, now);
        serde_json::to_value(s).unwrap_or(Value::Null)
    };
    Ok(match (method.as_str(), path) {
        ("GET", "/sim/state") => reply(StatusCode::OK, &state(idx)),
        ("GET", "/sim/stats") => reply(
            StatusCode::OK,
            &serde_json::to_value(super::stats(inner)).unwrap_or(Value::Null),
        ),
        ("POST", "/sim/fault") | ("POST", "/sim/fault/all") => {
            let req: FaultRequest = parse(body)?;
            let fault = model::Fault {
                mode: req.mode,
                delay_ms: req.delay_ms.unwrap_or(model::DEFAULT_SLOW_MS),
            };
            if path == "/sim/fault/all" {
                for i in 0..fleet.count {
                    inner.set_fault(i, fault);
                }
                reply(
                    StatusCode::OK,
                    &json!({"phones": fleet.count, "mode": fault.mode, "delay_ms": fault.delay_ms}),
                )
            } else {
                let target = match req.phone {
                    None => idx,
                    Some(ip) => fleet
                        .index_of(ip)
                        .ok_or_else(|| (StatusCode::NOT_FOUND, format!("{ip} is not a phone")))?,
                };
                inner.set_fault(target, fault);
                reply(
                    StatusCode::OK,
                    &json!({"phone": fleet.ip(target).to_string(), "mode": fault.mode, "delay_ms": fault.delay_ms}),
                )
            }
        }
        ("POST", "/sim/lines") => {
            let req: LinesRequest = parse(body)?;
            if !(1..=fleet.lines).contains(&req.line) {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("line {} does not exist (1 to {})", req.line, fleet.lines),
                ));
            }
            let mut p = inner.phone(idx);
            p.set_line_registered(req.line, req.registered);
            reply(StatusCode::OK, &json!({"lines": p.lines(fleet)}))
        }
        ("POST", "/sim/params") => {
            let req: ParamsRequest = parse(body)?;
            let source = Source::parse(&req.source)
                .filter(|s| *s != Source::Default)
                .ok_or_else(|| {
                    (
                        StatusCode::BAD_REQUEST,
                        "source must be one of config_files, device, cloud, web, local".to_owned(),
                    )
                })?;
            let mut p = inner.phone(idx);
            for (k, v) in &req.params {
                p.set_param(fleet, source, k, v, now);
            }
            reply(StatusCode::OK, &json!({"set": req.params.len()}))
        }
        ("POST", "/sim/hostile") => {
            let req: HostileRequest = parse(body)?;
            inner.phone(idx).hostile = req.mode;
            reply(StatusCode::OK, &json!({"hostile": req.mode}))
        }
        ("POST", "/sim/identity") => {
            let req: IdentityRequest = parse(body)?;
            inner.set_identity(idx, req.swapped);
            reply(StatusCode::OK, &json!({"swapped": req.swapped}))
        }
        ("POST", "/sim/upgrade") => {
            let req: UpgradeRequest = parse(body)?;
            if req.firmware.is_empty() || req.firmware.len() > 64 {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "firmware must be 1 to 64 characters".into(),
                ));
            }
            inner.phone(idx).offer = Some(Box::new(model::Offer {
                firmware: req.firmware.clone(),
                fail: req.fail,
            }));
            reply(
                StatusCode::OK,
                &json!({"offered": req.firmware, "fail": req.fail}),
            )
        }
        ("POST", "/sim/config-update") => {
            let req: ConfigUpdateRequest = parse(body)?;
            inner.phone(idx).refuse_config_updates = req.refuse;
            reply(StatusCode::OK, &json!({"refuse": req.refuse}))
        }
        ("POST", "/sim/reboot") => {
            inner.reboot(idx, now);
            reply(StatusCode::OK, &json!({"rebooting": true}))
        }
        _ => {
            return Err((
                StatusCode::NOT_FOUND,
                format!("no such test endpoint: {method} {path}"),
            ));
        }
    })
}
