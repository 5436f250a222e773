//! The scaleout load balancer: terminates TLS, proxies HTTP/1.1 and splices WebSocket tunnels
//! to health-checked backends.

pub mod admin;
pub mod balance;
pub mod health;
pub mod metrics;
