//! The `ucrelay` binary: parses the command line, sets up logging, and dispatches. The only place
//! that prints errors and picks exit codes.

mod cli;
#[cfg(feature = "sim")]
mod demo;
#[cfg(feature = "sim")]
mod demo_fleet;

#[cfg(feature = "sim")]
use crate::cli::SimCommand;
use crate::cli::{Cli, Command, LogFormat};
use clap::Parser;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;
use ucrelay_relay::config::Config;
use ucrelay_relay::ops::report::StatusReport;
use ucrelay_relay::util::text::printable;

fn main() -> ExitCode {
    install_panic_hook();
    ucrelay_relay::util::build::set_revision(cli::GIT_REV);
    let cli = Cli::parse();
    // Commands that only print (no sockets that a peer could close under us).
    if matches!(
        cli.command,
        Command::Completions(_) | Command::Man | Command::Check(_)
    ) {
        default_sigpipe();
    }
    // One TLS provider for the whole process (ring: small, no C toolchain beyond cc).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let default_level = match cli.command {
        Command::Run(_) | Command::Sim(_) => "info",
        // The demo narrates on stdout; its loopback cloud is plain http by design.
        Command::Demo(_) => "error",
        _ => "warn",
    };
    let _log_guard = init_logging(cli.log_format, default_level);
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

/// Prints an error as one line, with its causes after colons, and picks the exit code: 2 when the
/// running relay could not be reached at all, 1 for everything else.
fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", one_line(e));
    let unreachable = e
        .chain()
        .any(|c| c.is::<ucrelay_relay::ops::admin::Unreachable>());
    ExitCode::from(if unreachable { 2 } else { 1 })
}

/// `{e:#}` joins the causes with ": "; newlines inside a message are folded and the
/// " (os error N)" suffix of I/O errors is dropped (the words before it already say it).
fn one_line(e: &anyhow::Error) -> String {
    let mut s = format!("{e:#}")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    while let Some(start) = s.find(" (os error ") {
        match s[start..].find(')') {
            Some(end) => s.replace_range(start..start + end + 1, ""),
            None => break,
        }
    }
    s
}

/// Printing commands write to stdout that may be a pipe closed early (`ucrelay completions bash |
/// head`): let SIGPIPE end them quietly, like any Unix tool. Everything that talks over sockets
/// (the daemon above all) keeps Rust's default, SIGPIPE ignored, where a peer closing a socket
/// must be an error, not death.
#[allow(unsafe_code)]
fn default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL installs no
    // Rust code as a handler.
    unsafe {
        let _ = signal(Signal::SIGPIPE, SigHandler::SigDfl);
    }
}

/// A panic is a bug: say so on one line instead of a backtrace dump (RUST_BACKTRACE set keeps
/// Rust's own report, for developers).
fn install_panic_hook() {
    if std::env::var_os("RUST_BACKTRACE").is_some() {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("unknown cause");
        // `ucrelay status | head`: the reader went away; nothing to report.
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(1);
        }
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error (a bug, please report it): {}{at}",
            msg.replace('\n', " ")
        );
    }));
}

