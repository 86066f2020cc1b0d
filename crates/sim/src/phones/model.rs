//! One simulated phone's state and the rules applied to it: identity derived from its index,
//! uptime and reboots, SIP lines, the call, configuration parameters in layered sources, the
//! background packet capture, and the injected fault.
//!
//! No networking here, and every rule that depends on time takes `now`, so the rules can be tested
//! without waiting. The per-phone struct is kept small (the simulator holds 50,000 of them): the
//! seeded parameters are computed from the index instead of stored, and only what a phone was told
//! to change is kept, boxed, and only once something changed.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Models handed out by index, round robin.
pub const MODELS: [&str; 4] = ["VVX 411", "VVX 450", "Trio 8800", "CCX 500"];

/// Most lines a phone can have (`--lines`): registration is kept as a bit set.
pub const MAX_LINES: u8 = 32;

/// Domain of the simulated PBX in every line's SIP URI.
pub const PBX_DOMAIN: &str = "pbx.sim";

/// Host name the phones are provisioned from (their seeded `device.prov.serverName`).
pub const PROV_SERVER: &str = "relay.sim";

/// Where a parameter's value comes from, lowest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Built into the firmware.
    Default,
    /// The provisioning server's configuration files.
    ConfigFiles,
    /// Settings kept in the phone's flash (`device.*`).
    Device,
    /// Pushed by a cloud management service.
    Cloud,
    /// Changed in the phone's web interface.
    Web,
    /// Changed on the phone itself, or through the REST API.
    Local,
}

impl Source {
    /// The sources that can hold changes, highest precedence first.
    pub const LAYERS: [Source; 5] = [
        Source::Local,
        Source::Web,
        Source::Cloud,
        Source::Device,
        Source::ConfigFiles,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Default => "default",
            Source::ConfigFiles => "config_files",
            Source::Device => "device",
            Source::Cloud => "cloud",
            Source::Web => "web",
            Source::Local => "local",
        }
    }

    pub fn parse(s: &str) -> Option<Source> {
        Some(match s {
            "default" => Source::Default,
            "config_files" => Source::ConfigFiles,
            "device" => Source::Device,
            "cloud" => Source::Cloud,
            "web" => Source::Web,
            "local" => Source::Local,
            _ => return None,
        })
    }

    /// Slot in [`Overrides`]; `None` for `Default`, which cannot be changed.
    fn slot(self) -> Option<usize> {
        match self {
            Source::Default => None,
            Source::ConfigFiles => Some(0),
            Source::Device => Some(1),
            Source::Cloud => Some(2),
            Source::Web => Some(3),
            Source::Local => Some(4),
        }
    }

    fn bit(self) -> u8 {
        1 << self.slot().unwrap_or(7)
    }
}

/// A fault injected into a phone (`--fault`, `POST /sim/fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FaultMode {
    /// Behaves.
    #[default]
    None,
    /// Every answer is delayed.
    Slow,
    /// Connections are reset as soon as they are accepted.
    Refuse,
    /// Every request gets HTTP 500 `{"Status":"5000"}`.
    Error,
    /// Requests are never answered; the connection stays open.
    Hang,
}

/// What a hostile or broken phone answers instead of the API (`POST /sim/hostile`): the device
/// side of the relay's bounds on what a device may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Hostile {
    /// Answers like a phone.
    #[default]
    None,
    /// Every API answer is a [`HUGE_REPLY`]-byte body.
    HugeReplies,
    /// Envelopes whose strings (model, firmware, MAC, line URIs, call state) are tens of
    /// kilobytes, with terminal escape sequences in them.
    LongStrings,
    /// Answers that are not the API's envelope: broken JSON, wrong types, nesting thousands deep.
    Malformed,
    /// `lineInfo` lists [`MANY_LINES`] lines.
    ManyLines,
    /// Every `lineInfo` answer flips the registration of [`FLAPPING_LINES`] lines.
    FlappingLines,
}

/// Size of a `huge_replies` answer: twice the relay's cap on any device answer.
pub const HUGE_REPLY: usize = 16 << 20;
/// Lines a `many_lines` phone lists.
pub const MANY_LINES: usize = 2000;
/// Lines a `flapping_lines` phone lists.
pub const FLAPPING_LINES: usize = 48;

/// Default delay of the `slow` fault.
pub const DEFAULT_SLOW_MS: u32 = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub mode: FaultMode,
    /// Delay of `slow`, milliseconds.
    pub delay_ms: u32,
}

impl Default for Fault {
    fn default() -> Self {
        Fault {
            mode: FaultMode::None,
            delay_ms: DEFAULT_SLOW_MS,
        }
    }
}

/// What is the same for every phone of one simulator.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub base: Ipv4Addr,
    pub count: usize,
    pub lines: u8,
    pub reboot_time: Duration,
    /// Bytes per second a background packet capture grows by.
    pub capture_rate: u64,
}

/// Default growth of a background capture: signalling plus a call's worth of RTP.
pub const DEFAULT_CAPTURE_RATE: u64 = 16_000;

/// A background packet capture: running, or ended (at a limit, or turned off) with its file kept
/// until the capture is turned off altogether (`diags.pcap.enabled=0`) or a new one starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureFile {
    pub started: Instant,
    pub ended: Option<Instant>,
    pub filter: String,
    pub max_bytes: u64,
    pub max_time: Duration,
    pub rate: u64,
}

