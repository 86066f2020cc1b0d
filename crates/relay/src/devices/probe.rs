//! Network diagnostics towards one device, from the relay: ICMP echo, TCP connect to the REST
//! port, the TLS handshake, and one authenticated REST call (`device/info`), each timed, so a
//! support engineer sees at which step a device stops answering.
//!
//! ICMP uses an unprivileged "ping" socket (SOCK_DGRAM, IPPROTO_ICMP), which Linux allows only to
//! the groups in `net.ipv4.ping_group_range`; where it is not allowed the step is skipped with
//! that reason rather than needing raw sockets (root or CAP_NET_RAW). The caller has checked the
//! address against `[devices].subnets` already: outside them nothing at all is sent.

use super::DevicePlane;
use super::actions::{self, Done};
use super::client::Target;
use crate::config::DeviceScheme;
use crate::protocol::Outcome;
use crate::util::secret::Secret;
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Longest wait for an echo reply.
const ICMP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: &'static str,
    /// `ok`, `failed` or `skipped`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms: Option<f64>,
    pub detail: String,
}

fn ms(d: Duration) -> Option<f64> {
    Some((d.as_secs_f64() * 10_000.0).round() / 10.0)
}

fn step(
    step: &'static str,
    result: &'static str,
    took: Option<Duration>,
    detail: impl Into<String>,
) -> Step {
    Step {
        step,
        result,
        ms: took.and_then(ms),
        detail: detail.into(),
    }
}

/// What one ICMP echo came to.
#[derive(Debug, PartialEq)]
pub enum Echo {
    Reply(Duration),
    Skipped(String),
    Failed(String),
}

fn ping_group_range() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range")
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum = sum.wrapping_add(u32::from(word));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One ICMP echo over an unprivileged ping socket (blocking; run it off the async runtime).
pub fn icmp_echo(ip: IpAddr, timeout: Duration) -> Echo {
    use socket2::{Domain, Protocol, Socket, Type};
    let (domain, proto, request, reply) = match ip {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128, 129),
    };
    let sock = match Socket::new(domain, Type::DGRAM, Some(proto)) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::EACCES | nix::libc::EPERM | nix::libc::EPROTONOSUPPORT)
            ) =>
        {
            return Echo::Skipped(format!(
                "unprivileged ICMP is not allowed for the relay's group {} (net.ipv4.ping_group_range is {}); TCP, TLS and REST below still tell whether the device answers",
                nix::unistd::getegid(),
                ping_group_range()
            ));
        }
        Err(e) => return Echo::Skipped(format!("cannot open an ICMP socket: {e}")),
    };
    let sock: std::net::UdpSocket = sock.into();
    let seq: u16 = fastrand::u16(..);
    let nonce = *uuid::Uuid::new_v4().as_bytes();
    let mut pkt = vec![request, 0, 0, 0, 0, 0];
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(&nonce);
    let sum = checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    let start = Instant::now();
    if let Err(e) = sock.send_to(&pkt, SocketAddr::new(ip, 0)) {
        return Echo::Failed(format!("cannot send an echo request: {e}"));
    }
    let mut buf = [0u8; 1500];
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match sock.recv(&mut buf) {
            Ok(n)
                if n >= 8 + nonce.len()
                    && buf[0] == reply
                    && buf[6..8] == seq.to_be_bytes()
                    && buf[8..8 + nonce.len()] == nonce =>
            {
                return Echo::Reply(start.elapsed());
            }
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Echo::Failed(format!("no echo reply: {e}")),
        }
    }
    Echo::Failed(format!(
        "no echo reply within {} (the device or the network may drop ICMP)",
        humantime::format_duration(timeout)
    ))
}

