//! The `[acme]` section: certificates ordered from an ACME CA (RFC 8555), checked key by key.
//!
//! `RawAcme` (the file's shape) → [`AcmeConfig`]: the directory is an `https://` URL, every
//! domain a DNS name (no IP address, no wildcard: neither `http-01` nor `tls-alpn-01` can
//! prove a wildcard), `http-01` needs the redirect listener (its port 80 is where the CA asks),
//! and the storage directory must be usable: [`check_storage`] is the one rule both `lb check`
//! and the ACME task at start apply (a directory lb can write, readable by its owner only).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ConfigError;
use super::acme_peer::AcmePeerConfig;
use super::raw::RawAcme;
use super::validate::Validator;

/// Which ACME challenge proves control of the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// RFC 8737: the CA connects to port 443 with ALPN `acme-tls/1`; the https listener
    /// answers with a challenge certificate.
    TlsAlpn01,
    /// RFC 8555 8.3: the CA fetches `http://NAME/.well-known/acme-challenge/TOKEN` on port 80;
    /// the redirect listener answers.
    Http01,
}

impl AcmeChallenge {
    /// Its name in the file and in ACME.
    pub fn name(self) -> &'static str {
        match self {
            Self::TlsAlpn01 => "tls-alpn-01",
            Self::Http01 => "http-01",
        }
    }
}

/// `[acme]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The CA's directory URL (`https://`).
    pub directory: String,
    /// Contact URLs for the account (`mailto:`).
    pub contact: Vec<String>,
    /// One entry per certificate: its DNS names, the first naming its files.
    pub domains: Vec<Vec<String>>,
    /// How control of the names is proved.
    pub challenge: AcmeChallenge,
    /// Where the account key, certificates and keys are kept (0700, files 0600).
    pub storage: PathBuf,
    /// A private CA's root (PEM) to trust for the directory's HTTPS, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// How long before expiry a certificate is renewed when the CA offers no renewal window
    /// (ARI); `None`: a third of its lifetime.
    pub renew_before: Option<Duration>,
    /// The other host of a keepalived pair (`[acme.peer]`), if this host is one of two.
    pub peer: Option<AcmePeerConfig>,
}

/// Checks that `dir` can serve as ACME storage: an existing directory must be a directory
/// whose mode grants nothing to group or others (0700 at most) and which lb can write; a
/// missing one must have a writable parent directory (lb creates it 0700).
pub fn check_storage(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => Err(format!("{} is not a directory", dir.display())),
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(format!(
                    "{} has mode {mode:03o}; it holds private keys and must be 0700 \
                     (chmod 700 {})",
                    dir.display(),
                    dir.display()
                ));
            }
            writable(dir)
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            match std::fs::metadata(parent) {
                Ok(meta) if meta.is_dir() => writable(parent).map_err(|e| {
                    format!(
                        "{} does not exist and cannot be created: {e}",
                        dir.display()
                    )
                }),
                Ok(_) => Err(format!(
                    "{} cannot be created: {} is not a directory",
                    dir.display(),
                    parent.display()
                )),
                Err(e) => Err(format!(
                    "{} cannot be created: {}: {e}",
                    dir.display(),
                    parent.display()
                )),
            }
        }
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

/// Whether a file can be created in `dir` (tried, then removed).
fn writable(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!(".lb-write-check-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("{} is not writable: {e}", dir.display())),
    }
}