impl CaptureFile {
    /// Bytes captured by `now` (or by the end).
    pub fn size_at(&self, now: Instant) -> u64 {
        let until = self.ended.map_or(now, |e| e.min(now));
        let secs = until.saturating_duration_since(self.started).as_secs_f64();
        ((secs * self.rate as f64) as u64).min(self.max_bytes)
    }

    /// When the capture reaches its first limit.
    fn limit_at(&self) -> Instant {
        let by_size = if self.rate == 0 {
            self.max_time
        } else {
            Duration::from_secs_f64(self.max_bytes as f64 / self.rate as f64)
        };
        self.started + by_size.min(self.max_time)
    }
}

/// A firmware the phone is offered at its next configuration update (`POST /sim/upgrade`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub firmware: String,
    /// The upgrade fails: the phone reboots and comes back on its old firmware.
    pub fail: bool,
}

impl Fleet {
    pub fn ip(&self, idx: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base).wrapping_add(idx as u32))
    }

    /// The phone behind a local address, if any.
    pub fn index_of(&self, ip: Ipv4Addr) -> Option<usize> {
        let off = u32::from(ip).wrapping_sub(u32::from(self.base)) as usize;
        (off < self.count).then_some(off)
    }
}

/// `0004f2` (Polycom's OUI) followed by the index in 6 lowercase hex digits.
pub fn mac(idx: usize) -> String {
    format!("0004f2{:06x}", idx & 0xff_ffff)
}

pub fn model(idx: usize) -> &'static str {
    MODELS[idx % MODELS.len()]
}

/// Even-index phones run older firmware (the older `device/info` form), odd-index ones newer.
pub fn newer_firmware(idx: usize) -> bool {
    idx % 2 == 1
}

/// The application version; also the `Firmware.Application` of the newer form.
pub fn firmware(idx: usize) -> &'static str {
    match (newer_firmware(idx), model(idx)) {
        (false, _) => "5.9.6.2327",
        (true, "CCX 500") => "8.1.3.1301",
        (true, _) => "6.4.7.4560",
    }
}

pub fn updater(idx: usize) -> &'static str {
    if model(idx) == "CCX 500" {
        "8.1.3.0016"
    } else {
        "6.4.7.3828"
    }
}

pub fn boot_block(idx: usize) -> &'static str {
    if model(idx) == "CCX 500" {
        "3.1.0.0093"
    } else {
        "3.0.6.0123"
    }
}

/// The user part of line `line` (1-based): unique across 50,000 phones and a few lines.
pub fn line_user(idx: usize, line: u8) -> String {
    (1000 + idx as u64 + (u64::from(line) - 1) * 100_000).to_string()
}

pub fn line_uri(idx: usize, line: u8) -> String {
    format!("sip:{}@{PBX_DOMAIN}", line_user(idx, line))
}

/// Uptime a phone has when the simulator starts: a few hours to ten days, varied by index.
pub fn initial_uptime(idx: usize) -> Duration {
    let hours = (idx as u64 * 7) % 240 + 1;
    let secs = (idx as u64 * 37) % 3600;
    Duration::from_secs(hours * 3600 + secs)
}

/// The parameters every phone starts with, per source; [`seeds`] adds those of each line.
const FIXED_SEEDS: [(Source, &str, &str); 27] = {
    use Source::*;
    [
        (Default, "apps.restapi.enabled", "1"),
        (Default, "up.screenCapture.enabled", "0"),
        (Default, "diags.pcap.enabled", "0"),
        (Default, "diags.pcap.background.enabled", "0"),
        (Default, "diags.pcap.background.filter", ""),
        (Default, "diags.pcap.background.bufferSize", "1024"),
        (Default, "diags.pcap.background.duration", "60"),
        (Default, "diags.pcap.background.uploadURL", ""),
        (Default, "diags.pcap.remote.enabled", "0"),
        (Default, "device.set", "0"),
        (Default, "device.prov.serverName", ""),
        (Default, "device.prov.serverType", "FTP"),
        (Default, "device.prov.user", "PlcmSpIp"),
        (Default, "prov.polling.enabled", "0"),
        (Default, "prov.polling.mode", "abs"),
        (Default, "prov.polling.period", "86400"),
        (Default, "tcpIpApp.sntp.address", ""),
        (Default, "up.screenSaver.enabled", "0"),
        (
            Default,
            "voIpProt.SIP.specialEvent.checkSync.alwaysReboot",
            "0",
        ),
        (Default, "voIpProt.server.1.address", ""),
        (Default, "voIpProt.server.1.port", "0"),
        (ConfigFiles, "voIpProt.server.1.address", PBX_DOMAIN),
        (ConfigFiles, "voIpProt.server.1.port", "5060"),
        (ConfigFiles, "prov.polling.enabled", "1"),
        (ConfigFiles, "tcpIpApp.sntp.address", "ntp.sim"),
        (Device, "device.prov.serverName", PROV_SERVER),
        (Device, "device.prov.serverType", "HTTPS"),
    ]
};

/// The parameters a phone starts with, per source. Computed from the index on demand rather
/// than stored per phone.
pub fn seeds(idx: usize, lines: u8) -> Vec<(Source, String, String)> {
    let mut v: Vec<(Source, String, String)> = FIXED_SEEDS
        .iter()
        .map(|&(s, n, v)| (s, n.to_owned(), v.to_owned()))
        .collect();
    for line in 1..=lines {
        v.extend(LINE_SEEDS.iter().map(|&(s, field)| {
            (
                s,
                format!("reg.{line}.{field}"),
                line_seed(idx, line, s, field),
            )
        }));
    }
    v
}

