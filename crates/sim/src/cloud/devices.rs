//! The reference cloud's device plane: scheduled tasks (created, edited and cancelled through the
//! test API, carried to the relay as channel commands, followed through the relay's results), the
//! tenant's device list, and the relay's device-status reports and alarms.

use super::Shared;
use super::api::{
    ApiError, ApiResult, bearer_relay, check_id, check_record_size, enqueue_command, fault_gate,
    parse, persist, read_body,
};
use super::state::{TaskRecord, is_rfc3339};
use crate::protocol::{
    DEVICE_COMMANDS, DeviceEntry, DeviceList, DeviceStatusBatch, PATH_DEVICE_STATUS, PATH_DEVICES,
    TASK_CANCEL_COMMAND, TASK_COMMAND, TASK_UPDATE_COMMAND, TaskSpec,
};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::HashSet;
use std::sync::Arc;
use tracing::info;

/// Most targets one task may have (a tenant's whole fleet).
pub const MAX_TASK_TARGETS: usize = 50_000;
/// Most devices in one device list.
pub const MAX_DEVICES: usize = 50_000;
/// Task fields `PATCH /sim/tasks/{id}` may replace.
const PATCHABLE: &[&str] = &[
    "name",
    "type",
    "targets",
    "payload",
    "at",
    "failure_threshold_pct",
    "concurrency",
    "target_timeout_s",
];

type PathId = Result<Path<String>, axum::extract::rejection::PathRejection>;

fn path_id(id: PathId) -> ApiResult<String> {
    id.map(|Path(id)| id)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

// ---------------------------------------------------------------------------------------------
// Tasks.

#[derive(Deserialize)]
struct NewTask {
    #[serde(rename = "type")]
    kind: String,
    targets: Vec<String>,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    failure_threshold_pct: Option<u8>,
    #[serde(default)]
    concurrency: Option<u32>,
    #[serde(default)]
    target_timeout_s: Option<u64>,
    #[serde(default)]
    relay_id: Option<String>,
}

fn check_kind(kind: &str) -> ApiResult<()> {
    if DEVICE_COMMANDS.contains(&kind) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "type {kind:?} is not a device command; one of: {}",
            DEVICE_COMMANDS.join(", ")
        )))
    }
}

fn check_targets(targets: &[String]) -> ApiResult<()> {
    if targets.is_empty() {
        return Err(ApiError::bad_request("targets must not be empty"));
    }
    if targets.len() > MAX_TASK_TARGETS {
        return Err(ApiError::bad_request(format!(
            "{} targets; at most {MAX_TASK_TARGETS} per task",
            targets.len()
        )));
    }
    for (i, t) in targets.iter().enumerate() {
        check_id(&format!("targets[{i}]"), t)?;
    }
    Ok(())
}

fn check_at(at: Option<&str>) -> ApiResult<()> {
    match at {
        Some(at) if !is_rfc3339(at) => Err(ApiError::bad_request(format!(
            "at must be an RFC 3339 time, got {at:?}"
        ))),
        _ => Ok(()),
    }
}

fn check_payload(payload: Option<&Value>) -> ApiResult<()> {
    match payload {
        None | Some(Value::Null | Value::Object(_)) => Ok(()),
        Some(_) => Err(ApiError::bad_request("payload must be a JSON object")),
    }
}

fn check_limits(pct: Option<u8>, concurrency: Option<u32>, timeout: Option<u64>) -> ApiResult<()> {
    if pct.is_some_and(|p| p > 100) {
        return Err(ApiError::bad_request(
            "failure_threshold_pct must be 0 to 100",
        ));
    }
    if concurrency == Some(0) {
        return Err(ApiError::bad_request("concurrency must be at least 1"));
    }
    if timeout == Some(0) {
        return Err(ApiError::bad_request("target_timeout_s must be at least 1"));
    }
    Ok(())
}

