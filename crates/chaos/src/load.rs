//! The work that flows all the time, as a busy tenant would make it: scheduled tasks and one-shot
//! commands created at the cloud for either relay, new firmware images published (and old ones
//! withdrawn), and phones provisioning and downloading images through the relays' edges. Every
//! answer a phone gets is judged as it arrives: image bytes against the SHA-256 they were
//! published with, and no 5xx but the ones the relay is allowed to give.

use crate::device;
use crate::world::{FQDN, PHONES, PROVISIONING_TIMEOUT, RelayNode, World};
use anyhow::Result;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// What the harness published, by SHA-256 (kept after withdrawal: a relay may still serve it).
#[derive(Default)]
pub struct Images {
    pub by_sha: HashMap<String, Arc<Vec<u8>>>,
    /// Names currently published, oldest first.
    pub live: Vec<String>,
    next: u64,
}

/// Ids of the work created at the cloud, to check at the end.
#[derive(Default)]
pub struct Work {
    pub tasks: Vec<(String, usize)>,
    pub commands: Vec<(String, usize)>,
}

pub struct Load {
    pub images: Mutex<Images>,
    pub work: Mutex<Work>,
    /// Per relay: the image files its edge lists (path, sha256, size), refreshed every 2 s.
    pub listed: Vec<Mutex<Vec<(String, String, u64)>>>,
}

