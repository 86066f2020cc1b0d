//! `ucrelay demo --relays N`: a reference cloud, a fleet of phones and N relays, each relay a real
//! `ucrelay run` child process on its own loopback address, all behind one shared name. It narrates
//! the fleet: the certificate uploaded in the cloud reaching every relay, each relay's site and
//! monitoring share, HTTPS under the shared name on every relay, a task spread over the relays,
//! one relay killed (SIGKILL) mid-task and its targets finished by the others.

use crate::cli::DemoArgs;
use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use ucrelay_sim::{client, cloud};

const TENANT: &str = "demo";
const PIN: &str = "246810";
const SHARED: &str = "relay.demo.test";
/// Phones of the demo fleet: one /24 per site ("hq" and "branch").
const HQ_PHONES: Ipv4Addr = Ipv4Addr::new(127, 0, 60, 1);
const BRANCH_PHONES: Ipv4Addr = Ipv4Addr::new(127, 0, 61, 1);
const PHONES_PER_SITE: usize = 150;
/// How long the cloud waits for a silent relay before its targets move.
const INACTIVE_AFTER: Duration = Duration::from_secs(3);

struct RelayProc {
    name: String,
    ip: Ipv4Addr,
    socket: PathBuf,
    child: Child,
    relay_id: String,
    edge: Option<SocketAddr>,
}

async fn status(socket: &Path) -> Option<Value> {
    ucrelay_relay::ops::admin::get_json::<Value>(socket, "/v1/status")
        .await
        .ok()
}

