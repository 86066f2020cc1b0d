//! Test harness: a reference cloud in-process on 127.0.0.1:0, the relay as a real child process, and
//! waiting on observable conditions with a deadline (never a fixed sleep).

use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use ucrelay_sim::{client, cloud};

pub const TENANT: &str = "acme";
pub const PIN: &str = "123456";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ucrelay")
}

/// A third-party program a test uses as a real peer (nginx, curl, openssl, ...), found on PATH or
/// in /usr/sbin. A missing one fails the test with the Debian package that provides it, never a
/// bare "No such file" panic; `scripts/test` installs them all.
pub fn peer(program: &str) -> PathBuf {
    let package = match program {
        "nginx" => "nginx-light",
        "testssl" => "testssl.sh",
        "promtool" => "prometheus (scripts/test extracts promtool alone)",
        "tc" | "ip" | "ss" => "iproute2",
        "bindfs" => "bindfs",
        "runuser" => "util-linux",
        other => other,
    };
    if program == "promtool"
        && let Some(p) = std::env::var_os("PROMTOOL")
    {
        let p = PathBuf::from(p);
        if p.is_file() {
            return p;
        }
    }
    let dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    dirs.iter()
        .map(PathBuf::as_path)
        .chain([Path::new("/usr/sbin"), Path::new("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "this test needs `{program}`, which is not installed: run scripts/test (it installs the \
                 test peers as root) or apt-get install {package}"
            )
        })
}

pub fn cloud_args() -> cloud::CloudArgs {
    cloud::CloudArgs::new(TENANT, PIN)
}

/// A reference cloud running in this process.
pub struct TestCloud {
    pub addr: SocketAddr,
    handle: Option<cloud::CloudHandle>,
}

impl TestCloud {
    pub async fn start(args: cloud::CloudArgs) -> TestCloud {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, args).await
    }

    pub async fn start_on(listener: tokio::net::TcpListener, args: cloud::CloudArgs) -> TestCloud {
        let handle = cloud::start(listener, args)
            .await
            .expect("reference cloud starts");
        TestCloud {
            addr: handle.addr,
            handle: Some(handle),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await.expect("reference cloud shuts down");
        }
    }

    pub async fn get(&self, path: &str) -> Value {
        client::get(self.addr, path).await.unwrap()
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        client::post(self.addr, path, body).await.unwrap()
    }

    pub async fn relays(&self) -> Vec<Value> {
        self.get("/sim/relays")
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The only relay the cloud knows (tests run one relay per cloud).
    pub async fn relay(&self) -> Option<Value> {
        self.relays().await.into_iter().next()
    }

    pub async fn stats(&self) -> Value {
        self.get("/sim/stats").await
    }

    /// Posts a command and waits for its result to reach the cloud.
    pub async fn command(&self, name: &str, params: Value) -> Value {
        let v = self
            .post(
                "/sim/commands",
                serde_json::json!({"name": name, "params": params}),
            )
            .await;
        let id = v["command_id"].as_str().expect("command_id").to_string();
        let path = format!("/sim/commands/{id}");
        wait_for(
            &format!("result of command {name}"),
            Duration::from_secs(15),
            || async {
                let c = self.get(&path).await;
                (c["state"] == "done").then(|| c["result"].clone())
            },
        )
        .await
    }
}

/// Polls `probe` until it returns Some, or panics after `limit` naming what was awaited.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A relay config written into a temp dir; fields are set by the test before `write`.
pub struct RelayConfig {
    pub dir: PathBuf,
    pub cloud_url: String,
    pub pin_line: String,
    pub heartbeat_interval: &'static str,
    pub ping_interval: &'static str,
    pub extra_cloud: String,
    pub extra: String,
}

