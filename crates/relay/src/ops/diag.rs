//! `ucrelay diag`: one tar.gz an admin can attach to a support ticket. It holds what the running
//! relay reports (status, images, tasks, devices), recent logs, the configuration with every secret
//! masked, versions of the relay and the OS, and a doctor run. Nothing in it may be a secret:
//! secret values in the config are replaced by "***", secret files (`pin_file`,
//! `pfx_password_file`) are never opened, and the logs are scrubbed of every secret value the
//! config holds inline.
//!
//! What cannot be collected (no relay running, no journal) is listed in `notes.txt` with the
//! reason, so the bundle is always written.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long `journalctl` may take.
const JOURNAL_DEADLINE: Duration = Duration::from_secs(10);
const ADMIN_DEADLINE: Duration = Duration::from_secs(5);
const MASK: &str = "***";

/// The default bundle name: `ucrelay-diag-<host>-<UTC time>.tar.gz` in the current directory.
pub fn default_output() -> PathBuf {
    let ts = jiff::Timestamp::now()
        .strftime("%Y%m%dT%H%M%SZ")
        .to_string();
    PathBuf::from(format!(
        "ucrelay-diag-{}-{ts}.tar.gz",
        crate::ctx::hostname()
    ))
}

/// Writes the bundle to `output`; returns the member names written.
pub async fn run(config_path: &Path, socket: Option<&Path>, output: &Path) -> Result<Vec<String>> {
    let mut members: Vec<(String, Vec<u8>)> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    // The config: masked text, and (when it loads) what it points at.
    let raw = std::fs::read_to_string(config_path);
    let config = crate::config::Config::load(config_path);
    let secrets = match &config {
        Ok(c) => inline_secrets(c),
        Err(_) => Vec::new(),
    };
    match &raw {
        Ok(text) => members.push(("config.toml".into(), mask_config(text).into_bytes())),
        Err(e) => notes.push(format!(
            "config.toml: cannot read {}: {e}",
            config_path.display()
        )),
    }
    if let Err(e) = &config {
        notes.push(format!("the config does not load: {e}"));
    }

    // The running relay.
    let socket: Option<PathBuf> = socket
        .map(Path::to_path_buf)
        .or_else(|| config.as_ref().ok().map(|c| c.admin.socket.clone()));
    match &socket {
        None => notes.push(
            "status.json, images.json, tasks.json, devices.json: no admin socket known (the config does not load; pass --socket)".into(),
        ),
        Some(sock) => {
            for (name, path) in [
                ("status.json", "/v1/status"),
                ("images.json", "/v1/images"),
                ("tasks.json", "/v1/tasks"),
                ("devices.json", "/v1/devices"),
            ] {
                let got = tokio::time::timeout(
                    ADMIN_DEADLINE,
                    super::admin::get_json::<serde_json::Value>(sock, path),
                )
                .await;
                match got {
                    Ok(Ok(v)) => members.push((
                        name.into(),
                        scrub(&serde_json::to_string_pretty(&v)?, &secrets).into_bytes(),
                    )),
                    Ok(Err(e)) => notes.push(format!("{name}: {}", one_line(&e))),
                    Err(_) => notes.push(format!(
                        "{name}: the relay did not answer {path} within {ADMIN_DEADLINE:?}"
                    )),
                }
            }
        }
    }

    // Logs.
    match journal().await {
        Ok(text) => members.push(("journal.txt".into(), scrub(&text, &secrets).into_bytes())),
        Err(why) => notes.push(format!("journal.txt: {why}")),
    }

    // Versions.
    members.push(("versions.txt".into(), versions().into_bytes()));

    // Doctor (bounded by its own budget).
    let report = super::doctor::run(config_path, socket.as_deref()).await;
    members.push((
        "doctor.txt".into(),
        scrub(&report.render(), &secrets).into_bytes(),
    ));
    members.push((
        "doctor.json".into(),
        scrub(&serde_json::to_string_pretty(&report)?, &secrets).into_bytes(),
    ));

    let mut readme = String::from(
        "ucrelay support bundle\n\nSecrets in config.toml are replaced by \"***\"; secret files (pin_file, pfx_password_file) were not read.\n\nMembers:\n",
    );
    for (name, _) in &members {
        readme.push_str(&format!("  {name}\n"));
    }
    if notes.is_empty() {
        notes.push("everything was collected".into());
    }
    members.push(("notes.txt".into(), (notes.join("\n") + "\n").into_bytes()));
    readme.push_str("  notes.txt (what could not be collected, and why)\n");
    members.insert(0, ("README.txt".into(), readme.into_bytes()));

    write_bundle(output, &members)?;
    Ok(members.into_iter().map(|(n, _)| n).collect())
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// A tar.gz with one top directory; the file is created 0600 (it describes the network).
fn write_bundle(output: &Path, members: &[(String, Vec<u8>)]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let top = output
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".tar.gz").trim_end_matches(".tgz"))
        .filter(|n| !n.is_empty())
        .unwrap_or("ucrelay-diag")
        .to_string();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mtime = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, format!("{top}/{name}"), data.as_slice())
            .with_context(|| format!("cannot write {name} into {}", output.display()))?;
    }
    let mut file = tar
        .into_inner()
        .and_then(|gz| gz.finish())
        .with_context(|| format!("cannot finish {}", output.display()))?;
    file.flush()?;
    file.sync_all()?;
    Ok(())
}