impl Load {
    pub fn new(relays: usize) -> Load {
        Load {
            images: Mutex::new(Images::default()),
            work: Mutex::new(Work::default()),
            listed: (0..relays).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// Publishes a new image of `size` random bytes (written aside, then renamed into place), and
    /// withdraws the oldest beyond `keep`.
    pub fn publish(&self, world: &World, rng: &mut fastrand::Rng, size: usize, keep: usize) {
        let mut data = vec![0u8; size];
        rng.fill(&mut data);
        let sha = hex(&Sha256::digest(&data));
        let mut img = self.images.lock().unwrap_or_else(|e| e.into_inner());
        img.next += 1;
        let name = format!("fw-{:04}.ld", img.next);
        let tmp = world.published.join(format!(".{name}.tmp"));
        if std::fs::write(&tmp, &data).is_ok() {
            let _ = std::fs::rename(&tmp, world.published.join(&name));
        }
        img.by_sha.insert(sha, Arc::new(data));
        img.live.push(name);
        while img.live.len() > keep {
            let old = img.live.remove(0);
            let _ = std::fs::remove_file(world.published.join(old));
        }
    }

    fn known(&self, sha: &str) -> Option<Arc<Vec<u8>>> {
        self.images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_sha
            .get(sha)
            .cloned()
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn rfc3339_in(d: Duration) -> String {
    let t = SystemTime::now() + d;
    jiff::Timestamp::try_from(t)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

/// The phones a relay's tasks use: each relay has its own half of the fleet.
fn phone_range(relay: usize, relays: usize) -> std::ops::Range<usize> {
    let half = PHONES / relays;
    relay * half..(relay + 1) * half
}

fn pick_targets(world: &World, rng: &mut fastrand::Rng, relay: usize, n: usize) -> Vec<String> {
    let range = phone_range(relay, world.relays.len());
    let mut idx: Vec<usize> = range.collect();
    rng.shuffle(&mut idx);
    idx.truncate(n);
    idx.iter().map(|i| world.phones.target(*i)).collect()
}

/// Creates one task for `relay`; returns its id.
pub async fn create_task(
    world: &World,
    load: &Load,
    rng: &mut fastrand::Rng,
    relay: usize,
    n: usize,
    at: Option<Duration>,
) -> Option<String> {
    let relay_id = world.relays[relay].id()?;
    let targets = pick_targets(world, rng, relay, n);
    let (kind, payload) = match rng.u8(0..10) {
        0..=1 => ("reboot", json!({})),
        2..=4 => (
            "get_params",
            json!({"params": ["device.prov.serverName", "voIpProt.server.1.address"]}),
        ),
        5..=7 => (
            "set_params",
            json!({"params": {"device.prov.serverName": format!("prov{}.chaos.test", rng.u16(..))}}),
        ),
        _ => ("check_sync", json!({})),
    };
    let mut body =
        json!({"type": kind, "targets": targets, "payload": payload, "relay_id": relay_id});
    if let Some(at) = at {
        body["at"] = json!(rfc3339_in(at));
    }
    let v = world.cloud.post("/sim/tasks", body).await.ok()?;
    let id = v["task_id"].as_str()?.to_string();
    load.work
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .tasks
        .push((id.clone(), relay));
    Some(id)
}

async fn create_command(world: &World, load: &Load, rng: &mut fastrand::Rng, relay: usize) {
    let Some(relay_id) = world.relays[relay].id() else {
        return;
    };
    let (name, params) = match rng.u8(0..6) {
        0..=2 => ("ping", json!({"n": rng.u32(..)})),
        3 => ("relay_status", json!({})),
        _ => {
            let target = pick_targets(world, rng, relay, 1).remove(0);
            (
                "get_params",
                json!({"target": target, "params": ["device.prov.serverName"]}),
            )
        }
    };
    let body = json!({"relay_id": relay_id, "name": name, "params": params});
    if let Ok(v) = world.cloud.post("/sim/commands", body).await
        && let Some(id) = v["command_id"].as_str()
    {
        load.work
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .commands
            .push((id.to_string(), relay));
    }
}

/// Tasks, commands and image churn until `stop`.
pub async fn work_loop(
    world: Arc<World>,
    load: Arc<Load>,
    seed: u64,
    image_every: Duration,
    stop: CancellationToken,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut next_task = Instant::now();
    let mut next_image = Instant::now() + image_every;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let relay = rng.usize(0..world.relays.len());
        if Instant::now() >= next_task {
            let at = (rng.u8(0..10) < 3).then(|| Duration::from_secs(rng.u64(2..8)));
            let n = rng.usize(5..40);
            create_task(&world, &load, &mut rng, relay, n, at).await;
            next_task = Instant::now() + Duration::from_millis(rng.u64(1000..3000));
        }
        if Instant::now() >= next_image {
            let size = rng.usize(300_000..2_500_000);
            load.publish(&world, &mut rng, size, 4);
            world.report.count("images_published", 1);
            next_image = Instant::now() + image_every.mul_f64(0.7 + rng.f64() * 0.6);
        }
        create_command(&world, &load, &mut rng, relay).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(rng.u64(400..1200))) => {}
        }
    }
}

/// Keeps `load.listed[relay]` in line with what the relay's edge lists.
pub async fn listing_loop(
    world: Arc<World>,
    load: Arc<Load>,
    relay: usize,
    stop: CancellationToken,
) {
    let node = world.relays[relay].clone();
    loop {
        if let Ok(v) = crate::world::admin_get(&node.socket, "/v1/images").await {
            let mut files = Vec::new();
            for img in v["images"].as_array().into_iter().flatten() {
                for f in img["files"].as_array().into_iter().flatten() {
                    if let (Some(p), Some(s), Some(z)) =
                        (f["path"].as_str(), f["sha256"].as_str(), f["size"].as_u64())
                    {
                        files.push((p.to_string(), s.to_string(), z));
                    }
                }
            }
            *load.listed[relay].lock().unwrap_or_else(|e| e.into_inner()) = files;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// One simulated phone worker on `relay`'s edge: provisioning and image downloads, judged.
pub async fn device_loop(
    world: Arc<World>,
    load: Arc<Load>,
    relay: usize,
    seed: u64,
    stop: CancellationToken,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let node = world.relays[relay].clone();
    let tls = match device::tls(&world.ca_der) {
        Ok(t) => t,
        Err(e) => {
            world.report.violation(format!("device TLS setup: {e}"));
            return;
        }
    };
    loop {
        let pause = Duration::from_millis(rng.u64(50..400));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        let Some(port) = node.port() else {
            continue;
        };
        let started = world.report.now();
        if rng.bool() {
            let files = load.listed[relay]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if files.is_empty() {
                continue;
            }
            let (path, _, size) = files[rng.usize(0..files.len())].clone();
            let range = (rng.u8(0..4) == 0 && size > 10).then(|| {
                let a = rng.u64(0..size - 1);
                (a, rng.u64(a..size).min(a + 200_000))
            });
            match device::get(&tls, FQDN, port, &path, range).await {
                Ok(f) => judge_image(&world, &load, &node, &path, range, &f, started),
                Err(_) => world.report.count("device_transport_errors", 1),
            }
        } else {
            provision(&world, &node, &mut rng, port, started).await;
        }
    }
}

fn judge_image(
    world: &World,
    load: &Load,
    node: &RelayNode,
    path: &str,
    range: Option<(u64, u64)>,
    f: &device::Fetched,
    started: f64,
) {
    let r = &world.report;
    r.device_requests.fetch_add(1, Ordering::Relaxed);
    r.device_bytes
        .fetch_add(f.body.len() as u64, Ordering::Relaxed);
    let what = format!("{}: GET {path} (range {range:?})", node.label());
    match f.status {
        200 | 206 => {
            let etag = f
                .headers
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .trim_matches('"')
                .to_string();
            let Some(known) = load.known(&etag) else {
                r.bad_bytes(f.body.len() as u64);
                r.violation(format!(
                    "{what} answered {} with ETag {etag:?}, which names no image the cloud published",
                    f.status
                ));
                return;
            };
            let start = if f.status == 206 {
                content_range_start(&f.headers).unwrap_or(u64::MAX)
            } else {
                0
            };
            let expect = usize::try_from(start)
                .ok()
                .and_then(|s| known.get(s..s.checked_add(f.body.len())?));
            match expect {
                Some(want) if want == f.body.as_slice() => {
                    if f.status == 200 && f.broken.is_none() && f.body.len() != known.len() {
                        r.violation(format!(
                            "{what}: a complete 200 of {} bytes for a {}-byte image",
                            f.body.len(),
                            known.len()
                        ));
                    }
                }
                _ => {
                    let bad = match expect {
                        Some(want) => want
                            .iter()
                            .zip(f.body.iter())
                            .filter(|(a, b)| a != b)
                            .count() as u64,
                        None => f.body.len() as u64,
                    };
                    r.bad_bytes(bad.max(1));
                    r.violation(format!(
                        "{what}: {bad} of {} bytes received from offset {start} do not match the image with SHA-256 {etag}",
                        f.body.len()
                    ));
                }
            }
        }
        // Withdrawn from the manifest since the device looked: no longer an image path, so the
        // provisioning tree answers (401 challenge, 404).
        401 | 404 => r.count("device_image_gone", 1),
        503 => {
            if f.headers.get(http::header::RETRY_AFTER).is_none() {
                r.violation(format!("{what}: 503 without Retry-After"));
            }
            r.count("device_image_503", 1);
        }
        // Withdrawn since the device looked: the path went to the provisioning proxy.
        502 | 504 => upstream_excuse(world, node, &what, f.status, &f.body, started),
        s => r.violation(format!("{what}: answered {s}")),
    }
}

/// A 502 or 504 from the provisioning proxy is allowed only while the upstream (the cloud, over
/// this relay's WAN link) was unreachable, or within the proxy's timeout after.
fn upstream_excuse(
    world: &World,
    node: &RelayNode,
    what: &str,
    status: u16,
    body: &[u8],
    started: f64,
) {
    let r = &world.report;
    r.count("device_502_504", 1);
    let grace = PROVISIONING_TIMEOUT.as_secs_f64() + 5.0;
    let excused = r
        .events_between(started - 1.0, r.now(), grace)
        .iter()
        .any(|e| {
            matches!(
                e.kind,
                "cloud_kill" | "blackhole" | "partition" | "loss" | "latency"
            ) && (e.target == "cloud" || e.target == node.label())
        });
    if !excused {
        r.violation(format!(
            "{what} answered {status} while its upstream was reachable: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
}

fn content_range_start(h: &http::HeaderMap) -> Option<u64> {
    let v = h.get(http::header::CONTENT_RANGE)?.to_str().ok()?;
    v.strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The phone's boot sequence through the relay: its config (the shared one when it has none of
/// its own) and its boot log, every answer judged.
async fn provision(
    world: &World,
    node: &RelayNode,
    rng: &mut fastrand::Rng,
    port: u16,
    started: f64,
) {
    let mac = format!("0004f2{:06x}", rng.u32(0..PHONES as u32));
    let client = match ucrelay_sim::phone::ProvClient::new(&format!("https://{FQDN}:{port}/"), &mac)
    {
        Ok(c) => c
            .with_root_ca_der(world.ca_der[0].clone())
            .with_root_ca_der(world.ca_der[1].clone())
            .with_resolve(FQDN, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .with_timeout(Duration::from_secs(15)),
        Err(e) => {
            world.report.violation(format!("provisioning client: {e}"));
            return;
        }
    };
    let steps: [(&str, String); 2] = [
        ("GET", "000000000000.cfg".to_string()),
        ("PUT", format!("{mac}-app.log")),
    ];
    for (method, path) in steps {
        let answer = if method == "GET" {
            client.get(&path).await
        } else {
            client
                .put(
                    &path,
                    bytes::Bytes::from_static(b"0000.120|so   |4|00|Boot\n"),
                )
                .await
        };
        let Ok(resp) = answer else {
            world.report.count("device_transport_errors", 1);
            return;
        };
        world.report.device_requests.fetch_add(1, Ordering::Relaxed);
        judge_provisioning(world, node, method, &path, &resp, started);
    }
}

fn judge_provisioning(
    world: &World,
    node: &RelayNode,
    method: &str,
    path: &str,
    resp: &ucrelay_sim::phone::ProvResponse,
    started: f64,
) {
    let r = &world.report;
    let what = format!("{}: {method} /{path}", node.label());
    match resp.status {
        s if s < 500 => {}
        503 if resp.headers.get(http::header::RETRY_AFTER).is_some() => {
            r.count("device_prov_503", 1)
        }
        502 | 504 => upstream_excuse(world, node, &what, resp.status, &resp.body, started),
        s => r.violation(format!(
            "{what} answered {s}{}: {}",
            if s == 503 { " without Retry-After" } else { "" },
            String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)])
        )),
    }
}

/// Reads the cloud's view of one task: (status, total, finished, repeated reports, targets with a
/// result).
pub async fn task_view(world: &World, id: &str) -> Result<Value> {
    world.cloud.get(&format!("/sim/tasks/{id}")).await
}
