//! The host's own IP addresses, as the relay reports them to the cloud (which places the relay in
//! a site by them).

use std::net::IpAddr;

/// Addresses of the host's interfaces that are up, without loopback and link-local ones, IPv4
/// first, each once.
pub fn interface_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = Vec::new();
    for a in addrs {
        if !a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP) {
            continue;
        }
        let Some(sa) = a.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        };
        if ip.is_loopback() || ip.is_unspecified() || link_local || out.contains(&ip) {
            continue;
        }
        out.push(ip);
    }
    out.sort_by_key(|ip| ip.is_ipv6());
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_loopback_in_the_list() {
        assert!(
            super::interface_addresses()
                .iter()
                .all(|a| !a.is_loopback())
        );
    }
}
