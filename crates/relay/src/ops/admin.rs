//! The local admin API: HTTP/1.1 on a Unix socket (mode 0660, so root and the ucrelay group only),
//! and the client the CLI uses to reach it: status, images, devices, tasks, reload, and the device
//! diagnostics (probe, configuration backups, kept device logs, artifacts).

use super::Running;
use crate::ops::report::StatusReport;
use anyhow::{Context, Result, anyhow, bail};
use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Binds the admin socket. A stale socket file (left by a killed relay) is replaced; a live one means
/// another relay runs with this config, which is an error.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create admin socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "admin socket {} is in use: another ucrelay is already running with it",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale admin socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set mode 0660 on {}", path.display()))?;
    Ok(listener)
}

/// Serves the admin API until shutdown; removes the socket file on the way out.
pub async fn serve(
    listener: UnixListener,
    ctx: Running,
    shutdown: CancellationToken,
) -> Result<()> {
    let path: Option<PathBuf> = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/reload", post(reload))
        .route("/v1/images", get(images))
        .route("/v1/images/sync", post(images_sync))
        .route("/v1/images/verify", post(images_verify))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/trust", post(devices_trust))
        .route("/v1/tasks", get(tasks))
        .route("/v1/tasks/{id}", get(task))
        .route("/v1/probe/{target}", post(probe))
        .route("/v1/backups/{mac}", get(backups))
        .route("/v1/backups/{mac}/{id}", get(backup).delete(backup_delete))
        .route("/v1/backups/{mac}/{id}/restore", post(backup_restore))
        .route("/v1/logs", get(logs))
        .route("/v1/logs/{mac}", get(logs_export).delete(logs_delete))
        .route("/v1/artifacts", get(artifacts))
        .with_state(ctx);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
    result.context("admin API server failed")
}

async fn status(State(ctx): State<Running>) -> Json<StatusReport> {
    let pending = ctx.store.run(|s| s.outbox_len()).await.unwrap_or(0);
    Json(StatusReport::build(&ctx, pending))
}

type ApiError = (http::StatusCode, Json<serde_json::Value>);

fn no_images() -> ApiError {
    (
        http::StatusCode::NOT_FOUND,
        Json(
            serde_json::json!({"error": "the download agent is off: no [images] section in the config"}),
        ),
    )
}

async fn images(State(ctx): State<Running>) -> Result<Json<crate::cache::CatalogReport>, ApiError> {
    let cat = ctx.images.as_ref().ok_or_else(no_images)?;
    Ok(Json(cat.report()))
}

async fn images_sync(State(ctx): State<Running>) -> Result<Json<serde_json::Value>, ApiError> {
    let cat = ctx.images.as_ref().ok_or_else(no_images)?;
    // Read before waking the agent: the round this request asks for is the first one numbered
    // above this, whether or not a round is running now.
    let started = cat.rounds_started();
    cat.wake.notify_one();
    Ok(Json(serde_json::json!({
        "triggered": true,
        "revision": cat.revision(),
        "rounds_started": started,
    })))
}

async fn images_verify(State(ctx): State<Running>) -> Result<Json<serde_json::Value>, ApiError> {
    let cat = ctx.images.clone().ok_or_else(no_images)?;
    let c = cat.clone();
    let (checked, quarantined) = ctx.store.run(move |s| c.verify(s)).await.map_err(|e| {
        (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"error": format!("{e:#}")})),
        )
    })?;
    if !quarantined.is_empty() {
        cat.wake.notify_one();
    }
    Ok(Json(
        serde_json::json!({"checked": checked, "quarantined": quarantined}),
    ))
}

async fn devices(State(ctx): State<Running>) -> Json<serde_json::Value> {
    // 50,000 devices take a while to encode: off the async workers.
    let plane = ctx.devices.clone();
    Json(
        tokio::task::spawn_blocking(move || plane.report())
            .await
            .unwrap_or_else(|e| serde_json::json!({"error": e.to_string()})),
    )
}

