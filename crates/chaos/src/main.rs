//! `ucrelay-chaos`: proves the relay's promises while real faults happen together.
//!
//! For each seed it builds a world (see `world`): the reference cloud in a network namespace of its
//! own, two relays whose WAN links to it the harness can break, 1,000 simulated phones, and real
//! work flowing all the time (`load`). Then it injects the seed's plan of faults (`faults`):
//! SIGKILL of a relay at chosen points, the cloud killed and restarted, latency, loss, blackholes
//! and partitions on a relay's WAN link, full store and image-cache filesystems, certificate swaps
//! and SIGHUP storms. The promises are checked while it runs and after the faults stop (`check`).
//!
//! A seed decides the plan and the work, so `ucrelay-chaos --profile short --seed N` replays the
//! same faults at the same offsets against the same work; the interleaving with the relay's own
//! timing is real and may differ. Needs root (namespaces, mounts). The last line printed is the
//! figures (see bench/README.md for its format); the exit code is 0 only when no promise broke.

mod check;
mod cleanup;
mod device;
mod disk;
mod faults;
mod load;
mod net;
mod report;
mod world;

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "ucrelay-chaos",
    about = "Faults together, promises checked: the relay's chaos harness"
)]
struct Args {
    /// `short` (CI: fixed seeds, about a minute each) or `long` (a soak: random seed, the cloud
    /// flapping every 60 s).
    #[arg(long, default_value = "short")]
    profile: String,
    /// Run only this seed (replays a failure). Default: the short profile's fixed seeds, or a
    /// random seed for the long profile.
    #[arg(long)]
    seed: Option<u64>,
    /// Length of the fault window, seconds (default: 40 short, 3600 long).
    #[arg(long)]
    duration: Option<u64>,
    /// The ucrelay binary to drive.
    #[arg(long, default_value = "target/debug/ucrelay")]
    bin: PathBuf,
    /// Keep the work directory (logs, configs, state) after the run.
    #[arg(long)]
    keep: bool,
}

/// The short profile's seeds: each covers every kind of fault and every kill point.
const SHORT_SEEDS: &[u64] = &[1, 2, 3];

pub struct Profile {
    pub name: &'static str,
    pub window: f64,
    pub warmup: Duration,
    pub settle: Duration,
    pub store_mb: u64,
    pub cache_mb: u64,
    pub devices_per_relay: usize,
    pub image_every: Duration,
}

fn main() {
    cleanup::install_panic_hook();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = rt.block_on(async {
        // Ctrl-C and SIGTERM: clean up, then exit.
        tokio::spawn(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            let code = tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            };
            eprintln!("chaos: interrupted; cleaning up");
            cleanup::run_all();
            std::process::exit(code);
        });
        match run(args).await {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("chaos: error: {e:#}");
                2
            }
        }
    });
    cleanup::run_all();
    std::process::exit(code);
}

async fn run(args: Args) -> Result<bool> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "the chaos harness needs root (network namespaces, tmpfs mounts); run it as root, as CI does"
        );
    }
    let bin = std::fs::canonicalize(&args.bin)
        .with_context(|| format!("{}: build it first (cargo build)", args.bin.display()))?;
    let profile = match args.profile.as_str() {
        "short" => Profile {
            name: "short",
            window: args.duration.unwrap_or(40) as f64,
            warmup: Duration::from_secs(4),
            settle: Duration::from_secs(90),
            store_mb: 64,
            cache_mb: 32,
            devices_per_relay: 4,
            image_every: Duration::from_secs(10),
        },
        "long" => Profile {
            name: "long",
            window: args.duration.unwrap_or(3600) as f64,
            warmup: Duration::from_secs(20),
            settle: Duration::from_secs(300),
            store_mb: 256,
            cache_mb: 32,
            devices_per_relay: 6,
            image_every: Duration::from_secs(30),
        },
        other => bail!("unknown profile {other:?}: short or long"),
    };
    let seeds: Vec<u64> = match (args.seed, profile.name) {
        (Some(s), _) => vec![s],
        (None, "short") => SHORT_SEEDS.to_vec(),
        (None, _) => vec![fastrand::u64(1..1_000_000)],
    };
    cleanup::sweep_stale();
    let mut all = check::Totals::default();
    let started = Instant::now();
    for &seed in &seeds {
        println!(
            "chaos: profile {} seed {seed} ({}s of faults); replay with: bench/chaos.sh {} {seed}",
            profile.name, profile.window, profile.name
        );
        let dir = std::env::temp_dir().join(format!(
            "{}-{}-seed{seed}",
            cleanup::PREFIX,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        if args.keep {
            cleanup::mark_kept(&dir)?;
        } else {
            cleanup::push(cleanup::Undo::RemoveDir(dir.clone()));
        }
        let totals = check::run_seed(&bin, &dir, &profile, seed).await?;
        if args.keep {
            println!("chaos: kept {}", dir.display());
        }
        all.add(&totals);
    }
    let ok = all.violations.is_empty();
    if !ok {
        println!("chaos: {} promise(s) broken:", all.violations.len());
        for v in &all.violations {
            println!("  - {v}");
        }
    }
    println!("{}", all.figures(profile.name, &seeds, started.elapsed()));
    Ok(ok)
}
