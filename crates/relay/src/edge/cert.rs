//! The edge certificate: loads the relay's HTTPS certificate from a PKCS#12 (PFX) file and checks
//! it against what LAN phones need, one rule at a time, the way `nginx -t` checks a configuration.
//!
//! [`load`] reads the PFX and its password file, decrypts it (modern OpenSSL 3 / Windows files:
//! AES-256-CBC, PBKDF2, SHA-256 MAC; and legacy ones: RC2/3DES, SHA-1 MAC) and returns a
//! [`CertReport`]: one [`Check`] per rule, always in this order, with these stable `rule` names:
//!
//! | rule | what it checks |
//! |---|---|
//! | `pfx-file` | the PFX file can be read |
//! | `pfx-password` | the password file can be read, the PFX is PKCS#12 and the password opens it |
//! | `private-key` | the PFX holds a private key rustls can sign with, and a certificate |
//! | `key-match` | the private key belongs to the leaf certificate |
//! | `chain` | leaf → intermediates → self-signed root, every link checked (names, CA flag, signature) |
//! | `eku-server-auth` | the leaf's Extended Key Usage includes serverAuth |
//! | `ip-identity` | the leaf is identified by DNS names, never only by IP addresses |
//! | `fqdn <name>` | one per configured FQDN: a SAN DNS name (or the CN, when there is none) covers it |
//! | `validity` | the leaf is valid now; a warning when it expires within 30 days |
//!
//! A passing rule gives an `Ok` check too, so `ucrelay check` prints one line per rule. When a
//! rule fails, the later rules still run unless they cannot (no readable certificate), so one run
//! names every problem. [`CertReport::cert`] holds the rustls [`CertifiedKey`] (chain leaf-first,
//! root included) only when no check failed; warnings do not block. Should a parser panic on a
//! hostile file, the report ends with a failed `internal` check instead.
//!
//! What it does not do: it does not validate the chain against a trust store (the phones have
//! their own), check revocation, look at the CA certificates' validity dates, watch the files, or
//! serve TLS. The caller decides when to call [`load`] again and builds the rustls config.
//!
//! The input is untrusted: whatever the bytes, [`load`] returns a report and does not panic.

use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::Read;
use std::net::IpAddr;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use p12_keystore::Pkcs12Archive;
use p12_keystore::error::Error as P12Error;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::{CertifiedKey, SigningKey};
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::{ExtendedKeyUsage, GeneralName};
use x509_parser::objects::oid_registry;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::time::ASN1Time;
use x509_parser::x509::{SubjectPublicKeyInfo, X509Name, X509Version};

const RULE_PFX_FILE: &str = "pfx-file";
const RULE_PFX_PASSWORD: &str = "pfx-password";
const RULE_PRIVATE_KEY: &str = "private-key";
const RULE_KEY_MATCH: &str = "key-match";
const RULE_CHAIN: &str = "chain";
const RULE_EKU: &str = "eku-server-auth";
const RULE_IP_IDENTITY: &str = "ip-identity";
const RULE_VALIDITY: &str = "validity";
/// Only reached if a parser panics; kept apart so such a bug is not blamed on the user's file.
const RULE_INTERNAL: &str = "internal";

/// A PFX with a key and a few certificates is a few KiB. The cap only stops a mistyped path
/// (a log file, /dev/zero) from being read into memory whole.
const MAX_PFX_BYTES: u64 = 4 << 20;
const MAX_PASSWORD_BYTES: u64 = 64 << 10;
/// Below this much remaining validity the `validity` rule warns.
const RENEW_WARNING_SECS: i64 = 30 * DAY_SECS;
const DAY_SECS: i64 = 86_400;
const OID_SERVER_AUTH: &str = "1.3.6.1.5.5.7.3.1";

const WRONG_PASSWORD: &str =
    "wrong PFX password (the file's integrity check failed): check pfx_password_file";
const ONLY_LEAF: &str =
    "PFX holds only the leaf certificate; include the intermediate and root CA certificates";

/// How a rule came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        })
    }
}

/// The outcome of one rule: `rule` is a stable name (see the module doc), `message` one line
/// saying what was found and, when something is wrong, what to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub level: Level,
    pub rule: String,
    pub message: String,
}

impl Check {
    fn new(level: Level, rule: &str, message: impl Into<String>) -> Check {
        Check {
            level,
            rule: rule.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.level, self.rule, self.message)
    }
}

/// A certificate that passed every rule, ready for rustls.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    /// The chain leaf-first (leaf, intermediates, root) and the signing key.
    pub key: Arc<CertifiedKey>,
    /// The leaf's subject, e.g. "CN=relay1.corp.example".
    pub subject: String,
    /// The leaf's SAN DNS names, or its CN when it has no SAN DNS names.
    pub dns_names: Vec<String>,
    pub not_after: SystemTime,
    /// Lower-case hex SHA-256 of the leaf certificate's DER (its usual fingerprint).
    pub sha256: String,
}

/// Everything [`load`] found.
#[derive(Debug, Clone)]
pub struct CertReport {
    /// One check per rule, in rule order.
    pub checks: Vec<Check>,
    /// `Some` if and only if no check is [`Level::Fail`].
    pub cert: Option<LoadedCert>,
}

impl CertReport {
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.level == Level::Fail)
    }

    /// The failure messages joined with "; " (empty when nothing failed).
    pub fn summary(&self) -> String {
        self.failures()
            .map(|c| c.message.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Reads the PFX and its password file and checks every rule. Never panics, whatever the bytes.
///
/// `password_file` holds the password with at most one trailing newline (`\n` or `\r\n`), which
/// is removed; `None` means the PFX has an empty password. `now` is the time the validity rule
/// checks against (a parameter so callers and tests can ask "will it still be valid then?").
pub fn load(
    pfx: &Path,
    password_file: Option<&Path>,
    fqdns: &[String],
    now: SystemTime,
) -> CertReport {
    let bytes = read_limited(pfx, MAX_PFX_BYTES, "PFX file", "edge.pfx");
    let input = PfxInput {
        name: pfx.display().to_string(),
        read_message: bytes
            .as_ref()
            .map(|b| format!("read {} ({} bytes)", pfx.display(), b.len()))
            .unwrap_or_default(),
        bytes,
        password: read_password(password_file),
        password_origin: password_file.map(|f| format!("the password from {}", f.display())),
    };
    load_input(input, fqdns, now)
}

/// Checks a PFX held in memory (the one the cloud pushes) by the same rules as [`load`]; `name`
/// says where it came from in the messages. The password is taken as given.
pub fn load_bytes(
    name: &str,
    pfx: &[u8],
    password: &str,
    fqdns: &[String],
    now: SystemTime,
) -> CertReport {
    let bytes = if pfx.len() as u64 > MAX_PFX_BYTES {
        Err(format!("{name} is larger than {} KiB", MAX_PFX_BYTES >> 10))
    } else if pfx.is_empty() {
        Err(format!("{name} is empty"))
    } else {
        Ok(pfx.to_vec())
    };
    let input = PfxInput {
        name: name.to_owned(),
        read_message: format!("received {name} ({} bytes)", pfx.len()),
        bytes,
        password: Ok(password.to_owned()),
        password_origin: (!password.is_empty()).then(|| "the password uploaded with it".into()),
    };
    load_input(input, fqdns, now)
}

/// A PFX to check, however it was obtained.
struct PfxInput {
    /// The file's path, or what the bytes are, for messages.
    name: String,
    /// The `pfx-file` rule's message when the bytes are there.
    read_message: String,
    bytes: Result<Vec<u8>, String>,
    password: Result<String, String>,
    /// Where the password came from ("the password from <file>"); `None`: an empty password.
    password_origin: Option<String>,
}

fn load_input(input: PfxInput, fqdns: &[String], now: SystemTime) -> CertReport {
    let mut checks = Vec::new();
    // The PFX is parsed by pre-release RustCrypto crates; a panic in them must become a failed
    // check, not a dead daemon or a failed reload that takes the running certificate with it.
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| run(&mut checks, input, fqdns, now)));
    let cert = match outcome {
        Ok(cert) => cert,
        Err(_) => {
            checks.push(Check::new(
                Level::Fail,
                RULE_INTERNAL,
                "internal error while checking the certificate (a parser panicked); please report it",
            ));
            None
        }
    };
    let failed = checks.iter().any(|c| c.level == Level::Fail);
    if cert.is_none() && !failed {
        // Not reachable today; keeps the "Some iff no failure" promise if `run` ever changes.
        checks.push(Check::new(
            Level::Fail,
            RULE_INTERNAL,
            "internal error: no certificate was produced",
        ));
    }
    CertReport {
        cert: if failed { None } else { cert },
        checks,
    }
}

