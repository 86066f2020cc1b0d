//! `[admin].metrics_listen`: Prometheus text that promtool accepts, `/healthz`, and `/ready`
//! following registration (503 with the reason while the PIN is refused, 200 once registered).

use crate::support::*;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.0 GET; returns (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("metrics answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

#[tokio::test]
async fn metrics_health_and_readiness() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let pki = ucrelay_sim::pki::make(dir.path(), "relay.test").unwrap();
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, "000000\n").unwrap(); // wrong at first
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.pin_line = format!("pin_file = {pin_file:?}");
    cfg.extra = format!(
        "metrics_listen = \"127.0.0.1:0\"\n\n[edge]\nlisten = \"127.0.0.1:0\"\nfqdn = [\"relay.test\"]\n\
         pfx = {:?}\npfx_password_file = {:?}\n\n[provisioning]\nupstream = \"http://127.0.0.1:9\"\n\n\
         [devices]\nsubnets = [\"127.0.0.0/8\"]\n",
        pki.pfx, pki.password_file
    );
    let relay = Relay::start(&cfg).await;
    let status = relay
        .wait_status("PIN rejected", |s| {
            s["cloud"]["registration"] == "pin_rejected"
        })
        .await;
    let addr: SocketAddr = status["metrics_listen"].as_str().unwrap().parse().unwrap();

    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (code, body) = get(addr, "/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("PIN rejected"), "{body}");

    // The right PIN: registered, channel up, ready.
    std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
    let healthy = relay.wait_healthy().await;
    wait_for("ready", Duration::from_secs(10), || async {
        (get(addr, "/ready").await.0 == 200).then_some(())
    })
    .await;

    // Something for each family: a command result, a device request through the edge (502: the
    // upstream port is closed).
    cloud.command("ping", json!({"n": 1})).await;
    let edge: SocketAddr = healthy["edge"]["listen"].as_str().unwrap().parse().unwrap();
    let out = tokio::process::Command::new(peer("curl"))
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&pki.ca_pem)
        .args([
            "--resolve",
            &format!("relay.test:{}:127.0.0.1", edge.port()),
            &format!("https://relay.test:{}/0004f2000001.cfg", edge.port()),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "502");

    let (code, text) = wait_for(
        "metrics with the command counted",
        Duration::from_secs(10),
        || async {
            let (code, text) = get(addr, "/metrics").await;
            text.contains("ucrelay_commands_total{name=\"ping\",result=\"success\"} 1")
                .then_some((code, text))
        },
    )
    .await;
    assert_eq!(code, 200);
    for want in [
        "# TYPE ucrelay_heartbeats_total counter",
        "ucrelay_heartbeats_total{result=\"ok\"}",
        "ucrelay_cloud_channel_up 1",
        "ucrelay_cloud_registered 1",
        "ucrelay_cloud_reconnects_total",
        "ucrelay_edge_connections_open",
        "ucrelay_edge_requests_total{class=\"5xx\"} 1",
        "ucrelay_edge_request_duration_seconds_count{class=\"5xx\"} 1",
        "ucrelay_edge_request_duration_seconds_bucket{class=\"5xx\",le=\"+Inf\"} 1",
        "ucrelay_certificate_not_after_seconds",
        "ucrelay_build_info{version=",
    ] {
        assert!(text.contains(want), "scrape lacks {want:?}:\n{text}");
    }
    // The process figures are the relay's own: compared with what /proc says of its pid.
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("scrape lacks {name}:\n{text}"))
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let pid = relay.child.id().expect("the relay runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap()
        * 1024.0;
    let scraped = value("process_resident_memory_bytes");
    assert!(
        (scraped - rss).abs() < rss * 0.5,
        "scrape says {scraped} resident, /proc/{pid} says {rss}"
    );
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    assert!((value("process_open_fds") - fds).abs() <= 8.0, "{fds} open");
    assert!(value("process_threads") >= 2.0);
    // Large blocks count at their mapped size, resident or not: bounded by the virtual size.
    let in_use = value("ucrelay_heap_in_use_bytes");
    assert!(
        in_use > 100_000.0 && in_use < value("process_virtual_memory_bytes"),
        "heap in use {in_use}"
    );
    // `status` carries the same account.
    let m = &healthy["memory"];
    assert!(m["resident_bytes"].as_u64().unwrap() > 1 << 20, "{m}");
    assert!(m["heap_in_use_bytes"].as_u64().unwrap() > 100_000, "{m}");
    assert!(m["open_fds"].as_u64().unwrap() >= 3, "{m}");
    let started = value("process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started < now && now - started < 600.0,
        "started {started}, now {now}"
    );

    {
        let tool = peer("promtool");
        let mut child = tokio::process::Command::new(tool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .await
            .unwrap();
        let out = child.wait_with_output().await.unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn idle_clients_cannot_hold_the_metrics_listener() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = "metrics_listen = \"127.0.0.1:0\"\n".into();
    let relay = Relay::start(&cfg).await;
    let status = relay.wait_healthy().await;
    let addr: SocketAddr = status["metrics_listen"].as_str().unwrap().parse().unwrap();

    // A client that opens connections and never sends a request: the cap (32) holds...
    let mut idle = Vec::new();
    for _ in 0..32 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(3), extra.read(&mut b))
        .await
        .expect("one past the cap is closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // ...and the header timeout (5 s) frees every slot, so the scraper gets in again.
    let started = std::time::Instant::now();
    for mut c in idle {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b))
            .await
            .expect("an idle connection is closed by the header timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(get(addr, "/healthz").await.0, 200);
    drop(relay);
    cloud.stop().await;
}

#[tokio::test]
async fn check_warns_about_metrics_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), "https://cloud.example.com");
    cfg.extra = "metrics_listen = \"0.0.0.0:9464\"\n".into();
    let path = cfg.write();
    let (code, out, _) = run_cli(&["check", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, 0, "a warning, not a failure: {out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("warn") && l.contains("0.0.0.0:9464 is beyond loopback")),
        "{out}"
    );
}
