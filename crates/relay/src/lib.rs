//! ucrelay: an on-premises relay for cloud-managed VoIP/UC device fleets.
//!
//! Each of the relay's jobs has a module: `agent` (management agent: registration, heartbeats,
//! command channel, results), `devices` (device control, scheduled tasks and monitoring over the
//! devices' REST API), `download` (firmware image sync and serving), `proxy` (the device-facing
//! edge: TLS with the PFX certificate, the provisioning proxy) and `ops` (local operations: admin
//! socket, status, doctor, diag, metrics, logs). `protocol` holds the relay-to-cloud wire types;
//! `sim` the reference cloud and the phone simulator used by the demo, the tests and the
//! benchmarks, which talk to the relay only over the documented protocols.
#![deny(unsafe_code)]

pub mod agent;
pub mod cache;
pub mod cloud;
pub mod config;
pub mod ctx;
pub mod daemon;
pub mod devices;
pub mod download;
pub mod ops;
pub use ucrelay_protocol as protocol;
pub mod edge;

pub mod store;
pub mod util;
