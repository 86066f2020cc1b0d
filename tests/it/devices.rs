//! Device plane end to end: the relay as a child process, the reference cloud and the phone
//! simulator in-process, every device command, scheduled tasks across cloud outages and relay
//! crashes, monitoring with alarms, and the subnet guard.

use crate::support::*;
use serde_json::{Value, json};
use std::net::Ipv4Addr;
use std::time::Duration;
use ucrelay_sim::phones::Phones;

fn target(p: &Phones, i: usize) -> String {
    p.addr(i).to_string()
}

async fn device_command(cloud: &TestCloud, name: &str, params: Value) -> Value {
    cloud.command(name, params).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_command_against_the_simulator() {
    let (phones, _t) = fleet(1, Ipv4Addr::new(127, 0, 1, 10)).await;
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = devices_section("127.0.1.0/24", "1h");
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;
    let t = target(&phones, 0);

    // set_params, then get_params reads it back (and the secret one is masked).
    let r = device_command(
        &cloud,
        "set_params",
        json!({"target": t, "params": {"up.screenCapture.enabled": "1", "reg.1.auth.password": "hunter2"}}),
    )
    .await;
    assert_eq!(r["result"], "success", "{r}");
    assert!(!r.to_string().contains("hunter2"));
    assert_eq!(phones.state(0).params["up.screenCapture.enabled"], "1");
    let r = device_command(
        &cloud,
        "get_params",
        json!({"target": t, "params": ["up.screenCapture.enabled", "reg.1.auth.password", "no.such.param"]}),
    )
    .await;
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(
        r["payload"]["params"]["up.screenCapture.enabled"]["value"],
        "1"
    );
    assert_eq!(
        r["payload"]["params"]["reg.1.auth.password"]["value"],
        "***"
    );
    assert_eq!(r["payload"]["unknown"], json!(["no.such.param"]));

    // Screen capture: the BMP leaves as an artifact, the result only names it.
    let r = device_command(&cloud, "capture_screen", json!({"target": t})).await;
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(r["payload"]["artifact"]["kind"], "screen_capture", "{r}");
    assert!(r["payload"].get("data_base64").is_none());

    // get_config from the local source lists what set_params wrote, passwords masked.
    let r = device_command(
        &cloud,
        "get_config",
        json!({"target": t, "source": "local"}),
    )
    .await;
    assert_eq!(r["result"], "success", "{r}");
    let content = r["payload"]["content"].as_str().unwrap();
    assert!(content.contains("up.screenCapture.enabled"), "{content}");
    assert!(!content.contains("hunter2"), "{content}");

    // Dial: the phone is in a call.
    let r = device_command(
        &cloud,
        "dial",
        json!({"target": t, "destination": "2001", "type": "SIP", "line": 1}),
    )
    .await;
    assert_eq!(r["result"], "success", "{r}");
    assert_ne!(phones.state(0).call_state, "idle");

    // Packet captures come back through the relay's edge: without one, a clear refusal before
    // the device is touched (tests/it/diagnostics.rs runs them with an edge).
    let r = device_command(
        &cloud,
        "packet_capture",
        json!({"target": t, "action": "start", "filter": "port 5060", "max_size_mb": 2, "duration_min": 30}),
    )
    .await;
    assert_eq!(r["result"], "failure", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("[edge]"), "{r}");
    assert!(!phones.state(0).capturing);

    // check_sync.
    let r = device_command(&cloud, "check_sync", json!({"target": t})).await;
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(phones.state(0).config_updates, 1);

    // reset (web+local+device) drops the REST-written parameter.
    let r = device_command(
        &cloud,
        "reset",
        json!({"target": t, "mode": "web_local_device"}),
    )
    .await;
    assert_eq!(r["result"], "success", "{r}");
    assert_ne!(phones.state(0).params["up.screenCapture.enabled"], "1");

    // reboot: the phone goes down and comes back with a fresh uptime.
    let r = device_command(&cloud, "reboot", json!({"target": t})).await;
    assert_eq!(r["result"], "success", "{r}");
    wait_for(
        "phone rebooted and back",
        Duration::from_secs(10),
        || async { (phones.state(0).reboots == 1 && !phones.is_down(0)).then_some(()) },
    )
    .await;

    // A wrong password is a clear failure.
    let r = device_command(
        &cloud,
        "check_sync",
        json!({"target": t, "password": "nope"}),
    )
    .await;
    assert_eq!(r["result"], "failure");
    assert!(r["reason"].as_str().unwrap().contains("401"), "{r}");

    // Bad parameters fail without a request to the device.
    let before = phones.stats().requests;
    for (name, params, needle) in [
        ("reset", json!({"target": t, "mode": "everything"}), "mode"),
        ("dial", json!({"target": t}), "destination"),
        (
            "get_params",
            json!({"target": t, "params": (0..21).map(|i| format!("p{i}")).collect::<Vec<_>>()}),
            "1 to 20",
        ),
        (
            "packet_capture",
            json!({"target": t, "action": "start", "duration_min": 5000}),
            "duration_min",
        ),
        ("reboot", json!({}), "target"),
        (
            "reboot",
            json!({"target": "phone.example"}),
            "not a device address",
        ),
    ] {
        let r = device_command(&cloud, name, params).await;
        assert_eq!(r["result"], "failure", "{name}: {r}");
        assert!(
            r["reason"].as_str().unwrap().contains(needle),
            "{name}: {r}"
        );
    }
    assert_eq!(
        phones.stats().requests,
        before,
        "no request for bad parameters"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_outside_the_device_subnets_send_nothing() {
    let (phones, _t) = fleet(1, Ipv4Addr::new(127, 0, 2, 10)).await;
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    // Only 127.0.2.0/28: .10 is inside, .99 (same simulator port) is not.
    cfg.extra = devices_section("127.0.2.0/28", "1h");
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;
    let outside = format!("127.0.2.99:{}", phones.port());
    let before = phones.stats();
    // The cloud itself routes nothing outside the relay's subnets...
    let r = device_command(&cloud, "reboot", json!({"target": outside})).await;
    assert_eq!(r["result"], "failure");
    assert!(
        r["reason"].as_str().unwrap().contains("no relay can reach"),
        "{r}"
    );
    // ...and a cloud that sends it anyway (the relay named) meets the relay's own guard.
    let relay_id = relay.status().await["relay_id"].clone();
    let v = cloud
        .post(
            "/sim/commands",
            json!({"name": "reboot", "relay_id": relay_id, "params": {"target": outside}}),
        )
        .await;
    let path = format!("/sim/commands/{}", v["command_id"].as_str().unwrap());
    let r = wait_for("the relay's refusal", Duration::from_secs(15), || async {
        let c = cloud.get(&path).await;
        (c["state"] == "done").then(|| c["result"].clone())
    })
    .await;
    assert_eq!(r["result"], "failure");
    assert!(r["reason"].as_str().unwrap().contains("outside"), "{r}");
    let id = cloud
        .post(
            "/sim/tasks",
            json!({"type": "reboot", "relay_id": relay_id, "targets": [outside, target(&phones, 0)]}),
        )
        .await["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let t = wait_task(&cloud, &id, |t| t["status"] == "done").await;
    assert_eq!(t["success"], 1);
    assert_eq!(t["failure"], 1);
    let after = phones.stats();
    // The simulator listens on every loopback address: a packet to .99 would show up as a
    // rejected connection.
    assert_eq!(after.rejected_connections, before.rejected_connections);
    assert_eq!(phones.state(0).reboots, 1);
}

async fn wait_task(cloud: &TestCloud, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let path = format!("/sim/tasks/{id}");
    wait_for(&format!("task {id}"), Duration::from_secs(30), || async {
        let t = cloud.get(&path).await;
        pred(&t).then_some(t)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_on_time_while_the_cloud_is_down_and_reports_after() {
    let (phones, _t) = fleet(3, Ipv4Addr::new(127, 0, 3, 10)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = cloud_args();
    args.state_file = Some(dir.path().join("cloud-state.json"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cloud = TestCloud::start_on(listener, args.clone()).await;
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = devices_section("127.0.3.0/24", "1h");
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;

    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3);
    let targets: Vec<String> = (0..3).map(|i| target(&phones, i)).collect();
    let id = cloud
        .post(
            "/sim/tasks",
            json!({"type": "reboot", "targets": targets, "at": at.to_string(), "name": "night reboot"}),
        )
        .await["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_task(&cloud, &id, |t| t["status"] == "scheduled").await;
    // The relay has it; the cloud goes away before it is due.
    wait_for(
        "task stored on the relay",
        Duration::from_secs(10),
        || async {
            let v: Value = ucrelay_relay::ops::admin::get_json(&relay.socket, "/v1/tasks")
                .await
                .ok()?;
            (v["tasks"][0]["status"] == "scheduled").then_some(())
        },
    )
    .await;
    cloud.stop().await;
    assert!((0..3).all(|i| phones.state(i).reboots == 0));

    // It runs on time with the cloud down.
    wait_for(
        "all three phones rebooted",
        Duration::from_secs(20),
        || async { (0..3).all(|i| phones.state(i).reboots == 1).then_some(()) },
    )
    .await;
    let v: Value = wait_for(
        "task done on the relay",
        Duration::from_secs(20),
        || async {
            let v: Value =
                ucrelay_relay::ops::admin::get_json(&relay.socket, &format!("/v1/tasks/{id}"))
                    .await
                    .ok()?;
            (v["status"] == "done").then_some(v)
        },
    )
    .await;
    assert_eq!(v["success"], 3, "{v}");
    let (code, out, _) = run_cli(&[
        "tasks",
        "--socket",
        relay.socket.to_str().unwrap(),
        "show",
        &id,
    ])
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("success"), "{out}");

    // The cloud comes back: every result arrives once.
    let cloud = TestCloud::start_on(tokio::net::TcpListener::bind(addr).await.unwrap(), args).await;
    let t = wait_task(&cloud, &id, |t| t["status"] == "done" && t["success"] == 3).await;
    assert_eq!(t["results"].as_array().unwrap().len(), 3, "{t}");
    assert_eq!(t["failure"], 0);
    let stats = cloud.stats().await;
    assert_eq!(stats["duplicate_results"], 0, "{stats}");
    let results = cloud.get("/sim/results").await;
    let per_target = results
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["command_id"] == id.as_str() && r["target"].is_string())
        .count();
    assert_eq!(per_target, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_resumes_after_sigkill_without_rerunning_finished_targets() {
    let n = 12;
    let (phones, _t) = fleet(n, Ipv4Addr::new(127, 0, 4, 10)).await;
    // Each request takes a while, so the relay dies mid-task.
    phones.set_fault_all(ucrelay_sim::phones::Fault {
        mode: ucrelay_sim::phones::FaultMode::Slow,
        delay_ms: 300,
    });
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = devices_section("127.0.4.0/24", "1h");
    let mut relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;
    let targets: Vec<String> = (0..n).map(|i| target(&phones, i)).collect();
    let id = cloud
        .post(
            "/sim/tasks",
            json!({"type": "check_sync", "targets": targets, "concurrency": 2}),
        )
        .await["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    // Kill once some targets are finished and stored, but not all.
    let finished_before = wait_for(
        "a few targets finished",
        Duration::from_secs(20),
        || async {
            let v: Value =
                ucrelay_relay::ops::admin::get_json(&relay.socket, &format!("/v1/tasks/{id}"))
                    .await
                    .ok()?;
            let done: Vec<String> = v["results"]
                .as_array()?
                .iter()
                .filter(|r| r["result"] == "success")
                .map(|r| r["target"].as_str().unwrap().to_string())
                .collect();
            (done.len() >= 3).then_some(done)
        },
    )
    .await;
    relay.signal("KILL");
    relay.wait_exit(Duration::from_secs(5)).await;
    assert!(finished_before.len() < n);

    let relay = Relay::start(&cfg).await;
    let t = wait_task(&cloud, &id, |t| t["status"] == "done").await;
    assert_eq!(t["success"], n as u64, "{t}");
    assert_eq!(t["results"].as_array().unwrap().len(), n);
    // Targets finished before the crash were not run again.
    for addr in &finished_before {
        let i = (0..n).find(|&i| &target(&phones, i) == addr).unwrap();
        assert_eq!(phones.state(i).config_updates, 1, "{addr} ran twice");
    }
    // At most the two in flight at the kill may have run twice.
    let total: u32 = (0..n).map(|i| phones.state(i).config_updates).sum();
    assert!(total <= n as u32 + 2, "{total}");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_phone_does_not_stall_a_task_and_thresholds_halt_a_bad_wave() {
    let (phones, _t) = fleet(5, Ipv4Addr::new(127, 0, 5, 10)).await;
    phones.set_fault(
        2,
        ucrelay_sim::phones::Fault {
            mode: ucrelay_sim::phones::FaultMode::Hang,
            delay_ms: 0,
        },
    );
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = devices_section("127.0.5.0/24", "1h");
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;
    let targets: Vec<String> = (0..5).map(|i| target(&phones, i)).collect();
    let started = std::time::Instant::now();
    let id = cloud
        .post(
            "/sim/tasks",
            json!({"type": "check_sync", "targets": targets, "target_timeout_s": 2}),
        )
        .await["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let t = wait_task(&cloud, &id, |t| t["status"] == "done").await;
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(t["success"], 4, "{t}");
    assert_eq!(t["failure"], 1, "{t}");
    let hung = t["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["result"] == "failure")
        .unwrap();
    assert_eq!(hung["target"], target(&phones, 2));

    // A wave where every phone refuses: halted after the sample, the rest not run.
    phones.set_fault_all(ucrelay_sim::phones::Fault {
        mode: ucrelay_sim::phones::FaultMode::Error,
        delay_ms: 0,
    });
    let (many, _t2) = fleet(30, Ipv4Addr::new(127, 0, 5, 100)).await;
    many.set_fault_all(ucrelay_sim::phones::Fault {
        mode: ucrelay_sim::phones::FaultMode::Error,
        delay_ms: 0,
    });
    let targets: Vec<String> = (0..30).map(|i| target(&many, i)).collect();
    let id = cloud
        .post(
            "/sim/tasks",
            json!({"type": "reboot", "targets": targets, "failure_threshold_pct": 50, "concurrency": 1}),
        )
        .await["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let t = wait_task(&cloud, &id, |t| t["status"] == "halted").await;
    assert_eq!(t["success"], 0, "{t}");
    assert!(t["failure"].as_u64().unwrap() >= 10, "{t}");
    assert!(t["not_applicable"].as_u64().unwrap() >= 15, "{t}");
    assert_eq!((0..30).map(|i| many.state(i).reboots).sum::<u32>(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_tasks_can_be_edited_and_cancelled_but_not_once_running() {
    let (phones, _t) = fleet(2, Ipv4Addr::new(127, 0, 6, 10)).await;
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = devices_section("127.0.6.0/24", "1h");
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;
    let later = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1)).to_string();
    let id = cloud
        .post(
            "/sim/tasks",
            json!({"type": "reboot", "targets": [target(&phones, 0)], "at": later}),
        )
        .await["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_task(&cloud, &id, |t| t["status"] == "scheduled").await;
    // Edit: add the second phone.
    let edit = cloud_patch(
        &cloud,
        &id,
        json!({"targets": [target(&phones, 0), target(&phones, 1)]}),
    )
    .await;
    let r = wait_command(&cloud, &edit).await;
    assert_eq!(r["result"]["result"], "success", "{r}");
    let v: Value = ucrelay_relay::ops::admin::get_json(&relay.socket, &format!("/v1/tasks/{id}"))
        .await
        .unwrap();
    assert_eq!(v["total"], 2);
    // Cancel.
    let del = cloud_delete(&cloud, &id).await;
    let r = wait_command(&cloud, &del).await;
    assert_eq!(r["result"]["result"], "success", "{r}");
    wait_task(&cloud, &id, |t| t["status"] == "cancelled").await;

    // A running task cannot be cancelled.
    phones.set_fault(
        0,
        ucrelay_sim::phones::Fault {
            mode: ucrelay_sim::phones::FaultMode::Slow,
            delay_ms: 1500,
        },
    );
    let id = cloud
        .post(
            "/sim/tasks",
            json!({"type": "check_sync", "targets": [target(&phones, 0)]}),
        )
        .await["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_task(&cloud, &id, |t| t["status"] == "executing").await;
    let del = cloud_delete(&cloud, &id).await;
    let r = wait_command(&cloud, &del).await;
    assert_eq!(r["result"]["result"], "failure", "{r}");
    assert!(
        r["result"]["reason"]
            .as_str()
            .unwrap()
            .contains("executing"),
        "{r}"
    );
    wait_task(&cloud, &id, |t| t["status"] == "done" && t["success"] == 1).await;
    assert_eq!(phones.state(0).reboots, 0);
}

async fn cloud_patch(cloud: &TestCloud, id: &str, body: Value) -> String {
    raw_call(
        cloud,
        http::Method::PATCH,
        &format!("/sim/tasks/{id}"),
        Some(body),
    )
    .await["command_id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn cloud_delete(cloud: &TestCloud, id: &str) -> String {
    raw_call(
        cloud,
        http::Method::DELETE,
        &format!("/sim/tasks/{id}"),
        None,
    )
    .await["command_id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn wait_command(cloud: &TestCloud, id: &str) -> Value {
    let path = format!("/sim/commands/{id}");
    wait_for("command result", Duration::from_secs(15), || async {
        let c = cloud.get(&path).await;
        (c["state"] == "done").then_some(c)
    })
    .await
}

/// One request with any method to the reference cloud's test API.
async fn raw_call(
    cloud: &TestCloud,
    method: http::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(cloud.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", cloud.addr.to_string())
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        status.is_success(),
        "{path}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_polls_the_cloud_list_reports_status_and_raises_alarms() {
    let (phones, _t) = fleet(3, Ipv4Addr::new(127, 0, 7, 10)).await;
    let cloud = TestCloud::start(cloud_args()).await;
    let devices: Vec<Value> = (0..3)
        .map(|i| json!({"address": target(&phones, i), "name": format!("desk {i}")}))
        .collect();
    cloud
        .post("/sim/devices", json!({"devices": devices}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = devices_section("127.0.7.0/24", "2s");
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;

    let status = wait_for(
        "three devices reported online",
        Duration::from_secs(20),
        || async {
            let v = cloud.get("/sim/devices").await;
            let st = v["status"].as_object()?;
            (st.len() == 3 && st.values().all(|r| r["online"] == true)).then_some(v)
        },
    )
    .await;
    let r = &status["status"][target(&phones, 1)];
    assert_eq!(r["mac"], phones.mac(1));
    assert!(!r["model"].as_str().unwrap().is_empty());
    assert!(r["uptime_s"].as_u64().is_some());
    assert!(r["last_reboot"].is_string());
    assert_eq!(r["lines"].as_array().unwrap().len(), 2);
    assert_eq!(r["call_state"], "idle");

    // A line drops and a phone goes away: alarms for both, then recovery alarms.
    phones.set_line_registered(0, 2, false).unwrap();
    phones.set_fault(
        1,
        ucrelay_sim::phones::Fault {
            mode: ucrelay_sim::phones::FaultMode::Refuse,
            delay_ms: 0,
        },
    );
    let kinds = |v: &Value, kind: &str, addr: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == kind && a["address"] == addr)
    };
    wait_for(
        "offline and unregistered alarms",
        Duration::from_secs(20),
        || async {
            let a = cloud.get("/sim/alarms").await;
            (kinds(&a, "line_unregistered", &target(&phones, 0))
                && kinds(&a, "device_offline", &target(&phones, 1)))
            .then_some(())
        },
    )
    .await;
    let (code, out, _) = run_cli(&["devices", "--socket", relay.socket.to_str().unwrap()]).await;
    assert_eq!(code, 1, "an offline device makes `ucrelay devices` exit 1");
    assert!(out.contains("offline"), "{out}");
    assert!(out.contains("2:UNREG"), "{out}");

    phones.set_line_registered(0, 2, true).unwrap();
    phones.set_fault(1, ucrelay_sim::phones::Fault::default());
    wait_for("recovery alarms", Duration::from_secs(20), || async {
        let a = cloud.get("/sim/alarms").await;
        (kinds(&a, "line_registered", &target(&phones, 0))
            && kinds(&a, "device_online", &target(&phones, 1)))
        .then_some(())
    })
    .await;
    let (code, out, _) = run_cli(&[
        "devices",
        "--json",
        "--socket",
        relay.socket.to_str().unwrap(),
    ])
    .await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["counts"]["known"], 3, "{v}");
    assert_eq!(code, 0, "{out}");
    let st = relay.status().await;
    assert_eq!(st["devices"]["devices"]["known"], 3);
}
