//! The `[acme.peer]` section: ACME on the keepalived pair of lb hosts, checked key by key.
//!
//! `RawAcmePeer` → [`AcmePeerConfig`]: `listen` (this host's peer listener, on its own address)
//! and `address` (the other host's) are `ip:port` addresses that differ from each other and
//! from lb's listeners; `virtual_address` is the IP keepalived moves between the two (the
//! host holding it is the one that orders); `secret_file` holds the secret both hosts share.
//! [`read_secret`] is the one rule `lb check` and the peer channel at start apply to that
//! file: a regular file that group and others cannot read, at least [`MIN_SECRET_BYTES`] long.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::ConfigError;
use super::raw::RawAcmePeer;
use super::validate::Validator;

/// The shortest shared secret accepted: 256 bits, the size of the key derived from it.
pub const MIN_SECRET_BYTES: usize = 32;

/// `[acme.peer]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmePeerConfig {
    /// Where this host's peer listener binds (its own address, not the virtual one).
    pub listen: SocketAddr,
    /// The other host's peer listener.
    pub address: SocketAddr,
    /// The file holding the secret both hosts share (owner-only).
    pub secret_file: PathBuf,
    /// The address keepalived moves between the two hosts; its holder orders.
    pub virtual_address: IpAddr,
}

/// The shared secret in `path`, without a trailing newline, if the file is a regular file
/// that only its owner may read and holds at least [`MIN_SECRET_BYTES`] bytes.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{shown} has mode {mode:03o}; the secret must be readable by its owner only \
             (chmod 600 {shown})"
        ));
    }
    let mut secret = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "{shown} holds {} bytes; the secret needs at least {MIN_SECRET_BYTES} \
             (e.g. `head -c 32 /dev/urandom | base64 > {shown}`)",
            secret.len()
        ));
    }
    Ok(secret)
}

