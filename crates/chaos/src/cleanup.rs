//! Everything the harness creates outside its own memory (child processes, tmpfs mounts, network
//! namespaces, scratch directories) is registered here the moment it exists, and undone on every
//! way out: the normal end, an error, a panic (the panic hook), Ctrl-C or SIGTERM (a signal task).
//! A harness killed with SIGKILL cannot clean up; the next run sweeps what a dead harness left
//! (namespaces and mounts carry the creator's pid in their names).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Prefix of every name the harness gives to something outside the process.
pub const PREFIX: &str = "ucchaos";

/// A file in a scratch directory kept on purpose (`--keep`): the next run's sweep leaves it.
pub const KEPT: &str = "KEPT";

/// Marks `dir` as kept for the operator, so that no later run's sweep removes it.
pub fn mark_kept(dir: &Path) -> std::io::Result<()> {
    std::fs::write(
        dir.join(KEPT),
        "kept with --keep (CHAOS_KEEP=1); remove this directory by hand\n",
    )
}

#[derive(Debug, Clone, PartialEq)]
pub enum Undo {
    /// A child process, killed only while it is still our child.
    Kill(u32),
    Umount(PathBuf),
    Netns(String),
    RemoveDir(PathBuf),
}

static UNDO: Mutex<Vec<Undo>> = Mutex::new(Vec::new());

pub fn push(u: Undo) {
    UNDO.lock().unwrap_or_else(|e| e.into_inner()).push(u);
}

/// Forgets one entry (it was undone by its owner).
pub fn forget(u: &Undo) {
    UNDO.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|x| x != u);
}

/// Undoes everything registered, newest first. Safe to call more than once.
pub fn run_all() {
    let list = std::mem::take(&mut *UNDO.lock().unwrap_or_else(|e| e.into_inner()));
    // Processes first (they hold mounts and sockets), then mounts, then namespaces, then files.
    let rank = |u: &Undo| match u {
        Undo::Kill(_) => 0,
        Undo::Umount(_) => 1,
        Undo::Netns(_) => 2,
        Undo::RemoveDir(_) => 3,
    };
    let mut list: Vec<Undo> = list.into_iter().rev().collect();
    list.sort_by_key(rank);
    for u in list {
        undo(&u);
    }
}

pub fn undo(u: &Undo) {
    match u {
        Undo::Kill(pid) => kill_child(*pid),
        Undo::Umount(p) => {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
        Undo::Netns(n) => {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        Undo::RemoveDir(p) => {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// SIGKILL to `pid` if it is still a child of this process (never a reused pid of someone else's).
pub fn kill_child(pid: u32) {
    if parent_of(pid) == Some(std::process::id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The parent pid of `pid`, from /proc.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields after its closing parenthesis do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what a harness that died without cleaning up left behind: its namespaces, its mounts
/// and its scratch directory (their names carry its pid), unless that directory was kept on
/// purpose.
pub fn sweep_stale() {
    let dead = |name: &str| -> bool {
        name.strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|p| p != std::process::id() && !pid_alive(p))
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if dead(name) {
                eprintln!("chaos: removing namespace {name} left by a dead harness");
                undo(&Undo::Netns(name.to_string()));
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let Some(target) = line.split_whitespace().nth(1) else {
            continue;
        };
        let owner = Path::new(target)
            .ancestors()
            .filter_map(|a| a.file_name()?.to_str())
            .find(|n| n.starts_with(PREFIX));
        if let Some(name) = owner
            && dead(name)
        {
            eprintln!("chaos: unmounting {target} left by a dead harness");
            undo(&Undo::Umount(PathBuf::from(target)));
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) && !e.path().join(KEPT).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Runs the cleanup on any panic (the default hook still prints it), then exits.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        run_all();
        // Whatever panicked, the world it ran in is gone now: stop rather than limp on.
        std::process::exit(101);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_leaves_a_kept_directory_of_a_dead_harness() {
        // A pid no process has now: what a harness killed earlier would have left.
        let dead = (1_000_000..4_000_000u32)
            .rev()
            .find(|p| !pid_alive(*p))
            .expect("a free pid");
        let me = std::process::id();
        let dir = |tag: &str| std::env::temp_dir().join(format!("{PREFIX}-{dead}-seed0-{tag}{me}"));
        let (kept, left) = (dir("kept"), dir("left"));
        for d in [&kept, &left] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("relay.log"), "a line\n").unwrap();
        }
        mark_kept(&kept).unwrap();
        sweep_stale();
        let survived = kept.join("relay.log").exists();
        let swept = !left.exists();
        let _ = std::fs::remove_dir_all(&kept);
        let _ = std::fs::remove_dir_all(&left);
        assert!(survived, "a directory kept with --keep was swept");
        assert!(swept, "a dead harness's scratch directory was left");
    }
}
