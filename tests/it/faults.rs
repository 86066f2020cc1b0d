//! Faults the relay must survive gracefully, one at a time, each with its proof: the disk under the
//! store fills up (it refuses new work and says why, keeps what it has, recovers by itself), and the
//! store hangs (the systemd watchdog stops being petted, so systemd restarts it). Both need root: a
//! tmpfs mount for the full disk, a FUSE mount (bindfs) that the test can freeze for the hang.
//! The image cache's full disk and the honest bandwidth limit are in `download`.

use crate::support::*;
use serde_json::json;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::net::UnixDatagram;
use tokio::process::Command;

/// Targets outside `[devices].subnets`: each fails at once, without a packet, so a task of
/// thousands finishes in moments and makes the store grow.
fn outside_targets(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256))
        .collect()
}

#[tokio::test]
#[ignore = "needs root: mounts a tmpfs under the store"]
async fn store_disk_full_refuses_new_work_says_why_and_recovers_by_itself() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RelayConfig::new(dir.path(), &cloud.url());
    cfg.extra = "\n[devices]\nsubnets = [\"127.0.0.0/8\"]\n".into();
    let fs = Tmpfs::mount(&cfg.state_dir(), "8m");
    let mut relay = Relay::start(&cfg).await;
    relay.wait_healthy().await;
    assert_eq!(
        cloud.command("ping", json!({"n": 0})).await["result"],
        "success"
    );

    // The disk fills up; then a task of 3,000 targets arrives and its results need room.
    fs.fill();
    // Named for the relay: the cloud would otherwise answer these unreachable targets itself.
    let relay_id = relay.status().await["relay_id"].clone();
    let task = cloud
        .post(
            "/sim/tasks",
            json!({"type": "reboot", "relay_id": relay_id, "targets": outside_targets(3000)}),
        )
        .await;
    let task_id = task["task_id"].as_str().expect("task_id").to_string();
    let s = relay
        .wait_status("the store reports its full disk", |s| {
            s["store"]["writable"] == false
        })
        .await;
    assert_eq!(s["store"]["disk_full"], true, "{}", s["store"]);
    let problems = s["problems"].to_string();
    assert!(
        problems.contains("is full") && problems.contains("refused"),
        "status says why: {problems}"
    );
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay keeps running"
    );

    // It keeps serving what it can: heartbeats go on, and they tell the cloud why.
    let before = relay.status().await["cloud"]["heartbeats_ok"]
        .as_u64()
        .unwrap();
    wait_for(
        "a heartbeat saying the disk is full",
        Duration::from_secs(15),
        || async {
            let r = cloud.relay().await?;
            let reason = r["last_heartbeat_request"]["agents"]["management"]["reason"]
                .as_str()?
                .to_string();
            (r["last_heartbeat_request"]["agents"]["management"]["state"] == "degraded"
                && reason.contains("full"))
            .then_some(())
        },
    )
    .await;
    relay
        .wait_status("heartbeats continue", |s| {
            s["cloud"]["heartbeats_ok"].as_u64() > Some(before)
        })
        .await;

    // New work is refused with the reason, not taken and lost.
    let cmd = cloud
        .post("/sim/commands", json!({"name": "ping", "params": {"n": 1}}))
        .await;
    let cmd_id = cmd["command_id"].as_str().unwrap().to_string();
    wait_for(
        "the command refused as storage_unavailable",
        Duration::from_secs(15),
        || async {
            let errs = cloud.get("/sim/channel/errors").await;
            errs.as_array()?
                .iter()
                .find(|e| e["id"] == cmd_id.as_str() && e["code"] == "storage_unavailable")
                .cloned()
        },
    )
    .await;
    assert_ne!(
        cloud.get(&format!("/sim/commands/{cmd_id}")).await["state"],
        "done"
    );

    // Space returns: the relay recovers by itself, without a restart.
    fs.release();
    relay
        .wait_status("the store takes writes again", |s| {
            s["store"]["writable"] == true
        })
        .await;
    let done = wait_for(
        "the refused command, sent again and answered",
        Duration::from_secs(30),
        || async {
            let c = cloud.get(&format!("/sim/commands/{cmd_id}")).await;
            (c["state"] == "done").then_some(c)
        },
    )
    .await;
    assert_eq!(done["result"]["result"], "success", "{done}");
    // Nothing was lost or corrupted: every target of the task reported exactly once.
    let t = wait_for("the task finished", Duration::from_secs(60), || async {
        let t = cloud.get(&format!("/sim/tasks/{task_id}")).await;
        (t["status"] == "done" && t["failure"].as_u64() == Some(3000)).then_some(t)
    })
    .await;
    let results = t["results"].as_array().unwrap();
    let unique: std::collections::HashSet<&str> = results
        .iter()
        .filter_map(|r| r["target"].as_str())
        .collect();
    assert_eq!((results.len(), unique.len()), (3000, 3000));
    assert_eq!(t["repeated_reports"], 0, "{}", t["repeated_reports"]);
    let s = relay
        .wait_status("every result delivered", |s| {
            s["cloud"]["results_pending"] == 0 && s["healthy"] == true
        })
        .await;
    assert_eq!(s["store"]["writable"], true);
    assert!(relay.child.try_wait().unwrap().is_none(), "never restarted");
    relay.stop_for_logs().await;
}

