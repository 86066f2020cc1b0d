//! The daemon under `Type=notify`: a datagram socket stands in for systemd's notify socket, and the
//! relay must say READY=1 only once its listeners accept connections, pet the watchdog, mark a
//! reload, and say STOPPING=1 on SIGTERM.

use crate::support::*;
use serde_json::Value;
use std::process::Stdio;
use std::time::Duration;
use tokio::net::UnixDatagram;
use tokio::process::Command;

/// Reads notify datagrams until one has the line `line`; returns that message.
async fn until(sock: &UnixDatagram, line: &str, seen: &mut Vec<String>) -> String {
    until_match(sock, line, seen, |l| l == line).await
}

/// Reads notify datagrams until one has a line starting with `prefix`; returns that line.
async fn until_prefix(sock: &UnixDatagram, prefix: &str, seen: &mut Vec<String>) -> String {
    let msg = until_match(sock, prefix, seen, |l| l.starts_with(prefix)).await;
    msg.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap()
        .to_string()
}

async fn until_match(
    sock: &UnixDatagram,
    line: &str,
    seen: &mut Vec<String>,
    pred: impl Fn(&str) -> bool,
) -> String {
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {line} from the relay within 20 s; saw {seen:?}"))
            .unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(msg.clone());
        if msg.lines().any(&pred) {
            return msg;
        }
    }
}

#[tokio::test]
async fn ready_only_once_listeners_accept_then_watchdog_reload_and_stopping() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let pki = ucrelay_sim::pki::make(dir.path(), "relay.test").unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = format!(
        "\n[edge]\nlisten = \"127.0.0.1:0\"\nlegacy_http_listen = \"127.0.0.1:0\"\nfqdn = [\"relay.test\"]\n\
         pfx = {:?}\npfx_password_file = {:?}\n\n[provisioning]\nupstream = \"http://127.0.0.1:9\"\n\n\
         [devices]\nsubnets = [\"127.0.0.0/8\"]\n",
        pki.pfx, pki.password_file
    );
    let config = cfg.write();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();

    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        // A short watchdog so the test sees it petted (every 200 ms).
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("relay.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut seen = Vec::new();
    let ready = until(&notify, "READY=1", &mut seen).await;
    // Nothing but status lines before readiness.
    assert_eq!(seen.len(), 1, "READY=1 must be the first message: {seen:?}");
    assert!(ready.contains("STATUS="), "{ready}");
    // At READY=1 the admin socket already takes connections...
    tokio::net::UnixStream::connect(cfg.socket())
        .await
        .expect("admin socket accepts connections when READY=1 arrives");
    // ...and so do both edge listeners, on the ports they bound.
    let status: Value = ucrelay_relay::ops::admin::get_json(&cfg.socket(), "/v1/status")
        .await
        .unwrap();
    for key in ["listen", "legacy_http_listen"] {
        let addr: std::net::SocketAddr = status["edge"][key]
            .as_str()
            .unwrap_or_else(|| panic!("edge.{key} in {status}"))
            .parse()
            .unwrap();
        assert_ne!(addr.port(), 0);
        tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("edge {key} {addr} refused at READY=1: {e}"));
    }

    // The watchdog is petted while the store answers.
    until(&notify, "WATCHDOG=1", &mut seen).await;
    // The status line follows the registration (it may already have come with READY=1, when
    // the relay registered before its listeners were up).
    const REGISTERED: &str = "STATUS=registered, command channel connected";
    let earlier = seen
        .iter()
        .flat_map(|m| m.lines())
        .find(|l| l.starts_with(REGISTERED))
        .map(str::to_string);
    let line = match earlier {
        Some(l) => l,
        None => until_prefix(&notify, REGISTERED, &mut seen).await,
    };
    assert!(line.contains("edge on 127.0.0.1:"), "{line}");

    // SIGHUP: RELOADING=1, then READY=1 again.
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let reloading = until(&notify, "RELOADING=1", &mut seen).await;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    until(&notify, "READY=1", &mut seen).await;

    // SIGTERM: STOPPING=1, then a clean exit.
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    until(&notify, "STOPPING=1", &mut seen).await;
    let code = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("relay exits after SIGTERM")
        .unwrap()
        .code();
    assert_eq!(code, Some(0));
    // Text logs into a file (as into the journal) carry no colour codes.
    let log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap();
    assert!(log.contains("ucrelay starting"), "{log}");
    assert!(!log.contains('\x1b'), "ANSI escape in logs:\n{log}");
}
