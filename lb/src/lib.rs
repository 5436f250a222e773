//! The scaleout load balancer: terminates TLS, proxies HTTP/1.1 and splices WebSocket tunnels
//! to health-checked backends.
//!
//! Data flows from `config` (file and flags → validated [`Config`]) into [`Lb::start`]
//! (`ops::server`), which binds the listeners. Each accepted connection goes through `front`
//! (accept loop and connection limit, TLS, hyper's HTTP/1.1 server, or the plain-HTTP
//! redirect); each request through `http` (head rewriting, backend choice with failover, the
//! response body streamed back, or a WebSocket upgrade), which reaches backends through
//! `backends` (balancing, health checks, keep-alive connections, the HTTP/1.1 exchange) and
//! hands upgraded connections to `tunnel` (the byte splice). `ops` runs the process around
//! them: start, [`Lb::reload`] and [`Lb::shutdown`], signals, the open-file limit and the admin
//! listener, which reads the counters in `metrics` that every group bumps. `acme` orders,
//! stores and renews certificates from an ACME CA and hands them (and challenge answers) to
//! `front`'s SNI resolver and redirect listener.
//!
//! Calls go one way: `ops` → `front` → `acme`, `http` → `tunnel`, `backends`; `config` and `metrics`
//! are read by all of them and depend only on `backends`. The one pair of groups that import
//! each other is `front` and `http`: `http` calls nothing in `front` but names two of its types
//! (`front::listener::ConnSlot`, `front::tls_stream::TlsStream`), and neither of those files
//! imports `http`, so no file imports one that imports it back. See `ARCHITECTURE.md`.

pub mod acme;
pub mod backends;
pub mod config;
pub mod front;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod tunnel;

pub use config::{Config, ConfigError, Overrides};
pub use ops::server::{Addrs, Lb, StartError};