/// A rule's way of recording its outcome.
type Push<'p> = dyn FnMut(Level, &str, String) + 'p;

/// The rules in order; pushes their checks and returns the certificate when all of them allow it.
fn run(
    checks: &mut Vec<Check>,
    input: PfxInput,
    fqdns: &[String],
    now: SystemTime,
) -> Option<LoadedCert> {
    let mut push =
        |level, rule: &str, message: String| checks.push(Check::new(level, rule, message));
    match &input.bytes {
        Ok(_) => push(Level::Ok, RULE_PFX_FILE, input.read_message.clone()),
        Err(e) => push(Level::Fail, RULE_PFX_FILE, e.clone()),
    }
    let archive = rule_pfx_password(&mut push, &input)?;
    let (certs, leaf_index, signing_key) = rule_private_key(&mut push, &archive)?;
    let leaf = &certs[leaf_index];
    if let Some(key) = &signing_key {
        rule_key_match(&mut push, key.as_ref(), leaf);
    }
    let chain = rule_chain(&mut push, &certs, leaf_index);
    push_eku_check(&mut push, &leaf.x509);
    let ids = Identities::of(&leaf.x509);
    push_identity_check(&mut push, &ids);
    for fqdn in fqdns {
        let (level, message) = fqdn_check(fqdn, &ids);
        push(level, &format!("fqdn {fqdn}"), message);
    }
    let not_after = rule_validity(&mut push, &leaf.x509, now);

    // Built only when every rule above passed; `load` drops it otherwise anyway, this just
    // avoids the work and keeps the rule results the single source of truth.
    if checks.iter().any(|c| c.level == Level::Fail) {
        return None;
    }
    let signing_key = signing_key?;
    let chain_der = chain
        .iter()
        .map(|&i| CertificateDer::from(certs[i].der.to_vec()))
        .collect();
    Some(LoadedCert {
        key: Arc::new(CertifiedKey::new(chain_der, signing_key)),
        subject: leaf.x509.subject().to_string(),
        dns_names: ids.names().to_vec(),
        not_after: system_time(not_after),
        sha256: hex_sha256(leaf.der),
    })
}

/// Rule 2, `pfx-password`: the password file reads and opens the PFX. The password file is read even
/// when the PFX is not, so a broken install reports both files at once.
fn rule_pfx_password(push: &mut Push<'_>, input: &PfxInput) -> Option<Pkcs12Archive> {
    let password = match &input.password {
        Ok(p) => p,
        Err(e) => {
            push(Level::Fail, RULE_PFX_PASSWORD, e.clone());
            return None;
        }
    };
    let bytes = input.bytes.as_ref().ok()?;
    let archive = match open_pfx(
        &input.name,
        bytes,
        password,
        input.password_origin.is_some(),
    ) {
        Ok(a) => a,
        Err(e) => {
            push(Level::Fail, RULE_PFX_PASSWORD, e);
            return None;
        }
    };
    push(
        Level::Ok,
        RULE_PFX_PASSWORD,
        match &input.password_origin {
            Some(f) => format!("PFX opened with {f}"),
            None => {
                "PFX opened with an empty password (no pfx_password_file configured)".to_owned()
            }
        },
    );
    Some(archive)
}

/// Rule 3, `private-key`: the PFX holds a certificate and a private key rustls can sign with. Returns
/// the certificates, which of them is the leaf, and the key (`None` when unusable: the rules on
/// the certificate still run).
#[allow(clippy::type_complexity)]
fn rule_private_key<'a>(
    push: &mut Push<'_>,
    archive: &'a Pkcs12Archive,
) -> Option<(Vec<PfxCert<'a>>, usize, Option<Arc<dyn SigningKey>>)> {
    let certs = match pfx_certs(archive) {
        Ok(c) => c,
        Err(e) => {
            push(Level::Fail, RULE_PRIVATE_KEY, e);
            return None;
        }
    };
    if archive.keys.is_empty() {
        push(
            Level::Fail,
            RULE_PRIVATE_KEY,
            "PFX holds no private key: export it together with the key (openssl pkcs12 -export -inkey ...)".to_owned(),
        );
        return None;
    }
    if certs.is_empty() {
        push(
            Level::Fail,
            RULE_PRIVATE_KEY,
            "PFX holds a private key but no certificate: export it with the certificate and its chain".to_owned(),
        );
        return None;
    }
    let (key_index, leaf_index) = pair_key_with_leaf(archive, &certs);
    let leaf = &certs[leaf_index];
    let key_bag = &archive.keys[key_index];
    let signing_key = match signing_key(key_bag.key.as_der(), Some(leaf.x509.public_key())) {
        Ok(k) => {
            let what = format!(
                "{} private key for {}, {} certificate(s)",
                describe_key(leaf.x509.public_key()),
                leaf.x509.subject(),
                certs.len()
            );
            if archive.keys.len() > 1 {
                push(
                    Level::Warn,
                    RULE_PRIVATE_KEY,
                    format!(
                        "PFX holds {} private keys; using the {what}: export only the relay's key",
                        archive.keys.len()
                    ),
                );
            } else {
                push(Level::Ok, RULE_PRIVATE_KEY, format!("PFX holds an {what}"));
            }
            Some(k)
        }
        Err(_) => {
            // rustls only says "failed to parse"; the size or curve is what the user can act on,
            // and the certificate the PFX pairs with the key carries it.
            let oid = key_bag.key.oid().to_string();
            let leaf_spki = leaf.x509.public_key();
            let what = if leaf_spki.algorithm.algorithm.to_id_string() == oid {
                describe_key(leaf_spki)
            } else {
                key_algorithm_name(&oid)
            };
            push(
                Level::Fail,
                RULE_PRIVATE_KEY,
                format!(
                    "the {what} private key cannot be used for TLS here: use an RSA key of 2048 to 4096 bits or an ECDSA P-256/P-384 key"
                ),
            );
            None
        }
    };
    Some((certs, leaf_index, signing_key))
}

/// Rule 4, `key-match`: the private key belongs to the leaf certificate.
fn rule_key_match(push: &mut Push<'_>, key: &dyn SigningKey, leaf: &PfxCert<'_>) {
    match key.public_key() {
        Some(spki) if same_public_key(&spki, leaf.x509.public_key()) => push(
            Level::Ok,
            RULE_KEY_MATCH,
            format!(
                "the private key belongs to the leaf certificate {}",
                leaf.x509.subject()
            ),
        ),
        Some(_) => push(
            Level::Fail,
            RULE_KEY_MATCH,
            format!(
                "the private key does not belong to the leaf certificate {}: export the PFX from the key and certificate that were issued together",
                leaf.x509.subject()
            ),
        ),
        None => push(
            Level::Fail,
            RULE_KEY_MATCH,
            "cannot derive the public key of the private key to compare it with the certificate"
                .to_owned(),
        ),
    }
}

