//! A device's health beyond "it answers": CPU and memory (`device/stats`, read by monitoring on
//! its own schedule), and how its configuration updates and firmware upgrades went. A check-sync
//! the device refuses or that does not complete raises `config_update_failed`; an upgrade (or a
//! check-sync that names the firmware it must bring) after which the device runs another
//! firmware raises `firmware_upgrade_failed`. Each clears with `config_updated` /
//! `firmware_upgraded` when a later one works, like the offline/online pair.

use super::actions::{self, Done, OpCx, call};
use super::client::{DeviceError, Session};
use crate::protocol::{DeviceStats, Outcome};
use crate::util::time::rfc3339;
use serde_json::{Value, json};
use std::time::{Duration, Instant, SystemTime};
use tracing::info;

/// What an operation found out about a device's health.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    ConfigFailed(String),
    ConfigOk,
    UpgradeFailed(String),
    UpgradeOk(String),
}

/// A device's number, given as a JSON number or a string. "NaN", "inf" and "1e400" parse as f64 but
/// measure nothing (and would reach the cloud as `null`): they count as absent.
fn number(v: Option<&Value>) -> Option<f64> {
    let x = match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().trim_end_matches('%').trim().parse().ok(),
        _ => None,
    }?;
    x.is_finite().then_some(x)
}

/// `device/stats` data: `CPU{Average}`, `Memory{Total, Used, SReclaim}` (numbers or strings).
/// In use is `Used - SReclaim`, as monitoring tools for these phones count it.
pub fn parse_stats(
    data: &Value,
    address: &str,
    mac: Option<String>,
    at: SystemTime,
) -> Option<DeviceStats> {
    let cpu = number(data.get("CPU").and_then(|c| c.get("Average")))?;
    let mem = data.get("Memory")?;
    let total = number(mem.get("Total"))?.max(0.0);
    let used = number(mem.get("Used"))?.max(0.0);
    let reclaim = number(mem.get("SReclaim")).unwrap_or(0.0).max(0.0);
    let in_use = (used - reclaim).max(0.0).min(total);
    // The ratio first: `in_use * 100` overflows to infinity for a huge (finite) reading.
    let pct = if total > 0.0 {
        in_use / total * 100.0
    } else {
        0.0
    };
    let round = |x: f64| (x * 10.0).round() / 10.0;
    Some(DeviceStats {
        address: address.to_string(),
        mac,
        cpu_pct: round(cpu.clamp(0.0, 100.0)),
        memory_total: total as u64,
        memory_used: in_use as u64,
        memory_used_pct: round(pct),
        at: rfc3339(at),
    })
}

pub async fn read_stats(
    s: &mut Session,
    address: &str,
    mac: Option<String>,
) -> Result<Option<DeviceStats>, DeviceError> {
    let data = call(s, "/api/v1/mgmt/device/stats", None, true).await?;
    Ok(parse_stats(&data, address, mac, SystemTime::now()))
}

