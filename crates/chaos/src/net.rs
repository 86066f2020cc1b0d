//! The network the harness builds for one run: the reference cloud in a network namespace of its
//! own, reached by the harness over a clean control link, and by each relay over a WAN link of its
//! own that the harness can break.
//!
//! ```text
//!   root namespace                 <run>-wan namespace                  <run>-cloud namespace
//!   harness ──veth c0 ───────────────────────────────────────────── c1  (test API, never impaired)
//!   relay a ──veth 0r ─ 0m [macvtap]═ harness ═[macvtap] 0n ─ veth ─ 0c  cloud :8080
//!   relay b ──veth 1r ─ 1m [macvtap]═ harness ═[macvtap] 1n ─ veth ─ 1c
//! ```
//!
//! The kernel here has no `sch_netem` (CONFIG_NET_SCH_NETEM is off), so the WAN links are not
//! shaped by `tc netem`. Each one is a pair of veths whose middle ends, in a namespace with no IP
//! stack in use, carry a macvtap in passthru mode: every Ethernet frame crossing the link is read
//! by the harness from one `/dev/tapN` and written to the other. In between it applies what the
//! fault asks for, per frame and per direction, the way netem would: delay with jitter (which also
//! reorders), random loss, and a blackhole that drops everything silently, including frames
//! already queued. The endpoints are real kernel TCP stacks, so the relay sees real
//! retransmissions, real half-open connections and real connect timeouts. A partition takes the
//! relay's end of the link down (`ip link set down`), so its packets have no route at all.
//! Segmentation offload is capped at one segment per frame, so loss and delay apply per packet.

use crate::cleanup::{self, PREFIX, Undo};
use anyhow::{Context, Result, bail};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// The cloud's port inside its own namespace (the namespace is the harness's alone).
pub const CLOUD_PORT: u16 = 8080;

/// What a WAN link does to the frames crossing it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Impair {
    pub delay: Duration,
    pub jitter: Duration,
    /// Per frame, 0.0 to 1.0.
    pub loss: f64,
    /// Drop everything, silently.
    pub blackhole: bool,
}

/// One relay's WAN link.
pub struct Wan {
    /// The relay's end (root namespace).
    pub relay_dev: String,
    /// The cloud's address on this link.
    pub cloud_ip: Ipv4Addr,
    state: Arc<WanState>,
}

struct WanState {
    impair: Mutex<Impair>,
    stop: AtomicBool,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    /// Wakes the writers when the impairment changes (a blackhole drops what is queued).
    changed: Notify,
}

impl Wan {
    pub fn set(&self, imp: Impair) {
        *self.state.impair.lock().unwrap_or_else(|e| e.into_inner()) = imp;
        self.state.changed.notify_waiters();
    }

    /// Takes the relay's end of the link down (a partition) or up again.
    pub fn set_link(&self, up: bool) -> Result<()> {
        ip(&[
            "link",
            "set",
            &self.relay_dev,
            if up { "up" } else { "down" },
        ])
    }

    /// Frames forwarded and dropped so far, both directions.
    pub fn frames(&self) -> (u64, u64) {
        (
            self.state.forwarded.load(Ordering::Relaxed),
            self.state.dropped.load(Ordering::Relaxed),
        )
    }
}