/// The parameters each line `reg.<line>.<field>` starts with, per source; values by [`line_seed`].
const LINE_SEEDS: [(Source, &str); 5] = [
    (Source::Default, "address"),
    (Source::ConfigFiles, "address"),
    (Source::ConfigFiles, "label"),
    (Source::ConfigFiles, "auth.userId"),
    (Source::ConfigFiles, "displayName"),
];

/// The value `source` starts a line parameter of [`LINE_SEEDS`] with (the firmware's default is
/// empty).
fn line_seed(idx: usize, line: u8, source: Source, field: &str) -> String {
    match (source, field) {
        (Source::Default, _) => String::new(),
        (_, "displayName") => format!("Phone {idx} line {line}"),
        _ => line_user(idx, line),
    }
}

/// The value `source` starts with for `name`: what [`seeds`] holds, found without building it
/// (a phone looks parameters up on every request).
pub fn seed(idx: usize, lines: u8, source: Source, name: &str) -> Option<String> {
    if let Some(&(_, _, v)) = FIXED_SEEDS
        .iter()
        .find(|(s, n, _)| *s == source && *n == name)
    {
        return Some(v.to_owned());
    }
    let (digits, field) = name.strip_prefix("reg.")?.split_once('.')?;
    let line: u8 = digits.parse().ok().filter(|l| (1..=lines).contains(l))?;
    if digits != line.to_string() {
        return None; // "reg.01.label" or "reg.+1.label" is not line 1's
    }
    LINE_SEEDS
        .iter()
        .any(|&(s, f)| s == source && f == field)
        .then(|| line_seed(idx, line, source, field))
}

/// The call in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub handle: u32,
    pub line: u8,
    pub dest: String,
    /// `SIP`, `TEL` or `H323`, as dialled.
    pub kind: &'static str,
    pub started: Instant,
}

impl Call {
    pub fn handle_hex(&self) -> String {
        format!("0x{:08x}", self.handle)
    }
}

/// Changes on top of the seeded parameters, one map per changeable source.
type Overrides = [BTreeMap<String, String>; 5];

/// Answer codes of the device API (`Status` in the envelope).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok,
    InvalidInput,
    DeviceBusy,
    LineNotRegistered,
    NotAllowed,
    LineDoesNotExist,
    NoCall,
    InputTooLarge,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "2000",
            Code::InvalidInput => "4000",
            Code::DeviceBusy => "4001",
            Code::LineNotRegistered => "4002",
            Code::NotAllowed => "4003",
            Code::LineDoesNotExist => "4005",
            Code::NoCall => "4007",
            Code::InputTooLarge => "4009",
        }
    }
}

/// Dial types the API accepts.
pub fn dial_kind(s: &str) -> Option<&'static str> {
    match s.to_ascii_uppercase().as_str() {
        "SIP" => Some("SIP"),
        "TEL" => Some("TEL"),
        "H323" => Some("H323"),
        _ => None,
    }
}

/// One TLS identity of a phone: the acceptor presenting it and its key's fingerprint.
pub struct PhoneTls {
    /// `key_generation` it was made for, and whether it is an impostor's.
    pub generation: u32,
    pub swapped: bool,
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub cert_der: Vec<u8>,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo, lowercase hex.
    pub key_sha256: String,
}

impl std::fmt::Debug for PhoneTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhoneTls")
            .field("generation", &self.generation)
            .field("swapped", &self.swapped)
            .field("key_sha256", &self.key_sha256)
            .finish()
    }
}

/// One simulated phone.
#[derive(Debug)]
pub struct Phone {
    idx: u32,
    /// A device-API request is being processed (the API serves one at a time).
    pub busy: bool,
    pub fault: Fault,
    pub hostile: Hostile,
    /// Registration state a `flapping_lines` phone answers next.
    pub flap: bool,
    /// Bumped by a factory reset: the phone makes a new key pair, as real phones do. A reboot
    /// keeps the key.
    pub key_generation: u32,
    /// Another host took over the phone's address: connections present that host's certificate.
    pub swapped: bool,
    /// The phone's own TLS identity (made on first use, again after a factory reset).
    pub tls: Option<std::sync::Arc<PhoneTls>>,
    /// The identity an impostor presents while `swapped`.
    pub impostor: Option<std::sync::Arc<PhoneTls>>,
    /// When the phone came up (in the future while it is rebooting).
    booted_at: Instant,
    /// Uptime it already had at `booted_at` (only before its first simulated reboot).
    uptime_base: Duration,
    pub reboots: u32,
    /// Bit `n - 1` set = line `n` registered.
    registered: u32,
    call: Option<Box<Call>>,
    last_call_end: Option<Instant>,
    next_handle: u32,
    /// Sources whose seeded values were cleared by a reset.
    cleared_seeds: u8,
    overrides: Option<Box<Overrides>>,
    /// The background capture, running or ended with its file kept.
    capture: Option<Box<CaptureFile>>,
    pub captures_uploaded: u32,
    /// Filter of the last uploaded capture.
    capture_filter: Option<Box<str>>,
    pub config_updates: u32,
    /// Firmware installed by an upgrade (else the model's own).
    firmware_override: Option<Box<str>>,
    /// Offered at the next configuration update.
    pub offer: Option<Box<Offer>>,
    /// Configuration updates are refused (4003) while set.
    pub refuse_config_updates: bool,
    pub upgrades: u32,
    pub failed_upgrades: u32,
    /// Log files PUT to the provisioning server, and the last answer.
    pub log_uploads: u32,
    pub last_upload_status: Option<u16>,
    /// Cancelled to reset every open connection of the phone (reboot, `refuse`); created when the
    /// first connection needs one.
    conns: Option<CancellationToken>,
}

