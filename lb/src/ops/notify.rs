//! systemd's readiness protocol (`sd_notify`), for a unit with `Type=notify`.
//!
//! When systemd starts lb it sets `NOTIFY_SOCKET`; [`ready`] sends `READY=1` and `MAINPID=`
//! this process's id there once the listeners serve. After a binary upgrade that message comes
//! from the new process, which is how systemd learns that the service's main process changed
//! before the old one exits (the unit needs `NotifyAccess=all`: the sender is not yet the
//! main process). Without `NOTIFY_SOCKET` (not under systemd) nothing is sent. A failure to
//! notify is logged, never fatal: the service still serves.

use std::os::unix::net::{SocketAddr, UnixDatagram};

use tracing::{debug, warn};

/// Tells systemd (if it started us) that this process is the ready main process.
pub fn ready() {
    send(&format!("READY=1\nMAINPID={}\n", std::process::id()));
}

/// Tells systemd that this process is stopping.
pub fn stopping() {
    send("STOPPING=1\n");
}

fn send(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let result = address(&path).and_then(|addr| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(message.as_bytes(), &addr)
    });
    match result {
        Ok(_) => debug!(socket = %path, message = message.trim_end(), "notified systemd"),
        Err(e) => warn!(socket = %path, error = %e, "could not notify systemd"),
    }
}

/// `NOTIFY_SOCKET` as an address: a path, or `@name` for Linux's abstract namespace.
fn address(path: &str) -> std::io::Result<SocketAddr> {
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_abstract_names_are_addresses() {
        assert_eq!(
            address("/run/systemd/notify").unwrap().as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        use std::os::linux::net::SocketAddrExt;
        assert_eq!(
            address("@sd-notify").unwrap().as_abstract_name(),
            Some(&b"sd-notify"[..])
        );
    }
}
