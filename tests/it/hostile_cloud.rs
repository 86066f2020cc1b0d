//! A hostile cloud against the real relay: manifest URLs aimed at the relay's own loopback
//! services, at names that resolve there, at link-local and private addresses and at the
//! relay's own addresses, plain-http origins, redirects into the LAN and redirect loops, all
//! watched by canary origins that must see no connection and no token; and the honest paths a
//! real cloud uses, which must keep working: pre-signed URLs with a query on the cloud's origin
//! and, on another origin over HTTPS (a CDN in a network namespace), direct or by redirect,
//! without the token.
//!
//! Also the cloud connection itself: a name whose first address swallows packets must not
//! cost the whole connect timeout (Happy Eyeballs), shown in a namespace whose /etc/hosts
//! names a black-holed IPv6 address before a working IPv4 one.

use crate::netns::NetNs;
use crate::support::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

const LIMIT: Duration = Duration::from_secs(20);

fn publish(dir: &Path, name: &str, size: usize) -> Vec<u8> {
    let mut data = vec![0u8; size];
    fastrand::fill(&mut data);
    std::fs::write(dir.join(name), &data).unwrap();
    data
}

async fn set_faults(cloud: &TestCloud, faults: Value) {
    let r = cloud.post("/sim/images/faults", faults.clone()).await;
    assert!(r.get("error").is_none(), "faults {faults} refused: {r}");
}

fn image<'a>(images: &'a Value, id: &str) -> &'a Value {
    images["images"]
        .as_array()
        .and_then(|l| l.iter().find(|i| i["id"] == id))
        .unwrap_or_else(|| panic!("{id} not listed: {images}"))
}

/// Waits until every image in `ids` is settled (synced or failed) and returns the images report.
async fn settled(relay: &Relay, ids: &[&str]) -> Value {
    wait_for("every image synced or failed", LIMIT, || async {
        let i = relay.status().await["images"].clone();
        let list = i["images"].as_array()?;
        let done = ids.iter().all(|id| {
            list.iter()
                .any(|x| x["id"] == *id && (x["state"] == "synced" || x["state"] == "failed"))
        });
        done.then_some(i)
    })
    .await
}

/// The relay config of these tests: the download agent, device subnets on loopback (where the
/// simulated phones of other tests live), and the given extra `[cloud]` lines.
fn config(dir: &Path, cloud: &TestCloud, extra_cloud: &str) -> RelayConfig {
    let mut cfg = RelayConfig::new(dir, &cloud.url());
    cfg.extra_cloud.push_str(extra_cloud);
    cfg.extra = "\n[images]\n\n[devices]\nsubnets = [\"127.0.0.0/8\"]\n".into();
    cfg
}