impl Phone {
    pub fn new(idx: usize, now: Instant, fleet: &Fleet) -> Phone {
        let lines = u32::from(fleet.lines.min(MAX_LINES));
        Phone {
            idx: idx as u32,
            busy: false,
            fault: Fault::default(),
            hostile: Hostile::None,
            flap: false,
            key_generation: 0,
            swapped: false,
            tls: None,
            impostor: None,
            booted_at: now,
            uptime_base: initial_uptime(idx),
            reboots: 0,
            registered: if lines >= 32 {
                u32::MAX
            } else {
                (1u32 << lines) - 1
            },
            call: None,
            last_call_end: None,
            next_handle: 0xb53e_0000 ^ ((idx as u32) << 4),
            cleared_seeds: 0,
            overrides: None,
            capture: None,
            captures_uploaded: 0,
            capture_filter: None,
            config_updates: 0,
            firmware_override: None,
            offer: None,
            refuse_config_updates: false,
            upgrades: 0,
            failed_upgrades: 0,
            log_uploads: 0,
            last_upload_status: None,
            conns: None,
        }
    }

    pub fn idx(&self) -> usize {
        self.idx as usize
    }

    /// The TLS identity presented now, when it has been made.
    pub fn current_tls(&self) -> Option<&std::sync::Arc<PhoneTls>> {
        let slot = if self.swapped {
            &self.impostor
        } else {
            &self.tls
        };
        slot.as_ref()
            .filter(|t| t.swapped || t.generation == self.key_generation)
    }

    /// Down while rebooting: every connection is reset.
    pub fn is_down(&self, now: Instant) -> bool {
        now < self.booted_at
    }

    pub fn uptime(&self, now: Instant) -> Duration {
        self.uptime_base + now.saturating_duration_since(self.booted_at)
    }

    /// The token open connections watch, created on first use.
    pub fn conn_token(&mut self) -> CancellationToken {
        self.conns
            .get_or_insert_with(CancellationToken::new)
            .clone()
    }

    /// Takes the connections' token: the caller cancels it to reset them; later connections get a
    /// new one.
    pub fn take_conn_token(&mut self) -> Option<CancellationToken> {
        self.conns.take()
    }

    /// Starts a reboot: down for `reboot_time` from `now`, the call dropped, uptime counted from
    /// the moment it is back. Returns the token whose cancellation resets open connections.
    pub fn start_reboot(&mut self, fleet: &Fleet, now: Instant) -> Option<CancellationToken> {
        self.reboots += 1;
        self.end_call(now);
        self.booted_at = now + fleet.reboot_time;
        self.uptime_base = Duration::ZERO;
        // A running background capture ends with the boot (its file is kept), and starts over
        // when its parameters still say so.
        if let Some(c) = self.capture.as_mut()
            && c.ended.is_none()
        {
            c.ended = Some(now);
        }
        self.refresh_capture_with(fleet, self.booted_at);
        self.take_conn_token()
    }

    /// The firmware the phone runs.
    pub fn firmware(&self) -> String {
        self.firmware_override
            .as_deref()
            .map(str::to_owned)
            .unwrap_or_else(|| firmware(self.idx()).to_owned())
    }

    /// A configuration update (check-sync). With a firmware on offer the phone reboots to
    /// install it: afterwards it runs the new one, or still the old one when the upgrade fails.
    /// Returns whether the phone reboots.
    pub fn config_update(&mut self) -> Result<bool, Code> {
        if self.refuse_config_updates {
            return Err(Code::NotAllowed);
        }
        self.config_updates += 1;
        let Some(offer) = self.offer.take() else {
            return Ok(false);
        };
        if offer.fail {
            self.failed_upgrades += 1;
        } else {
            self.upgrades += 1;
            self.firmware_override = Some(offer.firmware.into_boxed_str());
        }
        Ok(true)
    }

    // ----- lines and calls

    pub fn line_registered(&self, line: u8) -> bool {
        (1..=MAX_LINES).contains(&line) && self.registered & (1 << (line - 1)) != 0
    }

    pub fn set_line_registered(&mut self, line: u8, registered: bool) {
        if (1..=MAX_LINES).contains(&line) {
            let bit = 1 << (line - 1);
            if registered {
                self.registered |= bit;
            } else {
                self.registered &= !bit;
            }
        }
    }

    pub fn call(&self) -> Option<&Call> {
        self.call.as_deref()
    }

