//! HTTP handlers of the reference cloud: the relay-facing protocol endpoints (`/relay/v1/...`),
//! the JSON test API (`/sim/...`) and fault injection.
//!
//! Every error answer is a protocol `ErrorBody`. Request bodies are read and parsed here rather
//! than by axum's extractors so that a bad body gets that form too. Nothing here logs a PIN or a
//! token.

use super::Shared;
use super::artifacts;
use super::assign::Liveness;
use super::certificates;
use super::channel::{self, Outgoing};
use super::devices;
use super::fleet::{self, Site};
use super::images;
use super::provisioning;
use super::state::{
    self, CommandRecord, CommandState, PinMatch, PinRefusal, RelayRecord, TokenRecord, fmt_time,
};
use crate::protocol::{
    ErrorBody, ErrorCode, HeartbeatRequest, HeartbeatResponse, PATH_ARTIFACTS, PATH_CHANNEL,
    PATH_DEVICE_STATUS, PATH_DEVICES, PATH_HEARTBEAT, PATH_IMAGES, PATH_REGISTER, PATH_RESULTS,
    PROTOCOL_VERSION, RegisterRequest, RegisterResponse, ResultRecord, ResultsAck, ResultsBatch,
};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

/// Largest request body taken: a full results batch (1000 records) with payloads fits easily.
const MAX_BODY: usize = 16 << 20;
/// Most records one results batch may carry.
pub const MAX_RESULTS_PER_BATCH: usize = 1000;
/// Longest id (relay, result, command) accepted.
const MAX_ID_LEN: usize = 200;
/// Most commands one `POST /sim/flood` creates.
const MAX_FLOOD: usize = 100_000;

/// Per-record limits of what relays post (`GET`/`POST /sim/limits`): a result, device report or
/// alarm larger than this, as JSON, makes the whole batch 413 `too_large`, naming the record.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Limits {
    pub max_record_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_record_bytes: MAX_BODY,
        }
    }
}

/// 413 `too_large` for record `what` of `size` bytes when it is over the limit.
pub(crate) fn check_record_size(shared: &Shared, what: &str, size: usize) -> ApiResult<()> {
    let limit = shared.lock().limits.max_record_bytes;
    if size <= limit {
        return Ok(());
    }
    {
        let mut rt = shared.lock();
        rt.db.p.stats.records_too_large += 1;
        rt.changed();
    }
    Err(ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::TooLarge,
        format!("{what} is {size} bytes; at most {limit} per record"),
    ))
}

/// An error answer: HTTP status plus protocol error code and a message in plain words.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }
    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, ErrorCode::Conflict, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            message,
        )
    }
    fn token_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorCode::TokenInvalid, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody::new(self.code, self.message))).into_response()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Fault injected into the relay-facing endpoints (register, heartbeat, results, images, files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum FaultMode {
    #[serde(rename = "none")]
    None,
    /// 500 with an `internal` ErrorBody.
    #[serde(rename = "http_500")]
    Http500,
    /// 200 with a body that is not JSON.
    #[serde(rename = "garbage")]
    Garbage,
    /// The request is read and never answered (until the cloud shuts down).
    #[serde(rename = "hang")]
    Hang,
}

pub(crate) fn router(shared: Arc<Shared>) -> axum::Router {
    let router = axum::Router::new();
    // Only with `--images`: otherwise `/files/...` stays a path of the provisioning tree.
    let router = if shared.args.images.is_some() {
        router.route("/files/{name}", get(images::serve_file))
    } else {
        router
    };
    router
        .route(PATH_REGISTER, post(register))
        .route(PATH_HEARTBEAT, post(heartbeat))
        .route(PATH_CHANNEL, get(channel::upgrade))
        .route(PATH_RESULTS, post(results))
        .route(PATH_IMAGES, get(images))
        .route(PATH_DEVICE_STATUS, post(devices::device_status))
        .route(PATH_DEVICES, get(devices::device_list))
        .route(PATH_ARTIFACTS, post(artifacts::offer))
        .route(
            "/relay/v1/artifacts/{id}",
            get(artifacts::status).put(artifacts::put),
        )
        .route("/sim/artifacts", get(artifacts::sim_list))
        .route(
            "/sim/artifacts/faults",
            get(artifacts::sim_get_faults).post(artifacts::sim_set_faults),
        )
        .route("/sim/artifacts/{id}", get(artifacts::sim_get))
        .route("/sim/artifacts/{id}/content", get(artifacts::sim_content))
        .route(
            "/sim/tenants/{tenant}/settings",
            get(sim_get_settings).post(sim_set_settings),
        )
        .route("/sim/relays", get(sim_relays))
        .route("/sim/tenants/{tenant}/reset-pin", post(sim_reset_pin))
        .route("/sim/stats", get(sim_stats))
        .route("/sim/commands", post(sim_create_command))
        .route("/sim/flood", post(sim_flood))
        .route("/sim/limits", get(sim_get_limits).post(sim_set_limits))
        .route("/sim/commands/{id}", get(sim_get_command))
        .route("/sim/results", get(sim_results))
        .route(
            "/sim/tasks",
            get(devices::sim_list_tasks).post(devices::sim_create_task),
        )
        .route(
            "/sim/tasks/{id}",
            get(devices::sim_get_task)
                .delete(devices::sim_cancel_task)
                .patch(devices::sim_update_task),
        )
        .route(
            "/sim/devices",
            get(devices::sim_get_devices).post(devices::sim_set_devices),
        )
        .route("/sim/alarms", get(devices::sim_alarms))
        .route("/sim/sites", get(sim_sites).post(sim_create_site))
        .route("/sim/certificates", post(certificates::sim_upload))
        .route("/sim/certificates/{id}", get(certificates::sim_get_upload))
        .route("/sim/channel/raw", post(sim_channel_raw))
        .route("/sim/channel/errors", get(sim_channel_errors))
        .route("/sim/channel/freeze", post(sim_channel_freeze))
        .route("/sim/faults", get(sim_get_fault).post(sim_set_fault))
        .route("/sim/images", get(images::sim_list))
        .route("/sim/images/rescan", post(images::sim_rescan))
        .route("/sim/images/sync", post(images::sim_sync))
        .route(
            "/sim/images/faults",
            get(images::sim_get_faults).post(images::sim_set_faults),
        )
        .route(
            "/sim/provisioning/log",
            get(sim_provisioning_log).delete(sim_clear_provisioning_log),
        )
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

/// Paths outside the API: the provisioning tree when it is on, else 404.
async fn fallback(State(shared): State<Arc<Shared>>, req: axum::extract::Request) -> Response {
    if let Some(prov) = &shared.prov
        && !provisioning::is_reserved(req.uri().path())
    {
        return provisioning::handle(shared.clone(), prov, req).await;
    }
    not_found(req.uri().clone()).await.into_response()
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::BadRequest,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

/// Reads a whole body, refusing one beyond [`MAX_BODY`].
pub(crate) async fn read_body(body: Body) -> ApiResult<bytes::Bytes> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!("cannot read the request body (at most {MAX_BODY} bytes): {e}"),
        )
    })
}

pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// Like [`parse`], but an empty body means `{}` (test-API calls whose fields are all optional).
pub(crate) fn parse_or_empty<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        parse(b"{}")
    } else {
        parse(bytes)
    }
}

pub(crate) fn check_id(what: &str, id: &str) -> ApiResult<()> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "{what} must be 1 to {MAX_ID_LEN} characters without control characters"
        )));
    }
    Ok(())
}

/// The relay behind the request's bearer token, or 401 `token_invalid`.
pub(crate) fn bearer_relay(shared: &Shared, headers: &HeaderMap) -> ApiResult<String> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::token_invalid("missing Authorization: Bearer token; register first")
        })?;
    let token = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .ok_or_else(|| ApiError::token_invalid("Authorization must be a Bearer token"))?;
    let now = shared.now();
    let rt = shared.lock();
    rt.db.authenticate(token, now).map(|t| t.relay_id.clone()).ok_or_else(|| {
        ApiError::token_invalid("token unknown, expired or revoked (the PIN it was obtained with may have been reset); register again")
    })
}

/// Applies the current fault mode: `Some(answer)` when the request is to be faulted.
pub(crate) async fn fault_gate(shared: &Shared, path: &str) -> Option<Response> {
    let mode = {
        let mut rt = shared.lock();
        let mode = rt.fault;
        if mode != FaultMode::None {
            rt.db.p.stats.faulted_requests += 1;
            rt.changed();
        }
        mode
    };
    if mode != FaultMode::None {
        debug!(path, ?mode, "injected fault");
    }
    match mode {
        FaultMode::None => None,
        FaultMode::Http500 => {
            Some(ApiError::internal("injected fault: internal error").into_response())
        }
        FaultMode::Garbage => Some(
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/html")],
                "<html>oops",
            )
                .into_response(),
        ),
        FaultMode::Hang => {
            info!(path, "injected fault: request left hanging");
            shared.cancel.cancelled().await;
            Some(
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Busy,
                    "cloud shutting down",
                )
                .into_response(),
            )
        }
    }
}

/// Awaits the state file write for `generation`; a failure is a 500, since the change that
/// was just made is not durable.
pub(crate) async fn persist(shared: &Shared, generation: u64) -> ApiResult<()> {
    shared.persist(generation).await.map_err(|e| {
        error!(error = %format!("{e:#}"), "sim cloud: cannot write the state file");
        ApiError::internal("cannot write the cloud's state file")
    })
}

/// Whole seconds, like the protocol document's examples; the relay only uses it for skew hints.
fn server_time(shared: &Shared) -> Option<String> {
    let secs = shared
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(
        jiff::Timestamp::from_second(i64::try_from(secs).ok()?)
            .ok()?
            .to_string(),
    )
}

fn interval_secs(shared: &Shared) -> u64 {
    shared.args.heartbeat_interval.as_secs().max(1)
}

// ---------------------------------------------------------------------------------------------
// Relay-facing protocol endpoints.

async fn register(State(shared): State<Arc<Shared>>, body: Body) -> Response {
    if let Some(r) = fault_gate(&shared, PATH_REGISTER).await {
        return r;
    }
    match register_inner(&shared, body).await {
        Ok(resp) => Json(resp).into_response(),
        Err(e) => {
            let mut rt = shared.lock();
            rt.db.p.stats.registrations_rejected += 1;
            rt.changed();
            e.into_response()
        }
    }
}