/// Logs go to stderr through `util::logwriter`: a request never waits on a log write (one access
/// line per device request would otherwise be a syscall on the request path), lines are batched,
/// warnings and errors go out at once, and nothing is dropped. The guard writes the rest on exit.
fn init_logging(
    format: LogFormat,
    default_level: &str,
) -> Option<ucrelay_relay::util::logwriter::LogGuard> {
    use std::io::IsTerminal;
    // rustls warns on every handshake whose SNI is an IP address (scanners, phones configured
    // with the relay's IP); that is the client's business, not an operator's.
    let default = format!("{default_level},rustls=error");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use ucrelay_relay::util::logwriter::{self, LogWriter};
    let (writer, guard) = match logwriter::spawn(std::io::stderr()) {
        Ok((w, g)) => (w, Some(g)),
        Err(e) => {
            eprintln!("warning: no log writer thread ({e}); writing logs to stderr directly");
            (LogWriter::direct(), None)
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => {
            // Colour only for a person at a terminal: never in the journal, a file or a pipe.
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            if !ansi {
                // Access lines in the same text, from their own formatter (util::logwriter).
                logwriter::install_access(&writer);
            }
            builder.with_ansi(ansi).init();
        }
    }
    guard
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // The allocator's arena cap and thresholds hold for arenas made after this: before any thread.
    ucrelay_relay::util::memory::tune();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Cancels the token on SIGTERM or SIGINT. The handlers are installed before this returns, so a
/// signal sent right after readiness is never met by the default action (death without cleanup).
fn on_signals(token: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot install a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install a SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        token.cancel();
    });
    Ok(())
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let config = Config::load(&args.config)?;
            let rt = runtime()?;
            rt.block_on(async {
                let token = CancellationToken::new();
                on_signals(token.clone())?;
                ucrelay_relay::daemon::run(config, token, |_| {}).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => Ok(check(&args.config)),
        Command::Status(args) => {
            let socket = admin_socket(&args)?;
            let report: StatusReport =
                runtime()?.block_on(ucrelay_relay::ops::admin::get_json(&socket, "/v1/status"))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Images(args) => {
            let socket = admin_socket(&args.target)?;
            runtime()?.block_on(images(&socket, args.target.json, args.action))
        }
        Command::Devices(args) => {
            let socket = admin_socket(&args.target)?;
            runtime()?.block_on(devices(&socket, args.target.json, args.action))
        }
        Command::Logs(args) => {
            let socket = admin_socket(&args.target)?;
            runtime()?.block_on(logs(&socket, &args))
        }
        Command::Tasks(args) => {
            let socket = admin_socket(&args.target)?;
            let path = match &args.action {
                None => "/v1/tasks".to_string(),
                Some(crate::cli::TasksAction::Show { id }) => format!(
                    "/v1/tasks/{}",
                    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
                ),
            };
            let v: serde_json::Value =
                runtime()?.block_on(ucrelay_relay::ops::admin::get_json(&socket, &path))?;
            if args.target.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if args.action.is_some() {
                print!("{}", ucrelay_relay::ops::views::render_task(&v));
            } else {
                print!("{}", ucrelay_relay::ops::views::render_tasks(&v));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload(args) => {
            let socket = admin_socket(&args)?;
            let outcome: ucrelay_relay::ops::ReloadOutcome = runtime()?.block_on(
                ucrelay_relay::ops::admin::call_json(&socket, http::Method::POST, "/v1/reload"),
            )?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            } else {
                // One line per setting: applied, refused, or waiting for a restart.
                for l in &outcome.lines {
                    let label = match l.outcome.as_str() {
                        "applied" | "unchanged" => "ok",
                        "restart" => "restart",
                        _ => "fail",
                    };
                    println!("{label:<7}  {}", printable(&l.message));
                }
            }
            Ok(if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        #[cfg(feature = "sim")]
        Command::Demo(args) => {
            runtime()?.block_on(crate::demo::main(args))?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "sim")]
        Command::Sim(SimCommand::Cloud(args)) => {
            runtime()?.block_on(ucrelay_sim::cloud::main(*args))?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "sim")]
        Command::Sim(SimCommand::Phones(args)) => {
            runtime()?.block_on(ucrelay_sim::phones::main(args))?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(not(feature = "sim"))]
        Command::Demo(_) | Command::Sim(_) => anyhow::bail!(
            "this ucrelay was built without the simulators (the appliance package leaves them out); \
             run the demo from a source checkout: cargo run --locked -- demo"
        ),
        Command::Doctor(args) => {
            let report = runtime()?.block_on(ucrelay_relay::ops::doctor::run(
                &args.config,
                args.socket.as_deref(),
            ));
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(ExitCode::from(report.exit_code))
        }
        Command::Diag(args) => {
            let output = args
                .output
                .unwrap_or_else(ucrelay_relay::ops::diag::default_output);
            let members = runtime()?.block_on(ucrelay_relay::ops::diag::run(
                &args.config,
                args.socket.as_deref(),
                &output,
            ))?;
            println!("wrote {} ({})", output.display(), members.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions(args) => {
            use clap::CommandFactory;
            let shell: clap_complete::Shell = args.shell.into();
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "ucrelay",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn images(
    socket: &std::path::Path,
    json: bool,
    action: Option<crate::cli::ImagesAction>,
) -> anyhow::Result<ExitCode> {
    use crate::cli::ImagesAction;
    use ucrelay_relay::cache::CatalogReport;
    use ucrelay_relay::ops::admin::{call_json, get_json};
    let post = http::Method::POST;
    match action {
        None => {
            let r: CatalogReport = get_json(socket, "/v1/images").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", render_images(&r));
            }
            let ok = r.refused.is_none() && r.images.iter().all(|i| i.state == "synced");
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Some(ImagesAction::Verify) => {
            let v: serde_json::Value = call_json(socket, post, "/v1/images/verify").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("checked {} cached files", v["checked"]);
                for p in v["quarantined"].as_array().into_iter().flatten() {
                    println!(
                        "fail  {} did not match its SHA-256: quarantined, fetching it again",
                        printable(p.as_str().unwrap_or("?"))
                    );
                }
            }
            let clean = v["quarantined"].as_array().is_none_or(|a| a.is_empty());
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Some(ImagesAction::Sync { wait }) => {
            let asked: serde_json::Value =
                call_json(socket, post.clone(), "/v1/images/sync").await?;
            // Our round is the first to start after the request; wait until it has finished.
            let our_round = asked["rounds_started"].as_u64().unwrap_or(0) + 1;
            if !wait {
                println!("sync started; `ucrelay images` shows progress");
                return Ok(ExitCode::SUCCESS);
            }
            use std::io::{IsTerminal, Write};
            let tty = std::io::stdout().is_terminal();
            let mut last_line = String::new();
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                let r: CatalogReport = get_json(socket, "/v1/images").await?;
                let (done, total): (u64, u64) = r
                    .images
                    .iter()
                    .fold((0, 0), |(d, t), i| (d + i.bytes_done, t + i.bytes_total));
                let line = progress_line(done, total, &r);
                if line != last_line {
                    if tty {
                        print!("\r{line}\x1b[K");
                        let _ = std::io::stdout().flush();
                    } else {
                        println!("{line}");
                    }
                    last_line = line;
                }
                if r.sync_rounds >= our_round && r.images.iter().all(|i| i.state != "syncing") {
                    if tty {
                        println!();
                    }
                    print!("{}", render_images(&r));
                    let ok = r.refused.is_none() && r.images.iter().all(|i| i.state == "synced");
                    if let Some(e) = r.refused.as_ref().or(r.last_sync_error.as_ref()) {
                        println!("sync: {}", printable(e));
                    }
                    return Ok(if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    });
                }
            }
        }
    }
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `ucrelay devices [probe|backups]`.
async fn devices(
    socket: &std::path::Path,
    json: bool,
    action: Option<crate::cli::DevicesAction>,
) -> anyhow::Result<ExitCode> {
    use crate::cli::{BackupsAction, DevicesAction};
    use ucrelay_relay::ops::admin::{call_bytes, call_json, get_json};
    use ucrelay_relay::ops::views;
    let print = |v: &serde_json::Value, text: String| -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(v)?);
        } else {
            print!("{text}");
        }
        Ok(())
    };
    match action {
        None => {
            let v: serde_json::Value = get_json(socket, "/v1/devices").await?;
            print(&v, views::render_devices(&v))?;
            // A device that presented a changed key is as much a problem as one that is offline.
            let changed = v["devices"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["identity"]["state"] == "changed"));
            Ok(exit(
                v["counts"]["offline"].as_u64().unwrap_or(0) == 0 && !changed,
            ))
        }
        Some(DevicesAction::Trust {
            address,
            fingerprint,
        }) => {
            let mut path = format!("/v1/devices/trust?address={}", enc(&address));
            if let Some(f) = &fingerprint {
                path.push_str(&format!("&fingerprint={}", enc(f)));
            }
            let v: serde_json::Value = call_json(socket, http::Method::POST, &path).await?;
            print(&v, format!("{}\n", v["done"].as_str().unwrap_or("")))?;
            Ok(ExitCode::SUCCESS)
        }
        Some(DevicesAction::Probe { target }) => {
            let v: serde_json::Value = call_json(
                socket,
                http::Method::POST,
                &format!("/v1/probe/{}", enc(&target)),
            )
            .await?;
            print(&v, views::render_probe(&v))?;
            Ok(exit(v["result"] == "success"))
        }
        Some(DevicesAction::Backups { mac, action }) => {
            let base = format!("/v1/backups/{}", enc(&mac));
            match action {
                None => {
                    let v: serde_json::Value = get_json(socket, &base).await?;
                    print(&v, views::render_backups(&v))?;
                    Ok(ExitCode::SUCCESS)
                }
                Some(BackupsAction::Show { id }) => {
                    let body =
                        call_bytes(socket, http::Method::GET, &format!("{base}/{}", enc(&id)))
                            .await?;
                    // The device's own text: lines kept, anything that could act on the
                    // terminal escaped.
                    print!(
                        "{}",
                        ucrelay_relay::util::text::printable_lines(&String::from_utf8_lossy(&body))
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Some(BackupsAction::Download { id, output }) => {
                    let body =
                        call_bytes(socket, http::Method::GET, &format!("{base}/{}", enc(&id)))
                            .await?;
                    let out = output.unwrap_or_else(|| {
                        std::path::PathBuf::from(format!("{}_{}.cfg", mac.replace(':', ""), id))
                    });
                    write_private(&out, &body)?;
                    println!("wrote {} ({} bytes)", out.display(), body.len());
                    Ok(ExitCode::SUCCESS)
                }
                Some(BackupsAction::Delete { id }) => {
                    let v: serde_json::Value = call_json(
                        socket,
                        http::Method::DELETE,
                        &format!("{base}/{}", enc(&id)),
                    )
                    .await?;
                    print(
                        &v,
                        format!("deleted backup {}\n", v["deleted"].as_str().unwrap_or("?")),
                    )?;
                    Ok(ExitCode::SUCCESS)
                }
                Some(BackupsAction::Restore { id }) => {
                    let v: serde_json::Value = call_json(
                        socket,
                        http::Method::POST,
                        &format!("{base}/{}/restore", enc(&id)),
                    )
                    .await?;
                    let text = if v["result"] == "success" {
                        format!(
                            "restored backup {}: {} parameters pushed to the device\n",
                            v["payload"]["backup_id"].as_str().unwrap_or("?"),
                            v["payload"]["restored"]
                        )
                    } else {
                        format!("restore failed: {}\n", v["reason"].as_str().unwrap_or("?"))
                    };
                    print(&v, text)?;
                    Ok(exit(v["result"] == "success"))
                }
            }
        }
    }
}

/// Writes a file only its owner can read (device configuration and logs).
fn write_private(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `ucrelay logs [MAC]`.
async fn logs(socket: &std::path::Path, args: &crate::cli::LogsArgs) -> anyhow::Result<ExitCode> {
    use ucrelay_relay::ops::admin::{call_bytes, call_json, get_json};
    let json = args.target.json;
    let Some(mac) = &args.mac else {
        let v: serde_json::Value = get_json(socket, "/v1/logs").await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", ucrelay_relay::ops::views::render_logs(&v));
        }
        return Ok(ExitCode::SUCCESS);
    };
    let path = format!("/v1/logs/{}", enc(mac));
    if args.delete {
        let v: serde_json::Value = call_json(socket, http::Method::DELETE, &path).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "deleted the logs of {} ({} bytes); collection for it starts again",
                printable(v["mac"].as_str().unwrap_or("?")),
                v["deleted_bytes"]
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let body = call_bytes(socket, http::Method::GET, &path).await?;
    let out = args.output.clone().unwrap_or_else(|| {
        let stamp = jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S");
        std::path::PathBuf::from(format!("{}-logs-{stamp}.tar.gz", mac.replace(':', "")))
    });
    write_private(&out, &body)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"mac": mac, "output": out, "bytes": body.len()})
        );
    } else {
        println!("wrote {} ({} bytes)", out.display(), body.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn progress_line(done: u64, total: u64, r: &ucrelay_relay::cache::CatalogReport) -> String {
    use ucrelay_relay::util::bytes::human_bytes;
    let pct = (done * 100).checked_div(total).unwrap_or(100);
    let filled = (pct / 5) as usize;
    let syncing = r.images.iter().filter(|i| i.state == "syncing").count();
    format!(
        "[{}{}] {pct:>3}% {} / {}  ({syncing} syncing)",
        "#".repeat(filled),
        ".".repeat(20 - filled.min(20)),
        human_bytes(done),
        human_bytes(total)
    )
}

fn render_images(r: &ucrelay_relay::cache::CatalogReport) -> String {
    use ucrelay_relay::util::bytes::human_bytes;
    let mut out = format!("revision {}", r.revision);
    if let Some(t) = &r.last_sync {
        out.push_str(&format!(", last sync {t}"));
    }
    out.push('\n');
    if let Some(why) = &r.refused {
        out.push_str(&format!(
            "manifest REFUSED (the previous one stays): {}\n",
            printable(why)
        ));
    }
    out.push_str(&format!(
        "{:<28} {:<8} {:>21}  {}\n",
        "IMAGE", "STATE", "PROGRESS", "PATHS"
    ));
    // Ids, paths and reasons come from the cloud: escaped for the terminal.
    for i in &r.images {
        let paths: Vec<String> = i
            .files
            .iter()
            .map(|f| printable(&f.path).into_owned())
            .collect();
        out.push_str(&format!(
            "{:<28} {:<8} {:>21}  {}\n",
            printable(&i.id),
            printable(&i.state),
            format!(
                "{} / {}",
                human_bytes(i.bytes_done),
                human_bytes(i.bytes_total)
            ),
            paths.join(" ")
        ));
        if let Some(why) = &i.reason {
            out.push_str(&format!("{:<28} reason: {}\n", "", printable(why)));
        }
    }
    out
}

/// The admin socket: given directly, or read from the config.
fn admin_socket(args: &crate::cli::StatusArgs) -> anyhow::Result<std::path::PathBuf> {
    Ok(match &args.socket {
        Some(s) => s.clone(),
        None => Config::load(&args.config)?.admin.socket,
    })
}

/// `ucrelay check`: one line per check, like `nginx -t`.
fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            println!("ok    config {}", c.path.display());
            println!("ok    cloud {} (tenant {})", c.cloud.url, c.cloud.tenant_id);
            if c.cloud.heartbeat_interval > std::time::Duration::from_secs(600) {
                println!(
                    "warn  cloud.heartbeat_interval is over 10 minutes: the cloud will mark this relay inactive between heartbeats"
                );
            }
            if !c.cloud.url.tls {
                println!("warn  cloud.url uses plain http: traffic to the cloud is not encrypted");
            }
            if let Some(a) = c.admin.metrics_listen
                && !a.ip().is_loopback()
            {
                println!("warn  {}", ucrelay_relay::ops::metrics::beyond_loopback(a));
            }
            let d = &c.devices;
            if d.enabled && d.task_concurrency > d.max_sessions {
                println!(
                    "warn  devices.task_concurrency ({}) is above devices.max_sessions ({}): a task works on at most {} targets at once; raise max_sessions too",
                    d.task_concurrency, d.max_sessions, d.max_sessions
                );
            }
            let mut failed = false;
            if let Some(e) = &c.edge {
                use ucrelay_relay::edge::cert::{self, Level};
                let now = std::time::SystemTime::now();
                let report = match &e.pfx {
                    Some(pfx) => cert::load(pfx, e.pfx_password_file.as_deref(), &e.fqdn, now),
                    None => {
                        // The certificate comes from the cloud: check the one kept, if any.
                        let dir = ucrelay_relay::edge::cloudcert::dir(&c.state_dir);
                        let pfx = dir.join("relay.pfx");
                        if !pfx.exists() {
                            println!(
                                "ok    certificate: no edge.pfx: the edge waits for the certificate uploaded in the cloud (none received yet)"
                            );
                            return ExitCode::SUCCESS;
                        }
                        println!(
                            "ok    certificate: no edge.pfx: checking the certificate uploaded in the cloud, kept in {}",
                            dir.display()
                        );
                        cert::load(&pfx, Some(&dir.join("relay.pfx.pass")), &e.fqdn, now)
                    }
                };
                for check in &report.checks {
                    let level = match check.level {
                        Level::Ok => "ok  ",
                        Level::Warn => "warn",
                        Level::Fail => {
                            failed = true;
                            "fail"
                        }
                    };
                    println!(
                        "{level}  certificate {}: {}",
                        check.rule,
                        printable(&check.message)
                    );
                }
            }
            if failed {
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("fail  {e}");
            ExitCode::from(1)
        }
    }
}
