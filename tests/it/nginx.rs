//! A real nginx as the provisioning upstream, the way customers run one: a docroot behind HTTP Basic
//! auth (`PlcmSpIp`/`PlcmSpIp`, the Poly default) with WebDAV PUT/DELETE for phone uploads, plus an
//! unauthenticated `/open/` for simple checks and `/open/echo`, which answers with the request headers
//! the proxy sent. Runs as a child process on a free loopback port and is stopped on drop.

use crate::support::{peer, wait_for};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

pub const USER: &str = "PlcmSpIp";
pub const PASSWORD: &str = "PlcmSpIp";
pub const REALM: &str = "ucrelay test provisioning";

pub struct Nginx {
    pub port: u16,
    /// Files served (and written by PUT) live here.
    pub docroot: PathBuf,
    pub dir: PathBuf,
    child: Child,
}

impl Nginx {
    /// Starts nginx with its config, logs, pid and temp files under `dir`; returns once it accepts
    /// TCP connections.
    pub async fn start(dir: &Path) -> Nginx {
        let dir = dir.to_path_buf();
        let docroot = dir.join("docroot");
        std::fs::create_dir_all(docroot.join("open")).unwrap();
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let hash = crate::pki::openssl(&dir, &["passwd", "-apr1", PASSWORD]).await;
        std::fs::write(dir.join("htpasswd"), format!("{USER}:{}\n", hash.trim())).unwrap();

        let port = free_port().await;
        // Workers drop to `nobody` unless told otherwise, and could not read a 0700 temp dir.
        let user = if is_root() { "user root;\n" } else { "" };
        let conf = format!(
            r#"{user}worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/logs/access.log;
    client_body_temp_path {dir}/tmp/client_body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        server_name _;
        root {docroot};
        location / {{
            auth_basic "{REALM}";
            auth_basic_user_file {dir}/htpasswd;
            dav_methods PUT DELETE;
            create_full_put_path on;
            client_max_body_size 0;
        }}
        location /open/ {{
        }}
        location = /open/echo {{
            default_type text/plain;
            return 200 "method=$request_method\nuri=$request_uri\nhost=$http_host\nxff=$http_x_forwarded_for\nxfp=$http_x_forwarded_proto\nxfh=$http_x_forwarded_host\nauthorization=$http_authorization\nx-custom=$http_x_custom\nx-hop=$http_x_hop\nconnection=$http_connection\n";
        }}
    }}
}}
"#,
            dir = dir.display(),
            docroot = docroot.display(),
        );
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(peer("nginx"))
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("logs/stderr.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx {
            port,
            docroot,
            dir,
            child,
        };
        let addr = format!("127.0.0.1:{port}");
        wait_for(
            "nginx to accept connections",
            Duration::from_secs(10),
            || {
                let exited = nginx.child.try_wait().ok().flatten();
                if let Some(status) = exited {
                    panic!(
                        "nginx exited at start ({status}): {}{}",
                        std::fs::read_to_string(nginx.dir.join("logs/stderr.log"))
                            .unwrap_or_default(),
                        std::fs::read_to_string(nginx.dir.join("logs/error.log"))
                            .unwrap_or_default()
                    );
                }
                let addr = addr.clone();
                async move { tokio::net::TcpStream::connect(&addr).await.ok() }
            },
        )
        .await;
        nginx
    }

    /// `http://127.0.0.1:<port>`, for `[provisioning] upstream`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// nginx's access log so far (one line per request it received).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its worker; a SIGKILLed master would leave the worker behind.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            while std::time::Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Still running: kill_on_drop sends SIGKILL.
    }
}

/// A loopback port nothing listens on right now (bound, read, released).
pub async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// `/proc/self` belongs to the process's effective user.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
