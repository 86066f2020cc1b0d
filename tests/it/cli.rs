//! The binary's command line: config errors name their field, `check`, `status` without a relay,
//! and `demo --once` end to end.

use crate::support::*;

const GOOD: &str = "state_dir = \"state\"\n[cloud]\nurl = \"http://127.0.0.1:9\"\ntenant_id = \"acme\"\npin = \"1\"\n";

/// Each broken config makes `run` and `check` exit 1 with the field named, and nothing is created.
#[tokio::test]
async fn config_errors_name_their_field_and_change_nothing() {
    let cases: &[(&str, &str)] = &[
        ("state_dir = \"s\"\n[cloud\n", "line 2"),
        (&GOOD.replace("tenant_id", "tenant"), "cloud.tenant"),
        (
            &format!("{GOOD}heartbeat_interval = 5\n"),
            "cloud.heartbeat_interval",
        ),
        (
            &format!("{GOOD}heartbeat_interval = \"soon\"\n"),
            "cloud.heartbeat_interval",
        ),
        (&format!("{GOOD}proxy = \"socks5://p:1\"\n"), "cloud.proxy"),
        (&GOOD.replace("http://127.0.0.1:9", "ftp://x"), "cloud.url"),
        (
            &GOOD.replace("pin = \"1\"", "pin_file = \"missing-pin\""),
            "cloud.pin_file",
        ),
        (
            &format!("{GOOD}[edge]\nfqdn = [\"192.0.2.1\"]\npfx = \"r.pfx\"\n"),
            "edge.fqdn[0]",
        ),
        (
            &format!("{GOOD}[devices]\nsubnets = [\"nonsense\"]\n"),
            "devices.subnets[0]",
        ),
        (&format!("{GOOD}[mystery]\n"), "mystery"),
    ];
    for (text, field) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, text).unwrap();
        let p = path.to_str().unwrap();
        let (code, _, err) = run_cli(&["run", "--config", p]).await;
        assert_eq!(code, 1, "run must fail for {text:?}");
        assert!(
            err.contains(p) && err.contains(field),
            "run error should name {p} and {field}: {err}"
        );
        let (code, out, _) = run_cli(&["check", "--config", p]).await;
        assert_eq!(code, 1);
        assert!(
            out.starts_with("fail") && out.contains(field),
            "check: {out}"
        );
        assert!(
            !dir.path().join("state").exists(),
            "nothing created for a bad config"
        );
    }
    // An unreadable PIN file is named too.
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("pin");
    std::fs::create_dir(&pin).unwrap(); // a directory cannot be read as a file
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        GOOD.replace("pin = \"1\"", &format!("pin_file = {pin:?}")),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["run", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("cloud.pin_file"), "{err}");
}

/// A task limit the session limit cannot honour is accepted with a warning that says which wins.
#[tokio::test]
async fn check_warns_when_tasks_ask_for_more_sessions_than_the_relay_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    let p = path.to_str().unwrap();
    std::fs::write(&path, format!("{GOOD}[devices]\ntask_concurrency = 1024\n")).unwrap();
    let (code, out, err) = run_cli(&["check", "--config", p]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines().any(|l| l.starts_with("warn")
            && l.contains("devices.task_concurrency (1024)")
            && l.contains("devices.max_sessions (256)")),
        "{out}"
    );
    std::fs::write(
        &path,
        format!("{GOOD}[devices]\ntask_concurrency = 1024\nmax_sessions = 1024\n"),
    )
    .unwrap();
    let (code, out, _) = run_cli(&["check", "--config", p]).await;
    assert_eq!(code, 0);
    assert!(!out.contains("task_concurrency"), "{out}");
}

#[tokio::test]
async fn check_accepts_the_shipped_example_configs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("relay-config");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    assert!(
        !files.is_empty(),
        "no example configs found in {}",
        dir.display()
    );
    for f in files {
        let (code, out, err) = run_cli(&["check", "--config", f.to_str().unwrap()]).await;
        assert_eq!(code, 0, "{}: {out}{err}", f.display());
        assert!(out.starts_with("ok"), "{out}");
    }
}

#[tokio::test]
async fn status_without_a_running_relay_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    let (code, _, err) = run_cli(&["status", "--socket", sock.to_str().unwrap()]).await;
    assert_eq!(code, 2);
    assert!(err.contains("not running"), "{err}");
}

