//! In-process tests of the reference cloud over real HTTP and WebSocket connections on
//! 127.0.0.1:0. The pure rules (PIN window, tokens, de-duplication, state file) are tested in
//! `state`.

use super::*;
use crate::protocol::{PATH_CHANNEL, PATH_HEARTBEAT, PATH_IMAGES, PATH_REGISTER, PATH_RESULTS};
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Guards every wait on the cloud so that a bug fails the test instead of hanging it.
const GUARD: Duration = Duration::from_secs(10);

fn args(state_file: Option<PathBuf>) -> CloudArgs {
    CloudArgs {
        listen: "127.0.0.1:0".into(),
        tenant: "acme".into(),
        pin: "123456".into(),
        images: None,
        provisioning: None,
        state_file,
        pin_grace: Duration::from_secs(24 * 3600),
        pin_reset_cooldown: Duration::from_secs(24 * 3600),
        inactive_after: Duration::from_secs(600),
        heartbeat_interval: Duration::from_secs(120),
        tls_listen: None,
        tls_cert: None,
        tls_key: None,
    }
}

async fn start_cloud(args: CloudArgs) -> CloudHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start(listener, args).await.unwrap()
}

/// One request on a fresh connection; returns the status and the body (JSON, or a JSON string
/// holding the raw text when it is not JSON).
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string());
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .unwrap();
    let resp = tokio::time::timeout(GUARD, sender.send_request(req))
        .await
        .expect("no answer")
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, value)
}

async fn get(addr: SocketAddr, path: &str) -> Value {
    let (status, v) = call(addr, "GET", path, None, None).await;
    assert_eq!(status, 200, "GET {path}: {v}");
    v
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    call(addr, "POST", path, None, Some(&body.to_string())).await
}

fn registration(relay_id: &str, pin: &str) -> String {
    json!({
        "protocol": 1, "tenant_id": "acme", "pin": pin, "relay_id": relay_id,
        "hostname": "vm1", "version": "0.1.0", "fqdn": ["relay.corp"], "addresses": ["10.0.0.5"]
    })
    .to_string()
}

async fn register(addr: SocketAddr, relay_id: &str, pin: &str) -> (u16, Value) {
    call(
        addr,
        "POST",
        PATH_REGISTER,
        None,
        Some(&registration(relay_id, pin)),
    )
    .await
}