/// The last 2000 lines of the relay's journal, when journalctl exists and answers in time.
async fn journal() -> Result<String, String> {
    let out = tokio::process::Command::new("journalctl")
        .args([
            "-u",
            "ucrelay",
            "-n",
            "2000",
            "--no-pager",
            "-o",
            "short-iso",
        ])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(JOURNAL_DEADLINE, out).await {
        Err(_) => Err(format!(
            "journalctl did not finish within {JOURNAL_DEADLINE:?}"
        )),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("journalctl is not installed (no systemd journal here)".into())
        }
        Ok(Err(e)) => Err(format!("cannot run journalctl: {e}")),
        Ok(Ok(o)) => {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            let err = String::from_utf8_lossy(&o.stderr);
            if !err.trim().is_empty() {
                text.push_str(&format!("\n[journalctl stderr] {}\n", err.trim()));
            }
            if !o.status.success() && text.trim().is_empty() {
                return Err(format!("journalctl failed: {}", o.status));
            }
            Ok(text)
        }
    }
}

fn versions() -> String {
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .or_else(|_| {
            std::process::Command::new("uname")
                .arg("-r")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        })
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "ucrelay {}\ngit revision {}\nos {os}\nkernel {kernel}\narch {}\nhostname {}\ncollected {}\n",
        env!("CARGO_PKG_VERSION"),
        crate::util::build::revision(),
        std::env::consts::ARCH,
        crate::ctx::hostname(),
        jiff::Timestamp::now(),
    )
}

/// Secret values the config holds inline (never the contents of secret files): used to scrub
/// anything else that goes into the bundle.
fn inline_secrets(c: &crate::config::Config) -> Vec<String> {
    let mut s = Vec::new();
    if let crate::config::PinSource::Inline(p) = &c.cloud.pin {
        s.push(p.expose().to_string());
    }
    if let Some(p) = &c.devices.admin_password {
        s.push(p.expose().to_string());
    }
    if let Some(p) = c.cloud.proxy.as_ref().and_then(|p| p.credentials.as_ref()) {
        let cred = p.expose();
        s.push(cred.to_string());
        if let Some((_, pw)) = cred.split_once(':') {
            s.push(pw.to_string());
        }
    }
    // Short values would blank out unrelated text (a PIN "1" in every number); those are masked
    // in the config only.
    s.retain(|v| v.len() >= 4);
    s
}

/// Replaces every occurrence of each secret value in `text`.
fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        out = out.replace(s.as_str(), MASK);
    }
    out
}

/// Whether a config key holds a secret value (as opposed to a path to a secret file).
fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k.ends_with("_file") {
        return false;
    }
    k == "pin"
        || k.contains("password")
        || k.contains("secret")
        || k.contains("token")
        || k.contains("credential")
}

/// The config text with every secret value masked: keys named like secrets, and the user
/// information in URLs (`http://user:password@proxy`). Text that parses as TOML is re-written
/// from the parsed table (comments are dropped: they could quote a secret too); text that does
/// not parse is masked line by line.
pub fn mask_config(text: &str) -> String {
    match text.parse::<toml::Table>() {
        Ok(mut table) => {
            mask_table(&mut table);
            let header =
                "# ucrelay diag: the configuration with secret values replaced by \"***\"\n";
            match toml::to_string(&table) {
                Ok(t) => format!("{header}{t}"),
                Err(_) => mask_lines(text),
            }
        }
        Err(_) => mask_lines(text),
    }
}