/// `POST /sim/tasks`: a `task` command whose id is the task id and whose params are the spec.
pub(crate) async fn sim_create_task(
    State(shared): State<Arc<Shared>>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let req: NewTask = parse(&read_body(body).await?)?;
    check_kind(&req.kind)?;
    check_targets(&req.targets)?;
    check_at(req.at.as_deref())?;
    check_payload(req.payload.as_ref())?;
    check_limits(
        req.failure_threshold_pct,
        req.concurrency,
        req.target_timeout_s,
    )?;
    let spec = TaskSpec {
        name: req
            .name
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| req.kind.clone()),
        kind: req.kind,
        targets: req.targets,
        payload: match req.payload {
            None | Some(Value::Null) => json!({}),
            Some(p) => p,
        },
        at: req.at,
        failure_threshold_pct: req.failure_threshold_pct,
        concurrency: req.concurrency,
        target_timeout_s: req.target_timeout_s,
    };
    let params = serde_json::to_value(&spec)
        .map_err(|e| ApiError::internal(format!("cannot encode the task: {e}")))?;
    let id = format!("task-{}", uuid::Uuid::new_v4());
    let now = shared.now();
    let targets = spec.targets.len();
    let (relay_id, state) = enqueue_command(
        &shared,
        req.relay_id,
        &id,
        TASK_COMMAND.to_owned(),
        params,
        |db, relay_id| {
            db.add_task(TaskRecord {
                id: id.clone(),
                relay_id: relay_id.to_owned(),
                spec,
                created_at: now,
            });
            Ok(())
        },
    )
    .await?;
    info!(task_id = %id, %relay_id, targets, "task created");
    Ok(Json(
        json!({"task_id": id, "relay_id": relay_id, "state": state.as_str()}),
    ))
}

/// `GET /sim/tasks`: every task's state and totals, oldest first.
pub(crate) async fn sim_list_tasks(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let rt = shared.lock();
    let list: Vec<Value> = (0..rt.db.p.tasks.len())
        .map(|t| serde_json::to_value(rt.db.task_summary(t)).unwrap_or(Value::Null))
        .collect();
    Json(Value::Array(list))
}

/// `GET /sim/tasks/{id}`: state and totals plus the latest result of each target.
pub(crate) async fn sim_get_task(
    State(shared): State<Arc<Shared>>,
    id: PathId,
) -> ApiResult<Json<Value>> {
    let id = path_id(id)?;
    let rt = shared.lock();
    let t = rt
        .db
        .task_index(&id)
        .ok_or_else(|| ApiError::not_found(format!("unknown task {id:?}")))?;
    let mut out = serde_json::to_value(rt.db.task_summary(t))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let results: Vec<Value> = rt
        .db
        .task_view(t)
        .results
        .iter()
        .map(|&i| {
            let r = &rt.db.p.results[i].record;
            json!({
                "target": r.target,
                "result": r.result.as_str(),
                "reason": r.reason,
                "payload": r.payload,
                "finished_at": r.finished_at,
                "result_id": r.result_id,
            })
        })
        .collect();
    let task = &rt.db.p.tasks[t];
    if let Value::Object(m) = &mut out {
        m.insert("targets".into(), json!(task.spec.targets));
        m.insert("payload".into(), task.spec.payload.clone());
        m.insert("progress".into(), json!(rt.db.task_progress(t)));
        m.insert("results".into(), Value::Array(results));
    }
    Ok(Json(out))
}

/// The relay a task belongs to, or 404.
fn task_relay(shared: &Shared, id: &str) -> ApiResult<String> {
    let rt = shared.lock();
    rt.db
        .task_index(id)
        .map(|t| rt.db.p.tasks[t].relay_id.clone())
        .ok_or_else(|| ApiError::not_found(format!("unknown task {id:?}")))
}

/// `DELETE /sim/tasks/{id}`: asks the relay to cancel the task (a `task_cancel` command). Whether
/// it did shows in that command's result and in the task's status.
pub(crate) async fn sim_cancel_task(
    State(shared): State<Arc<Shared>>,
    id: PathId,
) -> ApiResult<Json<Value>> {
    let id = path_id(id)?;
    let relay_id = task_relay(&shared, &id)?;
    let command_id = format!("cmd-{}", uuid::Uuid::new_v4());
    let (relay_id, state) = enqueue_command(
        &shared,
        Some(relay_id),
        &command_id,
        TASK_CANCEL_COMMAND.to_owned(),
        json!({"task_id": id}),
        |_, _| Ok(()),
    )
    .await?;
    Ok(Json(
        json!({"command_id": command_id, "task_id": id, "relay_id": relay_id, "state": state.as_str()}),
    ))
}

