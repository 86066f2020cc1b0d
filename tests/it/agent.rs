//! The management agent against the reference cloud: registration, heartbeats, PIN reset, cloud
//! restarts, half-open channels, commands, bad cloud behaviour, the CONNECT proxy, shutdown.

use crate::support::*;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[tokio::test]
async fn registers_and_heartbeats_are_seen_by_the_cloud() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&RelayConfig::new(dir.path(), &cloud.url())).await;
    let status = relay
        .wait_status("3 heartbeats", |s| {
            s["cloud"]["heartbeats_ok"].as_u64() >= Some(3)
        })
        .await;
    assert_eq!(status["cloud"]["registered"], true);
    let relay_id = status["relay_id"].as_str().unwrap().to_string();

    let seen = wait_for(
        "cloud to count 3 heartbeats",
        Duration::from_secs(10),
        || async {
            cloud
                .relay()
                .await
                .filter(|r| r["heartbeats"].as_u64() >= Some(3))
        },
    )
    .await;
    assert_eq!(seen["relay_id"], relay_id.as_str());
    assert_eq!(seen["state"], "active");
    assert_eq!(
        seen["registrations"], 1,
        "one registration for a healthy relay"
    );
    let healthy = relay.wait_healthy().await;
    assert_eq!(healthy["problems"], json!([]));

    // The CLI sees the same: table by default, JSON on request, exit 0 when healthy.
    let sock = relay.socket.to_str().unwrap().to_string();
    let (code, out, _) = run_cli(&["status", "--socket", &sock]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("healthy") && out.contains(&relay_id), "{out}");
    let memory = out
        .lines()
        .find(|l| l.trim_start().starts_with("memory"))
        .unwrap_or_else(|| panic!("no memory row:\n{out}"));
    assert!(
        memory.contains("MB resident") && memory.contains("MB heap in use"),
        "{memory}"
    );
    let (code, out, _) = run_cli(&["status", "--socket", &sock, "--json"]).await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cloud"]["channel"], "connected");
    assert!(v["cloud"]["heartbeats_ok"].as_u64().unwrap() >= 3);
}

#[tokio::test]
async fn pin_reset_grace_window_then_rejection_then_recovery_from_pin_file() {
    let mut args = cloud_args();
    args.pin_grace = Duration::from_millis(1500);
    let cloud = TestCloud::start(args).await;
    let dir = tempfile::tempdir().unwrap();
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.pin_line = format!("pin_file = {pin_file:?}");
    let mut relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;

    let reset = cloud
        .post(&format!("/sim/tenants/{TENANT}/reset-pin"), json!({}))
        .await;
    let new_pin = reset["pin"].as_str().unwrap().to_string();
    assert_ne!(new_pin, PIN);
    // Inside the grace window the old PIN's session keeps working.
    let before = relay.status().await["cloud"]["heartbeats_ok"]
        .as_u64()
        .unwrap();
    relay
        .wait_status("heartbeats to continue inside the grace window", |s| {
            s["cloud"]["heartbeats_ok"].as_u64().unwrap() >= before + 2
                && s["cloud"]["registered"] == true
        })
        .await;

    // After the window the old PIN is refused and status says so plainly.
    let s = relay
        .wait_status("PIN rejection", |s| {
            s["cloud"]["registration"] == "pin_rejected"
        })
        .await;
    assert_eq!(s["healthy"], false);
    let problems = s["problems"].to_string();
    assert!(problems.contains("PIN rejected by cloud"), "{problems}");
    let (code, out, _) = run_cli(&["status", "--socket", relay.socket.to_str().unwrap()]).await;
    assert_eq!(code, 1, "unhealthy status exits non-zero: {out}");
    assert!(out.contains("PIN rejected by cloud"), "{out}");
    assert!(!relay.logs().contains(PIN), "the PIN must never be logged");

    // Retried slowly, never in a tight loop (pin_retry_interval is 300 ms here).
    let r0 = cloud.stats().await["registrations_rejected"]
        .as_u64()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // a measurement window, not synchronisation
    let r1 = cloud.stats().await["registrations_rejected"]
        .as_u64()
        .unwrap();
    assert!(r1 - r0 <= 9, "{} rejected registrations in 2 s", r1 - r0);

    // Fixing the PIN file is enough: no restart.
    std::fs::write(&pin_file, format!("{new_pin}\n")).unwrap();
    relay.wait_healthy().await;
    // Every line, buffered ones included, once the relay has stopped.
    let logs = relay.stop_for_logs().await;
    assert!(!logs.contains(PIN), "the PIN must never be logged");
    assert!(!logs.contains(&new_pin), "the new PIN must never be logged");
}