    /// `idle`, or the state of the call.
    pub fn call_state(&self) -> &'static str {
        if self.call.is_some() {
            "Connected"
        } else {
            "idle"
        }
    }

    pub fn last_call_end(&self) -> Option<Instant> {
        self.last_call_end
    }

    /// `POST /api/v1/callctrl/dial` once the body is parsed: checks in the order the API reports.
    pub fn dial(
        &mut self,
        fleet: &Fleet,
        dest: &str,
        line: u8,
        kind: &'static str,
        now: Instant,
    ) -> Code {
        if dest.trim().is_empty() {
            return Code::InvalidInput;
        }
        if line == 0 || line > fleet.lines {
            return Code::LineDoesNotExist;
        }
        if !self.line_registered(line) {
            return Code::LineNotRegistered;
        }
        if self.call.is_some() {
            return Code::DeviceBusy;
        }
        self.next_handle = self.next_handle.wrapping_add(1);
        self.call = Some(Box::new(Call {
            handle: self.next_handle,
            line,
            dest: dest.trim().to_owned(),
            kind,
            started: now,
        }));
        Code::Ok
    }

    /// Ends the call; `NoCall` when idle or when `reference` names another call.
    pub fn end_call_ref(&mut self, reference: Option<&str>, now: Instant) -> Code {
        match &self.call {
            None => Code::NoCall,
            Some(c) if reference.is_some_and(|r| !r.eq_ignore_ascii_case(&c.handle_hex())) => {
                Code::NoCall
            }
            Some(_) => {
                self.end_call(now);
                Code::Ok
            }
        }
    }

    fn end_call(&mut self, now: Instant) {
        if self.call.take().is_some() {
            self.last_call_end = Some(now);
        }
    }

    // ----- parameters

    /// The value a source holds for `name` (its change, else its seed unless cleared).
    fn source_value(&self, fleet: &Fleet, source: Source, name: &str) -> Option<String> {
        if let (Some(o), Some(slot)) = (&self.overrides, source.slot())
            && let Some(v) = o[slot].get(name)
        {
            return Some(v.clone());
        }
        if self.cleared_seeds & source.bit() != 0 {
            return None;
        }
        seed(self.idx(), fleet.lines, source, name)
    }

    /// The value in force and where it comes from, skipping the sources in `skip`.
    fn effective_without(
        &self,
        fleet: &Fleet,
        name: &str,
        skip: &[Source],
    ) -> Option<(String, Source)> {
        Source::LAYERS
            .iter()
            .chain(std::iter::once(&Source::Default))
            .filter(|s| !skip.contains(s))
            .find_map(|&s| self.source_value(fleet, s, name).map(|v| (v, s)))
    }

    pub fn effective(&self, fleet: &Fleet, name: &str) -> Option<(String, Source)> {
        self.effective_without(fleet, name, &[])
    }

    fn is_on(&self, fleet: &Fleet, name: &str) -> bool {
        self.effective(fleet, name).is_some_and(|(v, _)| v == "1")
    }

    /// Every parameter a source holds, by name.
    pub fn source_params(&self, fleet: &Fleet, source: Source) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if self.cleared_seeds & source.bit() == 0 {
            for (s, n, v) in seeds(self.idx(), fleet.lines) {
                if s == source {
                    out.insert(n, v);
                }
            }
        }
        if let (Some(o), Some(slot)) = (&self.overrides, source.slot()) {
            out.extend(o[slot].iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        out
    }

    /// Every known parameter with the value in force, leaving out the sources in `skip`.
    pub fn all_params(&self, fleet: &Fleet, skip: &[Source]) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        // Lowest precedence first, so that higher sources overwrite.
        for s in std::iter::once(Source::Default).chain(Source::LAYERS.iter().rev().copied()) {
            if !skip.contains(&s) {
                out.extend(self.source_params(fleet, s));
            }
        }
        out
    }

    /// Sets `name` in `source` (not `Default`, which is fixed).
    pub fn set_param(
        &mut self,
        fleet: &Fleet,
        source: Source,
        name: &str,
        value: &str,
        now: Instant,
    ) {
        let Some(slot) = source.slot() else { return };
        let o = self.overrides.get_or_insert_with(Default::default);
        o[slot].insert(name.to_owned(), value.to_owned());
        self.refresh_capture_with(fleet, now);
    }

    /// Forgets everything a source holds, its seeds included.
    pub fn clear_source(&mut self, fleet: &Fleet, source: Source, now: Instant) {
        let Some(slot) = source.slot() else { return };
        if let Some(o) = &mut self.overrides {
            o[slot].clear();
            if o.iter().all(BTreeMap::is_empty) {
                self.overrides = None;
            }
        }
        self.cleared_seeds |= source.bit();
        self.refresh_capture_with(fleet, now);
    }

    /// Every parameter back to how the phone was made (the reboot is the caller's).
    pub fn factory_reset(&mut self, fleet: &Fleet, now: Instant) {
        self.overrides = None;
        self.cleared_seeds = 0;
        self.refresh_capture_with(fleet, now);
        // A factory reset wipes the device certificate too: the phone makes a new key.
        self.key_generation = self.key_generation.wrapping_add(1);
    }

    /// The REST API answers only while `apps.restapi.enabled` is "1".
    pub fn api_enabled(&self, fleet: &Fleet) -> bool {
        self.is_on(fleet, "apps.restapi.enabled")
    }

    pub fn screen_capture_enabled(&self, fleet: &Fleet) -> bool {
        self.is_on(fleet, "up.screenCapture.enabled")
    }

    // ----- packet capture

    fn refresh_capture_with(&mut self, fleet: &Fleet, now: Instant) {
        if !self.is_on(fleet, "diags.pcap.enabled") {
            // Capturing turned off altogether: the file goes too.
            self.capture = None;
            return;
        }
        let want = self.is_on(fleet, "diags.pcap.background.enabled");
        let running = self.capture.as_ref().is_some_and(|c| c.ended.is_none());
        match (want, running) {
            (true, false) => {
                let num = |name: &str, default: u64| {
                    self.effective(fleet, name)
                        .and_then(|(v, _)| v.trim().parse::<u64>().ok())
                        .filter(|n| *n > 0)
                        .unwrap_or(default)
                };
                self.capture = Some(Box::new(CaptureFile {
                    started: now,
                    ended: None,
                    filter: self
                        .effective(fleet, "diags.pcap.background.filter")
                        .map(|(v, _)| v)
                        .unwrap_or_default(),
                    max_bytes: num("diags.pcap.background.bufferSize", 1024) * 1024,
                    max_time: Duration::from_secs(num("diags.pcap.background.duration", 60) * 60),
                    rate: fleet.capture_rate,
                }));
            }
            (false, true) => {
                if let Some(c) = self.capture.as_mut() {
                    c.ended = Some(now);
                }
            }
            _ => {}
        }
    }

    /// A running capture that reached its size or time limit stops by itself (the phone turns
    /// its background capture off and keeps the file).
    pub fn tick_capture(&mut self, fleet: &Fleet, now: Instant) {
        let Some(c) = self.capture.as_mut() else {
            return;
        };
        if c.ended.is_some() {
            return;
        }
        let at = c.limit_at();
        if at <= now {
            c.ended = Some(at);
            let o = self.overrides.get_or_insert_with(Default::default);
            if let Some(slot) = Source::Local.slot() {
                o[slot].insert("diags.pcap.background.enabled".into(), "0".into());
            }
            let _ = fleet;
        }
    }

    /// Capturing now.
    pub fn capturing(&self) -> bool {
        self.capture.as_ref().is_some_and(|c| c.ended.is_none())
    }

    pub fn capture_since(&self) -> Option<Instant> {
        self.capture
            .as_ref()
            .filter(|c| c.ended.is_none())
            .map(|c| c.started)
    }

    pub fn capture_file(&self) -> Option<&CaptureFile> {
        self.capture.as_deref()
    }

    pub fn capture_filter(&self) -> Option<&str> {
        self.capture_filter.as_deref()
    }

    /// `POST /api/v1/mgmt/network/uploadBgCapture`: ends a running capture (the file is kept)
    /// and hands back what is to be uploaded. `NotAllowed` when there is no capture file.
    pub fn upload_capture(&mut self, fleet: &Fleet, now: Instant) -> Result<CaptureFile, Code> {
        self.tick_capture(fleet, now);
        let Some(c) = self.capture.as_ref() else {
            return Err(Code::NotAllowed);
        };
        let file = CaptureFile {
            ended: Some(c.ended.unwrap_or(now)),
            ..(**c).clone()
        };
        self.captures_uploaded += 1;
        self.capture_filter = Some(file.filter.clone().into_boxed_str());
        if c.ended.is_none() {
            self.set_param(
                fleet,
                Source::Local,
                "diags.pcap.background.enabled",
                "0",
                now,
            );
        }
        Ok(file)
    }
}

