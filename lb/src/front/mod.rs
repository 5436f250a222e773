//! The client-facing side: listeners, TLS, client connections.

pub mod conn;
pub mod listener;
pub mod redirect;
pub mod tls;
pub mod tls_stream;