/// `check_sync` and `upgrade`: asks the device to fetch its configuration now; with an expected
/// firmware, waits for it to come back (it reboots to upgrade) and checks what it runs.
pub async fn check_sync(
    s: &mut Session,
    cx: &OpCx<'_>,
    expect: Option<&str>,
) -> Result<Done, DeviceError> {
    let before = actions::device_info(s).await.ok();
    let mac = before.as_ref().and_then(|i| i.mac.clone());
    if let Err(e) = call(s, "/api/v1/mgmt/updateConfiguration", None, false).await {
        let why = if e.is_unreachable() {
            format!("the configuration update did not complete: {e}")
        } else {
            format!("the device refused the configuration update: {e}")
        };
        cx.plane
            .note_health(cx.target, mac, Health::ConfigFailed(why.clone()))
            .await;
        let mut d = Done::from(e);
        d.reason = why;
        return Ok(d);
    }
    cx.plane
        .note_health(cx.target, mac.clone(), Health::ConfigOk)
        .await;
    let Some(expected) = expect else {
        return Ok(Done::ok(json!({"requested": "configuration update"})));
    };
    let before_fw = before
        .as_ref()
        .map(|i| i.firmware.clone())
        .unwrap_or_default();
    let before_up = before.as_ref().and_then(|i| i.uptime_s);
    // Leave a little of the deadline for the answer itself.
    let until = cx
        .deadline
        .checked_sub(Duration::from_secs(2))
        .unwrap_or(cx.deadline);
    let mut went_down = false;
    let mut now_fw = before_fw.clone();
    let outcome = loop {
        if Instant::now() >= until {
            break Err(format!(
                "the device still runs {now_fw} (expected {expected}) when the command's time ran out"
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        match actions::device_info(s).await {
            Ok(i) => {
                now_fw = i.firmware.clone();
                let rebooted =
                    went_down || matches!((before_up, i.uptime_s), (Some(b), Some(n)) if n < b);
                if i.firmware == expected {
                    break Ok(());
                }
                if rebooted {
                    break Err(format!(
                        "after the upgrade the device runs {} instead of {expected}",
                        if i.firmware.is_empty() {
                            "an unknown firmware"
                        } else {
                            &i.firmware
                        }
                    ));
                }
            }
            Err(e) if e.is_unreachable() => went_down = true,
            Err(_) => {}
        }
    };
    match outcome {
        Ok(()) => {
            info!(device = %cx.target, from = %before_fw, to = %expected, "firmware upgraded");
            cx.plane
                .note_health(cx.target, mac, Health::UpgradeOk(expected.to_string()))
                .await;
            Ok(Done::ok(json!({
                "requested": "configuration update",
                "firmware_before": before_fw,
                "firmware": expected,
            })))
        }
        Err(why) => {
            cx.plane
                .note_health(cx.target, mac, Health::UpgradeFailed(why.clone()))
                .await;
            Ok(Done {
                result: Outcome::Failure,
                reason: why,
                payload: json!({"firmware_before": before_fw, "firmware": now_fw, "expected": expected}),
                cause: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_in_both_number_forms() {
        let at = SystemTime::UNIX_EPOCH;
        let s = parse_stats(
            &json!({"CPU": {"Average": "12.34", "Current": "50"}, "Memory": {"Total": "262144", "Used": "131072", "SReclaim": "65536"}}),
            "10.0.0.5",
            None,
            at,
        )
        .unwrap();
        assert_eq!(
            (s.cpu_pct, s.memory_total, s.memory_used, s.memory_used_pct),
            (12.3, 262144, 65536, 25.0)
        );
        let s = parse_stats(
            &json!({"CPU": {"Average": 7}, "Memory": {"Total": 100, "Used": 40}}),
            "x",
            None,
            at,
        )
        .unwrap();
        assert_eq!((s.cpu_pct, s.memory_used_pct), (7.0, 40.0));
        assert!(parse_stats(&json!({"CPU": {}}), "x", None, at).is_none());
    }

    /// Found by the `device_reply` fuzz target: numbers that parse as f64 but are not finite
    /// reached the report as NaN (sent as `null`, which the cloud cannot read as a number), and
    /// huge readings made the percentage infinite.
    #[test]
    fn stats_refuse_non_finite_and_stay_in_range() {
        let at = SystemTime::UNIX_EPOCH;
        for cpu in ["NaN", "inf", "-inf", "1e400"] {
            let v = json!({"CPU": {"Average": cpu}, "Memory": {"Total": "100", "Used": "40"}});
            assert!(parse_stats(&v, "x", None, at).is_none(), "{cpu}");
        }
        let v = json!({"CPU": {"Average": "5"}, "Memory": {"Total": "NaN", "Used": "40"}});
        assert!(parse_stats(&v, "x", None, at).is_none());
        let v = json!({"CPU": {"Average": "5"}, "Memory": {"Total": "1e300", "Used": "1e300"}});
        let s = parse_stats(&v, "x", None, at).unwrap();
        assert_eq!(s.memory_used_pct, 100.0);
        assert_eq!(s.memory_total, u64::MAX);
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<DeviceStats>(&text).unwrap(), s);
    }
}
