//! What each fuzz target does with one input: the relay's own entry points, called the way the
//! relay calls them, plus the promises they make checked as assertions (a broken promise is a
//! crash, like a panic). Shared word for word by the cargo-fuzz targets (`fuzz/fuzz_targets/`) and
//! by the stable replay test (`tests/it/fuzz_corpus.rs`), which runs every committed corpus file
//! through these functions under `cargo test`. Uses only `ucrelay_relay` and `serde_json`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use ucrelay_relay::config::{Config, ImagesConfig};
use ucrelay_relay::devices::{actions, client, health, monitor, tasks};
use ucrelay_relay::edge::images::{RangeSpec, parse_range};
use ucrelay_relay::edge::provisioning::direct::probe_answer;
use ucrelay_relay::edge::{cert, uploads};
use ucrelay_relay::protocol::{
    CertificateUpload, CloudMessage, Command, DEVICE_COMMANDS, DeviceStats,
    INSTALL_CERTIFICATE_COMMAND, RelayMessage, TASK_COMMAND, TaskSpec,
};
use ucrelay_relay::util::paths;

/// One target's body: one input in, a panic when a promise is broken.
pub type Target = fn(&[u8]);

/// The targets by name, as the corpus directories are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("config", config),
    ("manifest", manifest),
    ("channel", channel),
    ("device_reply", device_reply),
    ("range", range),
    ("path", path),
    ("pfx", pfx),
    ("upstream_answer", upstream_answer),
];

/// Config text → raw TOML → validated config. The file "lives" in a directory that does not
/// exist, so relative secret files resolve to nothing.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_str_at(text, Path::new("/nonexistent/ucrelay-fuzz/relay.toml")) {
        Ok(cfg) => {
            if let Some(images) = &cfg.images {
                assert!(images.parallel >= 1, "images.parallel accepted as 0");
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn images_config(max_images: u32, max_total: u64) -> ImagesConfig {
    ImagesConfig {
        dir: PathBuf::from("/nonexistent/ucrelay-fuzz/images"),
        max_images,
        max_total,
        bandwidth_limit: None,
        parallel: 4,
        max_downloads: 100,
        min_free: 0,
        sync_interval: Duration::from_secs(7200),
        sync_window: None,
    }
}

/// The cloud's image list (`GET /relay/v1/images` body) → `ImageManifest` → the relay's rules,
/// with the default limits and with tight ones.
pub fn manifest(data: &[u8]) {
    let Ok(m) = serde_json::from_slice::<ucrelay_relay::protocol::ImageManifest>(data) else {
        return;
    };
    for cfg in [
        images_config(
            ucrelay_relay::config::DEFAULT_MAX_IMAGES,
            ucrelay_relay::config::DEFAULT_MAX_TOTAL,
        ),
        images_config(2, 10_000),
    ] {
        if ucrelay_relay::download::manifest::validate(&m, &cfg).is_ok() {
            assert!(m.images.len() <= cfg.max_images as usize);
            for f in m.images.iter().flat_map(|i| &i.files) {
                // Every accepted path is one the edge would route to the cache.
                let decoded =
                    paths::check(&f.path, None).expect("accepted path fails the edge check");
                assert!(!decoded.ends_with('/'));
                assert!(f.size > 0);
            }
            // Duplicates count once, so the sum over all files may exceed the limit, but one file
            // alone never does.
            assert!(
                m.images
                    .iter()
                    .flat_map(|i| &i.files)
                    .all(|f| f.size <= cfg.max_total)
            );
        }
    }
}

/// One command channel text frame → `CloudMessage` → what the relay decodes from a command
/// before running it: the device target and operation, a task's spec, a certificate upload.
pub fn channel(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match CloudMessage::decode(text) {
        Err(e) => {
            let reply = RelayMessage::Error {
                id: e.id,
                code: e.code,
                message: e.message,
            };
            serde_json::to_string(&reply).expect("an error reply always encodes");
        }
        Ok(CloudMessage::Command(cmd)) => {
            command(&cmd);
            serde_json::to_string(&RelayMessage::Ack { id: cmd.id })
                .expect("an ack always encodes");
        }
        Ok(CloudMessage::Hello { .. } | CloudMessage::ImagesSync { .. }) => {}
    }
}

fn command(cmd: &Command) {
    let name = cmd.name.as_str();
    if DEVICE_COMMANDS.contains(&name) {
        // As `DevicePlane::command`: the target, then the parameters without target and password.
        if let Some(t) = cmd.params.get("target").and_then(serde_json::Value::as_str)
            && let Ok(target) = client::Target::parse(t)
        {
            assert_ne!(target.port, Some(0));
        }
        let mut params = cmd.params.clone();
        if let Some(m) = params.as_object_mut() {
            m.remove("target");
            m.remove("password");
        }
        let _ = actions::parse(name, &params);
    } else if name == TASK_COMMAND {
        // As `tasks::accept`: the spec, its validation, and the payload as it is shown.
        if let Ok(spec) = serde_json::from_value::<TaskSpec>(cmd.params.clone()) {
            if tasks::validate(&spec).is_ok() {
                assert!(DEVICE_COMMANDS.contains(&spec.kind.as_str()));
                assert!(!spec.targets.is_empty());
            }
            let _ = tasks::public_payload(&spec.payload);
        }
    } else if name == INSTALL_CERTIFICATE_COMMAND {
        let _ = serde_json::from_value::<CertificateUpload>(cmd.params.clone());
    }
}

/// A device's REST answer body (HTTP 200) → the `{Status, data}` envelope → what the relay reads
/// from `data`: device info, uptime, firmware, lines, CPU and memory.
pub fn device_reply(data: &[u8]) {
    let reply = match client::envelope(200, data) {
        Ok(r) => r,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let d = reply.data;
    let _ = monitor::parse_uptime(&d);
    assert!(monitor::parse_firmware(&d).chars().count() <= monitor::MAX_FIELD);
    let lines = monitor::parse_lines(&d);
    assert!(lines.len() <= monitor::MAX_LINES);
    for l in &lines {
        assert!(l.uri.chars().count() <= monitor::MAX_URI);
    }
    if let Some(stats) = health::parse_stats(&d, "192.0.2.1", None, SystemTime::UNIX_EPOCH) {
        check_stats(&stats);
    }
    let info = actions::Info::from_raw(d);
    if let Some(mac) = &info.mac {
        assert!(mac.len() == 12 && mac.chars().all(|c| c.is_ascii_hexdigit()));
    }
}

fn check_stats(s: &DeviceStats) {
    assert!((0.0..=100.0).contains(&s.cpu_pct), "cpu_pct {}", s.cpu_pct);
    assert!(
        (0.0..=100.0).contains(&s.memory_used_pct),
        "memory_used_pct {}",
        s.memory_used_pct
    );
    assert!(s.memory_used <= s.memory_total);
    // What is reported must reach the cloud as it was measured.
    let text = serde_json::to_string(s).expect("stats encode");
    let back: DeviceStats = serde_json::from_str(&text).expect("stats decode again");
    assert_eq!(&back, s);
}

/// A `Range` header value against files of several sizes.
pub fn range(data: &[u8]) {
    let Ok(v) = std::str::from_utf8(data) else {
        return;
    };
    for size in [0, 1, 1000, u64::MAX] {
        if let RangeSpec::Range(a, b) = parse_range(v, size) {
            assert!(a <= b && b < size, "{v:?} on {size} bytes gave {a}-{b}");
        }
    }
}

/// What a provisioning upstream answers, as the edge's direct path reads it (the first byte says
/// whether the request was a HEAD). Promises: the head the device gets is one well-formed HTTP/1.1
/// head with the upstream's status and no hop-by-hop header but the framing the relay adds, never
/// a length beside chunked nor two lengths; a body end, when found, lies within the
/// input.
pub fn upstream_answer(data: &[u8]) {
    let Some((first, answer)) = data.split_first() else {
        return;
    };
    let Ok(Some(probed)) = probe_answer(answer, first & 1 == 1) else {
        return;
    };
    let (status, head, end) = (probed.status, probed.head, probed.body_end);
    assert!((200..1000).contains(&status), "status {status} passed on");
    if let Some(end) = end {
        assert!(
            end <= answer.len(),
            "body end {end} past the {} bytes",
            answer.len()
        );
    }
    let text = String::from_utf8_lossy(&head);
    let Some(lines) = text.strip_suffix("\r\n\r\n") else {
        panic!("the device head does not end with an empty line: {text:?}");
    };
    let lower = lines.to_ascii_lowercase();
    let lengths = lower.matches("\r\ncontent-length:").count();
    let chunked = lower.contains("\r\ntransfer-encoding:");
    assert!(lengths <= 1, "{lengths} lengths passed on: {text:?}");
    assert!(
        !(chunked && lengths > 0),
        "both framings passed on: {text:?}"
    );
    let mut lines = lines.split("\r\n");
    let first = lines.next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("HTTP/1.1 {status} ")),
        "status line {first:?}"
    );
    for line in lines {
        let (name, _) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("header line {line:?} has no ': '"));
        assert!(
            !name.is_empty() && !name.contains(['\r', '\n', ' ', ':']),
            "header name {name:?}"
        );
        let name = name.to_ascii_lowercase();
        assert!(
            !matches!(
                name.as_str(),
                "keep-alive" | "proxy-connection" | "te" | "trailer" | "upgrade"
            ),
            "hop-by-hop header {name} passed on"
        );
        if name == "transfer-encoding" {
            assert_eq!(line.to_ascii_lowercase(), "transfer-encoding: chunked");
        }
        if name == "connection" {
            assert_eq!(line.to_ascii_lowercase(), "connection: close");
        }
    }
}

