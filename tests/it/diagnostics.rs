//! Device diagnostics end to end: the relay as a child process with its HTTPS edge, the reference
//! cloud (with its provisioning tree) and the phone simulator in-process. Artifacts (screen and
//! packet captures, exports, backups, log bundles) reach the cloud in resumable chunks; packet
//! captures come back through the edge; device logs are kept while the cloud does not take them,
//! up to their cap; configuration backups rotate and restore; probes stay inside the subnets;
//! health alarms raise and clear.

use crate::support::*;
use serde_json::{Value, json};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use ucrelay_sim::phones::{self, Phones, PhonesOptions, uplink::Uplink};

const FQDN: &str = "relay.diag.test";

/// A relay with an edge, a cloud with a provisioning tree, and phones that reach the edge.
struct World {
    phones: Phones,
    cloud: TestCloud,
    relay: Relay,
    cfg: RelayConfig,
    edge: SocketAddr,
    _stop: tokio_util::sync::CancellationToken,
    dir: tempfile::TempDir,
}

struct Setup {
    base: Ipv4Addr,
    count: usize,
    capture_rate: u64,
    diagnostics: String,
    state_file: bool,
    stats_interval: &'static str,
}

impl Setup {
    fn new(base: Ipv4Addr) -> Setup {
        Setup {
            base,
            count: 1,
            capture_rate: 20_000,
            diagnostics: String::new(),
            state_file: false,
            stats_interval: "15m",
        }
    }
}

async fn world(s: Setup) -> World {
    let dir = tempfile::tempdir().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut opts = PhonesOptions::new(s.count, s.base);
    opts.reboot_time = Duration::from_millis(300);
    opts.capture_rate = s.capture_rate;
    let phones = phones::start(opts, stop.clone())
        .await
        .expect("phones start");
    let prov = dir.path().join("prov");
    std::fs::create_dir_all(&prov).unwrap();
    let mut args = cloud_args();
    args.provisioning = Some(prov);
    if s.state_file {
        args.state_file = Some(dir.path().join("cloud-state.json"));
    }
    let cloud = TestCloud::start(args).await;
    let pki = ucrelay_sim::pki::make(dir.path(), FQDN).unwrap();
    let o = s.base.octets();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = format!(
        "\n[edge]\nlisten = \"127.0.0.1:0\"\nfqdn = [\"{FQDN}\"]\npfx = {:?}\npfx_password_file = {:?}\n\n[provisioning]\nupstream = \"{}\"\n\n[devices]\nsubnets = [\"{}.{}.{}.0/24\"]\npoll_interval = \"1h\"\nstats_interval = \"{}\"\nadmin_password = \"456\"\nrequest_timeout = \"2s\"\ntarget_timeout = \"15s\"\n\n[diagnostics]\n{}\n",
        pki.pfx,
        pki.password_file,
        cloud.url(),
        o[0],
        o[1],
        o[2],
        s.stats_interval,
        s.diagnostics,
    );
    let relay = Relay::start(&cfg).await;
    let status = relay.wait_healthy().await;
    let edge: SocketAddr = status["edge"]["listen"].as_str().unwrap().parse().unwrap();
    let ca = std::fs::read_to_string(&pki.ca_pem).unwrap();
    use rustls_pki_types::pem::PemObject;
    let roots = rustls_pki_types::CertificateDer::pem_slice_iter(ca.as_bytes())
        .map(|c| c.unwrap().to_vec())
        .collect();
    phones.set_uplink(Uplink {
        resolve: [(FQDN.to_string(), edge)].into_iter().collect(),
        roots,
        provisioning: Some(format!("https://{FQDN}:{}/", edge.port())),
    });
    World {
        phones,
        cloud,
        relay,
        cfg,
        edge,
        _stop: stop,
        dir,
    }
}

impl World {
    fn target(&self, i: usize) -> String {
        self.phones.addr(i).to_string()
    }

    fn socket(&self) -> String {
        self.relay.socket.to_str().unwrap().to_string()
    }

