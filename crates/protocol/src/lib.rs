//! The ucrelay relay-to-cloud protocol, version 1: every message a relay and a cloud exchange, as
//! plain serde types, with the endpoint paths and the command names. Pure: no I/O, no clocks, no
//! async runtime, only serde. The relay (`ucrelay-relay`) and the reference cloud (`ucrelay-sim`)
//! each build on it independently, and docs/protocol.md is its reference: every JSON example there
//! is parsed into its type and written back by this crate's tests, so a change here is a change
//! to the document, and the other way round.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. Sent at registration; a cloud that cannot speak it answers
/// 400 `unsupported_version`.
pub const PROTOCOL_VERSION: u32 = 1;

pub const PATH_REGISTER: &str = "/relay/v1/register";
pub const PATH_HEARTBEAT: &str = "/relay/v1/heartbeat";
pub const PATH_CHANNEL: &str = "/relay/v1/channel";
pub const PATH_RESULTS: &str = "/relay/v1/results";
pub const PATH_DEVICE_STATUS: &str = "/relay/v1/device-status";
pub const PATH_IMAGES: &str = "/relay/v1/images";
pub const PATH_DEVICES: &str = "/relay/v1/devices";
/// Files the relay hands over (captures, exports, log bundles): `POST` announces one,
/// `GET {PATH_ARTIFACTS}/{id}` tells how much the cloud holds, `PUT {PATH_ARTIFACTS}/{id}` carries
/// a chunk with `Content-Range`.
pub const PATH_ARTIFACTS: &str = "/relay/v1/artifacts";

/// `POST /relay/v1/register`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub protocol: u32,
    pub tenant_id: String,
    pub pin: String,
    /// Generated once by the relay and kept in its store: the relay's identity across restarts.
    pub relay_id: String,
    pub hostname: String,
    pub version: String,
    #[serde(default)]
    pub fqdn: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The device subnets this relay serves (`[devices].subnets`, CIDR); empty when its device
    /// plane is off. The cloud routes device work only to a relay whose subnets hold the device.
    /// Absent (a relay older than the fleet): the cloud takes it to reach every device outside
    /// isolated sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnets: Option<Vec<String>>,
}

/// 200 answer to a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// Bearer token for every later call. Opaque to the relay.
    pub token: String,
    /// The interval the cloud asks for; the relay uses the smaller of this and its configured interval.
    pub heartbeat_interval_s: u64,
    /// Cloud clock at the time of the answer, RFC 3339, for skew diagnostics.
    #[serde(default)]
    pub server_time: Option<String>,
}

/// `POST /relay/v1/heartbeat` (bearer token).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// Increases by one per heartbeat sent in this process; restarts at 1 after a relay restart.
    pub seq: u64,
    pub uptime_s: u64,
    pub version: String,
    pub agents: AgentsState,
    #[serde(default)]
    pub images: Vec<ImageState>,
    #[serde(default)]
    pub devices: DeviceCounts,
    #[serde(default)]
    pub tasks: TaskCounts,
    /// Results stored in the outbox and not yet acknowledged by the cloud.
    #[serde(default)]
    pub results_pending: u64,
    /// The names devices use for this relay (`[edge].fqdn`), as at registration: repeated so that
    /// a change reaches the cloud without a new registration.
    #[serde(default)]
    pub fqdn: Vec<String>,
    /// The relay's IP addresses; the cloud places the relay in the site whose subnets hold one.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The device subnets this relay serves (CIDR), as at registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnets: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AgentsState {
    pub management: AgentState,
    pub download: AgentState,
    pub provisioning: AgentState,
}

/// State of one of the relay's jobs as reported to the cloud.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AgentState {
    /// `ok`, `degraded`, `off`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageState {
    pub id: String,
    /// `synced`, `syncing`, `failed`.
    pub state: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeviceCounts {
    pub known: u64,
    pub online: u64,
    pub offline: u64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskCounts {
    pub scheduled: u64,
    pub executing: u64,
    pub done: u64,
}

/// 200 answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub next_interval_s: u64,
    /// Revision of the tenant's image manifest; a change tells the download agent to sync.
    #[serde(default)]
    pub images_revision: u64,
    /// Revision of the tenant's device list; a change tells the relay to fetch `GET /relay/v1/devices`.
    #[serde(default)]
    pub devices_revision: u64,
    #[serde(default)]
    pub server_time: Option<String>,
    /// The tenant's setting "device logs are uploaded to the cloud". `false`: the cloud does not
    /// take device logs, so the relay keeps a copy of each log a device uploads through its edge.
    /// Absent: no change to what the relay last heard (it starts with `true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_upload: Option<bool>,
    /// The site the cloud placed this relay in (by its addresses, longest prefix); absent when its
    /// addresses are in no site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteInfo>,
    /// The tasks whose targets this relay holds a lease on (see `TaskSpec::lease_s`). A leased
    /// task missing from this list, in an answer to a heartbeat sent after the relay stored the
    /// task, has been handed to another relay: the relay starts none of its remaining targets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<String>,
}

