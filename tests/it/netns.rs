//! Network namespaces a test creates for itself (root only; CI runs as root): a namespace joined
//! to this one by a veth pair, with an address on each end in 198.18.0.0/15 (the benchmarking
//! range, RFC 2544: never on a real network), and files under /etc/netns/<name>/ that
//! `ip netns exec` puts in place of /etc/hosts and friends for the programs run inside.
//!
//! It lets a test give a peer an address that is neither loopback nor the LAN (a CDN, an
//! address that swallows packets) without a hole in the relay's rules and without touching the
//! machine's own configuration. Everything is removed on drop.

use crate::support::peer;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct NetNs {
    pub name: String,
    /// This side of the veth pair (an address of the machine, hence of the relay when it runs
    /// here).
    pub host_ip: Ipv4Addr,
    /// The namespace's side.
    pub ns_ip: Ipv4Addr,
    etc: PathBuf,
}

/// Runs `ip` with `args`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new(peer("ip")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_ok(args: &[&str]) -> bool {
    Command::new(peer("ip"))
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

impl NetNs {
    /// A namespace with `lo` up and a veth pair to this namespace, on a /30 of 198.18.0.0/15
    /// that no other interface of the machine uses (tests of other processes may run at once).
    pub fn create() -> NetNs {
        let pid = std::process::id();
        for _ in 0..64 {
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            // A /30 per (process, namespace), spread over the 32768 of 198.18.0.0/15.
            let block = (pid.wrapping_mul(64).wrapping_add(seq)) % 32768;
            let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + block * 4;
            let (host_ip, ns_ip) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
            let used = Command::new(peer("ip"))
                .args(["-4", "-o", "addr", "show", "to", &format!("{host_ip}/30")])
                .output()
                .unwrap();
            if !used.stdout.is_empty() {
                continue;
            }
            let name = format!("ucrt{pid}x{seq}");
            let (outer, inner) = (format!("ut{pid}a{seq}"), format!("ut{pid}b{seq}"));
            if outer.len() > 15 {
                panic!("interface name {outer} too long");
            }
            if !ip_ok(&["netns", "add", &name]) {
                continue;
            }
            let ns = NetNs {
                etc: PathBuf::from("/etc/netns").join(&name),
                name,
                host_ip,
                ns_ip,
            };
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns.name,
            ]);
            ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &outer]);
            ip(&["link", "set", &outer, "up"]);
            ns.ip(&["link", "set", "lo", "up"]);
            ns.ip(&["addr", "add", &format!("{ns_ip}/30"), "dev", &inner]);
            ns.ip(&["link", "set", &inner, "up"]);
            ns.ip(&["route", "add", "default", "via", &host_ip.to_string()]);
            return ns;
        }
        panic!("no free /30 in 198.18.0.0/15 for a test namespace");
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// A command that runs `program` inside the namespace (with its /etc/netns files).
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(peer("ip"));
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Writes /etc/netns/<ns>/<file>, which programs run inside see as /etc/<file>.
    pub fn etc_file(&self, file: &str, contents: &str) {
        std::fs::create_dir_all(&self.etc).unwrap();
        std::fs::write(self.etc.join(file), contents).unwrap();
    }

    /// A counter of an interface inside the namespace (`ip -s -j link`): e.g. "tx", "packets".
    pub fn link_stat(&self, dev: &str, dir: &str, what: &str) -> u64 {
        let out = Command::new(peer("ip"))
            .args(["-n", &self.name, "-s", "-j", "link", "show", dev])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v[0]["stats64"][dir][what].as_u64().unwrap_or(0)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it ours.
        let _ = Command::new(peer("ip"))
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}
