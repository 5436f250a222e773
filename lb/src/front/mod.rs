//! The client-facing side: listening sockets, TLS, and each client connection up to the point
//! where hyper has framed a request.
//!
//! `ops::server` binds the listeners (`listener::bind`) and runs one `listener::accept_loop`
//! per listener; each accepted socket takes a slot of the connection limit (`listener`) and
//! goes, with the shared [`state::State`], to `conn` (https: TLS handshake through `tls_stream`
//! with the configuration `tls` built and the session ticket keys of `tickets`, then hyper's
//! HTTP/1.1 server calling `http::proxy`) or to
//! `redirect` (plain HTTP, answered with a 301 to https). Dependencies point down only: this
//! group calls into `http`, and `http` never calls back; it only names two of its types, the
//! connection's [`listener::ConnSlot`] (carried so a tunnel keeps its place in the limit) and
//! [`tls_stream::TlsStream`] (unwrapped from hyper's upgrade to splice it directly).

pub mod conn;
pub mod listener;
pub mod redirect;
pub mod state;
pub mod tickets;
pub mod tls;
pub mod tls_stream;
