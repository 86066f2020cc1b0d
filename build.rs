//! Records the git revision the binary was built from, for `ucrelay --version` and support
//! bundles. A source tarball (no .git) or a machine without git builds too: the revision is then
//! "unknown", unless the packager sets UCRELAY_GIT_REV.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=UCRELAY_GIT_REV");
    println!("cargo:rerun-if-changed=build.rs");
    // Only this crate's own checkout counts: a source tarball unpacked inside some other git
    // repository must not report that repository's revision.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let own_checkout = git(&["rev-parse", "--show-toplevel"])
        .and_then(|top| std::fs::canonicalize(top).ok())
        .zip(std::fs::canonicalize(&manifest_dir).ok())
        .is_some_and(|(top, here)| top == here);
    let rev = match std::env::var("UCRELAY_GIT_REV") {
        Ok(r) if !r.trim().is_empty() => r.trim().to_string(),
        _ if !own_checkout => "unknown".into(),
        _ => {
            // Rebuild when HEAD moves: HEAD itself (branch switch, detached commit), packed-refs
            // (where a branch may live after `git gc`) and the branch's own ref: the file when it
            // exists (a commit rewrites it), else its directory (a commit creates the file when
            // the branch was packed). Watching the directory while the file exists would rebuild
            // on every commit to any other branch, worktrees included. Only paths that exist are
            // named: cargo treats a missing one as changed, and would rebuild on every run.
            let mut watch = Vec::new();
            for p in ["HEAD", "packed-refs"] {
                watch.extend(git(&["rev-parse", "--git-path", p]));
            }
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
                && let Some(path) = git(&["rev-parse", "--git-path", &branch])
            {
                let file = std::path::Path::new(&path);
                if file.exists() {
                    watch.push(path);
                } else if let Some(dir) = file.parent() {
                    watch.push(dir.to_string_lossy().into_owned());
                }
            }
            for path in watch {
                if std::path::Path::new(&path).exists() {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
            git(&["rev-parse", "--short=10", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=UCRELAY_GIT_REV={rev}");
}
