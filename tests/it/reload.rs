//! A reload that changes every section: what can apply while running is in force at once (the
//! device subnets narrowed after an incident and a new device admin password above all, the
//! image limits, the edge's limits, the provisioning upstream), and what cannot is said plainly,
//! setting by setting, in the reload's output and in `status`, until the file says again what
//! runs. No secret shows on the way.

use crate::support::*;
use serde_json::{Value, json};
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use ucrelay_sim::phones::{self, PhonesOptions};

const OLD_PASSWORD: &str = "pw-wrong-3b2a";
const NEW_PASSWORD: &str = "pw-right-7c1d";

struct Sections {
    heartbeat: &'static str,
    metrics: &'static str,
    subnets: &'static str,
    password: &'static str,
    max_images: u32,
    per_ip: u32,
    upstream: String,
}

fn write(cfg: &mut RelayConfig, pki: &ucrelay_sim::pki::DemoPki, s: &Sections) {
    cfg.heartbeat_interval = s.heartbeat;
    cfg.extra = format!(
        "{metrics}\n[edge]\nlisten = \"127.0.0.1:0\"\nlegacy_http_listen = \"127.0.0.1:0\"\nfqdn = [\"relay.test\"]\n\
         pfx = {pfx:?}\npfx_password_file = {pass:?}\nmax_connections_per_ip = {per_ip}\n\n\
         [provisioning]\nupstream = \"{upstream}\"\n\n\
         [images]\nmax_images = {max_images}\n\n\
         [devices]\nsubnets = [{subnets}]\nadmin_password = \"{password}\"\nrequest_timeout = \"2s\"\ntarget_timeout = \"5s\"\nmonitoring = false\n",
        metrics = s.metrics,
        pfx = pki.pfx,
        pass = pki.password_file,
        per_ip = s.per_ip,
        upstream = s.upstream,
        max_images = s.max_images,
        subnets = s.subnets,
        password = s.password,
    );
    cfg.write();
}

async fn reload(relay: &Relay) -> (i32, String, Value) {
    let sock = relay.socket.to_str().unwrap().to_string();
    let (code, out, err) = run_cli(&["reload", "--socket", &sock]).await;
    let (_, json, _) = run_cli(&["reload", "--socket", &sock, "--json"]).await;
    for secret in [OLD_PASSWORD, NEW_PASSWORD] {
        assert!(
            !out.contains(secret) && !err.contains(secret) && !json.contains(secret),
            "a reload showed a password: {out}{err}{json}"
        );
    }
    (code, out, serde_json::from_str(&json).unwrap())
}

