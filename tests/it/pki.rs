//! Test-time certificates made with the `openssl` CLI in a temp dir: a root CA, an intermediate CA,
//! and server certificates from it packed into PFX files (modern and legacy encryption), plus the
//! deliberately broken variants the certificate checks must refuse. The expired one is made with
//! rcgen, because OpenSSL 3.0's `x509 -req` cannot set a validity period in the past.

use crate::support::peer;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Distinguished names of the test CAs (the expired leaf's issuer must repeat the intermediate's).
const ROOT_SUBJECT: &str = "/O=ucrelay test/CN=ucrelay Test Root CA";
const INTERMEDIATE_O: &str = "ucrelay test";
const INTERMEDIATE_CN: &str = "ucrelay Test Intermediate CA";

/// Runs `openssl` in `dir`, panicking with its stderr on failure; returns stdout.
pub async fn openssl(dir: &Path, args: &[&str]) -> String {
    openssl_with_input(dir, args, None).await
}

/// Like [`openssl`], with `input` fed to its stdin.
pub async fn openssl_with_input(dir: &Path, args: &[&str], input: Option<&[u8]>) -> String {
    let mut child = Command::new(peer("openssl"))
        .args(args)
        .current_dir(dir)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn openssl");
    if let Some(data) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(data).await.unwrap();
        drop(stdin);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("openssl {args:?} did not finish in 30 s"))
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The SHA-256 fingerprint of the first certificate in `pem`, as lowercase hex without colons.
pub async fn fingerprint_of_pem(dir: &Path, pem: &[u8]) -> String {
    let out = openssl_with_input(
        dir,
        &["x509", "-noout", "-fingerprint", "-sha256"],
        Some(pem),
    )
    .await;
    normalize_fingerprint(out.trim().rsplit('=').next().unwrap_or_default())
}

/// `AB:CD:...` or `abcd...` to `abcd...`, so fingerprints from different printers compare equal.
pub fn normalize_fingerprint(s: &str) -> String {
    s.trim().replace(':', "").to_ascii_lowercase()
}

/// A server certificate packed the way the relay expects it.
#[derive(Clone, Debug)]
pub struct Bundle {
    /// PFX as OpenSSL 3 writes it by default (AES-256-CBC, PBKDF2, SHA-256 MAC).
    pub pfx: PathBuf,
    /// The same content with `-legacy` (RC2/3DES, SHA-1 MAC).
    pub legacy_pfx: PathBuf,
    /// One line with the password, newline-terminated.
    pub password_file: PathBuf,
    /// SHA-256 of the leaf's DER, lowercase hex.
    pub sha256: String,
}

/// What to put in a leaf certificate.
struct Leaf<'a> {
    cn: &'a str,
    san: String,
    eku: &'a str,
    /// Include the intermediate and root in the PFX.
    chain: bool,
}

/// A root CA and an intermediate CA in a directory; issues server certificates.
pub struct Pki {
    pub dir: PathBuf,
    /// The root CA certificate: what devices (curl, s_client, rustls) trust.
    pub ca: PathBuf,
    intermediate: PathBuf,
    intermediate_key: PathBuf,
}

