//! Where an image download may go, and what it may carry. The manifest's URLs come from the
//! cloud, and a cloud (or whoever speaks for it) must not be able to point the relay at the LAN
//! it sits in, nor collect its token from a server of its choosing:
//!
//! - The cloud's own origin (scheme, host and port of `[cloud].url`) is fetched as every other
//!   cloud request is, through the proxy when one is set, with the bearer token.
//! - Any other origin must be `https` and gets no credentials at all: no token, no cookie, no
//!   user information.
//! - Before another origin is dialled, every address its name resolves to is checked, and only
//!   the checked addresses are dialled (no second lookup a DNS answer could change): never
//!   loopback, unspecified, link-local, multicast, broadcast or reserved addresses, private
//!   ones (RFC 1918, shared 100.64.0.0/10, IPv6 unique-local), the device subnets, or the relay's
//!   own addresses. IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4) are judged by it.
//! - Redirects are followed up to [`MAX_REDIRECTS`] hops, each hop under the same rules; the
//!   token goes only to hops on the cloud's own origin.

use super::{CloudClient, CloudError};
use crate::config::CloudUrl;
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Redirect hops followed for one file before the download is refused.
pub const MAX_REDIRECTS: usize = 5;
/// Longest URL accepted from the cloud (pre-signed URLs run to a few KiB).
pub const MAX_URL: usize = 8 * 1024;

/// A download URL, parsed and normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct FileUrl {
    pub url: url::Url,
    pub tls: bool,
    /// The host as dialled: a DNS name, or an IP address without brackets.
    pub host: String,
    pub port: u16,
}

impl FileUrl {
    /// An absolute `http://` or `https://` URL with a host, no user information, no fragment.
    pub fn parse(s: &str) -> Result<FileUrl, String> {
        let url = url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
        FileUrl::from_url(url)
    }

    fn from_url(url: url::Url) -> Result<FileUrl, String> {
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(format!("scheme {other:?} is not http or https")),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry user information (user:password@)".into());
        }
        if url.fragment().is_some() {
            return Err("must not carry a fragment (#...)".into());
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return Err("has no host".into()),
        };
        let port = url
            .port_or_known_default()
            .ok_or("has no port and no default one")?;
        if url.as_str().len() > MAX_URL {
            return Err(format!("is longer than {MAX_URL} bytes"));
        }
        Ok(FileUrl {
            url,
            tls,
            host,
            port,
        })
    }

    /// The redirect target `location` names, resolved against this URL (RFC 3986).
    pub fn join(&self, location: &str) -> Result<FileUrl, String> {
        let url = self
            .url
            .join(location)
            .map_err(|e| format!("redirect to {location:?}: not a URL: {e}"))?;
        FileUrl::from_url(url).map_err(|e| format!("redirect to {location:?}: {e}"))
    }

    /// Path and query as sent in the request line.
    pub fn path_and_query(&self) -> String {
        match self.url.query() {
            Some(q) => format!("{}?{q}", self.url.path()),
            None => self.url.path().to_string(),
        }
    }

    /// `host[:port]` for the Host header (the port only when it is not the scheme's default).
    pub fn authority(&self) -> String {
        let host = match self.url.host() {
            Some(url::Host::Ipv6(a)) => format!("[{a}]"),
            _ => self.host.clone(),
        };
        match self.url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host,
        }
    }

    /// `scheme://host:port`, for messages.
    pub fn origin(&self) -> String {
        format!(
            "{}://{}:{}",
            if self.tls { "https" } else { "http" },
            match self.url.host() {
                Some(url::Host::Ipv6(a)) => format!("[{a}]"),
                _ => self.host.clone(),
            },
            self.port
        )
    }

    /// Whether this is the cloud's own origin: same scheme, host (case-insensitive) and port.
    pub fn same_origin(&self, cloud: &CloudUrl) -> bool {
        let cloud_host = cloud.host.trim_end_matches('.').to_ascii_lowercase();
        let cloud_host = match cloud_host.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => cloud_host,
        };
        self.tls == cloud.tls
            && self.port == cloud.port
            && self.host.trim_end_matches('.').to_ascii_lowercase() == cloud_host
    }
}

/// Resolves a manifest URL: a path (`/files/x?sig=...`) is on the cloud's origin under its base
/// path, as every other protocol path; anything else must be an absolute http(s) URL.
pub fn manifest_url(cloud: &CloudUrl, s: &str) -> Result<FileUrl, String> {
    if s.starts_with("//") {
        return Err("a scheme-relative URL (//host/...) is not accepted".into());
    }
    if s.starts_with('/') {
        return FileUrl::parse(&format!("{cloud}{s}"));
    }
    FileUrl::parse(s)
}

