//! TCP to the cloud the way a browser does it: the resolved addresses are raced, Happy Eyeballs
//! style (RFC 8305), so one address that swallows packets cannot use up the whole connect
//! timeout while a working one waits its turn.
//!
//! The addresses keep the resolver's order (getaddrinfo sorts them by RFC 6724, usually IPv6
//! first) with the two families interleaved: first, first of the other family, second, ... One
//! attempt starts, the next [`ATTEMPT_DELAY`] later or as soon as the one before it fails; the
//! first connection to come up wins and the others are dropped. Each attempt has its own
//! deadline, and the caller bounds the whole race.

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// RFC 8305's recommended Connection Attempt Delay.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Why every address failed, one entry per address in the order they were tried.
#[derive(Debug)]
pub struct RaceFailed {
    pub attempts: Vec<(SocketAddr, std::io::Error)>,
}

impl std::fmt::Display for RaceFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.attempts.is_empty() {
            return write!(f, "no address to connect to");
        }
        let parts: Vec<String> = self
            .attempts
            .iter()
            .map(|(a, e)| format!("{a}: {e}"))
            .collect();
        write!(f, "{}", parts.join("; "))
    }
}

impl std::error::Error for RaceFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.attempts
            .last()
            .map(|(_, e)| e as &(dyn std::error::Error + 'static))
    }
}

/// The addresses in racing order: the resolver's order, the two families interleaved starting
/// with the family of its first address (RFC 8305 section 4, First Address Family Count 1).
pub fn interleave(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return Vec::new();
    };
    let first_v6 = first.is_ipv6();
    let (mut preferred, mut other): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
    for a in addrs {
        if !preferred.contains(a) && !other.contains(a) {
            if a.is_ipv6() == first_v6 {
                preferred.push(*a);
            } else {
                other.push(*a);
            }
        }
    }
    let mut out = Vec::with_capacity(preferred.len() + other.len());
    let (mut p, mut o) = (preferred.into_iter(), other.into_iter());
    loop {
        match (p.next(), o.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Races connections to `addrs` (in [`interleave`]d order): returns the first stream that
/// connects, with its address. Every attempt is abandoned after `per_address`.
pub async fn race(
    addrs: &[SocketAddr],
    per_address: Duration,
) -> Result<(TcpStream, SocketAddr), RaceFailed> {
    race_with(addrs, per_address, None).await
}

/// One connection attempt; with `recv_buffer`, the socket's receive buffer is set before the
/// connection is made (the window scale is fixed at the handshake, so afterwards is too late).
async fn dial(addr: SocketAddr, recv_buffer: Option<u32>) -> std::io::Result<TcpStream> {
    let Some(n) = recv_buffer else {
        return TcpStream::connect(addr).await;
    };
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_recv_buffer_size(n)?;
    sock.connect(addr).await
}

/// [`race`], each socket with `recv_buffer` as its receive buffer when given.
pub async fn race_with(
    addrs: &[SocketAddr],
    per_address: Duration,
    recv_buffer: Option<u32>,
) -> Result<(TcpStream, SocketAddr), RaceFailed> {
    let order = interleave(addrs);
    let mut waiting = order.into_iter();
    let mut running = FuturesUnordered::new();
    let mut failed = Vec::new();
    let attempt = |addr: SocketAddr| async move {
        let r = match tokio::time::timeout(per_address, dial(addr, recv_buffer)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within {}",
                    humantime::format_duration(per_address)
                ),
            )),
        };
        (addr, r)
    };
    let Some(first) = waiting.next() else {
        return Err(RaceFailed { attempts: failed });
    };
    running.push(attempt(first));
    let mut next_at = tokio::time::Instant::now() + ATTEMPT_DELAY;
    let mut more = waiting.len() > 0;
    loop {
        tokio::select! {
            Some((addr, r)) = running.next() => match r {
                Ok(stream) => return Ok((stream, addr)),
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "connection attempt failed");
                    failed.push((addr, e));
                    // A failure starts the next address at once.
                    if let Some(a) = waiting.next() {
                        running.push(attempt(a));
                        next_at = tokio::time::Instant::now() + ATTEMPT_DELAY;
                    }
                    more = waiting.len() > 0;
                    if running.is_empty() {
                        return Err(RaceFailed { attempts: failed });
                    }
                }
            },
            _ = tokio::time::sleep_until(next_at), if more => {
                if let Some(a) = waiting.next() {
                    tracing::debug!(next = %a, "no connection yet; starting the next address");
                    running.push(attempt(a));
                }
                next_at = tokio::time::Instant::now() + ATTEMPT_DELAY;
                more = waiting.len() > 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn families_alternate_from_the_resolvers_first() {
        let got = interleave(&[
            a("[2001:db8::1]:443"),
            a("[2001:db8::2]:443"),
            a("[2001:db8::3]:443"),
            a("192.0.2.1:443"),
            a("192.0.2.2:443"),
            a("[2001:db8::1]:443"),
        ]);
        assert_eq!(
            got,
            vec![
                a("[2001:db8::1]:443"),
                a("192.0.2.1:443"),
                a("[2001:db8::2]:443"),
                a("192.0.2.2:443"),
                a("[2001:db8::3]:443"),
            ]
        );
        let v4_first = interleave(&[a("192.0.2.1:1"), a("[2001:db8::1]:1")]);
        assert_eq!(v4_first, vec![a("192.0.2.1:1"), a("[2001:db8::1]:1")]);
        assert!(interleave(&[]).is_empty());
    }

    #[tokio::test]
    async fn a_refused_address_hands_over_at_once_and_all_failures_are_named() {
        // A port nobody listens on refuses at once; a listening one is reached right after.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let start = std::time::Instant::now();
        let (_s, won) = race(
            &[closed, open.local_addr().unwrap()],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(won, open.local_addr().unwrap());
        assert!(start.elapsed() < ATTEMPT_DELAY, "{:?}", start.elapsed());
        let err = race(&[closed], Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err.attempts.len(), 1);
        assert!(err.to_string().starts_with(&closed.to_string()), "{err}");
    }
}
