//! Secrets stay secret: a relay whose config holds a known PIN, certificate password and device
//! admin password registers, reloads and is diagnosed; none of those values may appear in its
//! logs, in the CLI's output or in the support bundle.

use crate::support::*;
use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

const SECRET_PIN: &str = "pin-5ec7e7a1";
const DEVICE_PASSWORD: &str = "devpw-91b3c4";

struct Fixture {
    _cloud: TestCloud,
    dir: tempfile::TempDir,
    cfg: RelayConfig,
    pfx_password: String,
}

impl Fixture {
    async fn new() -> Fixture {
        let cloud = TestCloud::start(ucrelay_sim::cloud::CloudArgs::new(TENANT, SECRET_PIN)).await;
        let dir = tempfile::tempdir().unwrap();
        let pki = ucrelay_sim::pki::make(dir.path(), "relay.test").unwrap();
        let pfx_password = std::fs::read_to_string(&pki.password_file)
            .unwrap()
            .trim()
            .to_string();
        let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
        // This test checks what the relay prints, not how fast it notices a dead channel: a ping
        // interval that a loaded machine cannot miss three times in a row keeps `status` healthy.
        cfg.ping_interval = "2s";
        cfg.pin_line = format!("pin = \"{SECRET_PIN}\"");
        cfg.extra = format!(
            "\n[edge]\nlisten = \"127.0.0.1:0\"\nfqdn = [\"relay.test\"]\npfx = {:?}\npfx_password_file = {:?}\n\n\
             [provisioning]\nupstream = \"http://127.0.0.1:9\"\n\n\
             [devices]\nsubnets = [\"127.0.0.0/8\"]\nadmin_password = \"{DEVICE_PASSWORD}\"\n",
            pki.pfx, pki.password_file
        );
        Fixture {
            _cloud: cloud,
            dir,
            cfg,
            pfx_password,
        }
    }

    fn secrets(&self) -> [&str; 3] {
        [SECRET_PIN, &self.pfx_password, DEVICE_PASSWORD]
    }

    fn assert_clean(&self, what: &str, text: &str) {
        for s in self.secrets() {
            assert!(
                !text.contains(s),
                "{what} contains the secret {s:?}:\n{text}"
            );
        }
    }
}

/// Unpacks a tar.gz into member name → contents.
fn unpack(path: &std::path::Path) -> BTreeMap<String, String> {
    let file = std::fs::File::open(path).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut out = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        let short = name.split_once('/').map(|(_, n)| n.to_string()).unwrap();
        out.insert(short, text);
    }
    out
}

#[tokio::test]
async fn logs_never_show_secrets_through_registration_and_reload() {
    let fx = Fixture::new().await;
    let mut relay = Relay::start(&fx.cfg).await;
    relay.wait_healthy().await;
    let sock = relay.socket.to_str().unwrap().to_string();
    // A reload through the admin socket, and one by signal.
    let (code, out, err) = run_cli(&["reload", "--socket", &sock]).await;
    assert_eq!(code, 0, "{out}{err}");
    fx.assert_clean("`ucrelay reload` output", &format!("{out}{err}"));
    relay.signal("HUP");
    wait_for(
        "the SIGHUP reload in the logs",
        Duration::from_secs(10),
        || async { (relay.logs().matches("reload:").count() >= 2).then_some(()) },
    )
    .await;
    let (code, out, err) = run_cli(&["status", "--socket", &sock, "--json"]).await;
    assert_eq!(code, 0, "{err}{out}");
    fx.assert_clean("`ucrelay status` output", &out);
    let logs = relay.stop_for_logs().await;
    assert!(logs.contains("registered with cloud"), "{logs}");
    fx.assert_clean("the relay's logs", &logs);
}

