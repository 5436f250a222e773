//! The scaleout load balancer: terminates TLS, proxies HTTP/1.1 and splices WebSocket tunnels
//! to health-checked backends.
//!
//! Data flows from `config` (file and flags → validated [`Config`]) into [`Lb::start`]
//! (`server`), which binds the listeners. Each accepted connection (`listener`) is handed to
//! `conn` (TLS via `tls` and `tls_stream`, then hyper's HTTP/1.1 server) or `redirect`; each
//! request goes through `proxy` (headers rewritten by `headers`, backend chosen by `balance`,
//! connections from `upstream`, the backend side run by `exchange`, response bodies decoded by
//! `body`) or, for a WebSocket, `upgrade` and then `splice`. `health` keeps
//! backend states current, `metrics` and `admin` expose counters, `signals` turns SIGHUP into
//! [`Lb::reload`] and SIGTERM/SIGINT into [`Lb::shutdown`], and `fdlimit` sizes the connection
//! limit from the open-file limit.

pub mod admin;
pub mod balance;
pub mod body;
pub mod config;
pub mod conn;
pub mod exchange;
pub mod fdlimit;
pub mod headers;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod redirect;
pub mod server;
pub mod signals;
pub mod splice;
pub mod tls;
pub mod tls_stream;
pub mod upgrade;
pub mod upstream;

pub use config::{Config, ConfigError, Overrides};
pub use server::{Addrs, Lb, StartError};