/// `PATCH /sim/tasks/{id}`: asks the relay to replace some of the task's fields (a
/// `task_update` command with `{"task_id", ...fields}`). The cloud's copy of the task changes
/// once the relay reports the update a success.
pub(crate) async fn sim_update_task(
    State(shared): State<Arc<Shared>>,
    id: PathId,
    body: Body,
) -> ApiResult<Json<Value>> {
    let id = path_id(id)?;
    let fields: Map<String, Value> = parse(&read_body(body).await?)?;
    if fields.is_empty() {
        return Err(ApiError::bad_request(format!(
            "nothing to change; fields: {}",
            PATCHABLE.join(", ")
        )));
    }
    for (k, v) in &fields {
        check_patch_field(k, v)?;
    }
    let relay_id = task_relay(&shared, &id)?;
    let mut params = Map::new();
    params.insert("task_id".into(), json!(id));
    params.extend(fields);
    let command_id = format!("cmd-{}", uuid::Uuid::new_v4());
    let (relay_id, state) = enqueue_command(
        &shared,
        Some(relay_id),
        &command_id,
        TASK_UPDATE_COMMAND.to_owned(),
        Value::Object(params),
        |_, _| Ok(()),
    )
    .await?;
    Ok(Json(
        json!({"command_id": command_id, "task_id": id, "relay_id": relay_id, "state": state.as_str()}),
    ))
}

