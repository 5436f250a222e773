//! One client request, from hyper's server side to the response: forwarded to a backend, or
//! upgraded to a WebSocket tunnel.
//!
//! `front::conn` builds a `context::ClientConn` per connection and calls `proxy::handle` for
//! each request. `proxy` refuses what it must (405, 414), sends WebSocket handshakes to
//! `upgrade` and forwards the rest; both rewrite the head with `headers`, reach a backend
//! through `connect` (pick, connect, fail over, or answer 503), run the exchange with
//! `backends::exchange`, and answer with a `body::ResponseBody` that streams the backend's
//! body straight from its connection. After a `101`, `upgrade` hands both sockets to
//! `tunnel::splice`. Calls go down to `backends` and `tunnel` only.

pub mod body;
pub mod connect;
pub mod context;
pub mod headers;
pub mod proxy;
pub mod upgrade;