async fn register_inner(shared: &Shared, body: Body) -> ApiResult<RegisterResponse> {
    let bytes = read_body(body).await?;
    let value: Value = parse(&bytes)?;
    // The version is checked before the fields: a newer protocol may well not parse as v1.
    if let Some(p) = value.get("protocol")
        && p.as_u64() != Some(u64::from(PROTOCOL_VERSION))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::UnsupportedVersion,
            format!("this cloud speaks protocol {PROTOCOL_VERSION}; the relay sent protocol {p}"),
        ));
    }
    let req: RegisterRequest = serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid registration: {e}")))?;
    check_id("relay_id", &req.relay_id)?;
    if req.hostname.len() > 255
        || req.version.len() > 100
        || req.fqdn.len() > 100
        || req.addresses.len() > 100
        || req.subnets.as_ref().is_some_and(|s| s.len() > 1000)
    {
        return Err(ApiError::bad_request(
            "hostname, version, fqdn or addresses too long",
        ));
    }

    let now = shared.now();
    let token = uuid::Uuid::new_v4().to_string();
    let generation = {
        let mut rt = shared.lock();
        let Some(tenant) = rt.db.p.tenants.get(&req.tenant_id) else {
            warn!(tenant = %req.tenant_id, relay_id = %req.relay_id, "registration refused: unknown tenant");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::UnknownTenant,
                format!("unknown tenant {:?}", req.tenant_id),
            ));
        };
        let matched = match tenant.check_pin(&req.pin, now) {
            Ok(m) => m,
            Err(refusal) => {
                warn!(tenant = %req.tenant_id, relay_id = %req.relay_id, "registration refused: PIN not valid");
                let message = match refusal {
                    PinRefusal::Expired(until) => format!(
                        "PIN not valid for tenant {}: it was replaced by a PIN reset and stopped being accepted at {}",
                        req.tenant_id,
                        fmt_time(until)
                    ),
                    PinRefusal::Wrong => format!("PIN not valid for tenant {}", req.tenant_id),
                };
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::PinRejected,
                    message,
                ));
            }
        };
        let pin_generation = tenant.generation_of(matched);
        let old_pin = matched == PinMatch::Previous;
        rt.db.add_token(
            token.clone(),
            TokenRecord {
                relay_id: req.relay_id.clone(),
                tenant_id: req.tenant_id.clone(),
                pin_generation,
                old_pin,
                issued_at: now,
            },
            now,
        );
        let registrations = {
            let relay = rt
                .db
                .p
                .relays
                .entry(req.relay_id.clone())
                .or_insert_with(|| RelayRecord {
                    relay_id: req.relay_id.clone(),
                    tenant_id: req.tenant_id.clone(),
                    hostname: String::new(),
                    version: String::new(),
                    fqdn: Vec::new(),
                    addresses: Vec::new(),
                    subnets: None,
                    registrations: 0,
                    registered_at: now,
                    heartbeats: 0,
                    last_heartbeat: None,
                    last_heartbeat_request: None,
                    channel_connections: 0,
                });
            relay.tenant_id = req.tenant_id.clone();
            relay.hostname = req.hostname.clone();
            relay.version = req.version.clone();
            relay.fqdn = req.fqdn.clone();
            relay.addresses = req.addresses.clone();
            relay.subnets = req.subnets.clone();
            relay.registrations += 1;
            relay.registered_at = now;
            relay.registrations
        };
        if registrations == 1 {
            certificates::on_new_relay(&mut rt, &req.tenant_id, &req.relay_id);
        }
        rt.db.p.last_registered = Some(req.relay_id.clone());
        rt.db.p.stats.registrations += 1;
        info!(
            relay_id = %req.relay_id,
            hostname = %req.hostname,
            tenant = %req.tenant_id,
            registrations,
            with_old_pin = old_pin,
            "relay registered"
        );
        rt.changed()
    };
    persist(shared, generation).await?;
    Ok(RegisterResponse {
        token,
        heartbeat_interval_s: interval_secs(shared),
        server_time: server_time(shared),
    })
}

async fn heartbeat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    if let Some(r) = fault_gate(&shared, PATH_HEARTBEAT).await {
        return r;
    }
    heartbeat_inner(&shared, &headers, body)
        .await
        .into_response()
}

async fn heartbeat_inner(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<Json<HeartbeatResponse>> {
    let relay_id = bearer_relay(shared, headers)?;
    let req: HeartbeatRequest = parse(&read_body(body).await?)?;
    let now = shared.now();
    let (devices_revision, site, leases, log_upload) = {
        let mut rt = shared.lock();
        let mut tenant = None;
        if let Some(relay) = rt.db.p.relays.get_mut(&relay_id) {
            relay.heartbeats += 1;
            relay.last_heartbeat = Some(now);
            // What the relay says of itself now (an older relay says nothing: keep what it
            // registered with).
            if !req.fqdn.is_empty() && req.fqdn.len() <= 100 {
                relay.fqdn = req.fqdn.clone();
            }
            if !req.addresses.is_empty() && req.addresses.len() <= 100 {
                relay.addresses = req.addresses.clone();
            }
            if req.subnets.as_ref().is_some_and(|s| s.len() <= 1000) {
                relay.subnets = req.subnets.clone();
            }
            relay.last_heartbeat_request = Some(req);
            tenant = Some(relay.tenant_id.clone());
        }
        rt.db.p.stats.heartbeats += 1;
        // Not written at once: the flusher writes heartbeats at most once a second.
        rt.changed();
        let log_upload = tenant
            .as_ref()
            .and_then(|t| rt.db.p.tenants.get(t))
            .map(|t| t.log_upload);
        match tenant {
            Some(t) => {
                rt.refresh_shares(&t, now, shared.args.inactive_after);
                let (revision, _) = rt.share_of(&t, &relay_id);
                (
                    revision,
                    site_info(&rt, &t, &relay_id),
                    rt.leases_of(&relay_id),
                    log_upload,
                )
            }
            None => (0, None, Vec::new(), log_upload),
        }
    };
    let images_revision = match shared
        .images
        .rescan_if_older(images::HEARTBEAT_RESCAN)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "sim cloud: image rescan failed; heartbeat answers the last revision");
            shared.images.revision()
        }
    };
    Ok(Json(HeartbeatResponse {
        next_interval_s: interval_secs(shared),
        images_revision,
        devices_revision,
        server_time: server_time(shared),
        site,
        leases,
        log_upload,
    }))
}