/// Why the relay will not dial `ip` for another origin than the cloud's, or None when it may.
/// `lan` are the device subnets, `own` the relay's own addresses and broadcast addresses.
pub fn forbidden(ip: IpAddr, lan: &[IpNet], own: &[IpAddr]) -> Option<String> {
    if let IpAddr::V6(v6) = ip
        && let Some(v4) = embedded_v4(v6)
    {
        return forbidden(IpAddr::V4(v4), lan, own).map(|why| format!("{ip} carries {why}"));
    }
    let kind = match ip {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => v6_kind(v6),
    };
    if let Some(kind) = kind {
        return Some(format!("{ip} is {kind}"));
    }
    if let Some(net) = lan.iter().find(|n| n.contains(&ip)) {
        return Some(format!("{ip} is inside the device subnet {net}"));
    }
    if own.contains(&ip) {
        return Some(format!("{ip} is one of the relay's own addresses"));
    }
    None
}

fn v4_kind(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    Some(match o {
        [0, ..] => "an unspecified (\"this network\") address",
        [127, ..] => "a loopback address",
        [169, 254, ..] => "a link-local address",
        [10, ..] => "a private address (RFC 1918)",
        [172, b, ..] if (16..32).contains(&b) => "a private address (RFC 1918)",
        [192, 168, ..] => "a private address (RFC 1918)",
        [100, b, ..] if (64..128).contains(&b) => "a shared address (RFC 6598, carrier NAT)",
        [224..=239, ..] => "a multicast address",
        [255, 255, 255, 255] => "the broadcast address",
        [240..=255, ..] => "a reserved address",
        _ => return None,
    })
}

fn v6_kind(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    Some(match s {
        [0, 0, 0, 0, 0, 0, 0, 0] => "the unspecified address",
        [0, 0, 0, 0, 0, 0, 0, 1] => "a loopback address",
        [0, 0, 0, 0, 0, 0, ..] => "an IPv4-compatible address (deprecated)",
        [0x100, 0, 0, 0, ..] => "a discard-only address",
        [0x2001, 0, ..] => "a Teredo address",
        [x, ..] if x & 0xffc0 == 0xfe80 => "a link-local address",
        [x, ..] if x & 0xffc0 == 0xfec0 => "a site-local address (deprecated)",
        [x, ..] if x & 0xfe00 == 0xfc00 => "a unique-local (private) address",
        [x, ..] if x & 0xff00 == 0xff00 => "a multicast address",
        _ => return None,
    })
}

/// The IPv4 address an IPv6 address stands for: mapped (::ffff:a.b.c.d), NAT64
/// (64:ff9b::/96, 64:ff9b:1::/48) and 6to4 (2002::/16).
fn embedded_v4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = a.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(v4(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        [0x64, 0xff9b, 1, ..] => Some(v4(s[6], s[7])),
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        _ => None,
    }
}

