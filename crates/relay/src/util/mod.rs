//! Small helpers every part of the relay uses. A leaf: nothing here imports the rest of the crate,
//! so any module may use it without drawing a dependency on another job.

pub mod backoff;
pub mod build;
pub mod bytes;
pub mod live;
pub mod logwriter;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod paths;
pub mod secret;
pub mod shard;
pub mod text;
pub mod time;