async fn register_ok(addr: SocketAddr, relay_id: &str, pin: &str) -> String {
    let (status, v) = register(addr, relay_id, pin).await;
    assert_eq!(status, 200, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

fn heartbeat_body() -> String {
    json!({
        "seq": 1, "uptime_s": 5, "version": "0.1.0",
        "agents": {"management": {"state": "ok"}, "download": {"state": "off"}, "provisioning": {"state": "off"}}
    })
    .to_string()
}

async fn heartbeat(addr: SocketAddr, token: &str) -> (u16, Value) {
    call(
        addr,
        "POST",
        PATH_HEARTBEAT,
        Some(token),
        Some(&heartbeat_body()),
    )
    .await
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no error code>")
}

fn result_body(ids: &[(&str, &str)]) -> String {
    let results: Vec<Value> = ids
        .iter()
        .map(|(id, cmd)| {
            json!({"result_id": id, "command_id": cmd, "name": "ping", "result": "success",
                   "payload": {"rtt_ms": 3}, "finished_at": "2026-01-01T00:00:00Z"})
        })
        .collect();
    json!({ "results": results }).to_string()
}

async fn connect_ws(addr: SocketAddr, token: &str) -> Ws {
    let mut req = format!("ws://{addr}{PATH_CHANNEL}")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    let stream = TcpStream::connect(addr).await.unwrap();
    let (ws, _) = tokio::time::timeout(GUARD, tokio_tungstenite::client_async(req, stream))
        .await
        .unwrap()
        .unwrap();
    ws
}

/// The next text frame, as JSON.
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(GUARD, ws.next())
            .await
            .expect("no frame")
        {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Sends a ping and waits for its pong. The cloud handles frames in order, so once the pong is
/// back every frame sent before the ping has been processed.
async fn ping_roundtrip(ws: &mut Ws) {
    ws.send(Message::Ping(Bytes::from_static(b"sync")))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(GUARD, ws.next())
            .await
            .expect("no pong")
        {
            Some(Ok(Message::Pong(p))) if &p[..] == b"sync" => return,
            Some(Ok(_)) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn register_heartbeat_results_and_errors() {
    let cloud = start_cloud(args(None)).await;
    let addr = cloud.addr;

    let (status, v) = register(addr, "r-1", "123456").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["heartbeat_interval_s"], 120);
    assert!(v["server_time"].as_str().unwrap().ends_with('Z'));
    let token = v["token"].as_str().unwrap().to_owned();

    let (status, v) = heartbeat(addr, &token).await;
    assert_eq!(
        (
            status,
            v["next_interval_s"].as_u64(),
            v["images_revision"].as_u64()
        ),
        (200, Some(120), Some(0))
    );

    let relays = get(addr, "/sim/relays").await;
    let r = &relays[0];
    assert_eq!(
        (
            r["relay_id"].as_str(),
            r["state"].as_str(),
            r["heartbeats"].as_u64()
        ),
        (Some("r-1"), Some("active"), Some(1))
    );
    assert_eq!(
        (r["registrations"].as_u64(), r["channel"].as_str()),
        (Some(1), Some("disconnected"))
    );
    assert_eq!(r["last_heartbeat_request"]["seq"], 1);

    // Authentication and body errors.
    let (status, v) = call(addr, "POST", PATH_HEARTBEAT, None, Some(&heartbeat_body())).await;
    assert_eq!((status, error_code(&v)), (401, "token_invalid"));
    let (status, v) = heartbeat(addr, "not-a-token").await;
    assert_eq!((status, error_code(&v)), (401, "token_invalid"));
    let (status, v) = call(
        addr,
        "POST",
        PATH_HEARTBEAT,
        Some(&token),
        Some("{\"seq\": \"x\""),
    )
    .await;
    assert_eq!((status, error_code(&v)), (400, "bad_request"));

    // Registration refusals, each with its code.
    let (status, v) = register(addr, "r-1", "000000").await;
    assert_eq!((status, error_code(&v)), (401, "pin_rejected"));
    assert_eq!(v["error"]["message"], "PIN not valid for tenant acme");
    let other_tenant = registration("r-1", "123456").replace("\"acme\"", "\"globex\"");
    let (status, v) = call(addr, "POST", PATH_REGISTER, None, Some(&other_tenant)).await;
    assert_eq!((status, error_code(&v)), (401, "unknown_tenant"));
    let (status, v) = call(
        addr,
        "POST",
        PATH_REGISTER,
        None,
        Some(r#"{"protocol": 2, "whatever": true}"#),
    )
    .await;
    assert_eq!((status, error_code(&v)), (400, "unsupported_version"));
    let (status, v) = call(addr, "POST", PATH_REGISTER, None, Some("<xml/>")).await;
    assert_eq!((status, error_code(&v)), (400, "bad_request"));
    let (status, v) = register(addr, "", "123456").await;
    assert_eq!((status, error_code(&v)), (400, "bad_request"));

    let (status, v) = call(addr, "GET", "/no/such/thing", None, None).await;
    assert_eq!((status, error_code(&v)), (404, "not_found"));
    let (status, v) = call(addr, "GET", PATH_REGISTER, None, None).await;
    assert_eq!((status, error_code(&v)), (405, "bad_request"));
    let (status, v) = call(addr, "GET", PATH_IMAGES, Some(&token), None).await;
    assert_eq!((status, v), (200, json!({"revision": 0, "images": []})));
    let (status, v) = call(
        addr,
        "POST",
        "/relay/v1/device-status",
        Some(&token),
        Some(r#"{"reports": []}"#),
    )
    .await;
    assert_eq!(
        (status, v),
        (
            200,
            json!({"reports": 0, "alarms": 0, "duplicate_alarms": 0})
        )
    );

    // Results: stored once, a retry only counts duplicates.
    let batch = result_body(&[("res-1", "cmd-x"), ("res-2", "cmd-x")]);
    let (status, v) = call(addr, "POST", PATH_RESULTS, Some(&token), Some(&batch)).await;
    assert_eq!(
        (status, v),
        (
            200,
            json!({"accepted": ["res-1", "res-2"], "duplicates": 0})
        )
    );
    let (status, v) = call(addr, "POST", PATH_RESULTS, Some(&token), Some(&batch)).await;
    assert_eq!(
        (status, v),
        (
            200,
            json!({"accepted": ["res-1", "res-2"], "duplicates": 2})
        )
    );
    assert_eq!(get(addr, "/sim/results").await.as_array().unwrap().len(), 2);
    let ids: Vec<String> = (0..1001).map(|i| format!("big-{i}")).collect();
    let pairs: Vec<(&str, &str)> = ids.iter().map(|i| (i.as_str(), "c")).collect();
    let (status, v) = call(
        addr,
        "POST",
        PATH_RESULTS,
        Some(&token),
        Some(&result_body(&pairs)),
    )
    .await;
    assert_eq!((status, error_code(&v)), (400, "bad_request"));
    let bad = result_body(&[("res-3", "c")]).replace("2026-01-01T00:00:00Z", "last tuesday");
    let (status, v) = call(addr, "POST", PATH_RESULTS, Some(&token), Some(&bad)).await;
    assert_eq!((status, error_code(&v)), (400, "bad_request"), "{v}");

    // A record over the per-record limit makes the batch 413 too_large, naming the record.
    assert_eq!(
        post(addr, "/sim/limits", json!({"max_record_bytes": 300})).await,
        (200, json!({"max_record_bytes": 300}))
    );
    let mut two: Value =
        serde_json::from_str(&result_body(&[("res-4", "c"), ("res-5", "c")])).unwrap();
    two["results"][1]["reason"] = json!("x".repeat(400));
    let (status, v) = call(
        addr,
        "POST",
        PATH_RESULTS,
        Some(&token),
        Some(&two.to_string()),
    )
    .await;
    assert_eq!((status, error_code(&v)), (413, "too_large"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("results[1]"),
        "{v}"
    );
    let (status, _) = call(
        addr,
        "POST",
        PATH_RESULTS,
        Some(&token),
        Some(&result_body(&[("res-4", "c")])),
    )
    .await;
    assert_eq!(status, 200, "the small record alone is taken");
    post(addr, "/sim/limits", json!({"max_record_bytes": 16 << 20})).await;

    // Fault injection covers the protocol endpoints, not the test API.
    assert_eq!(
        post(addr, "/sim/faults", json!({"mode": "http_500"})).await,
        (200, json!({"mode": "http_500"}))
    );
    let (status, v) = heartbeat(addr, &token).await;
    assert_eq!((status, error_code(&v)), (500, "internal"));
    post(addr, "/sim/faults", json!({"mode": "garbage"})).await;
    let (status, v) = register(addr, "r-1", "123456").await;
    assert_eq!((status, v), (200, Value::String("<html>oops".into())));
    let (status, _) = post(addr, "/sim/faults", json!({"mode": "sometimes"})).await;
    assert_eq!(status, 400);
    post(addr, "/sim/faults", json!({"mode": "none"})).await;
    assert_eq!(heartbeat(addr, &token).await.0, 200);

    let mut stats = get(addr, "/sim/stats").await;
    assert!(stats["connections"].as_u64() > Some(10), "{stats}");
    stats.as_object_mut().unwrap().remove("connections");
    let expect = json!({
        "image_bytes_served": 0, "heartbeats": 2, "results_received": 3, "duplicate_results": 2,
        "busy_answers": 0, "records_too_large": 1,
        "registrations": 1, "registrations_rejected": 5, "channel_connections": 0,
        "faulted_requests": 2, "device_status_reports": 1, "channel_bad_frames": 0,
        "provisioning_requests": 0, "provisioning_unauthorized": 0,
        "provisioning_bytes_in": 0, "provisioning_bytes_out": 0,
        "device_reports": 0, "alarms": 0, "duplicate_alarms": 0, "device_stats": 0,
        "artifacts_complete": 0, "artifact_bytes_received": 0, "artifact_checksum_mismatches": 0,
        "duplicate_target_results": 0, "targets_moved": 0
    });
    assert_eq!(stats, expect);
    tokio::time::timeout(GUARD, cloud.shutdown())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn pin_reset_window_and_stale_tokens() {
    // No grace at all: the old PIN and its tokens die at the reset itself, so the expiry path is
    // exercised without waiting. The longer window is covered by the pure tests in `state`.
    let mut a = args(None);
    a.pin_grace = Duration::ZERO;
    let cloud = start_cloud(a).await;
    let addr = cloud.addr;
    let token = register_ok(addr, "r-1", "123456").await;

    let (status, v) = post(addr, "/sim/tenants/acme/reset-pin", json!({})).await;
    assert_eq!(status, 200, "{v}");
    let new_pin = v["pin"].as_str().unwrap().to_owned();
    assert!(
        new_pin.len() == 6 && new_pin.bytes().all(|b| b.is_ascii_digit()) && new_pin != "123456"
    );
    assert!(v["old_pin_valid_until"].as_str().unwrap().ends_with('Z'));

    let (status, v) = post(addr, "/sim/tenants/acme/reset-pin", json!({})).await;
    assert_eq!((status, error_code(&v)), (409, "conflict"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("within 24 hours"),
        "{v}"
    );
    let (status, v) = post(addr, "/sim/tenants/globex/reset-pin", json!({})).await;
    assert_eq!((status, error_code(&v)), (404, "not_found"));

    // The relay with the stale PIN: its token stops working, then re-registering says why.
    let (status, v) = heartbeat(addr, &token).await;
    assert_eq!((status, error_code(&v)), (401, "token_invalid"));
    let (status, v) = register(addr, "r-1", "123456").await;
    assert_eq!((status, error_code(&v)), (401, "pin_rejected"));
    assert!(
        v["error"]["message"].as_str().unwrap().contains("reset"),
        "{v}"
    );
    let token = register_ok(addr, "r-1", &new_pin).await;
    assert_eq!(heartbeat(addr, &token).await.0, 200);
    cloud.shutdown().await.unwrap();

    // With a grace window the old PIN keeps working next to the new one.
    let cloud = start_cloud(args(None)).await;
    let addr = cloud.addr;
    let old_token = register_ok(addr, "r-1", "123456").await;
    let (_, v) = post(addr, "/sim/tenants/acme/reset-pin", json!({})).await;
    let new_pin = v["pin"].as_str().unwrap().to_owned();
    assert_eq!(heartbeat(addr, &old_token).await.0, 200);
    register_ok(addr, "r-1", "123456").await;
    register_ok(addr, "r-2", &new_pin).await;
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_busy_relay_gets_its_commands_again_after_a_backoff() {
    let cloud = start_cloud(args(None)).await;
    let addr = cloud.addr;
    let token = register_ok(addr, "r-1", "123456").await;
    let mut ws = connect_ws(addr, &token).await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");

    let (status, v) = post(addr, "/sim/flood", json!({"name": "ping", "count": 3})).await;
    assert_eq!(status, 200, "{v}");
    let ids: Vec<String> = v["command_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_owned())
        .collect();
    for id in &ids {
        assert_eq!(next_json(&mut ws).await["id"].as_str(), Some(id.as_str()));
    }
    // The relay takes the first and is busy for the others.
    let send = |v: Value| Message::text(v.to_string());
    ws.send(send(json!({"type": "ack", "id": ids[0]})))
        .await
        .unwrap();
    for id in &ids[1..] {
        ws.send(send(
            json!({"type": "error", "id": id, "code": "busy", "message": "queue full"}),
        ))
        .await
        .unwrap();
    }
    ping_roundtrip(&mut ws).await;
    assert_eq!(
        get(addr, &format!("/sim/commands/{}", ids[1])).await["state"],
        "queued"
    );
    assert_eq!(get(addr, "/sim/stats").await["busy_answers"], 2);
    // New commands wait for the backoff too, then everything waiting goes out, oldest first.
    let (_, v) = post(addr, "/sim/commands", json!({"name": "ping"})).await;
    assert_eq!(v["state"], "queued", "nothing is pushed to a busy relay");
    let fourth = v["command_id"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    assert_eq!(
        next_json(&mut ws).await["id"].as_str(),
        Some(ids[1].as_str())
    );
    assert!(
        started.elapsed() >= channel::BUSY_BASE / 2,
        "sent again only after the backoff"
    );
    assert_eq!(
        next_json(&mut ws).await["id"].as_str(),
        Some(ids[2].as_str())
    );
    assert_eq!(
        next_json(&mut ws).await["id"].as_str(),
        Some(fourth.as_str())
    );
    // Busy again for one of them: the next wait is longer.
    ws.send(send(
        json!({"type": "error", "id": ids[2], "code": "busy", "message": "queue full"}),
    ))
    .await
    .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(
        next_json(&mut ws).await["id"].as_str(),
        Some(ids[2].as_str())
    );
    assert!(started.elapsed() >= channel::BUSY_BASE, "the step doubled");
    let (status, _) = post(addr, "/sim/flood", json!({"name": "ping", "count": 0})).await;
    assert_eq!(status, 400);
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn channel_commands_acks_and_test_hooks() {
    let cloud = start_cloud(args(None)).await;
    let addr = cloud.addr;

    // No command target before any registration; no upgrade without a valid token.
    let (status, _) = post(addr, "/sim/commands", json!({"name": "ping"})).await;
    assert_eq!(status, 400);
    let token = register_ok(addr, "r-1", "123456").await;
    let mut req = format!("ws://{addr}{PATH_CHANNEL}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert(http::header::AUTHORIZATION, "Bearer nope".parse().unwrap());
    match tokio_tungstenite::client_async(req, TcpStream::connect(addr).await.unwrap()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected a 401 answer, got {other:?}"),
    }
    let (status, v) = call(addr, "GET", PATH_CHANNEL, Some(&token), None).await;
    assert_eq!((status, error_code(&v)), (400, "bad_request"));

    // A command posted while the relay is offline waits for the channel.
    let (_, v) = post(
        addr,
        "/sim/commands",
        json!({"name": "ping", "params": {"echo": "a"}}),
    )
    .await;
    assert_eq!(v["state"], "queued");
    let first = v["command_id"].as_str().unwrap().to_owned();
    assert!(first.starts_with("cmd-"));

    let mut ws = connect_ws(addr, &token).await;
    let hello = next_json(&mut ws).await;
    assert_eq!(
        (hello["type"].as_str(), hello["relay_id"].as_str()),
        (Some("hello"), Some("r-1"))
    );
    let cmd = next_json(&mut ws).await;
    assert_eq!(
        cmd,
        json!({"type": "command", "id": first, "name": "ping", "params": {"echo": "a"}})
    );
    assert_eq!(
        get(addr, &format!("/sim/commands/{first}")).await["state"],
        "sent"
    );

    // A command posted while connected goes out at once.
    let (_, v) = post(
        addr,
        "/sim/commands",
        json!({"relay_id": "r-1", "name": "reboot"}),
    )
    .await;
    assert_eq!(v["state"], "sent");
    let second = v["command_id"].as_str().unwrap().to_owned();
    let cmd = next_json(&mut ws).await;
    assert_eq!(
        (cmd["id"].as_str(), cmd["params"].clone()),
        (Some(second.as_str()), json!({}))
    );

    // Acks, error reports and junk from the relay.
    ws.send(Message::text(
        json!({"type": "ack", "id": first}).to_string(),
    ))
    .await
    .unwrap();
    ws.send(Message::text("{junk")).await.unwrap();
    ws.send(Message::text(
        json!({"type": "error", "id": "x1", "code": "malformed_message", "message": "not JSON"})
            .to_string(),
    ))
    .await
    .unwrap();
    ping_roundtrip(&mut ws).await;
    let c = get(addr, &format!("/sim/commands/{first}")).await;
    assert_eq!(
        (c["state"].as_str(), c["result"].is_null()),
        (Some("acked"), true)
    );
    assert_eq!(
        get(addr, "/sim/channel/errors").await,
        json!([{"relay_id": "r-1", "id": "x1", "code": "malformed_message", "message": "not JSON"}])
    );
    assert_eq!(get(addr, "/sim/stats").await["channel_bad_frames"], 1);
    let (status, _) = call(addr, "GET", "/sim/commands/cmd-unknown", None, None).await;
    assert_eq!(status, 404);

    // The result completes the command.
    let batch = result_body(&[("res-1", &first)]);
    assert_eq!(
        call(addr, "POST", PATH_RESULTS, Some(&token), Some(&batch))
            .await
            .0,
        200
    );
    let c = get(addr, &format!("/sim/commands/{first}")).await;
    assert_eq!(
        (c["state"].as_str(), c["result"]["result_id"].as_str()),
        (Some("done"), Some("res-1"))
    );

    // Raw frames go out exactly as given.
    let (status, _) = post(
        addr,
        "/sim/channel/raw",
        json!({"text": "{\"type\":\"teleport\"}"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(next_json(&mut ws).await, json!({"type": "teleport"}));

    // Frozen: commands wait; a new connection replaces the frozen one and gets them, plus the
    // second command that was sent but never acknowledged.
    let (status, _) = post(addr, "/sim/channel/freeze", json!({})).await;
    assert_eq!(status, 200);
    let (_, v) = post(addr, "/sim/commands", json!({"name": "dial"})).await;
    assert_eq!(v["state"], "queued");
    let third = v["command_id"].as_str().unwrap().to_owned();
    let (status, _) = post(addr, "/sim/channel/raw", json!({"text": "x"})).await;
    assert_eq!(status, 409);

    let mut ws2 = connect_ws(addr, &token).await;
    assert_eq!(next_json(&mut ws2).await["type"], "hello");
    assert_eq!(
        next_json(&mut ws2).await["id"].as_str(),
        Some(second.as_str())
    );
    assert_eq!(
        next_json(&mut ws2).await["id"].as_str(),
        Some(third.as_str())
    );
    match tokio::time::timeout(GUARD, ws.next())
        .await
        .expect("old connection still open")
    {
        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {}
        other => panic!("expected the replaced connection to end, got {other:?}"),
    }
    let relays = get(addr, "/sim/relays").await;
    assert_eq!(
        (
            relays[0]["channel"].as_str(),
            relays[0]["channel_connections"].as_u64()
        ),
        (Some("connected"), Some(2))
    );
    assert_eq!(relays[0]["channel_frozen"], false);
    assert_eq!(get(addr, "/sim/stats").await["channel_connections"], 2);

    // Shutdown closes the channel with a close frame and frees the port.
    tokio::time::timeout(GUARD, cloud.shutdown())
        .await
        .unwrap()
        .unwrap();
    match tokio::time::timeout(GUARD, ws2.next())
        .await
        .expect("channel still open after shutdown")
    {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1001),
        other => panic!("expected a close frame, got {other:?}"),
    }
    TcpListener::bind(addr)
        .await
        .expect("port still taken after shutdown");
}

#[tokio::test]
async fn restart_keeps_state_only_with_a_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.json");

    let cloud = start_cloud(args(Some(path.clone()))).await;
    let addr = cloud.addr;
    let token = register_ok(addr, "r-1", "123456").await;
    assert_eq!(heartbeat(addr, &token).await.0, 200);
    let (_, v) = post(addr, "/sim/tenants/acme/reset-pin", json!({})).await;
    let new_pin = v["pin"].as_str().unwrap().to_owned();
    let (_, v) = post(addr, "/sim/commands", json!({"name": "ping"})).await;
    let cmd = v["command_id"].as_str().unwrap().to_owned();
    let batch = result_body(&[("res-1", &cmd)]);
    assert_eq!(
        call(addr, "POST", PATH_RESULTS, Some(&token), Some(&batch))
            .await
            .0,
        200
    );
    cloud.shutdown().await.unwrap();

    // Restarted with another --pin: the state file wins, tokens and de-duplication survive.
    let mut a = args(Some(path.clone()));
    a.pin = "999999".into();
    let cloud = start_cloud(a).await;
    let addr = cloud.addr;
    assert_eq!(heartbeat(addr, &token).await.0, 200);
    let (status, v) = call(addr, "POST", PATH_RESULTS, Some(&token), Some(&batch)).await;
    assert_eq!((status, v["duplicates"].as_u64()), (200, Some(1)));
    assert_eq!(
        get(addr, &format!("/sim/commands/{cmd}")).await["state"],
        "done"
    );
    let relays = get(addr, "/sim/relays").await;
    assert_eq!(relays[0]["heartbeats"], 2);
    assert_eq!(register(addr, "r-1", "999999").await.0, 401);
    register_ok(addr, "r-1", &new_pin).await;
    let (status, v) = post(addr, "/sim/tenants/acme/reset-pin", json!({})).await;
    assert_eq!(
        (status, error_code(&v)),
        (409, "conflict"),
        "the cooldown survives a restart"
    );
    cloud.shutdown().await.unwrap();

    // Without a state file a restart forgets everything: the relay must register again.
    let cloud = start_cloud(args(None)).await;
    let addr = cloud.addr;
    let (status, v) = heartbeat(addr, &token).await;
    assert_eq!((status, error_code(&v)), (401, "token_invalid"));
    let token = register_ok(addr, "r-1", "123456").await;
    assert_eq!(heartbeat(addr, &token).await.0, 200);
    cloud.shutdown().await.unwrap();

    // A corrupt state file is refused, naming the file.
    std::fs::write(&path, "{\"format\": 1, \"tenants\": 7}").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = match start(listener, args(Some(path.clone()))).await {
        Err(e) => format!("{e:#}"),
        Ok(_) => panic!("a corrupt state file was accepted"),
    };
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[tokio::test]
async fn hanging_requests_do_not_block_shutdown() {
    let cloud = start_cloud(args(None)).await;
    let addr = cloud.addr;
    post(addr, "/sim/faults", json!({"mode": "hang"})).await;
    let mut hung = tokio::spawn(async move {
        call(
            addr,
            "POST",
            PATH_REGISTER,
            None,
            Some(&registration("r", "123456")),
        )
        .await
    });
    // Asserts the fault itself: no answer for a while (the relay's timeout has to fire).
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), &mut hung).await {
        panic!("hanging request was answered: {r:?}");
    }
    assert_eq!(get(addr, "/sim/stats").await["faulted_requests"], 1);
    tokio::time::timeout(GUARD, cloud.shutdown())
        .await
        .expect("shutdown blocked by a hanging request")
        .unwrap();
    // Shutdown ends the hanging request: answered 503 busy, or the connection is closed.
    if let Ok((status, v)) = tokio::time::timeout(GUARD, hung).await.unwrap() {
        assert_eq!((status, error_code(&v)), (503, "busy"));
    }
}

// ---------------------------------------------------------------------------------------------
// Provisioning tree.

const BASIC_OK: &str = "Basic UGxjbVNwSXA6UGxjbVNwSXA="; // PlcmSpIp:PlcmSpIp

/// A cloud serving `<tmp>/tree`; `<tmp>` itself is "outside" for the traversal checks.
async fn start_prov_cloud() -> (CloudHandle, tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let mut a = args(None);
    a.provisioning = Some(tree.clone());
    let cloud = start_cloud(a).await;
    (cloud, tmp, tree)
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

/// Sends one request on `sender` (so that several can share a connection).
async fn send_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Answer {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        GUARD,
        sender.send_request(req.body(Full::new(body)).unwrap()),
    )
    .await
    .expect("no answer")
    .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(GUARD, resp.into_body().collect())
        .await
        .expect("body stalled")
        .unwrap()
        .to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

async fn connect_http(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// One request on a fresh connection.
async fn prov(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Answer {
    let mut sender = connect_http(addr).await;
    send_on(&mut sender, addr, method, path, headers, body).await
}

/// Sends raw bytes (for request lines a client library would not write) and returns the status.
async fn raw_status(addr: SocketAddr, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(GUARD, s.read_to_end(&mut out))
        .await
        .expect("no answer")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

fn md5_hex(s: &str) -> String {
    use md5::Digest as _;
    md5::Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn challenge_param(challenge: &str, name: &str) -> Option<String> {
    let at = challenge.find(&format!("{name}="))? + name.len() + 1;
    let rest = &challenge[at..];
    Some(match rest.strip_prefix('"') {
        Some(q) => q[..q.find('"')?].to_owned(),
        None => rest.split([',', ' ']).next()?.to_owned(),
    })
}

/// Digest `Authorization` computed here from RFC 7616, independently of the cloud's code.
fn digest_header(method: &str, uri: &str, nonce: &str, password: &str, qop: bool) -> String {
    let ha1 = md5_hex(&format!("PlcmSpIp:ucrelay-sim:{password}"));
    let ha2 = md5_hex(&format!("{method}:{uri}"));
    if qop {
        let response = md5_hex(&format!("{ha1}:{nonce}:0000000a:abcdef:auth:{ha2}"));
        format!(
            r#"Digest username="PlcmSpIp", realm="ucrelay-sim", nonce="{nonce}", uri="{uri}", qop=auth, nc=0000000a, cnonce="abcdef", response="{response}", algorithm=MD5"#
        )
    } else {
        let response = md5_hex(&format!("{ha1}:{nonce}:{ha2}"));
        format!(
            r#"Digest username="PlcmSpIp", realm="ucrelay-sim", nonce="{nonce}", uri="{uri}", response="{response}""#
        )
    }
}

/// A fresh nonce from a 401.
async fn nonce(addr: SocketAddr) -> String {
    let a = prov(addr, "GET", "/000000000000.cfg", &[], Bytes::new()).await;
    assert_eq!(a.status, 401);
    let digest = a.headers.get_all("www-authenticate").iter().next().unwrap();
    challenge_param(digest.to_str().unwrap(), "nonce").unwrap()
}

#[tokio::test]
async fn provisioning_auth_challenges_and_schemes() {
    let (cloud, _tmp, tree) = start_prov_cloud().await;
    let addr = cloud.addr;
    let cfg = b"<?xml version=\"1.0\"?><APPLICATION APP_FILE_PATH=\"sip.ld\" CONFIG_FILES=\"\"/>";
    std::fs::write(tree.join("000000000000.cfg"), cfg).unwrap();

    // The phones' connectivity test: challenged, Digest then Basic.
    let a = prov(addr, "GET", "/000000000000.cfg", &[], Bytes::new()).await;
    assert_eq!(a.status, 401);
    let challenges: Vec<&str> = a
        .headers
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(challenges.len(), 2, "{challenges:?}");
    assert!(
        challenges[0].starts_with(r#"Digest realm="ucrelay-sim", qop="auth", nonce=""#)
            && challenges[0].ends_with("algorithm=MD5"),
        "{challenges:?}"
    );
    assert_eq!(challenges[1], r#"Basic realm="ucrelay-sim""#);
    let n = challenge_param(challenges[0], "nonce").unwrap();
    assert!(n.len() >= 32, "{n}");
    assert_ne!(n, nonce(addr).await, "nonces are fresh each time");

    // Basic.
    let a = prov(
        addr,
        "GET",
        "/000000000000.cfg",
        &[("authorization", BASIC_OK)],
        Bytes::new(),
    )
    .await;
    assert_eq!((a.status, &a.body[..]), (200, &cfg[..]));
    assert_eq!(a.headers["content-type"], "application/xml");
    assert_eq!(a.headers["content-length"], cfg.len().to_string().as_str());
    assert!(
        a.headers["last-modified"]
            .to_str()
            .unwrap()
            .ends_with(" GMT")
    );
    let wrong = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "PlcmSpIp:wrong")
    );
    let a = prov(
        addr,
        "GET",
        "/000000000000.cfg",
        &[("authorization", &wrong)],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 401);
    assert_eq!(a.headers.get_all("www-authenticate").iter().count(), 2);

    // Digest, with qop=auth and in the legacy form, for GET and for a query string.
    for qop in [true, false] {
        let n = nonce(addr).await;
        let h = digest_header("GET", "/000000000000.cfg", &n, "PlcmSpIp", qop);
        let a = prov(
            addr,
            "GET",
            "/000000000000.cfg",
            &[("authorization", &h)],
            Bytes::new(),
        )
        .await;
        assert_eq!((a.status, &a.body[..]), (200, &cfg[..]), "qop {qop}");
    }
    let n = nonce(addr).await;
    let h = digest_header("GET", "/000000000000.cfg?x=1", &n, "PlcmSpIp", true);
    let a = prov(
        addr,
        "GET",
        "/000000000000.cfg?x=1",
        &[("authorization", &h)],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 200);

    // Digest refusals: wrong password, uri of another request, method changed; none stale.
    let n = nonce(addr).await;
    for (method, uri, path, password) in [
        ("GET", "/000000000000.cfg", "/000000000000.cfg", "wrong"),
        ("GET", "/other.cfg", "/000000000000.cfg", "PlcmSpIp"),
        ("PUT", "/000000000000.cfg", "/000000000000.cfg", "PlcmSpIp"),
    ] {
        let h = digest_header(method, uri, &n, password, true);
        let a = prov(addr, "GET", path, &[("authorization", &h)], Bytes::new()).await;
        assert_eq!(a.status, 401, "{method} {uri} {password}");
        let d = a.headers["www-authenticate"].to_str().unwrap();
        assert!(!d.contains("stale"), "{d}");
    }
    // A correct answer to a nonce the cloud never gave (or forgot): stale, so retry at once.
    let h = digest_header(
        "GET",
        "/000000000000.cfg",
        "0123456789abcdef",
        "PlcmSpIp",
        true,
    );
    let a = prov(
        addr,
        "GET",
        "/000000000000.cfg",
        &[("authorization", &h)],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 401);
    assert!(
        a.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .ends_with(", stale=true"),
        "{:?}",
        a.headers
    );

    // The API stays the API.
    let (status, v) = call(addr, "GET", "/relay/v1/nothing", None, None).await;
    assert_eq!((status, error_code(&v)), (404, "not_found"));
    let stats = get(addr, "/sim/stats").await;
    assert_eq!(stats["provisioning_requests"], 15);
    assert_eq!(stats["provisioning_unauthorized"], 11);
    assert_eq!(stats["provisioning_bytes_out"], 4 * cfg.len());
    cloud.shutdown().await.unwrap();

    // Without --provisioning there is no tree.
    let cloud = start_cloud(args(None)).await;
    let (status, v) = call(cloud.addr, "GET", "/000000000000.cfg", None, None).await;
    assert_eq!((status, error_code(&v)), (404, "not_found"));
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn provisioning_put_get_head_delete() {
    let (cloud, _tmp, tree) = start_prov_cloud().await;
    let addr = cloud.addr;
    let auth = [("authorization", BASIC_OK)];
    let data = Bytes::from(
        std::iter::repeat_with(|| fastrand::u8(..))
            .take(3 << 20)
            .collect::<Vec<u8>>(),
    );

    let a = prov(
        addr,
        "PUT",
        "/logs/0004f2e765da-app.log",
        &auth,
        data.clone(),
    )
    .await;
    assert_eq!(a.status, 201);
    let a = prov(
        addr,
        "GET",
        "/logs/0004f2e765da-app.log",
        &auth,
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "text/plain");
    assert!(a.body == data, "round trip changed the bytes");
    assert_eq!(
        std::fs::read(tree.join("logs/0004f2e765da-app.log")).unwrap(),
        data
    );

    // Replaced: 204; a Digest PUT (computed for the PUT method) works too.
    let n = nonce(addr).await;
    let h = digest_header("PUT", "/logs/0004f2e765da-app.log", &n, "PlcmSpIp", true);
    let a = prov(
        addr,
        "PUT",
        "/logs/0004f2e765da-app.log",
        &[("authorization", &h)],
        Bytes::from_static(b"second"),
    )
    .await;
    assert_eq!(a.status, 204);
    let a = prov(
        addr,
        "HEAD",
        "/logs/0004f2e765da-app.log",
        &auth,
        Bytes::new(),
    )
    .await;
    assert_eq!((a.status, a.body.len()), (200, 0));
    assert_eq!(a.headers["content-length"], "6");
    let a = prov(addr, "HEAD", "/nothing.cfg", &auth, Bytes::new()).await;
    assert_eq!(a.status, 404);
    let a = prov(addr, "GET", "/a.bin", &auth, Bytes::new()).await;
    assert_eq!(a.status, 404);
    std::fs::write(tree.join("a.bin"), b"x").unwrap();
    assert_eq!(
        prov(addr, "GET", "/a.bin", &auth, Bytes::new())
            .await
            .headers["content-type"],
        "application/octet-stream"
    );
    // A directory is not a file.
    assert_eq!(
        prov(addr, "GET", "/logs", &auth, Bytes::new()).await.status,
        404
    );
    assert_eq!(
        prov(addr, "PUT", "/logs", &auth, Bytes::from_static(b"x"))
            .await
            .status,
        409
    );
    assert_eq!(
        prov(addr, "PUT", "/a.bin/x.cfg", &auth, Bytes::from_static(b"x"))
            .await
            .status,
        409
    );
    assert_eq!(
        prov(addr, "POST", "/a.bin", &auth, Bytes::new())
            .await
            .status,
        405
    );

    // DELETE.
    assert_eq!(
        prov(addr, "DELETE", "/a.bin", &auth, Bytes::new())
            .await
            .status,
        204
    );
    assert!(!tree.join("a.bin").exists());
    assert_eq!(
        prov(addr, "DELETE", "/a.bin", &auth, Bytes::new())
            .await
            .status,
        404
    );
    assert_eq!(
        prov(addr, "DELETE", "/a.bin", &[], Bytes::new())
            .await
            .status,
        401
    );

    // Too big: refused from the declared length, before anything is read.
    let big = raw_status(
        addr,
        &format!(
            "PUT /huge.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {BASIC_OK}\r\nContent-Length: {}\r\n\r\n",
            (1u64 << 30) + 1
        ),
    )
    .await;
    assert_eq!(big, 413);
    assert!(!tree.join("huge.bin").exists());
    // No temporary files left behind.
    let names: Vec<String> = std::fs::read_dir(tree.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["0004f2e765da-app.log"]);

    let stats = get(addr, "/sim/stats").await;
    // Refused uploads are not read (the 409s above), so only stored bytes count.
    assert_eq!(stats["provisioning_bytes_in"], data.len() + 6);
    assert_eq!(stats["provisioning_bytes_out"], data.len() + 1);
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn provisioning_refuses_paths_out_of_the_tree() {
    let (cloud, tmp, tree) = start_prov_cloud().await;
    let addr = cloud.addr;
    std::fs::write(tmp.path().join("secret"), b"outside").unwrap();
    for path in [
        "/../secret",
        "/%2e%2e/secret",
        "/a/..%2F..%2Fsecret",
        "/a\\b",
        "/a%5Cb",
        "/x%00.cfg",
    ] {
        for method in ["GET", "PUT", "DELETE"] {
            // With and without credentials: the path is checked first.
            for auth in ["", &format!("Authorization: {BASIC_OK}\r\n")] {
                let status = raw_status(
                    addr,
                    &format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 4\r\nConnection: close\r\n\r\nevil"),
                )
                .await;
                assert_eq!(status, 400, "{method} {path}");
            }
        }
    }
    // Refused by the tree itself (not by the HTTP parser), and logged as such.
    let log = get(addr, "/sim/provisioning/log").await;
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 36);
    assert!(log.iter().all(|e| e["status"] == 400), "{log:?}");
    assert_eq!(log[18]["path"], "/a\\b");
    assert_eq!(
        std::fs::read(tmp.path().join("secret")).unwrap(),
        b"outside"
    );
    let mut outside: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    outside.sort();
    assert_eq!(outside, ["secret", "tree"]);
    assert_eq!(std::fs::read_dir(&tree).unwrap().count(), 0);

    // A symbolic link leading out of the tree is not followed.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(tmp.path(), tree.join("out")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), tree.join("s.cfg")).unwrap();
        let auth = [("authorization", BASIC_OK)];
        assert_eq!(
            prov(addr, "GET", "/out/secret", &auth, Bytes::new())
                .await
                .status,
            403
        );
        assert_eq!(
            prov(addr, "GET", "/s.cfg", &auth, Bytes::new())
                .await
                .status,
            403
        );
        assert_eq!(
            prov(addr, "PUT", "/out/new", &auth, Bytes::from_static(b"x"))
                .await
                .status,
            403
        );
        assert_eq!(
            prov(addr, "DELETE", "/out/secret", &auth, Bytes::new())
                .await
                .status,
            403
        );
        assert_eq!(
            std::fs::read(tmp.path().join("secret")).unwrap(),
            b"outside"
        );
        assert!(!tmp.path().join("new").exists());
    }
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn provisioning_log_and_keep_alive() {
    let (cloud, _tmp, tree) = start_prov_cloud().await;
    let addr = cloud.addr;
    std::fs::write(tree.join("0004f2e765da.cfg"), b"<APPLICATION/>").unwrap();

    // What a proxy sends, on one pooled connection: a refused PUT with a body, then the same PUT
    // with credentials, then a GET. The connection must survive the 401.
    let mut sender = connect_http(addr).await;
    let fwd = [
        (
            "user-agent",
            "FileTransport PolycomVVX-VVX_411-UA/6.4.7.4560 (SN:0004f2e765da) Type/Application",
        ),
        ("x-forwarded-for", "10.1.2.3"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "relay.corp.example"),
    ];
    let a = send_on(
        &mut sender,
        addr,
        "PUT",
        "/0004f2e765da-app.log",
        &fwd,
        Bytes::from_static(b"log line\n"),
    )
    .await;
    assert_eq!(a.status, 401);
    assert!(a.headers.get("connection").is_none(), "{:?}", a.headers);
    let mut with_auth = fwd.to_vec();
    with_auth.push(("authorization", BASIC_OK));
    let a = send_on(
        &mut sender,
        addr,
        "PUT",
        "/0004f2e765da-app.log",
        &with_auth,
        Bytes::from_static(b"log line\n"),
    )
    .await;
    assert_eq!(a.status, 201);
    let a = send_on(
        &mut sender,
        addr,
        "GET",
        "/0004f2e765da.cfg",
        &with_auth,
        Bytes::new(),
    )
    .await;
    assert_eq!((a.status, &a.body[..]), (200, &b"<APPLICATION/>"[..]));
    assert!(sender.is_ready(), "connection closed");

    let log = get(addr, "/sim/provisioning/log").await;
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 3);
    assert_eq!(
        log[0],
        json!({
            "method": "PUT", "path": "/0004f2e765da-app.log", "status": 401,
            "user_agent": fwd[0].1, "x_forwarded_for": "10.1.2.3", "x_forwarded_proto": "https",
            "x_forwarded_host": "relay.corp.example", "host": addr.to_string(),
            "forwarded": null, "via": null, "auth": "none"
        })
    );
    assert_eq!(
        (log[1]["status"].as_u64(), log[1]["auth"].as_str()),
        (Some(201), Some("basic"))
    );
    assert_eq!(
        (log[2]["method"].as_str(), log[2]["status"].as_u64()),
        (Some("GET"), Some(200))
    );

    // Bounded to the last 100.
    for _ in 0..105 {
        prov(addr, "GET", "/x.cfg?n=1", &[], Bytes::new()).await;
    }
    let log = get(addr, "/sim/provisioning/log").await;
    assert_eq!(log.as_array().unwrap().len(), 100);
    assert_eq!(log[99]["path"], "/x.cfg?n=1");
    let (status, v) = call(addr, "DELETE", "/sim/provisioning/log", None, None).await;
    assert_eq!((status, v["cleared"].as_u64()), (200, Some(100)));
    assert_eq!(get(addr, "/sim/provisioning/log").await, json!([]));
    cloud.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Images: catalog, file serving, test hooks.

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn sha_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A cloud publishing `dir`, with a registered relay `r-1`; returns the cloud and its token.
async fn start_image_cloud(dir: &std::path::Path) -> (CloudHandle, String) {
    let mut a = args(None);
    a.images = Some(dir.to_path_buf());
    let cloud = start_cloud(a).await;
    let token = register_ok(cloud.addr, "r-1", "123456").await;
    (cloud, token)
}

/// One request on a fresh connection for a file: status, headers and the raw body.
async fn fetch(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Bytes) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string());
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    let resp = tokio::time::timeout(GUARD, sender.send_request(req))
        .await
        .expect("no answer")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(GUARD, resp.into_body().collect())
        .await
        .expect("body not complete")
        .unwrap()
        .to_bytes();
    (status, headers, body)
}

fn hdr<'a>(h: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn image_catalog_manifest_and_revision() {
    let dir = tempfile::tempdir().unwrap();
    let a = pseudo_random(1000, 1);
    std::fs::write(dir.path().join("a.bin"), &a).unwrap();
    std::fs::write(dir.path().join("b-6.4.7_x~1.txt"), b"hello").unwrap();
    // Not published: dotfiles, names needing escapes, empty files, directories and their files.
    std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
    std::fs::write(dir.path().join("bad name.bin"), b"x").unwrap();
    std::fs::write(dir.path().join("empty.bin"), b"").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub").join("deep.bin"), b"x").unwrap();

    let (cloud, token) = start_image_cloud(dir.path()).await;
    let addr = cloud.addr;
    let (status, m) = call(addr, "GET", PATH_IMAGES, Some(&token), None).await;
    assert_eq!(status, 200, "{m}");
    let rev = m["revision"].as_u64().unwrap();
    assert_ne!(rev, 0);
    let (sha_a, sha_b) = (sha_hex(&a), sha_hex(b"hello"));
    assert_eq!(
        m["images"],
        json!([
            {"id": "a.bin", "product": "sim", "version": &sha_a[..12], "files": [
                {"path": "/images/a.bin", "size": 1000, "sha256": sha_a, "url": "/files/a.bin"}]},
            {"id": "b-6.4.7_x~1.txt", "product": "sim", "version": &sha_b[..12], "files": [
                {"path": "/images/b-6.4.7_x~1.txt", "size": 5, "sha256": sha_b,
                 "url": "/files/b-6.4.7_x~1.txt"}]},
        ])
    );
    let (status, v) = call(addr, "GET", PATH_IMAGES, None, None).await;
    assert_eq!((status, error_code(&v)), (401, "token_invalid"));
    let (status, hb) = heartbeat(addr, &token).await;
    assert_eq!((status, hb["images_revision"].as_u64()), (200, Some(rev)));

    // The same directory gives the same revision in another process.
    let (other, _) = start_image_cloud(dir.path()).await;
    let (status, m2) = post(other.addr, "/sim/images/rescan", json!({})).await;
    assert_eq!((status, m2["revision"].as_u64()), (200, Some(rev)));
    other.shutdown().await.unwrap();

    // Adding a file changes it; the heartbeat echoes the new one.
    std::fs::write(dir.path().join("c.bin"), b"third").unwrap();
    let (status, m) = post(addr, "/sim/images/rescan", json!({})).await;
    let rev2 = m["revision"].as_u64().unwrap();
    assert_eq!((status, m["images"].as_array().unwrap().len()), (200, 3));
    assert_ne!(rev2, rev);
    assert_eq!(heartbeat(addr, &token).await.1["images_revision"], rev2);

    // Changing a file changes it; the manifest request itself rescans.
    std::fs::write(dir.path().join("a.bin"), pseudo_random(1001, 2)).unwrap();
    let (_, m) = call(addr, "GET", PATH_IMAGES, Some(&token), None).await;
    let rev3 = m["revision"].as_u64().unwrap();
    assert!(rev3 != rev && rev3 != rev2, "{rev} {rev2} {rev3}");
    assert_eq!(m["images"][0]["files"][0]["size"], 1001);
    assert_eq!(heartbeat(addr, &token).await.1["images_revision"], rev3);

    // Back to the first contents: back to the first revision.
    std::fs::write(dir.path().join("a.bin"), &a).unwrap();
    std::fs::remove_file(dir.path().join("c.bin")).unwrap();
    let (_, m) = call(addr, "GET", PATH_IMAGES, Some(&token), None).await;
    assert_eq!(m["revision"], rev);

    let list = get(addr, "/sim/images").await;
    assert_eq!(
        list[0],
        json!({"id": "a.bin", "path": "/images/a.bin", "size": 1000, "sha256": sha_a,
               "bytes_served": 0, "requests": 0, "range_requests": 0, "authorization_seen": 0})
    );
    assert_eq!(list.as_array().unwrap().len(), 2);
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn image_files_ranges_head_and_counters() {
    const N: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(N, 3);
    std::fs::write(dir.path().join("fw.bin"), &data).unwrap();
    std::fs::write(dir.path().join(".hidden"), b"secret").unwrap();
    let etag = format!("\"{}\"", sha_hex(&data));
    let (cloud, token) = start_image_cloud(dir.path()).await;
    let addr = cloud.addr;
    let t = Some(token.as_str());
    let path = "/files/fw.bin";
    let mut served = 0;

    let (status, h, body) = fetch(addr, "GET", path, t, &[]).await;
    assert_eq!(status, 200);
    assert!(body == data, "whole file");
    assert_eq!(hdr(&h, "content-length"), Some("100000"));
    assert_eq!(hdr(&h, "accept-ranges"), Some("bytes"));
    assert_eq!(hdr(&h, "etag"), Some(etag.as_str()));
    assert_eq!(hdr(&h, "content-type"), Some("application/octet-stream"));
    assert!(hdr(&h, "last-modified").unwrap().ends_with(" GMT"));
    assert!(h.get("content-range").is_none());
    served += N;

    // Single ranges: exact, suffix, open-ended, clamped.
    for (range, first, last) in [
        ("bytes=10-19", 10, 19),
        ("bytes=-100", N - 100, N - 1),
        ("bytes=99990-", N - 10, N - 1),
        ("bytes=99990-500000", N - 10, N - 1),
    ] {
        let (status, h, body) = fetch(addr, "GET", path, t, &[("range", range)]).await;
        assert_eq!(status, 206, "{range}");
        assert!(body == data[first..=last], "{range}");
        let len = (last - first + 1).to_string();
        assert_eq!(hdr(&h, "content-length"), Some(len.as_str()), "{range}");
        let cr = format!("bytes {first}-{last}/{N}");
        assert_eq!(hdr(&h, "content-range"), Some(cr.as_str()), "{range}");
        assert_eq!(hdr(&h, "etag"), Some(etag.as_str()));
        served += last - first + 1;
    }

    // Unsatisfiable.
    let (status, h, body) = fetch(addr, "GET", path, t, &[("range", "bytes=100000-")]).await;
    assert_eq!(status, 416);
    assert_eq!(hdr(&h, "content-range"), Some("bytes */100000"));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error_code(&v), "bad_request");

    // Several ranges, or an If-Range that does not match: the whole file.
    for extra in [
        vec![("range", "bytes=0-1,5-6")],
        vec![("range", "bytes=10-19"), ("if-range", "\"0000\"")],
    ] {
        let (status, _, body) = fetch(addr, "GET", path, t, &extra).await;
        assert_eq!(status, 200, "{extra:?}");
        assert!(body == data, "{extra:?}");
        served += N;
    }
    let (status, _, body) = fetch(
        addr,
        "GET",
        path,
        t,
        &[("range", "bytes=10-19"), ("if-range", &etag)],
    )
    .await;
    assert_eq!((status, &body[..]), (206, &data[10..20]));
    served += 10;

    // HEAD: the headers of the GET, no body.
    let (status, h, body) = fetch(addr, "HEAD", path, t, &[]).await;
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(hdr(&h, "content-length"), Some("100000"));
    assert_eq!(hdr(&h, "accept-ranges"), Some("bytes"));
    assert_eq!(hdr(&h, "etag"), Some(etag.as_str()));
    let (status, h, body) = fetch(addr, "HEAD", path, t, &[("range", "bytes=0-9")]).await;
    assert_eq!((status, body.len()), (206, 0));
    assert_eq!(hdr(&h, "content-length"), Some("10"));
    assert_eq!(hdr(&h, "content-range"), Some("bytes 0-9/100000"));

    // Token required; unknown and unpublished names are 404.
    let (status, _, body) = fetch(addr, "GET", path, None, &[]).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, error_code(&v)), (401, "token_invalid"));
    let (status, _, _) = fetch(addr, "GET", path, Some("nope"), &[]).await;
    assert_eq!(status, 401);
    for p in ["/files/nope.bin", "/files/.hidden", "/files/..%2Fx"] {
        let (status, _, body) = fetch(addr, "GET", p, t, &[]).await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((status, error_code(&v)), (404, "not_found"), "{p}");
    }
    let (status, _, _) = fetch(addr, "POST", path, t, &[]).await;
    assert_eq!(status, 405);

    // Counters: every body byte, per file and in the stats.
    assert_eq!(get(addr, "/sim/stats").await["image_bytes_served"], served);
    let list = get(addr, "/sim/images").await;
    assert_eq!(
        (
            list[0]["bytes_served"].as_u64(),
            list[0]["requests"].as_u64(),
            list[0]["range_requests"].as_u64()
        ),
        (Some(served as u64), Some(11), Some(9))
    );
    cloud.shutdown().await.unwrap();

    // Without --images there is no /files.
    let plain = start_cloud(args(None)).await;
    let token = register_ok(plain.addr, "r-1", "123456").await;
    let (status, _, _) = fetch(plain.addr, "GET", path, Some(&token), &[]).await;
    assert_eq!(status, 404);
    plain.shutdown().await.unwrap();
}

#[tokio::test]
async fn hostile_and_cdn_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(1000, 9);
    std::fs::write(dir.path().join("fw.bin"), &data).unwrap();
    let (cloud, token) = start_image_cloud(dir.path()).await;
    let addr = cloud.addr;
    let t = Some(token.as_str());

    // The manifest lists whatever URL the test names; the redirect answers 302 to it.
    let (status, v) = post(
        addr,
        "/sim/images/faults",
        json!({"urls": {"fw.bin": "https://127.0.0.1:9/files/fw.bin?x=1"},
               "redirects": {"fw.bin": "https://cdn.example/fw.bin?signature=s"}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, m) = call(addr, "GET", "/relay/v1/images", t, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        m["images"][0]["files"][0]["url"],
        "https://127.0.0.1:9/files/fw.bin?x=1"
    );
    let (status, _, _) = fetch(addr, "GET", "/files/fw.bin", None, &[]).await;
    assert_eq!(status, 401, "the cloud's redirect is behind its token");
    let (status, h, _) = fetch(addr, "GET", "/files/fw.bin", t, &[]).await;
    assert_eq!(status, 302);
    assert_eq!(
        hdr(&h, "location"),
        Some("https://cdn.example/fw.bin?signature=s")
    );

    // A CDN origin: no token needed, the signature is, and credentials are refused and counted.
    let (status, _) = post(
        addr,
        "/sim/images/faults",
        json!({"anonymous": true, "signature": "s3"}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, body) = fetch(
        addr,
        "GET",
        "/files/fw.bin?expires=9&signature=s3",
        None,
        &[],
    )
    .await;
    assert_eq!((status, &body[..]), (200, &data[..]));
    let (status, _, _) = fetch(addr, "GET", "/files/fw.bin?signature=nope", None, &[]).await;
    assert_eq!(status, 403);
    let (status, _, _) = fetch(addr, "GET", "/files/fw.bin", None, &[]).await;
    assert_eq!(status, 403);
    let (status, _, _) = fetch(addr, "GET", "/files/fw.bin?signature=s3", t, &[]).await;
    assert_eq!(
        status, 400,
        "credentials are refused by a pre-signed origin"
    );
    let list = get(addr, "/sim/images").await;
    assert_eq!(list[0]["authorization_seen"], 2, "{list}");
    assert!(get(addr, "/sim/stats").await["connections"].as_u64() >= Some(8));

    for bad in [json!({"signature": ""}), json!({"redirects": {"a": ""}})] {
        let (status, _) = post(addr, "/sim/images/faults", bad.clone()).await;
        assert_eq!(status, 400, "{bad}");
    }
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn image_fault_hooks() {
    const N: usize = 10_001;
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(N, 4);
    std::fs::write(dir.path().join("fw.bin"), &data).unwrap();
    std::fs::write(dir.path().join("ok.bin"), &data).unwrap();
    let (cloud, token) = start_image_cloud(dir.path()).await;
    let addr = cloud.addr;
    let t = Some(token.as_str());

    // Corrupt: same length, one byte flipped at len/2, wherever the range covers it.
    let (status, v) = post(addr, "/sim/images/faults", json!({"corrupt": ["fw.bin"]})).await;
    let want = json!({"corrupt": ["fw.bin"], "rate_bytes_per_s": null, "no_range": false, "fail_status": null,
        "urls": {}, "redirects": {}, "anonymous": false, "signature": null});
    assert_eq!((status, &v), (200, &want));
    assert_eq!(get(addr, "/sim/images/faults").await, want);
    let (status, _, body) = fetch(addr, "GET", "/files/fw.bin", t, &[]).await;
    assert_eq!((status, body.len()), (200, N));
    assert_ne!(sha_hex(&body), sha_hex(&data));
    let diffs: Vec<usize> = (0..N).filter(|&i| body[i] != data[i]).collect();
    assert_eq!(diffs, vec![N / 2]);
    assert_eq!(body[N / 2], data[N / 2] ^ 0xFF);
    let (status, _, body) = fetch(
        addr,
        "GET",
        "/files/fw.bin",
        t,
        &[("range", "bytes=4990-5009")],
    )
    .await;
    assert_eq!((status, body.len()), (206, 20));
    assert_eq!(body[10], data[5000] ^ 0xFF);
    assert_eq!(
        (&body[..10], &body[11..]),
        (&data[4990..5000], &data[5001..5010])
    );
    let (_, _, body) = fetch(addr, "GET", "/files/fw.bin", t, &[("range", "bytes=0-99")]).await;
    assert!(body == data[..100]);
    let (_, _, body) = fetch(addr, "GET", "/files/ok.bin", t, &[]).await;
    assert!(body == data);

    // No range support: 200 with the whole file, and saying so. Posting replaces every setting.
    let (status, _) = post(addr, "/sim/images/faults", json!({"no_range": true})).await;
    assert_eq!(status, 200);
    let (status, h, body) =
        fetch(addr, "GET", "/files/fw.bin", t, &[("range", "bytes=10-19")]).await;
    assert_eq!(status, 200);
    assert!(body == data, "whole and intact");
    assert_eq!(hdr(&h, "accept-ranges"), Some("none"));
    assert!(h.get("content-range").is_none());

    // Failing status, for every request, token or not.
    let (status, _) = post(addr, "/sim/images/faults", json!({"fail_status": 503})).await;
    assert_eq!(status, 200);
    let (status, _, body) = fetch(addr, "GET", "/files/fw.bin", t, &[]).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, error_code(&v)), (503, "busy"));
    let (status, _, _) = fetch(addr, "GET", "/files/nope.bin", None, &[]).await;
    assert_eq!(status, 503);
    let (status, _) = post(addr, "/sim/images/faults", json!({"fail_status": 500})).await;
    assert_eq!(status, 200);
    let (status, _, _) = fetch(addr, "HEAD", "/files/fw.bin", t, &[]).await;
    assert_eq!(status, 500);

    // Bad settings are refused and change nothing.
    for bad in [
        json!({"fail_status": 200}),
        json!({"fail_status": 700}),
        json!({"rate_bytes_per_s": 0}),
        json!({"corrupt": "fw.bin"}),
        json!({"bogus": true}),
    ] {
        let (status, v) = post(addr, "/sim/images/faults", bad.clone()).await;
        assert_eq!((status, error_code(&v)), (400, "bad_request"), "{bad}");
    }
    assert_eq!(get(addr, "/sim/images/faults").await["fail_status"], 500);

    // Cleared.
    let (status, _) = post(addr, "/sim/images/faults", json!({})).await;
    assert_eq!(status, 200);
    let (status, h, body) =
        fetch(addr, "GET", "/files/fw.bin", t, &[("range", "bytes=10-19")]).await;
    assert_eq!((status, &body[..]), (206, &data[10..20]));
    assert_eq!(hdr(&h, "accept-ranges"), Some("bytes"));
    let list = get(addr, "/sim/images").await;
    // fw.bin: 3 (corrupt) + 1 (no_range) + 2 (failed) + 1 = 7 requests, of which 4 with a Range.
    assert_eq!(
        (
            list[0]["id"].as_str(),
            list[0]["requests"].as_u64(),
            list[0]["range_requests"].as_u64()
        ),
        (Some("fw.bin"), Some(7), Some(4))
    );
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn image_throttling_and_dropped_clients() {
    const N: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(N, 5);
    std::fs::write(dir.path().join("fw.bin"), &data).unwrap();
    let (cloud, token) = start_image_cloud(dir.path()).await;
    let addr = cloud.addr;
    let t = Some(token.as_str());
    let (status, _) = post(
        addr,
        "/sim/images/faults",
        json!({"rate_bytes_per_s": 100_000}),
    )
    .await;
    assert_eq!(status, 200);

    let started = std::time::Instant::now();
    let (status, _, body) = fetch(addr, "GET", "/files/fw.bin", t, &[]).await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert!(body == data);
    assert!(took >= Duration::from_millis(1500), "took {took:?}");

    // The last scan is now over a second old, so a heartbeat rescans by itself.
    let rev = cloud.shared.images.revision();
    std::fs::write(dir.path().join("new.bin"), b"new").unwrap();
    let rev2 = heartbeat(addr, &token).await.1["images_revision"]
        .as_u64()
        .unwrap();
    assert!(rev2 != rev && rev2 != 0, "{rev} {rev2}");

    // A client that goes away mid-body: only what was handed to the connection is counted.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get("/files/fw.bin")
        .header(http::header::HOST, addr.to_string())
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(GUARD, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let mut body = resp.into_body();
    let mut received = 0;
    while received < 10_000 {
        let frame = tokio::time::timeout(GUARD, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        received += frame.data_ref().map_or(0, |d| d.len());
    }
    drop(body);
    drop(sender);
    conn.abort();
    let served = get(addr, "/sim/stats").await["image_bytes_served"]
        .as_u64()
        .unwrap()
        - N as u64;
    assert!(
        served >= received as u64 && served < N as u64,
        "received {received}, counted {served}"
    );

    // The cloud is unharmed and, unthrottled, serves at full speed.
    let (status, _) = post(addr, "/sim/images/faults", json!({})).await;
    assert_eq!(status, 200);
    let (status, _, body) = fetch(addr, "GET", "/files/fw.bin", t, &[]).await;
    assert_eq!(status, 200);
    assert!(body == data);
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn images_sync_goes_down_the_channel() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fw.bin"), b"firmware").unwrap();
    let (cloud, token) = start_image_cloud(dir.path()).await;
    let addr = cloud.addr;
    let (_, m) = call(addr, "GET", PATH_IMAGES, Some(&token), None).await;
    let rev = m["revision"].as_u64().unwrap();

    let mut ws = connect_ws(addr, &token).await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    let (status, v) = post(addr, "/sim/images/sync", json!({})).await;
    assert_eq!(
        (status, v),
        (
            200,
            json!({"relay_id": "r-1", "revision": rev, "sent": true})
        )
    );
    let frame = next_json(&mut ws).await;
    assert_eq!(frame, json!({"type": "images_sync", "revision": rev}));
    assert_eq!(
        crate::protocol::CloudMessage::decode(&frame.to_string()).unwrap(),
        crate::protocol::CloudMessage::ImagesSync { revision: rev }
    );

    // A new file: the sync carries the new revision.
    std::fs::write(dir.path().join("fw2.bin"), b"firmware 2").unwrap();
    let (status, v) = post(addr, "/sim/images/sync", json!({"relay_id": "r-1"})).await;
    assert_eq!(status, 200);
    let rev2 = v["revision"].as_u64().unwrap();
    assert_ne!(rev2, rev);
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "images_sync", "revision": rev2})
    );

    // No channel: 409; unknown relay: 404.
    register_ok(addr, "r-2", "123456").await;
    let (status, v) = post(addr, "/sim/images/sync", json!({"relay_id": "r-2"})).await;
    assert_eq!((status, error_code(&v)), (409, "conflict"));
    let (status, v) = post(addr, "/sim/images/sync", json!({"relay_id": "r-9"})).await;
    assert_eq!((status, error_code(&v)), (404, "not_found"));
    cloud.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Device plane: tasks, device lists, device status.

/// A result record of a task: per target, or a progress record when `progress` is given.
fn task_result(
    result_id: &str,
    task_id: &str,
    target: Option<&str>,
    outcome: &str,
    reason: &str,
    progress: Option<Value>,
) -> Value {
    let mut r = json!({
        "result_id": result_id, "command_id": task_id, "name": if target.is_some() { "reboot" } else { "task" },
        "result": outcome, "reason": reason, "payload": {"n": 1},
        "finished_at": "2026-01-01T00:00:00Z",
    });
    if let Some(t) = target {
        r["target"] = json!(t);
    }
    if let Some(p) = progress {
        r["progress"] = p;
    }
    r
}

fn progress(seq: u64, status: &str, total: u64, success: u64, in_progress: u64) -> Value {
    json!({"seq": seq, "status": status, "total": total, "success": success, "failure": 0,
           "not_applicable": 0, "in_progress": in_progress})
}

async fn post_results(addr: SocketAddr, token: &str, results: Vec<Value>) {
    let body = json!({ "results": results }).to_string();
    let (status, v) = call(addr, "POST", PATH_RESULTS, Some(token), Some(&body)).await;
    assert_eq!(status, 200, "{v}");
}

async fn ack(ws: &mut Ws, id: &str) {
    ws.send(Message::text(json!({"type": "ack", "id": id}).to_string()))
        .await
        .unwrap();
    ping_roundtrip(ws).await;
}

#[tokio::test]
async fn tasks_go_down_the_channel_and_follow_the_relays_results() {
    let cloud = start_cloud(args(None)).await;
    let addr = cloud.addr;
    let (status, _) = post(
        addr,
        "/sim/tasks",
        json!({"type": "reboot", "targets": ["10.0.0.1"]}),
    )
    .await;
    assert_eq!(status, 400, "no relay registered yet");
    let token = register_ok(addr, "r-1", "123456").await;

    // Bad tasks change nothing.
    for bad in [
        json!({"type": "explode", "targets": ["10.0.0.1"]}),
        json!({"type": "reboot", "targets": []}),
        json!({"type": "reboot"}),
        json!({"type": "reboot", "targets": ["10.0.0.1"], "at": "tomorrow"}),
        json!({"type": "reboot", "targets": ["10.0.0.1"], "payload": [1]}),
        json!({"type": "reboot", "targets": ["10.0.0.1"], "failure_threshold_pct": 101}),
        json!({"type": "reboot", "targets": [""]}),
    ] {
        let (status, v) = post(addr, "/sim/tasks", bad.clone()).await;
        assert_eq!((status, error_code(&v)), (400, "bad_request"), "{bad}");
    }
    let (_, v) = post(
        addr,
        "/sim/tasks",
        json!({"type": "explode", "targets": ["x"]}),
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("check_sync"),
        "{v}"
    );
    assert_eq!(get(addr, "/sim/tasks").await, json!([]));

    // Created while the relay is offline: queued, then delivered when it connects.
    let (status, v) = post(
        addr,
        "/sim/tasks",
        json!({"type": "reboot", "targets": ["10.0.0.1", "10.0.0.2:8443"],
               "at": "2030-01-01T03:00:00Z", "concurrency": 5, "name": "night reboot"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let task_id = v["task_id"].as_str().unwrap().to_owned();
    assert!(task_id.starts_with("task-"));
    assert_eq!(
        (v["relay_id"].as_str(), v["state"].as_str()),
        (Some("r-1"), Some("queued"))
    );
    let path = format!("/sim/tasks/{task_id}");
    let t = get(addr, &path).await;
    assert_eq!(
        (
            t["status"].as_str(),
            t["total"].as_u64(),
            t["type"].as_str(),
            t["name"].as_str()
        ),
        (
            Some("queued"),
            Some(2),
            Some("reboot"),
            Some("night reboot")
        )
    );

    let mut ws = connect_ws(addr, &token).await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    let cmd = next_json(&mut ws).await;
    assert_eq!(
        (
            cmd["type"].as_str(),
            cmd["id"].as_str(),
            cmd["name"].as_str()
        ),
        (
            Some("command"),
            Some(task_id.as_str()),
            Some(crate::protocol::TASK_COMMAND)
        )
    );
    let spec: crate::protocol::TaskSpec = serde_json::from_value(cmd["params"].clone()).unwrap();
    assert_eq!(
        spec,
        crate::protocol::TaskSpec {
            name: "night reboot".into(),
            kind: "reboot".into(),
            targets: vec!["10.0.0.1".into(), "10.0.0.2:8443".into()],
            payload: json!({}),
            at: Some("2030-01-01T03:00:00Z".into()),
            failure_threshold_pct: None,
            concurrency: Some(5),
            target_timeout_s: None,
            task_id: None,
            lease_s: None,
            lease_id: None,
        }
    );
    assert_eq!(
        get(addr, &path).await["status"],
        "queued",
        "sent but not acknowledged"
    );
    ack(&mut ws, &task_id).await;
    assert_eq!(get(addr, &path).await["status"], "scheduled");

    // Progress and per-target results; the newest progress record wins whatever the arrival
    // order, and the latest result of a target replaces the earlier one.
    post_results(
        addr,
        &token,
        vec![
            task_result(
                "p1",
                &task_id,
                None,
                "success",
                "",
                Some(progress(1, "executing", 2, 0, 2)),
            ),
            task_result(
                "a1",
                &task_id,
                Some("10.0.0.1"),
                "failure",
                "timed out",
                None,
            ),
            task_result(
                "b1",
                &task_id,
                Some("10.0.0.2:8443"),
                "not_applicable",
                "no such mode",
                None,
            ),
        ],
    )
    .await;
    let t = get(addr, &path).await;
    assert_eq!(
        (
            t["status"].as_str(),
            t["success"].as_u64(),
            t["failure"].as_u64(),
            t["not_applicable"].as_u64(),
            t["in_progress"].as_u64()
        ),
        (Some("executing"), Some(0), Some(1), Some(1), Some(2))
    );
    post_results(
        addr,
        &token,
        vec![
            task_result("a2", &task_id, Some("10.0.0.1"), "success", "", None),
            task_result(
                "p3",
                &task_id,
                None,
                "success",
                "",
                Some(progress(3, "done", 2, 1, 0)),
            ),
            task_result(
                "p2",
                &task_id,
                None,
                "success",
                "",
                Some(progress(2, "executing", 2, 1, 1)),
            ),
        ],
    )
    .await;
    let t = get(addr, &path).await;
    assert_eq!(
        (
            t["status"].as_str(),
            t["total"].as_u64(),
            t["success"].as_u64(),
            t["failure"].as_u64(),
            t["not_applicable"].as_u64()
        ),
        (Some("done"), Some(2), Some(1), Some(0), Some(1))
    );
    assert_eq!(
        (t["in_progress"].as_u64(), t["progress_seq"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(
        t["results"],
        json!([
            {"target": "10.0.0.1", "result": "success", "reason": "", "payload": {"n": 1},
             "finished_at": "2026-01-01T00:00:00Z", "result_id": "a2", "relay_id": "r-1"},
            {"target": "10.0.0.2:8443", "result": "not_applicable", "reason": "no such mode",
             "payload": {"n": 1}, "finished_at": "2026-01-01T00:00:00Z", "result_id": "b1", "relay_id": "r-1"},
        ])
    );
    // The task's command is acknowledged, not completed by its targets' results.
    assert_eq!(
        get(addr, &format!("/sim/commands/{task_id}")).await["state"],
        "acked"
    );

    let list = get(addr, "/sim/tasks").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(
        (list[0]["id"].as_str(), list[0]["status"].as_str()),
        (Some(task_id.as_str()), Some("done"))
    );
    assert!(list[0].get("results").is_none());
    let (status, v) = call(addr, "GET", "/sim/tasks/task-nope", None, None).await;
    assert_eq!((status, error_code(&v)), (404, "not_found"));

    // A task the relay refuses outright.
    let (_, v) = post(
        addr,
        "/sim/tasks",
        json!({"type": "dial", "targets": ["8.8.8.8"], "payload": {"dest": "1"}}),
    )
    .await;
    let refused = v["task_id"].as_str().unwrap().to_owned();
    assert_eq!(
        next_json(&mut ws).await["id"].as_str(),
        Some(refused.as_str())
    );
    post_results(
        addr,
        &token,
        vec![task_result(
            "r1",
            &refused,
            None,
            "failure",
            "target 8.8.8.8 is outside the device subnets",
            None,
        )],
    )
    .await;
    let t = get(addr, &format!("/sim/tasks/{refused}")).await;
    assert_eq!(t["status"], "rejected");
    assert!(t["reason"].as_str().unwrap().contains("outside"));
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn tasks_are_edited_and_cancelled_through_commands() {
    let cloud = start_cloud(args(None)).await;
    let addr = cloud.addr;
    let token = register_ok(addr, "r-1", "123456").await;
    let mut ws = connect_ws(addr, &token).await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    let (_, v) = post(
        addr,
        "/sim/tasks",
        json!({"type": "reboot", "targets": ["10.0.0.1"], "at": "2030-01-01T03:00:00Z"}),
    )
    .await;
    let task_id = v["task_id"].as_str().unwrap().to_owned();
    next_json(&mut ws).await;
    let path = format!("/sim/tasks/{task_id}");

    for bad in [
        json!({}),
        json!({"relay_id": "r-2"}),
        json!({"targets": []}),
        json!({"targets": "10.0.0.1"}),
        json!({"type": "explode"}),
        json!({"at": "soon"}),
        json!({"concurrency": 0}),
    ] {
        let (status, v) = call(addr, "PATCH", &path, None, Some(&bad.to_string())).await;
        assert_eq!((status, error_code(&v)), (400, "bad_request"), "{bad}");
    }
    let (status, _) = call(
        addr,
        "PATCH",
        "/sim/tasks/task-nope",
        None,
        Some(r#"{"at": null}"#),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(addr, "DELETE", "/sim/tasks/task-nope", None, None).await;
    assert_eq!(status, 404);

    // Edit: a task_update command; the cloud's copy changes once the relay reports success.
    let patch = json!({"targets": ["10.0.0.1", "10.0.0.3"], "at": "2030-01-02T03:00:00Z"});
    let (status, v) = call(addr, "PATCH", &path, None, Some(&patch.to_string())).await;
    assert_eq!(status, 200, "{v}");
    let update_id = v["command_id"].as_str().unwrap().to_owned();
    let cmd = next_json(&mut ws).await;
    assert_eq!(
        cmd,
        json!({"type": "command", "id": update_id, "name": crate::protocol::TASK_UPDATE_COMMAND,
               "params": {"task_id": task_id, "targets": ["10.0.0.1", "10.0.0.3"], "at": "2030-01-02T03:00:00Z"}})
    );
    assert_eq!(get(addr, &path).await["total"], 1);
    post_results(
        addr,
        &token,
        vec![json!({
        "result_id": "u1", "command_id": update_id, "name": "task_update", "result": "success",
        "finished_at": "2026-01-01T00:00:00Z"})],
    )
    .await;
    let t = get(addr, &path).await;
    assert_eq!(
        (t["total"].as_u64(), t["at"].as_str()),
        (Some(2), Some("2030-01-02T03:00:00Z"))
    );
    assert_eq!(t["targets"], json!(["10.0.0.1", "10.0.0.3"]));
    assert_eq!(
        get(addr, &format!("/sim/commands/{update_id}")).await["state"],
        "done"
    );

    // A refused update changes nothing.
    let (_, v) = call(
        addr,
        "PATCH",
        &path,
        None,
        Some(r#"{"targets": ["10.9.9.9"]}"#),
    )
    .await;
    let refused = v["command_id"].as_str().unwrap().to_owned();
    next_json(&mut ws).await;
    post_results(
        addr,
        &token,
        vec![json!({
        "result_id": "u2", "command_id": refused, "name": "task_update", "result": "failure",
        "reason": "task is executing", "finished_at": "2026-01-01T00:00:00Z"})],
    )
    .await;
    assert_eq!(
        get(addr, &path).await["targets"],
        json!(["10.0.0.1", "10.0.0.3"])
    );

    // Cancel: a task_cancel command; its outcome shows like any command's.
    let (status, v) = call(addr, "DELETE", &path, None, None).await;
    assert_eq!(status, 200, "{v}");
    let cancel_id = v["command_id"].as_str().unwrap().to_owned();
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "command", "id": cancel_id, "name": crate::protocol::TASK_CANCEL_COMMAND,
               "params": {"task_id": task_id}})
    );
    post_results(addr, &token, vec![
        json!({"result_id": "c1", "command_id": cancel_id, "name": "task_cancel", "result": "success",
               "finished_at": "2026-01-01T00:00:00Z"}),
        task_result("p1", &task_id, None, "success", "", Some(progress(1, "cancelled", 2, 0, 0))),
    ]).await;
    let c = get(addr, &format!("/sim/commands/{cancel_id}")).await;
    assert_eq!(
        (c["state"].as_str(), c["result"]["result"].as_str()),
        (Some("done"), Some("success"))
    );
    assert_eq!(get(addr, &path).await["status"], "cancelled");
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn device_list_revision_and_relay_fetch() {
    let cloud = start_cloud(args(None)).await;
    let addr = cloud.addr;
    let token = register_ok(addr, "r-1", "123456").await;
    let (_, v) = heartbeat(addr, &token).await;
    assert_eq!(v["devices_revision"], 0);
    let (status, v) = call(
        addr,
        "GET",
        crate::protocol::PATH_DEVICES,
        Some(&token),
        None,
    )
    .await;
    assert_eq!((status, v), (200, json!({"revision": 0, "devices": []})));
    let (status, v) = call(addr, "GET", crate::protocol::PATH_DEVICES, None, None).await;
    assert_eq!((status, error_code(&v)), (401, "token_invalid"));

    for bad in [
        json!({"devices": [{"address": "phone.example"}]}),
        json!({"devices": [{"address": "10.0.0.1"}, {"address": "10.0.0.1"}]}),
        json!({"devices": [{"mac": "0004f2000000"}]}),
        json!({"devices": [{"address": "10.0.0.1"}], "tenant": "globex"}),
    ] {
        let (status, v) = post(addr, "/sim/devices", bad.clone()).await;
        assert!(status == 400 || status == 404, "{bad}: {status} {v}");
    }
    let devices = json!([
        {"address": "127.0.0.10:8443", "mac": "0004f2000000", "name": "lobby"},
        {"address": "127.0.0.11"},
    ]);
    let (status, v) = post(addr, "/sim/devices", json!({"devices": devices})).await;
    assert_eq!(
        (status, v),
        (200, json!({"tenant": "acme", "revision": 1, "devices": 2}))
    );
    let (_, v) = heartbeat(addr, &token).await;
    assert_eq!(v["devices_revision"], 1);
    let (status, v) = call(
        addr,
        "GET",
        crate::protocol::PATH_DEVICES,
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let list: crate::protocol::DeviceList = serde_json::from_value(v).unwrap();
    assert_eq!(list.revision, 1);
    assert_eq!(list.devices[0].name.as_deref(), Some("lobby"));
    assert_eq!(list.devices[1].address, "127.0.0.11");

    post(
        addr,
        "/sim/devices",
        json!({"devices": [{"address": "127.0.0.12"}]}),
    )
    .await;
    let (_, v) = heartbeat(addr, &token).await;
    assert_eq!(v["devices_revision"], 2);
    let v = get(addr, "/sim/devices").await;
    assert_eq!(
        (
            v["revision"].as_u64(),
            v["devices"].as_array().unwrap().len()
        ),
        (Some(2), 1)
    );

    // Faults cover the device list like the other relay-facing endpoints.
    post(addr, "/sim/faults", json!({"mode": "http_500"})).await;
    let (status, _) = call(
        addr,
        "GET",
        crate::protocol::PATH_DEVICES,
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 500);
    cloud.shutdown().await.unwrap();
}

fn report(address: &str, online: bool, polled_at: &str) -> Value {
    json!({"address": address, "mac": "0004f2000000", "online": online, "model": "VVX 411",
           "firmware": "5.9.6.2327", "uptime_s": 60, "lines": [{"line": 1, "registered": true, "uri": "sip:1000@pbx.sim"}],
           "call_state": "idle", "polled_at": polled_at})
}

fn alarm(id: &str, kind: &str) -> Value {
    json!({"id": id, "address": "127.0.0.10", "kind": kind, "message": "m", "at": "2026-01-01T00:00:00Z"})
}

#[tokio::test]
async fn device_status_keeps_latest_reports_and_distinct_alarms() {
    let cloud = start_cloud(args(None)).await;
    let addr = cloud.addr;
    let token = register_ok(addr, "r-1", "123456").await;
    let status_path = crate::protocol::PATH_DEVICE_STATUS;
    let send = |body: Value| {
        let token = token.clone();
        async move {
            call(
                addr,
                "POST",
                status_path,
                Some(&token),
                Some(&body.to_string()),
            )
            .await
        }
    };

    for bad in [
        json!({"reports": [{"address": "x"}]}),
        json!({"reports": "none"}),
        json!({"alarms": [{"id": "", "address": "a", "kind": "device_offline", "message": "", "at": ""}]}),
        json!([1, 2]),
    ] {
        let (status, v) = send(bad.clone()).await;
        assert_eq!((status, error_code(&v)), (400, "bad_request"), "{bad}");
    }
    let (_, v) = send(json!({"reports": [{"address": "x"}]})).await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("device-status"),
        "{v}"
    );
    let (status, _) = call(addr, "POST", status_path, None, Some("{}")).await;
    assert_eq!(status, 401);

    let (status, v) = send(json!({
        "reports": [report("127.0.0.10", true, "2026-01-01T00:00:00Z"), report("127.0.0.11", true, "2026-01-01T00:00:00Z")],
        "alarms": [alarm("al-1", "line_unregistered")],
    }))
    .await;
    assert_eq!(
        (status, v),
        (
            200,
            json!({"reports": 2, "alarms": 1, "duplicate_alarms": 0})
        )
    );
    // A retry of an alarm is not stored twice; a newer report replaces the older one.
    let (_, v) = send(json!({
        "reports": [report("127.0.0.10", false, "2026-01-01T02:00:00Z")],
        "alarms": [alarm("al-1", "line_unregistered"), alarm("al-2", "device_offline")],
    }))
    .await;
    assert_eq!(v, json!({"reports": 1, "alarms": 1, "duplicate_alarms": 1}));

    let v = get(addr, "/sim/devices").await;
    assert_eq!(v["status"]["127.0.0.10"]["online"], false);
    assert_eq!(
        v["status"]["127.0.0.10"]["polled_at"],
        "2026-01-01T02:00:00Z"
    );
    assert_eq!(
        v["status"]["127.0.0.11"]["lines"][0]["uri"],
        "sip:1000@pbx.sim"
    );
    let alarms = get(addr, "/sim/alarms").await;
    let ids: Vec<&str> = alarms
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["al-1", "al-2"]);
    assert_eq!(
        (alarms[1]["kind"].as_str(), alarms[1]["relay_id"].as_str()),
        (Some("device_offline"), Some("r-1"))
    );
    let stats = get(addr, "/sim/stats").await;
    assert_eq!(
        (
            stats["device_reports"].as_u64(),
            stats["alarms"].as_u64(),
            stats["duplicate_alarms"].as_u64()
        ),
        (Some(3), Some(2), Some(1))
    );
    assert_eq!(stats["device_status_reports"], 2);
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn device_plane_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.json");
    let cloud = start_cloud(args(Some(path.clone()))).await;
    let addr = cloud.addr;
    let token = register_ok(addr, "r-1", "123456").await;
    let (_, v) = post(
        addr,
        "/sim/tasks",
        json!({"type": "check_sync", "targets": ["10.0.0.1", "10.0.0.2"]}),
    )
    .await;
    let task_id = v["task_id"].as_str().unwrap().to_owned();
    post_results(
        addr,
        &token,
        vec![
            task_result("a1", &task_id, Some("10.0.0.1"), "success", "", None),
            task_result(
                "p1",
                &task_id,
                None,
                "success",
                "",
                Some(progress(4, "executing", 2, 1, 1)),
            ),
        ],
    )
    .await;
    post(
        addr,
        "/sim/devices",
        json!({"devices": [{"address": "10.0.0.1"}]}),
    )
    .await;
    let (status, _) = call(
        addr,
        "POST",
        crate::protocol::PATH_DEVICE_STATUS,
        Some(&token),
        Some(
            &json!({"reports": [report("10.0.0.1", true, "2026-01-01T00:00:00Z")],
                     "alarms": [alarm("al-1", "device_online")]})
            .to_string(),
        ),
    )
    .await;
    assert_eq!(status, 200);
    let before = get(addr, &format!("/sim/tasks/{task_id}")).await;
    cloud.shutdown().await.unwrap();

    let cloud = start_cloud(args(Some(path.clone()))).await;
    let addr = cloud.addr;
    assert_eq!(get(addr, &format!("/sim/tasks/{task_id}")).await, before);
    assert_eq!(before["status"], "executing");
    assert_eq!(before["success"], 1);
    // The indexes are rebuilt: a later result of the same target still replaces the earlier one.
    post_results(
        addr,
        &token,
        vec![task_result(
            "a2",
            &task_id,
            Some("10.0.0.1"),
            "failure",
            "x",
            None,
        )],
    )
    .await;
    let t = get(addr, &format!("/sim/tasks/{task_id}")).await;
    assert_eq!(
        (t["success"].as_u64(), t["failure"].as_u64()),
        (Some(0), Some(1))
    );
    let (_, v) = heartbeat(addr, &token).await;
    assert_eq!(v["devices_revision"], 1);
    let v = get(addr, "/sim/devices").await;
    assert_eq!(v["status"]["10.0.0.1"]["online"], true);
    assert_eq!(get(addr, "/sim/alarms").await.as_array().unwrap().len(), 1);
    let (status, v) = call(
        addr,
        "POST",
        crate::protocol::PATH_DEVICE_STATUS,
        Some(&token),
        Some(&json!({"alarms": [alarm("al-1", "device_online")]}).to_string()),
    )
    .await;
    assert_eq!((status, v["duplicate_alarms"].as_u64()), (200, Some(1)));
    cloud.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_ten_thousand_target_task() {
    let cloud = start_cloud(args(None)).await;
    let addr = cloud.addr;
    let token = register_ok(addr, "r-1", "123456").await;
    let targets: Vec<String> = (0..10_000)
        .map(|i| format!("10.{}.{}.{}", i / 65536, i / 256 % 256, i % 256))
        .collect();
    let (status, v) = post(
        addr,
        "/sim/tasks",
        json!({"type": "reboot", "targets": targets}),
    )
    .await;
    assert_eq!(status, 200);
    let task_id = v["task_id"].as_str().unwrap().to_owned();
    for (b, chunk) in targets.chunks(1000).enumerate() {
        let results = chunk
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let outcome = if (b * 1000 + i) % 10 == 0 {
                    "failure"
                } else {
                    "success"
                };
                task_result(&format!("r-{t}"), &task_id, Some(t), outcome, "", None)
            })
            .collect();
        post_results(addr, &token, results).await;
    }
    let t = get(addr, &format!("/sim/tasks/{task_id}")).await;
    assert_eq!(
        (
            t["total"].as_u64(),
            t["success"].as_u64(),
            t["failure"].as_u64()
        ),
        (Some(10_000), Some(9_000), Some(1_000))
    );
    assert_eq!(t["results"].as_array().unwrap().len(), 10_000);
    assert_eq!(t["results"][9_999]["target"], "10.0.39.15");
    cloud.shutdown().await.unwrap();
}

/// Registers a relay with its addresses and subnets; returns its token.
async fn register_fleet(
    addr: SocketAddr,
    relay_id: &str,
    address: &str,
    subnets: &[&str],
) -> String {
    let body = json!({
        "protocol": 1, "tenant_id": "acme", "pin": "123456", "relay_id": relay_id,
        "hostname": relay_id, "version": "0.1.0", "fqdn": ["relay.corp", format!("{relay_id}.corp")],
        "addresses": [address], "subnets": subnets
    });
    let (status, v) = call(addr, "POST", PATH_REGISTER, None, Some(&body.to_string())).await;
    assert_eq!(status, 200, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn sites_shares_leases_and_certificate_uploads() {
    let mut a = args(None);
    a.inactive_after = Duration::from_secs(2);
    let cloud = start_cloud(a).await;
    let addr = cloud.addr;

    // Sites: bad input changes nothing.
    for bad in [
        json!({"name": "x", "subnets": ["10.0.0.0/33"]}),
        json!({"name": "x", "subnets": []}),
        json!({"name": "", "subnets": ["10.0.0.0/8"]}),
        json!({"name": "x", "subnets": ["10.0.0.0/8"], "download_path": "ftp://x"}),
    ] {
        let (status, v) = post(addr, "/sim/sites", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {v}");
    }
    let (status, _) = post(
        addr,
        "/sim/sites",
        json!({"name": "branch", "subnets": ["10.9.0.0/16"], "isolated": true}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post(
        addr,
        "/sim/sites",
        json!({"name": "hq", "subnets": ["10.0.0.0/8"]}),
    )
    .await;
    assert_eq!(status, 200);

    let ta = register_fleet(addr, "r-a", "10.1.0.2", &["10.0.0.0/8"]).await;
    let tb = register_fleet(addr, "r-b", "10.1.0.3", &["10.0.0.0/8"]).await;
    let ts = register_fleet(addr, "r-s", "10.9.0.2", &["10.0.0.0/8"]).await;
    // Channels up: relays that may hold task targets.
    let wa = connect_ws(addr, &ta).await;
    let _wb = connect_ws(addr, &tb).await;
    let _ws = connect_ws(addr, &ts).await;
    let (_, v) = heartbeat(addr, &ts).await;
    // The site sets no download path: its relays' shared name gives it.
    assert_eq!(
        v["site"],
        json!({"name": "branch", "isolated": true, "download_path": "https://relay.corp/"}),
        "{v}"
    );
    let (_, v) = heartbeat(addr, &ta).await;
    assert_eq!(v["site"]["name"], "hq");
    assert_eq!(v["site"]["download_path"], "https://relay.corp/");
    heartbeat(addr, &tb).await;
    let sites = get(addr, "/sim/sites").await;
    assert_eq!(sites["sites"].as_array().unwrap().len(), 2, "{sites}");

    // Monitoring: the branch device only to its relay, the others split between A and B.
    let mut devices: Vec<Value> = (1..=40)
        .map(|i| json!({"address": format!("10.2.0.{i}")}))
        .collect();
    devices.push(json!({"address": "10.9.0.7"}));
    devices.push(json!({"address": "192.168.1.1"}));
    post(addr, "/sim/devices", json!({"devices": devices})).await;
    let list = |token: String| async move {
        let (_, v) = call(
            addr,
            "GET",
            crate::protocol::PATH_DEVICES,
            Some(&token),
            None,
        )
        .await;
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["address"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let (la, lb, ls) = (
        list(ta.clone()).await,
        list(tb.clone()).await,
        list(ts.clone()).await,
    );
    assert_eq!(ls, ["10.9.0.7"]);
    assert_eq!(la.len() + lb.len(), 40, "{la:?} {lb:?}");
    assert!(!la.is_empty() && !lb.is_empty());

    // A task: spread, the branch target to its relay, an unreachable one failed by the cloud.
    let mut targets: Vec<String> = (1..=10).map(|i| format!("10.2.0.{i}")).collect();
    targets.push("10.9.0.7".into());
    targets.push("192.168.1.1".into());
    let (status, v) = post(
        addr,
        "/sim/tasks",
        json!({"type": "reboot", "targets": targets}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let id = v["task_id"].as_str().unwrap().to_owned();
    let t = get(addr, &format!("/sim/tasks/{id}")).await;
    let leases = t["leases"].as_array().unwrap();
    let by = |r: &str| {
        leases
            .iter()
            .find(|l| l["relay_id"] == r)
            .map(|l| l["targets"].as_u64().unwrap())
    };
    assert_eq!(
        (by("r-a"), by("r-b"), by("r-s")),
        (Some(5), Some(5), Some(1)),
        "{t}"
    );
    assert_eq!(t["failure"], 1, "{t}");
    assert!(
        t["results"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("no relay can reach")
    );

    // A's lease is listed in its heartbeat answer until A goes silent; then its targets move.
    let (_, v) = heartbeat(addr, &ta).await;
    assert_eq!(v["leases"].as_array().map(Vec::len), Some(1), "{v}");
    drop(wa);
    let moved = async {
        loop {
            heartbeat(addr, &tb).await;
            heartbeat(addr, &ts).await;
            let t = get(addr, &format!("/sim/tasks/{id}")).await;
            let open_a = t["leases"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["relay_id"] == "r-a" && l["revoked_at"].is_null());
            if !open_a {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let t = tokio::time::timeout(GUARD, moved)
        .await
        .expect("A's lease moved");
    let b_targets: u64 = t["leases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["relay_id"] == "r-b")
        .map(|l| l["targets"].as_u64().unwrap())
        .sum();
    assert_eq!(b_targets, 10, "B holds A's targets too: {t}");
    assert_eq!(get(addr, "/sim/stats").await["targets_moved"], 5);

    // A certificate upload reaches every relay; answers are recorded as they come.
    let (status, _) = post(
        addr,
        "/sim/certificates",
        json!({"pfx_base64": "%%%", "password": ""}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, v) = post(
        addr,
        "/sim/certificates",
        json!({"pfx_base64": "MIIB", "password": "pw"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let c = get(
        addr,
        &format!("/sim/certificates/{}", v["upload_id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(c["relays"], json!([]));
    assert_eq!(c["pending"].as_array().unwrap().len(), 3, "{c}");
    cloud.shutdown().await.unwrap();
}

/// A PUT of raw bytes with a Content-Range.
async fn put_chunk(
    addr: SocketAddr,
    token: &str,
    id: &str,
    from: u64,
    data: &[u8],
    total: u64,
) -> (u16, Value) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::put(format!("/relay/v1/artifacts/{id}"))
        .header(http::header::HOST, addr.to_string())
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(
            http::header::CONTENT_RANGE,
            format!("bytes {from}-{}/{total}", from + data.len() as u64 - 1),
        )
        .body(Full::new(Bytes::copy_from_slice(data)))
        .unwrap();
    let resp = tokio::time::timeout(GUARD, sender.send_request(req))
        .await
        .expect("no answer")
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn artifacts_resume_across_a_restart_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.json");
    let cloud = start_cloud(args(Some(path.clone()))).await;
    let addr = cloud.addr;
    let token = register_ok(addr, "r-1", "123456").await;
    let data = pseudo_random(3000, 7);
    let offer = json!({
        "artifact_id": "a-1", "name": "x.pcap.tar.gz", "kind": "packet_capture",
        "content_type": "application/gzip", "size": 3000, "sha256": sha_hex(&data),
        "created_at": "2026-11-23T10:00:00Z"
    })
    .to_string();
    let (status, v) = call(
        addr,
        "POST",
        "/relay/v1/artifacts",
        Some(&token),
        Some(&offer),
    )
    .await;
    assert_eq!(
        (status, v["received"].as_u64(), v["state"].as_str()),
        (200, Some(0), Some("partial")),
        "{v}"
    );
    let (status, v) = put_chunk(addr, &token, "a-1", 0, &data[..1000], 3000).await;
    assert_eq!((status, v["received"].as_u64()), (200, Some(1000)), "{v}");
    // A chunk from the wrong offset is refused and says where to go on.
    let (status, v) = put_chunk(addr, &token, "a-1", 0, &data[..1000], 3000).await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("1000"),
        "{v}"
    );
    cloud.shutdown().await.unwrap();

    // Restarted: the offer is answered with what survived, and the upload goes on.
    let cloud = start_cloud(args(Some(path.clone()))).await;
    let addr = cloud.addr;
    let (status, v) = call(
        addr,
        "POST",
        "/relay/v1/artifacts",
        Some(&token),
        Some(&offer),
    )
    .await;
    assert_eq!((status, v["received"].as_u64()), (200, Some(1000)), "{v}");
    let (status, v) = put_chunk(addr, &token, "a-1", 1000, &data[1000..], 3000).await;
    assert_eq!(
        (status, v["state"].as_str()),
        (200, Some("complete")),
        "{v}"
    );
    assert_eq!(v["sha256"].as_str(), Some(sha_hex(&data).as_str()));
    let list = get(addr, "/sim/artifacts").await;
    assert_eq!(list[0]["bytes_received_total"], 3000, "{list}");
    let (status, content) = {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let r = s
            .send_request(
                http::Request::get("/sim/artifacts/a-1/content")
                    .header(http::header::HOST, "x")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.into_body().collect().await.unwrap().to_bytes(),
        )
    };
    assert_eq!((status, &content[..]), (200, &data[..]));

    // Another file under the same id is a conflict; bytes that do not hash right are dropped.
    let other = offer.replace("3000", "3001");
    assert_eq!(
        call(
            addr,
            "POST",
            "/relay/v1/artifacts",
            Some(&token),
            Some(&other)
        )
        .await
        .0,
        409
    );
    let offer2 = offer.replace("a-1", "a-2");
    call(
        addr,
        "POST",
        "/relay/v1/artifacts",
        Some(&token),
        Some(&offer2),
    )
    .await;
    post(addr, "/sim/artifacts/faults", json!({"corrupt_next": true})).await;
    let (status, v) = put_chunk(addr, &token, "a-2", 0, &data, 3000).await;
    assert_eq!((status, error_code(&v)), (422, "checksum_mismatch"), "{v}");
    let (_, v) = call(addr, "GET", "/relay/v1/artifacts/a-2", Some(&token), None).await;
    assert_eq!(v["received"], 0, "{v}");
    let (status, v) = put_chunk(addr, &token, "a-2", 0, &data, 3000).await;
    assert_eq!(
        (status, v["state"].as_str()),
        (200, Some("complete")),
        "{v}"
    );
    let stats = get(addr, "/sim/stats").await;
    assert_eq!(
        (
            stats["artifacts_complete"].as_u64(),
            stats["artifact_checksum_mismatches"].as_u64()
        ),
        (Some(2), Some(1))
    );
    // The heartbeat answer carries the tenant's log setting.
    assert_eq!(heartbeat(addr, &token).await.1["log_upload"], true);
    post(
        addr,
        "/sim/tenants/acme/settings",
        json!({"log_upload": false}),
    )
    .await;
    assert_eq!(heartbeat(addr, &token).await.1["log_upload"], false);
    cloud.shutdown().await.unwrap();
}