fn mask_table(t: &mut toml::Table) {
    for (k, v) in t.iter_mut() {
        mask_value(k, v);
    }
}

fn mask_value(key: &str, v: &mut toml::Value) {
    match v {
        toml::Value::String(s) if is_secret_key(key) => *s = MASK.into(),
        toml::Value::String(s) => *s = mask_url_userinfo(s),
        toml::Value::Table(t) => mask_table(t),
        toml::Value::Array(a) => {
            for item in a {
                mask_value(key, item);
            }
        }
        other if is_secret_key(key) => *other = toml::Value::String(MASK.into()),
        _ => {}
    }
}

/// `scheme://user:password@host...` → `scheme://user:***@host...`.
fn mask_url_userinfo(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_string();
    };
    let rest = &s[scheme_end + 3..];
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..auth_end].rfind('@') else {
        return s.to_string();
    };
    let userinfo = &rest[..at];
    let masked = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:{MASK}"),
        None => MASK.to_string(),
    };
    format!("{}{masked}{}", &s[..scheme_end + 3], &rest[at..])
}

/// Fallback for text that is not valid TOML: any `key = value` line whose key looks secret, and
/// URL user information anywhere.
fn mask_lines(text: &str) -> String {
    let mut out = String::from("# ucrelay diag: not valid TOML; masked line by line\n");
    for line in text.lines() {
        let masked = match line.split_once('=') {
            Some((k, _)) if is_secret_key(k.trim().trim_matches(|c| c == '"' || c == '\'')) => {
                format!("{} = \"{MASK}\"", k.trim_end())
            }
            // A URL's user information, wherever it is on the line.
            _ => line
                .split_inclusive(['"', '\'', ' '])
                .map(mask_url_userinfo)
                .collect(),
        };
        out.push_str(&masked);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_the_config_are_masked_paths_kept() {
        let text = r#"
state_dir = "/var/lib/ucrelay"
[cloud]
url = "https://cloud.example.com"
tenant_id = "acme"
pin = "8675309"
proxy = "http://alice:pr0xy-pass@proxy.corp:3128"
[edge]
pfx = "/etc/ucrelay/relay.pfx"
pfx_password_file = "/etc/ucrelay/relay.pfx.pass"
[devices]
admin_password = "dev-secret"
"#;
        let m = mask_config(text);
        for secret in ["8675309", "pr0xy-pass", "dev-secret"] {
            assert!(!m.contains(secret), "{secret} leaked:\n{m}");
        }
        assert!(m.contains("alice:***@proxy.corp:3128"), "{m}");
        assert!(m.contains("/etc/ucrelay/relay.pfx.pass"), "{m}");
        assert!(m.contains("tenant_id = \"acme\""), "{m}");
    }

    #[test]
    fn unparsable_config_is_masked_line_by_line() {
        let m = mask_config(
            "[cloud\npin = \"8675309\"\nurl = \"http://u:pw-123@h\"\nadmin_password='x'\n",
        );
        assert!(!m.contains("8675309") && !m.contains("pw-123"), "{m}");
        assert!(m.contains("pin = \"***\""), "{m}");
        assert!(m.contains("admin_password = \"***\""), "{m}");
    }

    #[test]
    fn multibyte_text_around_secrets_never_panics() {
        // A no-break space before a key, in a file that is not TOML and in one that is.
        let m =
            mask_config("[cloud\n\u{a0}pin = \"8675309\"\nx\u{a0}= \"http://u:pw-1@h\u{a0}\"\n");
        assert!(!m.contains("8675309") && !m.contains("pw-1"), "{m}");
        let m = mask_config("[devices]\nadmin_password = \"é\u{a0}secret\"\n");
        assert!(!m.contains("secret\""), "{m}");
    }

    #[test]
    fn scrub_replaces_every_occurrence() {
        let s = scrub("pin 8675309 and again 8675309", &["8675309".into()]);
        assert_eq!(s, "pin *** and again ***");
    }
}
