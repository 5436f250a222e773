//! Harness for the end-to-end tests: starts real `redis-server`, `app` and `lb` processes on
//! ephemeral loopback ports, learns their addresses from the readiness lines they print
//! (`listening <kind> <addr>`), and connects real WebSocket clients over TLS to them.
//!
//! Data flow of a typical test: [`stack::Stack`] generates a CA with `lb certs generate`,
//! starts a `testkit::redis::Redis`, two `app` processes and one `lb` (each a
//! `testkit::process::Proc`), then
//! the test opens [`client::ChatClient`]s to `wss://` through `lb` and checks what arrives.
#![allow(clippy::unwrap_used)]

pub mod browser;
pub mod chaos;
pub mod client;
pub mod cluster;
pub mod keepalived;
pub mod latency;
pub mod netns;
pub mod pebble;
pub mod stack;
