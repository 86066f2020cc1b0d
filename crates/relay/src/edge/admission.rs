//! Who gets one of the edge's connection slots. A slot is taken at accept, before the TLS
//! handshake, and given back when the connection closes, so handshakes count against the caps:
//! `[edge].max_connections` in all, and `[edge].max_connections_per_ip` from one client address
//! (an IPv6 client by its /64, the smallest network a host is usually given), so that one host
//! cannot hold the slots every phone needs.
//!
//! A refused client is told why (503 with Retry-After, after the TLS handshake on the HTTPS
//! listener) while a small, fixed number of refusals are in flight; past that it is closed at
//! once, so refusing costs a bounded amount of work however fast the connections come.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Refused connections being told why at the same time; more are closed without a word.
pub const TELLING: usize = 64;

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `[edge].max_connections` are open.
    Total,
    /// `[edge].max_connections_per_ip` are open from this client's address.
    PerIp,
}

impl Refusal {
    /// The 503 a refused device gets.
    pub fn answer(self) -> &'static str {
        match self {
            Refusal::Total => {
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain\r\nContent-Length: 33\r\nConnection: close\r\n\r\n503 relay busy: too many devices\n"
            }
            Refusal::PerIp => {
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain\r\nContent-Length: 52\r\nConnection: close\r\n\r\n503 relay busy: too many connections from your host\n"
            }
        }
    }
}

/// The slot counts of one edge (both listeners share them).
pub struct Admission {
    open: AtomicUsize,
    by_client: Mutex<HashMap<IpAddr, usize>>,
    telling: Arc<Semaphore>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            open: AtomicUsize::new(0),
            by_client: Mutex::new(HashMap::new()),
            telling: Arc::new(Semaphore::new(TELLING)),
        }
    }
}

/// What a client address counts as: IPv4 (also when it reached a dual-stack listener as
/// `::ffff:a.b.c.d`) by itself, IPv6 by its /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl Admission {
    /// Takes a slot for a connection from `ip`, under the caps in force now.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_client: usize,
    ) -> Result<Slot, Refusal> {
        let key = client_key(ip);
        let mut by_client = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        if self.open.load(Ordering::Relaxed) >= max_total {
            return Err(Refusal::Total);
        }
        let n = by_client.entry(key).or_insert(0);
        if *n >= max_per_client {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            admission: self.clone(),
            key,
        })
    }

    /// A turn to tell a refused client why, if one is free.
    pub fn tell(&self) -> Option<OwnedSemaphorePermit> {
        self.telling.clone().try_acquire_owned().ok()
    }

    /// Connections holding a slot now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// A connection's slot, given back on drop.
pub struct Slot {
    admission: Arc<Admission>,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_client = self
            .admission
            .by_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_client.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_client.remove(&self.key);
            }
        }
        self.admission.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_in_total_and_per_client() {
        let a = Arc::new(Admission::default());
        let one: Vec<Slot> = (0..3)
            .map(|_| a.admit(ip("10.0.0.1"), 5, 3).unwrap())
            .collect();
        assert_eq!(a.admit(ip("10.0.0.1"), 5, 3).err(), Some(Refusal::PerIp));
        // The same host seen through a dual-stack listener is the same client.
        assert_eq!(
            a.admit(ip("::ffff:10.0.0.1"), 5, 3).err(),
            Some(Refusal::PerIp)
        );
        let other = a.admit(ip("10.0.0.2"), 5, 3).unwrap();
        let v6 = a.admit(ip("2001:db8:1:2::1"), 5, 3).unwrap();
        assert_eq!(a.admit(ip("10.0.0.3"), 5, 3).err(), Some(Refusal::Total));
        drop(one);
        assert_eq!(a.open(), 2);
        let again = a.admit(ip("10.0.0.1"), 5, 3).unwrap();
        drop((other, v6, again));
        assert_eq!(a.open(), 0);
        assert!(
            a.by_client.lock().unwrap().is_empty(),
            "no entry outlives its slots"
        );
        // An IPv6 host counts by its /64: another address in it is the same client.
        let _s = a.admit(ip("2001:db8:1:2::1"), 5, 1).unwrap();
        assert_eq!(
            a.admit(ip("2001:db8:1:2:ffff::9"), 5, 1).err(),
            Some(Refusal::PerIp)
        );
        assert!(a.admit(ip("2001:db8:1:3::1"), 5, 1).is_ok());
    }

    #[test]
    fn answers_say_their_length() {
        for r in [Refusal::Total, Refusal::PerIp] {
            let (head, body) = r.answer().split_once("\r\n\r\n").unwrap();
            assert!(
                head.contains(&format!("Content-Length: {}\r\n", body.len())),
                "{r:?}"
            );
        }
    }

    #[test]
    fn refusals_are_told_a_bounded_number_at_a_time() {
        let a = Admission::default();
        let turns: Vec<_> = (0..TELLING).map(|_| a.tell().unwrap()).collect();
        assert!(a.tell().is_none());
        drop(turns);
        assert!(a.tell().is_some());
    }
}