#[tokio::test]
async fn cloud_restart_channel_and_heartbeats_resume_without_relay_restart() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cloud = TestCloud::start_on(listener, cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&RelayConfig::new(dir.path(), &cloud.url())).await;
    relay.wait_healthy().await;
    let pid = relay.child.id();

    cloud.stop().await;
    relay
        .wait_status("channel down after cloud stop", |s| {
            s["cloud"]["channel"] != "connected"
        })
        .await;

    // Same address, fresh state (no state file): the relay must register again by itself.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let cloud = TestCloud::start_on(listener, cloud_args()).await;
    let seen = wait_for(
        "heartbeats and channel at the restarted cloud",
        Duration::from_secs(20),
        || async {
            cloud
                .relay()
                .await
                .filter(|r| r["heartbeats"].as_u64() >= Some(2) && r["channel"] == "connected")
        },
    )
    .await;
    assert_eq!(seen["state"], "active");
    let s = relay.wait_healthy().await;
    assert!(s["cloud"]["reconnects"].as_u64().unwrap() >= 1);
    assert_eq!(relay.child.id(), pid, "the relay process was not restarted");
    assert!(relay.child.try_wait().unwrap().is_none());
}

#[tokio::test]
async fn cloud_restart_with_state_file_keeps_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = cloud_args();
    args.state_file = Some(dir.path().join("cloud-state.json"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cloud = TestCloud::start_on(listener, args.clone()).await;
    let relay = Relay::start(&RelayConfig::new(dir.path(), &cloud.url())).await;
    relay.wait_healthy().await;
    let hb_before = cloud.relay().await.unwrap()["heartbeats"].as_u64().unwrap();
    cloud.stop().await;

    let cloud = TestCloud::start_on(tokio::net::TcpListener::bind(addr).await.unwrap(), args).await;
    let seen = wait_for(
        "heartbeats after restart",
        Duration::from_secs(20),
        || async {
            cloud.relay().await.filter(|r| {
                r["heartbeats"].as_u64() >= Some(hb_before + 2) && r["channel"] == "connected"
            })
        },
    )
    .await;
    assert_eq!(
        seen["registrations"], 1,
        "the persisted token kept the session: {seen}"
    );
}

#[tokio::test]
async fn half_open_channel_is_detected_and_replaced() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&RelayConfig::new(dir.path(), &cloud.url())).await;
    relay.wait_healthy().await;
    assert_eq!(cloud.relay().await.unwrap()["channel_connections"], 1);

    // The cloud stops answering (no pongs, no reads) but keeps the socket open.
    cloud.post("/sim/channel/freeze", json!({})).await;
    wait_for(
        "a second channel connection",
        Duration::from_secs(10),
        || async {
            cloud.relay().await.filter(|r| {
                r["channel_connections"].as_u64() >= Some(2) && r["channel"] == "connected"
            })
        },
    )
    .await;
    let s = relay.wait_healthy().await;
    assert!(s["cloud"]["reconnects"].as_u64().unwrap() >= 1);
    // The reason is logged (log lines reach the file within 100 ms).
    wait_for("the reason in the log", Duration::from_secs(10), || async {
        relay.logs().contains("presumed dead").then_some(())
    })
    .await;
    // The new channel works end to end.
    let r = cloud.command("ping", json!({"n": 1})).await;
    assert_eq!(r["result"], "success");
}