/// The relay's own addresses and the broadcast addresses of its networks, read now (they can
/// change while it runs). An error when they cannot be read: then no other origin is dialled.
pub fn own_addresses() -> Result<Vec<IpAddr>, String> {
    let ifaddrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| format!("cannot list the relay's own addresses: {e}"))?;
    let mut out = Vec::new();
    for ifa in ifaddrs {
        for sa in [ifa.address, ifa.broadcast].into_iter().flatten() {
            let ip = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    Ok(out)
}

impl CloudClient {
    /// The addresses of another origin the relay may dial: resolved once, each checked against
    /// [`forbidden`]. Refused (with every reason) when none is left.
    pub(super) async fn checked_addresses(
        &self,
        target: &FileUrl,
        lan: &[IpNet],
    ) -> Result<Vec<SocketAddr>, CloudError> {
        let refused = |detail: String| CloudError::Refused { detail };
        let own =
            own_addresses().map_err(|e| refused(format!("{e}; no other origin is fetched")))?;
        let literal = target.host.parse::<IpAddr>().ok();
        let resolved: Vec<SocketAddr> = match literal {
            Some(ip) => vec![SocketAddr::new(ip, target.port)],
            None => super::resolve(&format!("{}:{}", target.host, target.port)).await?,
        };
        let mut allowed = Vec::new();
        let mut reasons = Vec::new();
        for a in resolved {
            match forbidden(a.ip(), lan, &own) {
                None => allowed.push(a),
                Some(why) => reasons.push(why),
            }
        }
        if allowed.is_empty() {
            return Err(refused(match literal {
                Some(_) => reasons.join("; "),
                None => format!(
                    "{} resolves only to addresses the relay never fetches from: {}",
                    target.host,
                    reasons.join("; ")
                ),
            }));
        }
        if !reasons.is_empty() {
            tracing::warn!(host = %target.host, skipped = %reasons.join("; "), "some addresses of a download origin are refused; dialling only the others");
        }
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_lan_and_special_addresses_are_refused() {
        let lan: Vec<IpNet> = vec![
            "10.20.0.0/16".parse().unwrap(),
            "198.51.100.0/24".parse().unwrap(),
        ];
        let own = vec![ip("192.0.2.2"), ip("192.0.2.255")];
        for (addr, words) in [
            ("127.0.0.1", "loopback"),
            ("127.1.2.3", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("10.20.1.1", "private"),
            ("198.51.100.7", "device subnet"),
            ("10.99.0.1", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "shared"),
            ("192.0.2.2", "own"),
            ("192.0.2.255", "own"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("fd00::1", "unique-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:198.51.100.5", "device subnet"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:7f00:1::", "loopback"),
            ("::127.0.0.1", "IPv4-compatible"),
        ] {
            let why =
                forbidden(ip(addr), &lan, &own).unwrap_or_else(|| panic!("{addr} must be refused"));
            assert!(why.contains(words), "{addr}: {why}");
        }
        for addr in [
            "198.18.0.2",
            "203.0.113.7",
            "2001:db8::1",
            "8.8.8.8",
            "2a00::1",
        ] {
            assert_eq!(forbidden(ip(addr), &lan, &own), None, "{addr}");
        }
    }

    #[test]
    fn urls_parse_with_queries_and_refuse_user_information() {
        let u =
            FileUrl::parse("https://cdn.example.com/a/fw.bin?X-Amz-Signature=ab%2Fc&e=1").unwrap();
        assert_eq!(u.path_and_query(), "/a/fw.bin?X-Amz-Signature=ab%2Fc&e=1");
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "cdn.example.com", 443)
        );
        assert_eq!(u.authority(), "cdn.example.com");
        assert!(FileUrl::parse("https://u:p@cdn/x").is_err());
        assert!(FileUrl::parse("https://cdn/x#frag").is_err());
        assert!(FileUrl::parse("ftp://cdn/x").is_err());
        assert!(FileUrl::parse("file:///etc/passwd").is_err());
        // Numeric host forms are normalised before any check, so 0x7f.1 is seen as 127.0.0.1.
        assert_eq!(
            FileUrl::parse("https://0x7f.1/x").unwrap().host,
            "127.0.0.1"
        );
        assert_eq!(
            FileUrl::parse("https://2130706433/x").unwrap().host,
            "127.0.0.1"
        );
        assert_eq!(
            FileUrl::parse("https://[::1]:8443/x").unwrap().authority(),
            "[::1]:8443"
        );
        let hop = u.join("/b?sig=2").unwrap();
        assert_eq!(hop.url.as_str(), "https://cdn.example.com/b?sig=2");
        assert!(u.join("ftp://x/").is_err());
    }

    #[test]
    fn the_clouds_own_origin_is_scheme_host_and_port() {
        let cloud = CloudUrl::parse("http://127.0.0.1:8080/base").unwrap();
        let rel = manifest_url(&cloud, "/files/a?sig=1").unwrap();
        assert_eq!(rel.url.as_str(), "http://127.0.0.1:8080/base/files/a?sig=1");
        assert!(rel.same_origin(&cloud));
        assert!(
            FileUrl::parse("http://127.0.0.1:8080/x")
                .unwrap()
                .same_origin(&cloud)
        );
        assert!(
            !FileUrl::parse("http://127.0.0.1:8081/x")
                .unwrap()
                .same_origin(&cloud)
        );
        assert!(
            !FileUrl::parse("https://127.0.0.1:8080/x")
                .unwrap()
                .same_origin(&cloud)
        );
        assert!(
            !FileUrl::parse("http://localhost:8080/x")
                .unwrap()
                .same_origin(&cloud)
        );
        let named = CloudUrl::parse("https://Cloud.Example.com").unwrap();
        assert!(
            FileUrl::parse("https://cloud.example.com:443/f")
                .unwrap()
                .same_origin(&named)
        );
        assert!(
            !FileUrl::parse("https://cdn.example.com/f")
                .unwrap()
                .same_origin(&named)
        );
        assert!(manifest_url(&named, "//evil/x").is_err());
    }
}
