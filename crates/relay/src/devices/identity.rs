//! Device identity beyond the CA (`[devices].identity = "tofu"`): the certificate key a device
//! presents on first contact is pinned, the way SSH pins host keys, and every later handshake must
//! present the same key. The check runs inside the TLS handshake (see `client::PinCheck`), so a
//! host that took over a phone's address is refused before the request carrying the admin password
//! is written.
//!
//! This module owns the pins: what is expected of each device, what a handshake saw, and the
//! admin's and the cloud's decisions (accept a new key, forget one). A factory reset the relay ran
//! itself makes the next new key from that device acceptable once. Pins are kept by the socket
//! address the relay dials and persist in the store; a changed key raises one
//! `device_identity_changed` alarm per new key seen, not one per poll.

use crate::protocol::{ALARM_IDENTITY_CHANGED, Alarm};
use crate::store::{Store, Write};
use crate::util::time::rfc3339;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

/// SHA-256 of a certificate's SubjectPublicKeyInfo (DER): what is pinned. It stays the same when a
/// device renews its certificate with the same key, and changes when the key does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate's public key; None when the certificate cannot be read.
    pub fn of_certificate(der: &[u8]) -> Option<Fingerprint> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(Fingerprint(
            Sha256::digest(cert.tbs_certificate.subject_pki.raw).into(),
        ))
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 16 hex digits, for messages (the full value is in `ucrelay devices --json`).
    pub fn short(&self) -> String {
        self.hex()[..16].to_string()
    }

    /// 64 hex digits (case-insensitive, `:` separators allowed, an optional `sha256:` prefix).
    pub fn parse(s: &str) -> Result<Fingerprint, String> {
        let t = s.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .unwrap_or(t);
        let digits: String = t.chars().filter(|c| *c != ':').collect();
        if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is not a SHA-256 key fingerprint (64 hex digits)"
            ));
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&digits[i * 2..i * 2 + 2], 16)
                .map_err(|_| format!("{s:?} is not hex"))?;
        }
        Ok(Fingerprint(out))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Fingerprint::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a handshake with one device must present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing pinned yet: any key, and it is pinned.
    FirstUse,
    /// Exactly this key.
    Key(Fingerprint),
    /// After a factory reset the relay ran: the old key (the device may not have reset yet), or
    /// one new key, which replaces the pin.
    NewKey { old: Fingerprint },
}

impl Expect {
    /// Whether a handshake presenting `seen` may go on.
    pub fn admits(&self, seen: &Fingerprint) -> bool {
        match self {
            Expect::FirstUse | Expect::NewKey { .. } => true,
            Expect::Key(k) => k == seen,
        }
    }
}

/// A key seen where another one is pinned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Changed {
    pub key: Fingerprint,
    pub at: String,
}

/// One device's pin, as stored. A relay holds one per device it ever reached (50,000 for a tenant's
/// fleet), so it is kept small: the usual `how` is a constant, a rare key change is boxed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pin {
    pub key: Fingerprint,
    /// When this key was pinned (first contact, or accepted as a new key).
    pub since: String,
    /// How it came to be pinned: `first_use`, `factory_reset`, `trusted_by_admin`,
    /// `trusted_by_cloud`.
    #[serde(default)]
    pub how: Cow<'static, str>,
    /// Unix seconds until which one new key is accepted (set by a factory reset the relay ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_new_until: Option<u64>,
    /// The last different key a handshake presented, until the admin or the cloud decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<Box<Changed>>,
}

/// How long after a factory reset the relay ran it accepts the device's new key.
pub const EXPECT_NEW_FOR: Duration = Duration::from_secs(24 * 3600);

/// Who accepted a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustedBy {
    Admin,
    Cloud,
}