/// A request target as a device sends it: parsed as hyper does (`http::Uri`), then the edge's
/// path checks; and the raw text split at '?' for targets `http::Uri` refuses.
pub fn path(data: &[u8]) {
    if let Ok(uri) = http::Uri::try_from(data) {
        check_path(uri.path(), uri.query());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let (p, q) = match text.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (text, None),
        };
        check_path(p, q);
    }
}

fn check_path(path: &str, query: Option<&str>) {
    let _ = uploads::is_upload(path);
    if let Ok(decoded) = paths::check(path, query) {
        assert!(decoded.starts_with('/'));
        assert!(!decoded.split('/').any(|s| s == ".." || s == "."));
        assert!(!decoded.contains('\\') && !decoded.chars().any(char::is_control));
        assert!(path.len() + query.map_or(0, |q| q.len() + 1) <= paths::MAX_URI);
    }
}

/// A PFX (PKCS#12) with a password: the first byte picks it (even: empty, odd: "fuzz"), the
/// rest is the file. Checked by the rules of `ucrelay check` as of 2027-01-01.
pub fn pfx(data: &[u8]) {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let password = if pick & 1 == 1 { "fuzz" } else { "" };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_798_761_600);
    let report = cert::load_bytes(
        "fuzz.pfx",
        bytes,
        password,
        &["relay.fuzz.example".to_string()],
        now,
    );
    assert!(
        !report.checks.iter().any(|c| c.rule == "internal"),
        "{:?}",
        report.checks
    );
    let failed = report.failures().next().is_some();
    assert_eq!(report.cert.is_some(), !failed);
}
