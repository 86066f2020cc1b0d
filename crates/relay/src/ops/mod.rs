//! Local operations: the admin socket and what the CLI shows an admin (status), `doctor` and
//! `diag`, the metrics endpoint, and the daemon's notifications to systemd.

pub mod admin;
pub mod diag;
pub mod doctor;
pub mod logwriter;
pub mod metrics;
pub mod report;
pub mod systemd;
pub mod views;
