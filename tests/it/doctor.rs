//! `ucrelay doctor` against the reference cloud: reachable, unreachable (a closed port), silent
//! (accepts but never answers), a wrong PIN, and next to a running relay.

use crate::support::*;
use serde_json::Value;
use std::time::{Duration, Instant};

async fn doctor(config: &std::path::Path) -> (i32, Value, Duration) {
    let t0 = Instant::now();
    let (code, out, err) =
        run_cli(&["doctor", "--json", "--config", config.to_str().unwrap()]).await;
    let took = t0.elapsed();
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (code, v, took)
}

fn step<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {report}"))
}

fn level(report: &Value, name: &str) -> String {
    step(report, name)["level"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn reachable_cloud_passes() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = RelayConfig::new(dir.path(), &cloud.url()).write();
    let (code, r, _) = doctor(&config).await;
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["ok"], true);
    assert_eq!(level(&r, "config"), "ok");
    assert_eq!(level(&r, "dns"), "skip", "the cloud is an IP literal");
    assert_eq!(level(&r, "tcp"), "ok");
    assert_eq!(level(&r, "pin"), "ok");
    assert_eq!(level(&r, "clock"), "ok", "{r:#}");
    assert_eq!(level(&r, "disk"), "ok");
    // No relay runs: said, but not a failure.
    assert_eq!(level(&r, "admin-socket"), "warn");
    assert!(step(&r, "admin-socket")["hint"].is_string());
    let pin = step(&r, "pin")["message"].as_str().unwrap().to_string();
    assert!(pin.contains("throw-away"), "{pin}");
    assert!(!r.to_string().contains(PIN), "the PIN must not be printed");

    // The text form: one line per step, a fix under each problem.
    let (code, out, _) = run_cli(&["doctor", "--config", config.to_str().unwrap()]).await;
    assert_eq!(code, 0);
    assert!(out.contains("ok    pin: "), "{out}");
    assert!(
        out.contains("warn  admin-socket: ") && out.contains("      fix: "),
        "{out}"
    );
}

#[tokio::test]
async fn unreachable_cloud_fails_fast_with_hints() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let config = RelayConfig::new(dir.path(), &format!("http://{addr}")).write();
    let (code, r, took) = doctor(&config).await;
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(level(&r, "tcp"), "fail");
    let tcp = step(&r, "tcp");
    assert!(
        tcp["message"].as_str().unwrap().contains(&addr.to_string()),
        "{tcp}"
    );
    assert!(
        tcp["hint"].as_str().unwrap().contains("[cloud].url"),
        "{tcp}"
    );
    assert_eq!(level(&r, "pin"), "skip");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[tokio::test]
async fn silent_cloud_is_bounded_by_deadlines() {
    // Accepts connections, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = RelayConfig::new(dir.path(), &format!("http://{addr}")).write();
    let (code, r, took) = doctor(&config).await;
    hold.abort();
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(level(&r, "tcp"), "ok");
    assert_eq!(level(&r, "pin"), "fail");
    assert!(
        step(&r, "pin")["message"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{r:#}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[tokio::test]
async fn wrong_pin_fails_the_pin_step() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.pin_line = "pin = \"999999\"".into();
    let (code, r, _) = doctor(&cfg.write()).await;
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(level(&r, "tcp"), "ok");
    let pin = step(&r, "pin");
    assert_eq!(pin["level"], "fail");
    assert!(
        pin["message"].as_str().unwrap().contains("PIN rejected"),
        "{pin}"
    );
    assert!(pin["hint"].as_str().unwrap().contains("pin_file"), "{pin}");
    assert!(
        !r.to_string().contains("999999"),
        "the PIN must not be printed"
    );
}

#[tokio::test]
async fn next_to_a_running_relay() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig::new(dir.path(), &cloud.url());
    let relay = Relay::start(&cfg).await;
    let status = relay.wait_healthy().await;
    let (code, r, _) = doctor(&cfg.dir.join("relay.toml")).await;
    assert_eq!(code, 0, "{r:#}");
    let pin = step(&r, "pin")["message"].as_str().unwrap().to_string();
    assert!(pin.contains("running relay's id"), "{pin}");
    let sock = step(&r, "admin-socket")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        sock.contains("mode 0660") && sock.contains("the relay answers"),
        "{sock}"
    );
    // The relay has no device list endpoint to ask (or no devices): skipped, not failed.
    assert_eq!(level(&r, "devices"), "skip");
    // The cloud still sees one relay: doctor registered under its id.
    let relays = cloud.relays().await;
    assert_eq!(relays.len(), 1, "{relays:?}");
    assert_eq!(relays[0]["relay_id"], status["relay_id"]);
    relay.wait_healthy().await;
}

/// A TLS front for the reference cloud, with a certificate from a private CA (as a private cloud
/// or a TLS-inspecting proxy would present).
async fn tls_front(
    dir: &std::path::Path,
    cloud: std::net::SocketAddr,
) -> (u16, std::path::PathBuf, tokio::task::JoinHandle<()>) {
    let pki = ucrelay_sim::pki::make(dir, "localhost").unwrap();
    let report = ucrelay_relay::edge::cert::load(
        &pki.pfx,
        Some(&pki.password_file),
        &["localhost".to_string()],
        std::time::SystemTime::now(),
    );
    let slot = ucrelay_relay::edge::tls::CertSlot::new(
        report.cert.expect("test certificate loads"),
        ucrelay_relay::edge::tls::CertSource::File(pki.pfx.clone()),
    );
    let acceptor =
        tokio_rustls::TlsAcceptor::from(ucrelay_relay::edge::tls::server_config(slot).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await
                    && let Ok(mut up) = tokio::net::TcpStream::connect(cloud).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    });
    (port, pki.ca_pem, task)
}

#[tokio::test]
async fn tls_from_a_private_ca_is_named_and_trusted_only_through_ca_file() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let (port, ca, front) = tls_front(dir.path(), cloud.addr).await;

    // Without ca_file: the handshake fails, naming the issuer, with the fix.
    let mut cfg = RelayConfig::new(dir.path(), &format!("https://localhost:{port}"));
    let (code, r, _) = doctor(&cfg.write()).await;
    assert_eq!(code, 1, "{r:#}");
    let tls = step(&r, "tls");
    assert_eq!(tls["level"], "fail", "{r:#}");
    assert!(
        tls["message"].as_str().unwrap().contains("ucrelay demo CA"),
        "{tls}"
    );
    assert!(tls["hint"].as_str().unwrap().contains("ca_file"), "{tls}");
    assert_eq!(level(&r, "pin"), "skip");

    // With the private CA in ca_file: works, but is flagged as not a public CA.
    cfg.extra_cloud.push_str(&format!("ca_file = {ca:?}\n"));
    let (code, r, _) = doctor(&cfg.write()).await;
    front.abort();
    assert_eq!(code, 0, "{r:#}");
    let tls = step(&r, "tls");
    assert_eq!(tls["level"], "warn", "{r:#}");
    let msg = tls["message"].as_str().unwrap();
    assert!(
        msg.contains("ucrelay demo CA") && msg.contains("not a public CA"),
        "{msg}"
    );
    assert_eq!(level(&r, "pin"), "ok", "{r:#}");
    assert_eq!(level(&r, "clock"), "ok", "{r:#}");
}