#[tokio::test]
async fn commands_round_trip_and_unknown_ones_are_not_applicable() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&RelayConfig::new(dir.path(), &cloud.url())).await;
    relay.wait_healthy().await;

    let r = cloud.command("ping", json!({"hello": "relay"})).await;
    assert_eq!(r["result"], "success");
    assert_eq!(r["payload"]["echo"], json!({"hello": "relay"}));

    let r = cloud.command("relay_status", json!({})).await;
    assert_eq!(r["result"], "success");
    assert_eq!(r["payload"]["cloud"]["registered"], true);

    let r = cloud.command("teleport", json!({})).await;
    assert_eq!(r["result"], "not_applicable");
    assert!(
        r["reason"].as_str().unwrap().contains("unknown command"),
        "{r}"
    );

    let stats = cloud.stats().await;
    assert_eq!(stats["results_received"], 3);
    assert_eq!(stats["duplicate_results"], 0);
    relay
        .wait_status("results all sent", |s| s["cloud"]["results_pending"] == 0)
        .await;
}

#[tokio::test]
async fn malformed_channel_messages_get_errors_and_the_channel_stays_up() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&RelayConfig::new(dir.path(), &cloud.url())).await;
    relay.wait_healthy().await;

    for text in [
        "{not json",
        r#"{"type":"teleport","id":"t1"}"#,
        r#"{"type":"command","id":"c-bad"}"#,
        "[]",
    ] {
        cloud.post("/sim/channel/raw", json!({"text": text})).await;
    }
    let errors = wait_for("4 channel errors", Duration::from_secs(10), || async {
        let e = cloud.get("/sim/channel/errors").await;
        (e.as_array().map(Vec::len) >= Some(4)).then_some(e)
    })
    .await;
    let codes: Vec<&str> = errors
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        [
            "malformed_message",
            "unknown_message",
            "malformed_message",
            "malformed_message"
        ]
    );
    assert_eq!(errors[1]["id"], "t1");
    assert_eq!(errors[2]["id"], "c-bad");

    let r = cloud.command("ping", json!({})).await;
    assert_eq!(r["result"], "success");
    assert_eq!(
        cloud.relay().await.unwrap()["channel_connections"],
        1,
        "the channel was never dropped"
    );
    assert!(relay.child.id().is_some());
}

#[tokio::test]
async fn cloud_faults_show_in_status_and_back_off_then_recover() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra_cloud = "reconnect_max = \"500ms\"\nrequest_timeout = \"500ms\"\n".into();
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;

    for (mode, words) in [
        ("http_500", "500"),
        ("garbage", "unreadable body"),
        ("hang", "timed out"),
    ] {
        cloud.post("/sim/faults", json!({"mode": mode})).await;
        let s = relay
            .wait_status(&format!("heartbeat failure under {mode}"), |s| {
                s["cloud"]["last_heartbeat_error"]
                    .as_str()
                    .is_some_and(|e| e.contains(words))
            })
            .await;
        assert_eq!(s["healthy"], false);
        assert!(
            s["problems"].to_string().contains("last heartbeat failed"),
            "{s}"
        );
    }
    // No tight loop: with a 200 ms interval and backoff, faulted requests stay few.
    let f0 = cloud.stats().await["faulted_requests"].as_u64().unwrap();
    cloud.post("/sim/faults", json!({"mode": "http_500"})).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // a measurement window, not synchronisation
    let f1 = cloud.stats().await["faulted_requests"].as_u64().unwrap();
    assert!(f1 - f0 <= 12, "{} faulted requests in 2 s", f1 - f0);

    cloud.post("/sim/faults", json!({"mode": "none"})).await;
    relay
        .wait_status("recovery", |s| {
            s["healthy"] == true && s["cloud"]["last_heartbeat_ok"] == true
        })
        .await;
    assert!(relay.child.id().is_some(), "no crash");
}

#[tokio::test]
async fn unreachable_and_tls_failing_clouds_are_reported() {
    // A port with nothing listening.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&RelayConfig::new(
        dir.path(),
        &format!("http://{dead_addr}"),
    ))
    .await;
    let s = relay
        .wait_status("connect failure", |s| {
            s["cloud"]["registration_error"]
                .as_str()
                .is_some_and(|e| e.contains("connect"))
        })
        .await;
    assert_eq!(s["healthy"], false);
    drop(relay);

    // https:// against a plain-HTTP server: the TLS handshake fails and says so.
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&RelayConfig::new(
        dir.path(),
        &format!("https://localhost:{}", cloud.addr.port()),
    ))
    .await;
    let s = relay
        .wait_status("TLS failure", |s| {
            s["cloud"]["registration_error"]
                .as_str()
                .is_some_and(|e| e.contains("TLS"))
        })
        .await;
    assert_eq!(s["cloud"]["registered"], false);
    assert_eq!(cloud.stats().await["registrations"], 0);
}