/// Runs every step against `target` (already checked to be inside the device subnets).
pub async fn probe(plane: &DevicePlane, target: &Target, password: &Secret) -> Done {
    let mut steps = Vec::new();
    let ip = target.ip;
    let echo = tokio::task::spawn_blocking(move || icmp_echo(ip, ICMP_TIMEOUT))
        .await
        .unwrap_or_else(|e| Echo::Failed(e.to_string()));
    steps.push(match echo {
        Echo::Reply(d) => step("icmp", "ok", Some(d), "echo reply"),
        Echo::Skipped(why) => step("icmp", "skipped", None, why),
        Echo::Failed(why) => step("icmp", "failed", None, why),
    });
    let scheme = plane.client.scheme();
    let addr = target.socket_addr(scheme);
    let timeout = plane.client.timeout();
    let t0 = Instant::now();
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await;
    let mut failure: Option<String> = None;
    let tcp = match tcp {
        Ok(Ok(s)) => {
            steps.push(step(
                "tcp",
                "ok",
                Some(t0.elapsed()),
                format!("connected to {addr}"),
            ));
            Some(s)
        }
        Ok(Err(e)) => {
            let why = format!("cannot connect to {addr}: {e}");
            steps.push(step("tcp", "failed", Some(t0.elapsed()), why.clone()));
            failure = Some(why);
            None
        }
        Err(_) => {
            let why = format!(
                "no TCP connection to {addr} within {}",
                humantime::format_duration(timeout)
            );
            steps.push(step("tcp", "failed", Some(t0.elapsed()), why.clone()));
            failure = Some(why);
            None
        }
    };
    match (scheme, tcp) {
        (DeviceScheme::Http, _) => {
            steps.push(step("tls", "skipped", None, "[devices].scheme is http"))
        }
        (DeviceScheme::Https, None) => {
            steps.push(step("tls", "skipped", None, "no TCP connection"))
        }
        (DeviceScheme::Https, Some(tcp)) => {
            let t0 = Instant::now();
            let connector = tokio_rustls::TlsConnector::from(plane.client.tls_config());
            let hs = tokio::time::timeout(
                timeout,
                connector.connect(ServerName::IpAddress(ip.into()), tcp),
            )
            .await;
            match hs {
                Ok(Ok(tls)) => {
                    let (_, c) = tls.get_ref();
                    let key = c
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|der| super::identity::Fingerprint::of_certificate(der.as_ref()));
                    let detail = format!(
                        "{} {}{}",
                        c.protocol_version()
                            .map(|v| format!("{v:?}"))
                            .unwrap_or_default(),
                        c.negotiated_cipher_suite()
                            .map(|s| format!("{:?}", s.suite()))
                            .unwrap_or_default(),
                        key.map(|k| format!(", certificate key {}", k.short()))
                            .unwrap_or_default()
                    );
                    // The handshake above checks nothing of the key; the pin decides whether the
                    // REST step (which carries the password) may go on.
                    let pinned = match (plane.client.pins_keys(), key) {
                        (true, Some(seen)) => match plane.pins.expect(
                            &plane.client.pin_address(target),
                            std::time::SystemTime::now(),
                        ) {
                            super::identity::Expect::Key(k) if k != seen => Some(k),
                            _ => None,
                        },
                        _ => None,
                    };
                    match pinned {
                        None => steps.push(step(
                            "tls",
                            "ok",
                            Some(t0.elapsed()),
                            detail.trim().to_string(),
                        )),
                        Some(k) => {
                            let why = format!(
                                "{}: not the pinned key {}; the REST step (with the password) is not tried. \
                                 If the device was replaced or reset, `ucrelay devices trust {}`",
                                detail.trim(),
                                k.short(),
                                plane.client.pin_address(target)
                            );
                            steps.push(step("tls", "failed", Some(t0.elapsed()), why.clone()));
                            failure.get_or_insert(why);
                        }
                    }
                }
                Ok(Err(e)) => {
                    let why = format!("TLS handshake failed: {e}");
                    steps.push(step("tls", "failed", Some(t0.elapsed()), why.clone()));
                    failure.get_or_insert(why);
                }
                Err(_) => {
                    let why = "no TLS handshake in time".to_string();
                    steps.push(step("tls", "failed", Some(t0.elapsed()), why.clone()));
                    failure.get_or_insert(why);
                }
            }
        }
    }
    if failure.is_some() {
        steps.push(step(
            "rest",
            "skipped",
            None,
            "the connection did not come up",
        ));
    } else {
        let t0 = Instant::now();
        // Through the identity check like every session that carries the password: a device
        // presenting another key than the pinned one gets no request.
        let rest = async {
            let mut s = plane.open(target, password).await?;
            actions::device_info(&mut s).await
        };
        match tokio::time::timeout(timeout * 2, rest).await {
            Ok(Ok(i)) => steps.push(step(
                "rest",
                "ok",
                Some(t0.elapsed()),
                format!(
                    "GET /api/v1/mgmt/device/info: {} {} {}",
                    i.model,
                    i.firmware,
                    i.mac.unwrap_or_default()
                )
                .trim()
                .to_string(),
            )),
            Ok(Err(e)) => {
                let why = e.to_string();
                steps.push(step("rest", "failed", Some(t0.elapsed()), why.clone()));
                failure = Some(why);
            }
            Err(_) => {
                let why = "the REST call did not finish in time".to_string();
                steps.push(step("rest", "failed", Some(t0.elapsed()), why.clone()));
                failure = Some(why);
            }
        }
    }
    Done {
        result: if failure.is_some() {
            Outcome::Failure
        } else {
            Outcome::Success
        },
        reason: failure.unwrap_or_default(),
        payload: json!({"target": target.to_string(), "steps": steps}),
        cause: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_checksum() {
        // An echo request with id 0, seq 1 and no data: 0xf7fe.
        assert_eq!(checksum(&[8, 0, 0, 0, 0, 0, 0, 1]), 0xf7fe);
    }

    #[test]
    fn loopback_echo_answers_or_says_why_not() {
        match icmp_echo("127.0.0.1".parse().unwrap(), Duration::from_secs(1)) {
            Echo::Reply(_) => {}
            Echo::Skipped(why) => assert!(why.contains("ping_group_range"), "{why}"),
            Echo::Failed(why) => panic!("{why}"),
        }
    }
}