/// Polls `probe` every 100 ms until it gives a value, for at most `limit`.
async fn until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn main(args: DemoArgs) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("ucrelay-demo-fleet-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let t0 = Instant::now();
    let say = |msg: String| println!("[{:>6.2}s] {msg}", t0.elapsed().as_secs_f64());
    let prov_dir = dir.path().join("provisioning");
    std::fs::create_dir_all(&prov_dir)?;
    std::fs::write(prov_dir.join("000000000000.cfg"), "<APPLICATION/>\n")?;
    let mut cloud_args = cloud::CloudArgs::new(TENANT, PIN);
    cloud_args.inactive_after = INACTIVE_AFTER;
    cloud_args.provisioning = Some(prov_dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let cloud = cloud::start(listener, cloud_args).await?;
    let c = cloud.addr;
    // Two sites by subnet; devices download from the shared name.
    client::post(
        c,
        "/sim/sites",
        json!({"name": "hq", "subnets": ["127.0.0.0/24", "127.0.60.0/24"]}),
    )
    .await?;
    client::post(
        c,
        "/sim/sites",
        json!({"name": "branch", "subnets": ["127.0.61.0/24"]}),
    )
    .await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut fleet = Vec::new();
    for base in [HQ_PHONES, BRANCH_PHONES] {
        let mut o = ucrelay_sim::phones::PhonesOptions::new(PHONES_PER_SITE, base);
        o.reboot_time = Duration::from_secs(1);
        o.answer_delay_ms = Some((100, 200));
        fleet.push(ucrelay_sim::phones::start(o, stop.clone()).await?);
    }
    let addrs: Vec<String> = fleet
        .iter()
        .flat_map(|p| p.addrs().map(|a| a.to_string()).collect::<Vec<_>>())
        .collect();
    let devices: Vec<Value> = addrs.iter().map(|a| json!({"address": a})).collect();
    client::post(c, "/sim/devices", json!({"devices": devices})).await?;

    let n = usize::from(args.relays.clamp(2, 8));
    let names: Vec<String> = (1..=n).map(|i| format!("relay{i}.demo.test")).collect();
    let mut all_names = vec![SHARED];
    all_names.extend(names.iter().map(String::as_str));
    let pki = ucrelay_sim::pki::make_names(dir.path(), &all_names)?;
    println!("ucrelay demo: a reference cloud and {n} relays behind {SHARED}, all on loopback");
    println!("  reference cloud  http://{c}  (tenant {TENANT}, PIN {PIN})");
    println!(
        "  phones           {} at {HQ_PHONES}.. (site hq) and {BRANCH_PHONES}.. (site branch), answering in 100-200 ms",
        addrs.len()
    );
    println!();

    let exe = std::env::current_exe().context("cannot find the ucrelay binary")?;
    let mut relays: Vec<RelayProc> = Vec::new();
    for (i, own) in names.iter().enumerate() {
        let ip = Ipv4Addr::new(127, 0, 0, 2 + i as u8);
        let d = dir.path().join(format!("relay{}", i + 1));
        std::fs::create_dir_all(&d)?;
        let socket = d.join("admin.sock");
        // No pfx: each relay waits for the certificate uploaded in the cloud.
        let config = format!(
            "state_dir = {state:?}\n\n[cloud]\nurl = \"http://{c}\"\ntenant_id = \"{TENANT}\"\npin = \"{PIN}\"\n\
             heartbeat_interval = \"500ms\"\nping_interval = \"1s\"\nreconnect_max = \"1s\"\n\n[admin]\nsocket = {socket:?}\n\n\
             [edge]\nlisten = \"{ip}:0\"\nfqdn = [\"{SHARED}\", \"{own}\"]\n\n[provisioning]\nupstream = \"http://{c}\"\n\n\
             [devices]\nsubnets = [\"127.0.0.0/8\"]\npoll_interval = \"10s\"\ntask_concurrency = 16\n",
            state = d.join("state"),
        );
        let path = d.join("relay.toml");
        std::fs::write(&path, config)?;
        let child = Command::new(&exe)
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(d.join("relay.log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a relay")?;
        relays.push(RelayProc {
            name: format!("relay{}", i + 1),
            ip,
            socket,
            child,
            relay_id: String::new(),
            edge: None,
        });
    }
    let outcome = narrate(c, &mut relays, &pki, &addrs, &say).await;
    for r in &mut relays {
        let _ = r.child.start_kill();
        let _ = r.child.wait().await;
    }
    stop.cancel();
    for p in fleet {
        p.shutdown().await;
    }
    cloud.shutdown().await?;
    outcome?;
    println!(
        "demo finished; the temporary state in {} is removed",
        dir.path().display()
    );
    Ok(())
}

async fn narrate(
    c: SocketAddr,
    relays: &mut [RelayProc],
    pki: &ucrelay_sim::pki::DemoPki,
    addrs: &[String],
    say: &impl Fn(String),
) -> Result<()> {
    let limit = Duration::from_secs(60);
    for r in relays.iter_mut() {
        let st = until(&format!("{} registered", r.name), limit, || async {
            status(&r.socket)
                .await
                .filter(|s| s["cloud"]["channel"] == "connected")
        })
        .await?;
        r.relay_id = st["relay_id"].as_str().unwrap_or_default().to_string();
        r.edge = st["edge"]["listen"].as_str().and_then(|a| a.parse().ok());
        say(format!(
            "{} ({}) registered with the cloud, command channel up; its HTTPS edge waits for a certificate",
            r.name, r.ip
        ));
    }

    // One PFX for the tenant, uploaded in the cloud: it reaches every relay.
    use base64::Engine as _;
    let pfx = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&pki.pfx)?);
    let password = std::fs::read_to_string(&pki.password_file)?
        .trim()
        .to_string();
    let up = client::post(
        c,
        "/sim/certificates",
        json!({"pfx_base64": pfx, "password": password}),
    )
    .await?;
    let upload_id = up["upload_id"].as_str().unwrap_or_default().to_string();
    say(format!(
        "certificate uploaded in the cloud ({upload_id}, SAN {SHARED} and each relay's own name)"
    ));
    let answers = until("every relay answered the upload", limit, || async {
        let v = client::get(c, &format!("/sim/certificates/{upload_id}"))
            .await
            .ok()?;
        (v["relays"].as_array().map_or(0, Vec::len) == relays.len()).then_some(v)
    })
    .await?;
    for a in answers["relays"].as_array().into_iter().flatten() {
        let name = relays
            .iter()
            .find(|r| r.relay_id == a["relay_id"].as_str().unwrap_or_default())
            .map_or("?", |r| r.name.as_str());
        say(format!(
            "  {name}: {} {}",
            a["result"].as_str().unwrap_or("?"),
            a["reason"].as_str().unwrap_or_default()
        ));
    }

    // Sites and the monitoring split.
    let list = until("monitoring split", limit, || async {
        let v = client::get(c, "/sim/relays").await.ok()?;
        let list = v.as_array()?.clone();
        let total: u64 = list
            .iter()
            .filter_map(|r| r["devices_assigned"].as_u64())
            .sum();
        (total == addrs.len() as u64 && list.len() == relays.len()).then_some(list)
    })
    .await?;
    say(
        "monitoring split by the cloud (rendezvous hashing; each device polled by one relay):"
            .into(),
    );
    for r in &list {
        let name = relays
            .iter()
            .find(|x| x.relay_id == r["relay_id"].as_str().unwrap_or_default())
            .map_or("?", |x| x.name.as_str());
        say(format!(
            "  {name}: site {}, {} devices",
            r["site"].as_str().unwrap_or("none"),
            r["devices_assigned"]
        ));
    }

    // Every relay answers under the shared name.
    for r in relays.iter() {
        let Some(edge) = r.edge else { continue };
        let phone = ucrelay_sim::phone::ProvClient::new(
            &format!("https://{SHARED}:{}/", edge.port()),
            "0004f2000001",
        )?
        .with_root_ca_pem(&pki.ca_pem)?
        .with_resolve(SHARED, edge);
        let probe = phone.get("/000000000000.cfg").await?;
        say(format!(
            "a phone resolving {SHARED} to {} gets {} (certificate from the cloud, provisioning passed through)",
            r.ip, probe.status
        ));
    }

    // A task spread over the relays; one of them is killed mid-task.
    let v = client::post(
        c,
        "/sim/tasks",
        json!({"type": "reboot", "name": "demo reboot wave", "targets": addrs}),
    )
    .await?;
    let id = v["task_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no task_id in {v}"))?
        .to_string();
    let path = format!("/sim/tasks/{id}");
    let t = client::get(c, &path).await?;
    say(format!(
        "cloud scheduled task {id}: reboot {} phones, leased to the relays least loaded first:",
        addrs.len()
    ));
    for l in t["leases"].as_array().into_iter().flatten() {
        let name = relays
            .iter()
            .find(|x| x.relay_id == l["relay_id"].as_str().unwrap_or_default())
            .map_or("?", |x| x.name.as_str());
        say(format!("  {name}: {} targets", l["targets"]));
    }
    let victim = relays.len() - 1;
    let victim_id = relays[victim].relay_id.clone();
    until("the task under way", limit, || async {
        let t = client::get(c, &path).await.ok()?;
        let by = t["results"]
            .as_array()?
            .iter()
            .filter(|r| r["relay_id"] == victim_id.as_str())
            .count();
        (by >= 20).then_some(())
    })
    .await?;
    let pid = relays[victim]
        .child
        .id()
        .ok_or_else(|| anyhow!("relay already gone"))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let _ = relays[victim].child.wait().await;
    let t = client::get(c, &path).await?;
    say(format!(
        "{} killed with SIGKILL mid-task ({} of {} results at the cloud)",
        relays[victim].name,
        t["results"].as_array().map_or(0, Vec::len),
        addrs.len()
    ));
    let mut moved_said = false;
    let deadline = Instant::now() + limit;
    let t = loop {
        let t = client::get(c, &path).await?;
        let stats = client::get(c, "/sim/stats").await?;
        if !moved_said && stats["targets_moved"].as_u64().unwrap_or(0) > 0 {
            moved_said = true;
            say(format!(
                "the cloud saw no heartbeat for {}s: {} unfinished targets moved to the other relays",
                INACTIVE_AFTER.as_secs(),
                stats["targets_moved"]
            ));
        }
        if t["status"] == "done" {
            break t;
        }
        if Instant::now() > deadline {
            bail!("the task did not finish within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stats = client::get(c, "/sim/stats").await?;
    say(format!(
        "task done: {} of {} succeeded, {} failed; one result per target ({} duplicates counted)",
        t["success"], t["total"], t["failure"], stats["duplicate_target_results"]
    ));
    say("demo complete: shared name and certificate, monitoring split, task spread, relay killed and its targets finished by the others".into());
    Ok(())
}
