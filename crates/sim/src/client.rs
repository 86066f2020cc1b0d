//! A small JSON-over-HTTP client for the reference cloud's test API (`/sim/...`), used by the demo and
//! the integration tests the way any external checker would use curl.

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;

/// Sends one request and returns the status and the JSON body (`null` when empty or not JSON).
pub async fn call(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value)> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let bytes = match &body {
            Some(v) => Bytes::from(serde_json::to_vec(v)?),
            None => Bytes::new(),
        };
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        Ok::<_, anyhow::Error>((status, value))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| anyhow!("{path}: no answer in 10 s"))?
}

/// GET that must answer 200.
pub async fn get(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let (status, v) = call(addr, http::Method::GET, path, None).await?;
    if status != 200 {
        return Err(anyhow!("GET {path}: status {status}: {v}"));
    }
    Ok(v)
}

/// POST that must answer 200.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    let (status, v) = call(addr, http::Method::POST, path, Some(body)).await?;
    if status != 200 {
        return Err(anyhow!("POST {path}: status {status}: {v}"));
    }
    Ok(v)
}
