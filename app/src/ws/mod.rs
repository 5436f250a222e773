//! The WebSocket endpoint `/ws`: `admission` (the handshake's checks, then membership of the
//! room, or in token mode `signin`: the first frame's token, the user's seat, then the room),
//! `session` (one task per connection: resume, frames in, queue out, pings) and `close` (why a
//! connection ends and the close code that says so), with the per-connection `rate_limit`.

pub mod admission;
pub mod close;
pub mod rate_limit;
pub mod session;
mod signin;

pub use admission::upgrade;