/// Rule 5, `chain`: the chain from the leaf up to a root is complete. Returns the chain's indices.
fn rule_chain(push: &mut Push<'_>, certs: &[PfxCert<'_>], leaf_index: usize) -> Vec<usize> {
    let leaf = &certs[leaf_index];
    let (chain, chain_result) = build_chain(certs, leaf_index);
    match &chain_result {
        Err(e) => push(Level::Fail, RULE_CHAIN, e.clone()),
        Ok(()) => {
            let path = chain
                .iter()
                .map(|&i| certs[i].x509.subject().to_string())
                .collect::<Vec<_>>()
                .join(" → ");
            let unused = certs.len().saturating_sub(chain.len());
            if is_ca(&leaf.x509) {
                push(
                    Level::Warn,
                    RULE_CHAIN,
                    format!(
                        "the leaf certificate is itself a CA (basicConstraints CA:TRUE), which many TLS clients refuse: reissue it as an end-entity certificate; chain: {path}"
                    ),
                );
            } else if unused > 0 {
                push(
                    Level::Warn,
                    RULE_CHAIN,
                    format!(
                        "complete chain to a root CA: {path}; the PFX also holds {unused} certificate(s) outside this chain, which are not sent"
                    ),
                );
            } else {
                push(
                    Level::Ok,
                    RULE_CHAIN,
                    format!("complete chain to a root CA: {path}"),
                );
            }
        }
    }
    chain
}

/// Rule 9, `validity`: valid now, with a warning within the renewal window. Returns `not_after` (Unix
/// seconds).
fn rule_validity(push: &mut Push<'_>, leaf: &X509Certificate<'_>, now: SystemTime) -> i64 {
    let validity = leaf.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let now_secs = unix_secs(now);
    let left = not_after.saturating_sub(now_secs);
    let until = format_time(&validity.not_after);
    if now_secs < not_before {
        push(
            Level::Fail,
            RULE_VALIDITY,
            format!(
                "certificate is not valid before {}: check the system clock, or keep the current certificate until then",
                format_time(&validity.not_before)
            ),
        );
    } else if left < 0 {
        push(
            Level::Fail,
            RULE_VALIDITY,
            format!("certificate expired on {until}: renew it and replace the PFX"),
        );
    } else if left < RENEW_WARNING_SECS {
        let days = match left / DAY_SECS {
            0 => "less than a day".to_owned(),
            1 => "1 day".to_owned(),
            n => format!("{n} days"),
        };
        push(
            Level::Warn,
            RULE_VALIDITY,
            format!("expires in {days} on {until}: renew it"),
        );
    } else {
        let days = left / DAY_SECS;
        push(
            Level::Ok,
            RULE_VALIDITY,
            format!("valid until {until}, {days} days left"),
        );
    }
    not_after
}

/// Reads a whole file of at most `limit` bytes; the error names the file, the OS error and the
/// configuration key to check.
fn read_limited(path: &Path, limit: u64, what: &str, key: &str) -> Result<Vec<u8>, String> {
    let fail = |e: std::io::Error| {
        format!(
            "cannot read {what} {}: {e}; check {key} and the file's permissions",
            path.display()
        )
    };
    let file = File::open(path).map_err(fail)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(fail)?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "{what} {} is larger than {} KiB: check {key}",
            path.display(),
            limit >> 10
        ));
    }
    Ok(bytes)
}

/// The password: the file's text minus ONE trailing newline, or empty without a file.
fn read_password(password_file: Option<&Path>) -> Result<String, String> {
    let Some(path) = password_file else {
        return Ok(String::new());
    };
    let bytes = read_limited(
        path,
        MAX_PASSWORD_BYTES,
        "password file",
        "pfx_password_file",
    )?;
    let text = String::from_utf8(bytes).map_err(|_| {
        format!(
            "password file {} is not UTF-8 text: check pfx_password_file",
            path.display()
        )
    })?;
    // Only one newline: a password may itself end in whitespace, but editors add one line end.
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    // Windows Notepad may start the file with a byte-order mark; no real password starts with one.
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text).to_owned())
}

/// Decrypts the PFX. The error is the full message for the `pfx-password` check.
fn open_pfx(
    name: &str,
    bytes: &[u8],
    password: &str,
    has_password_file: bool,
) -> Result<Pkcs12Archive, String> {
    let not_pfx = |how: &str| format!("{name} is not a PKCS#12/PFX file{how}");
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let text = bytes.get(start..).unwrap_or_default();
    let text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
    if text.starts_with(b"-----BEGIN") {
        return Err(not_pfx(
            " but PEM text: convert it with `openssl pkcs12 -export -inkey relay.key -in relay.crt -certfile chain.pem -out relay.pfx`",
        ));
    }
    if text.starts_with(b"MII") {
        return Err(not_pfx(" but base64 text: decode it with `base64 -d`"));
    }
    // Recognise the outer structure before decrypting anything, so that "this is not a PFX at
    // all" and "this PFX is damaged" are told apart: p12-keystore reports both as DER errors.
    if !looks_like_pfx(bytes) {
        return Err(not_pfx(": check edge.pfx"));
    }
    // `Pkcs12Archive` rather than `KeyStore::from_pkcs12`: the key store keeps only the
    // certificates it can link to the key by subject *string* and drops a key with no linked
    // certificate, which would turn "the intermediate is missing" into "only the leaf" and
    // "certificate not marked" into "no key". The archive hands over every bag and the chain is
    // built (and explained) here.
    Pkcs12Archive::from_pkcs12(bytes, password).map_err(|e| match e {
        P12Error::MacError(_) if has_password_file => WRONG_PASSWORD.to_owned(),
        P12Error::MacError(_) => {
            format!("{WRONG_PASSWORD} (none is configured, so an empty password was tried)")
        }
        // Without a MAC, a wrong password only shows when decryption produces garbage.
        P12Error::Pkcs5Error(_) | P12Error::UnpadError | P12Error::InvalidPrivateKey => format!(
            "cannot decrypt the PFX contents ({e}): wrong password or damaged file; check pfx_password_file"
        ),
        P12Error::UnsupportedEncryptionScheme | P12Error::UnsupportedMacAlgorithm => format!(
            "the PFX uses an encryption or MAC algorithm the relay cannot read ({e}): re-export it with `openssl pkcs12 -export` (AES-256 and SHA-256 are the defaults)"
        ),
        P12Error::InvalidParameters => format!(
            "the PFX has unsupported protection parameters (for example over 1,000,000 key-derivation iterations) ({e}): re-export it with `openssl pkcs12 -export`"
        ),
        P12Error::X509Error(_) | P12Error::UnsupportedCertificateType => {
            format!("the PFX holds a certificate that cannot be parsed ({e}): re-export it with the correct certificates")
        }
        _ => format!(
            "{name} is damaged or is a PKCS#12 variant the relay cannot read ({e}): re-export it with `openssl pkcs12 -export`"
        ),
    })
}

/// A PFX is a SEQUENCE whose first element is INTEGER 3 (its version).
fn looks_like_pfx(bytes: &[u8]) -> bool {
    if bytes.first() != Some(&0x30) {
        return false;
    }
    let length_octets = match bytes.get(1) {
        Some(&l) if l <= 0x80 => 0, // short form, or BER indefinite length
        Some(&l) => usize::from(l & 0x7f),
        None => return false,
    };
    bytes.get(2 + length_octets..5 + length_octets) == Some(&[0x02, 0x01, 0x03][..])
}

/// A certificate bag of the PFX, parsed.
struct PfxCert<'a> {
    der: &'a [u8],
    x509: X509Certificate<'a>,
    local_key_id: Option<&'a [u8]>,
}

/// The PFX's certificates in file order, duplicates dropped.
fn pfx_certs(archive: &Pkcs12Archive) -> Result<Vec<PfxCert<'_>>, String> {
    let mut certs: Vec<PfxCert<'_>> = Vec::new();
    for bag in &archive.certs {
        let der = bag.cert.as_der();
        let local_key_id = bag.local_key_id.as_deref();
        if let Some(seen) = certs.iter_mut().find(|c| c.der == der) {
            seen.local_key_id = seen.local_key_id.or(local_key_id);
            continue;
        }
        let (_, x509) = X509Certificate::from_der(der).map_err(|e| {
            format!("the PFX holds a certificate that cannot be parsed ({e}): re-export it")
        })?;
        certs.push(PfxCert {
            der,
            x509,
            local_key_id,
        });
    }
    Ok(certs)
}

