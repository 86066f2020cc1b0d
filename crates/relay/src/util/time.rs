//! Time as the relay writes and reads it, all through jiff: RFC 3339 for the protocol, the store
//! and status output, and the HTTP date (RFC 9110 IMF-fixdate) for `Last-Modified` and `Date`.

use std::time::{Duration, SystemTime};

/// RFC 3339 in UTC to the second, e.g. `2026-11-23T10:00:10Z`.
pub fn rfc3339(t: SystemTime) -> String {
    timestamp(t).to_string()
}

/// Parses an RFC 3339 time (any offset).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    s.parse::<jiff::Timestamp>().ok().and_then(to_system_time)
}

/// An HTTP date, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: SystemTime) -> String {
    jiff::fmt::rfc2822::DateTimePrinter::new()
        .timestamp_to_rfc9110_string(&timestamp(t))
        .unwrap_or_default()
}

/// Parses an HTTP date (the RFC 2822 family, which the IMF-fixdate belongs to).
pub fn parse_http_date(s: &str) -> Option<SystemTime> {
    jiff::fmt::rfc2822::parse(s)
        .ok()
        .and_then(|z| to_system_time(z.timestamp()))
}

/// A `SystemTime` as a jiff timestamp, truncated to the second; times jiff cannot represent
/// (before year -9999 or after 9999) are clamped to its range.
fn timestamp(t: SystemTime) -> jiff::Timestamp {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs())
            .map(|s| -s)
            .unwrap_or(i64::MIN),
    };
    let secs = secs.clamp(
        jiff::Timestamp::MIN.as_second(),
        jiff::Timestamp::MAX.as_second(),
    );
    jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

fn to_system_time(t: jiff::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.as_second()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(
            http_date(SystemTime::UNIX_EPOCH),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date("yesterday"), None);
    }

    #[test]
    fn http_dates_parse() {
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            784111777
        );
        assert!(parse_http_date("yesterday").is_none());
    }

    #[test]
    fn rfc3339_to_the_second() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_750);
        assert_eq!(rfc3339(t), "2025-11-24T16:00:00Z");
        assert_eq!(
            parse_rfc3339("2025-11-24T17:00:00+01:00"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000))
        );
        assert_eq!(parse_rfc3339("2025-11-24"), None);
        // Far outside jiff's range: clamped, never a panic.
        let _ = rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 2));
    }
}
