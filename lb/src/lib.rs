//! The scaleout load balancer: terminates TLS, proxies HTTP/1.1 and splices WebSocket tunnels
//! to health-checked backends.

pub mod backends;
pub mod config;
pub mod front;
pub mod http;
pub mod ops;
pub mod tunnel;

pub use config::{Config, ConfigError, Overrides};
pub use ops::server::{Addrs, Lb, StartError};