impl Validator<'_> {
    /// `[acme.peer]`; `bound` are lb's other listeners (key, address).
    pub(super) fn acme_peer(
        &self,
        p: RawAcmePeer,
        base: &Path,
        bound: &[(&str, SocketAddr)],
    ) -> Result<AcmePeerConfig, ConfigError> {
        let required = |key: &str, value: Option<String>, example: &str| {
            value.ok_or_else(|| self.err(key, format!("missing: {example}")))
        };
        let listen = required(
            "acme.peer.listen",
            p.listen,
            "this host's peer listener on its own address, e.g. \"10.0.0.10:9443\"",
        )?;
        let listen = self.addr("acme.peer.listen", &listen)?;
        if let Some((key, _)) = bound.iter().find(|(_, a)| *a == listen) {
            return Err(self.err("acme.peer.listen", format!("{listen} is already {key}")));
        }
        let address = required(
            "acme.peer.address",
            p.address,
            "the other lb host's acme.peer.listen, e.g. \"10.0.0.11:9443\"",
        )?;
        let address = self.addr("acme.peer.address", &address)?;
        if address.port() == 0 {
            return Err(self.err("acme.peer.address", "port 0 is not where a peer listens"));
        }
        if address == listen {
            return Err(self.err(
                "acme.peer.address",
                format!("{address} is this host's own acme.peer.listen; name the other host's"),
            ));
        }
        let virtual_address = required(
            "acme.peer.virtual_address",
            p.virtual_address,
            "the address keepalived moves between the two hosts, e.g. \"10.0.0.100\"",
        )?;
        let virtual_address: IpAddr = virtual_address.parse().map_err(|_| {
            self.err(
                "acme.peer.virtual_address",
                format!("{virtual_address:?} is not an IP address (example: \"10.0.0.100\")"),
            )
        })?;
        if virtual_address.is_unspecified() {
            return Err(self.err(
                "acme.peer.virtual_address",
                format!("{virtual_address} is not an address a host can hold"),
            ));
        }
        let secret_file = base.join(p.secret_file.ok_or_else(|| {
            self.err(
                "acme.peer.secret_file",
                "missing: a file with the secret both hosts share, mode 0600, e.g. \
                 \"/etc/scaleout/acme-peer.secret\"",
            )
        })?);
        read_secret(&secret_file).map_err(|reason| self.err("acme.peer.secret_file", reason))?;
        Ok(AcmePeerConfig {
            listen,
            address,
            secret_file,
            virtual_address,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use crate::config::{Config, ConfigError, Overrides};

    use super::*;

    /// A config with `[acme.peer]` lines `peer`, relative paths from `dir`.
    fn parse(dir: &Path, peer: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[listen]\nredirect = \"127.0.0.1:8080\"\nadmin = \"127.0.0.1:9100\"\n\
             [[certificates]]\npem = \"site.pem\"\n[[backends]]\naddr = \"127.0.0.1:1\"\n\
             [acme]\ndirectory = \"https://ca.test/dir\"\ndomains = [[\"a.test\"]]\n\
             storage = \"acme\"\nchallenge = \"http-01\"\n[acme.peer]\n{peer}"
        );
        Config::parse(&text, "lb.toml", dir, &Overrides::default())
    }

    fn secret(dir: &Path, bytes: &[u8], mode: u32) -> PathBuf {
        let path = dir.join("peer.secret");
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    const GOOD: &str = "listen = \"10.0.0.10:9443\"\naddress = \"10.0.0.11:9443\"\n\
                        virtual_address = \"10.0.0.100\"\nsecret_file = \"peer.secret\"\n";

    #[test]
    fn a_good_section_is_typed() {
        let tmp = tempfile::tempdir().unwrap();
        secret(tmp.path(), &[b'k'; 32], 0o600);
        let c = parse(tmp.path(), GOOD).unwrap();
        let p = c.acme.unwrap().peer.unwrap();
        assert_eq!(p.listen, "10.0.0.10:9443".parse().unwrap());
        assert_eq!(p.address, "10.0.0.11:9443".parse().unwrap());
        assert_eq!(p.virtual_address, "10.0.0.100".parse::<IpAddr>().unwrap());
        assert_eq!(p.secret_file, tmp.path().join("peer.secret"));
    }

    #[test]
    fn errors_name_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        secret(tmp.path(), &[b'k'; 32], 0o600);
        let cases: &[(&str, &str, &str)] = &[
            (
                "listen = \"10.0.0.10:9443\"\n",
                "",
                "acme.peer.listen: missing",
            ),
            (
                "listen = \"10.0.0.10:9443\"\n",
                "listen = \"peer1:9443\"\n",
                "acme.peer.listen: \"peer1:9443\" is not an IP:port address",
            ),
            (
                "listen = \"10.0.0.10:9443\"\n",
                "listen = \"127.0.0.1:9100\"\n",
                "acme.peer.listen: 127.0.0.1:9100 is already listen.admin",
            ),
            (
                "address = \"10.0.0.11:9443\"\n",
                "address = \"10.0.0.10:9443\"\n",
                "acme.peer.address: 10.0.0.10:9443 is this host's own acme.peer.listen",
            ),
            (
                "address = \"10.0.0.11:9443\"\n",
                "address = \"10.0.0.11:0\"\n",
                "acme.peer.address: port 0",
            ),
            (
                "virtual_address = \"10.0.0.100\"\n",
                "virtual_address = \"vip\"\n",
                "acme.peer.virtual_address: \"vip\" is not an IP address",
            ),
            (
                "virtual_address = \"10.0.0.100\"\n",
                "virtual_address = \"0.0.0.0\"\n",
                "acme.peer.virtual_address: 0.0.0.0 is not an address a host can hold",
            ),
            (
                "secret_file = \"peer.secret\"\n",
                "secret_file = \"nothere\"\n",
                "acme.peer.secret_file: ",
            ),
            (
                "secret_file = \"peer.secret\"\n",
                "",
                "acme.peer.secret_file: missing",
            ),
            ("listen", "lsten", "unknown field `lsten`"),
        ];
        for (from, to, expected) in cases {
            let e = parse(tmp.path(), &GOOD.replacen(from, to, 1))
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{to:?}: got {e:?}");
        }
    }

    #[test]
    fn the_secret_must_be_private_and_long_enough() {
        let tmp = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o644] {
            let path = secret(tmp.path(), &[b'k'; 32], mode);
            let e = read_secret(&path).unwrap_err();
            assert!(e.contains(&format!("has mode {mode:03o}")), "{e}");
            let e = parse(tmp.path(), GOOD).unwrap_err().to_string();
            assert!(
                e.starts_with("lb.toml: acme.peer.secret_file: ") && e.contains("chmod 600"),
                "{e}"
            );
        }
        let path = secret(tmp.path(), &[b'k'; 31], 0o600);
        assert!(read_secret(&path).unwrap_err().contains("holds 31 bytes"));
        let path = secret(
            tmp.path(),
            format!("{}\n", "k".repeat(32)).as_bytes(),
            0o400,
        );
        assert_eq!(read_secret(&path).unwrap(), vec![b'k'; 32]);
        assert!(
            read_secret(tmp.path())
                .unwrap_err()
                .contains("is not a file")
        );
    }
}
