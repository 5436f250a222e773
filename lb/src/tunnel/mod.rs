//! WebSocket tunnels after the upgrade.

pub mod splice;
