//! A fleet of relays against one reference cloud: real relay processes on distinct loopback
//! addresses, simulated phones in distinct /24s (one per site), `--inactive-after` and every
//! interval compressed so that a relay that stops is noticed within seconds.
//!
//! Monitoring split and its stability as relays come and go, an isolated site served only by its
//! relay, a relay SIGKILLed in the middle of a 2,000-target task, a certificate uploaded in the
//! cloud (good and bad, with a connection kept across the swap), and a device downloading an
//! image from either relay under the shared name.

use crate::support::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;
use ucrelay_sim::phones::{self, Phones, PhonesOptions};

/// How long the cloud waits for a silent relay before moving its work (and its monitoring share).
const INACTIVE_AFTER: Duration = Duration::from_secs(2);

async fn fleet_cloud(images: Option<&Path>) -> TestCloud {
    let mut args = cloud_args();
    args.inactive_after = INACTIVE_AFTER;
    args.images = images.map(Path::to_path_buf);
    TestCloud::start(args).await
}

async fn phones_at(count: usize, base: Ipv4Addr, delay: Option<(u32, u32)>) -> Phones {
    let mut opts = PhonesOptions::new(count, base);
    opts.reboot_time = Duration::from_millis(300);
    opts.answer_delay_ms = delay;
    phones::start(opts, tokio_util::sync::CancellationToken::new())
        .await
        .expect("phones start")
}

/// A relay reporting `address`, serving 127.0.0.0/8, with `extra` appended.
fn relay_cfg(dir: &Path, cloud: &TestCloud, address: &str, extra: &str) -> RelayConfig {
    let mut cfg = RelayConfig::new(dir, &cloud.url());
    cfg.extra_cloud
        .push_str(&format!("addresses = [\"{address}\"]\n"));
    cfg.extra = format!(
        "\n[devices]\nsubnets = [\"127.0.0.0/8\"]\npoll_interval = \"2s\"\nrequest_timeout = \"2s\"\ntarget_timeout = \"5s\"\ntask_concurrency = 64\n{extra}"
    );
    cfg
}