#[derive(serde::Deserialize)]
struct TrustQuery {
    address: String,
    #[serde(default)]
    fingerprint: Option<String>,
}

/// `ucrelay devices trust ADDRESS [--fingerprint F]`: accept a device's new key.
async fn devices_trust(
    State(ctx): State<Running>,
    axum::extract::Query(q): axum::extract::Query<TrustQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match ctx
        .devices
        .trust(
            &q.address,
            q.fingerprint.as_deref(),
            crate::devices::identity::TrustedBy::Admin,
        )
        .await
    {
        Ok(said) => Ok(Json(serde_json::json!({"ok": true, "done": said}))),
        Err(why) => Err((
            http::StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": why})),
        )),
    }
}

async fn tasks(State(ctx): State<Running>) -> Result<Json<serde_json::Value>, ApiError> {
    // Finished tasks are read from the store.
    let list = ctx.devices.tasks.list().await.map_err(|e| {
        api_error(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            format_args!("{e:#}"),
        )
    })?;
    Ok(Json(serde_json::json!({ "tasks": list })))
}

async fn task(
    State(ctx): State<Running>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let found = ctx.devices.tasks.get(&id).await.map_err(|e| {
        api_error(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            format_args!("{e:#}"),
        )
    })?;
    let Some((rec, mut summary)) = found else {
        return Err((
            http::StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": format!("no task {id:?}")})),
        ));
    };
    let done = {
        let id = id.clone();
        ctx.store
            .run(move |s| s.task_targets(&id))
            .await
            .map_err(|e| {
                (
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    Json(serde_json::json!({"error": format!("{e:#}")})),
                )
            })?
    };
    let mut finished: std::collections::HashMap<String, crate::devices::tasks::SubResult> = done
        .into_iter()
        .filter_map(|(t, v)| serde_json::from_slice(&v).ok().map(|s| (t, s)))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let results: Vec<serde_json::Value> = rec
        .spec
        .targets
        .iter()
        .map(|t| t.trim().to_string())
        .filter(|t| seen.insert(t.clone()))
        .map(|t| match finished.remove(&t) {
            Some(s) => serde_json::json!({
                "target": t, "result": s.result.as_str(), "reason": s.reason, "finished_at": s.finished_at,
            }),
            None => serde_json::json!({"target": t, "result": "pending"}),
        })
        .collect();
    summary["payload"] = crate::devices::tasks::public_payload(&rec.spec.payload);
    summary["results"] = serde_json::Value::Array(results);
    Ok(Json(summary))
}

fn api_error(status: http::StatusCode, why: impl std::fmt::Display) -> ApiError {
    (status, Json(serde_json::json!({"error": why.to_string()})))
}

fn no_devices(ctx: &Running) -> Result<(), ApiError> {
    if ctx.devices.cfg().enabled {
        Ok(())
    } else {
        Err(api_error(
            http::StatusCode::NOT_FOUND,
            "the device plane is off: relay.toml has no [devices] section",
        ))
    }
}

fn mac_param(mac: &str) -> Result<String, ApiError> {
    crate::devlogs::normalise_mac(mac).ok_or_else(|| {
        api_error(
            http::StatusCode::BAD_REQUEST,
            format!("{mac:?} is not a MAC address (12 hex digits)"),
        )
    })
}

fn done_json(d: crate::devices::actions::Done) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "result": d.result.as_str(),
        "reason": d.reason,
        "payload": d.payload,
    }))
}

/// Runs one device operation for a local admin (probe, restore), like a command from the cloud:
/// inside the device subnets only, with the configured password.
async fn local_op(
    ctx: &Running,
    target: &str,
    op: crate::devices::actions::Op,
) -> Result<Json<serde_json::Value>, ApiError> {
    no_devices(ctx)?;
    let plane = &ctx.devices;
    let t = plane
        .check_target(target)
        .map_err(|why| api_error(http::StatusCode::FORBIDDEN, why))?;
    let id = format!("local-{}", uuid::Uuid::new_v4());
    tracing::info!(device = %t, ?op, "device operation asked on the admin socket");
    let done = plane
        .run_op(
            &t,
            &plane.password(None),
            &op,
            plane.cfg().target_timeout,
            &id,
        )
        .await;
    Ok(done_json(done))
}

