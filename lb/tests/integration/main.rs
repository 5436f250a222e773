//! Integration tests of `lb` with real TLS, real sockets, real backends on loopback and the real
//! binary. One test binary, so the support code is compiled and linked once.

// Test code: an unwrap that fails is a failing test, with its location.
#![allow(clippy::unwrap_used)]

mod attacks;
mod balance_health;
mod cli;
mod framing;
mod proxy;
mod reload;
mod support;
mod testssl;
mod tls;
mod upgrade;
mod websocket;
