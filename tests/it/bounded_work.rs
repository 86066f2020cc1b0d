//! Work from the cloud is bounded: a command flood beyond the relay's queue is answered busy and
//! the reference cloud backs off, yet every command is answered exactly once; records the cloud
//! refuses as too large are set aside while the rest flow; one cap on device sessions holds across
//! a task and monitoring at once; finished tasks are forgotten after their retention.

use crate::support::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;
use ucrelay_sim::phones::{self, FaultMode, Hostile, Phones, PhonesOptions};

async fn fleet(
    count: usize,
    base: Ipv4Addr,
    slow_ms: Option<u32>,
) -> (Phones, tokio_util::sync::CancellationToken) {
    let token = tokio_util::sync::CancellationToken::new();
    let mut opts = PhonesOptions::new(count, base);
    opts.reboot_time = Duration::from_millis(300);
    if let Some(ms) = slow_ms {
        opts.fault = FaultMode::Slow;
        opts.fault_delay_ms = ms;
    }
    let phones = phones::start(opts, token.clone())
        .await
        .expect("phones start");
    (phones, token)
}

fn devices_section(subnet: &str, poll: &str) -> String {
    format!(
        "\n[devices]\nsubnets = [\"{subnet}\"]\npoll_interval = \"{poll}\"\nadmin_password = \"456\"\nrequest_timeout = \"5s\"\ntarget_timeout = \"20s\"\n"
    )
}

