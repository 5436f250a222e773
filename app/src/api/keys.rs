//! The server API's keys: read from `api_keys_file` (one key per line; blank lines and `#`
//! comments ignored), replaced whole on SIGHUP (a file that cannot be read, or lists no key,
//! leaves the old keys in force), and checked in constant time.
//!
//! Only the SHA-256 digests of the keys are kept; a presented key is hashed and compared with
//! every digest, each comparison touching every byte and none stopping early, so neither the
//! position of a difference nor which key matched shows in the time taken.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ring::digest::{SHA256, digest};

/// Why the keys file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// It could not be read.
    #[error("could not read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It lists no key.
    #[error("{path} lists no API key (one per line)")]
    Empty {
        /// The file.
        path: String,
    },
}

/// The keys in force; cheap to clone, swapped whole on reload.
#[derive(Clone)]
pub struct ApiKeys {
    path: PathBuf,
    digests: Arc<ArcSwap<Vec<[u8; 32]>>>,
}

impl ApiKeys {
    /// Reads the keys of `path`.
    pub fn load(path: &Path) -> Result<ApiKeys, KeysError> {
        let digests = read(path)?;
        Ok(ApiKeys {
            path: path.to_owned(),
            digests: Arc::new(ArcSwap::from_pointee(digests)),
        })
    }

    /// Reads the file again; on success the new keys replace the old ones, on failure the old
    /// ones stay. Returns how many keys are in force.
    pub fn reload(&self) -> Result<usize, KeysError> {
        let digests = read(&self.path)?;
        let count = digests.len();
        self.digests.store(Arc::new(digests));
        Ok(count)
    }

    /// Whether `presented` is one of the keys.
    pub fn accepts(&self, presented: &str) -> bool {
        let presented = sha256(presented);
        let mut matched = false;
        for key in self.digests.load().iter() {
            let difference = key
                .iter()
                .zip(presented.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            matched |= difference == 0;
        }
        matched
    }
}

fn read(path: &Path) -> Result<Vec<[u8; 32]>, KeysError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let digests: Vec<[u8; 32]> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(sha256)
        .collect();
    if digests.is_empty() {
        return Err(KeysError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(digests)
}

fn sha256(text: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, text.as_bytes()).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_keys_rotate_on_reload_and_a_bad_file_keeps_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# operators\nold-key\n\n  second-key  \n").unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        assert!(keys.accepts("old-key"));
        assert!(keys.accepts("second-key"));
        assert!(!keys.accepts("# operators"));
        assert!(!keys.accepts(""));
        assert!(!keys.accepts("old-ke"));
        std::fs::write(&path, "new-key\n").unwrap();
        assert_eq!(keys.reload().unwrap(), 1);
        assert!(keys.accepts("new-key"));
        assert!(!keys.accepts("old-key"));
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(matches!(keys.reload(), Err(KeysError::Empty { .. })));
        assert!(keys.accepts("new-key"), "the old keys stay in force");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(keys.reload(), Err(KeysError::Read { .. })));
        assert!(matches!(ApiKeys::load(&path), Err(KeysError::Read { .. })));
    }
}