/// A site as the cloud tells a relay about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteInfo {
    pub name: String,
    /// An isolated site's devices are served only by its own relays, which serve nothing else.
    #[serde(default)]
    pub isolated: bool,
    /// The base URL the site's devices download images from (`https://<shared FQDN>/` unless
    /// the site sets its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_path: Option<String>,
}

/// `GET /relay/v1/images` (bearer token): the images this tenant's relays must hold.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ImageManifest {
    /// Changes whenever the list or any file changes; heartbeats echo it so relays know to sync.
    pub revision: u64,
    pub images: Vec<Image>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub id: String,
    #[serde(default)]
    pub product: String,
    #[serde(default)]
    pub version: String,
    pub files: Vec<ImageFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageFile {
    /// URL path under which devices download the file from the relay's edge, e.g. `/fw/sip.ld`.
    pub path: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: String,
    /// Where the relay fetches it: absolute, or relative to the cloud URL. Must support Range.
    pub url: String,
}

/// Body of every 4xx/5xx answer from the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// Machine-readable error codes. Unknown codes from a newer cloud decode as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 401 at registration: the tenant exists but this PIN is not (or no longer) valid.
    PinRejected,
    /// 401 at registration: no such tenant.
    UnknownTenant,
    /// 401 on any authenticated call: the token is unknown, expired or revoked; register again.
    TokenInvalid,
    /// 400: the body does not parse or a field is invalid.
    BadRequest,
    /// 400 at registration: the cloud does not speak the relay's protocol version.
    UnsupportedVersion,
    /// 409: the request conflicts with current state (for example a PIN reset inside the cooldown).
    Conflict,
    /// 404.
    NotFound,
    /// 429 or 503: slow down; `Retry-After` may say for how long.
    Busy,
    /// 413: the body, or one record in it, is larger than the cloud takes. The relay sets the
    /// record aside like one refused with `bad_request`.
    TooLarge,
    /// 5xx.
    Internal,
    /// 422 on the last chunk of an artifact: the bytes received do not hash to the SHA-256 the
    /// relay announced; the cloud dropped them and the upload starts over.
    ChecksumMismatch,
    #[serde(other)]
    Other,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::PinRejected => "pin_rejected",
            ErrorCode::UnknownTenant => "unknown_tenant",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Conflict => "conflict",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Busy => "busy",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::ChecksumMismatch => "checksum_mismatch",
            ErrorCode::Other => "other",
        }
    }
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}

/// Outcome of a command or of one target of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
    NotApplicable,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::NotApplicable => "not_applicable",
        }
    }
}

/// Messages from the cloud to the relay on the command channel (WebSocket text frames, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CloudMessage {
    /// First frame after the upgrade: the cloud confirms the session.
    Hello {
        relay_id: String,
        session_id: String,
        /// The tasks this relay holds a lease on as this connection opens; like
        /// `HeartbeatResponse::leases`, a leased task stored before this frame and missing here
        /// was handed to another relay.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        leases: Option<Vec<String>>,
    },
    /// A command to run. `id` is the cloud's and is echoed in the ack and in the result.
    Command(Command),
    /// Re-fetch the image manifest now.
    ImagesSync {
        #[serde(default)]
        revision: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub params: serde_json::Value,
}

/// Messages from the relay to the cloud on the command channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayMessage {
    /// The command was received, validated as a message, and stored; its result follows through
    /// `POST /relay/v1/results`.
    Ack { id: String },
    /// The cloud sent something the relay could not use. `id` names the offending command when known.
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        code: ChannelErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelErrorCode {
    /// Not JSON, or JSON without the fields its type needs.
    MalformedMessage,
    /// A `type` this relay does not know (a newer cloud); ignored.
    UnknownMessage,
    /// Binary frames are not part of the protocol.
    UnsupportedFrame,
    /// The relay's command queue is full: the command was neither stored nor acknowledged. The
    /// cloud sends it again later, backing off.
    Busy,
    /// The relay cannot store the command now (its disk is full): neither acked nor run. The
    /// relay reconnects the channel once its store works again, so the cloud sends it again.
    StorageUnavailable,
    /// A code from a newer peer.
    #[serde(other)]
    Other,
}

