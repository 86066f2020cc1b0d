//! docs/protocol.md is the protocol's reference and this crate its code: every JSON example in the
//! document names its type after the opening fence (```` ```json RegisterRequest ````) and must
//! parse into that type and serialise back to the same JSON value. An example that holds one
//! message per line (the channel frames) is checked line by line.

use super::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const DOC: &str = include_str!("../../../docs/protocol.md");

/// The fenced ```json blocks: (line of the fence, the type named after it, the text).
fn examples() -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String, String)> = None;
    for (i, line) in DOC.lines().enumerate() {
        match &mut open {
            None => {
                if let Some(info) = line.strip_prefix("```json") {
                    open = Some((i + 1, info.trim().to_string(), String::new()));
                }
            }
            Some((_, _, text)) if line.trim_start() != "```" => {
                text.push_str(line);
                text.push('\n');
            }
            Some(_) => out.extend(open.take()),
        }
    }
    assert!(
        open.is_none(),
        "a ```json block in docs/protocol.md is never closed"
    );
    out
}

/// Parses `text` into `T` and back; the two JSON values must be equal.
fn round_trip<T: Serialize + DeserializeOwned>(text: &str) -> Result<(), String> {
    let written: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let parsed: T =
        serde_json::from_value(written.clone()).map_err(|e| format!("does not parse: {e}"))?;
    let back = serde_json::to_value(&parsed).map_err(|e| format!("does not serialise: {e}"))?;
    if back != written {
        return Err(format!(
            "serialises to a different value:\n  document: {written}\n  code:     {back}"
        ));
    }
    Ok(())
}

fn check(ty: &str, text: &str) -> Result<(), String> {
    match ty {
        "RegisterRequest" => round_trip::<RegisterRequest>(text),
        "RegisterResponse" => round_trip::<RegisterResponse>(text),
        "HeartbeatRequest" => round_trip::<HeartbeatRequest>(text),
        "HeartbeatResponse" => round_trip::<HeartbeatResponse>(text),
        "ResultsBatch" => round_trip::<ResultsBatch>(text),
        "ResultsAck" => round_trip::<ResultsAck>(text),
        "DeviceStatusBatch" => round_trip::<DeviceStatusBatch>(text),
        "Alarm" => round_trip::<Alarm>(text),
        "DeviceList" => round_trip::<DeviceList>(text),
        "ImageManifest" => round_trip::<ImageManifest>(text),
        "CloudMessage" => {
            // What the relay does with a frame: its own decoder must take it, too.
            CloudMessage::decode(text.trim()).map_err(|e| format!("decode: {}", e.message))?;
            round_trip::<CloudMessage>(text)
        }
        "RelayMessage" => round_trip::<RelayMessage>(text),
        "TaskSpec" => round_trip::<TaskSpec>(text),
        "TaskProgress" => round_trip::<TaskProgress>(text),
        "ErrorBody" => round_trip::<ErrorBody>(text),
        "SiteInfo" => round_trip::<SiteInfo>(text),
        "CertificateUpload" => round_trip::<CertificateUpload>(text),
        "CertificateAnswer" => round_trip::<CertificateAnswer>(text),
        "ArtifactOffer" => round_trip::<ArtifactOffer>(text),
        "ArtifactStatus" => round_trip::<ArtifactStatus>(text),
        "ArtifactRef" => round_trip::<ArtifactRef>(text),
        "DeviceStats" => round_trip::<DeviceStats>(text),
        "" => Err("the fence names no type (write ```json TypeName)".into()),
        other => Err(format!("unknown type {other:?}: add it to this test")),
    }
}

#[test]
fn docs_examples_round_trip() {
    let examples = examples();
    assert!(
        examples.len() >= 18,
        "found only {} JSON examples in docs/protocol.md",
        examples.len()
    );
    let mut failures = Vec::new();
    for (line, ty, text) in &examples {
        // One value, or one value per line (the channel frames).
        let pieces: Vec<&str> = if serde_json::from_str::<Value>(text).is_ok() {
            vec![text.as_str()]
        } else {
            text.lines().filter(|l| !l.trim().is_empty()).collect()
        };
        for piece in pieces {
            if let Err(e) = check(ty, piece) {
                failures.push(format!("docs/protocol.md:{line} ({ty}): {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn a_wrong_example_is_caught() {
    // The check itself must be able to fail: a field the type does not have, a missing one, and a
    // value the type writes differently.
    assert!(
        check(
            "ResultsAck",
            r#"{"accepted": [], "duplicates": 0, "extra": 1}"#
        )
        .is_err()
    );
    assert!(check("RegisterResponse", r#"{"heartbeat_interval_s": 120}"#).is_err());
    assert!(check("nope", "{}").is_err());
}
