//! The ACME storage directory: the account's credentials and each certificate with its key.
//!
//! Layout: `account.json` (the CA's directory URL and the account's credentials, private key
//! included) and `NAME.pem` per certificate (the chain, leaf first, then its private key:
//! the combined form `certs::load_combined` reads), NAME being the certificate's first domain.
//! The directory is created 0700 and every file written 0600, through a temporary file renamed
//! into place, so a crash never leaves half a key; [`Storage::open`] refuses a directory or a
//! file that group or others may read, since every file holds a private key.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use instant_acme::AccountCredentials;
use serde::{Deserialize, Serialize};

use crate::config::check_storage;

/// Name of the account file.
const ACCOUNT_FILE: &str = "account.json";

/// Why the storage directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The directory is unusable (missing parent, not writable, too open).
    #[error("{0}")]
    Directory(String),
    /// A file in it may be read by group or others.
    #[error(
        "{path} has mode {mode:03o}; it holds a private key and must be 0600 (chmod 600 {path})"
    )]
    LooseFile {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The account file is not what lb writes.
    #[error("{path}: not an account file lb wrote: {source}")]
    Account {
        /// The file.
        path: String,
        /// The parser's complaint.
        source: serde_json::Error,
    },
}

/// What `account.json` holds.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    /// The directory the account was created at: another CA needs another account.
    directory: String,
    credentials: AccountCredentials,
}

/// An opened, checked storage directory.
#[derive(Debug, Clone)]
pub struct Storage {
    dir: PathBuf,
}

impl Storage {
    /// Creates `dir` (0700) if missing and checks it and every file in it (see the module
    /// docs).
    pub fn open(dir: &Path) -> Result<Storage, StorageError> {
        if !dir.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| io(dir, source))?;
        }
        check_storage(dir).map_err(StorageError::Directory)?;
        for entry in fs::read_dir(dir).map_err(|source| io(dir, source))? {
            let entry = entry.map_err(|source| io(dir, source))?;
            let meta = entry
                .metadata()
                .map_err(|source| io(&entry.path(), source))?;
            let mode = meta.permissions().mode() & 0o777;
            if meta.is_file() && mode & 0o077 != 0 {
                return Err(StorageError::LooseFile {
                    path: entry.path().display().to_string(),
                    mode,
                });
            }
        }
        Ok(Storage {
            dir: dir.to_owned(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stored account for `directory`, if there is one (an account of another CA is
    /// ignored).
    pub fn account(&self, directory: &str) -> Result<Option<AccountCredentials>, StorageError> {
        let path = self.dir.join(ACCOUNT_FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io(&path, source)),
        };
        let stored: StoredAccount =
            serde_json::from_slice(&text).map_err(|source| StorageError::Account {
                path: path.display().to_string(),
                source,
            })?;
        Ok((stored.directory == directory).then_some(stored.credentials))
    }

    /// Stores the account created at `directory`.
    pub fn save_account(
        &self,
        directory: &str,
        credentials: AccountCredentials,
    ) -> Result<(), StorageError> {
        let stored = StoredAccount {
            directory: directory.to_owned(),
            credentials,
        };
        let path = self.dir.join(ACCOUNT_FILE);
        let text = serde_json::to_vec_pretty(&stored).map_err(|source| StorageError::Account {
            path: path.display().to_string(),
            source,
        })?;
        self.write(ACCOUNT_FILE, &text)
    }

    /// The file of the certificate whose first name is `name`.
    pub fn certificate_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{}.pem", name.to_ascii_lowercase()))
    }

    /// Stores a certificate (chain then key, PEM) under its first name.
    pub fn save_certificate(&self, name: &str, pem: &str) -> Result<(), StorageError> {
        self.write(
            &format!("{}.pem", name.to_ascii_lowercase()),
            pem.as_bytes(),
        )
    }

    /// Writes `file` (0600) through a temporary file renamed over it.
    fn write(&self, file: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let path = self.dir.join(file);
        let tmp = self.dir.join(format!(".{file}.tmp"));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        result.map_err(|source| {
            let _ = fs::remove_file(&tmp);
            io(&path, source)
        })
    }
}

fn io(path: &Path, source: std::io::Error) -> StorageError {
    StorageError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_0700_and_writes_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("acme");
        let s = Storage::open(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        s.save_certificate("Chat.Example.test", "pem").unwrap();
        let path = s.certificate_path("chat.example.test");
        assert_eq!(fs::read_to_string(&path).unwrap(), "pem");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(Storage::open(&dir).is_ok());
    }

    #[test]
    fn refuses_loose_directory_and_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("acme");
        let s = Storage::open(&dir).unwrap();
        s.save_certificate("a.test", "pem").unwrap();
        fs::set_permissions(
            s.certificate_path("a.test"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = Storage::open(&dir).unwrap_err().to_string();
        assert!(e.contains("a.test.pem has mode 644"), "{e}");
        fs::set_permissions(
            s.certificate_path("a.test"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let e = Storage::open(&dir).unwrap_err().to_string();
        assert!(e.contains("has mode 755"), "{e}");
    }

    #[test]
    fn an_account_of_another_directory_is_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Storage::open(tmp.path()).unwrap_or_else(|_| {
            fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
            Storage::open(tmp.path()).unwrap()
        });
        assert!(s.account("https://ca.test/dir").unwrap().is_none());
        fs::write(s.dir().join(ACCOUNT_FILE), b"{").unwrap();
        assert!(s.account("https://ca.test/dir").is_err());
    }
}