/// A phone as `GET /sim/state` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhoneState {
    pub index: usize,
    pub address: String,
    pub mac: String,
    pub model: String,
    pub firmware: String,
    pub reboots: u32,
    pub uptime_s: u64,
    /// `idle`, or the state of the call (`Connected`).
    pub call_state: String,
    pub call: Option<CallSnapshot>,
    /// Every known parameter with the value in force.
    pub params: BTreeMap<String, String>,
    pub config_updates: u32,
    pub capturing: bool,
    /// Bytes in the capture file (running or ended), when there is one.
    pub capture_bytes: Option<u64>,
    pub captures_uploaded: u32,
    /// Filter of the last uploaded capture.
    pub capture_filter: Option<String>,
    pub lines: Vec<LineSnapshot>,
    pub fault: Fault,
    pub busy: bool,
    pub upgrades: u32,
    pub failed_upgrades: u32,
    pub log_uploads: u32,
    /// HTTP status of the last upload the phone made (a log, a capture).
    pub last_upload_status: Option<u16>,
    pub hostile: Hostile,
    /// Factory resets so far: each gave the phone a new key.
    pub key_generation: u32,
    /// Whether an impostor's certificate is presented.
    pub swapped: bool,
    /// Fingerprint of the key presented now (None until the first TLS connection made it).
    pub key_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineSnapshot {
    pub line: u8,
    pub registered: bool,
    pub uri: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallSnapshot {
    pub handle: String,
    pub line: u8,
    pub dest: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub duration_s: u64,
}

impl Phone {
    pub fn lines(&self, fleet: &Fleet) -> Vec<LineSnapshot> {
        (1..=fleet.lines)
            .map(|line| LineSnapshot {
                line,
                registered: self.line_registered(line),
                uri: line_uri(self.idx(), line),
            })
            .collect()
    }

    pub fn snapshot(&self, fleet: &Fleet, now: Instant) -> PhoneState {
        let idx = self.idx();
        PhoneState {
            index: idx,
            address: fleet.ip(idx).to_string(),
            mac: mac(idx),
            model: model(idx).to_owned(),
            firmware: self.firmware(),
            reboots: self.reboots,
            uptime_s: self.uptime(now).as_secs(),
            call_state: self.call_state().to_owned(),
            call: self.call().map(|c| CallSnapshot {
                handle: c.handle_hex(),
                line: c.line,
                dest: c.dest.clone(),
                kind: c.kind.to_owned(),
                duration_s: now.saturating_duration_since(c.started).as_secs(),
            }),
            params: self.all_params(fleet, &[]),
            config_updates: self.config_updates,
            capturing: self.capturing(),
            capture_bytes: self.capture.as_ref().map(|c| c.size_at(now)),
            captures_uploaded: self.captures_uploaded,
            capture_filter: self.capture_filter().map(str::to_owned),
            lines: self.lines(fleet),
            fault: self.fault,
            busy: self.busy,
            upgrades: self.upgrades,
            failed_upgrades: self.failed_upgrades,
            log_uploads: self.log_uploads,
            last_upload_status: self.last_upload_status,
            hostile: self.hostile,
            key_generation: self.key_generation,
            swapped: self.swapped,
            key_sha256: self.current_tls().map(|t| t.key_sha256.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Fleet {
        Fleet {
            base: Ipv4Addr::new(127, 0, 0, 10),
            count: 8,
            lines: 2,
            reboot_time: Duration::from_secs(3),
            capture_rate: 1000,
        }
    }

    #[test]
    fn a_seed_looked_up_is_the_one_the_list_holds() {
        for lines in [1u8, 2, 12] {
            let all = seeds(77, lines);
            for (source, name, value) in &all {
                assert_eq!(
                    seed(77, lines, *source, name).as_deref(),
                    Some(value.as_str()),
                    "{source:?} {name}"
                );
            }
            let others = [Source::Cloud, Source::Web, Source::Local];
            for (_, name, _) in &all {
                for s in others {
                    assert_eq!(seed(77, lines, s, name), None, "{s:?} {name}");
                }
            }
        }
        for name in [
            "reg.3.label",
            "reg.0.label",
            "reg.01.label",
            "reg.+1.label",
            "reg.1.nope",
            "reg.1",
            "reg.",
            "nope",
        ] {
            assert_eq!(seed(77, 2, Source::ConfigFiles, name), None, "{name}");
        }
    }

    #[test]
    fn identity_by_index() {
        let f = fleet();
        assert_eq!(mac(0), "0004f2000000");
        assert_eq!(mac(0x1234), "0004f2001234");
        assert_eq!(f.ip(3), Ipv4Addr::new(127, 0, 0, 13));
        assert_eq!(f.index_of(Ipv4Addr::new(127, 0, 0, 13)), Some(3));
        assert_eq!(f.index_of(Ipv4Addr::new(127, 0, 0, 18)), None);
        assert_eq!(f.index_of(Ipv4Addr::new(127, 0, 0, 9)), None);
        assert_eq!(
            (model(0), model(1), model(2), model(3), model(4)),
            ("VVX 411", "VVX 450", "Trio 8800", "CCX 500", "VVX 411")
        );
        assert_eq!(firmware(0), "5.9.6.2327");
        assert!(newer_firmware(1) && !newer_firmware(2));
        assert_eq!(line_uri(5, 1), "sip:1005@pbx.sim");
        assert_eq!(line_uri(5, 2), "sip:101005@pbx.sim");
        assert_ne!(initial_uptime(1), initial_uptime(2));
    }

    #[test]
    fn reboot_resets_uptime_and_call() {
        let f = fleet();
        let t0 = Instant::now();
        let mut p = Phone::new(1, t0, &f);
        assert!(p.uptime(t0) >= Duration::from_secs(3600));
        assert_eq!(p.dial(&f, "1234", 1, "TEL", t0), Code::Ok);
        p.start_reboot(&f, t0);
        assert!(p.is_down(t0 + Duration::from_secs(2)));
        assert!(!p.is_down(t0 + Duration::from_secs(3)));
        assert_eq!(
            p.uptime(t0 + Duration::from_secs(5)),
            Duration::from_secs(2)
        );
        assert_eq!((p.reboots, p.call_state()), (1, "idle"));
    }

    #[test]
    fn dial_rules() {
        let f = fleet();
        let t0 = Instant::now();
        let mut p = Phone::new(0, t0, &f);
        assert_eq!(p.dial(&f, " ", 1, "TEL", t0), Code::InvalidInput);
        assert_eq!(p.dial(&f, "1", 3, "TEL", t0), Code::LineDoesNotExist);
        assert_eq!(p.dial(&f, "1", 0, "TEL", t0), Code::LineDoesNotExist);
        p.set_line_registered(2, false);
        assert_eq!(p.dial(&f, "1", 2, "TEL", t0), Code::LineNotRegistered);
        assert_eq!(p.dial(&f, "1", 1, "SIP", t0), Code::Ok);
        assert_eq!(p.dial(&f, "2", 1, "SIP", t0), Code::DeviceBusy);
        assert_eq!(p.end_call_ref(Some("0x0"), t0), Code::NoCall);
        let h = p.call().unwrap().handle_hex();
        assert_eq!(p.end_call_ref(Some(&h), t0), Code::Ok);
        assert_eq!(p.end_call_ref(None, t0), Code::NoCall);
        assert_eq!(dial_kind("sip"), Some("SIP"));
        assert_eq!(dial_kind("ISDN"), None);
    }

    #[test]
    fn layered_params_and_resets() {
        let f = fleet();
        let t0 = Instant::now();
        let mut p = Phone::new(4, t0, &f);
        let eff = |p: &Phone, n: &str| p.effective(&f, n).map(|(v, s)| (v, s.as_str()));
        assert_eq!(
            eff(&p, "reg.1.address"),
            Some(("1004".into(), "config_files"))
        );
        assert_eq!(
            eff(&p, "reg.2.address"),
            Some(("101004".into(), "config_files"))
        );
        assert_eq!(eff(&p, "reg.3.address"), None);
        assert_eq!(
            eff(&p, "device.prov.serverName"),
            Some((PROV_SERVER.into(), "device"))
        );
        assert_eq!(
            eff(&p, "apps.restapi.enabled"),
            Some(("1".into(), "default"))
        );
        assert_eq!(eff(&p, "no.such.param"), None);

        p.set_param(&f, Source::Local, "reg.1.address", "777", t0);
        p.set_param(&f, Source::Web, "reg.1.address", "888", t0);
        p.set_param(&f, Source::Web, "made.up", "x", t0);
        assert_eq!(eff(&p, "reg.1.address"), Some(("777".into(), "local")));
        p.clear_source(&f, Source::Local, t0);
        assert_eq!(eff(&p, "reg.1.address"), Some(("888".into(), "web")));
        assert_eq!(p.source_params(&f, Source::Web).len(), 2);

        // Clearing the device settings drops their seeds too.
        p.clear_source(&f, Source::Device, t0);
        assert_eq!(
            eff(&p, "device.prov.serverName"),
            Some(("".into(), "default"))
        );
        assert!(p.source_params(&f, Source::Device).is_empty());

        p.factory_reset(&f, t0);
        assert_eq!(
            eff(&p, "reg.1.address"),
            Some(("1004".into(), "config_files"))
        );
        assert_eq!(eff(&p, "made.up"), None);
        assert_eq!(
            eff(&p, "device.prov.serverName"),
            Some((PROV_SERVER.into(), "device"))
        );

        let all = p.all_params(&f, &[Source::Device]);
        assert_eq!(all["device.prov.serverName"], "");
        assert_eq!(all["reg.1.address"], "1004");
    }

    #[test]
    fn capture_follows_params() {
        let f = fleet();
        let t0 = Instant::now();
        let mut p = Phone::new(0, t0, &f);
        assert_eq!(p.upload_capture(&f, t0), Err(Code::NotAllowed));
        p.set_param(&f, Source::Local, "diags.pcap.enabled", "1", t0);
        assert!(!p.capturing());
        p.set_param(
            &f,
            Source::Local,
            "diags.pcap.background.filter",
            "udp port 5060",
            t0,
        );
        p.set_param(
            &f,
            Source::Local,
            "diags.pcap.background.bufferSize",
            "4",
            t0,
        );
        p.set_param(&f, Source::Local, "diags.pcap.background.enabled", "1", t0);
        assert!(p.capturing());
        let file = p.upload_capture(&f, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(file.size_at(t0 + Duration::from_secs(60)), 2000);
        assert!(!p.capturing());
        assert_eq!(
            (p.captures_uploaded, p.capture_filter()),
            (1, Some("udp port 5060"))
        );
        // The file stays until capturing is turned off altogether.
        assert!(p.upload_capture(&f, t0 + Duration::from_secs(3)).is_ok());
        p.set_param(&f, Source::Local, "diags.pcap.enabled", "0", t0);
        assert_eq!(p.upload_capture(&f, t0), Err(Code::NotAllowed));
    }

    #[test]
    fn a_capture_stops_by_itself_at_its_size_limit() {
        let f = fleet();
        let t0 = Instant::now();
        let mut p = Phone::new(0, t0, &f);
        p.set_param(&f, Source::Local, "diags.pcap.enabled", "1", t0);
        p.set_param(
            &f,
            Source::Local,
            "diags.pcap.background.bufferSize",
            "2",
            t0,
        );
        p.set_param(&f, Source::Local, "diags.pcap.background.enabled", "1", t0);
        p.tick_capture(&f, t0 + Duration::from_secs(1));
        assert!(p.capturing());
        p.tick_capture(&f, t0 + Duration::from_secs(5));
        assert!(!p.capturing());
        assert_eq!(
            p.effective(&f, "diags.pcap.background.enabled").unwrap().0,
            "0"
        );
        assert_eq!(
            p.capture_file()
                .unwrap()
                .size_at(t0 + Duration::from_secs(9)),
            2048
        );
    }

    #[test]
    fn upgrades_on_offer_and_refused_updates() {
        let f = fleet();
        let mut p = Phone::new(1, Instant::now(), &f);
        assert_eq!(p.config_update(), Ok(false));
        p.offer = Some(Box::new(Offer {
            firmware: "6.4.8.1000".into(),
            fail: true,
        }));
        assert_eq!(p.config_update(), Ok(true));
        assert_eq!(p.firmware(), "6.4.7.4560");
        p.offer = Some(Box::new(Offer {
            firmware: "6.4.8.1000".into(),
            fail: false,
        }));
        assert_eq!(p.config_update(), Ok(true));
        assert_eq!(p.firmware(), "6.4.8.1000");
        p.refuse_config_updates = true;
        assert_eq!(p.config_update(), Err(Code::NotAllowed));
        assert_eq!(p.config_updates, 3);
    }
}