async fn results(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    if let Some(r) = fault_gate(&shared, PATH_RESULTS).await {
        return r;
    }
    results_inner(&shared, &headers, body).await.into_response()
}

fn check_result(i: usize, r: &ResultRecord) -> ApiResult<()> {
    let field = |name: &str| format!("results[{i}].{name}");
    check_id(&field("result_id"), &r.result_id)?;
    check_id(&field("command_id"), &r.command_id)?;
    if r.name.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} must not be empty",
            field("name")
        )));
    }
    if !state::is_rfc3339(&r.finished_at) {
        return Err(ApiError::bad_request(format!(
            "{} must be an RFC 3339 time, got {:?}",
            field("finished_at"),
            r.finished_at
        )));
    }
    Ok(())
}

async fn results_inner(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<Json<ResultsAck>> {
    let relay_id = bearer_relay(shared, headers)?;
    let batch: ResultsBatch = parse(&read_body(body).await?)?;
    if batch.results.len() > MAX_RESULTS_PER_BATCH {
        return Err(ApiError::bad_request(format!(
            "batch of {} results; at most {MAX_RESULTS_PER_BATCH} per batch",
            batch.results.len()
        )));
    }
    // The whole batch is checked before anything is stored: a bad batch changes nothing.
    for (i, r) in batch.results.iter().enumerate() {
        check_result(i, r)?;
        let size = serde_json::to_vec(r).map(|v| v.len()).unwrap_or(0);
        check_record_size(shared, &format!("results[{i}]"), size)?;
    }
    let (outcome, generation) = {
        let mut rt = shared.lock();
        let outcome = rt.db.ingest_results(&relay_id, batch.results);
        (outcome, rt.changed())
    };
    // Acknowledged only once durable: the relay deletes acknowledged results from its outbox.
    persist(shared, generation).await?;
    Ok(Json(ResultsAck {
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
    }))
}

async fn images(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = fault_gate(&shared, PATH_IMAGES).await {
        return r;
    }
    if let Err(e) = bearer_relay(&shared, &headers) {
        return e.into_response();
    }
    match images::manifest(&shared).await {
        Ok(m) => Json(m).into_response(),
        Err(e) => e.into_response(),
    }
}

// ---------------------------------------------------------------------------------------------
// Test API.

async fn sim_relays(State(shared): State<Arc<Shared>>) -> Json<Vec<Value>> {
    let now = shared.now();
    let mut rt = shared.lock();
    let tenants: std::collections::BTreeSet<String> = rt
        .db
        .p
        .relays
        .values()
        .map(|r| r.tenant_id.clone())
        .collect();
    for t in &tenants {
        rt.refresh_shares(t, now, shared.args.inactive_after);
    }
    let loads = rt.loads();
    let list = rt
        .db
        .p
        .relays
        .values()
        .map(|r| {
            let conn = rt.channels.get(&r.relay_id);
            let (revision, share) = rt.share_of(&r.tenant_id, &r.relay_id);
            let site = site_info(&rt, &r.tenant_id, &r.relay_id);
            json!({
                "relay_id": r.relay_id,
                "tenant_id": r.tenant_id,
                "hostname": r.hostname,
                "version": r.version,
                "fqdn": r.fqdn,
                "addresses": r.addresses,
                "subnets": r.subnets,
                "site": site.as_ref().map(|s| s.name.clone()),
                "site_isolated": site.as_ref().is_some_and(|s| s.isolated),
                "devices_assigned": share.len(),
                "devices_revision": revision,
                "targets_leased": loads.get(&r.relay_id).copied().unwrap_or(0),
                "state": if r.is_active(now, shared.args.inactive_after) { "active" } else { "inactive" },
                "heartbeats": r.heartbeats,
                "registrations": r.registrations,
                "registered_at": fmt_time(r.registered_at),
                "last_heartbeat": r.last_heartbeat.map(fmt_time),
                "last_heartbeat_request": r.last_heartbeat_request,
                "channel": if conn.is_some() { "connected" } else { "disconnected" },
                "channel_frozen": conn.is_some_and(|c| c.is_frozen()),
                "channel_connections": r.channel_connections,
            })
        })
        .collect();
    Json(list)
}

/// The site of a relay as its heartbeat answer names it, with the download path its devices use:
/// the site's own, else `https://<the first FQDN the site's relays share>/`.
pub(crate) fn site_info(
    rt: &super::Runtime,
    tenant: &str,
    relay_id: &str,
) -> Option<crate::protocol::SiteInfo> {
    let sites = rt.sites_of(tenant);
    let relay = rt.db.p.relays.get(relay_id)?;
    let i = fleet::relay_site(&sites, &relay.addresses)?;
    let site = &sites[i];
    let download_path = site
        .download_path
        .clone()
        .or_else(|| shared_fqdn(rt, tenant, &sites, Some(i)).map(|f| format!("https://{f}/")));
    Some(crate::protocol::SiteInfo {
        name: site.name.clone(),
        isolated: site.isolated,
        download_path,
    })
}

/// The FQDN every relay of a site (or of the whole tenant, when `site` is `None`) serves: the
/// first name of one relay that all the others list too.
fn shared_fqdn(
    rt: &super::Runtime,
    tenant: &str,
    sites: &[Site],
    site: Option<usize>,
) -> Option<String> {
    let relays: Vec<&super::state::RelayRecord> = rt
        .db
        .p
        .relays
        .values()
        .filter(|r| {
            r.tenant_id == tenant
                && !r.fqdn.is_empty()
                && (site.is_none() || fleet::relay_site(sites, &r.addresses) == site)
        })
        .collect();
    let first = relays.first()?;
    first
        .fqdn
        .iter()
        .find(|f| relays.iter().all(|r| r.fqdn.contains(f)))
        .cloned()
}

#[derive(Deserialize)]
struct NewSite {
    name: String,
    subnets: Vec<String>,
    #[serde(default)]
    isolated: bool,
    #[serde(default)]
    download_path: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
}

/// Most sites one tenant may have.
const MAX_SITES: usize = 2_000;

/// `POST /sim/sites`: creates a site, or replaces the one with the same name.
async fn sim_create_site(State(shared): State<Arc<Shared>>, body: Body) -> ApiResult<Json<Value>> {
    let req: NewSite = parse(&read_body(body).await?)?;
    check_id("name", &req.name)?;
    if req.subnets.is_empty() || req.subnets.len() > 256 {
        return Err(ApiError::bad_request(
            "subnets must list 1 to 256 CIDR subnets",
        ));
    }
    let mut subnets = Vec::with_capacity(req.subnets.len());
    for (i, n) in req.subnets.iter().enumerate() {
        subnets.push(n.trim().parse::<ipnet::IpNet>().map_err(|e| {
            ApiError::bad_request(format!("subnets[{i}] {n:?} is not a CIDR subnet: {e}"))
        })?);
    }
    if let Some(p) = &req.download_path
        && !(p.starts_with("https://") || p.starts_with("http://"))
    {
        return Err(ApiError::bad_request(
            "download_path must be an http(s) URL such as https://relay.branch.example/",
        ));
    }
    let tenant = req.tenant.unwrap_or_else(|| shared.args.tenant.clone());
    let site = Site {
        tenant_id: tenant.clone(),
        name: req.name.clone(),
        subnets,
        isolated: req.isolated,
        download_path: req.download_path,
    };
    let generation = {
        let mut rt = shared.lock();
        if !rt.db.p.tenants.contains_key(&tenant) {
            return Err(ApiError::not_found(format!("unknown tenant {tenant:?}")));
        }
        let sites = &mut rt.db.p.sites;
        let count = sites.iter().filter(|s| s.tenant_id == tenant).count();
        match sites
            .iter_mut()
            .find(|s| s.tenant_id == tenant && s.name == site.name)
        {
            Some(s) => *s = site.clone(),
            None if count >= MAX_SITES => {
                return Err(ApiError::bad_request(format!(
                    "tenant {tenant} has {MAX_SITES} sites already"
                )));
            }
            None => sites.push(site.clone()),
        }
        rt.changed()
    };
    info!(%tenant, site = %site.name, isolated = site.isolated, "site saved");
    persist(&shared, generation).await?;
    Ok(Json(json!({
        "name": site.name,
        "subnets": site.subnets,
        "isolated": site.isolated,
        "download_path": site.download_path,
    })))
}

/// `GET /sim/sites`: every site of the cloud's tenant with its relays and device count.
async fn sim_sites(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let rt = shared.lock();
    let tenant = &shared.args.tenant;
    let sites = rt.sites_of(tenant);
    let devices: Vec<String> = rt
        .db
        .p
        .device_lists
        .get(tenant)
        .map(|l| l.devices.iter().map(|d| d.address.clone()).collect())
        .unwrap_or_default();
    let list: Vec<Value> = sites
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let relays: Vec<&String> = rt
                .db
                .p
                .relays
                .values()
                .filter(|r| {
                    r.tenant_id == *tenant && fleet::relay_site(&sites, &r.addresses) == Some(i)
                })
                .map(|r| &r.relay_id)
                .collect();
            let count = devices
                .iter()
                .filter_map(|d| fleet::device_ip(d))
                .filter(|ip| fleet::site_of(&sites, *ip) == Some(i))
                .count();
            json!({
                "name": s.name,
                "subnets": s.subnets,
                "isolated": s.isolated,
                "download_path": s.download_path.clone().or_else(|| {
                    shared_fqdn(&rt, tenant, &sites, Some(i)).map(|f| format!("https://{f}/"))
                }),
                "relays": relays,
                "devices": count,
            })
        })
        .collect();
    Json(json!({
        "sites": list,
        "download_path": shared_fqdn(&rt, tenant, &sites, None).map(|f| format!("https://{f}/")),
    }))
}