impl Pki {
    pub async fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let d = dir;
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-sha256",
                "-days",
                "3650",
                "-keyout",
                "root-ca.key",
                "-out",
                "root-ca.crt",
                "-subj",
                ROOT_SUBJECT,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-addext",
                "subjectKeyIdentifier=hash",
            ],
        )
        .await;
        openssl(
            d,
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-sha256",
                "-keyout",
                "intermediate-ca.key",
                "-out",
                "intermediate.csr",
                "-subj",
                &format!("/O={INTERMEDIATE_O}/CN={INTERMEDIATE_CN}"),
            ],
        )
        .await;
        std::fs::write(
            d.join("intermediate.ext"),
            "basicConstraints = critical, CA:TRUE, pathlen:0\n\
             keyUsage = critical, keyCertSign, cRLSign\n\
             subjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid:always\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "intermediate.csr",
                "-sha256",
                "-days",
                "1825",
                "-CA",
                "root-ca.crt",
                "-CAkey",
                "root-ca.key",
                "-set_serial",
                "1",
                "-extfile",
                "intermediate.ext",
                "-out",
                "intermediate-ca.crt",
            ],
        )
        .await;
        Pki {
            dir: dir.to_path_buf(),
            ca: dir.join("root-ca.crt"),
            intermediate: dir.join("intermediate-ca.crt"),
            intermediate_key: dir.join("intermediate-ca.key"),
        }
    }

    /// A valid server certificate for `dns` names (CN = first name), chain included.
    pub async fn server(&self, name: &str, dns: &[&str]) -> Bundle {
        self.issue(
            name,
            Leaf {
                cn: dns[0],
                san: sans(dns),
                eku: "serverAuth",
                chain: true,
            },
        )
        .await
    }

    /// Valid, but the PFX holds only the leaf (no intermediate, no root).
    pub async fn leaf_only(&self, name: &str, dns: &[&str]) -> Bundle {
        self.issue(
            name,
            Leaf {
                cn: dns[0],
                san: sans(dns),
                eku: "serverAuth",
                chain: false,
            },
        )
        .await
    }

    /// Extended key usage present but without serverAuth (client authentication only).
    pub async fn without_server_auth(&self, name: &str, dns: &[&str]) -> Bundle {
        self.issue(
            name,
            Leaf {
                cn: dns[0],
                san: sans(dns),
                eku: "clientAuth",
                chain: true,
            },
        )
        .await
    }

    /// Identity by IP address only: CN=127.0.0.1, SAN IP:127.0.0.1, no DNS name.
    pub async fn ip_only(&self, name: &str) -> Bundle {
        self.issue(
            name,
            Leaf {
                cn: "127.0.0.1",
                san: "IP:127.0.0.1".into(),
                eku: "serverAuth",
                chain: true,
            },
        )
        .await
    }

    /// A server certificate for `dns` that expired long ago (2020), issued by the same intermediate.
    pub async fn expired(&self, name: &str, dns: &[&str]) -> Bundle {
        use rcgen::{
            CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer,
            KeyIdMethod, KeyPair, KeyUsagePurpose, date_time_ymd,
        };
        let out = self.dir.join(name);
        std::fs::create_dir_all(&out).unwrap();
        // The issuer as rcgen needs it: the intermediate's name and key identifier, and its key.
        // (rcgen's `Issuer::from_ca_cert_pem` needs its x509-parser feature, which is not enabled.)
        let ski_text = openssl(
            &self.dir,
            &[
                "x509",
                "-in",
                path_str(&self.intermediate),
                "-noout",
                "-ext",
                "subjectKeyIdentifier",
            ],
        )
        .await;
        let ski_hex = ski_text
            .lines()
            .nth(1)
            .expect("intermediate has an SKI")
            .trim();
        let ski: Vec<u8> = ski_hex
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("hex SKI"))
            .collect();
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(&self.intermediate_key).unwrap()).unwrap();
        let mut ca_params = CertificateParams::default();
        let mut ca_dn = DistinguishedName::new();
        ca_dn.push(DnType::OrganizationName, INTERMEDIATE_O);
        ca_dn.push(DnType::CommonName, INTERMEDIATE_CN);
        ca_params.distinguished_name = ca_dn;
        ca_params.key_identifier_method = KeyIdMethod::PreSpecified(ski);
        let issuer = Issuer::new(ca_params, ca_key);

        let mut params =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns[0]);
        params.distinguished_name = dn;
        params.not_before = date_time_ymd(2019, 1, 1);
        params.not_after = date_time_ymd(2020, 1, 1);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(out.join("leaf.crt"), cert.pem()).unwrap();
        std::fs::write(out.join("leaf.key"), key.serialize_pem()).unwrap();
        self.export(name, true).await
    }

    /// A password file holding a password that opens none of the bundles.
    pub fn wrong_password_file(&self, name: &str) -> PathBuf {
        let p = self.dir.join(format!("{name}.wrong-pass"));
        std::fs::write(&p, "not-the-password\n").unwrap();
        p
    }

    async fn issue(&self, name: &str, leaf: Leaf<'_>) -> Bundle {
        let out = self.dir.join(name);
        std::fs::create_dir_all(&out).unwrap();
        openssl(
            &out,
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-sha256",
                "-keyout",
                "leaf.key",
                "-out",
                "leaf.csr",
                "-subj",
                &format!("/O=ucrelay test/CN={}", leaf.cn),
            ],
        )
        .await;
        std::fs::write(
            out.join("leaf.ext"),
            format!(
                "basicConstraints = critical, CA:FALSE\n\
                 keyUsage = critical, digitalSignature, keyEncipherment\n\
                 extendedKeyUsage = {eku}\n\
                 subjectAltName = {san}\n\
                 subjectKeyIdentifier = hash\n\
                 authorityKeyIdentifier = keyid:always\n",
                eku = leaf.eku,
                san = leaf.san,
            ),
        )
        .unwrap();
        let serial = format!("{}", fastrand::u64(2..u64::MAX / 2));
        openssl(
            &out,
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-sha256",
                "-days",
                "397",
                "-CA",
                path_str(&self.intermediate),
                "-CAkey",
                path_str(&self.intermediate_key),
                "-set_serial",
                &serial,
                "-extfile",
                "leaf.ext",
                "-out",
                "leaf.crt",
            ],
        )
        .await;
        self.export(name, leaf.chain).await
    }

    /// Packs `<name>/leaf.{crt,key}` into `relay.pfx` and `relay-legacy.pfx` with a fresh password.
    async fn export(&self, name: &str, chain: bool) -> Bundle {
        let out = self.dir.join(name);
        let password: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(20)
            .collect();
        let password_file = out.join("relay.pfx.pass");
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        let ca_chain = out.join("ca-chain.pem");
        let mut pem = std::fs::read(&self.intermediate).unwrap();
        pem.extend(std::fs::read(&self.ca).unwrap());
        std::fs::write(&ca_chain, pem).unwrap();
        for (file, legacy) in [("relay.pfx", false), ("relay-legacy.pfx", true)] {
            let mut args = vec!["pkcs12", "-export"];
            if legacy {
                args.push("-legacy");
            }
            args.extend(["-name", "relay", "-inkey", "leaf.key", "-in", "leaf.crt"]);
            if chain {
                args.extend(["-certfile", "ca-chain.pem"]);
            }
            args.extend(["-passout", "file:relay.pfx.pass", "-out", file]);
            openssl(&out, &args).await;
        }
        let cert = out.join("leaf.crt");
        let sha256 = fingerprint_of_pem(&out, &std::fs::read(&cert).unwrap()).await;
        Bundle {
            pfx: out.join("relay.pfx"),
            legacy_pfx: out.join("relay-legacy.pfx"),
            password_file,
            sha256,
        }
    }
}

fn sans(dns: &[&str]) -> String {
    dns.iter()
        .map(|d| format!("DNS:{d}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}
