//! `ucrelay demo`: a reference cloud and a relay on loopback, in one process, with a throw-away state
//! directory, narrating what happens. The relay runs exactly as `ucrelay run` would; the demo talks to
//! the cloud only through its test API, like an external checker.

use crate::cli::DemoArgs;
use anyhow::{Context, Result, anyhow, bail};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use ucrelay_relay::config::Config;
use ucrelay_relay::ctx::{ChannelState, Registration, StatusBoard};
use ucrelay_sim::{client, cloud};

const TENANT: &str = "demo";
const PIN: &str = "246810";
/// The name the demo phone uses for the relay (resolved to loopback by the phone itself).
const FQDN: &str = "relay.demo.test";
const PHONE_MAC: &str = "0004f2000001";
/// First of the demo's three desk phones (the next two follow).
const DEMO_PHONES: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 50, 10);

pub async fn main(args: DemoArgs) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("ucrelay-demo-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    // The tenant's provisioning tree at the reference cloud, which the relay's edge forwards to.
    let prov_dir = dir.path().join("provisioning");
    std::fs::create_dir_all(&prov_dir)?;
    std::fs::write(
        prov_dir.join("000000000000.cfg"),
        "<APPLICATION APP_FILE_PATH=\"sip.ld\" CONFIG_FILES=\"[PHONE_MAC_ADDRESS]-user.cfg, common.cfg\"/>\n",
    )?;
    std::fs::write(
        prov_dir.join(format!("{PHONE_MAC}.cfg")),
        "<APPLICATION APP_FILE_PATH=\"sip.ld\" CONFIG_FILES=\"common.cfg\"/>\n",
    )?;
    let pki = ucrelay_sim::pki::make(dir.path(), FQDN)?;
    let mut cloud_args = cloud::CloudArgs::new(TENANT, PIN);
    cloud_args.heartbeat_interval = args.heartbeat_interval;
    cloud_args.provisioning = Some(prov_dir);
    // Two firmware images the cloud publishes for this tenant.
    let images_dir = dir.path().join("cloud-images");
    std::fs::create_dir_all(&images_dir)?;
    for (name, mib) in [
        ("3111-48450-001.sip.ld", 24u32),
        ("3111-46162-001.sip.ld", 12),
    ] {
        let body: Vec<u8> = (0..mib * 1024 * 1024)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        std::fs::write(images_dir.join(name), body)?;
    }
    cloud_args.images = Some(images_dir);
    let cloud = cloud::start(listener, cloud_args).await?;
    let cloud_addr = cloud.addr;
    // Three desk phones on their own loopback addresses, speaking the device REST API.
    let phones_stop = CancellationToken::new();
    let mut phone_opts = ucrelay_sim::phones::PhonesOptions::new(3, DEMO_PHONES);
    phone_opts.reboot_time = Duration::from_secs(2);
    let phones = ucrelay_sim::phones::start(phone_opts, phones_stop.clone()).await?;
    let fleet: Vec<String> = phones.addrs().map(|a| a.to_string()).collect();
    client::post(
        cloud_addr,
        "/sim/devices",
        serde_json::json!({"devices": fleet.iter().map(|a| serde_json::json!({"address": a})).collect::<Vec<_>>()}),
    )
    .await?;
    let config_path = dir.path().join("relay.toml");
    let socket = dir.path().join("admin.sock");
    std::fs::write(
        &config_path,
        format!(
            "state_dir = {state:?}\n\n[cloud]\nurl = \"http://{cloud_addr}\"\ntenant_id = \"{TENANT}\"\npin = \"{PIN}\"\n\
             heartbeat_interval = \"{hb}\"\nping_interval = \"5s\"\n\n[admin]\nsocket = {socket:?}\n\n\
             [edge]\nlisten = \"127.0.0.1:0\"\nfqdn = [\"{FQDN}\"]\npfx = {pfx:?}\npfx_password_file = {pass:?}\n\n\
             [provisioning]\nupstream = \"http://{cloud_addr}\"\n\n[devices]\nsubnets = [\"127.0.0.0/8\"]\npoll_interval = \"30s\"\n\n\
             [images]\nbandwidth_limit = \"20MB/s\"\nmin_free = \"1MB\"\n",
            pfx = pki.pfx,
            pass = pki.password_file,
            state = dir.path().join("state"),
            hb = humantime::format_duration(args.heartbeat_interval),
        ),
    )?;
    let config = Config::load(&config_path)?;

    let t0 = Instant::now();
    let say = move |msg: String| println!("[{:>6.2}s] {msg}", t0.elapsed().as_secs_f64());
    println!("ucrelay demo: a reference cloud and a relay, both on loopback");
    println!("  reference cloud  http://{cloud_addr}  (tenant {TENANT}, PIN {PIN})");
    println!("  phones           {}", fleet.join(", "));
    println!("  relay config     {}", config_path.display());
    println!(
        "  try meanwhile    ucrelay status --socket {}",
        socket.display()
    );
    println!();

    let shutdown = CancellationToken::new();
    {
        let s = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                s.cancel();
            }
        });
    }
    type Ready = (
        Arc<StatusBoard>,
        Option<SocketAddr>,
        Option<Arc<ucrelay_relay::cache::Catalog>>,
    );
    let (board_tx, board_rx) = tokio::sync::oneshot::channel::<Ready>();
    let relay = tokio::spawn(ucrelay_relay::daemon::run(
        config,
        shutdown.clone(),
        move |ctx| {
            let edge = ctx.edge.as_ref().and_then(|e| e.bound.get()).map(|b| b.0);
            let _ = board_tx.send((ctx.status.clone(), edge, ctx.images.clone()));
        },
    ));
    let (board, edge_addr, images) = match board_rx.await {
        Ok(b) => b,
        Err(_) => {
            let err = relay.await.map_err(|e| anyhow!("relay task failed: {e}"))?;
            return Err(err
                .err()
                .unwrap_or_else(|| anyhow!("relay stopped before it was ready")));
        }
    };
    say("relay started".into());
    let edge_addr = edge_addr.ok_or_else(|| anyhow!("the relay's edge did not start"))?;
    say(format!(
        "device edge listening on https://{FQDN}:{} ({edge_addr})",
        edge_addr.port()
    ));
    // The desk phones reach the relay's edge by its name (for packet capture uploads) and trust
    // the demo CA, as phones provisioned with it would.
    {
        use rustls_pki_types::pem::PemObject;
        let pem = std::fs::read(&pki.ca_pem)?;
        let roots = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("demo CA: {e}"))?;
        phones.set_uplink(ucrelay_sim::phones::uplink::Uplink {
            resolve: [(FQDN.to_string(), edge_addr)].into_iter().collect(),
            roots,
            provisioning: None,
        });
    }
    let phone = ucrelay_sim::phone::ProvClient::new(
        &format!("https://{FQDN}:{}/", edge_addr.port()),
        PHONE_MAC,
    )?
    .with_root_ca_pem(&pki.ca_pem)?
    .with_resolve(FQDN, edge_addr);

    let world = World {
        cloud_addr,
        phone: &phone,
        fleet: &fleet,
        fleet_macs: (0..phones.len()).map(|i| phones.mac(i)).collect(),
    };
    let narrated = narrate(&board, images, &world, &say, &shutdown, args.once).await;
    shutdown.cancel();
    phones_stop.cancel();
    phones.shutdown().await;
    let relay_result = relay.await.map_err(|e| anyhow!("relay task failed: {e}"))?;
    cloud.shutdown().await?;
    narrated?;
    relay_result?;
    println!(
        "demo finished; the temporary state in {} is removed",
        dir.path().display()
    );
    Ok(())
}