async fn sim_reset_pin(
    State(shared): State<Arc<Shared>>,
    tenant: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(tenant_id) = tenant.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let now = shared.now();
    let (pin, until, generation) = {
        let mut rt = shared.lock();
        let tenant = rt
            .db
            .p
            .tenants
            .get_mut(&tenant_id)
            .ok_or_else(|| ApiError::not_found(format!("unknown tenant {tenant_id:?}")))?;
        let pin = state::new_pin(tenant);
        let until = tenant
            .reset_pin(pin.clone(), now, shared.args.pin_grace, shared.args.pin_reset_cooldown)
            .map_err(|e| {
                ApiError::conflict(format!(
                    "a PIN cannot be reset again within {} (last reset at {}; next reset possible at {})",
                    state::plain_duration(shared.args.pin_reset_cooldown),
                    fmt_time(e.last_reset),
                    fmt_time(e.next_allowed)
                ))
            })?;
        (pin, until, rt.changed())
    };
    info!(tenant = %tenant_id, old_pin_valid_until = %fmt_time(until), "tenant PIN reset");
    persist(&shared, generation).await?;
    Ok(Json(
        json!({"pin": pin, "old_pin_valid_until": fmt_time(until)}),
    ))
}

#[derive(Deserialize)]
struct Settings {
    #[serde(default)]
    log_upload: Option<bool>,
}

