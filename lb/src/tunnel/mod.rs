//! WebSocket tunnels after the upgrade: bytes copied both ways between the client's stream and
//! the backend's socket.
//!
//! `http::upgrade` waits for hyper to hand over the client's side after a `101` and calls
//! `splice::splice` with both streams and the bytes either side sent early; it returns when
//! the tunnel ends (close, error, idle timeout or shutdown) with a report for the log line.

pub mod splice;
