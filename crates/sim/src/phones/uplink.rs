//! What a simulated phone sends out on its own: its packet capture, as `<mac>.pcap` in a tar.gz,
//! to the URL `uploadBgCapture` names; and its logs (`<mac>-boot.log`, `<mac>-app.log`) to its
//! provisioning server, by PUT. Each request leaves from the phone's own address, like a real
//! phone's, and trusts the CA certificates the simulator was given for the relay's edge.

use super::model::CaptureFile;
use crate::phone::ProvClient;
use anyhow::{Context as _, anyhow};
use bytes::Bytes;
use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Where the phones send things, and whom they trust.
#[derive(Debug, Clone, Default)]
pub struct Uplink {
    /// Host names the phones resolve without DNS (the relay's FQDN on loopback).
    pub resolve: HashMap<String, SocketAddr>,
    /// Extra trusted CA certificates (DER), e.g. the relay's CA.
    pub roots: Vec<Vec<u8>>,
    /// The provisioning server (`https://relay-fqdn:port/`), when the phones provision.
    pub provisioning: Option<String>,
}

impl Uplink {
    /// A client for `base` that connects from `from` as phone `mac`.
    pub fn client(
        &self,
        base: &str,
        from: IpAddr,
        mac: &str,
        model: &str,
        version: &str,
    ) -> anyhow::Result<ProvClient> {
        let mut c = ProvClient::new(base, mac)?
            .with_local_address(from)
            .with_model(&model.replace(' ', "_"), version)
            .with_timeout(Duration::from_secs(20));
        for der in &self.roots {
            c = c.with_root_ca_der(der.clone());
        }
        for (host, addr) in &self.resolve {
            c = c.with_resolve(host, *addr);
        }
        Ok(c)
    }
}

/// PUTs `body` to the absolute `url` from the phone's address; returns the HTTP status.
pub async fn put_url(
    uplink: &Uplink,
    url: &str,
    from: IpAddr,
    mac: &str,
    model: &str,
    version: &str,
    body: Bytes,
) -> anyhow::Result<u16> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("{url:?} is not a URL"))?;
    let scheme = uri
        .scheme_str()
        .ok_or_else(|| anyhow!("{url:?} has no scheme"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("{url:?} has no host"))?;
    let base = format!("{scheme}://{authority}/");
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let client = uplink.client(&base, from, mac, model, version)?;
    Ok(client.put(path, body).await?.status)
}

/// A small xorshift, so that captured payloads look like encrypted media (they do not compress).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The capture file a phone uploads: a pcap (Ethernet, UDP packets between the phone and a media
/// server, random payloads) of the size captured, as `<mac>.pcap` in a tar.gz.
pub fn pcap_tar_gz(
    mac: &str,
    ip: std::net::Ipv4Addr,
    file: &CaptureFile,
    now: Instant,
) -> anyhow::Result<Bytes> {
    let size = file.size_at(now).max(24) as usize;
    let mut pcap = Vec::with_capacity(size + 256);
    // Global header: magic, v2.4, zone 0, sigfigs 0, snaplen 65535, Ethernet.
    pcap.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    pcap.extend_from_slice(&2u16.to_le_bytes());
    pcap.extend_from_slice(&4u16.to_le_bytes());
    pcap.extend_from_slice(&[0; 8]);
    pcap.extend_from_slice(&65535u32.to_le_bytes());
    pcap.extend_from_slice(&1u32.to_le_bytes());
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15 ^ u64::from(u32::from(ip)));
    let mut ts: u64 = 1_795_428_000_000_000;
    let src = ip.octets();
    while pcap.len() + 16 + 42 < size {
        let payload = 172usize.min(size - pcap.len() - 16 - 42).max(1);
        let frame_len = 14 + 20 + 8 + payload;
        pcap.extend_from_slice(&((ts / 1_000_000) as u32).to_le_bytes());
        pcap.extend_from_slice(&((ts % 1_000_000) as u32).to_le_bytes());
        pcap.extend_from_slice(&(frame_len as u32).to_le_bytes());
        pcap.extend_from_slice(&(frame_len as u32).to_le_bytes());
        // Ethernet
        pcap.extend_from_slice(&[0x00, 0x1b, 0x21, 0x00, 0x00, 0x01]);
        pcap.extend_from_slice(&[0x00, 0x04, 0xf2, src[1], src[2], src[3]]);
        pcap.extend_from_slice(&[0x08, 0x00]);
        // IPv4, UDP
        let ip_len = (20 + 8 + payload) as u16;
        pcap.extend_from_slice(&[0x45, 0xb8]);
        pcap.extend_from_slice(&ip_len.to_be_bytes());
        pcap.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        pcap.extend_from_slice(&src);
        pcap.extend_from_slice(&[10, 99, 0, 1]);
        pcap.extend_from_slice(&20_000u16.to_be_bytes());
        pcap.extend_from_slice(&30_000u16.to_be_bytes());
        pcap.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
        pcap.extend_from_slice(&[0, 0]);
        for _ in 0..payload.div_ceil(8) {
            let n = noise.next().to_le_bytes();
            pcap.extend_from_slice(&n);
        }
        pcap.truncate(pcap.len() - (payload.div_ceil(8) * 8 - payload));
        ts += 20_000;
    }
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::with_capacity(pcap.len() + 4096),
        flate2::Compression::fast(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_size(pcap.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_795_428_000);
    h.set_cksum();
    tar.append_data(&mut h, format!("{mac}.pcap"), pcap.as_slice())?;
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    Ok(Bytes::from(gz.finish()?))
}

/// A phone log of about `bytes` bytes in the phones' format (`time|module|level|missed|text`).
pub fn log_text(kind: &str, mac: &str, bytes: usize) -> Bytes {
    let mut out = String::with_capacity(bytes + 128);
    let mut n = 0u64;
    while out.len() < bytes {
        n += 1;
        let line = match kind {
            "boot" => format!(
                "{:04}.{:03}|boot |4|00|{mac} updater step {n}: checking application image\n",
                n / 1000,
                n % 1000
            ),
            _ => format!(
                "{:04}.{:03}|sip  |4|00|{mac} REGISTER sip:pbx.sim refreshed (cseq {n})\n",
                n / 1000,
                n % 1000
            ),
        };
        out.push_str(&line);
    }
    out.truncate(bytes.max(1));
    Bytes::from(out)
}