/// `GET /sim/tenants/{tenant}/settings`.
async fn sim_get_settings(
    State(shared): State<Arc<Shared>>,
    tenant: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(tenant_id) = tenant.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let rt = shared.lock();
    let t = rt
        .db
        .p
        .tenants
        .get(&tenant_id)
        .ok_or_else(|| ApiError::not_found(format!("unknown tenant {tenant_id:?}")))?;
    Ok(Json(
        json!({"tenant": tenant_id, "log_upload": t.log_upload}),
    ))
}

/// `POST /sim/tenants/{tenant}/settings` `{"log_upload": bool}`: the tenant's settings that
/// relays hear in heartbeat answers.
async fn sim_set_settings(
    State(shared): State<Arc<Shared>>,
    tenant: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let Path(tenant_id) = tenant.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let req: Settings = parse(&read_body(body).await?)?;
    let (log_upload, generation) = {
        let mut rt = shared.lock();
        let t = rt
            .db
            .p
            .tenants
            .get_mut(&tenant_id)
            .ok_or_else(|| ApiError::not_found(format!("unknown tenant {tenant_id:?}")))?;
        if let Some(v) = req.log_upload {
            t.log_upload = v;
        }
        let v = t.log_upload;
        (v, rt.changed())
    };
    info!(tenant = %tenant_id, log_upload, "tenant settings changed");
    persist(&shared, generation).await?;
    Ok(Json(json!({"tenant": tenant_id, "log_upload": log_upload})))
}

/// The persisted counters, plus `connections`: TCP connections accepted since this process
/// started (a canary origin in the tests must show 0).
async fn sim_stats(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let mut v = serde_json::to_value(shared.lock().db.p.stats.clone()).unwrap_or_default();
    v["connections"] = shared
        .connections
        .load(std::sync::atomic::Ordering::Relaxed)
        .into();
    Json(v)
}

#[derive(Deserialize)]
struct NewCommand {
    #[serde(default)]
    relay_id: Option<String>,
    name: String,
    #[serde(default)]
    params: Option<Value>,
}

/// The relay a test-API call is about: the one named, else the most recently registered one.
pub(crate) fn target_relay(rt: &super::Runtime, relay_id: Option<String>) -> ApiResult<String> {
    match relay_id {
        Some(id) if rt.db.p.relays.contains_key(&id) => Ok(id),
        Some(id) => Err(ApiError::not_found(format!("unknown relay {id:?}"))),
        None => rt
            .db
            .p
            .last_registered
            .clone()
            .ok_or_else(|| ApiError::bad_request("no relay has registered yet")),
    }
}

async fn sim_create_command(
    State(shared): State<Arc<Shared>>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let req: NewCommand = parse(&read_body(body).await?)?;
    if req.name.is_empty() {
        return Err(ApiError::bad_request("name must not be empty"));
    }
    let id = format!("cmd-{}", uuid::Uuid::new_v4());
    // An omitted `params` goes out as `{}`: relays can treat params as an object always.
    let params = req.params.unwrap_or_else(|| json!({}));
    // A device command goes to a relay that can reach its target, the least loaded one.
    let target = params
        .get("target")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let relay_id = match (req.relay_id, target) {
        (Some(r), _) => Some(r),
        (None, Some(target)) => match route_command(&shared, &target) {
            Ok(r) => r,
            Err(reason) => {
                return unreachable_command(&shared, &id, &req.name, params, &target, reason).await;
            }
        },
        (None, None) => None,
    };
    let (relay_id, state) =
        enqueue_command(&shared, relay_id, &id, req.name, params, |_, _| Ok(())).await?;
    Ok(Json(
        json!({"command_id": id, "relay_id": relay_id, "state": state.as_str()}),
    ))
}