/// Why a text frame could not be used, with the command id when one could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub id: Option<String>,
    pub code: ChannelErrorCode,
    pub message: String,
}

impl CloudMessage {
    /// Decodes one text frame, telling a malformed frame from one of an unknown type so that the
    /// relay can answer each properly and keep the channel up.
    pub fn decode(text: &str) -> Result<CloudMessage, DecodeError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| DecodeError {
            id: None,
            code: ChannelErrorCode::MalformedMessage,
            message: format!("not JSON: {e}"),
        })?;
        let id = value.get("id").and_then(|v| v.as_str()).map(str::to_owned);
        let Some(kind) = value
            .get("type")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
        else {
            return Err(DecodeError {
                id,
                code: ChannelErrorCode::MalformedMessage,
                message: "missing string field \"type\"".into(),
            });
        };
        if !matches!(kind.as_str(), "hello" | "command" | "images_sync") {
            return Err(DecodeError {
                id,
                code: ChannelErrorCode::UnknownMessage,
                message: format!("unknown message type {kind:?}"),
            });
        }
        serde_json::from_value(value).map_err(|e| DecodeError {
            id,
            code: ChannelErrorCode::MalformedMessage,
            message: format!("bad {kind} message: {e}"),
        })
    }
}

/// One result as stored in the relay's outbox and sent in `POST /relay/v1/results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    /// Stable id, assigned when the result is stored; retries reuse it so the cloud can de-duplicate.
    pub result_id: String,
    /// The command id (channel commands) or task id (tasks) this result belongs to.
    pub command_id: String,
    /// For tasks: the target device; absent for relay-level commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The command or task type, e.g. `ping`, `reboot`.
    pub name: String,
    pub result: Outcome,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default)]
    pub payload: serde_json::Value,
    /// RFC 3339 time the relay finished the work.
    pub finished_at: String,
    /// Set on a task's progress records (`name` = `task`, no `target`): the task's state and totals
    /// at `finished_at`. The latest record by `progress.seq` wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TaskProgress>,
}

/// `POST /relay/v1/results` (bearer token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultsBatch {
    pub results: Vec<ResultRecord>,
}

/// 200 answer to a results batch: the ids the cloud has durably taken (new or already known).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ResultsAck {
    pub accepted: Vec<String>,
    /// How many of `accepted` the cloud had seen before (retries after a lost answer).
    #[serde(default)]
    pub duplicates: u64,
}

// ---------------------------------------------------------------------------------------------
// Device plane: commands and tasks against LAN devices, the cloud's device list, monitoring reports.

/// Command names that act on one LAN device (`params.target` = `IP[:PORT]`), and task types.
pub const DEVICE_COMMANDS: &[&str] = &[
    "reboot",
    "reset",
    "dial",
    "get_params",
    "set_params",
    "get_config",
    "capture_screen",
    "packet_capture",
    "check_sync",
    "upgrade",
    "probe",
    "export_device",
    "restore_config_backup",
];

/// Commands about what the relay keeps for a device, answered without contacting it: the
/// configuration backups (by MAC) and the device logs the relay collected.
pub const RELAY_DEVICE_COMMANDS: &[&str] = &[
    "list_config_backups",
    "get_config_backup",
    "delete_config_backup",
    "get_device_logs",
];

/// Name of the channel command that creates a scheduled task; its `params` are a [`TaskSpec`] and
/// the command id is the task id.
pub const TASK_COMMAND: &str = "task";
/// Edit a task while it is still scheduled: params `{"task_id", ...TaskSpec fields to replace}`.
pub const TASK_UPDATE_COMMAND: &str = "task_update";
/// Cancel a task while it is still scheduled: params `{"task_id"}`.
pub const TASK_CANCEL_COMMAND: &str = "task_cancel";
/// Install the tenant's edge certificate: params [`CertificateUpload`]. `success` once it serves
/// (payload [`CertificateAnswer`]); `failure` with every failed rule otherwise.
pub const INSTALL_CERTIFICATE_COMMAND: &str = "install_certificate";

