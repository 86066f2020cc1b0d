//! Manifest rules, pure: a manifest is accepted whole or refused whole with one reason, before any of
//! it is applied.

use crate::config::ImagesConfig;
use crate::protocol::ImageManifest;
use crate::util::bytes::human_bytes;
use std::collections::{HashMap, HashSet};

/// Checks the limits and the shape of every entry. Returns the reason for refusing it, if any.
pub fn validate(m: &ImageManifest, cfg: &ImagesConfig) -> Result<(), String> {
    if m.images.len() > cfg.max_images as usize {
        return Err(format!(
            "manifest lists {} images; this relay holds at most {} ([images].max_images)",
            m.images.len(),
            cfg.max_images
        ));
    }
    let mut ids = HashSet::new();
    let mut paths = HashSet::new();
    let mut sizes: HashMap<&str, u64> = HashMap::new();
    for img in &m.images {
        if img.id.is_empty() || img.id.len() > 200 || img.id.chars().any(char::is_control) {
            return Err(format!("image id {:?} is not usable", img.id));
        }
        if !ids.insert(img.id.as_str()) {
            return Err(format!("image id {:?} is listed twice", img.id));
        }
        if img.files.is_empty() {
            return Err(format!("image {} lists no files", img.id));
        }
        for f in &img.files {
            if let Err(why) = crate::util::paths::check(&f.path, None) {
                return Err(format!(
                    "image {}: path {:?} is not servable: {why:?}",
                    img.id, f.path
                ));
            }
            if f.path == "/" || f.path.ends_with('/') || f.path.contains('?') {
                return Err(format!(
                    "image {}: path {:?} must name a file",
                    img.id, f.path
                ));
            }
            if !paths.insert(f.path.as_str()) {
                return Err(format!("path {} is listed twice", f.path));
            }
            if f.sha256.len() != 64
                || !f
                    .sha256
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            {
                return Err(format!(
                    "image {}: {:?} is not a lower-case hex SHA-256",
                    img.id, f.sha256
                ));
            }
            if f.size == 0 {
                return Err(format!("image {}: {} has size 0", img.id, f.path));
            }
            if f.url.is_empty() {
                return Err(format!("image {}: {} has no url", img.id, f.path));
            }
            check_url(&f.url).map_err(|why| format!("image {}: url {:?} {why}", img.id, f.url))?;
            match sizes.insert(f.sha256.as_str(), f.size) {
                Some(prev) if prev != f.size => {
                    return Err(format!("SHA-256 {} is listed with two sizes", f.sha256));
                }
                _ => {}
            }
        }
    }
    // Identical files are stored once, so they count once. The sizes are the cloud's numbers:
    // a sum past u64 is refused, never wrapped into a small total.
    let total = sizes
        .values()
        .try_fold(0u64, |sum, &size| sum.checked_add(size))
        .ok_or_else(|| {
            format!(
                "manifest sizes add up to more than {} bytes; this relay holds at most {} ([images].max_total)",
                u64::MAX,
                human_bytes(cfg.max_total)
            )
        })?;
    if total > cfg.max_total {
        return Err(format!(
            "manifest needs {} in total; this relay holds at most {} ([images].max_total)",
            human_bytes(total),
            human_bytes(cfg.max_total)
        ));
    }
    Ok(())
}

/// The shape of a file's URL: a path on the cloud's origin (`/files/x?sig=...`) or an absolute
/// http(s) URL without user information or fragment. Where it may lead is judged when it is
/// fetched (`cloud::origin`): that depends on DNS, which can change.
fn check_url(url: &str) -> Result<(), String> {
    if url.len() > crate::cloud::origin::MAX_URL {
        return Err(format!(
            "is longer than {} bytes",
            crate::cloud::origin::MAX_URL
        ));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("contains spaces or control characters".into());
    }
    if url.starts_with("//") {
        return Err("is scheme-relative (//host/...): give the scheme".into());
    }
    if url.starts_with('/') {
        return Ok(());
    }
    crate::cloud::origin::FileUrl::parse(url).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Image, ImageFile};

    fn cfg(max_images: u32, max_total: u64) -> ImagesConfig {
        ImagesConfig {
            dir: "/tmp/x".into(),
            max_images,
            max_total,
            bandwidth_limit: None,
            parallel: 2,
            max_downloads: 100,
            min_free: 0,
            sync_interval: std::time::Duration::from_secs(3600),
            sync_window: None,
        }
    }

    fn image(id: &str, path: &str, sha: char, size: u64) -> Image {
        Image {
            id: id.into(),
            product: "p".into(),
            version: "1".into(),
            files: vec![ImageFile {
                path: path.into(),
                size,
                sha256: sha.to_string().repeat(64),
                url: "/f".into(),
            }],
        }
    }

    fn manifest(images: Vec<Image>) -> ImageManifest {
        ImageManifest {
            revision: 1,
            images,
        }
    }

    #[test]
    fn limits_refuse_the_whole_manifest() {
        let m = manifest(vec![image("a", "/a", 'a', 10), image("b", "/b", 'b', 10)]);
        assert!(validate(&m, &cfg(2, 20)).is_ok());
        assert!(
            validate(&m, &cfg(1, 20))
                .unwrap_err()
                .contains("max_images")
        );
        assert!(validate(&m, &cfg(2, 19)).unwrap_err().contains("max_total"));
        // The same file in two images is stored, and counted, once.
        let shared = manifest(vec![image("a", "/a", 'a', 10), image("b", "/b", 'a', 10)]);
        assert!(validate(&shared, &cfg(2, 10)).is_ok());
        // Sizes chosen to wrap a u64 sum round to a small total: refused, not wrapped.
        let wrap = manifest(vec![
            image("a", "/a", 'a', u64::MAX),
            image("b", "/b", 'b', 2),
        ]);
        let err = validate(&wrap, &cfg(2, 100)).unwrap_err();
        assert!(err.contains("max_total"), "{err}");
    }

    #[test]
    fn bad_entries_are_named() {
        let cases = [
            (image("a", "/../x", 'a', 1), "not servable"),
            (image("a", "/dir/", 'a', 1), "must name a file"),
            (image("a", "/a", 'Z', 1), "SHA-256"),
            (image("a", "/a", 'a', 0), "size 0"),
        ];
        for (img, words) in cases {
            let err = validate(&manifest(vec![img]), &cfg(5, 100)).unwrap_err();
            assert!(err.contains(words), "{err}");
        }
        for (url, words) in [
            ("ftp://cdn/x", "scheme"),
            ("https://user:pw@cdn/x", "user information"),
            ("https://cdn/x#top", "fragment"),
            ("//cdn/x", "scheme-relative"),
            ("/files/a b", "spaces"),
            ("files/a", "not a URL"),
        ] {
            let mut img = image("a", "/a", 'a', 1);
            img.files[0].url = url.into();
            let err = validate(&manifest(vec![img]), &cfg(5, 100)).unwrap_err();
            assert!(err.contains(words), "{url}: {err}");
        }
        for url in [
            "/files/a?sig=1&e=2",
            "https://cdn.example.com/a?X-Amz-Signature=x",
        ] {
            let mut img = image("a", "/a", 'a', 1);
            img.files[0].url = url.into();
            assert!(
                validate(&manifest(vec![img]), &cfg(5, 100)).is_ok(),
                "{url}"
            );
        }
        let dup = manifest(vec![image("a", "/a", 'a', 1), image("b", "/a", 'b', 1)]);
        assert!(
            validate(&dup, &cfg(5, 100))
                .unwrap_err()
                .contains("listed twice")
        );
    }
}