/// Which key to serve and which certificate is its leaf: a certificate with the key's public key
/// wins; then the one the PFX links to the key (localKeyId), which `key-match` will then reject
/// with a clear message; then the first non-CA certificate.
fn pair_key_with_leaf(archive: &Pkcs12Archive, certs: &[PfxCert<'_>]) -> (usize, usize) {
    let by_public_key = |der: &[u8]| {
        certs.iter().position(|c| {
            let cert_spki = c.x509.public_key();
            signing_key(der, Some(cert_spki)).is_ok_and(|k| {
                k.public_key()
                    .is_some_and(|key_spki| same_public_key(&key_spki, cert_spki))
            })
        })
    };
    let by_key_id = |id: Option<&[u8]>| {
        certs
            .iter()
            .position(|c| id.is_some() && c.local_key_id == id)
    };
    for (k, bag) in archive.keys.iter().enumerate() {
        if let Some(c) = by_public_key(bag.key.as_der()) {
            return (k, c);
        }
    }
    for (k, bag) in archive.keys.iter().enumerate() {
        if let Some(c) = by_key_id(bag.local_key_id.as_ref().map(|id| id.0.as_slice())) {
            return (k, c);
        }
    }
    (0, certs.iter().position(|c| !is_ca(&c.x509)).unwrap_or(0))
}

/// The rustls signing key for a PKCS#8 key; `cert_spki`, the certificate the key is meant for,
/// repairs EC keys stored without their public point.
fn signing_key(
    pkcs8: &[u8],
    cert_spki: Option<&SubjectPublicKeyInfo<'_>>,
) -> Result<Arc<dyn SigningKey>, rustls::Error> {
    use rustls::crypto::ring::sign::any_supported_type;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec()));
    let error = match any_supported_type(&der) {
        Ok(key) => return Ok(key),
        Err(e) => e,
    };
    let repaired = cert_spki
        .filter(|spki| spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY)
        .and_then(|spki| ec_key_with_public_point(pkcs8, &spki.subject_public_key.data));
    match repaired {
        Some(sec1) => any_supported_type(&PrivateKeyDer::Sec1(sec1.into())),
        None => Err(error),
    }
}

/// Rebuilds an EC private key as SEC1 with the certificate's public point added. The point is
/// optional in the format and some tools leave it out (OpenSSL with `ec -no_public` too), but
/// ring refuses such keys (briansmith/ring#2133). ring recomputes the point from the private
/// scalar and rejects a key whose point differs, so this cannot pair a key with a stranger's
/// certificate.
fn ec_key_with_public_point(pkcs8: &[u8], point: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::der_parser::der::parse_der;
    // PrivateKeyInfo ::= SEQUENCE { version, algorithm, privateKey OCTET STRING (ECPrivateKey) }
    let (_, info) = parse_der(pkcs8).ok()?;
    let ec_private_key = info.as_sequence().ok()?.get(2)?.as_slice().ok()?;
    // ECPrivateKey ::= SEQUENCE { version 1, privateKey OCTET STRING, [0] params, [1] publicKey }
    let (_, ec) = parse_der(ec_private_key).ok()?;
    let scalar = ec.as_sequence().ok()?.get(1)?.as_slice().ok()?;
    let bit_string = [&[0u8][..], point].concat(); // leading octet: no unused bits
    let content = [
        der_tlv(0x02, &[1]),
        der_tlv(0x04, scalar),
        der_tlv(0xa1, &der_tlv(0x03, &bit_string)),
    ]
    .concat();
    Some(der_tlv(0x30, &content))
}

/// One DER element: tag, definite length, content.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len().to_be_bytes();
    let skip = len.iter().take_while(|b| **b == 0).count();
    let len = &len[skip..];
    let mut out = vec![tag];
    match len {
        [] => out.push(0),
        [short] if *short < 0x80 => out.push(*short),
        long => {
            out.push(0x80 | long.len() as u8);
            out.extend_from_slice(long);
        }
    }
    out.extend_from_slice(content);
    out
}

/// Compares the key's SPKI with the certificate's; falls back to the bare key bits because the
/// algorithm identifier may be encoded differently for the same key (e.g. RSA without NULL).
fn same_public_key(key_spki: &[u8], cert_spki: &SubjectPublicKeyInfo<'_>) -> bool {
    key_spki == cert_spki.raw
        || SubjectPublicKeyInfo::from_der(key_spki)
            .is_ok_and(|(_, k)| k.subject_public_key.data == cert_spki.subject_public_key.data)
}

fn describe_key(spki: &SubjectPublicKeyInfo<'_>) -> String {
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA {}-bit", rsa.key_size()),
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == OID_EC_P256 => "ECDSA P-256".to_owned(),
                Some(c) if c == OID_NIST_EC_P384 => "ECDSA P-384".to_owned(),
                Some(c) if c == OID_NIST_EC_P521 => "ECDSA P-521".to_owned(),
                _ => "ECDSA".to_owned(),
            }
        }
        _ => key_algorithm_name(&spki.algorithm.algorithm.to_id_string()),
    }
}

fn key_algorithm_name(oid: &str) -> String {
    match oid {
        "1.2.840.113549.1.1.1" => "RSA".to_owned(),
        "1.2.840.113549.1.1.10" => "RSASSA-PSS".to_owned(),
        "1.2.840.10045.2.1" => "EC".to_owned(),
        "1.2.840.10040.4.1" => "DSA".to_owned(),
        "1.3.101.112" => "Ed25519".to_owned(),
        "1.3.101.113" => "Ed448".to_owned(),
        other => format!("algorithm {other}"),
    }
}

fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

/// Issuer/subject equality: byte-equal DER, or the same text when a CA encoded the name with
/// other string types (the signature check that follows makes the match safe).
fn same_name(a: &X509Name<'_>, b: &X509Name<'_>) -> bool {
    a.as_raw() == b.as_raw()
        || matches!(
            (a.to_string_with_registry(oid_registry()), b.to_string_with_registry(oid_registry())),
            (Ok(x), Ok(y)) if x == y
        )
}

/// Self-signed: issuer = subject and the signature verifies with its own key. An algorithm the
/// verifier lacks is accepted here, because nothing relies on a root's signature on itself.
fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    same_name(cert.issuer(), cert.subject())
        && matches!(
            cert.verify_signature(None),
            Ok(()) | Err(X509Error::SignatureUnsupportedAlgorithm)
        )
}