/// The params of an `install_certificate` command: a PFX uploaded in the cloud for the whole
/// tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateUpload {
    /// The cloud's id of this upload.
    pub upload_id: String,
    /// The PKCS#12 file, standard base64.
    pub pfx_base64: String,
    pub password: String,
}

/// The payload of a relay's answer to `install_certificate`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CertificateAnswer {
    pub upload_id: String,
    /// `installed` (serving now), `stored` (passed every rule but a local `edge.pfx` takes
    /// precedence) or `refused`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// Every rule that failed, by its `ucrelay check` name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<FailedRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedRule {
    pub rule: String,
    pub message: String,
}
/// Accept a device's new certificate key: params `{"target", "fingerprint"?}`.
pub const DEVICE_TRUST_COMMAND: &str = "device_trust";
/// The relay-level commands of v1 (besides [`DEVICE_COMMANDS`] and the task commands).
pub const RELAY_COMMANDS: &[&str] = &["ping", "relay_status"];

/// Every command name v1 defines; anything else is answered `not_applicable`.
pub fn is_known_command(name: &str) -> bool {
    RELAY_COMMANDS.contains(&name)
        || DEVICE_COMMANDS.contains(&name)
        || RELAY_DEVICE_COMMANDS.contains(&name)
        || [
            TASK_COMMAND,
            TASK_UPDATE_COMMAND,
            TASK_CANCEL_COMMAND,
            DEVICE_TRUST_COMMAND,
            INSTALL_CERTIFICATE_COMMAND,
        ]
        .contains(&name)
}

/// Alarm kinds monitoring and the device plane raise (`Alarm::kind`).
pub const ALARM_DEVICE_OFFLINE: &str = "device_offline";
pub const ALARM_DEVICE_ONLINE: &str = "device_online";
pub const ALARM_LINE_UNREGISTERED: &str = "line_unregistered";
pub const ALARM_LINE_REGISTERED: &str = "line_registered";
/// A device presented a certificate key other than the one the relay pinned; nothing was sent.
pub const ALARM_IDENTITY_CHANGED: &str = "device_identity_changed";
/// One poll of a device found more changes than the relay raises alarms for; this one counts the
/// rest.
pub const ALARM_SUPPRESSED: &str = "alarms_suppressed";

/// A scheduled task as the cloud sends it (the `params` of a `task` command).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Human name shown in `ucrelay tasks`; defaults to the type.
    #[serde(default)]
    pub name: String,
    /// One of [`DEVICE_COMMANDS`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Devices, each `IP` or `IP:PORT`.
    pub targets: Vec<String>,
    /// The command parameters applied to every target (without `target`).
    #[serde(default)]
    pub payload: serde_json::Value,
    /// RFC 3339 start time; absent or in the past = run now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// Stop starting new targets once more than this percentage of finished targets failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold_pct: Option<u8>,
    /// Targets worked on at once (the relay caps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Deadline per target, seconds (the relay's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_timeout_s: Option<u64>,
    /// The task this command is part of, when the command id is not the task id: a further share
    /// of a task's targets for a relay that may already hold the task (it then adds them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The targets are leased: another relay can take them over. The relay starts a target only
    /// while its channel is up and the cloud confirmed the lease (heartbeat answer or `hello`)
    /// less than half of this many seconds ago; the cloud moves unfinished targets of a relay it
    /// has not heard from for this long. Absent: the task is this relay's alone and runs even
    /// while the cloud is unreachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_s: Option<u64>,
    /// The lease these targets belong to (the id of the command that opened it). A relay that
    /// holds the task under another lease drops that lease's unstarted targets first: the cloud
    /// opens a new lease only after taking the old one back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
}

/// A task's state and totals, reported in `progress` records and shown by `ucrelay tasks`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskProgress {
    /// Increases with every progress record of this task, so the cloud keeps the newest.
    pub seq: u64,
    /// `scheduled`, `executing`, `done`, `cancelled`, `halted` (failure threshold reached).
    pub status: String,
    pub total: u64,
    pub success: u64,
    pub failure: u64,
    pub not_applicable: u64,
    pub in_progress: u64,
}

/// One device in the cloud's device list (`GET /relay/v1/devices`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// `IP` or `IP:PORT` of the device's REST API.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeviceList {
    pub revision: u64,
    pub devices: Vec<DeviceEntry>,
}

