//! Request-target checks done before any routing: hostile or malformed paths are refused here, so
//! neither the image cache nor the upstream ever sees them.

use percent_encoding::percent_decode_str;

/// Longest request target (path + query) accepted; longer ones get 414.
pub const MAX_URI: usize = 8 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    /// 414.
    TooLong,
    /// 400, with the reason.
    Bad(&'static str),
}

/// Checks a request's path (and query length). Returns the percent-decoded path on success.
pub fn check(path: &str, query: Option<&str>) -> Result<String, PathError> {
    if path.len() + query.map_or(0, |q| q.len() + 1) > MAX_URI {
        return Err(PathError::TooLong);
    }
    if !path.starts_with('/') {
        return Err(PathError::Bad("path must start with '/'"));
    }
    let bytes: Vec<u8> = percent_decode_str(path).collect();
    let decoded =
        String::from_utf8(bytes).map_err(|_| PathError::Bad("path is not valid UTF-8"))?;
    if decoded.chars().any(|c| c.is_control()) {
        return Err(PathError::Bad("path contains control characters"));
    }
    if decoded.contains('\\') {
        return Err(PathError::Bad("path contains a backslash"));
    }
    if decoded.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(PathError::Bad("path contains a '.' or '..' segment"));
    }
    // A '%2F' would hide a separator from the check above; phones never send one.
    if decoded.matches('/').count() != path.matches('/').count() {
        return Err(PathError::Bad("path contains an encoded '/'"));
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_phones_send() {
        for p in [
            "/",
            "/000000000000.cfg",
            "/0004f2e765da-app.log",
            "/fw/3111-48450-001.sip.ld",
            "/a%20b.cfg",
        ] {
            assert!(check(p, None).is_ok(), "{p}");
        }
        assert_eq!(check("/a%20b.cfg", None).unwrap(), "/a b.cfg");
    }

    #[test]
    fn refuses_hostile_paths() {
        let bad = [
            "/../etc/passwd",
            "/a/../../b",
            "/%2e%2e/etc/passwd",
            "/%2E%2E%2Fetc",
            "/a%2fb",
            "/a\\b",
            "/a%5c..%5cb",
            "/a%00b",
            "/./x",
            "/a%0d%0aSet-Cookie:x",
            "/%ff%fe",
            "relative",
        ];
        for p in bad {
            assert!(
                matches!(check(p, None), Err(PathError::Bad(_))),
                "{p} should be refused"
            );
        }
    }

    #[test]
    fn long_targets_are_414() {
        let long = format!("/{}", "a".repeat(MAX_URI));
        assert_eq!(check(&long, None), Err(PathError::TooLong));
        assert_eq!(
            check("/x", Some(&"q".repeat(MAX_URI))),
            Err(PathError::TooLong)
        );
    }
}
