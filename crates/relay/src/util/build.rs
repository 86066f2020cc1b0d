//! Which build this is: the package version, and the git revision the binary was built from.
//!
//! The revision is known only to the `ucrelay` binary (its build script reads git), and the binary
//! hands it over once at start with [`set_revision`]. Keeping git out of this library's build means
//! a new commit recompiles the small binary crate, not the whole relay.

use std::sync::OnceLock;

static REVISION: OnceLock<&'static str> = OnceLock::new();

/// The relay's version, as released.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Records the git revision; only the first call counts.
pub fn set_revision(rev: &'static str) {
    let _ = REVISION.set(rev);
}

/// The git revision the running binary was built from, or "unknown".
pub fn revision() -> &'static str {
    REVISION.get().copied().unwrap_or("unknown")
}