/// A FUSE mount (bindfs) of a directory, in the foreground as this test's child, so the test can
/// freeze every file operation under it with SIGSTOP.
struct Bindfs {
    child: tokio::process::Child,
    mnt: std::path::PathBuf,
}

impl Bindfs {
    async fn mount(src: &std::path::Path, mnt: &std::path::Path) -> Bindfs {
        std::fs::create_dir_all(src).unwrap();
        std::fs::create_dir_all(mnt).unwrap();
        let child = Command::new(peer("bindfs"))
            .arg("-f")
            .arg(src)
            .arg(mnt)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let m = mnt.to_string_lossy().into_owned();
        wait_for("the bindfs mount", Duration::from_secs(10), || async {
            std::fs::read_to_string("/proc/mounts")
                .unwrap_or_default()
                .contains(&format!(" {m} fuse"))
                .then_some(())
        })
        .await;
        Bindfs {
            child,
            mnt: mnt.to_path_buf(),
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args([&format!("-{sig}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        if self.child.id().is_some() {
            self.signal("CONT");
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
    }
}

/// Waits up to `limit` for a notify datagram with the line `line`.
async fn notified(sock: &UnixDatagram, line: &str, limit: Duration) -> bool {
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Err(_) => return false,
            Ok(r) => {
                let n = r.unwrap();
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == line)
                {
                    return true;
                }
            }
        }
    }
}

#[tokio::test]
#[ignore = "needs root: a FUSE mount (bindfs) under the store, frozen to make it hang"]
async fn the_watchdog_is_not_petted_while_the_store_hangs() {
    let cloud = TestCloud::start(cloud_args()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig::new(dir.path(), &cloud.url());
    let fuse = Bindfs::mount(&dir.path().join("store-src"), &cfg.state_dir()).await;
    let config = cfg.write();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let log = dir.path().join("relay.log");
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        // systemd's WatchdogSec=1s: petted every 500 ms, the store must answer within 250 ms.
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    assert!(
        notified(&notify, "READY=1", Duration::from_secs(20)).await,
        "READY=1"
    );
    for _ in 0..2 {
        assert!(
            notified(&notify, "WATCHDOG=1", Duration::from_secs(5)).await,
            "the watchdog is petted while the store answers"
        );
    }

    // The filesystem under the store stops answering (a dead disk, a hung NFS server).
    fuse.signal("STOP");
    let frozen = Instant::now();
    // A pet already on its way may still arrive; after that, none for well past WatchdogSec.
    let _ = notified(&notify, "WATCHDOG=1", Duration::from_millis(600)).await;
    let quiet_from = Instant::now();
    assert!(
        !notified(&notify, "WATCHDOG=1", Duration::from_millis(2500)).await,
        "the watchdog was petted {:?} after the store hung: systemd would never restart a wedged relay",
        quiet_from.duration_since(frozen)
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the relay is wedged, not gone: the watchdog is what catches it"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("store health check failed") && text.contains("did not answer"),
        "the log says why the watchdog goes hungry:\n{text}"
    );

    // The disk comes back: the store answers and the pets resume.
    fuse.signal("CONT");
    assert!(
        notified(&notify, "WATCHDOG=1", Duration::from_secs(5)).await,
        "pets resume once the store answers"
    );
    let _ = child.start_kill();
    let _ = child.wait().await;
    drop(fuse);
}