/// The relay a device command for `target` goes to: the least loaded live relay of the tenant
/// that can reach it (else one that can, offline or not); `Ok(None)` when no relay has said what
/// it reaches (the last registered relay gets it, as before the fleet); `Err` with the reason when
/// no relay can reach it.
fn route_command(shared: &Shared, target: &str) -> Result<Option<String>, String> {
    let rt = shared.lock();
    let tenant = &shared.args.tenant;
    let sites = rt.sites_of(tenant);
    let all = rt.reach_list(
        tenant,
        &sites,
        Liveness::Any,
        shared.now(),
        shared.args.inactive_after,
    );
    if all.is_empty() {
        return Ok(None);
    }
    let plan = rt.plan(
        tenant,
        &[target.to_owned()],
        None,
        shared.now(),
        shared.args.inactive_after,
    );
    if let Some((_, reason)) = plan.unreachable.into_iter().next() {
        return Err(reason);
    }
    Ok(plan.by_relay.into_iter().next().map(|(r, _)| r))
}

/// A device command no relay can reach: stored as done, with the cloud's own failure result.
async fn unreachable_command(
    shared: &Shared,
    id: &str,
    name: &str,
    params: Value,
    target: &str,
    reason: String,
) -> ApiResult<Json<Value>> {
    let now = shared.now();
    let record = ResultRecord {
        result_id: format!("cloud-{}", uuid::Uuid::new_v4()),
        command_id: id.to_owned(),
        target: Some(target.to_owned()),
        name: name.to_owned(),
        result: crate::protocol::Outcome::Failure,
        reason: reason.clone(),
        payload: Value::Null,
        finished_at: fmt_time(now),
        progress: None,
    };
    let generation = {
        let mut rt = shared.lock();
        rt.db.add_command(CommandRecord {
            id: id.to_owned(),
            relay_id: String::new(),
            name: name.to_owned(),
            params,
            state: CommandState::Done,
            result: Some(record),
            created_at: now,
        });
        rt.changed()
    };
    info!(command_id = %id, %target, %reason, "command refused: no relay can reach its target");
    persist(shared, generation).await?;
    Ok(Json(
        json!({"command_id": id, "relay_id": null, "state": "done", "reason": reason}),
    ))
}

/// Creates command `id` for `relay_id` (default: the last registered relay), pushes it down the
/// relay's channel when that is up (else it waits for the next connection, and is sent again on
/// each connection until acknowledged), and returns once the change is in the state file.
/// `with` runs under the same lock, before the command is added, to record what belongs with it
/// (it may refuse, and then nothing is created).
pub(crate) async fn enqueue_command(
    shared: &Shared,
    relay_id: Option<String>,
    id: &str,
    name: String,
    params: Value,
    with: impl FnOnce(&mut state::Db, &str) -> ApiResult<()>,
) -> ApiResult<(String, CommandState)> {
    let (relay_id, state, generation) = {
        let mut rt = shared.lock();
        let relay_id = target_relay(&rt, relay_id)?;
        with(&mut rt.db, &relay_id)?;
        rt.db.add_command(CommandRecord {
            id: id.to_owned(),
            relay_id: relay_id.clone(),
            name: name.clone(),
            params,
            state: CommandState::Queued,
            result: None,
            created_at: shared.now(),
        });
        let idx = rt.db.p.commands.len() - 1;
        rt.deliver_command(idx);
        let state = rt.db.p.commands[idx].state;
        (relay_id, state, rt.changed())
    };
    info!(%relay_id, command_id = %id, %name, state = state.as_str(), "command created");
    persist(shared, generation).await?;
    Ok((relay_id, state))
}

#[derive(Deserialize)]
struct Flood {
    #[serde(default)]
    relay_id: Option<String>,
    name: String,
    #[serde(default)]
    params: Option<Value>,
    count: usize,
}

/// `POST /sim/flood`: a hostile cloud's command flood. `count` commands are created at once, under
/// one lock, and pushed down the relay's channel back to back (as a busy relay allows). Answers
/// their ids.
async fn sim_flood(State(shared): State<Arc<Shared>>, body: Body) -> ApiResult<Json<Value>> {
    let req: Flood = parse(&read_body(body).await?)?;
    if req.name.is_empty() {
        return Err(ApiError::bad_request("name must not be empty"));
    }
    if !(1..=MAX_FLOOD).contains(&req.count) {
        return Err(ApiError::bad_request(format!(
            "count must be 1 to {MAX_FLOOD}"
        )));
    }
    let params = req.params.unwrap_or_else(|| json!({}));
    let (relay_id, ids, generation) = {
        let mut rt = shared.lock();
        let relay_id = target_relay(&rt, req.relay_id)?;
        let mut ids = Vec::with_capacity(req.count);
        for _ in 0..req.count {
            let id = format!("cmd-{}", uuid::Uuid::new_v4());
            rt.db.add_command(CommandRecord {
                id: id.clone(),
                relay_id: relay_id.clone(),
                name: req.name.clone(),
                params: params.clone(),
                state: CommandState::Queued,
                result: None,
                created_at: shared.now(),
            });
            let idx = rt.db.p.commands.len() - 1;
            rt.deliver_command(idx);
            ids.push(id);
        }
        (relay_id, ids, rt.changed())
    };
    info!(%relay_id, count = ids.len(), name = %req.name, "command flood created");
    persist(&shared, generation).await?;
    Ok(Json(json!({"relay_id": relay_id, "command_ids": ids})))
}