#[tokio::test]
async fn diag_bundle_has_its_members_and_no_secret() {
    let fx = Fixture::new().await;
    let mut relay = Relay::start(&fx.cfg).await;
    relay.wait_healthy().await;
    let config = fx.cfg.dir.join("relay.toml");
    let bundle = fx.dir.path().join("support.tar.gz");
    let (code, out, err) = run_cli(&[
        "diag",
        "--config",
        config.to_str().unwrap(),
        "--output",
        bundle.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    fx.assert_clean("`ucrelay diag` output", &format!("{out}{err}"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let members = unpack(&bundle);
    for name in [
        "README.txt",
        "config.toml",
        "status.json",
        "versions.txt",
        "doctor.txt",
        "doctor.json",
        "notes.txt",
    ] {
        assert!(
            members.contains_key(name),
            "{name} missing: {:?}",
            members.keys()
        );
    }
    for (name, text) in &members {
        fx.assert_clean(&format!("bundle member {name}"), text);
    }
    // The status is the running relay's; the config shows where secrets were.
    let status: serde_json::Value = serde_json::from_str(&members["status.json"]).unwrap();
    assert_eq!(status["cloud"]["registered"], true);
    let config = &members["config.toml"];
    assert!(config.contains("pin = \"***\""), "{config}");
    assert!(config.contains("admin_password = \"***\""), "{config}");
    assert!(config.contains("pfx_password_file"), "{config}");
    assert!(members["versions.txt"].contains(env!("CARGO_PKG_VERSION")));
    assert!(
        members["doctor.txt"].contains("pin: "),
        "{}",
        members["doctor.txt"]
    );
    // What could not be collected says why: images are off in this config.
    let notes = &members["notes.txt"];
    assert!(notes.contains("images.json"), "{notes}");
    assert!(
        members.contains_key("journal.txt") || notes.contains("journal"),
        "{notes}"
    );
    fx.assert_clean("the relay's logs", &relay.stop_for_logs().await);
}

/// The device password a task carries, and a secret parameter it sets.
const TASK_PASSWORD: &str = "taskpw-5d1e0b";
const SECRET_VALUE: &str = "sipsecret-77a9c3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_task_leaves_no_secret_in_the_store_which_is_owner_only() {
    let token = tokio_util::sync::CancellationToken::new();
    let mut opts =
        ucrelay_sim::phones::PhonesOptions::new(1, std::net::Ipv4Addr::new(127, 0, 12, 10));
    opts.admin_password = TASK_PASSWORD.into();
    let phones = ucrelay_sim::phones::start(opts, token.clone())
        .await
        .unwrap();
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = "\n[devices]\nsubnets = [\"127.0.12.0/24\"]\nmonitoring = false\nrequest_timeout = \"2s\"\n".into();
    // The relay runs under umask 000: its state must still be its own.
    let mut sh = tokio::process::Command::new("sh");
    sh.args(["-c", "umask 000; exec \"$0\" \"$@\"", bin()]);
    let relay = Relay::start_with(&cfg, sh).await;
    relay.wait_healthy().await;
    let id = cloud
        .post(
            "/sim/tasks",
            serde_json::json!({"type": "set_params", "targets": [phones.addr(0).to_string()],
                "payload": {"password": TASK_PASSWORD,
                            "params": {"reg.1.auth.password": SECRET_VALUE, "reg.1.label": "front desk"}}}),
        )
        .await["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the task done", Duration::from_secs(20), || async {
        let t = cloud.get(&format!("/sim/tasks/{id}")).await;
        (t["status"] == "done").then_some(())
    })
    .await;
    assert_eq!(phones.state(0).params["reg.1.auth.password"], SECRET_VALUE);
    // What an admin sees of the finished task is masked.
    let sock = relay.socket.to_str().unwrap().to_string();
    let (_, shown, _) = run_cli(&["tasks", "show", &id, "--socket", &sock, "--json"]).await;
    assert!(shown.contains("reg.1.label"), "{shown}");
    for s in [TASK_PASSWORD, SECRET_VALUE] {
        assert!(!shown.contains(s), "`tasks show` shows a secret: {shown}");
    }
    // The store holds none of it: the task's record, its targets' results and the outbox.
    // (A value the store deletes is not zeroed on disk: its page is reused by later writes. The
    // file is the relay's alone, 0600.)
    drop(relay);
    let store = cfg.state_dir().join("ucrelay.redb");
    let opened = wait_for("the store released", Duration::from_secs(10), || async {
        ucrelay_relay::store::Store::open(&cfg.state_dir()).ok()
    })
    .await;
    let mut held: Vec<Vec<u8>> = opened
        .tasks_all()
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    for (_, v) in opened.task_targets(&id).unwrap() {
        held.push(v);
    }
    for (_, r) in opened.outbox_batch(10_000, usize::MAX).unwrap() {
        held.push(serde_json::to_vec(&r).unwrap());
    }
    assert!(!held.is_empty());
    for v in &held {
        let text = String::from_utf8_lossy(v);
        for s in [TASK_PASSWORD, SECRET_VALUE] {
            assert!(!text.contains(s), "{s} is still in the store: {text}");
        }
    }
    drop(opened);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cfg.state_dir()), 0o700);
    assert_eq!(mode(&store), 0o600);
    token.cancel();
    cloud.stop().await;
}