fn check_patch_field(k: &str, v: &Value) -> ApiResult<()> {
    let bad = |what: &str| Err(ApiError::bad_request(format!("{k} must be {what}")));
    match k {
        "name" if !v.is_string() => bad("a string"),
        "type" => match v.as_str() {
            Some(kind) => check_kind(kind),
            None => bad("a string"),
        },
        "targets" => match serde_json::from_value::<Vec<String>>(v.clone()) {
            Ok(t) => check_targets(&t),
            Err(_) => bad("an array of strings"),
        },
        "payload" => check_payload(Some(v)),
        "at" => match v {
            Value::Null => Ok(()),
            Value::String(at) => check_at(Some(at)),
            _ => bad("an RFC 3339 time or null"),
        },
        "failure_threshold_pct" => match v.as_u64() {
            Some(p) if p <= 100 => Ok(()),
            _ => bad("0 to 100"),
        },
        "concurrency" | "target_timeout_s" => match v.as_u64() {
            Some(n) if n >= 1 && (k != "concurrency" || n <= u64::from(u32::MAX)) => Ok(()),
            _ => bad("a whole number of at least 1"),
        },
        "name" => Ok(()),
        _ => Err(ApiError::bad_request(format!(
            "{k:?} cannot be changed; fields: {}",
            PATCHABLE.join(", ")
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Device list.

#[derive(Deserialize)]
struct NewDevices {
    devices: Vec<DeviceEntry>,
    /// The tenant whose list this is; the cloud's own tenant when absent.
    #[serde(default)]
    tenant: Option<String>,
}

/// `IP` or `IP:PORT`.
fn valid_address(a: &str) -> bool {
    a.parse::<std::net::IpAddr>().is_ok() || a.parse::<std::net::SocketAddr>().is_ok()
}

/// `POST /sim/devices`: replaces the tenant's device list and bumps its revision.
pub(crate) async fn sim_set_devices(
    State(shared): State<Arc<Shared>>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let req: NewDevices = parse(&read_body(body).await?)?;
    if req.devices.len() > MAX_DEVICES {
        return Err(ApiError::bad_request(format!(
            "{} devices; at most {MAX_DEVICES}",
            req.devices.len()
        )));
    }
    let mut seen = HashSet::with_capacity(req.devices.len());
    for (i, d) in req.devices.iter().enumerate() {
        if !valid_address(&d.address) {
            return Err(ApiError::bad_request(format!(
                "devices[{i}].address must be IP or IP:PORT, got {:?}",
                d.address
            )));
        }
        if !seen.insert(d.address.as_str()) {
            return Err(ApiError::bad_request(format!(
                "devices[{i}].address {} is listed twice",
                d.address
            )));
        }
    }
    let tenant = req.tenant.unwrap_or_else(|| shared.args.tenant.clone());
    let count = req.devices.len();
    let (revision, generation) = {
        let mut rt = shared.lock();
        if !rt.db.p.tenants.contains_key(&tenant) {
            return Err(ApiError::not_found(format!("unknown tenant {tenant:?}")));
        }
        let revision = rt.db.set_devices(&tenant, req.devices);
        (revision, rt.changed())
    };
    info!(%tenant, devices = count, revision, "device list replaced");
    persist(&shared, generation).await?;
    Ok(Json(
        json!({"tenant": tenant, "revision": revision, "devices": count}),
    ))
}

/// `GET /sim/devices`: the cloud's tenant's device list and the latest report of each device.
pub(crate) async fn sim_get_devices(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let rt = shared.lock();
    let list = rt
        .db
        .p
        .device_lists
        .get(&shared.args.tenant)
        .cloned()
        .unwrap_or_default();
    Json(json!({
        "revision": list.revision,
        "devices": list.devices,
        "status": rt.db.p.device_reports,
        "stats": rt.db.p.device_stats,
    }))
}

/// `GET /sim/alarms`: every distinct alarm in arrival order.
pub(crate) async fn sim_alarms(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!(shared.lock().db.p.alarms))
}

/// `GET /relay/v1/devices` (bearer token): the relay's tenant's device list.
pub(crate) async fn device_list(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = fault_gate(&shared, PATH_DEVICES).await {
        return r;
    }
    let relay_id = match bearer_relay(&shared, &headers) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let rt = shared.lock();
    let list = rt
        .db
        .p
        .relays
        .get(&relay_id)
        .and_then(|r| rt.db.p.device_lists.get(&r.tenant_id))
        .cloned()
        .unwrap_or_else(DeviceList::default);
    Json(list).into_response()
}

/// `POST /relay/v1/device-status` (bearer token): a batch of reports and alarms. Each report
/// replaces the device's previous one; alarms are kept once by id. A batch carrying new alarms is
/// answered once it is in the state file; reports alone are written within a second.
pub(crate) async fn device_status(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(r) = fault_gate(&shared, PATH_DEVICE_STATUS).await {
        return r;
    }
    match device_status_inner(&shared, &headers, body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn device_status_inner(shared: &Shared, headers: &HeaderMap, body: Body) -> ApiResult<Value> {
    let relay_id = bearer_relay(shared, headers)?;
    let bytes = read_body(body).await?;
    let batch: DeviceStatusBatch = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid device-status batch (expected {{\"reports\": [DeviceReport], \"alarms\": [Alarm]}}): {e}"
        ))
    })?;
    for (i, r) in batch.reports.iter().enumerate() {
        if r.address.is_empty() {
            return Err(ApiError::bad_request(format!(
                "reports[{i}].address must not be empty"
            )));
        }
        let size = serde_json::to_vec(r).map(|v| v.len()).unwrap_or(0);
        check_record_size(shared, &format!("reports[{i}]"), size)?;
    }
    for (i, a) in batch.alarms.iter().enumerate() {
        check_id(&format!("alarms[{i}].id"), &a.id)?;
        if a.address.is_empty() || a.kind.is_empty() {
            return Err(ApiError::bad_request(format!(
                "alarms[{i}] needs an address and a kind"
            )));
        }
        let size = serde_json::to_vec(a).map(|v| v.len()).unwrap_or(0);
        check_record_size(shared, &format!("alarms[{i}]"), size)?;
    }
    let (out, generation) = {
        let mut rt = shared.lock();
        rt.db.p.stats.device_status_reports += 1;
        let out = rt
            .db
            .ingest_device_status(&relay_id, batch.reports, batch.alarms, batch.stats);
        (out, rt.changed())
    };
    if out.new_alarms > 0 {
        persist(shared, generation).await?;
    }
    Ok(json!({
        "reports": out.reports,
        "alarms": out.new_alarms,
        "duplicate_alarms": out.duplicate_alarms,
    }))
}