impl Validator<'_> {
    pub(super) fn acme(
        &self,
        a: RawAcme,
        base: &Path,
        bound: &[(&str, SocketAddr)],
    ) -> Result<AcmeConfig, ConfigError> {
        let redirect = bound
            .iter()
            .find(|(key, _)| *key == "listen.redirect")
            .map(|(_, a)| *a);
        let directory = a.directory.ok_or_else(|| {
            self.err(
                "acme.directory",
                "missing: set the CA's directory URL, e.g. Let's Encrypt staging \
                 \"https://acme-staging-v02.api.letsencrypt.org/directory\"",
            )
        })?;
        directory_url(&directory).map_err(|reason| self.err("acme.directory", reason))?;

        for (i, c) in a.contact.iter().enumerate() {
            let address = c.strip_prefix("mailto:").unwrap_or("");
            if !address.contains('@') || address.chars().any(|c| c.is_whitespace()) {
                return Err(self.err(
                    format!("acme.contact[{i}]"),
                    format!("{c:?} is not a mailto: URL (example: \"mailto:ops@example.com\")"),
                ));
            }
        }

        let challenge = match a.challenge.as_deref() {
            None | Some("tls-alpn-01") => AcmeChallenge::TlsAlpn01,
            Some("http-01") => AcmeChallenge::Http01,
            Some(other) => {
                return Err(self.err(
                    "acme.challenge",
                    format!("{other:?} is not supported: use \"tls-alpn-01\" or \"http-01\""),
                ));
            }
        };
        if challenge == AcmeChallenge::Http01 && redirect.is_none() {
            return Err(self.err(
                "acme.challenge",
                "http-01 is answered on the redirect listener: set listen.redirect \
                 (port 80), or use \"tls-alpn-01\"",
            ));
        }

        if a.domains.is_empty() {
            return Err(self.err(
                "acme.domains",
                "at least one certificate is required, e.g. domains = [[\"chat.example.com\"]]",
            ));
        }
        let mut seen: Vec<(String, String)> = Vec::new();
        for (i, names) in a.domains.iter().enumerate() {
            if names.is_empty() {
                return Err(self.err(format!("acme.domains[{i}]"), "lists no name"));
            }
            for (j, name) in names.iter().enumerate() {
                let key = format!("acme.domains[{i}][{j}]");
                dns_name(name, challenge).map_err(|reason| self.err(&key, reason))?;
                let lower = name.to_ascii_lowercase();
                if let Some((_, other)) = seen.iter().find(|(n, _)| *n == lower) {
                    return Err(self.err(key, format!("{name:?} is already {other}")));
                }
                seen.push((lower, key));
            }
        }

        let storage = base.join(a.storage.ok_or_else(|| {
            self.err(
                "acme.storage",
                "missing: set a directory for the account key and certificates, e.g. \
                 \"/var/lib/lb/acme\"",
            )
        })?);
        check_storage(&storage).map_err(|reason| self.err("acme.storage", reason))?;

        let ca_file = a.ca_file.map(|f| base.join(f));
        if let Some(f) = &ca_file
            && let Err(e) = std::fs::metadata(f)
        {
            return Err(self.err("acme.ca_file", format!("{}: {e}", f.display())));
        }
        let renew_before = a
            .renew_before
            .map(|text| {
                self.check
                    .duration("acme.renew_before", Some(&text), Duration::ZERO)
            })
            .transpose()?;
        let peer = a.peer.map(|p| self.acme_peer(p, base, bound)).transpose()?;

        Ok(AcmeConfig {
            directory,
            contact: a.contact,
            domains: a.domains,
            challenge,
            storage,
            ca_file,
            renew_before,
            peer,
        })
    }
}

/// Checks that `url` is an `https://` URL with a host.
fn directory_url(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
        return Err(format!(
            "{url:?} is not an https:// URL (example: \
             \"https://acme-v02.api.letsencrypt.org/directory\")"
        ));
    }
    Ok(())
}

