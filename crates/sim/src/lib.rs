//! The world around a relay, simulated: a reference cloud (`ucrelay sim cloud`: registration,
//! heartbeats, the command channel, images, provisioning and a test API), a fleet of phones
//! speaking the device REST API, and a phone's provisioning client. It is a second, independent
//! implementation of the protocols: it depends on `ucrelay-protocol` and never on the relay
//! library, so a cloud team can read it as the reference for the cloud side, and the relay and the
//! simulators can only agree by both following docs/protocol.md. The demo, the tests and the
//! benchmarks use it; the relay never does.

use ucrelay_protocol as protocol;

pub mod client;
pub mod cloud;
pub mod phone;
pub mod phones;
pub mod pki;