    async fn artifact(&self, id: &str) -> Value {
        let path = format!("/sim/artifacts/{id}");
        wait_for(
            &format!("artifact {id} complete at the cloud"),
            Duration::from_secs(20),
            || async {
                let a = client_get(self.cloud.addr, &path).await?;
                (a["state"] == "complete").then_some(a)
            },
        )
        .await
    }

    async fn content(&self, id: &str) -> Vec<u8> {
        raw_get(self.cloud.addr, &format!("/sim/artifacts/{id}/content")).await
    }
}

async fn client_get(addr: SocketAddr, path: &str) -> Option<Value> {
    ucrelay_sim::client::get(addr, path).await.ok()
}

/// GET returning the raw body (artifact contents).
async fn raw_get(addr: SocketAddr, path: &str) -> Vec<u8> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

/// (name, bytes) of every file in a tar.gz.
fn untar(tgz: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(tgz));
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((name, data));
    }
    out
}

fn artifact_id(r: &Value) -> String {
    r["payload"]["artifact"]["artifact_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no artifact in {r}"))
        .to_string()
}

fn capture_name_ok(name: &str, mac: &str) -> bool {
    // <mac>_<yyyy.mm.dd_HHMMSS>.pcap.tar.gz
    let Some(rest) = name.strip_prefix(&format!("{mac}_")) else {
        return false;
    };
    let Some(stamp) = rest.strip_suffix(".pcap.tar.gz") else {
        return false;
    };
    let b = stamp.as_bytes();
    b.len() == 17
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'.',
            10 => *c == b'_',
            _ => c.is_ascii_digit(),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_and_exports_leave_as_artifacts() {
    let w = world(Setup {
        capture_rate: 400_000,
        stats_interval: "1s",
        ..Setup::new(Ipv4Addr::new(127, 0, 40, 10))
    })
    .await;
    let t = w.target(0);
    let mac = w.phones.mac(0);

    // A screen capture: the result names an artifact, and the BMP reaches the cloud whole.
    w.cloud
        .command(
            "set_params",
            json!({"target": t, "params": {"up.screenCapture.enabled": "1"}}),
        )
        .await;
    let r = w
        .cloud
        .command("capture_screen", json!({"target": t}))
        .await;
    assert_eq!(r["result"], "success", "{r}");
    assert!(
        r["payload"].get("data_base64").is_none(),
        "no image inside a result: {r}"
    );
    let a = w.artifact(&artifact_id(&r)).await;
    assert_eq!(
        (a["kind"].as_str(), a["mac"].as_str()),
        (Some("screen_capture"), Some(mac.as_str()))
    );
    assert_eq!(&w.content(&artifact_id(&r)).await[..2], b"BM");

    // A packet capture, stopped: the phone uploads it to the relay's edge, the relay hands it on.
    let r = w
        .cloud
        .command(
            "packet_capture",
            json!({"target": t, "action": "start", "filter": "udp port 5060", "max_size_mb": 2, "duration_min": 30}),
        )
        .await;
    assert_eq!(r["result"], "success", "{r}");
    assert!(w.phones.state(0).capturing);
    wait_for("the capture holds data", Duration::from_secs(5), || async {
        (w.phones.state(0).capture_bytes.unwrap_or(0) > 100_000).then_some(())
    })
    .await;
    let r = w
        .cloud
        .command("packet_capture", json!({"target": t, "action": "stop"}))
        .await;
    assert_eq!(r["result"], "success", "{r}");
    let name = r["payload"]["name"].as_str().unwrap().to_string();
    assert!(capture_name_ok(&name, &mac), "{name}");
    let a = w.artifact(&artifact_id(&r)).await;
    assert_eq!(a["name"], name.as_str());
    let files = untar(&w.content(&artifact_id(&r)).await);
    assert_eq!(files[0].0, format!("{mac}.pcap"));
    assert_eq!(&files[0].1[..4], &0xa1b2_c3d4u32.to_le_bytes());
    assert_eq!(w.phones.state(0).last_upload_status, Some(201));

    // A capture ends by itself at its size limit: the relay fetches it without being asked, the
    // artifact names the start command, and a later stop answers with it.
    let start = w
        .cloud
        .command(
            "packet_capture",
            json!({"target": t, "action": "start", "max_size_mb": 1, "duration_min": 60}),
        )
        .await;
    assert_eq!(start["result"], "success", "{start}");
    let auto = wait_for(
        "the capture fetched at its limit",
        Duration::from_secs(20),
        || async {
            let list = client_get(w.cloud.addr, "/sim/artifacts").await?;
            list.as_array()?
                .iter()
                .find(|a| a["command_id"] == start["command_id"] && a["state"] == "complete")
                .cloned()
        },
    )
    .await;
    assert_eq!(auto["kind"], "packet_capture");
    assert!(auto["size"].as_u64().unwrap() > 500_000, "{auto}");
    let r = w
        .cloud
        .command("packet_capture", json!({"target": t, "action": "stop"}))
        .await;
    assert_eq!(
        (r["result"].as_str(), r["payload"]["capture"].as_str()),
        (Some("success"), Some("ended")),
        "{r}"
    );
    assert_eq!(r["payload"]["artifact"]["artifact_id"], auto["artifact_id"]);

    // Cancel drops the file on the phone, and nothing new is uploaded.
    let before = w
        .cloud
        .get("/sim/artifacts")
        .await
        .as_array()
        .unwrap()
        .len();
    w.cloud
        .command(
            "packet_capture",
            json!({"target": t, "action": "start", "max_size_mb": 5}),
        )
        .await;
    let r = w
        .cloud
        .command("packet_capture", json!({"target": t, "action": "cancel"}))
        .await;
    assert_eq!(r["payload"]["file"], "dropped", "{r}");
    assert_eq!(w.phones.state(0).capture_bytes, None);
    assert_eq!(
        w.cloud
            .get("/sim/artifacts")
            .await
            .as_array()
            .unwrap()
            .len(),
        before
    );

    // One-click export: state, configuration, and a short capture, in one tar.gz.
    let r = w
        .cloud
        .command("export_device", json!({"target": t, "capture_s": 5}))
        .await;
    assert_eq!(r["result"], "success", "{r}");
    w.artifact(&artifact_id(&r)).await;
    let files = untar(&w.content(&artifact_id(&r)).await);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "README.txt",
        "device.json",
        "config-all_but_device.cfg",
        "config-device.cfg",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("capture/") && n.ends_with(".pcap.tar.gz")),
        "{names:?}"
    );

    // CPU and memory, on their own schedule, reach the cloud.
    let st = wait_for("CPU/memory reported", Duration::from_secs(15), || async {
        let v = client_get(w.cloud.addr, "/sim/devices").await?;
        v["stats"].get(&t).cloned()
    })
    .await;
    assert!(st["cpu_pct"].as_f64().unwrap() > 0.0, "{st}");
    assert!(st["memory_used_pct"].as_f64().unwrap() > 0.0, "{st}");

    // Nothing waits on the relay once the cloud confirmed it all.
    let s = w
        .relay
        .wait_status("no artifact left on the relay", |s| {
            s["diagnostics"]["artifacts_pending"] == 0
        })
        .await;
    assert!(
        s["diagnostics"]["artifacts_uploaded"].as_u64().unwrap() >= 4,
        "{s}"
    );
    drop(w.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_rotate_restore_and_probes_stay_inside_the_subnets() {
    let w = world(Setup {
        count: 2,
        ..Setup::new(Ipv4Addr::new(127, 0, 41, 10))
    })
    .await;
    let t = w.target(0);
    let mac = w.phones.mac(0);

    // The parameters as they are now become the first backup.
    w.cloud
        .command(
            "set_params",
            json!({"target": t, "params": {"reg.1.displayName": "Front desk", "reg.1.auth.password": "hunter2"}}),
        )
        .await;
    let first = w
        .cloud
        .command("get_config", json!({"target": t, "source": "local"}))
        .await;
    assert_eq!(first["result"], "success", "{first}");
    let first_id = first["payload"]["backup_id"].as_str().unwrap().to_string();
    assert!(!first.to_string().contains("hunter2"), "{first}");
    // Five more: the sixth drops the oldest.
    for _ in 0..5 {
        let r = w
            .cloud
            .command("get_config", json!({"target": t, "source": "local"}))
            .await;
        assert_eq!(r["result"], "success", "{r}");
    }
    let r = w
        .cloud
        .command("list_config_backups", json!({"mac": mac}))
        .await;
    let ids: Vec<&str> = r["payload"]["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backup_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5, "{r}");
    assert!(
        !ids.contains(&first_id.as_str()),
        "the oldest dropped out: {r}"
    );
    let (code, out, err) = run_cli(&[
        "devices",
        "--socket",
        &w.socket(),
        "backups",
        &mac,
        "--json",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["backups"].as_array().unwrap().len(), 5, "{v}");

    // The phone changes; restoring the newest backup puts the parameters back.
    w.cloud
        .command(
            "set_params",
            json!({"target": t, "params": {"reg.1.displayName": "Changed"}}),
        )
        .await;
    assert_eq!(w.phones.state(0).params["reg.1.displayName"], "Changed");
    let r = w
        .cloud
        .command(
            "restore_config_backup",
            json!({"target": t, "backup_id": "latest"}),
        )
        .await;
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(w.phones.state(0).params["reg.1.displayName"], "Front desk");
    assert_eq!(w.phones.state(0).params["reg.1.auth.password"], "hunter2");
    // And from the CLI.
    w.cloud
        .command(
            "set_params",
            json!({"target": t, "params": {"reg.1.displayName": "Again"}}),
        )
        .await;
    let (code, out, err) = run_cli(&[
        "devices",
        "--socket",
        &w.socket(),
        "backups",
        &mac,
        "restore",
        "latest",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("restored backup"), "{out}");
    assert_eq!(w.phones.state(0).params["reg.1.displayName"], "Front desk");
    // A backup leaves the relay masked, as an artifact.
    let r = w
        .cloud
        .command(
            "get_config_backup",
            json!({"mac": mac, "backup_id": ids[0]}),
        )
        .await;
    assert_eq!(r["result"], "success", "{r}");
    w.artifact(&artifact_id(&r)).await;
    let text = String::from_utf8(w.content(&artifact_id(&r)).await).unwrap();
    assert!(text.contains("reg.1.displayName=\"Front desk\""), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let (code, _, err) = run_cli(&[
        "devices",
        "--socket",
        &w.socket(),
        "backups",
        &mac,
        "delete",
        ids[0],
    ])
    .await;
    assert_eq!(code, 0, "{err}");

    // Whatever a device returns, results stay small: a 40 KB value comes back as an artifact.
    let big = "x".repeat(40_000);
    w.phones
        .set_param(1, phones::Source::Web, "feature.note", &big);
    let r = w
        .cloud
        .command(
            "get_params",
            json!({"target": w.target(1), "params": ["feature.note"]}),
        )
        .await;
    assert_eq!(r["result"], "success", "{r}");
    assert!(
        r.to_string().len() < 2_000,
        "a small result: {}",
        r.to_string().len()
    );
    assert_eq!(r["payload"]["artifact"]["kind"], "result", "{r}");
    w.artifact(&artifact_id(&r)).await;
    let inner: Value = serde_json::from_slice(&w.content(&artifact_id(&r)).await).unwrap();
    assert_eq!(inner["params"]["feature.note"]["value"], big.as_str());

    // Probe: every step timed; ICMP answers or says why it cannot.
    let r = w.cloud.command("probe", json!({"target": t})).await;
    assert_eq!(r["result"], "success", "{r}");
    let steps = r["payload"]["steps"].as_array().unwrap();
    let step = |name: &str| steps.iter().find(|s| s["step"] == name).unwrap().clone();
    for name in ["tcp", "tls", "rest"] {
        assert_eq!(step(name)["result"], "ok", "{r}");
        assert!(step(name)["ms"].as_f64().is_some(), "{r}");
    }
    let icmp = step("icmp");
    assert!(
        icmp["result"] == "ok"
            || (icmp["result"] == "skipped"
                && icmp["detail"]
                    .as_str()
                    .unwrap()
                    .contains("ping_group_range")),
        "{icmp}"
    );
    let (code, out, err) =
        run_cli(&["devices", "--socket", &w.socket(), "probe", &w.target(1)]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rest") && out.contains("ok"), "{out}");

    // Outside the subnets: refused, and not a packet sent (the simulator listens on every
    // loopback address, so a connection to .99 of another /24 would show up).
    let outside = format!("127.0.42.99:{}", w.phones.port());
    let before = w.phones.stats();
    let r = w.cloud.command("probe", json!({"target": outside})).await;
    assert_eq!(r["result"], "failure");
    assert!(r["reason"].as_str().unwrap().contains("outside"), "{r}");
    let (code, _, err) = run_cli(&["devices", "--socket", &w.socket(), "probe", &outside]).await;
    assert_eq!(code, 1);
    assert!(err.contains("outside"), "{err}");
    let after = w.phones.stats();
    assert_eq!(after.rejected_connections, before.rejected_connections);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_logs_are_kept_while_the_cloud_does_not_take_them_up_to_the_cap() {
    let w = world(Setup {
        diagnostics: "device_logs_max_per_device = \"20KB\"".into(),
        ..Setup::new(Ipv4Addr::new(127, 0, 43, 10))
    })
    .await;
    let mac = w.phones.mac(0);
    let socket = w.socket();
    let logs = || async {
        let (code, out, err) = run_cli(&["logs", "--socket", &socket, "--json"]).await;
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    // The cloud takes device logs: the relay only forwards.
    assert_eq!(w.phones.upload_log(0, "app", 8000).await.unwrap() / 100, 2);
    assert_eq!(logs().await["devices"].as_array().unwrap().len(), 0);

    // The tenant turns log upload off: the next heartbeat tells the relay to keep them.
    w.cloud
        .post("/sim/tenants/acme/settings", json!({"log_upload": false}))
        .await;
    w.relay
        .wait_status("the relay keeps device logs", |s| {
            s["diagnostics"]["device_logs_collecting"] == true
        })
        .await;
    for kind in ["app", "boot"] {
        let status = w.phones.upload_log(0, kind, 8000).await.unwrap();
        assert_eq!(status / 100, 2, "the upstream still gets the PUT");
    }
    // Forwarded unchanged: the provisioning tree has the same bytes the relay kept.
    let upstream =
        std::fs::read(w.dir.path().join("prov").join(format!("{mac}-boot.log"))).unwrap();
    assert_eq!(upstream.len(), 8000);
    let v = wait_for("two logs kept", Duration::from_secs(10), || async {
        let v = logs().await;
        (v["devices"][0]["files"] == 2).then_some(v)
    })
    .await;
    assert_eq!(
        (
            v["devices"][0]["mac"].as_str(),
            v["devices"][0]["bytes"].as_u64()
        ),
        (Some(mac.as_str()), Some(16000))
    );
    let (code, out, _) = run_cli(&["logs", "--socket", &socket]).await;
    assert_eq!(code, 0);
    assert!(out.contains(&mac) && out.contains("collecting"), "{out}");

    // The third would pass 20 KB: not kept, collection stops and says so; the PUT still goes up.
    assert_eq!(w.phones.upload_log(0, "app", 8000).await.unwrap() / 100, 2);
    let alarm = wait_for(
        "device_logs_capped alarm at the cloud",
        Duration::from_secs(15),
        || async {
            let a = client_get(w.cloud.addr, "/sim/alarms").await?;
            a.as_array()?
                .iter()
                .find(|a| a["kind"] == "device_logs_capped")
                .cloned()
        },
    )
    .await;
    assert_eq!(alarm["mac"], mac.as_str());
    let v = logs().await;
    assert_eq!(v["devices"][0]["files"], 2, "{v}");
    assert!(v["devices"][0]["capped_at"].is_string(), "{v}");
    let (_, out, _) = run_cli(&["logs", "--socket", &socket]).await;
    assert!(out.contains("STOPPED"), "{out}");
    let st = w.relay.status().await;
    assert_eq!(
        st["diagnostics"]["device_logs_capped"],
        json!([mac]),
        "{st}"
    );
    assert!(
        w.relay.logs().contains("device log cap"),
        "the relay's log says so"
    );
    assert_eq!(w.phones.upload_log(0, "app", 100).await.unwrap() / 100, 2);
    assert_eq!(logs().await["devices"][0]["files"], 2);

    // Exported from the CLI, and handed to the cloud as an artifact.
    let out_file = w.dir.path().join("export.tar.gz");
    let (code, _, err) = run_cli(&[
        "logs",
        "--socket",
        &socket,
        &mac,
        "--output",
        out_file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let files = untar(&std::fs::read(&out_file).unwrap());
    assert_eq!(files.len(), 2);
    assert!(
        files
            .iter()
            .all(|(n, d)| n.starts_with(&format!("{mac}/")) && d.len() == 8000)
    );
    let r = w
        .cloud
        .command("get_device_logs", json!({"mac": mac}))
        .await;
    assert_eq!(r["result"], "success", "{r}");
    w.artifact(&artifact_id(&r)).await;
    assert_eq!(untar(&w.content(&artifact_id(&r)).await).len(), 2);

    // Deleting them starts collection again.
    let (code, _, err) = run_cli(&["logs", "--socket", &socket, &mac, "--delete"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(w.phones.upload_log(0, "app", 1000).await.unwrap() / 100, 2);
    wait_for("collecting again", Duration::from_secs(10), || async {
        let v = logs().await;
        (v["devices"][0]["files"] == 1 && v["devices"][0]["capped_at"].is_null()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upgrades_and_config_updates_raise_alarms_that_clear() {
    let w = world(Setup::new(Ipv4Addr::new(127, 0, 44, 10))).await;
    let t = w.target(0);
    let kinds = || async {
        let a = w.cloud.get("/sim/alarms").await;
        a.as_array()
            .unwrap()
            .iter()
            .filter(|a| a["address"] == t.as_str())
            .map(|a| a["kind"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // The upgrade fails: the phone reboots and comes back on its old firmware.
    let old = w.phones.state(0).firmware;
    w.phones.offer_firmware(0, "6.4.8.1000", true);
    let r = w
        .cloud
        .command("upgrade", json!({"target": t, "firmware": "6.4.8.1000"}))
        .await;
    assert_eq!(r["result"], "failure", "{r}");
    assert!(r["reason"].as_str().unwrap().contains(&old), "{r}");
    wait_for(
        "firmware_upgrade_failed",
        Duration::from_secs(15),
        || async {
            kinds()
                .await
                .contains(&"firmware_upgrade_failed".to_string())
                .then_some(())
        },
    )
    .await;
    // It works the second time: the alarm clears.
    w.phones.offer_firmware(0, "6.4.8.1000", false);
    let r = w
        .cloud
        .command("upgrade", json!({"target": t, "firmware": "6.4.8.1000"}))
        .await;
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(w.phones.state(0).firmware, "6.4.8.1000");
    wait_for("firmware_upgraded", Duration::from_secs(15), || async {
        kinds()
            .await
            .contains(&"firmware_upgraded".to_string())
            .then_some(())
    })
    .await;

    // A check-sync the phone refuses, then one it takes.
    w.phones.refuse_config_updates(0, true);
    let r = w.cloud.command("check_sync", json!({"target": t})).await;
    assert_eq!(r["result"], "failure", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("refused"), "{r}");
    let (_, out, _) = run_cli(&["devices", "--socket", &w.socket()]).await;
    assert!(out.contains("config_update_failed"), "{out}");
    w.phones.refuse_config_updates(0, false);
    let r = w.cloud.command("check_sync", json!({"target": t})).await;
    assert_eq!(r["result"], "success", "{r}");
    wait_for(
        "config alarms raised and cleared",
        Duration::from_secs(15),
        || async {
            let k = kinds().await;
            (k.contains(&"config_update_failed".to_string())
                && k.contains(&"config_updated".to_string()))
            .then_some(())
        },
    )
    .await;
    let k = kinds().await;
    assert_eq!(
        k.iter().filter(|k| *k == "firmware_upgrade_failed").count(),
        1,
        "{k:?}"
    );
    assert_eq!(
        k.iter().filter(|k| *k == "config_updated").count(),
        1,
        "{k:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_upload_cut_halfway_resumes_after_the_cloud_and_the_relay_restart() {
    let mut w = world(Setup {
        state_file: true,
        capture_rate: 8_000_000,
        ..Setup::new(Ipv4Addr::new(127, 0, 45, 10))
    })
    .await;
    let t = w.target(0);
    // The cloud stops reading uploads once it holds 2.5 MiB of a file.
    let cut: u64 = 5 << 19;
    w.cloud
        .post("/sim/artifacts/faults", json!({"stall_after": cut}))
        .await;
    let r = w
        .cloud
        .command(
            "packet_capture",
            json!({"target": t, "action": "start", "max_size_mb": 4}),
        )
        .await;
    assert_eq!(r["result"], "success", "{r}");
    wait_for("4 MB captured", Duration::from_secs(10), || async {
        (w.phones.state(0).capture_bytes == Some(4 << 20)).then_some(())
    })
    .await;
    let r = w
        .cloud
        .command("packet_capture", json!({"target": t, "action": "stop"}))
        .await;
    assert_eq!(r["result"], "success", "{r}");
    let id = artifact_id(&r);
    let size = r["payload"]["artifact"]["size"].as_u64().unwrap();
    let sha = r["payload"]["artifact"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(size > 3 << 20, "random payloads hardly compress: {size}");
    let path = format!("/sim/artifacts/{id}");
    wait_for(
        "the upload stalled halfway",
        Duration::from_secs(20),
        || async {
            let a = client_get(w.cloud.addr, &path).await?;
            (a["received"] == cut).then_some(())
        },
    )
    .await;

    // Both die: the relay with SIGKILL, the cloud stopped; both come back.
    w.relay.signal("KILL");
    w.relay.wait_exit(Duration::from_secs(5)).await;
    let addr = w.cloud.addr;
    let mut args = cloud_args();
    args.provisioning = Some(w.dir.path().join("prov"));
    args.state_file = Some(w.dir.path().join("cloud-state.json"));
    let old = std::mem::replace(
        &mut w.cloud,
        TestCloud::start_on(
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            cloud_args(),
        )
        .await,
    );
    old.stop().await;
    let placeholder = std::mem::replace(
        &mut w.cloud,
        TestCloud::start_on(tokio::net::TcpListener::bind(addr).await.unwrap(), args).await,
    );
    placeholder.stop().await;
    w.relay = Relay::start(&w.cfg).await;

    let a = w.artifact(&id).await;
    assert_eq!(a["sha256_verified"], sha.as_str());
    assert_eq!(a["size"], size);
    // Resumed, not started over: the bytes held before the cut were not sent again.
    assert_eq!(a["bytes_received_total"], size, "{a}");
    let list = w.cloud.get("/sim/artifacts").await;
    assert_eq!(
        list.as_array()
            .unwrap()
            .iter()
            .filter(|x| x["artifact_id"] == id.as_str())
            .count(),
        1
    );
    let content = w.content(&id).await;
    use sha2::Digest;
    let got: String = sha2::Sha256::digest(&content)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got, sha);
    w.relay
        .wait_status("the relay's copy deleted", |s| {
            s["diagnostics"]["artifacts_pending"] == 0
        })
        .await;
    let _ = w.edge;
}
