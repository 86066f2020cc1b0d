//! `Live<T>`: a value a reload can replace while the relay runs. Readers take a snapshot
//! (`get`, an `Arc`) and keep it for as long as one piece of work needs a consistent view; the
//! next piece of work sees what the reload installed.

use std::sync::{Arc, RwLock};

pub struct Live<T> {
    current: RwLock<Arc<T>>,
}

impl<T> Live<T> {
    pub fn new(value: T) -> Live<T> {
        Live {
            current: RwLock::new(Arc::new(value)),
        }
    }

    /// The value in force now.
    pub fn get(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Installs a new value for every later `get`.
    pub fn set(&self, value: T) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}
