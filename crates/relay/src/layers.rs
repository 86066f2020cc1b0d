//! The dependency rules of this crate, checked: a test reads every source file and fails when a
//! module imports one it must not. The rules are the README's architecture map:
//!
//! - `util` is a leaf: it imports nothing else of the crate;
//! - the jobs (`agent`, `devices`, `download`, `edge`) never import one another, nor `ops` or
//!   `daemon`;
//! - `ops` may read the jobs, never `daemon`;
//! - shared services (`config`, `store`, `cloud`, `cache`, `artifacts`, `devlogs`, `ctx`) import
//!   no job.
//!
//! Only `crate::<module>` paths count (how this crate writes its imports); `super::` stays inside a
//! module.

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    const JOBS: [&str; 4] = ["agent", "devices", "download", "edge"];
    const SERVICES: [&str; 7] = [
        "config",
        "store",
        "cloud",
        "cache",
        "artifacts",
        "devlogs",
        "ctx",
    ];

    /// Which top-level modules `module` must not import.
    fn forbidden(module: &str) -> Vec<&'static str> {
        let mut no: Vec<&'static str> = Vec::new();
        match module {
            "util" => {
                no.extend(JOBS);
                no.extend(SERVICES);
                no.extend(["ops", "daemon"]);
            }
            m if JOBS.contains(&m) => {
                no.extend(JOBS.iter().filter(|j| **j != m));
                no.extend(["ops", "daemon"]);
            }
            "ops" => no.push("daemon"),
            m if SERVICES.contains(&m) => {
                no.extend(JOBS);
                no.extend(["ops", "daemon"]);
            }
            _ => {}
        }
        no
    }

    /// `crate::<name>` references in a file, outside comments.
    fn imports(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                let after = &rest[i + "crate::".len()..];
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // `ucrelay_relay::crate::` cannot occur; a preceding identifier char means
                // something like `my_crate::`, which is not this crate.
                let before = rest[..i].chars().last();
                if !name.is_empty()
                    && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    out.insert(name);
                }
                rest = after;
            }
        }
        out
    }

    fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, files);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }

    #[test]
    fn modules_import_only_downwards() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src, &mut files);
        assert!(files.len() > 20, "found only {} source files", files.len());
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut broken = Vec::new();
        for f in &files {
            let rel = f.strip_prefix(&src).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let module = first.trim_end_matches(".rs").to_string();
            let text = std::fs::read_to_string(f).unwrap();
            for used in imports(&text) {
                if used == module {
                    continue;
                }
                if forbidden(&module).contains(&used.as_str()) {
                    broken.push(format!("{}: {module} imports {used}", rel.display()));
                }
                graph.entry(module.clone()).or_default().insert(used);
            }
        }
        assert!(
            broken.is_empty(),
            "imports against the layering (see the README's Architecture):\n{}",
            broken.join("\n")
        );
        // The rules above make cycles among the jobs and ops impossible; check it anyway.
        for a in JOBS.iter().chain(["ops"].iter()) {
            for b in JOBS.iter().chain(["ops"].iter()) {
                if a != b {
                    let ab = graph.get(*a).is_some_and(|s| s.contains(*b));
                    let ba = graph.get(*b).is_some_and(|s| s.contains(*a));
                    assert!(!(ab && ba), "{a} and {b} import each other");
                }
            }
        }
    }

    #[test]
    fn the_check_sees_imports() {
        let found = imports(
            "use crate::edge::Edge;\n// crate::ops in a comment\nlet x = crate::util::time::rfc3339(t); my_crate::x",
        );
        assert_eq!(
            found,
            ["edge", "util"].iter().map(|s| s.to_string()).collect()
        );
        assert!(forbidden("agent").contains(&"edge"));
        assert!(forbidden("util").contains(&"ctx"));
        assert!(!forbidden("ops").contains(&"edge"));
    }
}
