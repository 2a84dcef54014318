//! API keys and the node token: generation, hashing, and the files the
//! admin key and node token live in.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A new random key: `hk_` and 64 hex characters (244 random bits).
pub fn generate_key() -> String {
    format!("hk_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read or create the secret file {path}")]
pub struct SecretFileError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Reads the secret in `path`, or creates the file (mode 0600) holding a new
/// key if it does not exist.
pub fn read_or_create_secret(path: &Path) -> Result<String, SecretFileError> {
    let wrap = |source| SecretFileError { path: path.to_owned(), source };
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(wrap(error)),
    }
    write_secret(path, &generate_key()).map_err(wrap)?;
    // Read back what is on disk, in case another process won the race.
    std::fs::read_to_string(path).map(|text| text.trim().to_owned()).map_err(wrap)
}

/// Writes `secret` to `path` with mode 0600 (never readable by others, not
/// even for a moment), replacing an empty file.
pub fn write_secret(path: &Path, secret: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_hashes_are_hex() {
        let a = generate_key();
        assert_ne!(a, generate_key());
        assert_eq!(a.len(), 67);
        assert_eq!(sha256_hex(b"abc").len(), 64);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
