//! The reference cloud's device plane: scheduled tasks (created, edited and cancelled through the
//! test API, carried to the relay as channel commands, followed through the relay's results), the
//! tenant's device list, and the relay's device-status reports and alarms.

use super::Shared;
use super::api::{
    ApiError, ApiResult, bearer_relay, check_id, check_record_size, enqueue_command, fault_gate,
    parse, persist, read_body, target_relay,
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
        task_id: None,
        lease_s: None,
        lease_id: None,
    };
    let id = format!("task-{}", uuid::Uuid::new_v4());
    let now = shared.now();
    let targets = spec.targets.len();
    if let Some(relay_id) = req.relay_id {
        // A named relay takes every target, as one task of its own (a test hook).
        let params = serde_json::to_value(&spec)
            .map_err(|e| ApiError::internal(format!("cannot encode the task: {e}")))?;
        let (relay_id, state) = enqueue_command(
            &shared,
            Some(relay_id),
            &id,
            TASK_COMMAND.to_owned(),
            params,
            |db, relay_id| {
                db.add_task(TaskRecord {
                    id: id.clone(),
                    relay_id: relay_id.to_owned(),
                    spec,
                    created_at: now,
                    leases: Vec::new(),
                    lease_s: None,
                });
                Ok(())
            },
        )
        .await?;
        info!(task_id = %id, %relay_id, targets, "task created");
        return Ok(Json(
            json!({"task_id": id, "relay_id": relay_id, "state": state.as_str()}),
        ));
    }
    let after = shared.args.inactive_after;
    let (out, generation) = {
        let mut rt = shared.lock();
        let tenant = shared.args.tenant.clone();
        // A cloud whose relays never said what they reach: the last registered one takes it all.
        let legacy = target_relay(&rt, None)?;
        let plan = rt.plan(&tenant, &spec.targets, None, now, after);
        let plan = if rt.db.p.relays.values().all(|r| r.subnets.is_none()) {
            super::assign::Plan {
                by_relay: vec![(legacy, spec.targets.clone())],
                ..Default::default()
            }
        } else {
            plan
        };
        let lease_s = plan.movable.then(|| after.as_secs().max(1));
        let kind = spec.kind.clone();
        rt.db.add_task(TaskRecord {
            id: id.clone(),
            relay_id: String::new(),
            spec,
            created_at: now,
            leases: Vec::new(),
            lease_s,
        });
        let t = rt.db.task_index(&id).unwrap_or_default();
        for (target, reason) in &plan.unreachable {
            rt.answer_unreachable(&id, &kind, target, reason);
        }
        let mut first_state = None;
        let mut relays = Vec::new();
        for (relay, targets) in plan.by_relay {
            let idx = rt.grant(t, &relay, targets, now);
            rt.deliver_command(idx);
            first_state.get_or_insert(rt.db.p.commands[idx].state);
            relays.push(relay);
        }
        let out = json!({
            "task_id": id,
            "relay_id": relays.first(),
            "relays": relays,
            "unreachable": plan.unreachable.len(),
            "state": first_state.unwrap_or(super::state::CommandState::Done).as_str(),
        });
        (out, rt.changed())
    };
    info!(task_id = %id, targets, relays = %out["relays"], unreachable = %out["unreachable"], "task created");
    persist(&shared, generation).await?;
    Ok(Json(out))
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
                "relay_id": rt.db.p.results[i].relay_id,
            })
        })
        .collect();
    let task = &rt.db.p.tasks[t];
    if let Value::Object(m) = &mut out {
        m.insert("targets".into(), json!(task.spec.targets));
        m.insert("payload".into(), task.spec.payload.clone());
        m.insert("progress".into(), json!(rt.db.task_progress(t)));
        let view = rt.db.task_view(t);
        let leases: Vec<Value> = task
            .leases
            .iter()
            .map(|l| {
                json!({
                    "lease_id": l.lease_id,
                    "relay_id": l.relay_id,
                    "targets": l.targets.len(),
                    "unfinished": l.targets.iter().filter(|x| !view.has(x)).count(),
                    "granted_at": super::state::fmt_time(l.granted_at),
                    "revoked_at": l.revoked_at.map(super::state::fmt_time),
                })
            })
            .collect();
        m.insert("leases".into(), Value::Array(leases));
        m.insert("lease_s".into(), json!(task.lease_s));
        m.insert("results".into(), Value::Array(results));
    }
    Ok(Json(out))
}