async fn admin(relay: &Relay, path: &str) -> Value {
    ucrelay_relay::ops::admin::get_json(&relay.socket, path)
        .await
        .expect("admin answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_flood_gets_busy_and_every_acked_command_is_answered_once() {
    let per_phone = 15;
    let (phones, _t) = fleet(4, Ipv4Addr::new(127, 0, 22, 10), Some(100)).await;
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra_cloud.push_str("command_queue = 6\n");
    cfg.extra = devices_section("127.0.22.0/24", "1h") + "monitoring = false\n";
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;

    // Four floods at once, one per phone, far beyond the relay's queue of 6.
    let mut ids = Vec::new();
    for i in 0..4 {
        let v = cloud
            .post(
                "/sim/flood",
                json!({"name": "check_sync", "params": {"target": phones.addr(i).to_string()}, "count": per_phone}),
            )
            .await;
        ids.extend(
            v["command_ids"]
                .as_array()
                .expect("command ids")
                .iter()
                .map(|i| i.as_str().unwrap().to_string()),
        );
    }
    let total = ids.len();
    let started = std::time::Instant::now();
    wait_for(
        "every flooded command answered",
        Duration::from_secs(60),
        || async {
            let n = cloud.get("/sim/results").await.as_array()?.len();
            (n >= total).then_some(())
        },
    )
    .await;

    // Each command ran exactly once and has exactly one result.
    let results = cloud.get("/sim/results").await;
    let mut per_command: HashMap<String, usize> = HashMap::new();
    for r in results.as_array().unwrap() {
        assert_eq!(r["result"], "success", "{r}");
        *per_command
            .entry(r["command_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for id in &ids {
        assert_eq!(per_command.get(id), Some(&1), "command {id}");
        let c = cloud.get(&format!("/sim/commands/{id}")).await;
        assert_eq!(c["state"], "done", "{c}");
    }
    for i in 0..4 {
        assert_eq!(
            phones.state(i).config_updates as usize,
            per_phone,
            "phone {i}"
        );
    }
    let stats = cloud.stats().await;
    assert_eq!(stats["duplicate_results"], 0, "{stats}");
    let busy = stats["busy_answers"].as_u64().unwrap();
    assert!(busy > 0, "the flood met a full queue: {stats}");
    let errors = cloud.get("/sim/channel/errors").await;
    assert!(
        errors
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["code"] == "busy"),
        "{errors}"
    );
    let st = relay.status().await;
    assert_eq!(st["cloud"]["commands_busy"].as_u64(), Some(busy), "{st}");
    println!(
        "flood: {total} commands through a queue of 6 in {:.1} s, {busy} busy answers",
        started.elapsed().as_secs_f64()
    );
    wait_log(&relay, "[cloud].command_queue").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_cloud_refuses_as_too_large_are_set_aside_and_the_rest_flow() {
    let (phones, _t) = fleet(3, Ipv4Addr::new(127, 0, 23, 10), None).await;
    phones.set_hostile(2, Hostile::ManyLines);
    let cloud = TestCloud::start(cloud_args()).await;
    let list: Vec<Value> = (0..3)
        .map(|i| json!({"address": phones.addr(i).to_string()}))
        .collect();
    cloud.post("/sim/devices", json!({"devices": list})).await;
    // A relay_status result (the whole status report, a few KB) and a 48-line report are over the
    // cloud's limit; pings, device commands and ordinary reports are well under it.
    cloud
        .post("/sim/limits", json!({"max_record_bytes": 1500}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = devices_section("127.0.23.0/24", "1s");
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;

    let t = phones.addr(0).to_string();
    let mut ids = Vec::new();
    for name in ["ping", "relay_status", "ping", "check_sync", "ping"] {
        let v = cloud
            .post(
                "/sim/commands",
                json!({"name": name, "params": {"target": t}}),
            )
            .await;
        ids.push((name, v["command_id"].as_str().unwrap().to_string()));
    }
    for (name, id) in &ids {
        if *name == "relay_status" {
            continue;
        }
        wait_for(
            &format!("result of {name} {id}"),
            Duration::from_secs(20),
            || async {
                (cloud.get(&format!("/sim/commands/{id}")).await["state"] == "done").then_some(())
            },
        )
        .await;
    }
    let st = relay
        .wait_status("the oversized result set aside", |s| {
            s["cloud"]["results_rejected"] == 1 && s["cloud"]["results_pending"] == 0
        })
        .await;
    assert_eq!(st["cloud"]["results_rejected"], 1, "{st}");
    let big = &ids[1].1;
    assert_ne!(
        cloud.get(&format!("/sim/commands/{big}")).await["state"],
        "done"
    );
    wait_log(&relay, "too large").await;

    // Device status: the two ordinary phones keep being reported; the 48-line report is refused
    // for good and dropped, not retried forever.
    let v = wait_for(
        "ordinary reports flow while the big one is set aside",
        Duration::from_secs(20),
        || async {
            let d = admin(&relay, "/v1/devices").await;
            let cloud_view = cloud.get("/sim/devices").await;
            let st = cloud_view["status"].as_object()?.clone();
            (d["records_rejected"].as_u64() >= Some(2)
                && st.contains_key(&phones.addr(0).to_string())
                && st.contains_key(&phones.addr(1).to_string()))
            .then_some(st)
        },
    )
    .await;
    assert!(!v.contains_key(&phones.addr(2).to_string()), "{v:?}");
    assert!(cloud.stats().await["records_too_large"].as_u64() >= Some(2));
    // Still connected and working; status says what was set aside.
    let st = relay.status().await;
    assert_eq!(st["cloud"]["channel"], "connected");
    let problems = st["problems"].to_string();
    assert!(problems.contains("too large and set aside"), "{problems}");
    assert!(problems.contains("device-status records"), "{problems}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_session_cap_holds_across_a_task_and_polls() {
    let n = 12;
    let (phones, _t) = fleet(n, Ipv4Addr::new(127, 0, 24, 10), Some(150)).await;
    let cloud = TestCloud::start(cloud_args()).await;
    let targets: Vec<String> = (0..n).map(|i| phones.addr(i).to_string()).collect();
    let list: Vec<Value> = targets.iter().map(|t| json!({"address": t})).collect();
    cloud.post("/sim/devices", json!({"devices": list})).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = devices_section("127.0.24.0/24", "2s") + "max_sessions = 4\n";
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;

    // Polls are running; a task asks for all twelve phones at once on top of them.
    phones.reset_peak();
    let id = cloud
        .post(
            "/sim/tasks",
            json!({"type": "check_sync", "targets": targets, "concurrency": 12}),
        )
        .await["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let t = wait_for("task done", Duration::from_secs(40), || async {
        let t = cloud.get(&format!("/sim/tasks/{id}")).await;
        (t["status"] == "done").then_some(t)
    })
    .await;
    assert_eq!(t["success"], n, "{t}");
    let polled = wait_for("every phone polled", Duration::from_secs(20), || async {
        let v = cloud.get("/sim/devices").await;
        (v["status"].as_object()?.len() == n).then_some(v)
    })
    .await;
    assert!(
        polled["status"]
            .as_object()
            .unwrap()
            .values()
            .all(|r| r["online"] == true)
    );
    let peak = phones.stats().peak_in_flight;
    assert!(
        peak <= 4,
        "{peak} device requests at once with max_sessions = 4"
    );
    assert!(peak >= 3, "the cap was used, not undercut: peak {peak}");
    let d = admin(&relay, "/v1/devices").await;
    assert_eq!(d["max_sessions"], 4);
    assert!(d["sessions_open"].as_u64().unwrap() <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_are_forgotten_after_their_retention() {
    let (phones, _t) = fleet(1, Ipv4Addr::new(127, 0, 25, 10), None).await;
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra =
        devices_section("127.0.25.0/24", "1h") + "monitoring = false\ntask_retention = \"2s\"\n";
    let mut relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;
    let t = phones.addr(0).to_string();

    let done_id = cloud
        .post("/sim/tasks", json!({"type": "check_sync", "targets": [t]}))
        .await["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let later = (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600)).to_string();
    let scheduled_id = cloud
        .post(
            "/sim/tasks",
            json!({"type": "check_sync", "targets": [t], "at": later}),
        )
        .await["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let listed = |v: &Value, id: &str| v["tasks"].as_array().unwrap().iter().any(|t| t["id"] == id);
    wait_for(
        "the task done on the relay",
        Duration::from_secs(15),
        || async {
            let v = admin(&relay, "/v1/tasks").await;
            v["tasks"]
                .as_array()?
                .iter()
                .any(|x| x["id"] == done_id.as_str() && x["status"] == "done")
                .then_some(())
        },
    )
    .await;
    // Forgotten once the retention has passed; the scheduled one stays.
    wait_for(
        "the finished task pruned",
        Duration::from_secs(15),
        || async {
            let v = admin(&relay, "/v1/tasks").await;
            (!listed(&v, &done_id) && listed(&v, &scheduled_id)).then_some(())
        },
    )
    .await;
    wait_log(&relay, "past their retention forgotten").await;

    // Durably: a restart does not bring it back, and the cloud sending it again does not run it
    // again (its id stays known).
    relay.signal("TERM");
    assert_eq!(relay.wait_exit(Duration::from_secs(20)).await, Some(0));
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;
    let v = admin(&relay, "/v1/tasks").await;
    assert!(!listed(&v, &done_id), "{v}");
    assert!(listed(&v, &scheduled_id), "{v}");
    let frame = json!({"type": "command", "id": done_id, "name": "task",
        "params": {"type": "check_sync", "targets": [t]}});
    cloud
        .post("/sim/channel/raw", json!({"text": frame.to_string()}))
        .await;
    wait_log(&relay, "acknowledging again").await;
    assert!(!listed(&admin(&relay, "/v1/tasks").await, &done_id));
    assert_eq!(phones.state(0).config_updates, 1, "never run twice");
}

/// Waits until the relay's log (written within 100 ms of a line) holds `needle`.
async fn wait_log(relay: &Relay, needle: &str) {
    wait_for(
        &format!("{needle:?} in the log"),
        Duration::from_secs(10),
        || async { relay.logs().contains(needle).then_some(()) },
    )
    .await;
}
