//! A throw-away PKI for the demo and the tests: a CA and a relay certificate (serverAuth, SAN = the
//! FQDN), written as a PFX with its password file, plus the CA in PEM for clients, and on request
//! PEM server certificates for other origins from the same CA. Labs only: the key material lives
//! in a temp dir and dies with it.

use anyhow::{Context, Result};
use p12_keystore::{Certificate, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

pub struct DemoPki {
    pub ca_pem: PathBuf,
    pub pfx: PathBuf,
    pub password_file: PathBuf,
    /// PEM certificate and key of each extra server [`make_with_origins`] was asked for.
    pub origins: Vec<(PathBuf, PathBuf)>,
}

/// Writes `ca.pem`, `relay.pfx` and `relay.pfx.pass` into `dir`.
pub fn make(dir: &Path, fqdn: &str) -> Result<DemoPki> {
    make_with_origins(dir, fqdn, &[])
}

/// [`make`], plus a server certificate from the same CA for each of `origins` (a DNS name, or an
/// IP address, which becomes an IP SAN), as `origin-N.pem` and `origin-N.key`: for a second
/// HTTPS server the relay must trust through the CA (`sim cloud --tls-listen`).
pub fn make_with_origins(dir: &Path, fqdn: &str, origins: &[&str]) -> Result<DemoPki> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ucrelay demo CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![fqdn.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, fqdn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let leaf = params.signed_by(&key, &issuer)?;

    let password = uuid::Uuid::new_v4().simple().to_string();
    let chain = [leaf.der().to_vec(), ca_cert.der().to_vec()]
        .iter()
        .map(|der| Certificate::from_der(der))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("cannot build the PFX chain: {e}"))?;
    let private = PrivateKey::from_der(&key.serialize_der()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut store = KeyStore::new();
    store.add_entry(
        "relay",
        KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(b"relay".to_vec(), private, chain)),
    );
    let pfx_bytes = store
        .writer(&password)
        .write()
        .map_err(|e| anyhow::anyhow!("cannot write the PFX: {e}"))?;

    let mut origin_files = Vec::new();
    for (i, name) in origins.iter().enumerate() {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![match name.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName((*name).try_into()?),
        }];
        params.distinguished_name.push(DnType::CommonName, *name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &issuer)?;
        let (c, k) = (
            dir.join(format!("origin-{i}.pem")),
            dir.join(format!("origin-{i}.key")),
        );
        std::fs::write(&c, format!("{}{}", cert.pem(), ca_cert.pem()))
            .with_context(|| format!("writing {}", c.display()))?;
        std::fs::write(&k, key.serialize_pem())
            .with_context(|| format!("writing {}", k.display()))?;
        origin_files.push((c, k));
    }
    let out = DemoPki {
        ca_pem: dir.join("ca.pem"),
        pfx: dir.join("relay.pfx"),
        password_file: dir.join("relay.pfx.pass"),
        origins: origin_files,
    };
    std::fs::write(&out.ca_pem, ca_cert.pem()).context("writing ca.pem")?;
    std::fs::write(&out.pfx, pfx_bytes).context("writing relay.pfx")?;
    std::fs::write(&out.password_file, format!("{password}\n"))
        .context("writing relay.pfx.pass")?;
    Ok(out)
}
