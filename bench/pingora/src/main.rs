//! The Pingora control of bench/proxy.sh: a minimal TLS-terminating reverse proxy built on
//! Cloudflare's Pingora, set up like the nginx proxy in that script. It listens with TLS on the
//! bench certificate (PEM chain and key), forwards every request to one plain-HTTP/1.1 upstream
//! through Pingora's keep-alive connection pool, adds the same `X-Forwarded-*` headers as nginx and
//! ucrelay, caches nothing, and optionally writes one access-log line per request to a file
//! through a 64 KiB buffer (nginx's `buffer=64k`).
//!
//! usage: pingora-bench-proxy --listen ADDR --cert CHAIN.pem --key KEY.pem --upstream HOST:PORT
//!        [--threads N] [--access-log FILE] [--no-work-stealing]
//!
//! Bench-only: its own workspace, never built by the main workspace or CI.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Args {
    listen: String,
    cert: String,
    key: String,
    upstream: SocketAddr,
    threads: usize,
    access_log: Option<String>,
    work_stealing: bool,
}

fn usage(msg: &str) -> ! {
    eprintln!("pingora-bench-proxy: {msg}");
    eprintln!(
        "usage: pingora-bench-proxy --listen ADDR --cert CHAIN.pem --key KEY.pem \
         --upstream HOST:PORT [--threads N] [--access-log FILE] [--no-work-stealing]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let (mut listen, mut cert, mut key, mut upstream) = (None, None, None, None);
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut access_log = None;
    let mut work_stealing = true;
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--listen" => listen = Some(value()),
            "--cert" => cert = Some(value()),
            "--key" => key = Some(value()),
            "--upstream" => {
                upstream = Some(
                    value()
                        .parse()
                        .unwrap_or_else(|_| usage("--upstream is IP:PORT")),
                )
            }
            "--threads" => {
                threads = value()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage("--threads is a positive number"))
            }
            "--access-log" => access_log = Some(value()),
            "--no-work-stealing" => work_stealing = false,
            other => usage(&format!("unknown argument {other}")),
        }
    }
    Args {
        listen: listen.unwrap_or_else(|| usage("--listen is required")),
        cert: cert.unwrap_or_else(|| usage("--cert is required")),
        key: key.unwrap_or_else(|| usage("--key is required")),
        upstream: upstream.unwrap_or_else(|| usage("--upstream is required")),
        threads,
        access_log,
        work_stealing,
    }
}

struct Proxy {
    upstream: SocketAddr,
    /// nginx's `access_log ... buffer=64k`: lines gather in memory and reach the file 64 KiB at a
    /// time.
    access_log: Option<Mutex<BufWriter<File>>>,
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = ();
    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // Plain HTTP/1.1; Pingora's connector keeps the connection in its pool after the
        // response when both sides allow keep-alive.
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        // What nginx's proxy.sh config sets: X-Forwarded-For ($proxy_add_x_forwarded_for),
        // -Proto ($scheme) and -Host ($host).
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let xff = match upstream_request
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {client}"),
            None => client,
        };
        let host = upstream_request
            .headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .map(|h| h.split(':').next().unwrap_or(h).to_string())
            .unwrap_or_default();
        upstream_request.insert_header("X-Forwarded-For", xff)?;
        upstream_request.insert_header("X-Forwarded-Proto", "https")?;
        upstream_request.insert_header("X-Forwarded-Host", host)?;
        Ok(())
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, _ctx: &mut ()) {
        let Some(log) = &self.access_log else { return };
        let line = combined_line(session);
        if let Ok(mut w) = log.lock() {
            let _ = w.write_all(line.as_bytes());
        }
    }
}

/// nginx's `combined` format: addr - - [time] "request" status bytes "referer" "user-agent".
fn combined_line(session: &Session) -> String {
    let req = session.req_header();
    let header = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    let addr = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "-".into());
    let status = session.response_written().map_or(0, |r| r.status.as_u16());
    let mut line = String::with_capacity(160);
    let _ = writeln!(
        line,
        "{addr} - - [{}] \"{} {} {:?}\" {status} {} \"{}\" \"{}\"",
        now_utc(),
        req.method,
        req.uri,
        req.version,
        session.body_bytes_sent(),
        header("referer"),
        header("user-agent"),
    );
    line
}

/// The current second as `07/Dec/2026:09:06:38 +0000`, formatted once per second and thread
/// (nginx caches its time strings the same way).
fn now_utc() -> String {
    thread_local! {
        static CACHE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            c.0 = secs;
            c.1 = format_time(secs);
        }
        c.1.clone()
    })
}

fn format_time(secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // Days to civil date (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn main() {
    let args = parse_args();

    let conf = ServerConf {
        threads: args.threads,
        work_stealing: args.work_stealing,
        // proxy.sh stops servers with SIGTERM and waits 10 s: no grace period.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let access_log = args.access_log.as_ref().map(|path| {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| usage(&format!("cannot open the access log {path}: {e}")));
        Mutex::new(BufWriter::with_capacity(64 * 1024, file))
    });
    let proxy = Proxy {
        upstream: args.upstream,
        access_log,
    };
    let mut service = http_proxy_service(&server.configuration, proxy);
    // HTTP/1.1 only (ALPN is not offered), as wrk speaks and nginx's `listen ... ssl` serves.
    let tls = TlsSettings::intermediate(&args.cert, &args.key)
        .unwrap_or_else(|e| usage(&format!("cannot load the certificate and key: {e}")));
    service.add_tls_with_settings(&args.listen, None, tls);
    server.add_service(service);
    eprintln!(
        "pingora-bench-proxy: https://{} -> http://{}, {} threads{}, access log {}",
        args.listen,
        args.upstream,
        args.threads,
        if args.work_stealing {
            " (work-stealing)"
        } else {
            " (one runtime per thread)"
        },
        args.access_log.as_deref().unwrap_or("off"),
    );
    server.run_forever();
}