async fn relay_id(relay: &Relay) -> String {
    relay.status().await["relay_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Each relay's monitoring share as the cloud lists it.
async fn shares(cloud: &TestCloud) -> BTreeMap<String, u64> {
    cloud
        .relays()
        .await
        .iter()
        .map(|r| {
            (
                r["relay_id"].as_str().unwrap().to_string(),
                r["devices_assigned"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The devices a relay polls: those it has from the cloud's list (`ucrelay devices --json`).
async fn polled_by(relay: &Relay) -> BTreeSet<String> {
    let v: Value = ucrelay_relay::ops::admin::get_json(&relay.socket, "/v1/devices")
        .await
        .unwrap();
    v["devices"]
        .as_array()
        .or(v.as_array())
        .unwrap()
        .iter()
        .filter(|d| d["source"].as_str().is_some_and(|s| s.contains("cloud")))
        .map(|d| d["address"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until every relay polls exactly the share the cloud gives it, and returns the shares.
async fn settled(cloud: &TestCloud, relays: &[&Relay], total: usize) -> Vec<BTreeSet<String>> {
    wait_for(
        "monitoring shares applied",
        Duration::from_secs(20),
        || async {
            let cloud_shares = shares(cloud).await;
            let mut sets = Vec::new();
            for r in relays {
                let id = relay_id(r).await;
                let set = polled_by(r).await;
                if cloud_shares.get(&id).copied() != Some(set.len() as u64) {
                    return None;
                }
                sets.push(set);
            }
            let union: BTreeSet<&String> = sets.iter().flatten().collect();
            let sum: usize = sets.iter().map(BTreeSet::len).sum();
            (union.len() == total && sum == total).then_some(sets)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_is_split_and_a_relay_added_or_removed_moves_only_its_share() {
    let phones = phones_at(60, Ipv4Addr::new(127, 0, 31, 1), None).await;
    let cloud = fleet_cloud(None).await;
    let devices: Vec<Value> = phones
        .addrs()
        .map(|a| json!({"address": a.to_string()}))
        .collect();
    cloud
        .post("/sim/devices", json!({"devices": devices}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mk = |name: &str, addr: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        relay_cfg(&d, &cloud, addr, "")
    };
    let (ca, cb, cc) = (
        mk("a", "127.0.0.2"),
        mk("b", "127.0.0.3"),
        mk("c", "127.0.0.4"),
    );
    let a = Relay::start(&ca).await;
    let b = Relay::start(&cb).await;
    a.wait_healthy().await;
    b.wait_healthy().await;

    // Two relays: disjoint shares that cover every device, each about half.
    let two = settled(&cloud, &[&a, &b], 60).await;
    for s in &two {
        assert!((18..=42).contains(&s.len()), "uneven split: {two:?}");
    }
    // From now on every device is reported, each by exactly one relay (before B came up, A had
    // them all).
    let counts = |v: &Value| -> BTreeMap<(String, String), u64> {
        let mut m = BTreeMap::new();
        for (dev, by) in v["reported_by"].as_object().into_iter().flatten() {
            for (relay, n) in by.as_object().unwrap() {
                m.insert((dev.clone(), relay.clone()), n.as_u64().unwrap());
            }
        }
        m
    };
    let cycle = |start: BTreeMap<(String, String), u64>| {
        let cloud = &cloud;
        async move {
            wait_for("a poll cycle reported", Duration::from_secs(20), || async {
                let now = counts(&cloud.get("/sim/devices").await);
                let mut by_dev: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                for ((dev, relay), n) in &now {
                    if *n
                        > start
                            .get(&(dev.clone(), relay.clone()))
                            .copied()
                            .unwrap_or(0)
                    {
                        by_dev.entry(dev.clone()).or_default().insert(relay.clone());
                    }
                }
                (by_dev.len() == 60).then_some((by_dev, now))
            })
            .await
        }
    };
    // The first cycle lets reports polled before the split drain; the second must be clean.
    let (_, mid) = cycle(counts(&cloud.get("/sim/devices").await)).await;
    let (grown, _) = cycle(mid).await;
    for (dev, relays) in &grown {
        assert_eq!(relays.len(), 1, "{dev} polled by {relays:?}");
    }
    let st = a.status().await;
    assert_eq!(
        st["fleet"]["devices_assigned"].as_u64(),
        Some(two[0].len() as u64),
        "{st}"
    );

    // A third relay takes a share from the others; nobody else's devices move.
    let mut c = Relay::start(&cc).await;
    c.wait_healthy().await;
    let three = settled(&cloud, &[&a, &b, &c], 60).await;
    assert!(three[0].is_subset(&two[0]) && three[1].is_subset(&two[1]));
    assert!(!three[2].is_empty(), "the new relay got no share");
    let moved: BTreeSet<&String> = two[0]
        .difference(&three[0])
        .chain(two[1].difference(&three[1]))
        .collect();
    assert_eq!(moved, three[2].iter().collect());

    // It stops: once the cloud counts it inactive, its share goes back where it was.
    c.signal("TERM");
    c.wait_exit(Duration::from_secs(20)).await;
    let again = settled(&cloud, &[&a, &b], 60).await;
    assert_eq!(again, two);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_site_is_served_only_by_its_relay() {
    let hq = phones_at(12, Ipv4Addr::new(127, 0, 33, 1), None).await;
    let branch = phones_at(8, Ipv4Addr::new(127, 0, 34, 1), None).await;
    let cloud = fleet_cloud(None).await;
    let site = cloud
        .post(
            "/sim/sites",
            json!({"name": "branch", "subnets": ["127.0.34.0/24"], "isolated": true,
                   "download_path": "https://relay.branch.test/"}),
        )
        .await;
    assert_eq!(site["isolated"], true, "{site}");
    let all: Vec<String> = hq
        .addrs()
        .chain(branch.addrs())
        .map(|a| a.to_string())
        .collect();
    let devices: Vec<Value> = all.iter().map(|a| json!({"address": a})).collect();
    cloud
        .post("/sim/devices", json!({"devices": devices}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mk = |name: &str, addr: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        relay_cfg(&d, &cloud, addr, "")
    };
    let a = Relay::start(&mk("a", "127.0.0.2")).await;
    let b = Relay::start(&mk("b", "127.0.0.3")).await;
    // The branch relay is in the site by its address, and could reach everything by its subnets.
    let s = Relay::start(&mk("s", "127.0.34.250")).await;
    for r in [&a, &b, &s] {
        r.wait_healthy().await;
    }
    let site_relay = relay_id(&s).await;
    let st = s
        .wait_status("the relay knows its site", |st| {
            st["fleet"]["site"] == "branch"
        })
        .await;
    assert_eq!(st["fleet"]["site_isolated"], true, "{st}");
    assert_eq!(
        st["fleet"]["download_path"], "https://relay.branch.test/",
        "{st}"
    );
    let sets = settled(&cloud, &[&a, &b, &s], 20).await;
    let branch_set: BTreeSet<String> = branch.addrs().map(|a| a.to_string()).collect();
    assert_eq!(sets[2], branch_set, "the branch relay polls its site only");
    assert!(sets[0].is_disjoint(&branch_set) && sets[1].is_disjoint(&branch_set));
    let relays = cloud.relays().await;
    let r = relays
        .iter()
        .find(|r| r["relay_id"] == site_relay.as_str())
        .unwrap();
    assert_eq!(
        (r["site"].as_str(), r["devices_assigned"].as_u64()),
        (Some("branch"), Some(8))
    );

    // A task over both sites: the branch's targets go to its relay only, the rest to the others;
    // a target no relay can reach fails at the cloud with the reason.
    let mut targets = all.clone();
    targets.push("10.99.0.1".into());
    let v = cloud
        .post(
            "/sim/tasks",
            json!({"type": "check_sync", "targets": targets}),
        )
        .await;
    let path = format!("/sim/tasks/{}", v["task_id"].as_str().unwrap());
    let t = wait_for("task finished", Duration::from_secs(30), || async {
        let t = cloud.get(&path).await;
        (t["status"] == "done").then_some(t)
    })
    .await;
    assert_eq!(
        (
            t["total"].as_u64(),
            t["success"].as_u64(),
            t["failure"].as_u64()
        ),
        (Some(21), Some(20), Some(1)),
        "{t}"
    );
    for r in t["results"].as_array().unwrap() {
        let target = r["target"].as_str().unwrap();
        if target == "10.99.0.1" {
            assert!(
                r["reason"].as_str().unwrap().contains("no relay can reach"),
                "{r}"
            );
        } else {
            let by_site_relay = r["relay_id"] == site_relay.as_str();
            assert_eq!(by_site_relay, branch_set.contains(target), "{r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_task_loses_its_targets_and_every_target_ends_once() {
    const N: usize = 2000;
    // Phones that take 100-200 ms to answer, so the task is still running when a relay dies.
    let phones = phones_at(N, Ipv4Addr::new(127, 0, 40, 1), Some((100, 200))).await;
    let cloud = fleet_cloud(None).await;
    let dir = tempfile::tempdir().unwrap();
    let mk = |name: &str, addr: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        relay_cfg(&d, &cloud, addr, "monitoring = false\n")
    };
    let mut a = Relay::start(&mk("a", "127.0.0.2")).await;
    let b = Relay::start(&mk("b", "127.0.0.3")).await;
    a.wait_healthy().await;
    b.wait_healthy().await;
    let (a_id, b_id) = (relay_id(&a).await, relay_id(&b).await);
    let targets: Vec<String> = phones.addrs().map(|x| x.to_string()).collect();
    let v = cloud
        .post("/sim/tasks", json!({"type": "reboot", "targets": targets}))
        .await;
    let id = v["task_id"].as_str().unwrap().to_string();
    let path = format!("/sim/tasks/{id}");
    let t = cloud.get(&path).await;
    let leases = t["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 2, "{t}");
    assert!(t["lease_s"].as_u64().is_some(), "{t}");

    // Kill A once it has reported a quarter of its targets.
    wait_for("relay A under way", Duration::from_secs(30), || async {
        let t = cloud.get(&path).await;
        let by_a = t["results"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["relay_id"] == a_id.as_str())
            .count();
        (by_a >= N / 8).then_some(())
    })
    .await;
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(10)).await;

    let t = wait_for(
        "every target at the cloud",
        Duration::from_secs(60),
        || async {
            let t = cloud.get(&path).await;
            (t["status"] == "done").then_some(t)
        },
    )
    .await;
    assert_eq!(
        (
            t["total"].as_u64(),
            t["success"].as_u64(),
            t["failure"].as_u64()
        ),
        (Some(N as u64), Some(N as u64), Some(0)),
        "{}",
        t["status"]
    );
    let results = t["results"].as_array().unwrap();
    let distinct: BTreeSet<&str> = results
        .iter()
        .map(|r| r["target"].as_str().unwrap())
        .collect();
    assert_eq!(
        (results.len(), distinct.len()),
        (N, N),
        "one entry per target"
    );
    let stats = cloud.stats().await;
    assert!(stats["targets_moved"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["duplicate_target_results"], 0, "{stats}");
    let leases = t["leases"].as_array().unwrap();
    assert!(
        leases
            .iter()
            .any(|l| l["relay_id"] == a_id.as_str() && !l["revoked_at"].is_null()),
        "{leases:?}"
    );
    // B finished what A left: its own share and the moved targets.
    let by_b = results
        .iter()
        .filter(|r| r["relay_id"] == b_id.as_str())
        .count();
    assert!(by_b > N / 2, "B ran {by_b}");
    // The window that can run an action twice (docs/protocol.md section 10): the targets A had in
    // flight (at most its 64 at once) and those whose results were stored but not yet at the
    // cloud (those of one round trip: at 64 targets per 100-200 ms, far fewer than 100).
    let twice = (0..N).filter(|&i| phones.state(i).reboots >= 2).count();
    assert!(
        twice <= 64 + 100,
        "{twice} phones rebooted twice: more than A's in-flight targets and one round trip of results"
    );
    let never = (0..N).filter(|&i| phones.state(i).reboots == 0).count();
    assert_eq!(never, 0, "every phone rebooted");
}

/// A minimal HTTPS client that keeps one connection: for "an open connection survives a swap".
struct KeptConnection {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
}

impl KeptConnection {
    async fn open(addr: std::net::SocketAddr, name: &str, ca_pem: &Path) -> KeptConnection {
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(ca_pem).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(
                rustls_pki_types::ServerName::try_from(name.to_string()).unwrap(),
                tcp,
            )
            .await
            .expect("TLS handshake with the relay");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        KeptConnection { sender }
    }

    async fn get(&mut self, name: &str, path: &str) -> u16 {
        let req = http::Request::get(path)
            .header("host", name)
            .body(http_body_util::Empty::new())
            .unwrap();
        use http_body_util::BodyExt as _;
        self.sender
            .ready()
            .await
            .expect("the kept connection is open");
        let resp = self
            .sender
            .send_request(req)
            .await
            .expect("the kept connection answers");
        let status = resp.status().as_u16();
        resp.into_body().collect().await.expect("the whole body");
        status
    }
}

fn b64(path: &Path) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

fn password(pki: &ucrelay_sim::pki::DemoPki) -> String {
    std::fs::read_to_string(&pki.password_file)
        .unwrap()
        .trim()
        .to_string()
}

async fn upload(cloud: &TestCloud, pfx_base64: String, pw: &str, relays: usize) -> Value {
    let v = cloud
        .post(
            "/sim/certificates",
            json!({"pfx_base64": pfx_base64, "password": pw}),
        )
        .await;
    let path = format!("/sim/certificates/{}", v["upload_id"].as_str().unwrap());
    wait_for("every relay answered", Duration::from_secs(20), || async {
        let v = cloud.get(&path).await;
        (v["relays"].as_array().map_or(0, Vec::len) == relays).then_some(v)
    })
    .await
}

fn answer<'a>(v: &'a Value, relay: &str) -> &'a Value {
    v["relays"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["relay_id"] == relay)
        .unwrap_or_else(|| panic!("no answer from {relay}: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_uploaded_in_the_cloud_and_an_image_from_either_relay() {
    const SHARED: &str = "relay.fleet.test";
    let curl = peer("curl");
    let dir = tempfile::tempdir().unwrap();
    let published = dir.path().join("published");
    std::fs::create_dir_all(&published).unwrap();
    let image: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(published.join("sip.ld"), &image).unwrap();
    let cloud = fleet_cloud(Some(&published)).await;
    let pki_dir = |n: &str| {
        let d = dir.path().join(n);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    // One certificate for the fleet: the shared name and each relay's own.
    let good = ucrelay_sim::pki::make_names(
        &pki_dir("good"),
        &[SHARED, "relay-a.fleet.test", "relay-b.fleet.test"],
    )
    .unwrap();
    let edge = |own: &str, ip: &str, pfx: Option<&ucrelay_sim::pki::DemoPki>| {
        let local = pfx
            .map(|p| {
                format!(
                    "pfx = {:?}\npfx_password_file = {:?}\n",
                    p.pfx, p.password_file
                )
            })
            .unwrap_or_default();
        format!(
            "\n[edge]\nlisten = \"{ip}:0\"\nfqdn = [\"{SHARED}\", \"{own}\"]\n{local}\n[images]\nmin_free = \"1MB\"\n"
        )
    };
    let mk = |name: &str, extra: String| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut cfg = RelayConfig::new(&d, &cloud.url());
        cfg.extra = extra;
        cfg
    };
    // A waits for the cloud's certificate; B has a local one, which takes precedence.
    let ca = mk("a", edge("relay-a.fleet.test", "127.0.0.2", None));
    let cb = mk("b", edge("relay-b.fleet.test", "127.0.0.3", Some(&good)));
    let (code, out, _) = run_cli(&["check", "--config", ca.write().to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("waits for the certificate uploaded in the cloud"),
        "{out}"
    );
    let a = Relay::start(&ca).await;
    let b = Relay::start(&cb).await;
    let st = a
        .wait_status("A registered, edge waiting", |s| {
            s["cloud"]["channel"] == "connected"
        })
        .await;
    assert!(
        st["edge"]["certificate_source"]
            .as_str()
            .unwrap()
            .starts_with("none"),
        "{st}"
    );
    assert!(
        st["problems"]
            .to_string()
            .contains("edge HTTPS is not serving"),
        "{st}"
    );
    b.wait_healthy().await;
    let port = |s: &Value| -> u16 {
        s["edge"]["listen"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (pa, pb) = (port(&st), port(&b.status().await));
    let (a_id, b_id) = (relay_id(&a).await, relay_id(&b).await);

    // A bad upload first: every failed rule is named back to the cloud, nothing serves.
    let wrong = ucrelay_sim::pki::make(&pki_dir("wrong"), "other.example").unwrap();
    let v = upload(&cloud, b64(&wrong.pfx), &password(&wrong), 2).await;
    let r = answer(&v, &a_id);
    assert_eq!(r["result"], "refused", "{v}");
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("fqdn {SHARED}")), "{reason}");
    assert!(reason.contains("fqdn relay-a.fleet.test"), "{reason}");
    let failed: Vec<&str> = r["answer"]["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rule"].as_str().unwrap())
        .collect();
    assert_eq!(
        failed,
        [format!("fqdn {SHARED}"), "fqdn relay-a.fleet.test".into()]
    );
    let v = upload(&cloud, b64(&good.pfx), "not the password", 2).await;
    assert!(
        answer(&v, &a_id)["reason"]
            .as_str()
            .unwrap()
            .contains("pfx-password"),
        "{v}"
    );
    assert!(
        a.status().await["edge"]["certificate_source"]
            .as_str()
            .unwrap()
            .starts_with("none")
    );

    // The good one: A installs and serves it, kept 0600 in its state dir; B keeps its own file
    // and says why.
    let v = upload(&cloud, b64(&good.pfx), &password(&good), 2).await;
    assert_eq!(answer(&v, &a_id)["result"], "installed", "{v}");
    let rb = answer(&v, &b_id);
    assert_eq!(rb["result"], "refused", "{v}");
    assert!(
        rb["reason"].as_str().unwrap().contains("takes precedence"),
        "{v}"
    );
    let kept = ca.state_dir().join("cloud-cert/relay.pfx");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let st = a.wait_healthy().await;
    assert!(
        st["edge"]["certificate_source"]
            .as_str()
            .unwrap()
            .starts_with("cloud upload"),
        "{st}"
    );

    // Both relays serve the image under the shared name (curl --resolve, verified chain).
    wait_for("images synced on both", Duration::from_secs(30), || async {
        let ok = |s: Value| s["images"]["images"][0]["state"] == "synced";
        (ok(a.status().await) && ok(b.status().await)).then_some(())
    })
    .await;
    for (ip, p) in [("127.0.0.2", pa), ("127.0.0.3", pb)] {
        let out = std::process::Command::new(&curl)
            .args(["-sS", "--fail", "--cacert"])
            .arg(&good.ca_pem)
            .arg("--resolve")
            .arg(format!("{SHARED}:{p}:{ip}"))
            .arg(format!("https://{SHARED}:{p}/images/sip.ld"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{ip}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == image, "{ip}: the image differs");
    }

    // A connection opened with the first certificate stays up across a second upload; new
    // handshakes get the new certificate.
    let addr_a: std::net::SocketAddr = format!("127.0.0.2:{pa}").parse().unwrap();
    let mut kept = KeptConnection::open(addr_a, SHARED, &good.ca_pem).await;
    assert!(kept.get(SHARED, "/images/sip.ld").await == 200);
    let next = ucrelay_sim::pki::make_names(
        &pki_dir("next"),
        &[SHARED, "relay-a.fleet.test", "relay-b.fleet.test"],
    )
    .unwrap();
    let before = a.status().await["edge"]["certificate_sha256"].clone();
    let v = upload(&cloud, b64(&next.pfx), &password(&next), 2).await;
    assert_eq!(answer(&v, &a_id)["result"], "installed", "{v}");
    assert_ne!(a.status().await["edge"]["certificate_sha256"], before);
    assert_eq!(
        kept.get(SHARED, "/images/sip.ld").await,
        200,
        "old connection kept"
    );
    let _new = KeptConnection::open(addr_a, SHARED, &next.ca_pem).await;
}
