//! ucrelay: an on-premises relay for cloud-managed VoIP/UC device fleets.
//!
//! The relay's jobs each have a module: `agent` (management agent: registration, heartbeats, command
//! channel, results), and `proxy` (the device-facing edge: TLS with the PFX certificate, provisioning proxy), and `ops`
//! (local operations: admin socket, status). `protocol` holds the
//! relay-to-cloud wire types; `sim` the reference cloud used by the demo and tests, which talks to the
//! relay only over that protocol.
#![deny(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod ctx;
pub mod daemon;
pub mod demo;
pub mod devices;
pub mod download;
pub mod ops;
pub mod protocol;
pub mod proxy;
pub mod reload;
pub mod secret;
pub mod sim;
pub mod store;