pub struct Net {
    pub ns_cloud: String,
    pub ns_wan: String,
    /// The cloud's address on the control link.
    pub ctl_ip: Ipv4Addr,
    pub wans: Vec<Wan>,
    ctl_dev: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    torn_down: bool,
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

fn run(prog: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {prog} (apt-get install iproute2)"))?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn output(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog).args(args).output()?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A /24 in 198.18.0.0/15 (reserved for network benchmarks, RFC 2544) that no interface here uses.
fn free_block(rng: &mut fastrand::Rng) -> Result<(u8, u8)> {
    let used = output("ip", &["-4", "-o", "addr", "show"]).unwrap_or_default()
        + &output("ip", &["-4", "route", "show"]).unwrap_or_default();
    for _ in 0..200 {
        let (a, b) = (18 + rng.u8(0..2), rng.u8(0..=255));
        if !used.contains(&format!("198.{a}.{b}.")) {
            return Ok((a, b));
        }
    }
    bail!("no free /24 in 198.18.0.0/15")
}

impl Net {
    /// Builds the namespaces and links for `relays` relays and starts the WAN forwarders. `dir`
    /// holds the tap device nodes.
    pub async fn build(dir: &Path, relays: usize, rng: &mut fastrand::Rng) -> Result<Net> {
        // Each world of this process gets its own names: a namespace's devices die asynchronously
        // after `ip netns del`, so the next seed must not reuse them.
        static WORLDS: AtomicU64 = AtomicU64::new(0);
        let n = WORLDS.fetch_add(1, Ordering::Relaxed) % 36;
        let tag = char::from_digit(n as u32, 36).unwrap_or('z');
        let id = format!("{}{tag}", std::process::id());
        let ns_cloud = format!("{PREFIX}-{}-{tag}-cloud", std::process::id());
        let ns_wan = format!("{PREFIX}-{}-{tag}-wan", std::process::id());
        let (a, b) = free_block(rng)?;
        let addr = |host: u8| Ipv4Addr::new(198, a, b, host);
        // Short interface names (15 characters at most): uc<pid><suffix>.
        let dev = |s: &str| format!("uc{id}{s}");
        for ns in [&ns_cloud, &ns_wan] {
            ip(&["netns", "add", ns])?;
            cleanup::push(Undo::Netns(ns.clone()));
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            let _ = run(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1",
                ],
            );
        }
        // The control link: harness <-> cloud, never impaired.
        let (c0, c1) = (dev("c0"), dev("c1"));
        ip(&[
            "link", "add", &c0, "type", "veth", "peer", "name", &c1, "netns", &ns_cloud,
        ])?;
        disable_ipv6(&c0);
        ip(&["addr", "add", &format!("{}/30", addr(1)), "dev", &c0])?;
        ip(&["link", "set", &c0, "up"])?;
        ip(&[
            "-n",
            &ns_cloud,
            "addr",
            "add",
            &format!("{}/30", addr(2)),
            "dev",
            &c1,
        ])?;
        ip(&["-n", &ns_cloud, "link", "set", &c1, "up"])?;

        let mut wans = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..relays {
            let base = 4 * (i as u8 + 1);
            let (r, m, n, c) = (
                dev(&format!("{i}r")),
                dev(&format!("{i}m")),
                dev(&format!("{i}n")),
                dev(&format!("{i}c")),
            );
            ip(&[
                "link", "add", &r, "type", "veth", "peer", "name", &m, "netns", &ns_wan,
            ])?;
            ip(&[
                "-n", &ns_wan, "link", "add", &n, "type", "veth", "peer", "name", &c, "netns",
                &ns_cloud,
            ])?;
            disable_ipv6(&r);
            let (relay_ip, cloud_ip) = (addr(base + 1), addr(base + 2));
            ip(&["addr", "add", &format!("{relay_ip}/30"), "dev", &r])?;
            ip(&[
                "link",
                "set",
                &r,
                "up",
                "gso_max_segs",
                "1",
                "gso_max_size",
                "1500",
            ])?;
            ip(&[
                "-n",
                &ns_cloud,
                "addr",
                "add",
                &format!("{cloud_ip}/30"),
                "dev",
                &c,
            ])?;
            ip(&[
                "-n",
                &ns_cloud,
                "link",
                "set",
                &c,
                "up",
                "gso_max_segs",
                "1",
                "gso_max_size",
                "1500",
            ])?;
            let mut taps = Vec::new();
            for end in [&m, &n] {
                let tap = format!("{end}t");
                ip(&["-n", &ns_wan, "link", "set", end, "up"])?;
                ip(&[
                    "-n", &ns_wan, "link", "add", "link", end, "name", &tap, "type", "macvtap",
                    "mode", "passthru",
                ])?;
                ip(&["-n", &ns_wan, "link", "set", &tap, "up"])?;
                // The device node's numbers, from sysfs as the wan namespace sees it.
                let numbers = output(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &ns_wan,
                        "sh",
                        "-c",
                        &format!("cat /sys/class/net/{tap}/macvtap/tap*/dev"),
                    ],
                )?;
                let (major, minor) = numbers
                    .trim()
                    .split_once(':')
                    .with_context(|| format!("no device numbers for {tap}: {numbers:?}"))?;
                let node = dir.join(&tap);
                let _ = std::fs::remove_file(&node);
                run(
                    "mknod",
                    &[node.to_str().unwrap_or_default(), "c", major, minor],
                )?;
                taps.push(open_tap(&node)?);
            }
            let state = Arc::new(WanState {
                impair: Mutex::new(Impair::default()),
                stop: AtomicBool::new(false),
                forwarded: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                changed: Notify::new(),
            });
            let (relay_side, cloud_side) = (Arc::new(taps.remove(0)), Arc::new(taps.remove(0)));
            let seed = rng.u64(..);
            tasks.push(tokio::spawn(forward(
                relay_side.clone(),
                cloud_side.clone(),
                state.clone(),
                seed,
            )));
            tasks.push(tokio::spawn(forward(
                cloud_side,
                relay_side,
                state.clone(),
                seed ^ 0x5bd1_e995,
            )));
            wans.push(Wan {
                relay_dev: r,
                cloud_ip,
                state,
            });
        }
        Ok(Net {
            ns_cloud,
            ns_wan,
            ctl_ip: addr(2),
            wans,
            ctl_dev: c0,
            tasks,
            torn_down: false,
        })
    }