/// Every pin, in memory, mirrored in the store at each change.
pub struct Pins {
    map: Mutex<HashMap<String, Pin>>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write(address: &str, pin: Option<&Pin>) -> Write {
    Write::Pin {
        address: address.to_string(),
        value: pin.map(|p| serde_json::to_vec(p).unwrap_or_default()),
    }
}

/// What the device plane must do after a pin decision: store these writes (with the alarm, if any)
/// before going on.
#[derive(Debug, Default)]
pub struct Outcome {
    pub writes: Vec<Write>,
    pub alarm: Option<Alarm>,
}

impl Pins {
    pub fn load(store: &Store) -> anyhow::Result<Pins> {
        let mut map = HashMap::new();
        for (addr, bytes) in store.pins_all()? {
            match serde_json::from_slice::<Pin>(&bytes) {
                Ok(p) => {
                    map.insert(addr, p);
                }
                // Fail closed: an unreadable pin is not a missing one (that would trust anyone).
                Err(e) => {
                    warn!(device = %addr, error = %e, "unreadable device key pin; the device is refused until `ucrelay devices trust` replaces it");
                    map.insert(
                        addr,
                        Pin {
                            key: Fingerprint([0; 32]),
                            since: String::new(),
                            how: "unreadable".into(),
                            expect_new_until: None,
                            changed: None,
                        },
                    );
                }
            }
        }
        Ok(Pins {
            map: Mutex::new(map),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pin>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, address: &str) -> Option<Pin> {
        self.lock().get(address).cloned()
    }

    /// Addresses whose device presented a key other than the pinned one, sorted.
    pub fn changed(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, p)| p.changed.is_some())
            .map(|(a, _)| a.clone())
            .collect();
        v.sort();
        v
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the next handshake with `address` must present.
    pub fn expect(&self, address: &str, now: SystemTime) -> Expect {
        match self.lock().get(address) {
            None => Expect::FirstUse,
            Some(p) if p.expect_new_until.is_some_and(|t| t > unix(now)) => {
                Expect::NewKey { old: p.key }
            }
            Some(p) => Expect::Key(p.key),
        }
    }

    /// A handshake with `address` presented `seen` and its check let it through: pins a first key
    /// or the new key after a reset, and clears a change once the pinned key is back. Decided on
    /// the pins as they are now, not as they were when the handshake began: when another contact
    /// pinned a different key meanwhile, the answer is that key (`Err`), and the caller must drop
    /// the connection before anything is sent.
    pub fn observed(&self, address: &str, seen: Fingerprint) -> Result<Outcome, Fingerprint> {
        let now = SystemTime::now();
        let mut map = self.lock();
        let pin = match map.get_mut(address) {
            None => {
                info!(device = %address, key = %seen, "device key pinned on first contact");
                map.insert(
                    address.to_string(),
                    Pin {
                        key: seen,
                        since: rfc3339(now),
                        how: "first_use".into(),
                        expect_new_until: None,
                        changed: None,
                    },
                );
                map.get(address)
            }
            Some(p) if p.key == seen => {
                if p.changed.is_none() {
                    None
                } else {
                    info!(device = %address, key = %seen, "device presents its pinned key again");
                    p.changed = None;
                    Some(&*p)
                }
            }
            Some(p) if p.expect_new_until.is_some_and(|t| t > unix(now)) => {
                info!(device = %address, old = %p.key, new = %seen, "device presented a new key after the factory reset the relay ran; pinned");
                *p = Pin {
                    key: seen,
                    since: rfc3339(now),
                    how: "factory_reset".into(),
                    expect_new_until: None,
                    changed: None,
                };
                Some(&*p)
            }
            Some(p) => return Err(p.key),
        };
        Ok(Outcome {
            writes: pin
                .map(|p| vec![write(address, Some(p))])
                .unwrap_or_default(),
            alarm: None,
        })
    }

    /// A handshake with `address` presented `seen` where another key is pinned: remembers it and,
    /// the first time this key is seen, raises the alarm.
    pub fn refused(&self, address: &str, seen: Fingerprint, mac: Option<String>) -> Outcome {
        let now = SystemTime::now();
        let mut map = self.lock();
        let Some(p) = map.get_mut(address) else {
            return Outcome::default();
        };
        if p.changed.as_ref().is_some_and(|c| c.key == seen) {
            return Outcome::default();
        }
        p.changed = Some(Box::new(Changed {
            key: seen,
            at: rfc3339(now),
        }));
        let message = format!(
            "device {address} presented certificate key {} instead of the key pinned on {} ({}); \
             the admin password was not sent. If the device was replaced or reset, accept the new \
             key with `ucrelay devices trust {address}` or the cloud's device_trust command",
            seen.short(),
            p.since,
            p.key.short()
        );
        warn!(device = %address, pinned = %p.key, seen = %seen, "device identity changed: refused before any credentials were sent");
        Outcome {
            writes: vec![write(address, Some(p))],
            alarm: Some(Alarm {
                id: uuid::Uuid::new_v4().to_string(),
                address: address.to_string(),
                mac,
                kind: ALARM_IDENTITY_CHANGED.into(),
                line: None,
                message,
                at: rfc3339(now),
            }),
        }
    }

    /// The relay factory-reset the device at `address`: its next new key is accepted once.
    pub fn expect_new(&self, address: &str) -> Outcome {
        let now = SystemTime::now();
        let mut map = self.lock();
        let Some(p) = map.get_mut(address) else {
            return Outcome::default();
        };
        p.expect_new_until = Some(unix(now + EXPECT_NEW_FOR));
        info!(device = %address, "factory reset: the device's next new key will be pinned");
        Outcome {
            writes: vec![write(address, Some(p))],
            alarm: None,
        }
    }

    /// Accepts a new key for `address`: `fingerprint` when given (the admin or the cloud names the
    /// key), else the changed key the device last presented; with neither, the pin is forgotten and
    /// the next key the device presents is pinned. Only a device with a pin can be trusted (deny by
    /// default: no pins are made up for addresses the relay never met). Returns what was done, in
    /// words, or why nothing was.
    pub fn trust(
        &self,
        address: &str,
        fingerprint: Option<Fingerprint>,
        by: TrustedBy,
    ) -> Result<(String, Outcome), String> {
        let now = SystemTime::now();
        let mut map = self.lock();
        let Some(p) = map.get_mut(address) else {
            return Err(format!(
                "no key is pinned for {address}: nothing to trust (the first key it presents will be pinned)"
            ));
        };
        let how = match by {
            TrustedBy::Admin => "trusted_by_admin",
            TrustedBy::Cloud => "trusted_by_cloud",
        };
        let new = match (fingerprint, &p.changed) {
            (Some(f), _) => Some(f),
            (None, Some(c)) => Some(c.key),
            (None, None) => None,
        };
        match new {
            Some(key) => {
                *p = Pin {
                    key,
                    since: rfc3339(now),
                    how: how.into(),
                    expect_new_until: None,
                    changed: None,
                };
                let w = write(address, Some(p));
                info!(device = %address, key = %key, by = how, "device key trusted");
                Ok((
                    format!("{address}: key {key} pinned"),
                    Outcome {
                        writes: vec![w],
                        alarm: None,
                    },
                ))
            }
            None => {
                map.remove(address);
                info!(device = %address, by = how, "device key forgotten; the next key it presents is pinned");
                Ok((
                    format!(
                        "{address}: pin forgotten; the next key the device presents will be pinned"
                    ),
                    Outcome {
                        writes: vec![write(address, None)],
                        alarm: None,
                    },
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(b: u8) -> Fingerprint {
        Fingerprint([b; 32])
    }

    fn pins() -> Pins {
        Pins {
            map: Mutex::new(HashMap::new()),
        }
    }

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let f = fp(0xab);
        assert_eq!(Fingerprint::parse(&f.hex()).unwrap(), f);
        assert_eq!(
            Fingerprint::parse(&format!("sha256:{}", f.hex().to_uppercase())).unwrap(),
            f
        );
        let colons: Vec<String> = f.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(Fingerprint::parse(&colons.join(":")).unwrap(), f);
        assert!(Fingerprint::parse("abcd").is_err());
        assert!(Fingerprint::parse(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn first_use_pins_and_a_different_key_is_refused_once() {
        let p = pins();
        let now = SystemTime::now();
        assert_eq!(p.expect("a", now), Expect::FirstUse);
        let o = p.observed("a", fp(1)).unwrap();
        assert_eq!(o.writes.len(), 1);
        assert_eq!(p.expect("a", now), Expect::Key(fp(1)));
        assert!(p.expect("a", now).admits(&fp(1)));
        assert!(!p.expect("a", now).admits(&fp(2)));
        let o = p.refused("a", fp(2), None);
        assert_eq!(o.alarm.unwrap().kind, ALARM_IDENTITY_CHANGED);
        assert!(
            p.refused("a", fp(2), None).alarm.is_none(),
            "one alarm per key"
        );
        assert!(
            p.refused("a", fp(3), None).alarm.is_some(),
            "another key, another alarm"
        );
        // The pinned key stays expected until someone decides.
        assert_eq!(p.expect("a", now), Expect::Key(fp(1)));
        let (_, o) = p.trust("a", None, TrustedBy::Admin).unwrap();
        assert_eq!(o.writes.len(), 1);
        assert_eq!(p.expect("a", now), Expect::Key(fp(3)));
        assert!(p.get("a").unwrap().changed.is_none());
    }

    #[test]
    fn two_first_contacts_with_different_keys_pin_only_the_first() {
        let p = pins();
        // Both handshakes began with nothing pinned; the second to finish loses.
        assert!(p.observed("a", fp(1)).is_ok());
        assert_eq!(p.observed("a", fp(2)).unwrap_err(), fp(1));
        assert_eq!(p.expect("a", SystemTime::now()), Expect::Key(fp(1)));
    }

    #[test]
    fn a_factory_reset_accepts_one_new_key() {
        let p = pins();
        let now = SystemTime::now();
        p.observed("a", fp(1)).unwrap();
        p.expect_new("a");
        let e = p.expect("a", now);
        assert_eq!(e, Expect::NewKey { old: fp(1) });
        // The old key (not reset yet) changes nothing and keeps the expectation.
        assert!(p.observed("a", fp(1)).unwrap().writes.is_empty());
        assert_eq!(p.expect("a", now), Expect::NewKey { old: fp(1) });
        p.observed("a", fp(2)).unwrap();
        assert_eq!(p.expect("a", now), Expect::Key(fp(2)));
        assert_eq!(p.get("a").unwrap().how, "factory_reset");
        // The expectation ends with the pin.
        assert!(!p.expect("a", now).admits(&fp(3)));
        // And it expires.
        p.expect_new("a");
        assert_eq!(
            p.expect("a", now + EXPECT_NEW_FOR + Duration::from_secs(1)),
            Expect::Key(fp(2))
        );
    }

    #[test]
    fn trust_without_a_change_forgets_and_unknown_devices_are_refused() {
        let p = pins();
        assert!(p.trust("x", None, TrustedBy::Cloud).is_err());
        p.observed("a", fp(1)).unwrap();
        p.trust("a", None, TrustedBy::Cloud).unwrap();
        assert_eq!(p.expect("a", SystemTime::now()), Expect::FirstUse);
        p.observed("a", fp(1)).unwrap();
        p.trust("a", Some(fp(9)), TrustedBy::Admin).unwrap();
        assert_eq!(p.expect("a", SystemTime::now()), Expect::Key(fp(9)));
    }
}