/// Orders the chain leaf→root from wherever the certificates sit in the PFX and checks each link.
/// Returns the indices in `certs` reached so far and the first broken link, if any.
fn build_chain(certs: &[PfxCert<'_>], leaf: usize) -> (Vec<usize>, Result<(), String>) {
    let mut chain = vec![leaf];
    let mut current = leaf;
    loop {
        let cert = &certs[current].x509;
        if is_self_signed(cert) {
            if chain.len() == 1 {
                let msg = format!(
                    "the leaf certificate {} is self-signed, not issued by a CA: use a certificate from your CA and include the intermediate and root CA certificates",
                    cert.subject()
                );
                return (chain, Err(msg));
            }
            return (chain, Ok(()));
        }
        let candidates: Vec<usize> = (0..certs.len())
            .filter(|i| !chain.contains(i) && same_name(certs[*i].x509.subject(), cert.issuer()))
            .collect();
        let Some(&first) = candidates.first() else {
            let msg = if certs.len() == 1 {
                ONLY_LEAF.to_owned()
            } else {
                format!(
                    "PFX lacks the CA certificate {}, which issued {}: include every CA certificate up to the self-signed root",
                    cert.issuer(),
                    cert.subject()
                )
            };
            return (chain, Err(msg));
        };
        // Several CA certificates may share a name (a renewed CA); the one whose key made the
        // signature is the issuer.
        let verifies = |i: usize| cert.verify_signature(Some(certs[i].x509.public_key()));
        let Some(next) = candidates.iter().copied().find(|&i| verifies(i).is_ok()) else {
            let msg = match verifies(first) {
                Err(X509Error::SignatureUnsupportedAlgorithm) => format!(
                    "cannot verify the signature on {} by {}: unsupported signature algorithm; use a certificate signed with RSA (SHA-256 or better) or ECDSA",
                    cert.subject(),
                    cert.issuer()
                ),
                _ => format!(
                    "the signature on {} does not verify with the key of the CA certificate {} in the PFX: that is not the CA certificate that issued it; include the right one",
                    cert.subject(),
                    cert.issuer()
                ),
            };
            return (chain, Err(msg));
        };
        let issuer = &certs[next].x509;
        // An X.509 v1 self-signed root has no extensions at all, so no basicConstraints; such
        // roots are still trust anchors (RFC 5280 §6.1).
        let v1_root = issuer.version() == X509Version::V1 && is_self_signed(issuer);
        if !is_ca(issuer) && !v1_root {
            let msg = format!(
                "{} is not a CA certificate (basicConstraints CA:TRUE missing) but is the issuer of {} in the chain: include the real CA certificates",
                issuer.subject(),
                cert.subject()
            );
            return (chain, Err(msg));
        }
        chain.push(next);
        current = next;
    }
}

fn push_eku_check(push: &mut impl FnMut(Level, &str, String), leaf: &X509Certificate<'_>) {
    match leaf.extended_key_usage() {
        Ok(Some(eku)) if eku.value.server_auth => push(
            Level::Ok,
            RULE_EKU,
            "the leaf certificate allows TLS server authentication (EKU serverAuth)".to_owned(),
        ),
        Ok(Some(eku)) => push(
            Level::Fail,
            RULE_EKU,
            format!(
                "the leaf certificate's Extended Key Usage lacks serverAuth ({OID_SERVER_AUTH}), it allows only {}: reissue it with extendedKeyUsage = serverAuth",
                eku_names(eku.value).join(", ")
            ),
        ),
        Ok(None) => push(
            Level::Fail,
            RULE_EKU,
            format!(
                "the leaf certificate has no Extended Key Usage extension: reissue it with extendedKeyUsage = serverAuth ({OID_SERVER_AUTH})"
            ),
        ),
        Err(e) => push(
            Level::Fail,
            RULE_EKU,
            format!(
                "the leaf certificate's Extended Key Usage extension is invalid ({e}): reissue it with extendedKeyUsage = serverAuth"
            ),
        ),
    }
}

fn eku_names(eku: &ExtendedKeyUsage<'_>) -> Vec<String> {
    let known = [
        (eku.any, "anyExtendedKeyUsage"),
        (eku.client_auth, "clientAuth"),
        (eku.code_signing, "codeSigning"),
        (eku.email_protection, "emailProtection"),
        (eku.time_stamping, "timeStamping"),
        (eku.ocsp_signing, "OCSPSigning"),
    ];
    let mut names: Vec<String> = known
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| (*n).to_owned())
        .collect();
    names.extend(eku.other.iter().map(|oid| oid.to_id_string()));
    if names.is_empty() {
        names.push("nothing".to_owned());
    }
    names
}

/// What the leaf certificate claims to be.
#[derive(Default)]
struct Identities {
    san_dns: Vec<String>,
    san_ips: Vec<String>,
    cn_names: Vec<String>,
    cn_ips: Vec<String>,
    san_error: Option<String>,
}

impl Identities {
    fn of(leaf: &X509Certificate<'_>) -> Identities {
        let mut ids = Identities::default();
        match leaf.subject_alternative_name() {
            Ok(Some(san)) => {
                for name in &san.value.general_names {
                    match name {
                        GeneralName::DNSName(d) => ids.san_dns.push((*d).to_owned()),
                        GeneralName::IPAddress(ip) => ids.san_ips.push(ip_text(ip)),
                        _ => {}
                    }
                }
            }
            Ok(None) => {}
            Err(e) => ids.san_error = Some(e.to_string()),
        }
        for cn in leaf
            .subject()
            .iter_common_name()
            .filter_map(|a| a.as_str().ok())
        {
            if cn.parse::<IpAddr>().is_ok() {
                ids.cn_ips.push(cn.to_owned());
            } else {
                ids.cn_names.push(cn.to_owned());
            }
        }
        ids
    }

    /// The DNS names clients match against: the SAN DNS names, or the CN when there are none
    /// (as OpenSSL's host check does).
    fn names(&self) -> &[String] {
        if self.san_dns.is_empty() {
            &self.cn_names
        } else {
            &self.san_dns
        }
    }
}

fn ip_text(bytes: &[u8]) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        IpAddr::from(v4).to_string()
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        IpAddr::from(v6).to_string()
    } else {
        format!("malformed IP address of {} bytes", bytes.len())
    }
}

fn push_identity_check(push: &mut impl FnMut(Level, &str, String), ids: &Identities) {
    if let Some(e) = &ids.san_error {
        push(
            Level::Fail,
            RULE_IP_IDENTITY,
            format!(
                "the leaf certificate's Subject Alternative Name extension is invalid ({e}): reissue it"
            ),
        );
        return;
    }
    let names = ids.names();
    let mut ips = ids.san_ips.clone();
    if ids.san_dns.is_empty() {
        ips.extend(ids.cn_ips.iter().cloned());
    }
    if names.is_empty() && !ips.is_empty() {
        push(
            Level::Fail,
            RULE_IP_IDENTITY,
            format!(
                "certificate identifies an IP address, not a DNS name ({}): reissue it for the DNS name(s) the devices use (SAN DNS:...)",
                ips.join(", ")
            ),
        );
    } else if names.is_empty() {
        push(
            Level::Fail,
            RULE_IP_IDENTITY,
            "certificate names no DNS name (no SAN DNS entry, no Common Name): reissue it with SAN DNS:<relay FQDN>".to_owned(),
        );
    } else if !ids.san_ips.is_empty() {
        push(
            Level::Warn,
            RULE_IP_IDENTITY,
            format!(
                "certificate also lists IP address(es) {} besides {}: devices must use the DNS name, so reissue it without IP entries",
                ids.san_ips.join(", "),
                names.join(", ")
            ),
        );
    } else {
        push(
            Level::Ok,
            RULE_IP_IDENTITY,
            format!(
                "certificate identifies DNS name(s), no IP address: {}",
                names.join(", ")
            ),
        );
    }
}

fn fqdn_check(fqdn: &str, ids: &Identities) -> (Level, String) {
    let name = fqdn.trim();
    if name.parse::<IpAddr>().is_ok() {
        return (
            Level::Fail,
            format!("{name} is an IP address: set edge.fqdn to the DNS name devices use"),
        );
    }
    if let Some(pattern) = ids.san_dns.iter().find(|p| name_covers(p, name)) {
        return (Level::Ok, format!("{name} is covered by SAN DNS:{pattern}"));
    }
    if ids.san_dns.is_empty() && ids.cn_names.iter().any(|p| name_covers(p, name)) {
        return (
            Level::Warn,
            format!(
                "{name} is covered only by the Common Name (the certificate has no SAN DNS names), which many clients ignore: reissue it with SAN DNS:{name}"
            ),
        );
    }
    let covered = ids.names();
    let covered = if covered.is_empty() {
        "no DNS name".to_owned()
    } else {
        covered.join(", ")
    };
    (
        Level::Fail,
        format!(
            "certificate does not cover {name} (it covers {covered}): reissue it with SAN DNS:{name}, or correct edge.fqdn"
        ),
    )
}

/// RFC 6125 matching, case-insensitive; a wildcard only as the whole left-most label, standing
/// for exactly one label (`*.corp.example` covers `a.corp.example`, not `corp.example` or
/// `a.b.corp.example`).
fn name_covers(pattern: &str, name: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() || name.contains('*') {
        return false;
    }
    match pattern.strip_prefix("*.") {
        Some(parent) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && !parent.is_empty() && rest == parent),
        None => pattern == name,
    }
}

