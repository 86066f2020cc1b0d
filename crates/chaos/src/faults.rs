//! The faults: planned from the seed before the run starts (what, on which relay, when, for how
//! long), then injected at their times, several at once. Faults on one relay's WAN link, on one
//! filesystem, or on one relay's process take turns (a later one waits for the earlier to end);
//! everything else overlaps freely.

use crate::load::{self, Load};
use crate::net::Impair;
use crate::world::{PING_INTERVAL, RelayNode, World};
use nix::sys::signal::Signal;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KillPoint {
    Anytime,
    MidSync,
    MidTask,
    MidResults,
    MidReload,
}

#[derive(Debug, Clone)]
pub enum Fault {
    RelayKill {
        relay: usize,
        at: KillPoint,
        down: Duration,
    },
    CloudKill {
        down: Duration,
    },
    Latency {
        relay: usize,
        delay: Duration,
        jitter: Duration,
        dur: Duration,
    },
    Loss {
        relay: usize,
        pct: u32,
        dur: Duration,
    },
    Blackhole {
        relay: usize,
        dur: Duration,
    },
    Partition {
        relay: usize,
        dur: Duration,
    },
    StoreFull {
        relay: usize,
        dur: Duration,
    },
    CacheFull {
        relay: usize,
        dur: Duration,
    },
    CertSwap {
        relay: usize,
        bad: bool,
    },
    HupStorm {
        relay: usize,
        count: u32,
    },
}

impl Fault {
    fn relay(&self) -> Option<usize> {
        match self {
            Fault::CloudKill { .. } => None,
            Fault::RelayKill { relay, .. }
            | Fault::Latency { relay, .. }
            | Fault::Loss { relay, .. }
            | Fault::Blackhole { relay, .. }
            | Fault::Partition { relay, .. }
            | Fault::StoreFull { relay, .. }
            | Fault::CacheFull { relay, .. }
            | Fault::CertSwap { relay, .. }
            | Fault::HupStorm { relay, .. } => Some(*relay),
        }
    }
}

/// A fault and when (seconds into the chaos window) it starts.
pub type Plan = Vec<(f64, Fault)>;

fn secs(rng: &mut fastrand::Rng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(lo + rng.f64() * (hi - lo))
}

fn random_fault(rng: &mut fastrand::Rng, kind: &str, relays: usize) -> Fault {
    let relay = rng.usize(0..relays);
    match kind {
        "relay_kill" => Fault::RelayKill {
            relay,
            at: [
                KillPoint::Anytime,
                KillPoint::MidSync,
                KillPoint::MidTask,
                KillPoint::MidResults,
                KillPoint::MidReload,
            ][rng.usize(0..5)],
            down: secs(rng, 0.3, 3.0),
        },
        "cloud_kill" => Fault::CloudKill {
            down: secs(rng, 1.0, 6.0),
        },
        "latency" => Fault::Latency {
            relay,
            delay: Duration::from_millis(rng.u64(30..400)),
            jitter: Duration::from_millis(rng.u64(5..150)),
            dur: secs(rng, 4.0, 12.0),
        },
        "loss" => Fault::Loss {
            relay,
            pct: rng.u32(2..25),
            dur: secs(rng, 4.0, 12.0),
        },
        // Long enough for the relay to notice (three ping intervals) and a few seconds more.
        "blackhole" => Fault::Blackhole {
            relay,
            dur: PING_INTERVAL * 3 + secs(rng, 2.0, 8.0),
        },
        "partition" => Fault::Partition {
            relay,
            dur: secs(rng, 2.0, 10.0),
        },
        "store_full" => Fault::StoreFull {
            relay,
            dur: secs(rng, 4.0, 10.0),
        },
        "cache_full" => Fault::CacheFull {
            relay,
            dur: secs(rng, 4.0, 10.0),
        },
        "cert_swap" => Fault::CertSwap {
            relay,
            bad: rng.u8(0..3) == 0,
        },
        _ => Fault::HupStorm {
            relay,
            count: rng.u32(10..60),
        },
    }
}

pub const KINDS: &[&str] = &[
    "relay_kill",
    "cloud_kill",
    "latency",
    "loss",
    "blackhole",
    "partition",
    "store_full",
    "cache_full",
    "cert_swap",
    "hup_storm",
];

