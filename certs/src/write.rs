//! Storing a generated [`Bundle`] in a directory.
//!
//! The directory is created if missing. Files holding a private key (`ca.key`, `server.key`,
//! `server.pem`) are created with mode 0600 and are never replaced unless the caller allows it;
//! certificates are mode 0644. Each file is written to a temporary name and renamed into place,
//! so a reader never sees half a key.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{Bundle, CertError};

/// The file names a bundle is written under.
#[derive(Debug, Clone, Copy)]
pub struct FileNames;

impl FileNames {
    /// The CA certificate, to be trusted by clients.
    pub const CA_CERT: &'static str = "ca.crt";
    /// The CA private key.
    pub const CA_KEY: &'static str = "ca.key";
    /// The server certificate.
    pub const SERVER_CERT: &'static str = "server.crt";
    /// The server private key.
    pub const SERVER_KEY: &'static str = "server.key";
    /// Server certificate and key in one file (HAProxy `crt` format).
    pub const COMBINED: &'static str = "server.pem";
}

/// Where each file of a bundle was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// `ca.crt`.
    pub ca_cert: PathBuf,
    /// `ca.key`.
    pub ca_key: PathBuf,
    /// `server.crt`.
    pub server_cert: PathBuf,
    /// `server.key`.
    pub server_key: PathBuf,
    /// `server.pem`.
    pub combined: PathBuf,
}

/// Mode of files that hold a private key.
const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
const CERT_MODE: u32 = 0o644;

impl Bundle {
    /// Writes the bundle into `dir`. Existing key files make this fail with
    /// [`CertError::WouldOverwrite`] unless `force` is set.
    pub fn write_to(&self, dir: &Path, force: bool) -> Result<Written, CertError> {
        let written = Written {
            ca_cert: dir.join(FileNames::CA_CERT),
            ca_key: dir.join(FileNames::CA_KEY),
            server_cert: dir.join(FileNames::SERVER_CERT),
            server_key: dir.join(FileNames::SERVER_KEY),
            combined: dir.join(FileNames::COMBINED),
        };
        if !force {
            let existing: Vec<PathBuf> = [&written.ca_key, &written.server_key, &written.combined]
                .into_iter()
                .filter(|p| p.exists())
                .cloned()
                .collect();
            if !existing.is_empty() {
                return Err(CertError::WouldOverwrite { paths: existing });
            }
        }
        fs::create_dir_all(dir).map_err(|source| CertError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        write_file(&written.ca_key, &self.ca_key_pem, KEY_MODE)?;
        write_file(&written.server_key, &self.server_key_pem, KEY_MODE)?;
        write_file(&written.combined, &self.combined_pem(), KEY_MODE)?;
        write_file(&written.ca_cert, &self.ca_cert_pem, CERT_MODE)?;
        write_file(&written.server_cert, &self.server_cert_pem, CERT_MODE)?;
        Ok(written)
    }
}

/// Writes `contents` to a temporary file created with `mode`, then renames it to `path`.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    // The creation mode is masked by the umask; the mode is then set as it is meant to be.
    let result = file
        .set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents.as_bytes()))
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate, load_ca, load_combined, load_pair};

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_every_file_with_key_files_private_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = generate(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let w = bundle.write_to(&dir.path().join("nested"), false).unwrap();
        for key in [&w.ca_key, &w.server_key, &w.combined] {
            assert_eq!(mode(key), 0o600, "{}", key.display());
        }
        for cert in [&w.ca_cert, &w.server_cert] {
            assert_eq!(mode(cert), 0o644, "{}", cert.display());
        }
        let pair = load_pair(&w.server_cert, &w.server_key).unwrap();
        let combined = load_combined(&w.combined).unwrap();
        assert_eq!(pair.certs, combined.certs);
        assert_eq!(load_ca(&w.ca_cert).unwrap(), bundle.ca_der().unwrap());
        let provider = rustls::crypto::ring::default_provider();
        combined.certified_key(&provider).unwrap();
    }

    #[test]
    fn refuses_to_overwrite_keys_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let first = generate(&["localhost".into()]).unwrap();
        let w = first.write_to(dir.path(), false).unwrap();
        let second = generate(&["localhost".into()]).unwrap();
        let err = second.write_to(dir.path(), false).unwrap_err();
        assert!(matches!(err, CertError::WouldOverwrite { ref paths } if paths.len() == 3));
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(
            fs::read_to_string(&w.server_key).unwrap(),
            first.server_key_pem
        );
        second.write_to(dir.path(), true).unwrap();
        assert_eq!(
            fs::read_to_string(&w.server_key).unwrap(),
            second.server_key_pem
        );
        assert_eq!(mode(&w.server_key), 0o600);
    }
}