/// RFC 3339 in UTC. Not humantime: its formatter panics on dates before 1970, which a
/// certificate may carry.
fn format_time(t: &ASN1Time) -> String {
    let t = t.to_datetime();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

fn system_time(unix: i64) -> SystemTime {
    let offset = Duration::from_secs(unix.unsigned_abs());
    let t = if unix >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    };
    t.unwrap_or(UNIX_EPOCH)
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    const FQDN: &str = "relay1.corp.example";
    const PASSWORD: &str = "changeit";

    #[derive(Clone, Copy, PartialEq)]
    enum KeyKind {
        Rsa,
        Ec,
        /// P-256, exported without the optional public point
        EcNoPublic,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum ChainKind {
        /// leaf, intermediate, root
        Full,
        /// leaf, root, intermediate: the PFX's order is not the chain's order
        Shuffled,
        LeafOnly,
        /// leaf and root, no intermediate
        NoIntermediate,
        /// leaf and an intermediate with the right name but another key, and the root
        WrongIntermediate,
    }

    /// What `make_pfx` builds: a root CA → intermediate CA → leaf chain made with the openssl CLI.
    #[derive(Clone, Copy)]
    struct Spec {
        key: KeyKind,
        subject: &'static str,
        /// Lines of the leaf's X.509v3 extension section (SAN, EKU, ...).
        extensions: &'static str,
        /// Validity, in days relative to now.
        valid_from: i64,
        valid_to: i64,
        chain: ChainKind,
        /// `openssl pkcs12 -export -legacy` (RC2/3DES, SHA-1 MAC) instead of OpenSSL 3 defaults.
        legacy: bool,
        password: &'static str,
    }

    impl Default for Spec {
        fn default() -> Spec {
            Spec {
                key: KeyKind::Rsa,
                subject: "/CN=relay1.corp.example",
                extensions: "subjectAltName = DNS:relay1.corp.example\nextendedKeyUsage = serverAuth\nkeyUsage = critical, digitalSignature, keyEncipherment",
                valid_from: -1,
                valid_to: 365,
                chain: ChainKind::Full,
                legacy: false,
                password: PASSWORD,
            }
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        pfx: PathBuf,
        /// Holds `Spec::password` followed by a newline.
        password_file: PathBuf,
    }

    impl Fixture {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn load(&self, fqdns: &[&str]) -> CertReport {
            self.load_at(fqdns, SystemTime::now())
        }

        fn load_at(&self, fqdns: &[&str], now: SystemTime) -> CertReport {
            let fqdns: Vec<String> = fqdns.iter().map(|s| s.to_string()).collect();
            load(&self.pfx, Some(&self.password_file), &fqdns, now)
        }
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn new_key(dir: &Path, kind: KeyKind, file: &str) {
        match kind {
            KeyKind::Rsa => openssl(
                dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                    file,
                ],
            ),
            KeyKind::Ec | KeyKind::EcNoPublic => openssl(
                dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    file,
                ],
            ),
        }
    }

    /// `openssl ca` date: YYYYMMDDHHMMSSZ, `days` from now.
    fn ca_date(days: i64) -> String {
        let t = ASN1Time::from_timestamp(unix_secs(SystemTime::now()) + days * DAY_SECS)
            .expect("date in range");
        format_time(&t).replace(['-', ':', 'T'], "")
    }

    /// Builds a CA chain and a leaf per `spec` and exports them into a PFX.
    fn make_pfx(spec: &Spec) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let ca_ext =
            "basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n";
        std::fs::write(d.join("ca.ext"), ca_ext).expect("write");
        new_key(d, KeyKind::Rsa, "root.key");
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "root.key",
                "-subj",
                "/O=Test/CN=Test Root CA",
                "-days",
                "3650",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                "root.crt",
            ],
        );
        let intermediates: &[&str] = if spec.chain == ChainKind::WrongIntermediate {
            &["int", "int-other"]
        } else {
            &["int"]
        };
        for name in intermediates {
            let key = &format!("{name}.key");
            new_key(d, KeyKind::Rsa, key);
            openssl(
                d,
                &[
                    "req",
                    "-new",
                    "-key",
                    key,
                    "-subj",
                    "/O=Test/CN=Test Intermediate CA",
                    "-out",
                    &format!("{name}.csr"),
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "root.crt",
                    "-CAkey",
                    "root.key",
                    "-CAcreateserial",
                    "-days",
                    "3650",
                    "-extfile",
                    "ca.ext",
                    "-out",
                    &format!("{name}.crt"),
                ],
            );
        }
        // `openssl ca` rather than `x509 -req`: OpenSSL 3.0's x509 cannot set explicit dates.
        let ca_cnf = "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\ndefault_md = sha256\npolicy = p\nunique_subject = no\nemail_in_dn = no\n[p]\ncommonName = optional\n";
        std::fs::write(d.join("ca.cnf"), ca_cnf).expect("write");
        std::fs::write(d.join("index.txt"), "").expect("write");
        std::fs::write(d.join("serial"), "1000\n").expect("write");
        std::fs::write(
            d.join("leaf.ext"),
            format!("[v3]\nbasicConstraints = CA:FALSE\n{}\n", spec.extensions),
        )
        .expect("write");
        new_key(d, spec.key, "leaf.key");
        openssl(
            d,
            &[
                "req",
                "-new",
                "-key",
                "leaf.key",
                "-subj",
                spec.subject,
                "-out",
                "leaf.csr",
            ],
        );
        let (start, end) = (ca_date(spec.valid_from), ca_date(spec.valid_to));
        openssl(
            d,
            &[
                "ca",
                "-batch",
                "-notext",
                "-config",
                "ca.cnf",
                "-cert",
                "int.crt",
                "-keyfile",
                "int.key",
                "-in",
                "leaf.csr",
                "-out",
                "leaf.crt",
                "-startdate",
                &start,
                "-enddate",
                &end,
                "-extfile",
                "leaf.ext",
                "-extensions",
                "v3",
            ],
        );
        let others: &[&str] = match spec.chain {
            ChainKind::Full => &["int.crt", "root.crt"],
            ChainKind::Shuffled => &["root.crt", "int.crt"],
            ChainKind::LeafOnly => &[],
            ChainKind::NoIntermediate => &["root.crt"],
            ChainKind::WrongIntermediate => &["int-other.crt", "root.crt"],
        };
        let mut extra = String::new();
        for f in others {
            extra.push_str(&std::fs::read_to_string(d.join(f)).expect("read cert"));
        }
        std::fs::write(d.join("others.pem"), extra).expect("write");
        let pass = format!("pass:{}", spec.password);
        let export_key = if spec.key == KeyKind::EcNoPublic {
            openssl(
                d,
                &[
                    "ec",
                    "-in",
                    "leaf.key",
                    "-no_public",
                    "-out",
                    "leaf-nopub.key",
                ],
            );
            "leaf-nopub.key"
        } else {
            "leaf.key"
        };
        let mut args = vec![
            "pkcs12",
            "-export",
            "-inkey",
            export_key,
            "-in",
            "leaf.crt",
            "-passout",
            &pass,
            "-out",
            "relay.pfx",
        ];
        if !others.is_empty() {
            args.extend(["-certfile", "others.pem"]);
        }
        if spec.legacy {
            args.push("-legacy");
        }
        openssl(d, &args);
        std::fs::write(d.join("relay.pfx.pass"), format!("{}\n", spec.password)).expect("write");
        Fixture {
            pfx: d.join("relay.pfx"),
            password_file: d.join("relay.pfx.pass"),
            dir,
        }
    }

    fn check<'a>(report: &'a CertReport, rule: &str) -> &'a Check {
        report
            .checks
            .iter()
            .find(|c| c.rule == rule)
            .unwrap_or_else(|| panic!("no {rule} check in {report:#?}"))
    }

    /// The rule failed with a message containing `word`, and no certificate came out.
    fn assert_fails(report: &CertReport, rule: &str, word: &str) {
        let c = check(report, rule);
        assert_eq!(c.level, Level::Fail, "{report:#?}");
        assert!(
            c.message.contains(word),
            "{rule}: {:?} lacks {word:?}",
            c.message
        );
        assert!(report.cert.is_none());
        assert!(report.summary().contains(word));
    }

    fn assert_all_ok(report: &CertReport) {
        for c in &report.checks {
            assert_eq!(c.level, Level::Ok, "{c}");
        }
        assert!(report.cert.is_some());
    }

    #[derive(Debug)]
    struct Serve(Arc<CertifiedKey>);

    impl rustls::server::ResolvesServerCert for Serve {
        fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    /// A full in-memory handshake with rustls on both sides: the server config accepts the key,
    /// the key signs, and a client that trusts only the root verifies chain and name.
    fn handshake(cert: &LoadedCert, version: &'static rustls::SupportedProtocolVersion) {
        use rustls::{
            ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
            .expect("versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Serve(cert.key.clone())));
        let mut roots = RootCertStore::empty();
        roots
            .add(cert.key.cert.last().expect("root").clone())
            .expect("root");
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = FQDN.try_into().expect("name");
        let mut c = ClientConnection::new(Arc::new(client), name).expect("client");
        let mut s = ServerConnection::new(Arc::new(server)).expect("server");
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).expect("client write");
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("server read");
                s.process_new_packets().expect("server handshake");
            }
            buf.clear();
            s.write_tls(&mut buf).expect("server write");
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).expect("client read");
                c.process_new_packets().expect("client handshake");
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                assert_eq!(c.protocol_version(), Some(version.version));
                return;
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn modern_pfx_loads_and_serves() {
        let f = make_pfx(&Spec::default());
        let r = f.load(&[FQDN]);
        assert_all_ok(&r);
        let rules: Vec<&str> = r.checks.iter().map(|c| c.rule.as_str()).collect();
        assert_eq!(
            rules,
            [
                "pfx-file",
                "pfx-password",
                "private-key",
                "key-match",
                "chain",
                "eku-server-auth",
                "ip-identity",
                "fqdn relay1.corp.example",
                "validity"
            ]
        );
        let cert = r.cert.as_ref().expect("cert");
        assert_eq!(cert.subject, "CN=relay1.corp.example");
        assert_eq!(cert.dns_names, [FQDN]);
        assert_eq!(cert.key.cert.len(), 3);
        let left = cert
            .not_after
            .duration_since(SystemTime::now())
            .expect("future")
            .as_secs() as i64;
        assert!((364 * DAY_SECS..=365 * DAY_SECS).contains(&left), "{left}");
        // The fingerprint is the one openssl prints.
        let out = Command::new("openssl")
            .args([
                "x509",
                "-in",
                "leaf.crt",
                "-noout",
                "-fingerprint",
                "-sha256",
            ])
            .current_dir(f.dir.path())
            .output()
            .expect("openssl");
        let openssl_fp = String::from_utf8_lossy(&out.stdout)
            .trim()
            .rsplit('=')
            .next()
            .unwrap_or("")
            .replace(':', "")
            .to_lowercase();
        assert_eq!(cert.sha256, openssl_fp);
        assert!(check(&r, "private-key").message.contains("RSA 2048-bit"));
        handshake(cert, &rustls::version::TLS13);
        handshake(cert, &rustls::version::TLS12);
    }

    #[test]
    fn legacy_pfx_loads() {
        let f = make_pfx(&Spec {
            legacy: true,
            ..Spec::default()
        });
        let r = f.load(&[FQDN]);
        assert_all_ok(&r);
        handshake(r.cert.as_ref().expect("cert"), &rustls::version::TLS13);
    }

    #[test]
    fn ec_pfx_loads_and_serves() {
        let f = make_pfx(&Spec {
            key: KeyKind::Ec,
            ..Spec::default()
        });
        let r = f.load(&[FQDN]);
        assert_all_ok(&r);
        assert!(check(&r, "private-key").message.contains("ECDSA P-256"));
        let cert = r.cert.as_ref().expect("cert");
        handshake(cert, &rustls::version::TLS13);
        handshake(cert, &rustls::version::TLS12);
    }

    #[test]
    fn ec_key_without_public_point_loads() {
        let f = make_pfx(&Spec {
            key: KeyKind::EcNoPublic,
            ..Spec::default()
        });
        // The fixture really is one ring refuses as it stands.
        let bytes = std::fs::read(&f.pfx).expect("read");
        let archive = Pkcs12Archive::from_pkcs12(&bytes, PASSWORD).expect("pfx");
        assert!(signing_key(archive.keys[0].key.as_der(), None).is_err());
        let r = f.load(&[FQDN]);
        assert_all_ok(&r);
        handshake(r.cert.as_ref().expect("cert"), &rustls::version::TLS13);
    }

    #[test]
    fn chain_is_put_in_leaf_to_root_order() {
        let f = make_pfx(&Spec {
            chain: ChainKind::Shuffled,
            ..Spec::default()
        });
        let r = f.load(&[FQDN]);
        assert_all_ok(&r);
        let chain = &r.cert.as_ref().expect("cert").key.cert;
        let subjects: Vec<String> = chain
            .iter()
            .map(|der| {
                X509Certificate::from_der(der)
                    .expect("parse")
                    .1
                    .subject()
                    .to_string()
            })
            .collect();
        assert_eq!(
            subjects,
            [
                "CN=relay1.corp.example",
                "O=Test, CN=Test Intermediate CA",
                "O=Test, CN=Test Root CA"
            ]
        );
    }

    #[test]
    fn password_file_and_wrong_password() {
        let f = make_pfx(&Spec::default());
        let load_with = |content: &str| {
            let file = f.path("other.pass");
            std::fs::write(&file, content).expect("write");
            load(&f.pfx, Some(&file), &[FQDN.to_owned()], SystemTime::now())
        };
        assert!(load_with("changeit").cert.is_some());
        assert!(load_with("changeit\r\n").cert.is_some());
        // Exactly one newline is removed.
        assert_fails(
            &load_with("changeit\n\n"),
            "pfx-password",
            "wrong PFX password",
        );
        let r = load_with("wrong\n");
        assert_fails(&r, "pfx-password", "wrong PFX password");
        assert_eq!(r.summary(), WRONG_PASSWORD);
        assert_eq!(r.failures().count(), 1);
        assert_eq!(check(&r, "pfx-file").level, Level::Ok);
        // No password file means the empty password.
        let r = load(&f.pfx, None, &[], SystemTime::now());
        assert_fails(&r, "pfx-password", "wrong PFX password");
        // Unreadable password file: named, with the OS error.
        let missing = f.path("missing.pass");
        let r = load(&f.pfx, Some(&missing), &[], SystemTime::now());
        assert_fails(&r, "pfx-password", "missing.pass");
        assert!(check(&r, "pfx-password").message.contains("No such file"));
    }

    #[test]
    fn empty_password_pfx_loads_without_password_file() {
        let f = make_pfx(&Spec {
            password: "",
            ..Spec::default()
        });
        let r = load(&f.pfx, None, &[FQDN.to_owned()], SystemTime::now());
        assert_all_ok(&r);
        assert!(check(&r, "pfx-password").message.contains("empty password"));
    }

    #[test]
    fn unreadable_pfx_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pfx = dir.path().join("nope.pfx");
        let r = load(&pfx, None, &[FQDN.to_owned()], SystemTime::now());
        assert_fails(&r, "pfx-file", "nope.pfx");
        assert!(check(&r, "pfx-file").message.contains("No such file"));
        assert_eq!(r.checks.len(), 1, "{r:#?}");
    }

    #[test]
    fn not_a_pfx() {
        let f = make_pfx(&Spec::default());
        for (name, bytes) in [
            ("leaf.crt", std::fs::read(f.path("leaf.crt")).expect("read")),
            (
                "junk.bin",
                b"this is a text file, not a certificate\n".to_vec(),
            ),
            ("empty.pfx", Vec::new()),
            ("der.crt", {
                openssl(
                    f.dir.path(),
                    &[
                        "x509", "-in", "leaf.crt", "-outform", "DER", "-out", "leaf.der",
                    ],
                );
                std::fs::read(f.path("leaf.der")).expect("read")
            }),
        ] {
            let path = f.path(name);
            std::fs::write(&path, bytes).expect("write");
            let r = load(
                &path,
                Some(&f.password_file),
                &[FQDN.to_owned()],
                SystemTime::now(),
            );
            assert_fails(&r, "pfx-password", "not a PKCS#12/PFX file");
        }
    }

    #[test]
    fn leaf_only_pfx_lacks_chain() {
        let f = make_pfx(&Spec {
            chain: ChainKind::LeafOnly,
            ..Spec::default()
        });
        let r = f.load(&[FQDN]);
        assert_fails(&r, "chain", "only the leaf certificate");
        // The other rules still ran.
        assert_eq!(check(&r, "validity").level, Level::Ok);
        assert_eq!(r.failures().count(), 1);
    }

    #[test]
    fn missing_intermediate_is_named() {
        let f = make_pfx(&Spec {
            chain: ChainKind::NoIntermediate,
            ..Spec::default()
        });
        assert_fails(
            &f.load(&[FQDN]),
            "chain",
            "lacks the CA certificate O=Test, CN=Test Intermediate CA",
        );
    }

    #[test]
    fn intermediate_with_another_key_breaks_the_chain() {
        let f = make_pfx(&Spec {
            chain: ChainKind::WrongIntermediate,
            ..Spec::default()
        });
        assert_fails(&f.load(&[FQDN]), "chain", "does not verify");
    }

    #[test]
    fn key_of_another_certificate() {
        // openssl refuses to export a mismatched pair, so p12-keystore writes this one.
        use p12_keystore::{Certificate, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
        let f = make_pfx(&Spec::default());
        let d = f.dir.path();
        let der = |pem: &str, out: &str, command: &[&str]| {
            openssl(
                d,
                &[command, &["-in", pem, "-outform", "DER", "-out", out]].concat(),
            );
            std::fs::read(d.join(out)).expect("read")
        };
        new_key(d, KeyKind::Rsa, "other.key");
        let pkcs8 = der("other.key", "other.der", &["pkcs8", "-topk8", "-nocrypt"]);
        let key = PrivateKey::from_der(&pkcs8).expect("key");
        let certs = [
            der("leaf.crt", "leaf.der", &["x509"]),
            der("int.crt", "int.der", &["x509"]),
            der("root.crt", "root.der", &["x509"]),
        ]
        .map(|c| Certificate::from_der(&c).expect("cert"));
        let mut store = KeyStore::new();
        store.add_entry(
            "relay",
            KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(b"1".as_slice(), key, certs)),
        );
        std::fs::write(&f.pfx, store.writer(PASSWORD).write().expect("write pfx")).expect("write");
        let r = f.load(&[FQDN]);
        assert_fails(
            &r,
            "key-match",
            "does not belong to the leaf certificate CN=relay1.corp.example",
        );
        assert_eq!(check(&r, "chain").level, Level::Ok);
    }

    #[test]
    fn leaf_without_server_auth() {
        let f = make_pfx(&Spec {
            extensions: "subjectAltName = DNS:relay1.corp.example",
            ..Spec::default()
        });
        assert_fails(&f.load(&[FQDN]), "eku-server-auth", "no Extended Key Usage");
        let f = make_pfx(&Spec {
            extensions: "subjectAltName = DNS:relay1.corp.example\nextendedKeyUsage = clientAuth",
            ..Spec::default()
        });
        assert_fails(&f.load(&[FQDN]), "eku-server-auth", "lacks serverAuth");
    }

    #[test]
    fn fqdn_coverage() {
        let f = make_pfx(&Spec::default());
        let r = f.load(&[FQDN, "relay2.corp.example"]);
        assert_eq!(check(&r, "fqdn relay1.corp.example").level, Level::Ok);
        assert_fails(
            &r,
            "fqdn relay2.corp.example",
            "does not cover relay2.corp.example (it covers relay1.corp.example)",
        );
        assert_eq!(
            check(
                &f.load(&["RELAY1.Corp.Example"]),
                "fqdn RELAY1.Corp.Example"
            )
            .level,
            Level::Ok
        );

        let f = make_pfx(&Spec {
            extensions: "subjectAltName = DNS:*.corp.example\nextendedKeyUsage = serverAuth",
            ..Spec::default()
        });
        let r = f.load(&[FQDN]);
        assert_all_ok(&r);
        assert!(
            check(&r, "fqdn relay1.corp.example")
                .message
                .contains("*.corp.example")
        );
        assert_fails(
            &f.load(&["corp.example"]),
            "fqdn corp.example",
            "does not cover corp.example",
        );
        assert_fails(
            &f.load(&["a.b.corp.example"]),
            "fqdn a.b.corp.example",
            "*.corp.example",
        );
    }

    #[test]
    fn common_name_counts_only_without_san_dns() {
        let f = make_pfx(&Spec {
            extensions: "extendedKeyUsage = serverAuth",
            ..Spec::default()
        });
        let r = f.load(&[FQDN]);
        assert_eq!(
            check(&r, "fqdn relay1.corp.example").level,
            Level::Warn,
            "{r:#?}"
        );
        assert_eq!(r.cert.as_ref().expect("cert").dns_names, [FQDN]);
    }

    #[test]
    fn ip_identity() {
        let f = make_pfx(&Spec {
            subject: "/CN=192.0.2.10",
            extensions: "subjectAltName = IP:192.0.2.10\nextendedKeyUsage = serverAuth",
            ..Spec::default()
        });
        let r = f.load(&[]);
        assert_fails(
            &r,
            "ip-identity",
            "identifies an IP address, not a DNS name",
        );
        assert!(check(&r, "ip-identity").message.contains("192.0.2.10"));

        let f = make_pfx(&Spec {
            extensions: "subjectAltName = DNS:relay1.corp.example, IP:192.0.2.10\nextendedKeyUsage = serverAuth",
            ..Spec::default()
        });
        let r = f.load(&[FQDN]);
        assert_eq!(check(&r, "ip-identity").level, Level::Warn);
        assert!(r.cert.is_some());
        assert_fails(
            &f.load(&["192.0.2.10"]),
            "fqdn 192.0.2.10",
            "is an IP address",
        );
    }

    #[test]
    fn expired() {
        let f = make_pfx(&Spec {
            valid_from: -400,
            valid_to: -35,
            ..Spec::default()
        });
        assert_fails(&f.load(&[FQDN]), "validity", "expired on");
    }

    #[test]
    fn expiring_soon_warns_but_loads() {
        let f = make_pfx(&Spec {
            valid_to: 10,
            ..Spec::default()
        });
        let r = f.load(&[FQDN]);
        let c = check(&r, "validity");
        assert_eq!(c.level, Level::Warn);
        assert!(
            c.message.starts_with("expires in 9 days on ")
                || c.message.starts_with("expires in 10 days on "),
            "{}",
            c.message
        );
        assert!(c.message.ends_with(": renew it"));
        assert!(r.cert.is_some());
    }

    #[test]
    fn not_yet_valid() {
        let f = make_pfx(&Spec {
            valid_from: 30,
            valid_to: 400,
            ..Spec::default()
        });
        assert_fails(&f.load(&[FQDN]), "validity", "not valid before");
    }

    #[test]
    fn validity_is_judged_at_the_given_time() {
        let f = make_pfx(&Spec::default());
        let in_days = |d: u64| SystemTime::now() + Duration::from_secs(d * DAY_SECS as u64);
        assert_eq!(
            check(&f.load_at(&[FQDN], in_days(350)), "validity").level,
            Level::Warn
        );
        assert_fails(&f.load_at(&[FQDN], in_days(400)), "validity", "expired on");
        assert_fails(
            &f.load_at(&[FQDN], UNIX_EPOCH),
            "validity",
            "not valid before",
        );
    }

    #[test]
    fn damaged_pfx_never_panics() {
        let f = make_pfx(&Spec::default());
        let good = std::fs::read(&f.pfx).expect("read");
        let path = f.path("damaged.pfx");
        let mut variants: Vec<Vec<u8>> = (0..good.len())
            .step_by(7)
            .map(|n| good[..n].to_vec())
            .collect();
        for i in (0..good.len()).step_by(11) {
            let mut v = good.clone();
            v[i] ^= 0x5a;
            variants.push(v);
        }
        for bytes in variants {
            std::fs::write(&path, &bytes).expect("write");
            let r = load(
                &path,
                Some(&f.password_file),
                &[FQDN.to_owned()],
                SystemTime::now(),
            );
            assert_eq!(r.cert.is_some(), r.failures().count() == 0);
            assert!(r.failures().all(|c| c.rule != RULE_INTERNAL), "{r:#?}");
        }
    }
}
