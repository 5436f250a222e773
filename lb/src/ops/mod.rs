//! Running the process: start, reload and shutdown, signals, counters, the admin listener.

pub mod admin;
pub mod fdlimit;
pub mod metrics;
pub mod server;
pub mod signals;