async fn probe(
    State(ctx): State<Running>,
    axum::extract::Path(target): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    local_op(&ctx, &target, crate::devices::actions::Op::Probe).await
}

async fn backups(
    State(ctx): State<Running>,
    axum::extract::Path(mac): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mac = mac_param(&mac)?;
    let list = crate::devices::backups::list(&ctx.devices, &mac)
        .await
        .map_err(|e| api_error(http::StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(serde_json::json!({
        "mac": mac,
        "keep": crate::devices::backups::KEEP,
        "backups": list.iter().map(crate::devices::backups::Backup::summary).collect::<Vec<_>>(),
    })))
}

async fn backup(
    State(ctx): State<Running>,
    axum::extract::Path((mac, id)): axum::extract::Path<(String, String)>,
) -> Result<String, ApiError> {
    let mac = mac_param(&mac)?;
    crate::devices::backups::get(&ctx.devices, &mac, &id)
        .await
        .map(|b| b.masked())
        .map_err(|e| api_error(http::StatusCode::NOT_FOUND, e))
}

async fn backup_delete(
    State(ctx): State<Running>,
    axum::extract::Path((mac, id)): axum::extract::Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mac = mac_param(&mac)?;
    let id = match crate::devices::backups::get(&ctx.devices, &mac, &id).await {
        Ok(b) => b.id,
        Err(e) => return Err(api_error(http::StatusCode::NOT_FOUND, e)),
    };
    crate::devices::backups::delete(&ctx.devices, &mac, &id)
        .await
        .map_err(|e| api_error(http::StatusCode::NOT_FOUND, e))?;
    Ok(Json(serde_json::json!({"mac": mac, "deleted": id})))
}

async fn backup_restore(
    State(ctx): State<Running>,
    axum::extract::Path((mac, id)): axum::extract::Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mac = mac_param(&mac)?;
    let b = crate::devices::backups::get(&ctx.devices, &mac, &id)
        .await
        .map_err(|e| api_error(http::StatusCode::NOT_FOUND, e))?;
    let op = crate::devices::actions::Op::RestoreBackup { backup: b.id };
    local_op(&ctx, &b.target, op).await
}

async fn logs(State(ctx): State<Running>) -> Json<crate::devlogs::LogsReport> {
    let logs = ctx.device_logs.clone();
    let report = tokio::task::spawn_blocking(move || {
        logs.prune();
        logs.report()
    })
    .await
    .unwrap_or_else(|_| ctx.device_logs.report());
    Json(report)
}

async fn logs_export(
    State(ctx): State<Running>,
    axum::extract::Path(mac): axum::extract::Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let mac = mac_param(&mac)?;
    if ctx.device_logs.files(&mac).is_empty() {
        return Err(api_error(
            http::StatusCode::NOT_FOUND,
            format!("the relay keeps no logs of device {mac}"),
        ));
    }
    // Built into an unnamed temporary file in the state dir, then streamed: a device's logs can
    // be 100 MB.
    let logs = ctx.device_logs.clone();
    let dir = ctx.config.state_dir.clone();
    let m = mac.clone();
    let file = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        use std::io::Seek;
        let mut f = tempfile::tempfile_in(&dir)?;
        logs.write_tar_gz(&m, &mut f)?;
        f.rewind()?;
        Ok(f)
    })
    .await
    .map_err(|e| api_error(http::StatusCode::INTERNAL_SERVER_ERROR, e))?
    .map_err(|e| {
        api_error(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot pack the logs: {e}"),
        )
    })?;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    axum::response::Response::builder()
        .header(http::header::CONTENT_TYPE, "application/gzip")
        .header(
            http::header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{mac}-logs.tar.gz\""),
        )
        .body(axum::body::Body::from_stream(stream))
        .map_err(|e| api_error(http::StatusCode::INTERNAL_SERVER_ERROR, e))
}