/// The relays holding a task (each relay with an open lease, or the task's one relay), or 404.
fn task_relays(shared: &Shared, id: &str) -> ApiResult<Vec<String>> {
    let rt = shared.lock();
    let t = rt
        .db
        .task_index(id)
        .ok_or_else(|| ApiError::not_found(format!("unknown task {id:?}")))?;
    let task = &rt.db.p.tasks[t];
    let mut relays: Vec<String> = task
        .leases
        .iter()
        .filter(|l| l.revoked_at.is_none())
        .map(|l| l.relay_id.clone())
        .collect();
    relays.dedup();
    if relays.is_empty() && !task.relay_id.is_empty() {
        relays.push(task.relay_id.clone());
    }
    Ok(relays)
}

/// Sends one command to each relay holding task `id`; answers with the first one's ids.
async fn to_holders(
    shared: &Shared,
    id: &str,
    name: &str,
    params: Value,
) -> ApiResult<Json<Value>> {
    let relays = task_relays(shared, id)?;
    if relays.is_empty() {
        return Err(ApiError::bad_request(format!(
            "task {id} is held by no relay (no relay could reach its targets)"
        )));
    }
    let mut out = Vec::new();
    for relay in relays {
        let command_id = format!("cmd-{}", uuid::Uuid::new_v4());
        let (relay_id, state) = enqueue_command(
            shared,
            Some(relay),
            &command_id,
            name.to_owned(),
            params.clone(),
            |_, _| Ok(()),
        )
        .await?;
        out.push(json!({"command_id": command_id, "task_id": id, "relay_id": relay_id, "state": state.as_str()}));
    }
    let mut first = out[0].clone();
    first["commands"] = Value::Array(out);
    Ok(Json(first))
}

/// `DELETE /sim/tasks/{id}`: asks the relay to cancel the task (a `task_cancel` command). Whether
/// it did shows in that command's result and in the task's status.
pub(crate) async fn sim_cancel_task(
    State(shared): State<Arc<Shared>>,
    id: PathId,
) -> ApiResult<Json<Value>> {
    let id = path_id(id)?;
    to_holders(&shared, &id, TASK_CANCEL_COMMAND, json!({"task_id": id})).await
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
    if fields.contains_key("targets") && task_relays(&shared, &id)?.len() > 1 {
        return Err(ApiError::new(
            http::StatusCode::CONFLICT,
            crate::protocol::ErrorCode::Conflict,
            format!(
                "task {id} is spread over several relays: its targets cannot be changed; cancel it and create a new one"
            ),
        ));
    }
    let mut params = Map::new();
    params.insert("task_id".into(), json!(id));
    params.extend(fields);
    to_holders(&shared, &id, TASK_UPDATE_COMMAND, Value::Object(params)).await
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
        "reported_by": rt.reporters,
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
    let now = shared.now();
    let mut rt = shared.lock();
    let Some(tenant) = rt.db.p.relays.get(&relay_id).map(|r| r.tenant_id.clone()) else {
        return Json(DeviceList::default()).into_response();
    };
    // The relay's monitoring share only: every device is polled by exactly one relay.
    rt.refresh_shares(&tenant, now, shared.args.inactive_after);
    let (revision, share) = rt.share_of(&tenant, &relay_id);
    let devices = match rt.db.p.device_lists.get(&tenant) {
        Some(list) => share
            .iter()
            .filter_map(|&i| list.devices.get(i).cloned())
            .collect(),
        None => Vec::new(),
    };
    Json(DeviceList { revision, devices }).into_response()
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
        for r in &batch.reports {
            *rt.reporters
                .entry(r.address.clone())
                .or_default()
                .entry(relay_id.clone())
                .or_default() += 1;
        }
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