async fn sim_get_limits(State(shared): State<Arc<Shared>>) -> Json<Limits> {
    Json(shared.lock().limits)
}

async fn sim_set_limits(State(shared): State<Arc<Shared>>, body: Body) -> ApiResult<Json<Limits>> {
    let req: Limits = parse(&read_body(body).await?)?;
    if req.max_record_bytes == 0 {
        return Err(ApiError::bad_request("max_record_bytes must be at least 1"));
    }
    shared.lock().limits = req;
    info!(
        max_record_bytes = req.max_record_bytes,
        "per-record limit set"
    );
    Ok(Json(req))
}

async fn sim_get_command(
    State(shared): State<Arc<Shared>>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let rt = shared.lock();
    let c = rt
        .db
        .command(&id)
        .ok_or_else(|| ApiError::not_found(format!("unknown command {id:?}")))?;
    Ok(Json(json!({
        "id": c.id,
        "relay_id": c.relay_id,
        "name": c.name,
        "params": c.params,
        "state": c.state.as_str(),
        "result": c.result,
        "created_at": fmt_time(c.created_at),
    })))
}

async fn sim_results(State(shared): State<Arc<Shared>>) -> Json<Vec<ResultRecord>> {
    Json(
        shared
            .lock()
            .db
            .p
            .results
            .iter()
            .map(|r| r.record.clone())
            .collect(),
    )
}

#[derive(Deserialize)]
struct RawFrame {
    #[serde(default)]
    relay_id: Option<String>,
    text: String,
}

async fn sim_channel_raw(State(shared): State<Arc<Shared>>, body: Body) -> ApiResult<Json<Value>> {
    let req: RawFrame = parse(&read_body(body).await?)?;
    let relay_id = send_frame(&shared, req.relay_id, req.text).await?;
    Ok(Json(json!({"relay_id": relay_id, "sent": true})))
}

/// Sends one text frame down the channel of `relay_id` (default: the last registered relay) and
/// returns once it is on the socket, so a test can go straight on to look for the relay's
/// reaction. 409 when the relay has no open channel or it is frozen.
pub(crate) async fn send_frame(
    shared: &Shared,
    relay_id: Option<String>,
    text: String,
) -> ApiResult<String> {
    let (written_tx, written_rx) = oneshot::channel();
    let relay_id = {
        let rt = shared.lock();
        let relay_id = target_relay(&rt, relay_id)?;
        let conn = rt
            .channels
            .get(&relay_id)
            .ok_or_else(|| no_channel(&relay_id))?;
        if conn.is_frozen() {
            return Err(ApiError::conflict(format!(
                "the channel of relay {relay_id} is frozen"
            )));
        }
        conn.tx
            .send(Outgoing {
                text,
                written: Some(written_tx),
            })
            .map_err(|_| no_channel(&relay_id))?;
        relay_id
    };
    match tokio::time::timeout(Duration::from_secs(5), written_rx).await {
        Ok(Ok(())) => Ok(relay_id),
        Ok(Err(_)) => Err(ApiError::conflict(format!(
            "the channel of relay {relay_id} closed before the frame was sent"
        ))),
        Err(_) => Err(ApiError::internal("the frame was not written within 5s")),
    }
}

fn no_channel(relay_id: &str) -> ApiError {
    ApiError::conflict(format!("relay {relay_id} has no open channel"))
}

async fn sim_channel_errors(
    State(shared): State<Arc<Shared>>,
) -> Json<Vec<channel::ChannelErrorEntry>> {
    Json(shared.lock().channel_errors.clone())
}

#[derive(Deserialize)]
struct FreezeRequest {
    #[serde(default)]
    relay_id: Option<String>,
}

async fn sim_channel_freeze(
    State(shared): State<Arc<Shared>>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let req: FreezeRequest = parse_or_empty(&read_body(body).await?)?;
    let rt = shared.lock();
    let relay_id = target_relay(&rt, req.relay_id)?;
    let conn = rt
        .channels
        .get(&relay_id)
        .ok_or_else(|| no_channel(&relay_id))?;
    conn.freeze.cancel();
    Ok(Json(
        json!({"relay_id": relay_id, "session_id": conn.session_id, "frozen": true}),
    ))
}

#[derive(Deserialize)]
struct FaultRequest {
    mode: FaultMode,
}

async fn sim_set_fault(State(shared): State<Arc<Shared>>, body: Body) -> ApiResult<Json<Value>> {
    let req: FaultRequest = parse(&read_body(body).await?)?;
    shared.lock().fault = req.mode;
    info!(mode = ?req.mode, "fault mode set");
    Ok(Json(json!({"mode": req.mode})))
}

async fn sim_get_fault(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"mode": shared.lock().fault}))
}

async fn sim_provisioning_log(
    State(shared): State<Arc<Shared>>,
) -> Json<Vec<provisioning::LogEntry>> {
    Json(shared.lock().prov_log.iter().cloned().collect())
}

async fn sim_clear_provisioning_log(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let cleared = std::mem::take(&mut shared.lock().prov_log).len();
    Json(json!({"cleared": cleared}))
}