impl RelayConfig {
    pub fn new(dir: &Path, cloud_url: &str) -> RelayConfig {
        RelayConfig {
            dir: dir.to_path_buf(),
            cloud_url: cloud_url.to_string(),
            pin_line: format!("pin = \"{PIN}\""),
            heartbeat_interval: "200ms",
            ping_interval: "200ms",
            extra_cloud: "reconnect_max = \"500ms\"\npin_retry_interval = \"300ms\"\nrequest_timeout = \"2s\"\nconnect_timeout = \"2s\"\n".into(),
            extra: String::new(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn write(&self) -> PathBuf {
        let path = self.dir.join("relay.toml");
        let text = format!(
            "state_dir = {state:?}\n\n[cloud]\nurl = \"{url}\"\ntenant_id = \"{TENANT}\"\n{pin}\nheartbeat_interval = \"{hb}\"\nping_interval = \"{ping}\"\n{extra_cloud}\n[admin]\nsocket = {socket:?}\n{extra}",
            state = self.state_dir(),
            url = self.cloud_url,
            pin = self.pin_line,
            hb = self.heartbeat_interval,
            ping = self.ping_interval,
            extra_cloud = self.extra_cloud,
            socket = self.socket(),
            extra = self.extra,
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// The relay daemon as a child process (`ucrelay run`), killed on drop. Its stderr goes to a log file.
pub struct Relay {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Relay {
    pub async fn start(cfg: &RelayConfig) -> Relay {
        Relay::start_with(cfg, Command::new(bin())).await
    }

    /// [`Relay::start`] with the program run by `command` (e.g. `ip netns exec NS ucrelay`):
    /// `run --config FILE` is appended to it.
    pub async fn start_with(cfg: &RelayConfig, mut command: Command) -> Relay {
        let path = cfg.write();
        let log = cfg.dir.join(format!(
            "relay-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = command
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "ucrelay=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn ucrelay run");
        let relay = Relay {
            child,
            socket: cfg.socket(),
            log,
        };
        // Ready once the admin socket answers.
        let socket = relay.socket.clone();
        wait_for("the relay's admin socket", Duration::from_secs(20), || {
            let socket = socket.clone();
            async move {
                ucrelay_relay::ops::admin::get_json::<Value>(&socket, "/v1/status")
                    .await
                    .ok()
            }
        })
        .await;
        relay
    }

    pub async fn status(&self) -> Value {
        ucrelay_relay::ops::admin::get_json::<Value>(&self.socket, "/v1/status")
            .await
            .expect("status answers")
    }

    /// Waits until `pred` holds for the status report.
    pub async fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, Duration::from_secs(20), || async {
            let s = self.status().await;
            pred(&s).then_some(s)
        })
        .await
    }

    pub async fn wait_healthy(&self) -> Value {
        self.wait_status("relay healthy", |s| {
            s["healthy"] == true
                && s["cloud"]["channel"] == "connected"
                && s["cloud"]["heartbeats_ok"].as_u64() >= Some(1)
        })
        .await
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the relay (SIGTERM) and returns its whole log: lines still buffered in the relay are
    /// written when it exits, so a check that a secret never appears sees every line.
    pub async fn stop_for_logs(&mut self) -> String {
        self.signal("TERM");
        let code = self.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(code, Some(0), "the relay stops cleanly on SIGTERM");
        self.logs()
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("relay is running");
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("relay exits in time")
            .unwrap();
        status.code()
    }
}

/// Runs the binary to completion with a deadline; returns (exit code, stdout, stderr).
pub async fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("command finishes in time")
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A header of the final response in curl's `-D` output (after any 100 Continue or 401).
pub fn final_header(head: &str, name: &str) -> Option<String> {
    let last = head
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .last()?;
    last.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// A small real filesystem for a test (root only): a tmpfs of `size` on `path`, unmounted when
/// dropped. Filling it is the kernel's ENOSPC, not a simulated quota.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "ucrelay-test",
            ])
            .arg(path)
            .status()
            .unwrap();
        assert!(ok.success(), "mount a tmpfs on {}", path.display());
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    fn filler(&self) -> PathBuf {
        self.path.join(".filler")
    }

    /// Writes a filler file until the kernel refuses more; returns the bytes written.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .unwrap();
        let buf = vec![0x5au8; 1 << 20];
        let (mut chunk, mut total) = (buf.len(), 0u64);
        loop {
            match f.write(&buf[..chunk]) {
                Ok(0) => return total,
                Ok(n) => total += n as u64,
                Err(e) if e.raw_os_error() == Some(28) && chunk > 512 => chunk /= 4,
                Err(e) if e.raw_os_error() == Some(28) => return total,
                Err(e) => panic!("filling {}: {e}", self.path.display()),
            }
        }
    }

    /// Gives the space back.
    pub fn release(&self) {
        let _ = std::fs::remove_file(self.filler());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// `count` simulated phones from `base` on, rebooting in 300 ms; they stop with the token.
pub async fn fleet(
    count: usize,
    base: std::net::Ipv4Addr,
) -> (
    ucrelay_sim::phones::Phones,
    tokio_util::sync::CancellationToken,
) {
    let token = tokio_util::sync::CancellationToken::new();
    let mut opts = ucrelay_sim::phones::PhonesOptions::new(count, base);
    opts.reboot_time = Duration::from_millis(300);
    let phones = ucrelay_sim::phones::start(opts, token.clone())
        .await
        .expect("phones start");
    (phones, token)
}

/// A `[devices]` section for the phones of `subnet`, polled every `poll`.
pub fn devices_section(subnet: &str, poll: &str) -> String {
    format!(
        "\n[devices]\nsubnets = [\"{subnet}\"]\npoll_interval = \"{poll}\"\nadmin_password = \"456\"\nrequest_timeout = \"2s\"\ntarget_timeout = \"5s\"\n"
    )
}
