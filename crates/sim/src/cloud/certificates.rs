//! The tenant's edge certificate, uploaded in the cloud (`POST /sim/certificates`): sent to every
//! relay of the tenant as an `install_certificate` command (and to relays that register later),
//! with each relay's answer recorded (`GET /sim/certificates/{id}`).
//!
//! The cloud checks only that the upload is base64 of a plausible size: the certificate rules are
//! the relay's, which knows its own FQDNs, and each relay answers with the rules that failed.

use super::Shared;
use super::api::{ApiError, ApiResult, parse, persist, read_body};
use super::state::{CertificateRecord, CommandRecord, CommandState, Db};
use crate::protocol::{CertificateUpload, INSTALL_CERTIFICATE_COMMAND, Outcome};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;
use tracing::info;

/// Largest PFX taken: a key and a chain of a few certificates is a few KiB.
const MAX_PFX: usize = 1 << 20;

#[derive(Deserialize)]
struct NewUpload {
    pfx_base64: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    tenant: Option<String>,
}

/// Adds the `install_certificate` command of upload `upload` for `relay_id`; returns its index.
fn enqueue(db: &mut Db, upload: usize, relay_id: &str, params: Value, now: SystemTime) -> usize {
    let id = format!("cmd-{}", uuid::Uuid::new_v4());
    db.p.certificates[upload]
        .commands
        .insert(relay_id.to_owned(), id.clone());
    db.add_command(CommandRecord {
        id,
        relay_id: relay_id.to_owned(),
        name: INSTALL_CERTIFICATE_COMMAND.to_owned(),
        params,
        state: CommandState::Queued,
        result: None,
        created_at: now,
    });
    db.p.commands.len() - 1
}

/// The params of upload `i`, taken from one of its commands.
fn params_of(db: &Db, i: usize) -> Option<Value> {
    let id = db.p.certificates[i].commands.values().next()?;
    db.command(id).map(|c| c.params.clone())
}

/// `POST /sim/certificates`: one upload for the whole tenant, pushed to each of its relays.
pub(crate) async fn sim_upload(
    State(shared): State<Arc<Shared>>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let req: NewUpload = parse(&read_body(body).await?)?;
    let pfx = base64::engine::general_purpose::STANDARD
        .decode(req.pfx_base64.trim())
        .map_err(|e| ApiError::bad_request(format!("pfx_base64 is not base64: {e}")))?;
    if pfx.is_empty() || pfx.len() > MAX_PFX {
        return Err(ApiError::bad_request(format!(
            "pfx_base64 must hold 1 byte to {} KiB, got {} bytes",
            MAX_PFX >> 10,
            pfx.len()
        )));
    }
    let tenant = req.tenant.unwrap_or_else(|| shared.args.tenant.clone());
    let upload_id = format!("cert-{}", uuid::Uuid::new_v4());
    let params = serde_json::to_value(CertificateUpload {
        upload_id: upload_id.clone(),
        pfx_base64: req.pfx_base64.trim().to_owned(),
        password: req.password,
    })
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let now = shared.now();
    let (relays, generation) = {
        let mut rt = shared.lock();
        if !rt.db.p.tenants.contains_key(&tenant) {
            return Err(ApiError::not_found(format!("unknown tenant {tenant:?}")));
        }
        rt.db.p.certificates.push(CertificateRecord {
            upload_id: upload_id.clone(),
            tenant_id: tenant.clone(),
            created_at: now,
            commands: BTreeMap::new(),
        });
        let i = rt.db.p.certificates.len() - 1;
        let relays: Vec<String> = rt
            .db
            .p
            .relays
            .values()
            .filter(|r| r.tenant_id == tenant)
            .map(|r| r.relay_id.clone())
            .collect();
        for r in &relays {
            let idx = enqueue(&mut rt.db, i, r, params.clone(), now);
            rt.deliver_command(idx);
        }
        (relays.len(), rt.changed())
    };
    info!(%upload_id, %tenant, relays, "certificate uploaded; sent to every relay of the tenant");
    persist(&shared, generation).await?;
    Ok(Json(json!({"upload_id": upload_id, "relays": relays})))
}

/// A relay registering for the first time gets the tenant's latest certificate too.
pub(crate) fn on_new_relay(rt: &mut super::Runtime, tenant: &str, relay_id: &str) {
    let Some(i) = rt
        .db
        .p
        .certificates
        .iter()
        .rposition(|c| c.tenant_id == tenant)
    else {
        return;
    };
    if rt.db.p.certificates[i].commands.contains_key(relay_id) {
        return;
    }
    let Some(params) = params_of(&rt.db, i) else {
        return;
    };
    let idx = enqueue(&mut rt.db, i, relay_id, params, SystemTime::now());
    rt.deliver_command(idx);
}

/// `GET /sim/certificates/{id}`: each relay's answer (`installed` or `refused` with the reason);
/// relays that have not answered yet are listed under `pending`.
pub(crate) async fn sim_get_upload(
    State(shared): State<Arc<Shared>>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let rt = shared.lock();
    let c = rt
        .db
        .p
        .certificates
        .iter()
        .find(|c| c.upload_id == id)
        .ok_or_else(|| ApiError::not_found(format!("unknown certificate upload {id:?}")))?;
    let mut relays = Vec::new();
    let mut pending = Vec::new();
    for (relay_id, cmd) in &c.commands {
        match rt.db.command(cmd).and_then(|c| c.result.as_ref()) {
            Some(r) => relays.push(json!({
                "relay_id": relay_id,
                "result": if r.result == Outcome::Success { "installed" } else { "refused" },
                "reason": r.reason,
                "answer": r.payload,
            })),
            None => pending.push(relay_id.clone()),
        }
    }
    Ok(Json(json!({
        "upload_id": c.upload_id,
        "tenant": c.tenant_id,
        "created_at": super::state::fmt_time(c.created_at),
        "relays": relays,
        "pending": pending,
    })))
}