/// Whether a plain-HTTP request from 127.0.0.1 to the legacy listener gets an HTTP answer.
async fn legacy_answers(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    use tokio::io::AsyncWriteExt;
    let _ = s
        .write_all(b"GET /x.cfg HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    buf.starts_with(b"HTTP/1.1 ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_each_section_or_says_it_waits_for_a_restart() {
    let token = tokio_util::sync::CancellationToken::new();
    let mut opts = PhonesOptions::new(1, Ipv4Addr::new(127, 0, 9, 10));
    opts.admin_password = NEW_PASSWORD.into();
    let phones = phones::start(opts, token.clone()).await.unwrap();
    let phone = phones.addr(0).to_string();
    // Another address on the simulator's port: inside the first subnets, outside the narrowed.
    let other = format!("127.0.8.10:{}", phones.port());

    let dir = tempfile::tempdir().unwrap();
    let published = dir.path().join("published");
    std::fs::create_dir_all(&published).unwrap();
    std::fs::write(published.join("a.bin"), vec![1u8; 2000]).unwrap();
    std::fs::write(published.join("b.bin"), vec![2u8; 3000]).unwrap();
    let mut args = cloud_args();
    args.images = Some(published);
    let cloud = TestCloud::start(args).await;
    let pki = ucrelay_sim::pki::make(dir.path(), "relay.test").unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    let first = Sections {
        heartbeat: "200ms",
        metrics: "",
        subnets: "\"127.0.0.0/8\"",
        password: OLD_PASSWORD,
        max_images: 5,
        per_ip: 100,
        upstream: "http://127.0.0.1:9".into(),
    };
    write(&mut cfg, &pki, &first);
    let relay = Relay::start(&cfg).await;
    let st = relay
        .wait_status("healthy with both images synced", |s| {
            s["cloud"]["channel"] == "connected"
                && s["images"]["images"]
                    .as_array()
                    .is_some_and(|l| l.len() == 2 && l.iter().all(|i| i["state"] == "synced"))
        })
        .await;
    let legacy: u16 = st["edge"]["legacy_http_listen"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap();

    // Before: the wrong password is refused by the phone; 127.0.0.1 may use plain HTTP.
    let r = cloud.command("reboot", json!({"target": phone})).await;
    assert_eq!(r["result"], "failure", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("401"), "{r}");
    assert!(
        legacy_answers(legacy).await,
        "127.0.0.1 is inside 127.0.0.0/8"
    );

    // The reload: every section changes.
    let second = Sections {
        heartbeat: "300ms",
        metrics: "metrics_listen = \"127.0.0.1:0\"\n",
        subnets: "\"127.0.9.0/24\"",
        password: NEW_PASSWORD,
        max_images: 1,
        per_ip: 50,
        upstream: "http://127.0.0.1:10".into(),
    };
    write(&mut cfg, &pki, &second);
    let (code, out, v) = reload(&relay).await;
    assert_eq!(
        code, 1,
        "settings wait for a restart, so not everything is in force: {out}"
    );
    for line in [
        "ok       devices.subnets is now 127.0.9.0/24 (was 127.0.0.0/8)",
        "ok       devices.admin_password changed; in use from now on",
        "ok       images.max_images is now 1 (was 5)",
        "ok       edge.max_connections_per_ip is now 50 (was 100)",
        "ok       provisioning upstream is now",
        "ok       certificate reloaded",
        "restart  cloud.heartbeat_interval is 300ms in the file; the relay keeps 200ms until it restarts",
        "restart  admin.metrics_listen is 127.0.0.1:0 in the file; the relay keeps off until it restarts",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(line)),
            "missing {line:?} in:\n{out}"
        );
    }
    assert_eq!(
        v["restart_needed"],
        json!(["cloud.heartbeat_interval", "admin.metrics_listen"]),
        "{v}"
    );

    // In force at once: the new password works, the narrowed subnets hold.
    let r = cloud.command("reboot", json!({"target": phone})).await;
    assert_eq!(r["result"], "success", "{r}");
    let before = phones.stats().rejected_connections;
    let r = cloud.command("reboot", json!({"target": other})).await;
    assert_eq!(r["result"], "failure", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("outside [devices].subnets"),
        "{r}"
    );
    assert_eq!(
        phones.stats().rejected_connections,
        before,
        "nothing was sent"
    );
    assert!(
        !legacy_answers(legacy).await,
        "127.0.0.1 is outside 127.0.9.0/24 now"
    );
    let st = relay
        .wait_status("the manifest refused under the new max_images", |s| {
            s["images"]["refused"]
                .as_str()
                .is_some_and(|r| r.contains("max_images"))
        })
        .await;
    // Status says what waits for a restart.
    assert_eq!(
        st["restart_needed"],
        json!(["cloud.heartbeat_interval", "admin.metrics_listen"])
    );
    assert!(
        st["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("only after a restart")),
        "{st}"
    );
    let (_, text, _) = run_cli(&["status", "--socket", relay.socket.to_str().unwrap()]).await;
    assert!(
        text.contains("cloud.heartbeat_interval, admin.metrics_listen"),
        "{text}"
    );

    // The file says again what runs (and the image limit back up): all in force, nothing waits.
    let third = Sections {
        max_images: 5,
        ..second
    };
    let third = Sections {
        heartbeat: first.heartbeat,
        metrics: first.metrics,
        ..third
    };
    write(&mut cfg, &pki, &third);
    let (code, out, v) = reload(&relay).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(v["restart_needed"], json!([]), "{v}");
    relay
        .wait_status("nothing waits, the manifest accepted again", |s| {
            s["restart_needed"] == json!([])
                && s["images"]["refused"].is_null()
                && s["images"]["images"]
                    .as_array()
                    .is_some_and(|l| l.len() == 2)
        })
        .await;
    let logs = relay.logs();
    for secret in [OLD_PASSWORD, NEW_PASSWORD] {
        assert!(!logs.contains(secret), "a password reached the logs");
    }
    token.cancel();
    drop(relay);
    cloud.stop().await;
}