/// The short profile: every kind of fault at least once, and every kill point, inside `window`
/// seconds, plus `extra` random ones.
pub fn plan_short(seed: u64, window: f64, relays: usize, extra: usize) -> Plan {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut faults: Vec<Fault> = KINDS
        .iter()
        .filter(|k| **k != "relay_kill")
        .map(|k| random_fault(&mut rng, k, relays))
        .collect();
    for at in [
        KillPoint::Anytime,
        KillPoint::MidSync,
        KillPoint::MidTask,
        KillPoint::MidResults,
        KillPoint::MidReload,
    ] {
        faults.push(Fault::RelayKill {
            relay: rng.usize(0..relays),
            at,
            down: secs(&mut rng, 0.3, 2.0),
        });
    }
    faults.push(Fault::CertSwap {
        relay: rng.usize(0..relays),
        bad: true,
    });
    for _ in 0..extra {
        let k = KINDS[rng.usize(0..KINDS.len())];
        faults.push(random_fault(&mut rng, k, relays));
    }
    rng.shuffle(&mut faults);
    let mut plan: Plan = faults
        .into_iter()
        .map(|f| (rng.f64() * window * 0.8, f))
        .collect();
    plan.sort_by(|a, b| a.0.total_cmp(&b.0));
    plan
}

/// The long profile: the cloud flaps every `flap` seconds, and random faults of every kind come
/// on average every `gap` seconds, for `window` seconds.
pub fn plan_long(seed: u64, window: f64, relays: usize, flap: f64, gap: f64) -> Plan {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut plan = Plan::new();
    let mut t = flap;
    while t < window - 30.0 {
        plan.push((
            t,
            Fault::CloudKill {
                down: secs(&mut rng, 2.0, 10.0),
            },
        ));
        t += flap;
    }
    let mut t = 5.0;
    while t < window - 30.0 {
        let k = KINDS[rng.usize(0..KINDS.len())];
        plan.push((t, random_fault(&mut rng, k, relays)));
        t += gap * (0.3 + rng.f64() * 1.4);
    }
    plan.sort_by(|a, b| a.0.total_cmp(&b.0));
    plan
}

/// Per-relay turns: one WAN fault, one disk fault per filesystem, one process fault at a time.
pub struct Turns {
    wan: Vec<tokio::sync::Mutex<()>>,
    store: Vec<tokio::sync::Mutex<()>>,
    cache: Vec<tokio::sync::Mutex<()>>,
    life: Vec<tokio::sync::Mutex<()>>,
    cloud: tokio::sync::Mutex<()>,
}

impl Turns {
    pub fn new(relays: usize) -> Turns {
        let v = || (0..relays).map(|_| tokio::sync::Mutex::new(())).collect();
        Turns {
            wan: v(),
            store: v(),
            cache: v(),
            life: v(),
            cloud: tokio::sync::Mutex::new(()),
        }
    }
}

/// Injects the plan, starting each fault at its time; returns when all have ended.
pub async fn run(
    world: Arc<World>,
    load: Arc<Load>,
    plan: Plan,
    seed: u64,
    stop: CancellationToken,
) {
    let turns = Arc::new(Turns::new(world.relays.len()));
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, (at, fault)) in plan.into_iter().enumerate() {
        let when = start + Duration::from_secs_f64(at);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(when.into()) => {}
        }
        let (world, load, turns, stop) = (world.clone(), load.clone(), turns.clone(), stop.clone());
        let rng = fastrand::Rng::with_seed(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        set.spawn(async move { inject(&world, &load, &turns, fault, rng, &stop).await });
    }
    while set.join_next().await.is_some() {}
}

