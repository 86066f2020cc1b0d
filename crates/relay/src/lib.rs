//! The ucrelay relay: its four jobs and the services they share. The binary (`ucrelay run`) calls
//! [`daemon::run`], which opens the shared services, hands each job its state and supervises them.
//!
//! Shared services, which any job may use: [`config`] (the validated configuration), [`store`]
//! (the durable redb store), [`cloud`] (the connector and session to the cloud), [`cache`] (the
//! image cache on disk), [`artifacts`] (files waiting for upload to the cloud), [`devlogs`] (the
//! device logs the relay keeps), [`ctx`] (what bundles them) and [`util`] (leaf helpers: time,
//! metrics, backoff, secrets). The jobs, which never import one another: [`agent`] (registration,
//! heartbeats, the command channel, the results outbox), [`devices`] (device commands, tasks and
//! monitoring over the devices' REST API), [`download`] (image sync into the cache) and [`edge`]
//! (the device-facing HTTPS server, with image serving and the provisioning proxy as its two
//! handlers). Above them, [`ops`] reads what the jobs publish (status, admin socket, metrics,
//! doctor, diag), and [`daemon`] wires it all. Wire types come from `ucrelay-protocol`; this crate
//! cannot depend on the simulators.
#![deny(unsafe_code)]

pub mod agent;
pub mod artifacts;
pub mod cache;
pub mod cloud;
pub mod config;
pub mod ctx;
pub mod daemon;
pub mod devices;
pub mod devlogs;
pub mod download;
pub mod ops;
pub use ucrelay_protocol as protocol;
pub mod edge;

mod layers;
pub mod store;
pub mod util;
