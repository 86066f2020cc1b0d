//! The certificate uploaded in the cloud for the whole tenant, pushed to the relay down the command
//! channel: checked by the same rules as `ucrelay check` (this relay's FQDNs included), kept in
//! the state dir (`cloud-cert/`, files 0600, written atomically) once it passes, and swapped into
//! service without touching open connections. A local `[edge].pfx` takes precedence: a pushed
//! certificate that passes is then kept but not served, and the answer says so.
//!
//! It does not fetch anything from the cloud itself and never serves a certificate that failed a
//! rule: the one in service (or none) stays.

use super::Edge;
use super::cert::{self, LoadedCert};
use super::tls::CertSource;
use crate::protocol::{CertificateAnswer, CertificateUpload, FailedRule, Outcome};
use crate::util::time::rfc3339;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use tracing::{info, warn};

/// The directory under the state dir holding the last certificate that passed.
pub const DIR: &str = "cloud-cert";
const PFX: &str = "relay.pfx";
const PASSWORD: &str = "relay.pfx.pass";
const META: &str = "upload.json";

/// What is known of the stored certificate besides the PFX itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    upload_id: String,
    received_at: String,
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR)
}

/// The stored cloud certificate, when there is one that still passes every rule (checked again:
/// it may have expired, or the FQDNs may have changed since).
pub fn load_stored(
    state_dir: &Path,
    fqdns: &[String],
    now: SystemTime,
) -> Option<(LoadedCert, CertSource)> {
    let d = dir(state_dir);
    let meta: Meta = serde_json::from_slice(&std::fs::read(d.join(META)).ok()?).ok()?;
    let report = cert::load(&d.join(PFX), Some(&d.join(PASSWORD)), fqdns, now);
    match report.cert {
        Some(c) => {
            let received_at = meta
                .received_at
                .parse::<jiff::Timestamp>()
                .ok()
                .and_then(|t| SystemTime::try_from(t).ok())
                .unwrap_or(now);
            Some((
                c,
                CertSource::Cloud {
                    upload_id: meta.upload_id,
                    received_at,
                },
            ))
        }
        None => {
            warn!(
                upload_id = %meta.upload_id,
                "the stored cloud certificate no longer passes: {}",
                super::refusal(&report)
            );
            None
        }
    }
}

/// Writes `bytes` to `dir/name` (mode 0600) so that a crash leaves the old file or the new one.
fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    // NamedTempFile creates the file 0600.
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(name)).map_err(|e| e.error)?;
    Ok(())
}

fn store(state_dir: &Path, pfx: &[u8], password: &str, meta: &Meta) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let d = dir(state_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)?;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
    // The password first: a crash between the two leaves the old PFX with a password that does
    // not open it, which the next start reports as a failed rule rather than serving anything.
    write_private(&d, PASSWORD, password.as_bytes())?;
    write_private(&d, PFX, pfx)?;
    write_private(&d, META, &serde_json::to_vec(meta)?)?;
    std::fs::File::open(&d)?.sync_all()
}

/// What an install ended with: the outcome for the result record, its reason, and the payload.
pub struct Installed {
    pub outcome: Outcome,
    pub reason: String,
    pub answer: CertificateAnswer,
}

/// Checks and installs a pushed certificate. Blocking (file I/O and the PFX's key derivation):
/// call it off the async runtime.
pub fn install(edge: &Edge, upload: &CertificateUpload, now: SystemTime) -> Installed {
    let mut answer = CertificateAnswer {
        upload_id: upload.upload_id.clone(),
        state: "refused".into(),
        ..Default::default()
    };
    let refused = |answer: CertificateAnswer, reason: String| {
        warn!(upload_id = %upload.upload_id, "cloud certificate refused: {reason}");
        *edge
            .cloud_cert_note
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(format!(
            "cloud certificate {} refused: {reason}; the certificate in service stays",
            upload.upload_id
        ));
        Installed {
            outcome: Outcome::Failure,
            reason: format!("certificate refused: {reason}"),
            answer,
        }
    };
    let bytes = match base64::engine::general_purpose::STANDARD.decode(upload.pfx_base64.trim()) {
        Ok(b) => b,
        Err(e) => {
            let message = format!("pfx_base64 is not base64: {e}");
            answer.failed.push(FailedRule {
                rule: "pfx-file".into(),
                message: message.clone(),
            });
            return refused(answer, format!("pfx-file: {message}"));
        }
    };
    let name = format!("the PFX of cloud upload {}", upload.upload_id);
    let report = cert::load_bytes(&name, &bytes, &upload.password, &edge.cfg().fqdn, now);
    let Some(loaded) = report.cert.clone() else {
        answer.failed = report
            .failures()
            .map(|c| FailedRule {
                rule: c.rule.clone(),
                message: c.message.clone(),
            })
            .collect();
        return refused(answer, super::refusal(&report));
    };
    answer.subject = Some(loaded.subject.clone());
    answer.sha256 = Some(loaded.sha256.clone());
    answer.not_after = Some(rfc3339(loaded.not_after));
    let meta = Meta {
        upload_id: upload.upload_id.clone(),
        received_at: rfc3339(now),
    };
    if let Err(e) = store(&edge.state_dir, &bytes, &upload.password, &meta) {
        let reason = format!(
            "cannot keep it in {}: {e}; the certificate in service stays",
            dir(&edge.state_dir).display()
        );
        warn!(upload_id = %upload.upload_id, "{reason}");
        return Installed {
            outcome: Outcome::Failure,
            reason,
            answer,
        };
    }
    let source = CertSource::Cloud {
        upload_id: upload.upload_id.clone(),
        received_at: now,
    };
    if let Some(serving) = edge.cert.current()
        && let CertSource::File(path) = &serving.source
    {
        answer.state = "stored".into();
        let reason = format!(
            "passed every rule and is kept in {}, but edge.pfx {} takes precedence: remove edge.pfx (and reload) to serve the cloud's certificate",
            dir(&edge.state_dir).display(),
            path.display()
        );
        info!(upload_id = %upload.upload_id, "cloud certificate stored, not served: the local edge.pfx takes precedence");
        *edge
            .cloud_cert_note
            .write()
            .unwrap_or_else(|e| e.into_inner()) =
            Some(format!("cloud certificate {} {reason}", upload.upload_id));
        return Installed {
            outcome: Outcome::NotApplicable,
            reason,
            answer,
        };
    }
    info!(upload_id = %upload.upload_id, subject = %loaded.subject, sha256 = %loaded.sha256, "cloud certificate installed; new handshakes use it");
    edge.cert.replace(loaded, source);
    *edge
        .cloud_cert_note
        .write()
        .unwrap_or_else(|e| e.into_inner()) = None;
    answer.state = "installed".into();
    Installed {
        outcome: Outcome::Success,
        reason: String::new(),
        answer,
    }
}