async fn sleep_or(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

async fn inject(
    world: &World,
    load: &Load,
    turns: &Turns,
    fault: Fault,
    mut rng: fastrand::Rng,
    stop: &CancellationToken,
) {
    let report = &world.report;
    let target = match fault.relay() {
        Some(r) => world.relays[r].label(),
        None => "cloud".to_string(),
    };
    match fault {
        Fault::RelayKill { relay, at, down } => {
            let _turn = turns.life[relay].lock().await;
            let node = &world.relays[relay];
            let found = wait_kill_point(world, load, node, relay, at, &mut rng).await;
            let id = report.begin(
                "relay_kill",
                &target,
                format!(
                    "SIGKILL {at:?}{}, down {down:.1?}",
                    if found {
                        ""
                    } else {
                        " (point not seen in time: killed anyway)"
                    }
                ),
            );
            node.kill().await;
            sleep_or(stop, down).await;
            restart(world, node).await;
            report.end(id);
        }
        Fault::CloudKill { down } => {
            let _turn = turns.cloud.lock().await;
            let id = report.begin("cloud_kill", &target, format!("SIGKILL, down {down:.1?}"));
            world.cloud.kill().await;
            sleep_or(stop, down).await;
            if let Err(e) = world.cloud.start().await {
                report.violation(format!("the reference cloud did not come back: {e:#}"));
            }
            report.end(id);
        }
        Fault::Latency {
            relay,
            delay,
            jitter,
            dur,
        } => {
            let _turn = turns.wan[relay].lock().await;
            let wan = &world.net.wans[relay];
            let id = report.begin(
                "latency",
                &target,
                format!("{delay:?} ± {jitter:?} for {dur:.1?}"),
            );
            wan.set(Impair {
                delay,
                jitter,
                ..Impair::default()
            });
            sleep_or(stop, dur).await;
            wan.set(Impair::default());
            report.end(id);
        }
        Fault::Loss { relay, pct, dur } => {
            let _turn = turns.wan[relay].lock().await;
            let wan = &world.net.wans[relay];
            let id = report.begin("loss", &target, format!("{pct}% of frames for {dur:.1?}"));
            wan.set(Impair {
                loss: f64::from(pct) / 100.0,
                ..Impair::default()
            });
            sleep_or(stop, dur).await;
            wan.set(Impair::default());
            report.end(id);
        }
        Fault::Blackhole { relay, dur } => {
            let _turn = turns.wan[relay].lock().await;
            let wan = &world.net.wans[relay];
            let id = report.begin(
                "blackhole",
                &target,
                format!("everything dropped silently for {dur:.1?}"),
            );
            wan.set(Impair {
                blackhole: true,
                ..Impair::default()
            });
            let began = Instant::now();
            watch_channel(world, &world.relays[relay], began, dur, stop).await;
            wan.set(Impair::default());
            report.end(id);
        }
        Fault::Partition { relay, dur } => {
            let _turn = turns.wan[relay].lock().await;
            let wan = &world.net.wans[relay];
            let id = report.begin("partition", &target, format!("link down for {dur:.1?}"));
            if let Err(e) = wan.set_link(false) {
                report.violation(format!("cannot take the link down: {e:#}"));
            }
            let began = Instant::now();
            watch_channel(world, &world.relays[relay], began, dur, stop).await;
            if let Err(e) = wan.set_link(true) {
                report.violation(format!("cannot bring the link back: {e:#}"));
            }
            report.end(id);
        }
        Fault::StoreFull { relay, dur } => {
            let _turn = turns.store[relay].lock().await;
            let node = &world.relays[relay];
            let id = report.begin(
                "store_full",
                &target,
                format!("store filesystem full for {dur:.1?}"),
            );
            if let Err(e) = node.store.fill(0) {
                report.violation(format!("cannot fill the store's tmpfs: {e:#}"));
            }
            // A big task arriving now makes the store grow into the space that is not there.
            let n = rng.usize(200..400);
            load::create_task(world, load, &mut rng, relay, n, None).await;
            sleep_or(stop, dur).await;
            node.store.release();
            report.end(id);
        }
        Fault::CacheFull { relay, dur } => {
            let _turn = turns.cache[relay].lock().await;
            let node = &world.relays[relay];
            // Best mid-download: publish something new and wait until bytes flow.
            let mid = wait_downloading(world, load, node, &mut rng).await;
            let id = report.begin(
                "cache_full",
                &target,
                format!(
                    "image cache filesystem full for {dur:.1?}{}",
                    if mid { " (mid-download)" } else { "" }
                ),
            );
            if let Err(e) = node.cache.fill(0) {
                report.violation(format!("cannot fill the image cache's tmpfs: {e:#}"));
            }
            sleep_or(stop, dur).await;
            node.cache.release();
            report.end(id);
        }
        Fault::CertSwap { relay, bad } => {
            let _turn = turns.life[relay].lock().await;
            let node = &world.relays[relay];
            if node.pid().await.is_none() {
                return;
            }
            let n = rng.usize(0..2);
            let id = report.begin(
                "cert_swap",
                &target,
                if bad {
                    "a corrupt PFX, then SIGHUP, then a good one back".into()
                } else {
                    format!("certificate {n}, then SIGHUP")
                },
            );
            if bad {
                let _ = std::fs::write(&node.pfx, b"not a PFX at all");
                node.signal(Signal::SIGHUP).await;
                // The refusal shows in status; the old certificate keeps serving meanwhile.
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if let Ok(s) = node.status().await
                        && !s["edge"]["reload_error"].is_null()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            install_cert(node, n);
            node.signal(Signal::SIGHUP).await;
            report.end(id);
        }
        Fault::HupStorm { relay, count } => {
            let _turn = turns.life[relay].lock().await;
            let node = &world.relays[relay];
            let id = report.begin("hup_storm", &target, format!("{count} SIGHUPs"));
            for _ in 0..count {
                node.signal(Signal::SIGHUP).await;
                tokio::time::sleep(Duration::from_millis(rng.u64(2..25))).await;
            }
            report.end(id);
        }
    }
}

fn install_cert(node: &RelayNode, n: usize) {
    for (from, to) in [
        (format!("good{n}.pfx.pass"), "relay.pfx.pass"),
        (format!("good{n}.pfx"), "relay.pfx"),
    ] {
        let tmp = node.dir.join(format!("{to}.tmp"));
        if std::fs::copy(node.dir.join(from), &tmp).is_ok() {
            let _ = std::fs::rename(&tmp, node.dir.join(to));
        }
    }
}

/// Starts a relay again (as systemd would) and waits for it to be ready.
pub async fn restart(world: &World, node: &RelayNode) {
    if let Err(e) = node.start().await {
        world
            .report
            .violation(format!("{} cannot be started: {e:#}", node.label()));
        return;
    }
    if let Err(e) = node.wait_ready(Duration::from_secs(60)).await {
        world.report.violation(format!("{e:#}"));
    }
}

/// Waits (up to 15 s) until the relay is at the asked point; true when it got there.
async fn wait_kill_point(
    world: &World,
    load: &Load,
    node: &RelayNode,
    relay: usize,
    at: KillPoint,
    rng: &mut fastrand::Rng,
) -> bool {
    match at {
        KillPoint::Anytime => return true,
        KillPoint::MidReload => {
            node.signal(Signal::SIGHUP).await;
            tokio::time::sleep(Duration::from_millis(rng.u64(0..30))).await;
            return true;
        }
        KillPoint::MidSync => {
            let size = rng.usize(1_500_000..3_000_000);
            load.publish(world, rng, size, 4);
        }
        KillPoint::MidTask | KillPoint::MidResults => {
            let n = rng.usize(40..100);
            load::create_task(world, load, rng, relay, n, None).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(s) = node.status().await {
            let hit = match at {
                KillPoint::MidSync => syncing(&s),
                KillPoint::MidTask => s["devices"]["tasks"]["executing"].as_u64() > Some(0),
                _ => s["cloud"]["results_pending"].as_u64() > Some(0),
            };
            if hit {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn syncing(status: &serde_json::Value) -> bool {
    status["images"]["images"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|i| {
            let (d, t) = (
                i["bytes_done"].as_u64().unwrap_or(0),
                i["bytes_total"].as_u64().unwrap_or(0),
            );
            d > 0 && d < t
        })
}

async fn wait_downloading(
    world: &World,
    load: &Load,
    node: &RelayNode,
    rng: &mut fastrand::Rng,
) -> bool {
    let size = rng.usize(1_500_000..3_000_000);
    load.publish(world, rng, size, 4);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(s) = node.status().await
            && syncing(&s)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// During a blackhole or a partition: the relay may say "connected" for at most three ping
/// intervals after it began (its own dead-peer detection), never longer.
async fn watch_channel(
    world: &World,
    node: &RelayNode,
    began: Instant,
    dur: Duration,
    stop: &CancellationToken,
) {
    // The status is asked for at `asked`; a "connected" answer means the relay still believed in
    // the channel at some moment after `asked`. Timer slack for a loaded 2-core machine: 1 s (the
    // old tick-based check was up to a whole ping interval, 2 s, late).
    let limit = PING_INTERVAL * 3 + Duration::from_secs(1);
    let end = began + dur;
    let mut reported = false;
    let mut was_connected = None;
    while Instant::now() < end && !stop.is_cancelled() {
        let asked = Instant::now();
        let connected = match node.status().await {
            Ok(s) => s["cloud"]["channel"] == "connected",
            Err(_) => false,
        };
        let first = *was_connected.get_or_insert(connected);
        if first && !connected {
            // How long the relay took to notice, for the record.
            world.report.count("blackhole_noticed", 1);
            world.report.max(
                "blackhole_notice_max_ms",
                asked.duration_since(began).as_millis() as u64,
            );
            was_connected = Some(false);
        }
        if connected && asked.duration_since(began) > limit && !reported {
            reported = true;
            world.report.violation(format!(
                "{} still says its channel is connected {:.1?} after its WAN went silent (three ping intervals are {:?})",
                node.label(),
                asked.duration_since(began),
                PING_INTERVAL * 3
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
