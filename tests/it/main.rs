//! The one integration test binary: real processes and servers on loopback, waiting on readiness.

mod agent;
mod bounded_work;
mod cli;
mod devices;
mod diagnostics;
mod doctor;
mod download;
mod edge;
mod faults;
mod fleet;
mod fuzz_corpus;
mod hostile_cloud;
mod hostile_devices;
mod metrics;
mod netns;
mod nginx;
mod pki;
mod provisioning;
mod reload;
mod secrets;
mod support;
mod systemd;
mod testssl;