/// Prints each step as it happens. With `once`, returns after the whole flow has been shown.
/// What the demo drives besides the relay: the reference cloud, the provisioning phone, the fleet.
struct World<'a> {
    cloud_addr: SocketAddr,
    phone: &'a ucrelay_sim::phone::ProvClient,
    fleet: &'a [String],
    fleet_macs: Vec<String>,
}

async fn narrate(
    board: &StatusBoard,
    images: Option<Arc<ucrelay_relay::cache::Catalog>>,
    world: &World<'_>,
    say: &impl Fn(String),
    shutdown: &CancellationToken,
    once: bool,
) -> Result<()> {
    let (cloud_addr, phone, fleet) = (world.cloud_addr, world.phone, world.fleet);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut registered = false;
    let mut channel_up = false;
    let mut heartbeats = 0u64;
    let mut ping_done = false;
    let mut images_seen = 0u64;
    let mut images_done = false;
    let mut image_fetched = false;
    let mut provisioned = false;
    let mut task: Option<String> = None;
    let mut task_status = String::new();
    let mut task_done = false;
    let mut diagnostics_done = false;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let st = board.snapshot();
        if !registered {
            match &st.registration {
                Registration::Registered => {
                    registered = true;
                    say("relay registered with the cloud (tenant ID + PIN accepted)".into());
                }
                Registration::Rejected(why) | Registration::Failed(why) => {
                    say(format!("registration failing: {why}"))
                }
                Registration::Starting => {}
            }
        }
        if st.heartbeats_ok > heartbeats {
            heartbeats = st.heartbeats_ok;
            let relays = client::get(cloud_addr, "/sim/relays").await?;
            let seen = relays.get(0).cloned().unwrap_or_default();
            say(format!(
                "heartbeat {heartbeats} ok; the cloud counts {} and marks the relay {}",
                seen["heartbeats"],
                seen["state"].as_str().unwrap_or("?")
            ));
        }
        if st.channel == ChannelState::Connected && !channel_up {
            channel_up = true;
            say("command channel (WebSocket) connected".into());
        } else if let ChannelState::Disconnected(why) = &st.channel
            && channel_up
        {
            channel_up = false;
            say(format!("command channel down: {why}"));
        }
        // After the first heartbeat is shown: the steps below take a while, and the narration
        // waits for them.
        if channel_up && !ping_done && heartbeats >= 1 {
            ping_done = true;
            let sent = Instant::now();
            let v = client::post(
                cloud_addr,
                "/sim/commands",
                serde_json::json!({"name": "ping", "params": {"hello": "from the cloud"}}),
            )
            .await?;
            let id = v["command_id"]
                .as_str()
                .ok_or_else(|| anyhow!("no command_id in {v}"))?
                .to_string();
            say(format!("cloud sent command ping ({id}) down the channel"));
            let result = wait_for_result(cloud_addr, &id, shutdown).await?;
            say(format!(
                "relay answered {}: {} in {} ms",
                result["result"].as_str().unwrap_or("?"),
                result["payload"],
                sent.elapsed().as_millis()
            ));
        }
        if ping_done && !provisioned {
            provisioned = true;
            say(format!(
                "a simulated phone ({PHONE_MAC}) provisions through the relay's HTTPS edge:"
            ));
            // A phone's connectivity test: the zeros file must be answered with a challenge.
            let probe = phone.get("/000000000000.cfg").await?;
            say(format!(
                "  phone GET /000000000000.cfg -> {} (connectivity test: challenged first, then {} auth)",
                probe.status, probe.auth_used
            ));
            for (method, path, status) in phone.provision().await? {
                let note = match status {
                    401 => " (challenge from the provisioning server, passed through)",
                    404 => " (no such file upstream)",
                    _ => "",
                };
                say(format!("  phone {method} {path} -> {status}{note}"));
            }
        }
        if let Some(r) = images.as_ref().map(|c| c.report())
            && !images_done
            && !r.images.is_empty()
        {
            let (done, total) = r
                .images
                .iter()
                .fold((0, 0), |(d, t), i| (d + i.bytes_done, t + i.bytes_total));
            // Progress roughly every 20 %.
            if done * 5 / total.max(1) > images_seen || done == total {
                images_seen = done * 5 / total.max(1);
                say(format!(
                    "download agent: {} images, {} of {} MB verified and cached (limited to 20 MB/s)",
                    r.images.len(),
                    done / 1_000_000,
                    total / 1_000_000
                ));
            }
            if r.images.iter().all(|i| i.state == "synced") {
                images_done = true;
                say("all images synced; each SHA-256 matched the manifest".into());
            }
        }
        if images_done && provisioned && !image_fetched {
            image_fetched = true;
            let path = "/images/3111-46162-001.sip.ld";
            let full = phone.get(path).await?;
            let cut = full.body.len() / 2;
            say(format!(
                "phone GET {path} -> {} ({} bytes, served from the relay's cache)",
                full.status,
                full.body.len()
            ));
            let resumed = phone
                .clone()
                .with_header("Range", &format!("bytes={cut}-"))?
                .get(path)
                .await?;
            let same = resumed.body[..] == full.body[cut..];
            say(format!(
                "phone resumes with Range: bytes={cut}- -> {} ({} bytes, {})",
                resumed.status,
                resumed.body.len(),
                if same {
                    "matching the first download"
                } else {
                    "MISMATCH"
                }
            ));
        }
        if ping_done && !diagnostics_done {
            diagnostics_done = true;
            diagnostics(cloud_addr, &fleet[0], &world.fleet_macs[0], say, shutdown).await?;
        }
        if diagnostics_done && task.is_none() {
            let v = client::post(
                cloud_addr,
                "/sim/tasks",
                serde_json::json!({"type": "reboot", "name": "demo reboot wave", "targets": fleet}),
            )
            .await?;
            let id = v["task_id"]
                .as_str()
                .ok_or_else(|| anyhow!("no task_id in {v}"))?
                .to_string();
            say(format!(
                "cloud scheduled task {id}: reboot {} phones through the relay",
                fleet.len()
            ));
            task = Some(id);
        }
        if let Some(id) = &task
            && !task_done
        {
            let t = client::get(cloud_addr, &format!("/sim/tasks/{id}")).await?;
            let status = t["status"].as_str().unwrap_or("?").to_string();
            if status != task_status {
                task_status = status.clone();
                say(format!(
                    "task {status}: {} of {} succeeded, {} failed",
                    t["success"], t["total"], t["failure"]
                ));
            }
            if status == "done"
                && t["success"].as_u64().unwrap_or(0) + t["failure"].as_u64().unwrap_or(0)
                    >= fleet.len() as u64
            {
                task_done = true;
                for r in t["results"].as_array().into_iter().flatten() {
                    say(format!(
                        "  {} -> {}{}",
                        r["target"].as_str().unwrap_or("?"),
                        r["result"].as_str().unwrap_or("?"),
                        r["reason"]
                            .as_str()
                            .filter(|s| !s.is_empty())
                            .map(|s| format!(" ({s})"))
                            .unwrap_or_default()
                    ));
                }
            }
        }
        if once
            && task_done
            && diagnostics_done
            && registered
            && channel_up
            && heartbeats >= 1
            && ping_done
            && provisioned
            && image_fetched
        {
            say("demo complete: registered, heartbeating, channel up, command answered, packet capture and configuration backup kept, reboot task done, phone provisioned, images synced and served".into());
            return Ok(());
        }
        if once && Instant::now() > deadline {
            bail!("the demo flow did not complete within 60 s");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Sends a command through the cloud's test API and waits for its result.
async fn command(
    cloud_addr: SocketAddr,
    name: &str,
    params: serde_json::Value,
    shutdown: &CancellationToken,
) -> Result<serde_json::Value> {
    let v = client::post(
        cloud_addr,
        "/sim/commands",
        serde_json::json!({"name": name, "params": params}),
    )
    .await?;
    let id = v["command_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no command_id in {v}"))?
        .to_string();
    wait_for_result(cloud_addr, &id, shutdown).await
}

/// A packet capture on one phone, fetched through the relay's edge and handed to the cloud as an
/// artifact; then a configuration backup of the same phone.
async fn diagnostics(
    cloud_addr: SocketAddr,
    target: &str,
    mac: &str,
    say: &impl Fn(String),
    shutdown: &CancellationToken,
) -> Result<()> {
    let r = command(
        cloud_addr,
        "packet_capture",
        serde_json::json!({"target": target, "action": "start", "filter": "udp port 5060", "max_size_mb": 1, "duration_min": 5}),
        shutdown,
    )
    .await?;
    say(format!(
        "cloud started a packet capture on {target}: {} ({})",
        r["result"].as_str().unwrap_or("?"),
        r["payload"]["name"]
            .as_str()
            .unwrap_or(r["reason"].as_str().unwrap_or(""))
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = command(
        cloud_addr,
        "packet_capture",
        serde_json::json!({"target": target, "action": "stop"}),
        shutdown,
    )
    .await?;
    let a = &r["payload"]["artifact"];
    if r["result"] != "success" {
        say(format!(
            "packet capture stop failed: {}",
            r["reason"].as_str().unwrap_or("?")
        ));
    } else {
        let id = a["artifact_id"].as_str().unwrap_or("").to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut state = serde_json::Value::Null;
        while Instant::now() < deadline && !shutdown.is_cancelled() {
            state = client::get(cloud_addr, &format!("/sim/artifacts/{id}")).await?;
            if state["state"] == "complete" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        say(format!(
            "packet capture {} ({} bytes): the phone uploaded it to the relay's edge, the relay handed it to the cloud as artifact {} ({}, SHA-256 checked)",
            a["name"].as_str().unwrap_or("?"),
            a["size"],
            id,
            state["state"].as_str().unwrap_or("?")
        ));
    }
    let r = command(
        cloud_addr,
        "get_config",
        serde_json::json!({"target": target, "source": "local"}),
        shutdown,
    )
    .await?;
    say(format!(
        "cloud read {target}'s local configuration: {}; kept on the relay as backup {}",
        r["result"].as_str().unwrap_or("?"),
        r["payload"]["backup_id"].as_str().unwrap_or("(none)")
    ));
    let r = command(
        cloud_addr,
        "list_config_backups",
        serde_json::json!({"mac": mac}),
        shutdown,
    )
    .await?;
    say(format!(
        "backups of {mac} on the relay: {} (at most {}; `ucrelay devices backups {mac}` lists them)",
        r["payload"]["backups"].as_array().map_or(0, |b| b.len()),
        r["payload"]["keep"]
    ));
    Ok(())
}

async fn wait_for_result(
    cloud_addr: SocketAddr,
    id: &str,
    shutdown: &CancellationToken,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !shutdown.is_cancelled() {
        let v = client::get(cloud_addr, &format!("/sim/commands/{id}")).await?;
        if v["state"] == "done" {
            return Ok(v["result"].clone());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("no result for command {id} within 20 s")
}
