//! Plain-text tables for `ucrelay devices`, `tasks` and `logs`, from the admin API's JSON. Every
//! string in them may come from a device or the cloud (models, firmware, task names, reasons), so
//! each goes through [`printable`]: a control character shows as an escape, never acts.

use crate::util::text::printable;
use serde_json::Value;
use std::fmt::Write;

/// A string field, escaped for the terminal ("" when absent).
fn s(v: &Value) -> String {
    printable(v.as_str().unwrap_or("")).into_owned()
}

/// An optional string field, escaped, or `default`.
fn s_or(v: &Value, default: &str) -> String {
    printable(v.as_str().unwrap_or(default)).into_owned()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Column widths from the rows, so tables line up whatever the content.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<width$}  ", width = w[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

pub fn render_devices(v: &Value) -> String {
    let mut out = String::new();
    if v["enabled"] == Value::Bool(false) {
        out.push_str("device plane off: relay.toml has no [devices] section\n");
        return out;
    }
    let c = &v["counts"];
    let _ = writeln!(
        out,
        "{} devices known: {} online, {} offline, {} not polled yet (poll every {})\n",
        n(&c["known"]),
        n(&c["online"]),
        n(&c["offline"]),
        n(&c["known"]).saturating_sub(n(&c["online"]) + n(&c["offline"])),
        humantime::format_duration(std::time::Duration::from_secs(n(&v["poll_interval_s"])))
    );
    let empty = vec![];
    let changed: Vec<String> = v["devices"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter(|d| d["identity"]["state"] == "changed")
        .map(|d| s(&d["address"]))
        .collect();
    if !changed.is_empty() {
        let _ = writeln!(
            out,
            "{} device(s) presented a certificate key other than the pinned one and got no password: {}\n\
             if a device was replaced or reset, accept its new key with `ucrelay devices trust ADDRESS`\n",
            changed.len(),
            changed.join(", ")
        );
    }
    let rows: Vec<Vec<String>> = v["devices"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|d| {
            let l = &d["last"];
            let key = match s(&d["identity"]["state"]).as_str() {
                "changed" => "CHANGED".to_string(),
                "expect_new" => "reset".to_string(),
                "" | "off" => "-".to_string(),
                other => other.to_string(),
            };
            let lines = l["lines"]
                .as_array()
                .map(|ls| {
                    ls.iter()
                        .map(|x| {
                            format!(
                                "{}:{}",
                                n(&x["line"]),
                                if x["registered"] == Value::Bool(true) {
                                    "reg"
                                } else {
                                    "UNREG"
                                }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            let mut detail = if s(&l["reason"]).is_empty() {
                format!(
                    "{} {} up {} call {}",
                    s(&l["model"]),
                    s(&l["firmware"]),
                    l["uptime_s"]
                        .as_u64()
                        .map(
                            |u| humantime::format_duration(std::time::Duration::from_secs(u))
                                .to_string()
                        )
                        .unwrap_or_else(|| "?".into()),
                    s(&l["call_state"])
                )
            } else {
                s(&l["reason"])
            };
            let st = &d["stats"];
            if let (Some(cpu), Some(mem)) = (st["cpu_pct"].as_f64(), st["memory_used_pct"].as_f64())
            {
                let _ = write!(detail, " cpu {cpu}% mem {mem}%");
            }
            for a in d["alarms"].as_array().into_iter().flatten() {
                let _ = write!(detail, " [{}]", s(a));
            }
            vec![
                s(&d["address"]),
                s(&d["mac"]),
                s(&d["state"]),
                key,
                lines,
                s(&l["polled_at"]),
                detail,
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "ADDRESS", "MAC", "STATE", "KEY", "LINES", "POLLED", "DETAIL",
        ],
        &rows,
    ));
    out
}

pub fn render_tasks(v: &Value) -> String {
    let empty = vec![];
    let list = v["tasks"].as_array().unwrap_or(&empty);
    if list.is_empty() {
        return "no tasks\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            vec![
                s(&t["id"]),
                s(&t["type"]),
                s(&t["status"]),
                n(&t["total"]).to_string(),
                n(&t["success"]).to_string(),
                n(&t["failure"]).to_string(),
                n(&t["in_progress"]).to_string(),
                s_or(&t["at"], "now"),
                s(&t["name"]),
            ]
        })
        .collect();
    table(
        &[
            "ID", "TYPE", "STATUS", "TOTAL", "SUCCESS", "FAILURE", "RUNNING", "AT", "NAME",
        ],
        &rows,
    )
}

pub fn render_task(t: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "task      {}", s(&t["id"]));
    let _ = writeln!(out, "name      {}", s(&t["name"]));
    let _ = writeln!(out, "type      {}", s(&t["type"]));
    let _ = writeln!(out, "status    {}", s(&t["status"]));
    if !s(&t["reason"]).is_empty() {
        let _ = writeln!(out, "reason    {}", s(&t["reason"]));
    }
    let _ = writeln!(
        out,
        "totals    {} total, {} success, {} failure, {} not applicable, {} in progress",
        n(&t["total"]),
        n(&t["success"]),
        n(&t["failure"]),
        n(&t["not_applicable"]),
        n(&t["in_progress"])
    );
    let _ = writeln!(out, "at        {}", s_or(&t["at"], "now"));
    if t["started_at"].is_string() {
        let _ = writeln!(out, "started   {}", s(&t["started_at"]));
    }
    if t["finished_at"].is_string() {
        let _ = writeln!(out, "finished  {}", s(&t["finished_at"]));
    }
    out.push('\n');
    let empty = vec![];
    let rows: Vec<Vec<String>> = t["results"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|r| vec![s(&r["target"]), s(&r["result"]), s(&r["reason"])])
        .collect();
    out.push_str(&table(&["TARGET", "RESULT", "REASON"], &rows));
    out
}

/// `ucrelay devices probe`: one line per step.
pub fn render_probe(v: &Value) -> String {
    let mut out = String::new();
    let p = &v["payload"];
    let _ = writeln!(out, "probe {}", s(&p["target"]));
    let empty = vec![];
    let rows: Vec<Vec<String>> = p["steps"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|st| {
            vec![
                s(&st["step"]).to_string(),
                s(&st["result"]).to_string(),
                st["ms"]
                    .as_f64()
                    .map(|m| format!("{m} ms"))
                    .unwrap_or_else(|| "-".into()),
                s(&st["detail"]).to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&["STEP", "RESULT", "TIME", "DETAIL"], &rows));
    if v["result"] != "success" {
        let _ = writeln!(out, "\n{}: {}", s(&v["result"]), s(&v["reason"]));
    }
    out
}

/// `ucrelay devices backups MAC`: the device's configuration backups, oldest first.
pub fn render_backups(v: &Value) -> String {
    let empty = vec![];
    let list = v["backups"].as_array().unwrap_or(&empty);
    if list.is_empty() {
        return format!(
            "no configuration backups of {} on this relay\n",
            s(&v["mac"])
        );
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| {
            vec![
                s(&b["backup_id"]),
                s(&b["taken_at"]),
                s(&b["source"]),
                n(&b["bytes"]).to_string(),
                s(&b["target"]),
            ]
        })
        .collect();
    let mut out = format!(
        "{} backups of {} (at most {} kept; the oldest drops out)\n\n",
        list.len(),
        s(&v["mac"]),
        n(&v["keep"])
    );
    out.push_str(&table(
        &["ID", "TAKEN", "SOURCE", "BYTES", "ADDRESS"],
        &rows,
    ));
    out
}

/// `ucrelay logs`: the devices whose logs the relay keeps.
pub fn render_logs(v: &Value) -> String {
    let mut out = String::new();
    let human = |b: u64| crate::util::bytes::human_bytes(b);
    if v["collecting"] == Value::Bool(true) {
        let _ = writeln!(
            out,
            "device logs are kept on this relay (the cloud does not take them): {} in all, at most {} per device, kept {}\n",
            human(n(&v["bytes"])),
            human(n(&v["max_per_device"])),
            humantime::format_duration(std::time::Duration::from_secs(n(&v["keep_s"])))
        );
    } else {
        let _ = writeln!(
            out,
            "device logs go to the cloud (log_upload is on): the relay keeps no new copies\n"
        );
    }
    let empty = vec![];
    let list = v["devices"].as_array().unwrap_or(&empty);
    if list.is_empty() {
        out.push_str("no device logs kept\n");
        return out;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            vec![
                s(&d["mac"]),
                n(&d["files"]).to_string(),
                human(n(&d["bytes"])),
                s(&d["last_upload"]),
                match d["capped_at"].as_str() {
                    Some(at) => format!("STOPPED at the cap ({})", printable(at)),
                    None => "collecting".into(),
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &["MAC", "FILES", "SIZE", "LAST UPLOAD", "STATE"],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_line_up_and_show_failures() {
        let t = render_tasks(&json!({"tasks": [
            {"id": "task-1", "type": "reboot", "status": "done", "total": 3, "success": 2, "failure": 1, "in_progress": 0, "name": "night reboot"}
        ]}));
        assert!(t.starts_with("ID"));
        assert!(t.contains("task-1  reboot  done"));
        let one = render_task(
            &json!({"id": "task-1", "status": "done", "total": 1, "results": [
                {"target": "10.0.0.5", "result": "failure", "reason": "device unreachable: refused"}
            ]}),
        );
        assert!(one.contains("10.0.0.5  failure  device unreachable: refused"));
        let d = render_devices(&json!({"enabled": true, "poll_interval_s": 7200,
            "counts": {"known": 1, "online": 0, "offline": 1},
            "devices": [{"address": "10.0.0.5", "state": "offline", "last": {"reason": "device unreachable"}}]}));
        assert!(d.contains("1 devices known: 0 online, 1 offline"));
        assert!(d.contains("10.0.0.5"));
        let d = render_devices(&json!({"enabled": true, "poll_interval_s": 7200,
            "counts": {"known": 1, "online": 1, "offline": 0},
            "devices": [{"address": "10.0.0.6", "state": "online", "identity": {"state": "changed"},
                "last": {"reason": "device identity changed"}}]}));
        assert!(d.contains("ucrelay devices trust ADDRESS"), "{d}");
        assert!(d.contains("CHANGED"), "{d}");
    }

    #[test]
    fn control_characters_from_devices_and_the_cloud_are_escaped() {
        let d = render_devices(&json!({"enabled": true, "poll_interval_s": 7200,
            "counts": {"known": 1, "online": 1, "offline": 0},
            "devices": [{"address": "10.0.0.5", "mac": "0004f2\u{1b}[2J", "state": "online",
                "last": {"model": "VVX\u{1b}]0;owned\u{7}", "firmware": "5.9\r\nFAKE LINE",
                    "uptime_s": 60, "call_state": "idle\u{202e}"}}]}));
        let t = render_tasks(&json!({"tasks": [{"id": "t\u{1b}[1A", "type": "reboot",
            "status": "done", "name": "night\u{1b}[31m", "at": "x\u{8}"}]}));
        let one = render_task(&json!({"id": "t", "name": "n\u{1b}[8m", "reason": "r\u{7}",
            "results": [{"target": "10.0.0.5", "result": "failure", "reason": "bad\u{1b}[0m"}]}));
        for out in [&d, &t, &one] {
            assert!(
                !out.chars()
                    .any(|c| c.is_control() && c != '\n' || c == '\u{202e}'),
                "a raw control character reached the table:\n{out:?}"
            );
        }
        assert!(d.contains("VVX\\u{1b}]0;owned\\u{7}"), "{d}");
        assert!(d.contains("5.9\\r\\nFAKE LINE"), "{d}");
        assert!(t.contains("night\\u{1b}[31m"), "{t}");
    }
}
