//! Integration tests of `app` against a real `redis-server`, real sockets and the real binary.
//! One test binary, so the support code is compiled once and shared.

// Test code: an unwrap that fails is a failing test, with its location.
#![allow(clippy::unwrap_used)]

mod api;
mod bad_frames;
mod bad_input;
mod binary;
mod delivery;
mod presence;
mod redis_faults;
mod resume;
mod rooms;
mod shutdown;
mod signed_in;
mod slow_client;
mod support;
