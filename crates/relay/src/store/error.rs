//! What can go wrong in the store, as a type its callers can branch on (a full disk is not a
//! corrupt file), with the database's own error kept as the source.

use std::path::PathBuf;

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created.
    #[error("cannot create state_dir {}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store file could not be created owner-only, or an existing one made so.
    #[error("cannot make the store {} private to its owner (mode 0600)", path.display())]
    Private {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another process has the database open.
    #[error(
        "store {} is in use by another ucrelay process (only one relay may use a state_dir)",
        path.display()
    )]
    InUse { path: PathBuf },
    /// The database file could not be opened (permissions, corruption).
    #[error("cannot open store {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    /// The file was written by a newer ucrelay with a schema this build does not know.
    #[error("schema version {found} was written by a newer ucrelay; this build knows {known}")]
    Schema { found: String, known: &'static str },
    /// A read, write or commit failed.
    #[error("store operation failed")]
    Db(#[source] redb::Error),
    /// A record could not be encoded.
    #[error("cannot encode a store record")]
    Encode(#[from] serde_json::Error),
    /// The blocking task running the operation died (a panic inside it).
    #[error("store task failed: {0}")]
    Task(String),
    /// The database was closed after an I/O error and cannot be opened again yet (each operation
    /// tries again, at most once a second).
    #[error("store {} is unavailable: {reason}", path.display())]
    Unavailable {
        path: PathBuf,
        disk_full: bool,
        reason: String,
    },
}

impl StoreError {
    /// True when the disk under the store is full: the operation can succeed once space returns.
    pub fn is_disk_full(&self) -> bool {
        let full = |e: &std::io::Error| {
            matches!(
                e.raw_os_error(),
                Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT)
            )
        };
        match self {
            StoreError::Db(redb::Error::Io(e)) => full(e),
            StoreError::StateDir { source, .. } => full(source),
            StoreError::Open {
                source: redb::DatabaseError::Storage(redb::StorageError::Io(e)),
                ..
            } => full(e),
            StoreError::Unavailable { disk_full, .. } => *disk_full,
            _ => false,
        }
    }

    /// True when redb needs the database closed and opened again before it works again: after
    /// an I/O error it refuses every operation with `PreviousIo`.
    pub fn closes_database(&self) -> bool {
        matches!(
            self,
            StoreError::Db(redb::Error::Io(_) | redb::Error::PreviousIo)
        )
    }

    /// True when the store is refusing work for now (full disk, reopening after an I/O error),
    /// as opposed to a bug or a corrupt record: the caller waits and tries again.
    pub fn is_transient(&self) -> bool {
        self.is_disk_full()
            || self.closes_database()
            || matches!(self, StoreError::Unavailable { .. })
    }
}

/// An error with its causes, `a: b: c`, for logs and status.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError {
                StoreError::Db(redb::Error::from(e))
            }
        }
    )*};
}

from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
