//! Origin check against cross-site WebSocket hijacking.
//!
//! A browser sends `Origin` with every WebSocket handshake; a page from another site could
//! otherwise open a socket to us with the user's cookies. The handshake's `Origin` and `Host`
//! headers come in, a yes/no goes out: allowed when there is no `Origin` (not a browser), when
//! the origin's host and port equal the `Host` the client asked for (the page's own site,
//! including through `lb`, which keeps `Host`), or when the origin is on the configured
//! allow-list (normalised by [`normalise`] at config time).

/// `scheme://host[:port]` in lower case without a trailing slash and without the scheme's
/// default port, or `None` if `origin` is not of that form (a path, query or other scheme).
pub fn normalise(origin: &str) -> Option<String> {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let (scheme, authority) = origin.split_once("://")?;
    if !matches!(scheme, "http" | "https")
        || authority.is_empty()
        || authority.contains(['/', '?', '#', '@', ' '])
    {
        return None;
    }
    Some(format!(
        "{scheme}://{}",
        strip_default_port(scheme, authority)
    ))
}

/// Whether a handshake with these `Origin` and `Host` headers may open a WebSocket.
pub fn allowed(origin: Option<&str>, host: Option<&str>, allow_list: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let Some(origin) = normalise(origin) else {
        return false;
    };
    if allow_list.contains(&origin) {
        return true;
    }
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    host.is_some_and(|host| {
        let host = host.trim().to_ascii_lowercase();
        strip_default_port(scheme, &host) == authority
    })
}

fn strip_default_port<'a>(scheme: &str, authority: &'a str) -> &'a str {
    let default = if scheme == "https" { ":443" } else { ":80" };
    authority.strip_suffix(default).unwrap_or(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_origins() {
        assert_eq!(
            normalise("HTTPS://Chat.Example.com:443/").as_deref(),
            Some("https://chat.example.com")
        );
        assert_eq!(
            normalise("http://127.0.0.1:8080").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        for bad in [
            "chat.example.com",
            "ftp://x",
            "https://",
            "https://x/path",
            "https://u@x",
            "null",
        ] {
            assert_eq!(normalise(bad), None, "{bad}");
        }
    }

    #[test]
    fn same_host_is_allowed() {
        assert!(allowed(
            Some("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080"),
            &[]
        ));
        assert!(allowed(
            Some("https://chat.example.com"),
            Some("Chat.Example.com:443"),
            &[]
        ));
        assert!(allowed(
            Some("https://localhost:8443"),
            Some("localhost:8443"),
            &[]
        ));
    }

    #[test]
    fn other_sites_are_refused_unless_listed() {
        let list = vec!["https://admin.example.com".to_owned()];
        assert!(!allowed(
            Some("https://evil.example"),
            Some("chat.example.com"),
            &list
        ));
        assert!(!allowed(
            Some("http://chat.example.com:8080"),
            Some("chat.example.com"),
            &list
        ));
        assert!(!allowed(Some("null"), Some("chat.example.com"), &list));
        assert!(!allowed(Some("https://chat.example.com"), None, &list));
        assert!(allowed(
            Some("https://admin.example.com/"),
            Some("chat.example.com"),
            &list
        ));
    }

    #[test]
    fn no_origin_is_not_a_browser_and_is_allowed() {
        assert!(allowed(None, Some("chat.example.com"), &[]));
        assert!(allowed(None, None, &[]));
    }
}