/// One SIP line of a device as polled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineStatus {
    pub line: u32,
    pub registered: bool,
    #[serde(default)]
    pub uri: String,
}

/// What one poll of a device found.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeviceReport {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    pub online: bool,
    /// Why the device counts as offline (or why a field is missing).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub firmware: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<u64>,
    /// RFC 3339: poll time minus uptime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reboot: Option<String>,
    #[serde(default)]
    pub lines: Vec<LineStatus>,
    /// `idle`, or the state of the active call (`Connected`, `RingBack`, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub call_state: String,
    pub polled_at: String,
}

/// A change worth an operator's attention, raised by monitoring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alarm {
    /// Stable id: the cloud de-duplicates retries by it.
    pub id: String,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `device_offline`, `device_online`, `line_unregistered`, `line_registered`,
    /// `firmware_upgrade_failed`, `firmware_upgraded`, `config_update_failed`, `config_updated`,
    /// `device_logs_capped`, `device_identity_changed`, `alarms_suppressed`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    pub message: String,
    pub at: String,
}

/// CPU and memory of one device (`device/stats`), read on monitoring's own schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStats {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Average CPU load, percent.
    pub cpu_pct: f64,
    /// Memory as the device counts it (its own unit), and how much is in use (used minus
    /// reclaimable), also as a percentage of the total.
    pub memory_total: u64,
    pub memory_used: u64,
    pub memory_used_pct: f64,
    /// RFC 3339 time of the reading.
    pub at: String,
}

/// `POST /relay/v1/device-status` (bearer token).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeviceStatusBatch {
    #[serde(default)]
    pub reports: Vec<DeviceReport>,
    #[serde(default)]
    pub alarms: Vec<Alarm>,
    /// CPU and memory readings (latest per device).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stats: Vec<DeviceStats>,
}

// ---------------------------------------------------------------------------------------------
// Artifacts: files that leave the results path (captures, exports, log bundles).

/// `POST /relay/v1/artifacts`: the relay announces a file it holds and is about to upload. The
/// same offer may be sent again (after a restart, a lost answer): the cloud answers with what it
/// already holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactOffer {
    /// Chosen by the relay, stable across retries.
    pub artifact_id: String,
    /// File name, e.g. `0004f2000031_2026.11.23_100000.pcap.tar.gz`.
    pub name: String,
    /// `screen_capture`, `packet_capture`, `config_export`, `config_backup`, `device_logs`,
    /// `device_export` or `result` (a result payload too large for a results batch).
    pub kind: String,
    pub content_type: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: String,
    /// The command (or task) the file belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    /// The device it is about: address and MAC when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// RFC 3339 time the relay stored the file.
    pub created_at: String,
}

/// What the cloud holds of an artifact: the answer to the offer, to `GET` and to every `PUT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactStatus {
    pub artifact_id: String,
    pub size: u64,
    /// Bytes the cloud has stored durably, from the start of the file: the next chunk starts here.
    pub received: u64,
    /// `partial` (bytes from `received` on are wanted) or `complete` (every byte in and the
    /// SHA-256 checked).
    pub state: String,
    /// The SHA-256 the cloud computed, once `complete`: the relay deletes its copy only when it
    /// equals the one it announced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// How a result payload names an artifact (`"artifact": {...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub artifact_id: String,
    pub name: String,
    pub kind: String,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
}

