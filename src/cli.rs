//! Command-line interface definitions (clap). No logic here: `main.rs` dispatches.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_CONFIG: &str = "/etc/ucrelay/relay.toml";

/// The git revision this binary was built from ("unknown" outside a git checkout).
pub const GIT_REV: &str = env!("UCRELAY_GIT_REV");
/// What `ucrelay --version` prints after the name.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("UCRELAY_GIT_REV"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "ucrelay",
    version = VERSION,
    about = "On-premises relay for cloud-managed VoIP/UC device fleets"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the relay daemon (what the systemd unit starts).
    Run(ConfigArg),
    /// Validate the configuration without starting anything (exit 0 when valid, 1 otherwise).
    Check(ConfigArg),
    /// Show the running relay's health: registration, channel, heartbeats (exit 0 when healthy).
    Status(StatusArgs),
    /// List the firmware images and their sync state; `images sync` and `images verify` act on them.
    Images(ImagesArgs),
    /// List the devices the relay knows and what their last poll found (exit 1 when any is offline
    /// or presented a changed key); `devices probe` and `devices backups` diagnose one device,
    /// `devices trust ADDRESS` accepts a device's new key.
    Devices(DevicesArgs),
    /// List scheduled tasks and their totals; `tasks show ID` lists each target's result.
    Tasks(TasksArgs),
    /// List the devices whose logs the relay keeps, with their sizes; `logs MAC` exports one
    /// device's logs as a tar.gz.
    Logs(LogsArgs),
    /// Re-read the configuration and the certificate in the running relay (like SIGHUP), and say what changed.
    Reload(StatusArgs),
    /// Diagnose the path to the cloud and the devices step by step, with a fix for each problem
    /// (exit 0 when nothing failed, warnings included; 1 when a step failed). Bounded to 15 s.
    Doctor(StatusArgs),
    /// Write a support bundle (tar.gz): status, images, logs, the config with secrets masked,
    /// versions and a doctor run.
    Diag(DiagArgs),
    /// Start a reference cloud and a relay on loopback and show them working together.
    Demo(DemoArgs),
    /// Simulators for tests, demos and benchmarks.
    #[cfg(feature = "sim")]
    #[command(subcommand)]
    Sim(SimCommand),
    /// Simulators for tests, demos and benchmarks (not in this build).
    #[cfg(not(feature = "sim"))]
    Sim(NotBuilt),
    /// Print a shell completion script (bash: save as /usr/share/bash-completion/completions/ucrelay).
    Completions(CompletionsArgs),
    /// Print the man page (roff), generated from these definitions.
    #[command(hide = true)]
    Man,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

impl From<CompletionShell> for clap_complete::Shell {
    fn from(s: CompletionShell) -> Self {
        match s {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        }
    }
}

#[derive(Args, Debug)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Configuration file (used to find the admin socket).
    #[arg(long, short, global = true, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Admin socket to ask directly (instead of reading the config).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DiagArgs {
    /// Configuration file.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Admin socket to ask directly (instead of reading the config).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Where to write the bundle (default: ucrelay-diag-<host>-<time>.tar.gz here).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ImagesArgs {
    #[command(flatten)]
    pub target: StatusArgs,
    #[command(subcommand)]
    pub action: Option<ImagesAction>,
}

#[derive(Subcommand, Debug)]
pub enum ImagesAction {
    /// Fetch the manifest now and download what is missing or failed.
    Sync {
        /// Show progress and return when the sync round is over (exit 0 when every image is synced).
        #[arg(long)]
        wait: bool,
    },
    /// Re-hash every cached file; any that no longer matches is quarantined and fetched again.
    Verify,
}

#[derive(Args, Debug)]
pub struct DevicesArgs {
    #[command(flatten)]
    pub target: StatusArgs,
    #[command(subcommand)]
    pub action: Option<DevicesAction>,
}

#[derive(Subcommand, Debug)]
pub enum DevicesAction {
    /// Accept a new certificate key for a device whose key changed (replaced or reset phone):
    /// the key it last presented, or the one given; with neither, forget its pin so the next key
    /// it presents is pinned.
    Trust {
        /// The device, IP or IP:PORT as `ucrelay devices` lists it.
        address: String,
        /// The SHA-256 of the key to pin (64 hex digits, as `ucrelay devices --json` shows it).
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Network diagnostics from the relay to one device: ICMP echo, TCP connect, TLS handshake and
    /// one authenticated REST call, each timed (exit 0 when the device answers). Only inside
    /// [devices].subnets.
    Probe {
        /// The device: IP or IP:PORT.
        target: String,
    },
    /// A device's configuration backups (up to 5; every get_config takes one): list them, or show,
    /// download, delete or restore one.
    Backups {
        /// The device's MAC address.
        mac: String,
        #[command(subcommand)]
        action: Option<BackupsAction>,
    },
}

#[derive(Subcommand, Debug)]
pub enum BackupsAction {
    /// Print a backup (passwords masked).
    Show {
        /// A backup id, or `latest`.
        id: String,
    },
    /// Write a backup to a file (passwords masked).
    Download {
        id: String,
        /// Where to write it (default: <mac>_<id>.cfg here).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Delete a backup.
    Delete { id: String },
    /// Push a backup's parameters back to the device (config/set).
    Restore { id: String },
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    pub target: StatusArgs,
    /// A device's MAC: export its logs (tar.gz); without it, list the devices with logs.
    pub mac: Option<String>,
    /// Where to write the export (default: <mac>-logs-<time>.tar.gz here).
    #[arg(long, short, requires = "mac")]
    pub output: Option<PathBuf>,
    /// Delete the device's logs instead (its collection starts again after a cap).
    #[arg(long, requires = "mac", conflicts_with = "output")]
    pub delete: bool,
}

#[derive(Args, Debug)]
pub struct TasksArgs {
    #[command(flatten)]
    pub target: StatusArgs,
    #[command(subcommand)]
    pub action: Option<TasksAction>,
}

#[derive(Subcommand, Debug)]
pub enum TasksAction {
    /// One task with the result of every target.
    Show {
        /// The task id the cloud gave the task.
        id: String,
    },
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Exit 0 as soon as the whole flow has been shown (for scripts and CI), instead of running until Ctrl-C.
    #[arg(long)]
    pub once: bool,
    /// Heartbeat interval of the demo relay (short, so there is something to watch).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Run a fleet of this many relays (2 to 8, each a `ucrelay run` process on its own
    /// loopback address) behind one shared name, with a relay killed mid-task.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub relays: u8,
}

#[cfg(feature = "sim")]
#[derive(Subcommand, Debug)]
pub enum SimCommand {
    /// The reference cloud: registration, heartbeats, command channel, results, test API (plain
    /// HTTP, and HTTPS with --tls-listen).
    Cloud(Box<ucrelay_sim::cloud::CloudArgs>),
    /// A fleet of simulated Poly phones speaking the device REST API, one per loopback address.
    Phones(ucrelay_sim::phones::PhonesOptions),
}

/// The arguments of a command this build leaves out (the simulators, without the `sim` feature):
/// taken whole, so the command can say plainly why it is missing.
#[cfg(not(feature = "sim"))]
#[derive(Args, Debug, Clone)]
pub struct NotBuilt {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub args: Vec<String>,
}
