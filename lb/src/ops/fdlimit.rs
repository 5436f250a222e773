//! The open-file limit: raised from soft to hard at start (as HAProxy does), and turned into
//! the number of client connections the process can hold.
//!
//! Every proxied client connection or tunnel costs two descriptors (client and backend side);
//! a fixed reserve covers listeners, health checks, logs and the idle keep-alive pool.

use tracing::{info, warn};

/// Descriptors kept back for listeners, health checks, logging and the like.
const RESERVED: u64 = 64;

/// Raises the soft open-file limit to the hard limit and returns the resulting soft limit.
pub fn raise() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            let current = rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024);
            warn!(error = %e, limit = current, "could not raise the open-file limit");
            current
        }
    }
}

/// How many client connections fit in `nofile` descriptors when `pooled` descriptors may be
/// held by idle backend connections.
fn connections_for(nofile: u64, pooled: u64) -> usize {
    let usable = nofile.saturating_sub(RESERVED + pooled);
    usize::try_from((usable / 2).max(1)).unwrap_or(usize::MAX)
}

/// The connection limit to enforce: the configured one, capped by what `nofile` allows.
pub fn effective_limit(configured: Option<usize>, nofile: u64, pooled: u64) -> usize {
    let fits = connections_for(nofile, pooled);
    match configured {
        None => fits,
        Some(n) if n > fits => {
            warn!(
                configured = n,
                allowed = fits,
                open_files = nofile,
                "limits.max_client_connections exceeds what the open-file limit allows; using the lower figure"
            );
            fits
        }
        Some(n) => n,
    }
}

/// Logs the limit and what it allows.
pub fn log(nofile: u64, limit: usize) {
    info!(
        open_files = nofile,
        max_client_connections = limit,
        "open-file limit allows about {} tunnels (two descriptors each)",
        limit
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_descriptors_per_connection_after_the_reserve() {
        assert_eq!(connections_for(20_000, 0), 9_968);
        assert_eq!(connections_for(20_000, 64), 9_936);
        assert_eq!(connections_for(10, 0), 1);
    }

    #[test]
    fn configured_limit_is_capped() {
        assert_eq!(effective_limit(Some(100), 20_000, 0), 100);
        assert_eq!(effective_limit(Some(50_000), 20_000, 0), 9_968);
        assert_eq!(effective_limit(None, 1024, 0), 480);
    }
}