#[tokio::test]
async fn manifest_urls_cannot_reach_the_lan_nor_collect_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let published = dir.path().join("published");
    std::fs::create_dir_all(&published).unwrap();
    let names = [
        "loop", "name", "plain", "meta", "hop", "circle", "priv", "signed",
    ];
    let mut data = std::collections::BTreeMap::new();
    for n in names {
        data.insert(n, publish(&published, n, 3000));
    }
    let mut args = cloud_args();
    args.images = Some(published.clone());
    let cloud = TestCloud::start(args).await;
    // The canary: a second reference cloud on loopback with the same files, serving them to
    // anyone. The relay must never open a connection to it.
    let mut canary_args = cloud_args();
    canary_args.images = Some(published.clone());
    let canary = TestCloud::start(canary_args).await;
    set_faults(&canary, json!({"anonymous": true})).await;
    let c = canary.addr.port();

    // The cloud's own files are pre-signed (a query it checks); the rest aim at the LAN.
    set_faults(
        &cloud,
        json!({
            "signature": "own-sig",
            "urls": {
                "loop": format!("https://127.0.0.1:{c}/files/loop"),
                "name": format!("https://localhost:{c}/files/name"),
                "plain": format!("http://127.0.0.1:{c}/files/plain"),
                "meta": "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
                "hop": "/files/hop?signature=own-sig",
                "circle": "/files/circle?signature=own-sig",
                "priv": "https://10.255.255.1/files/priv",
                "signed": "/files/signed?expires=2030-01-01T00%3A00%3A00Z&signature=own-sig",
            },
            "redirects": {
                "hop": format!("https://127.0.0.1:{c}/files/hop"),
                "circle": "/files/circle?signature=own-sig",
            }
        }),
    )
    .await;

    let cfg = config(dir.path(), &cloud, "");
    // The test's own calls to the canary are counted too: what it has seen so far.
    let before = canary.stats().await["connections"].as_u64().unwrap();
    let relay = Relay::start(&cfg).await;
    let started = Instant::now();
    let images = settled(&relay, &names).await;
    let report = |id: &str| {
        let i = image(&images, id);
        (
            i["state"].as_str().unwrap_or("").to_string(),
            i["reason"].as_str().unwrap_or("").to_string(),
        )
    };

    // The honest path: a pre-signed URL with a query on the cloud's own origin syncs.
    assert_eq!(report("signed").0, "synced", "{images}");
    // Every attack fails at once (a refusal is not retried), saying why.
    for (id, words) in [
        ("loop", "127.0.0.1 is a loopback address"),
        (
            "name",
            "localhost resolves only to addresses the relay never fetches from",
        ),
        ("plain", "must use https"),
        ("meta", "169.254.169.254 is a link-local address"),
        ("hop", "127.0.0.1 is a loopback address"),
        ("circle", "more than 5 redirects"),
        ("priv", "10.255.255.1 is a private address"),
    ] {
        let (state, reason) = report(id);
        assert_eq!(state, "failed", "{id}: {images}");
        assert!(
            reason.contains("refused") && reason.contains(words),
            "{id}: {reason}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusals are not retried with backoff: {:?}",
        started.elapsed()
    );

    // The canary saw nothing at all: not a connection, let alone a token.
    let stats = canary.stats().await;
    assert_eq!(
        stats["connections"].as_u64(),
        Some(before + 1),
        "the canary was contacted by someone else than this test: {stats}"
    );
    // The cloud itself saw its token on its own files only, and served the pre-signed one.
    let files = cloud.get("/sim/images").await;
    let served = |id: &str| {
        files
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(served("signed")["bytes_served"], 3000, "{files}");
    // The first request and 5 redirects in each sync round (another round may have begun).
    let circle = served("circle")["requests"].as_u64().unwrap();
    assert!(circle >= 6, "{files}");
    // `ucrelay images` says it plainly too.
    let (code, out, _) = run_cli(&["images", "--socket", relay.socket.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refused: 127.0.0.1 is a loopback address"),
        "{out}"
    );
    drop(relay);
    canary.stop().await;
    cloud.stop().await;
}

/// The reference cloud run inside `ns` as a CDN origin: HTTPS on the namespace's address with a
/// certificate of the test CA, plain HTTP beside it for the test API. Returns the child and
/// (plain port, TLS port).
async fn cdn_in(
    ns: &NetNs,
    published: &Path,
    cert: &(PathBuf, PathBuf),
) -> (tokio::process::Child, u16, u16) {
    let ip = ns.ns_ip.to_string();
    let mut child = ns
        .command(bin())
        .args(["sim", "cloud", "--tenant", "cdn", "--pin", "0"])
        .args(["--listen", &format!("{ip}:0")])
        .args(["--tls-listen", &format!("{ip}:0")])
        .arg("--tls-cert")
        .arg(&cert.0)
        .arg("--tls-key")
        .arg(&cert.1)
        .arg("--images")
        .arg(published)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the CDN in the namespace");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut plain, mut tls) = (0, 0);
    while plain == 0 || tls == 0 {
        let line = tokio::time::timeout(LIMIT, lines.next_line())
            .await
            .expect("the CDN says where it listens")
            .unwrap()
            .expect("the CDN prints its addresses");
        let port = |l: &str| l.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        if let Some(rest) = line.strip_prefix("ucrelay sim cloud listening on https://") {
            tls = port(rest).unwrap();
        } else if let Some(rest) = line.strip_prefix("ucrelay sim cloud listening on http://") {
            plain = port(rest).unwrap();
        }
    }
    (child, plain, tls)
}

#[tokio::test]
#[ignore = "needs root: the CDN runs in a network namespace the test creates"]
async fn files_on_another_origin_come_over_https_without_the_token() {
    let ns = NetNs::create();
    let dir = tempfile::tempdir().unwrap();
    let published = dir.path().join("published");
    std::fs::create_dir_all(&published).unwrap();
    let a = publish(&published, "direct", 200_000);
    let b = publish(&published, "redirected", 150_000);
    publish(&published, "own", 1000);
    let pki =
        ucrelay_sim::pki::make_with_origins(dir.path(), "relay.test", &[&ns.ns_ip.to_string()])
            .unwrap();
    let (_cdn_child, cdn_plain, cdn_tls) = cdn_in(&ns, &published, &pki.origins[0]).await;
    let cdn = client_at(ns.ns_ip, cdn_plain);
    // A CDN origin: pre-signed URLs only, credentials refused (and counted).
    let r = ucrelay_sim::client::post(
        cdn,
        "/sim/images/faults",
        json!({"anonymous": true, "signature": "cdn-sig"}),
    )
    .await
    .unwrap();
    assert!(r.get("error").is_none(), "{r}");

    let mut args = cloud_args();
    args.images = Some(published.clone());
    let cloud = TestCloud::start(args).await;
    let origin = format!("https://{}:{cdn_tls}", ns.ns_ip);
    set_faults(
        &cloud,
        json!({
            "urls": {
                "direct": format!("{origin}/files/direct?expires=2030&signature=cdn-sig"),
                // This machine's end of the veth pair: one of the relay's own addresses.
                "own": format!("https://{}:{cdn_tls}/files/own", ns.host_ip),
            },
            // The cloud's own file answers with a redirect to a pre-signed CDN URL.
            "redirects": {"redirected": format!("{origin}/files/redirected?signature=cdn-sig")},
        }),
    )
    .await;
    // The relay trusts the test CA for origins other than the (plain http) cloud.
    let ca = format!("ca_file = {:?}\n", pki.ca_pem);
    let cfg = config(dir.path(), &cloud, &ca);
    let relay = Relay::start(&cfg).await;
    let images = settled(&relay, &["direct", "redirected", "own"]).await;
    assert_eq!(image(&images, "direct")["state"], "synced", "{images}");
    assert_eq!(image(&images, "redirected")["state"], "synced", "{images}");
    let own = image(&images, "own");
    assert_eq!(own["state"], "failed", "{images}");
    assert!(
        own["reason"].as_str().unwrap().contains(&format!(
            "{} is one of the relay's own addresses",
            ns.host_ip
        )),
        "{own}"
    );
    // The CDN served both files and never saw the token.
    let list = ucrelay_sim::client::get(cdn, "/sim/images").await.unwrap();
    for (id, size) in [("direct", a.len()), ("redirected", b.len())] {
        let f = list
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == id)
            .unwrap();
        assert_eq!(f["authorization_seen"], 0, "the token reached the CDN: {f}");
        assert_eq!(f["bytes_served"].as_u64(), Some(size as u64), "{f}");
    }
    // The cached copies are the published bytes.
    let cache = cfg.state_dir().join("images/files");
    for (id, bytes) in [("direct", &a), ("redirected", &b)] {
        let sha = image(&images, id)["files"][0]["sha256"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(&std::fs::read(cache.join(&sha)).unwrap(), bytes, "{id}");
    }
    drop(relay);
    cloud.stop().await;
}

fn client_at(ip: std::net::Ipv4Addr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from((ip, port))
}

#[tokio::test]
#[ignore = "needs root: the relay runs in a network namespace with its own /etc/hosts"]
async fn a_black_holed_first_address_does_not_cost_the_connect_timeout() {
    let ns = NetNs::create();
    // The cloud's name resolves to an IPv6 address that swallows every packet (a dummy
    // interface drops what it is given: no answer, no error), listed first, then to the working
    // IPv4 address of this machine's end of the veth pair.
    //
    // The hole is a veth pair with both ends in the namespace: what goes out of `hole0` to
    // 2001:db8:ffff::1 (a fixed neighbour entry, so no neighbour discovery can fail and report
    // an error) arrives on `hole1` addressed to a link-layer address that is not its own, and is
    // dropped there without a word.
    ns.ip(&[
        "link", "add", "hole0", "type", "veth", "peer", "name", "hole1",
    ]);
    ns.ip(&[
        "addr",
        "add",
        "2001:db8:ffff::2/64",
        "dev",
        "hole0",
        "nodad",
    ]);
    ns.ip(&["link", "set", "hole0", "up"]);
    ns.ip(&["link", "set", "hole1", "up"]);
    ns.ip(&[
        "-6",
        "neigh",
        "add",
        "2001:db8:ffff::1",
        "lladdr",
        "02:00:5e:10:00:01",
        "dev",
        "hole0",
        "nud",
        "permanent",
    ]);
    ns.etc_file(
        "hosts",
        &format!(
            "127.0.0.1 localhost\n2001:db8:ffff::1 cloud.test\n{} cloud.test\n",
            ns.host_ip
        ),
    );
    let listener = tokio::net::TcpListener::bind((ns.host_ip, 0))
        .await
        .unwrap();
    let cloud = TestCloud::start_on(listener, cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(
        dir.path(),
        &format!("http://cloud.test:{}", cloud.addr.port()),
    );
    // A connect timeout far above what the test allows: only racing gets in on time.
    cfg.extra_cloud = "reconnect_max = \"500ms\"\npin_retry_interval = \"300ms\"\n\
                       request_timeout = \"5s\"\nconnect_timeout = \"30s\"\n"
        .into();
    cfg.heartbeat_interval = "300ms";
    let started = Instant::now();
    let relay = Relay::start_with(&cfg, ns.command(bin())).await;
    let s = relay
        .wait_status("registered, channel up and three heartbeats", |s| {
            s["cloud"]["channel"] == "connected" && s["cloud"]["heartbeats_ok"].as_u64() >= Some(3)
        })
        .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "a black-holed first address held the relay up for {took:?}: {s}"
    );
    assert_eq!(s["cloud"]["heartbeats_failed"], 0, "{s}");
    // The IPv6 address was tried first (and swallowed what it got), so the race was real.
    assert!(
        ns.link_stat("hole0", "tx", "packets") > 0,
        "no packet went to the black-holed address: the test did not test racing"
    );
    drop(relay);
    cloud.stop().await;
}