/// A minimal HTTP CONNECT proxy that counts tunnels and where they went.
async fn connect_proxy() -> (
    std::net::SocketAddr,
    Arc<AtomicU64>,
    Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let targets = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, t) = (count.clone(), targets.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (c, t) = (c.clone(), t.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let Ok(b) = sock.read_u8().await else { return };
                    head.push(b);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let mut parts = text.split_whitespace();
                if parts.next() != Some("CONNECT") {
                    let _ = sock
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                        .await;
                    return;
                }
                let target = parts.next().unwrap_or_default().to_string();
                let Ok(mut up) = tokio::net::TcpStream::connect(&target).await else {
                    let _ = sock.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                t.lock().unwrap().push(target);
                let _ = sock
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut sock, &mut up).await;
            });
        }
    });
    (addr, count, targets)
}

#[tokio::test]
async fn all_cloud_traffic_goes_through_the_connect_proxy() {
    let cloud = TestCloud::start(cloud_args()).await;
    let (proxy, tunnels, targets) = connect_proxy().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra_cloud
        .push_str(&format!("proxy = \"http://{proxy}\"\n"));
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;
    let r = cloud.command("ping", json!({})).await;
    assert_eq!(r["result"], "success");
    relay
        .wait_status("results sent", |s| {
            s["cloud"]["results_sent"].as_u64() >= Some(1)
        })
        .await;

    let stats = cloud.stats().await;
    let relay_conns = stats["registrations"].as_u64().unwrap()
        + stats["heartbeats"].as_u64().unwrap()
        + stats["channel_connections"].as_u64().unwrap()
        + 1; // the results POST
    let n = tunnels.load(Ordering::SeqCst);
    assert!(
        n >= relay_conns,
        "{n} tunnels for at least {relay_conns} cloud connections: something bypassed the proxy"
    );
    let want = cloud.addr.to_string();
    assert!(
        targets.lock().unwrap().iter().all(|t| *t == want),
        "tunnels only to the cloud"
    );
    assert!(
        relay.status().await["cloud"]["proxy"]
            .as_str()
            .unwrap()
            .contains(&proxy.to_string())
    );
}

#[tokio::test]
async fn sigterm_exits_zero_and_the_store_reopens_clean() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig::new(dir.path(), &cloud.url());
    let mut relay = Relay::start(&cfg).await;
    let id = relay.wait_healthy().await["relay_id"]
        .as_str()
        .unwrap()
        .to_string();
    relay.signal("TERM");
    let code = relay.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "logs:\n{}", relay.logs());
    assert!(!cfg.socket().exists(), "admin socket removed on exit");
    let store =
        ucrelay_relay::store::Store::open(&cfg.state_dir()).expect("store reopens after shutdown");
    assert_eq!(store.relay_id().unwrap(), id, "identity kept");
    drop(store);

    // And after kill -9 the same identity comes back, with one relay at the cloud.
    let mut relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;
    relay.signal("KILL");
    relay.wait_exit(Duration::from_secs(10)).await;
    let relay = Relay::start(&cfg).await;
    assert_eq!(relay.wait_healthy().await["relay_id"], id.as_str());
    assert_eq!(cloud.relays().await.len(), 1);
}

/// Regression (found by the chaos harness): the dead-peer check ran on the ping ticks, so a
/// channel that went silent was declared dead up to four ping intervals later, not three.
#[tokio::test]
async fn a_silent_channel_is_declared_dead_within_three_ping_intervals() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.ping_interval = "1s";
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;
    // The cloud goes silent now: the relay's last frame from it came before this moment.
    cloud.post("/sim/channel/freeze", json!({})).await;
    let frozen = std::time::Instant::now();
    loop {
        let asked = std::time::Instant::now();
        let s = relay.status().await;
        if s["cloud"]["channel"] != "connected" {
            break;
        }
        assert!(
            asked.duration_since(frozen) < Duration::from_millis(3000 + 300),
            "still connected {:?} after the cloud went silent (three ping intervals: 3 s)",
            asked.duration_since(frozen)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
