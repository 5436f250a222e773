//! Running the process: start, reload, binary upgrade and shutdown, signals, the open-file limit
//! and the admin listener.
//!
//! `server` is the composition root: [`server::Lb::start`] turns a validated `Config` into
//! running listeners (`front`), health checkers (`backends::health`) and the admin listener,
//! and [`server::Lb::reload`] and [`server::Lb::shutdown`] act on all of them. `signals` maps
//! SIGHUP to a reload, SIGUSR2 to a binary upgrade and SIGTERM/SIGINT to a drain; `handover`
//! passes the listening sockets and ticket keys to the new process over a Unix socket;
//! `notify` tells systemd which process is ready; `fdlimit` raises the open-file limit and
//! sizes the connection limit from it; `admin` serves `/metrics`, `/stats` and `/` from the
//! counters in `crate::metrics`. This group depends on every other; none depends on it.

pub mod admin;
pub mod fdlimit;
pub mod handover;
pub mod notify;
pub mod server;
pub mod signals;
