//! The upload handler: where a device delivers a file the relay asked it for (a packet capture on
//! stop). The URL is a one-time slot the device plane opened in the artifact store: a random path
//! that only that device's address may use, once, before a deadline. Anything else gets 404 (an
//! unknown, used or expired path) or 403 (the right path from another address), and nothing is
//! stored. The body streams into the artifact store chunk by chunk, bounded by the slot's size.

use super::body::{EdgeBody, text_response};
use crate::artifacts::{ArtifactError, Artifacts, SlotRefusal, UPLOAD_PREFIX};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::net::IpAddr;
use std::sync::Arc;
use tracing::{info, warn};

/// True for paths this handler owns.
pub fn is_upload(path: &str) -> bool {
    path.starts_with(UPLOAD_PREFIX)
}

pub async fn answer(
    artifacts: Option<&Arc<Artifacts>>,
    req: Request<Incoming>,
    peer: IpAddr,
) -> Response<EdgeBody> {
    let Some(artifacts) = artifacts else {
        return text_response(StatusCode::NOT_FOUND, "no such upload");
    };
    if req.method() != Method::PUT && req.method() != Method::POST {
        let mut r = text_response(StatusCode::METHOD_NOT_ALLOWED, "upload with PUT or POST");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("PUT, POST"));
        return r;
    }
    let token = req
        .uri()
        .path()
        .strip_prefix(UPLOAD_PREFIX)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("");
    let slot = match artifacts.take_slot(token, peer) {
        Ok(s) => s,
        Err(SlotRefusal::Unknown) => return text_response(StatusCode::NOT_FOUND, "no such upload"),
        Err(SlotRefusal::WrongAddress) => {
            warn!(%peer, "upload refused: the slot belongs to another device address");
            return text_response(
                StatusCode::FORBIDDEN,
                "this upload belongs to another device",
            );
        }
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > slot.max_bytes) {
        let why = format!(
            "the device offered {} bytes, more than the {} this upload takes",
            declared.unwrap_or(0),
            slot.max_bytes
        );
        slot.finish(Err(why.clone()));
        return text_response(StatusCode::PAYLOAD_TOO_LARGE, &why);
    }
    let meta = slot.meta.clone();
    let max = slot.max_bytes;
    match receive(artifacts, meta, max, req.into_body()).await {
        Ok(r) => {
            info!(%peer, artifact = %r.artifact_id, name = %r.name, bytes = r.size, "device upload received");
            slot.finish(Ok(r));
            text_response(StatusCode::CREATED, "stored")
        }
        Err((status, why)) => {
            warn!(%peer, reason = %why, "device upload failed");
            slot.finish(Err(why.clone()));
            text_response(status, &why)
        }
    }
}

/// Streams the body into a new artifact.
async fn receive(
    artifacts: &Arc<Artifacts>,
    meta: crate::artifacts::Meta,
    max: u64,
    mut body: Incoming,
) -> Result<crate::protocol::ArtifactRef, (StatusCode, String)> {
    let store_err = |e: ArtifactError| {
        let status = match e {
            ArtifactError::Full { .. } | ArtifactError::DiskFull { .. } => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, e.to_string())
    };
    let a = artifacts.clone();
    let mut writer = tokio::task::spawn_blocking(move || a.create(meta))
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(store_err)?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("the upload broke off: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if writer.written() + data.len() as u64 > max {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the device sent more than the {max} bytes this upload takes"),
            ));
        }
        let (w, r) = tokio::task::spawn_blocking(move || {
            let r = writer.write_chunk(&data);
            (writer, r)
        })
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        writer = w;
        r.map_err(store_err)?;
    }
    if writer.written() == 0 {
        return Err((StatusCode::BAD_REQUEST, "the upload was empty".into()));
    }
    tokio::task::spawn_blocking(move || writer.finish())
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(store_err)
}
