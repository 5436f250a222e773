//! The test kit of the workspace: the fixtures that app's tests, lb's tests, the end-to-end
//! `tests` crate and `bench` share, written once.
//!
//! - [`wait`]: [`wait::eventually`] polls a condition until it holds or a deadline passes;
//!   [`wait::within`] bounds one wait by [`wait::DEADLINE`].
//! - [`process`]: a child process, ready when it prints its readiness line on stdout, its
//!   stderr kept as a [`logs::Log`], signalled by PID and killed on drop.
//! - [`logs`]: the lines a child logs, kept and awaited ([`logs::Log::wait_for`]).
//! - [`redis`]: a real `redis-server` on a loopback port, ready when it says so.
//! - [`http`]: a plain HTTP/1.1 `GET` on a fresh connection.
//!
//! The rules every test follows (and this kit makes easy):
//! - A test asserts behaviour that can fail; an assertion that cannot fail is not a test.
//! - Readiness is awaited (a bound listener, a printed line, an answer), never slept on.
//!   Listeners bind `127.0.0.1:0` and report the port; only `redis-server`, which cannot
//!   report one, gets a free port from [`redis::free_port`] (and is started again on another
//!   if that one was taken meanwhile).
//! - A test that cannot run here (it needs root, or a tool that is missing) fails, or is
//!   `#[ignore = "why"]`d and run by `tests/run` where it can run; `tests/run`'s last line
//!   names every test that was skipped. It never passes without running its check.
//! - Tests assert no timings, except that something bounded by a timeout did not happen
//!   before it was due (a lower bound, which a loaded machine cannot break).
//! - Every wait is bounded: a test that hangs fails at its deadline and says what it waited
//!   for.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod http;
pub mod logs;
pub mod process;
pub mod redis;
pub mod wait;