async fn logs_delete(
    State(ctx): State<Running>,
    axum::extract::Path(mac): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mac = mac_param(&mac)?;
    let logs = ctx.device_logs.clone();
    let m = mac.clone();
    let freed = tokio::task::spawn_blocking(move || logs.delete(&m))
        .await
        .map_err(|e| api_error(http::StatusCode::INTERNAL_SERVER_ERROR, e))?
        .map_err(|e| api_error(http::StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(
        serde_json::json!({"mac": mac, "deleted_bytes": freed}),
    ))
}

async fn artifacts(State(ctx): State<Running>) -> Json<crate::artifacts::ArtifactsReport> {
    let a = ctx.artifacts.clone();
    let report = tokio::task::spawn_blocking(move || a.report())
        .await
        .unwrap_or_else(|_| ctx.artifacts.summary());
    Json(report)
}

async fn reload(State(ctx): State<Running>) -> Json<super::ReloadOutcome> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let failed = |why: &str| super::ReloadOutcome {
        ok: false,
        messages: vec![why.to_string()],
        lines: vec![super::ReloadLine {
            outcome: "refused".into(),
            message: why.to_string(),
        }],
        restart_needed: Vec::new(),
    };
    if ctx.reload.send(tx).await.is_err() {
        return Json(failed("the relay is shutting down"));
    }
    Json(
        rx.await
            .unwrap_or_else(|_| failed("the reload did not finish")),
    )
}

/// Why the CLI could not talk to the daemon at all (as opposed to an answer it did not like). The
/// CLI exits 2 for these, 1 for an unhealthy answer.
#[derive(Debug, thiserror::Error)]
pub enum Unreachable {
    #[error(
        "cannot open admin socket {}: permission denied — run as root or add yourself to the ucrelay group",
        .0.display()
    )]
    PermissionDenied(PathBuf),
    #[error("ucrelay is not running (no admin socket answering at {})", .0.display())]
    NotRunning(PathBuf),
    #[error("the relay did not answer on admin socket {} within 30 s", .0.display())]
    NoAnswer(PathBuf),
    #[error("cannot open admin socket {}: {}", .0.display(), .1)]
    Other(PathBuf, std::io::Error),
}

/// Fetches `path` from the admin API at `socket` and decodes the JSON answer.
pub async fn get_json<T: serde::de::DeserializeOwned>(socket: &Path, path: &str) -> Result<T> {
    call_json(socket, http::Method::GET, path).await
}

/// Sends one request to the admin API at `socket` and decodes the JSON answer.
pub async fn call_json<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: http::Method,
    path: &str,
) -> Result<T> {
    let body = call_bytes(socket, method, path).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// Sends one request to the admin API at `socket` and returns the answer's body as it is (a
/// tar.gz, a configuration file).
pub async fn call_bytes(socket: &Path, method: http::Method, path: &str) -> Result<Bytes> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        let path = socket.to_path_buf();
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => Unreachable::PermissionDenied(path),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                Unreachable::NotRunning(path)
            }
            _ => Unreachable::Other(path, e),
        }
    })?;
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "ucrelay")
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        // Local and trusted; a 50,000-device list is tens of MB.
        let body = Limited::new(resp.into_body(), 512 << 20)
            .collect()
            .await
            .map_err(|e| anyhow!("reading admin answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            // The relay's own refusals carry {"error": "..."}: say that, not the JSON.
            let why = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            bail!("the relay answered {status}: {why}");
        }
        Ok::<_, anyhow::Error>(body)
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| Unreachable::NoAnswer(socket.to_path_buf()))?
}
