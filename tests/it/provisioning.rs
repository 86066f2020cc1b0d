//! A phone provisioning through the relay's edge to the reference cloud's provisioning tree: Digest
//! end to end, what the proxy adds and rewrites, and streaming (a 100 MB upload does not sit in the
//! relay's memory).

use crate::support::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use ucrelay_sim::phone::ProvClient;

const FQDN: &str = "relay.test";
const MAC: &str = "0004f2e765da";

/// Peak resident memory of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn phone_provisions_through_the_edge_with_digest_and_streams_a_100mb_upload() {
    let dir = tempfile::tempdir().unwrap();
    let prov = dir.path().join("prov");
    std::fs::create_dir_all(&prov).unwrap();
    let cfg_body = "<APPLICATION APP_FILE_PATH=\"sip.ld\" CONFIG_FILES=\"common.cfg\"/>\n";
    std::fs::write(prov.join("000000000000.cfg"), cfg_body).unwrap();
    let mut args = cloud_args();
    args.provisioning = Some(prov.clone());
    let cloud = TestCloud::start(args).await;
    let pki = ucrelay_sim::pki::make(dir.path(), FQDN).unwrap();

    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = format!(
        "\n[edge]\nlisten = \"127.0.0.1:0\"\nfqdn = [\"{FQDN}\"]\npfx = {:?}\npfx_password_file = {:?}\n\n[provisioning]\nupstream = \"{}\"\n\n[devices]\nsubnets = [\"127.0.0.0/8\"]\n\n[diagnostics]\ndevice_logs_max_per_device = \"200MB\"\n",
        pki.pfx,
        pki.password_file,
        cloud.url()
    );
    let relay = Relay::start(&cfg).await;
    let status = relay
        .wait_status("edge up", |s| s["edge"]["listen"].is_string())
        .await;
    let edge: std::net::SocketAddr = status["edge"]["listen"].as_str().unwrap().parse().unwrap();
    let phone = ProvClient::new(&format!("https://{FQDN}:{}/", edge.port()), MAC)
        .unwrap()
        .with_root_ca_pem(&pki.ca_pem)
        .unwrap()
        .with_resolve(FQDN, edge);

    // The connectivity test: challenged, then Digest through the proxy, body unchanged.
    let r = phone.get("/000000000000.cfg").await.unwrap();
    assert!(r.challenged, "the 401 challenge must reach the phone");
    assert_eq!((r.status, r.auth_used), (200, "digest"));
    assert_eq!(r.body, cfg_body.as_bytes());

    let log = cloud.get("/sim/provisioning/log").await;
    let last: &Value = log.as_array().unwrap().last().unwrap();
    assert_eq!(last["auth"], "digest");
    assert_eq!(last["status"], 200);
    assert_eq!(last["x_forwarded_for"], "127.0.0.1");
    assert_eq!(last["x_forwarded_proto"], "https");
    assert_eq!(last["x_forwarded_host"], format!("{FQDN}:{}", edge.port()));
    assert_eq!(
        last["host"],
        cloud.addr.to_string(),
        "Host is rewritten to the upstream's"
    );
    assert!(
        last["user_agent"]
            .as_str()
            .unwrap()
            .contains(&format!("(SN:{MAC})"))
    );

    // 100 MB up through the edge: byte-identical at the server, and the relay's peak memory does
    // not grow by anything like the body size.
    // The tenant does not take device logs: the relay keeps a copy of the 100 MB log below, teed
    // as it streams past.
    cloud
        .post(
            "/sim/tenants/acme/settings",
            serde_json::json!({"log_upload": false}),
        )
        .await;
    relay
        .wait_status("the relay keeps device logs", |s| {
            s["diagnostics"]["device_logs_collecting"] == true
        })
        .await;
    let pid = relay.child.id().unwrap();
    let before = vm_hwm_kib(pid);
    let body: Vec<u8> = (0..100 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let want = Sha256::digest(&body);
    let upload = dir.path().join("upload.bin");
    std::fs::write(&upload, &body).unwrap();
    drop(body);
    // curl as the device: with --digest it sends the first, challenged request without the body,
    // as a real Digest client does, then streams the file.
    let resolve = format!("{FQDN}:{}:127.0.0.1", edge.port());
    let url = format!("https://{FQDN}:{}/{MAC}-app.log", edge.port());
    let out = tokio::process::Command::new(peer("curl"))
        .args([
            "-sS",
            "--digest",
            "-u",
            "PlcmSpIp:PlcmSpIp",
            "--resolve",
            &resolve,
        ])
        .args(["-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&pki.ca_pem)
        .arg("-T")
        .arg(&upload)
        .arg(&url)
        .output()
        .await
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        code == "201" || code == "204",
        "PUT status {code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = std::fs::read(prov.join(format!("{MAC}-app.log"))).unwrap();
    assert_eq!(stored.len(), 100 * 1024 * 1024);
    assert_eq!(
        Sha256::digest(&stored),
        want,
        "upload arrives byte-identical"
    );
    let grown_mib = (vm_hwm_kib(pid).saturating_sub(before)) / 1024;
    assert!(
        grown_mib < 32,
        "relay peak RSS grew {grown_mib} MiB for a 100 MB upload teed into the log store: not streaming"
    );
    // The relay's copy is the same bytes.
    let kept_dir = cfg.state_dir().join("device-logs").join(MAC);
    let kept = wait_for(
        "the relay's copy of the log",
        std::time::Duration::from_secs(10),
        || {
            let d = kept_dir.clone();
            async move {
                let f = std::fs::read_dir(&d)
                    .ok()?
                    .flatten()
                    .find(|e| e.file_name().to_string_lossy().ends_with("-app.log"))?;
                Some(f.path())
            }
        },
    )
    .await;
    assert_eq!(Sha256::digest(std::fs::read(kept).unwrap()), want);
}