#[cfg(test)]
mod doc_examples;

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
        let text = serde_json::to_string(v).unwrap();
        let back: T = serde_json::from_str(&text).unwrap();
        assert_eq!(&back, v, "round trip through {text}");
    }

    #[test]
    fn register_round_trip() {
        round_trip(&RegisterRequest {
            protocol: PROTOCOL_VERSION,
            tenant_id: "acme".into(),
            pin: "123456".into(),
            relay_id: "r-1".into(),
            hostname: "vm1".into(),
            version: "0.1.0".into(),
            fqdn: vec!["relay.corp".into()],
            addresses: vec!["10.0.0.5".into()],
            subnets: Some(vec!["10.20.0.0/16".into()]),
        });
        round_trip(&RegisterResponse {
            token: "t".into(),
            heartbeat_interval_s: 120,
            server_time: Some("2026-01-01T00:00:00Z".into()),
        });
    }

    #[test]
    fn heartbeat_round_trip() {
        let mut hb = HeartbeatRequest {
            seq: 7,
            uptime_s: 99,
            version: "0.1.0".into(),
            ..Default::default()
        };
        hb.agents.management = AgentState {
            state: "ok".into(),
            reason: None,
        };
        hb.agents.download = AgentState {
            state: "degraded".into(),
            reason: Some("disk".into()),
        };
        hb.images.push(ImageState {
            id: "img".into(),
            state: "syncing".into(),
            bytes_done: 1,
            bytes_total: 2,
            reason: None,
        });
        round_trip(&hb);
        round_trip(&HeartbeatResponse {
            next_interval_s: 120,
            images_revision: 3,
            devices_revision: 2,
            server_time: None,
            site: Some(SiteInfo {
                name: "hq".into(),
                isolated: true,
                download_path: None,
            }),
            leases: vec!["task-1".into()],
            log_upload: Some(false),
        });
    }

    #[test]
    fn error_body_wire_form() {
        let body = ErrorBody::new(ErrorCode::PinRejected, "PIN rejected");
        let text = serde_json::to_string(&body).unwrap();
        assert_eq!(
            text,
            r#"{"error":{"code":"pin_rejected","message":"PIN rejected"}}"#
        );
        round_trip(&body);
        let newer: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"from_the_future","message":"x"}}"#).unwrap();
        assert_eq!(newer.error.code, ErrorCode::Other);
    }

    #[test]
    fn channel_messages_round_trip() {
        round_trip(&CloudMessage::Hello {
            relay_id: "r".into(),
            session_id: "s".into(),
            leases: None,
        });
        round_trip(&CloudMessage::Hello {
            relay_id: "r".into(),
            session_id: "s".into(),
            leases: Some(vec![]),
        });
        round_trip(&CloudMessage::Command(Command {
            id: "c1".into(),
            name: "ping".into(),
            params: serde_json::json!({"echo": "x"}),
        }));
        round_trip(&CloudMessage::ImagesSync { revision: 4 });
        round_trip(&RelayMessage::Ack { id: "c1".into() });
        round_trip(&RelayMessage::Error {
            id: Some("c1".into()),
            code: ChannelErrorCode::MalformedMessage,
            message: "m".into(),
        });
        let text = serde_json::to_string(&RelayMessage::Ack { id: "c1".into() }).unwrap();
        assert_eq!(text, r#"{"type":"ack","id":"c1"}"#);
    }

    #[test]
    fn decode_tells_malformed_from_unknown() {
        let cmd = CloudMessage::decode(r#"{"type":"command","id":"c1","name":"ping"}"#).unwrap();
        assert_eq!(
            cmd,
            CloudMessage::Command(Command {
                id: "c1".into(),
                name: "ping".into(),
                params: serde_json::Value::Null
            })
        );
        let e = CloudMessage::decode("{not json").unwrap_err();
        assert_eq!(e.code, ChannelErrorCode::MalformedMessage);
        let e = CloudMessage::decode(r#"{"id":"x"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ChannelErrorCode::MalformedMessage, Some("x"))
        );
        let e = CloudMessage::decode(r#"{"type":"teleport","id":"c9"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ChannelErrorCode::UnknownMessage, Some("c9"))
        );
        let e = CloudMessage::decode(r#"{"type":"command","id":"c2"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ChannelErrorCode::MalformedMessage, Some("c2"))
        );
    }

    #[test]
    fn manifest_round_trip() {
        round_trip(&ImageManifest {
            revision: 3,
            images: vec![Image {
                id: "vvx-6.4.7".into(),
                product: "VVX".into(),
                version: "6.4.7".into(),
                files: vec![ImageFile {
                    path: "/fw/sip.ld".into(),
                    size: 10,
                    sha256: "ab".repeat(32),
                    url: "/files/sip.ld".into(),
                }],
            }],
        });
    }

    #[test]
    fn results_round_trip() {
        round_trip(&ResultsBatch {
            results: vec![ResultRecord {
                result_id: "r1".into(),
                command_id: "c1".into(),
                target: Some("10.0.0.9".into()),
                name: "reboot".into(),
                result: Outcome::NotApplicable,
                reason: "model has no such mode".into(),
                payload: serde_json::json!({"a": 1}),
                finished_at: "2026-01-01T00:00:00Z".into(),
                progress: None,
            }],
        });
        round_trip(&ResultsAck {
            accepted: vec!["r1".into()],
            duplicates: 1,
        });
    }
}
