//! IP address leases: one file per sandbox id under the state directory, holding
//! the sandbox's address as text.
//!
//! The files are the source of truth across restarts: a new `NetManager` reads
//! them back so a re-adopted sandbox keeps its address and a new one never gets an
//! address that is still in use.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::ipnet::Ipv4Net;

/// Why a lease could not be read, taken or given back.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot create lease directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read lease directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read lease {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lease {path} holds {content:?}, not an address in {subnet}")]
    Corrupt { path: PathBuf, content: String, subnet: Ipv4Net },
    #[error("cannot write lease {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove lease {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no free address left in {subnet}")]
    Exhausted { subnet: Ipv4Net },
}

#[derive(Debug, Default)]
struct Leases {
    by_id: HashMap<String, Ipv4Addr>,
    used: HashSet<Ipv4Addr>,
}

/// The lease table of one state directory. One `LeaseStore` (one `NetManager`)
/// owns a directory at a time.
#[derive(Debug)]
pub(crate) struct LeaseStore {
    dir: PathBuf,
    subnet: Ipv4Net,
    // A std mutex: it is only held for in-memory work and small synchronous
    // file writes, never across an await.
    leases: Mutex<Leases>,
}

impl LeaseStore {
    /// Opens (creating if needed) `dir` and loads every lease in it.
    pub(crate) fn open(dir: &Path, subnet: Ipv4Net) -> Result<Self, LeaseError> {
        fs::create_dir_all(dir)
            .map_err(|source| LeaseError::CreateDir { path: dir.to_owned(), source })?;
        let mut leases = Leases::default();
        let entries = fs::read_dir(dir)
            .map_err(|source| LeaseError::ReadDir { path: dir.to_owned(), source })?;
        for entry in entries {
            let entry =
                entry.map_err(|source| LeaseError::ReadDir { path: dir.to_owned(), source })?;
            let path = entry.path();
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // Temporary files of an interrupted write are not leases; the lease
            // they were meant to become was never handed out.
            if id.starts_with('.') {
                let _ = fs::remove_file(&path);
                continue;
            }
            let content = fs::read_to_string(&path)
                .map_err(|source| LeaseError::Read { path: path.clone(), source })?;
            let address = content
                .trim()
                .parse::<Ipv4Addr>()
                .ok()
                .filter(|address| subnet.contains(*address))
                .ok_or_else(|| LeaseError::Corrupt {
                    path: path.clone(),
                    content: content.clone(),
                    subnet,
                })?;
            leases.used.insert(address);
            leases.by_id.insert(id, address);
        }
        Ok(LeaseStore { dir: dir.to_owned(), subnet, leases: Mutex::new(leases) })
    }

    fn lock(&self) -> MutexGuard<'_, Leases> {
        // The table stays consistent even if a holder panicked: every update is
        // a single insert or remove.
        self.leases.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// The sandbox's address: its existing lease, or the lowest free address,
    /// written to disk before it is returned.
    pub(crate) fn acquire(&self, sandbox_id: &str) -> Result<Ipv4Addr, LeaseError> {
        let mut leases = self.lock();
        if let Some(address) = leases.by_id.get(sandbox_id) {
            return Ok(*address);
        }
        let address = self
            .subnet
            .sandbox_addresses()
            .find(|address| !leases.used.contains(address))
            .ok_or(LeaseError::Exhausted { subnet: self.subnet })?;
        self.write(sandbox_id, address)?;
        leases.used.insert(address);
        leases.by_id.insert(sandbox_id.to_owned(), address);
        Ok(address)
    }

    fn write(&self, sandbox_id: &str, address: Ipv4Addr) -> Result<(), LeaseError> {
        // Write then rename so that a crash never leaves a half-written lease.
        let path = self.dir.join(sandbox_id);
        let tmp = self.dir.join(format!(".{sandbox_id}.tmp"));
        let write_error = |source| LeaseError::Write { path: path.clone(), source };
        fs::write(&tmp, format!("{address}\n")).map_err(write_error)?;
        fs::rename(&tmp, &path).map_err(write_error)
    }

    pub(crate) fn get(&self, sandbox_id: &str) -> Option<Ipv4Addr> {
        self.lock().by_id.get(sandbox_id).copied()
    }

    /// Gives the sandbox's address back; a sandbox without a lease is fine.
    pub(crate) fn release(&self, sandbox_id: &str) -> Result<(), LeaseError> {
        let mut leases = self.lock();
        let path = self.dir.join(sandbox_id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(LeaseError::Remove { path, source }),
        }
        if let Some(address) = leases.by_id.remove(sandbox_id) {
            leases.used.remove(&address);
        }
        Ok(())
    }

    /// Ids that currently hold a lease.
    pub(crate) fn sandbox_ids(&self) -> Vec<String> {
        self.lock().by_id.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> Ipv4Net {
        "10.89.0.0/29".parse().unwrap()
    }

    #[test]
    fn leases_start_after_the_gateway_and_are_stable_per_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = LeaseStore::open(dir.path(), subnet()).unwrap();
        assert_eq!(store.acquire("a").unwrap(), Ipv4Addr::new(10, 89, 0, 2));
        assert_eq!(store.acquire("b").unwrap(), Ipv4Addr::new(10, 89, 0, 3));
        assert_eq!(store.acquire("a").unwrap(), Ipv4Addr::new(10, 89, 0, 2));
        assert_eq!(fs::read_to_string(dir.path().join("a")).unwrap(), "10.89.0.2\n");
    }

    #[test]
    fn released_addresses_are_reused_and_release_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = LeaseStore::open(dir.path(), subnet()).unwrap();
        store.acquire("a").unwrap();
        store.acquire("b").unwrap();
        store.release("a").unwrap();
        store.release("a").unwrap();
        assert!(!dir.path().join("a").exists());
        assert_eq!(store.get("a"), None);
        assert_eq!(store.acquire("c").unwrap(), Ipv4Addr::new(10, 89, 0, 2));
    }

    #[test]
    fn a_full_subnet_is_reported_not_overbooked() {
        let dir = tempfile::tempdir().unwrap();
        let store = LeaseStore::open(dir.path(), subnet()).unwrap();
        for id in ["a", "b", "c", "d", "e"] {
            store.acquire(id).unwrap();
        }
        assert!(matches!(store.acquire("f"), Err(LeaseError::Exhausted { .. })));
    }

    #[test]
    fn leases_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LeaseStore::open(dir.path(), subnet()).unwrap();
            store.acquire("a").unwrap();
            store.acquire("b").unwrap();
            store.release("a").unwrap();
        }
        fs::write(dir.path().join(".c.tmp"), "garbage").unwrap();
        let store = LeaseStore::open(dir.path(), subnet()).unwrap();
        assert_eq!(store.sandbox_ids(), vec!["b".to_owned()]);
        assert_eq!(store.get("b"), Some(Ipv4Addr::new(10, 89, 0, 3)));
        assert_eq!(store.acquire("c").unwrap(), Ipv4Addr::new(10, 89, 0, 2));
        assert!(!dir.path().join(".c.tmp").exists());
    }

    #[test]
    fn a_lease_outside_the_subnet_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x"), "192.0.2.9\n").unwrap();
        match LeaseStore::open(dir.path(), subnet()) {
            Err(LeaseError::Corrupt { path, .. }) => assert_eq!(path, dir.path().join("x")),
            other => panic!("expected a corrupt lease, got {other:?}"),
        }
    }
}
