//! Simulators that stand in for the real world in the demo, tests and benchmarks. Relay code never
//! uses them; they talk to the relay only over the documented protocols.

use ucrelay_protocol as protocol;

pub mod client;
pub mod cloud;
pub mod phone;
pub mod phones;
pub mod pki;