    /// Stops the forwarders and removes the namespaces (which takes every link with them).
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        for w in &self.wans {
            w.state.stop.store(true, Ordering::Relaxed);
            w.state.changed.notify_waiters();
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        // The root ends first: deleting one end of a veth pair removes both at once.
        for w in &self.wans {
            let _ = ip(&["link", "del", &w.relay_dev]);
        }
        let _ = ip(&["link", "del", &self.ctl_dev]);
        for ns in [&self.ns_cloud, &self.ns_wan] {
            let u = Undo::Netns(ns.clone());
            cleanup::undo(&u);
            cleanup::forget(&u);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn disable_ipv6(dev: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
}

fn open_tap(path: &Path) -> Result<AsyncFd<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // The File is owned by the AsyncFd for its whole life (the I/O-safety concern behind the
    // deprecation is a borrowed fd closed elsewhere), and the safe constructor is the only one.
    #[allow(deprecated)]
    let fd = AsyncFd::new(f)?;
    Ok(fd)
}

/// Frames waiting for their release time, earliest first (the sequence number keeps equal times in
/// arrival order).
type DelayQueue = BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>;

/// One direction of a WAN link: frames from `src` to `dst`, through the impairment.
async fn forward(
    src: Arc<AsyncFd<std::fs::File>>,
    dst: Arc<AsyncFd<std::fs::File>>,
    state: Arc<WanState>,
    seed: u64,
) {
    use std::io::{Read, Write};
    let queue: Arc<Mutex<DelayQueue>> = Default::default();
    let queued = Arc::new(Notify::new());
    let writer = {
        let (queue, queued, state) = (queue.clone(), queued.clone(), state.clone());
        tokio::spawn(async move {
            loop {
                if state.stop.load(Ordering::Relaxed) {
                    return;
                }
                let next = {
                    let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                    if state
                        .impair
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .blackhole
                    {
                        // A blackhole also swallows what was already on its way.
                        let n = q.len() as u64;
                        q.clear();
                        state.dropped.fetch_add(n, Ordering::Relaxed);
                    }
                    match q.peek() {
                        Some(Reverse((at, _, _))) if *at <= Instant::now() => {
                            q.pop().map(|Reverse((_, _, f))| Ok(f))
                        }
                        Some(Reverse((at, _, _))) => Some(Err(*at)),
                        None => None,
                    }
                };
                match next {
                    Some(Ok(frame)) => loop {
                        let mut guard = match dst.writable().await {
                            Ok(g) => g,
                            Err(_) => return,
                        };
                        match guard.try_io(|fd| fd.get_ref().write(&frame)) {
                            Ok(_) => {
                                state.forwarded.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            Err(_would_block) => continue,
                        }
                    },
                    Some(Err(at)) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(at.into()) => {}
                            _ = queued.notified() => {}
                            _ = state.changed.notified() => {}
                        }
                    }
                    None => {
                        tokio::select! {
                            _ = queued.notified() => {}
                            _ = state.changed.notified() => {}
                        }
                    }
                }
            }
        })
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut seq = 0u64;
    let mut buf = vec![0u8; 70_000];
    loop {
        if state.stop.load(Ordering::Relaxed) {
            break;
        }
        let mut guard = match src.readable().await {
            Ok(g) => g,
            Err(_) => break,
        };
        let n = match guard.try_io(|fd| fd.get_ref().read(&mut buf)) {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => break,
            Err(_would_block) => continue,
        };
        let imp = state
            .impair
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if imp.blackhole || (imp.loss > 0.0 && rng.f64() < imp.loss) {
            state.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut delay = imp.delay;
        if !imp.jitter.is_zero() {
            let j = imp.jitter.as_micros() as i64;
            let off = rng.i64(-j..=j);
            delay = Duration::from_micros((delay.as_micros() as i64 + off).max(0) as u64);
        }
        seq += 1;
        queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Reverse((Instant::now() + delay, seq, buf[..n].to_vec())));
        queued.notify_one();
    }
    writer.abort();
}