/// Checks that `name` is a DNS name a CA can validate with `challenge`.
fn dns_name(name: &str, challenge: AcmeChallenge) -> Result<(), String> {
    if name.parse::<IpAddr>().is_ok() {
        return Err(format!("{name:?} is an IP address, not a DNS name"));
    }
    if name.starts_with("*.") {
        return Err(format!(
            "{name:?} is a wildcard: {} cannot prove a wildcard name (only dns-01 can); \
             list the names",
            challenge.name()
        ));
    }
    match rustls::pki_types::DnsName::try_from(name) {
        Ok(_) if name.ends_with('.') => Err(format!("{name:?} ends with a dot")),
        Ok(_) => Ok(()),
        Err(_) => Err(format!("{name:?} is not a DNS name")),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use crate::config::{Config, Overrides};

    use super::*;

    fn parse(acme: &str, redirect: bool) -> Result<Config, ConfigError> {
        let listen = if redirect {
            "[listen]\nredirect = \"127.0.0.1:0\"\n"
        } else {
            ""
        };
        let text = format!(
            "{listen}[[certificates]]\npem = \"site.pem\"\n[[backends]]\naddr = \"127.0.0.1:1\"\n\
             [acme]\n{acme}"
        );
        let dir = std::env::temp_dir();
        Config::parse(&text, "lb.toml", &dir, &Overrides::default())
    }

    fn storage() -> (tempfile::TempDir, String) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("acme");
        (tmp, format!("storage = \"{}\"\n", dir.display()))
    }

    #[test]
    fn a_minimal_section_gets_its_defaults() {
        let (_tmp, storage) = storage();
        let c = parse(
            &format!(
                "directory = \"https://ca.test/dir\"\ndomains = [[\"a.test\", \"B.test\"]]\n{storage}"
            ),
            false,
        )
        .unwrap();
        let a = c.acme.unwrap();
        assert_eq!(a.challenge, AcmeChallenge::TlsAlpn01);
        assert_eq!(
            a.domains,
            vec![vec!["a.test".to_owned(), "B.test".to_owned()]]
        );
        assert_eq!(a.renew_before, None);
        assert!(a.contact.is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let (_tmp, storage) = storage();
        let base = format!("directory = \"https://ca.test/dir\"\n{storage}");
        let cases: &[(&str, bool, &str)] = &[
            (
                "domains = [[\"a.test\"]]\nchallenge = \"http-01\"\n",
                false,
                "acme.challenge: http-01 is answered on the redirect listener",
            ),
            (
                "domains = [[\"a.test\"], [\"A.test\"]]\n",
                false,
                "acme.domains[1][0]: \"A.test\" is already acme.domains[0][0]",
            ),
            ("domains = []\n", false, "acme.domains: at least one"),
            ("domains = [[]]\n", false, "acme.domains[0]: lists no name"),
            ("domains = [[\"a.test.\"]]\n", false, "ends with a dot"),
            (
                "domains = [[\"*.a.test\"]]\n",
                false,
                "acme.domains[0][0]: \"*.a.test\" is a wildcard: tls-alpn-01 cannot prove",
            ),
            (
                "domains = [[\"a.test\"]]\ncontact = [\"ops@a.test\"]\n",
                false,
                "acme.contact[0]: \"ops@a.test\" is not a mailto: URL",
            ),
            (
                "domains = [[\"a.test\"]]\nrenew_before = \"soon\"\n",
                false,
                "acme.renew_before: \"soon\" is not a duration",
            ),
            (
                "domains = [[\"a.test\"]]\nca_file = \"/nonexistent/ca.pem\"\n",
                false,
                "acme.ca_file: /nonexistent/ca.pem",
            ),
            (
                "domains = [[\"a.test\"]]\nstorage2 = \"x\"\n",
                false,
                "unknown field `storage2`",
            ),
        ];
        for (extra, redirect, expected) in cases {
            let e = parse(&format!("{base}{extra}"), *redirect)
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{extra:?}: got {e:?}");
            assert!(e.starts_with("lb.toml: "), "{e}");
        }
        let e = parse("domains = [[\"a.test\"]]\nstorage = \"/tmp\"\n", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("acme.directory: missing"), "{e}");
        let e = parse(
            &format!("directory = \"http://ca.test/dir\"\ndomains = [[\"a.test\"]]\n{storage}"),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("acme.directory: \"http://ca.test/dir\" is not an https:// URL"),
            "{e}"
        );
    }

    #[test]
    fn storage_must_be_private_and_writable() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("acme");
        assert!(
            check_storage(&dir).is_ok(),
            "a missing directory under a writable parent"
        );
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        let e = check_storage(&dir).unwrap_err();
        assert!(e.contains("has mode 750"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(check_storage(&dir).is_ok());
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(
            check_storage(&file)
                .unwrap_err()
                .contains("is not a directory")
        );
        let e = check_storage(&file.join("acme")).unwrap_err();
        assert!(e.contains("is not a directory"), "{e}");
    }
}
