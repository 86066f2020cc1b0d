//! Devices that are not what they seem: a host that took over a phone's address with its own
//! certificate (it must never see the admin password), and phones that answer with huge, malformed,
//! endless or flapping replies (the relay must stay bounded and keep working). The relay is the real
//! binary; the phones and the cloud are the simulators in-process.

use crate::support::*;
use serde_json::{Value, json};
use std::net::Ipv4Addr;
use std::time::Duration;
use ucrelay_sim::phones::Hostile;

async fn devices_json(relay: &Relay) -> Value {
    ucrelay_relay::ops::admin::get_json(&relay.socket, "/v1/devices")
        .await
        .expect("devices answer")
}

/// The identity the relay shows for `address`.
async fn identity(relay: &Relay, address: &str) -> Value {
    let v = devices_json(relay).await;
    v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["address"] == address)
        .map(|d| d["identity"].clone())
        .unwrap_or(Value::Null)
}

fn alarms_of(alarms: &Value, kind: &str, address: &str) -> usize {
    alarms
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == kind && a["address"] == address)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_certificate_gets_no_password_until_someone_trusts_the_new_key() {
    let (phones, _t) = fleet(2, Ipv4Addr::new(127, 0, 20, 10)).await;
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    // Commands only: polls would race the counters below.
    cfg.extra = devices_section("127.0.20.0/24", "1h") + "monitoring = false\n";
    let mut relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;
    let a = phones.addr(0).to_string();
    let b = phones.addr(1).to_string();
    let socket = relay.socket.to_str().unwrap().to_string();

    // First contact pins the phone's key.
    let r = cloud.command("check_sync", json!({"target": a})).await;
    assert_eq!(r["result"], "success", "{r}");
    let id = identity(&relay, &a).await;
    assert_eq!(id["state"], "pinned", "{id}");
    assert_eq!(id["how"], "first_use");
    assert_eq!(id["key"], phones.key_fingerprint(0).unwrap());

    // Another host takes over the address with its own certificate: refused in the handshake,
    // so not one HTTP request (and no password) reaches it.
    phones.set_swapped(0, true);
    let impostor = phones.key_fingerprint(0).unwrap();
    let before = phones.stats();
    let r = cloud.command("check_sync", json!({"target": a})).await;
    assert_eq!(r["result"], "failure", "{r}");
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("device identity changed"), "{reason}");
    assert!(reason.contains("password was not sent"), "{reason}");
    assert!(reason.contains(&impostor[..16]), "{reason}");
    let after = phones.stats();
    assert_eq!(
        after.requests, before.requests,
        "no request reached the impostor"
    );
    assert_eq!(after.auth_failures, before.auth_failures);
    assert_eq!(phones.state(0).config_updates, 1);

    // One alarm for the new key, however often it is met.
    let r = cloud.command("check_sync", json!({"target": a})).await;
    assert_eq!(r["result"], "failure");
    wait_for(
        "device_identity_changed alarm at the cloud",
        Duration::from_secs(15),
        || async {
            let al = cloud.get("/sim/alarms").await;
            (alarms_of(&al, "device_identity_changed", &a) == 1).then_some(())
        },
    )
    .await;
    let id = identity(&relay, &a).await;
    assert_eq!(id["state"], "changed", "{id}");
    assert_eq!(id["changed"]["key"], impostor);
    let st = relay.status().await;
    assert!(
        st["problems"]
            .to_string()
            .contains("certificate key other than the pinned one"),
        "{st}"
    );
    let (code, out, _) = run_cli(&["devices", "--socket", &socket]).await;
    assert_eq!(code, 1, "a changed key makes `devices` exit 1: {out}");
    assert!(out.contains("CHANGED"), "{out}");
    assert!(out.contains("ucrelay devices trust"), "{out}");

    // The pin survives a restart.
    relay.signal("TERM");
    assert_eq!(relay.wait_exit(Duration::from_secs(20)).await, Some(0));
    let relay = Relay::start(&cfg).await;
    // Not healthy: the changed key is a problem until someone decides.
    let st = relay
        .wait_status("channel up after the restart", |s| {
            s["cloud"]["channel"] == "connected"
        })
        .await;
    assert_eq!(st["healthy"], false, "{st}");
    let r = cloud.command("check_sync", json!({"target": a})).await;
    assert_eq!(r["result"], "failure", "still refused after a restart: {r}");
    // The admin's probe shows the key and stops before the step that carries the password.
    let (code, out, _) = run_cli(&["devices", "--socket", &socket, "--json", "probe", &a]).await;
    assert_eq!(code, 1, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let steps = v["payload"]["steps"].as_array().unwrap();
    let step = |name: &str| steps.iter().find(|s| s["step"] == name).unwrap().clone();
    assert_eq!(step("tls")["result"], "failed", "{v}");
    assert!(
        step("tls")["detail"]
            .as_str()
            .unwrap()
            .contains("not the pinned key"),
        "{v}"
    );
    assert_eq!(step("rest")["result"], "skipped", "{v}");
    assert_eq!(phones.stats().requests, before.requests);

    // The admin accepts the key the device presented (a replaced phone).
    let (code, out, err) = run_cli(&["devices", "--socket", &socket, "trust", &a]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&impostor), "{out}");
    let r = cloud.command("check_sync", json!({"target": a})).await;
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(identity(&relay, &a).await["how"], "trusted_by_admin");
    relay.wait_healthy().await;

    // The original phone is back: now it is the stranger, until the cloud trusts its key.
    phones.set_swapped(0, false);
    let r = cloud.command("check_sync", json!({"target": a})).await;
    assert_eq!(r["result"], "failure", "{r}");
    let own = phones.key_fingerprint(0).unwrap();
    let r = cloud
        .command("device_trust", json!({"target": a, "fingerprint": "00"}))
        .await;
    assert_eq!(r["result"], "failure", "a malformed fingerprint: {r}");
    let r = cloud
        .command("device_trust", json!({"target": "10.9.9.9"}))
        .await;
    assert_eq!(r["result"], "failure", "outside the subnets: {r}");
    let r = cloud
        .command("device_trust", json!({"target": a, "fingerprint": own}))
        .await;
    assert_eq!(r["result"], "success", "{r}");
    let r = cloud.command("check_sync", json!({"target": a})).await;
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(identity(&relay, &a).await["how"], "trusted_by_cloud");

    // A factory reset the relay runs itself: the phone's new key is accepted once.
    let r = cloud.command("check_sync", json!({"target": b})).await;
    assert_eq!(r["result"], "success", "{r}");
    let old = phones.key_fingerprint(1).unwrap();
    let r = cloud
        .command("reset", json!({"target": b, "mode": "factory"}))
        .await;
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(identity(&relay, &b).await["state"], "expect_new");
    wait_for("phone 1 back up", Duration::from_secs(10), || async {
        (!phones.is_down(1)).then_some(())
    })
    .await;
    let new = phones.key_fingerprint(1).unwrap();
    assert_ne!(new, old, "a factory reset gives the phone a new key");
    let r = cloud.command("check_sync", json!({"target": b})).await;
    assert_eq!(r["result"], "success", "{r}");
    let id = identity(&relay, &b).await;
    assert_eq!(
        (id["state"].as_str(), id["how"].as_str()),
        (Some("pinned"), Some("factory_reset"))
    );
    assert_eq!(id["key"], new);
    // Once: the next stranger is refused again.
    phones.set_swapped(1, true);
    let r = cloud.command("check_sync", json!({"target": b})).await;
    assert_eq!(r["result"], "failure", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_phones_cannot_flood_or_break_the_relay() {
    let (phones, _t) = fleet(6, Ipv4Addr::new(127, 0, 21, 10)).await;
    let modes = [
        Hostile::HugeReplies,
        Hostile::LongStrings,
        Hostile::Malformed,
        Hostile::ManyLines,
        Hostile::FlappingLines,
        Hostile::None,
    ];
    for (i, m) in modes.iter().enumerate() {
        phones.set_hostile(i, *m);
    }
    let addr = |i: usize| phones.addr(i).to_string();
    let cloud = TestCloud::start(cloud_args()).await;
    let list: Vec<Value> = (0..modes.len())
        .map(|i| json!({"address": addr(i)}))
        .collect();
    cloud.post("/sim/devices", json!({"devices": list})).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = devices_section("127.0.21.0/24", "1s");
    let relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;

    // Several polls of every phone; the flapping one flips all its lines each time.
    let flapper = addr(4);
    let status = wait_for(
        "every phone reported and the flapper polled a few times",
        Duration::from_secs(30),
        || async {
            let v = cloud.get("/sim/devices").await;
            let n = v["status"].as_object()?.len();
            let al = cloud.get("/sim/alarms").await;
            (n == modes.len() && alarms_of(&al, "alarms_suppressed", &flapper) >= 3).then_some(v)
        },
    )
    .await;
    let st = &status["status"];

    // 16 MiB answers: cut at the relay's cap, the device counts as online and says why.
    let r = &st[addr(0)];
    assert_eq!(r["online"], true, "{r}");
    assert!(
        r["reason"].as_str().unwrap().contains("at most 256 KiB"),
        "{r}"
    );
    // Long strings with terminal escapes: short, printable.
    let r = &st[addr(1)];
    for field in ["model", "firmware", "call_state"] {
        let s = r[field].as_str().unwrap_or("");
        assert!(s.chars().count() <= 64, "{field}: {} chars", s.len());
        assert!(
            !s.chars().any(char::is_control),
            "{field} has control characters"
        );
    }
    assert!(r["mac"].is_null(), "a MAC that is not one is dropped: {r}");
    for l in r["lines"].as_array().unwrap() {
        assert!(l["uri"].as_str().unwrap().chars().count() <= 256);
    }
    // Malformed and 100,000-deep JSON: a reason, no crash.
    let r = &st[addr(2)];
    assert!(
        r["reason"].as_str().unwrap().contains("unreadable answer"),
        "{r}"
    );
    // 2,000 lines: 48 kept.
    assert_eq!(st[addr(3)]["lines"].as_array().unwrap().len(), 48);
    // The honest phone is fine.
    assert_eq!(st[addr(5)]["online"], true);
    assert!(st[addr(5)]["reason"].is_null(), "{}", st[addr(5)]);

    // Flapping: each poll that flips 48 lines raises 8 line alarms and one summary, not 48.
    let al = cloud.get("/sim/alarms").await;
    let line_alarms =
        alarms_of(&al, "line_unregistered", &flapper) + alarms_of(&al, "line_registered", &flapper);
    let summaries = alarms_of(&al, "alarms_suppressed", &flapper);
    assert!(summaries >= 3);
    // A poll in flight while the alarms were fetched may have stored its 8 alarms and not yet
    // been delivered with its summary, or the other way round.
    assert!(
        line_alarms.abs_diff(8 * summaries) <= 8,
        "{line_alarms} line alarms for {summaries} polls"
    );
    let dev = devices_json(&relay).await;
    assert!(
        dev["alarms_suppressed"].as_u64().unwrap() >= 40 * 3,
        "{dev}"
    );

    // Commands to hostile phones fail with a reason; the honest one still works.
    let r = cloud
        .command("get_params", json!({"target": addr(0), "params": ["a.b"]}))
        .await;
    assert_eq!(r["result"], "failure");
    assert!(
        r["reason"].as_str().unwrap().contains("at most 256 KiB"),
        "{r}"
    );
    let r = cloud
        .command("get_config", json!({"target": addr(2), "source": "local"}))
        .await;
    assert_eq!(r["result"], "success", "exports are text: {r}");
    let r = cloud
        .command("check_sync", json!({"target": addr(5)}))
        .await;
    assert_eq!(r["result"], "success", "{r}");

    // What the admin sees carries nothing a device could use to paint the terminal.
    let (_, out, _) = run_cli(&["devices", "--socket", relay.socket.to_str().unwrap()]).await;
    assert!(
        !out.contains('\u{1b}'),
        "escape sequences reach the terminal"
    );
    relay.wait_healthy().await;
}