#[tokio::test]
async fn demo_once_shows_the_whole_flow() {
    let (code, out, err) = run_cli(&["demo", "--once", "--heartbeat-interval", "300ms"]).await;
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for step in [
        "relay registered",
        "heartbeat 1 ok",
        "command channel (WebSocket) connected",
        "relay answered success",
        "the relay handed it to the cloud as artifact",
        "kept on the relay as backup",
        "phone GET /000000000000.cfg -> 200",
        "phone PUT /0004f2000001-app.log -> 201",
        "all images synced",
        "phone resumes with Range",
        "matching the first download",
        "demo complete",
    ] {
        assert!(out.contains(step), "demo output lacks {step:?}:\n{out}");
    }
}

#[tokio::test]
async fn demo_with_two_relays_shows_the_fleet() {
    let (code, out, err) = run_cli(&["demo", "--relays", "2", "--once"]).await;
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for step in [
        "relay1 (127.0.0.2) registered",
        "relay2 (127.0.0.3) registered",
        "relay1: installed",
        "relay2: installed",
        "monitoring split",
        "a phone resolving relay.demo.test to 127.0.0.3 gets 200",
        "killed with SIGKILL mid-task",
        "unfinished targets moved",
        "task done: 300 of 300 succeeded",
        "demo complete",
    ] {
        assert!(out.contains(step), "demo output lacks {step:?}:\n{out}");
    }
}

#[tokio::test]
async fn version_names_the_git_revision() {
    let (code, out, _) = run_cli(&["--version"]).await;
    assert_eq!(code, 0);
    let want = format!("ucrelay {} (git ", env!("CARGO_PKG_VERSION"));
    assert!(out.starts_with(&want), "{out}");
    let rev = out.trim().trim_start_matches(&want).trim_end_matches(')');
    assert!(
        rev == "unknown" || (rev.len() >= 7 && rev.chars().all(|c| c.is_ascii_hexdigit())),
        "revision {rev:?} in {out}"
    );
}

#[tokio::test]
async fn completions_and_man_page_come_from_the_cli_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = run_cli(&["completions", shell]).await;
        assert_eq!(code, 0, "{err}");
        for word in ["ucrelay", "status", "doctor", "config"] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
    }
    // The bash script at least parses.
    let (code, script, _) = run_cli(&["completions", "bash"]).await;
    assert_eq!(code, 0);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("ucrelay.bash");
    std::fs::write(&f, script).unwrap();
    let ok = std::process::Command::new("bash")
        .arg("-n")
        .arg(&f)
        .status()
        .unwrap();
    assert!(ok.success(), "bash -n rejects the completion script");

    let (code, page, _) = run_cli(&["man"]).await;
    assert_eq!(code, 0);
    assert!(page.contains(".TH ucrelay 1"), "{page}");
    assert!(page.contains("status") && page.contains("check"), "{page}");
    // Hidden from the help it documents.
    let (_, help, _) = run_cli(&["--help"]).await;
    assert!(
        !help.lines().any(|l| l.trim_start().starts_with("man ")),
        "{help}"
    );
}

/// Errors are one line with their cause, never a panic report.
#[tokio::test]
async fn errors_are_one_line_with_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    let missing = dir.path().join("no-such-pin");
    std::fs::write(
        &path,
        GOOD.replace("pin = \"1\"", &format!("pin_file = {missing:?}")),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["run", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains(&format!(
            "cannot read {}: No such file or directory",
            missing.display()
        )),
        "{err}"
    );
    assert!(
        !err.contains("os error") && !err.contains("panicked"),
        "{err}"
    );
}

/// Someone outside the ucrelay group gets told what to do, and exit code 2. Needs root (to run the
/// client as `nobody`).
#[tokio::test]
#[ignore = "needs root, to run the client as nobody (scripts/test runs it when root)"]
async fn admin_socket_permission_denied_says_what_to_do() {
    use std::os::unix::fs::PermissionsExt;
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    assert!(
        root,
        "this test needs root: run it as root (scripts/test does)"
    );
    let runuser = peer("runuser");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("admin.sock");
    let _listener = tokio::net::UnixListener::bind(&sock).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660)).unwrap();
    let out = tokio::process::Command::new(runuser)
        .args(["-u", "nobody", "--", bin(), "status", "--socket"])
        .arg(&sock)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim(),
        format!(
            "error: cannot open admin socket {}: permission denied — run as root or add yourself to the ucrelay group",
            sock.display()
        )
    );
}
