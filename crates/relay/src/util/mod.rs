//! Small helpers every part of the relay uses. A leaf: nothing here imports the rest of the crate.

pub mod build;
