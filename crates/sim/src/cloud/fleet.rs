//! The reference cloud's fleet rules, pure: sites and the site of an address (longest prefix),
//! which relays can reach a device, each relay's monitoring share (rendezvous hashing, so that a
//! relay joining or leaving moves only its own share), and the relay a command or task target goes
//! to (least loaded among those that can reach it).
//!
//! No I/O, no clock, no locks: the callers in `state` and `api` hold the data and decide when.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;

/// A site as created through `POST /sim/sites`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Site {
    pub tenant_id: String,
    pub name: String,
    pub subnets: Vec<IpNet>,
    #[serde(default)]
    pub isolated: bool,
    /// The base URL the site's devices download images from; absent: `https://<shared FQDN>/`.
    #[serde(default)]
    pub download_path: Option<String>,
}

/// The IP of a device address (`IP` or `IP:PORT`).
pub fn device_ip(address: &str) -> Option<IpAddr> {
    address
        .parse::<IpAddr>()
        .ok()
        .or_else(|| address.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

/// The site whose subnets hold `ip` with the longest prefix, as an index into `sites`.
pub fn site_of(sites: &[Site], ip: IpAddr) -> Option<usize> {
    let mut best: Option<(u8, usize)> = None;
    for (i, s) in sites.iter().enumerate() {
        for n in &s.subnets {
            if n.contains(&ip) && best.is_none_or(|(len, _)| n.prefix_len() > len) {
                best = Some((n.prefix_len(), i));
            }
        }
    }
    best.map(|(_, i)| i)
}

/// The site of a relay: the longest prefix over all of its addresses.
pub fn relay_site(sites: &[Site], addresses: &[String]) -> Option<usize> {
    let mut best: Option<(u8, usize)> = None;
    for ip in addresses.iter().filter_map(|a| device_ip(a)) {
        for (i, s) in sites.iter().enumerate() {
            for n in &s.subnets {
                if n.contains(&ip) && best.is_none_or(|(len, _)| n.prefix_len() > len) {
                    best = Some((n.prefix_len(), i));
                }
            }
        }
    }
    best.map(|(_, i)| i)
}

/// What routing needs to know about one relay.
#[derive(Debug, Clone)]
pub struct Reach {
    pub relay_id: String,
    pub site: Option<usize>,
    /// `None`: the relay did not say (a relay older than the fleet): it is taken to reach every
    /// device outside isolated sites, and refuses what it cannot.
    pub subnets: Option<Vec<IpNet>>,
}

impl Reach {
    /// Whether this relay may serve a device at `ip` in site `dev_site`: an isolated site's
    /// devices only by its own relays, an isolated site's relays only its own devices, and always
    /// only inside the relay's subnets.
    pub fn reaches(&self, sites: &[Site], ip: IpAddr, dev_site: Option<usize>) -> bool {
        let isolated = |s: Option<usize>| s.and_then(|i| sites.get(i)).is_some_and(|s| s.isolated);
        if (isolated(dev_site) || isolated(self.site)) && self.site != dev_site {
            return false;
        }
        match &self.subnets {
            None => true,
            Some(nets) => nets.iter().any(|n| n.contains(&ip)),
        }
    }
}

/// Why no relay can serve a device, in plain words.
pub fn unreachable_reason(sites: &[Site], address: &str, dev_site: Option<usize>) -> String {
    match dev_site.and_then(|i| sites.get(i)) {
        Some(s) if s.isolated => format!(
            "no relay of the isolated site {} can reach {address} (a site-specific relay serves it)",
            s.name
        ),
        _ => format!("no relay can reach {address}: no relay's device subnets hold it"),
    }
}

/// The rendezvous weight of a (device, relay) pair: the device goes to the relay with the highest
/// weight among those that can reach it, so adding or removing a relay only moves the devices
/// that relay wins or held.
pub fn weight(device: &str, relay_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in relay_id
        .bytes()
        .chain(std::iter::once(0))
        .chain(device.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser: FNV alone clusters for addresses that differ in one digit.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The monitoring share of each relay: device indexes into `devices`, each device given to exactly
/// one of `relays` (the ones that may poll now) that can reach it. Devices no relay can reach
/// are in no share.
pub fn shares(sites: &[Site], devices: &[String], relays: &[Reach]) -> HashMap<String, Vec<usize>> {
    let mut out: HashMap<String, Vec<usize>> = relays
        .iter()
        .map(|r| (r.relay_id.clone(), Vec::new()))
        .collect();
    for (i, d) in devices.iter().enumerate() {
        let Some(ip) = device_ip(d) else { continue };
        let site = site_of(sites, ip);
        let best = relays
            .iter()
            .filter(|r| r.reaches(sites, ip, site))
            .max_by_key(|r| (weight(d, &r.relay_id), r.relay_id.as_str()));
        if let Some(r) = best
            && let Some(v) = out.get_mut(&r.relay_id)
        {
            v.push(i);
        }
    }
    out
}

/// A fingerprint of a share's content: equal shares, equal fingerprints.
pub fn fingerprint(devices: &[String], share: &[usize]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &i in share {
        for b in devices[i].bytes().chain(std::iter::once(b'\n')) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Picks, for each target, the least loaded relay among `candidates(target)`; `load` counts the
/// work each relay holds and grows with every pick. Ties go to the relay listed first.
pub fn least_loaded<'a>(
    candidates: &[&'a Reach],
    load: &mut HashMap<String, u64>,
) -> Option<&'a Reach> {
    let best = candidates
        .iter()
        .min_by_key(|r| load.get(&r.relay_id).copied().unwrap_or(0))?;
    *load.entry(best.relay_id.clone()).or_default() += 1;
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str, nets: &[&str], isolated: bool) -> Site {
        Site {
            tenant_id: "acme".into(),
            name: name.into(),
            subnets: nets.iter().map(|n| n.parse().unwrap()).collect(),
            isolated,
            download_path: None,
        }
    }

    fn reach(id: &str, site: Option<usize>, nets: &[&str]) -> Reach {
        Reach {
            relay_id: id.into(),
            site,
            subnets: Some(nets.iter().map(|n| n.parse().unwrap()).collect()),
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let sites = vec![
            site("campus", &["10.0.0.0/8"], false),
            site("lab", &["10.1.0.0/16"], false),
        ];
        assert_eq!(site_of(&sites, "10.1.2.3".parse().unwrap()), Some(1));
        assert_eq!(site_of(&sites, "10.2.2.3".parse().unwrap()), Some(0));
        assert_eq!(site_of(&sites, "192.168.1.1".parse().unwrap()), None);
        assert_eq!(
            relay_site(&sites, &["192.168.0.1".into(), "10.1.0.9".into()]),
            Some(1)
        );
        assert_eq!(
            device_ip("10.0.0.1:8443"),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn isolated_sites_are_served_only_by_their_relays() {
        let sites = vec![site("branch", &["10.9.0.0/16"], true)];
        let branch = reach("b", Some(0), &["10.0.0.0/8"]);
        let hq = reach("h", None, &["10.0.0.0/8"]);
        let inside = "10.9.0.5".parse().unwrap();
        let outside = "10.1.0.5".parse().unwrap();
        assert!(branch.reaches(&sites, inside, Some(0)));
        assert!(!hq.reaches(&sites, inside, Some(0)));
        assert!(hq.reaches(&sites, outside, None));
        assert!(!branch.reaches(&sites, outside, None));
        let legacy = Reach {
            relay_id: "old".into(),
            site: None,
            subnets: None,
        };
        assert!(legacy.reaches(&sites, outside, None));
        assert!(!legacy.reaches(&sites, inside, Some(0)));
    }

    #[test]
    fn shares_are_even_and_stable() {
        let devices: Vec<String> = (0..20_000)
            .map(|i| format!("10.{}.{}.{}:443", i / 65536, (i / 256) % 256, i % 256))
            .collect();
        let nets = ["10.0.0.0/8"];
        let two = vec![reach("r-a", None, &nets), reach("r-b", None, &nets)];
        let s2 = shares(&[], &devices, &two);
        let a = s2["r-a"].len() as f64;
        assert!((a / 20_000.0 - 0.5).abs() < 0.02, "{a}");
        // A third relay takes only from the others, about a third, and keeps the rest in place.
        let mut three = two.clone();
        three.push(reach("r-c", None, &nets));
        let s3 = shares(&[], &devices, &three);
        for r in ["r-a", "r-b"] {
            let before: std::collections::HashSet<_> = s2[r].iter().collect();
            assert!(
                s3[r].iter().all(|i| before.contains(i)),
                "{r} gained devices"
            );
        }
        let c = s3["r-c"].len() as f64;
        assert!((c / 20_000.0 - 1.0 / 3.0).abs() < 0.02, "{c}");
        // Removing it puts back exactly the two-relay shares.
        assert_eq!(shares(&[], &devices, &two), s2);
        // A device no relay can reach is in no share.
        let s = shares(&[], &["192.168.0.1".into()], &two);
        assert!(s.values().all(Vec::is_empty));
    }

    #[test]
    fn least_loaded_spreads() {
        let a = reach("a", None, &["10.0.0.0/8"]);
        let b = reach("b", None, &["10.0.0.0/8"]);
        let mut load = HashMap::from([("a".to_string(), 3)]);
        let mut picks = Vec::new();
        for _ in 0..5 {
            picks.push(least_loaded(&[&a, &b], &mut load).unwrap().relay_id.clone());
        }
        assert_eq!(picks, ["b", "b", "b", "a", "b"]);
        assert!(least_loaded(&[], &mut load).is_none());
    }
}
