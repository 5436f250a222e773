//! One client request: forwarded to a backend, or upgraded to a WebSocket tunnel.

pub mod body;
pub mod headers;
pub mod proxy;
pub mod upgrade;
