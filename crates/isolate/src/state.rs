//! On-disk record of a running sandbox, enough for another process to adopt it.

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cgroup::SandboxCgroup;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parse {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// `{run_dir}/{id}/state.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub id: String,
    /// Host pid of the sandbox's PID 1.
    pub pid: i32,
    /// Its start time (field 22 of /proc/PID/stat), so a reused pid is not mistaken
    /// for the sandbox.
    pub start_time: u64,
    pub cgroup: SandboxCgroup,
    /// Address on the host bridge, if the sandbox has egress internet.
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
    /// sandboxd's socket, bound by the driver in the sandbox's directory.
    /// Absent in records of earlier versions, whose sandboxd bound
    /// `sandboxd/sandboxd.sock` itself, in a directory the sandbox could write;
    /// connections there are trusted only after the peer check (see `socket.rs`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// The name of the `host` image directory the sandbox was created from, so
    /// that it is kept while the sandbox runs; `None` for OCI images and records
    /// of earlier versions.
    #[serde(default)]
    pub host_image: Option<String>,
}

impl StateFile {
    /// Writes the record. It is written once, before the child is released, so a torn
    /// file (a crash mid-write) can only belong to a child that exits by itself when
    /// its sync pipe closes; adopt and sweep treat an unreadable record as dead. Hence
    /// no temp file and rename.
    pub fn write(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join("state.json");
        let bytes = serde_json::to_vec(self)
            .map_err(|source| StateError::Parse { path: path.clone(), source })?;
        fs::write(&path, bytes).map_err(|source| StateError::Write { path, source })
    }

    pub fn read(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join("state.json");
        let bytes =
            fs::read(&path).map_err(|source| StateError::Read { path: path.clone(), source })?;
        serde_json::from_slice(&bytes).map_err(|source| StateError::Parse { path, source })
    }

    /// A pidfd for the recorded PID 1 if that very process is still alive. The start
    /// time is checked again after opening, closing the window in which the pid could
    /// have been reused between the check and the open.
    pub fn open_if_alive(&self) -> Option<OwnedFd> {
        if self.pid <= 0 || proc_start_time(self.pid)? != self.start_time {
            return None;
        }
        // SAFETY: pidfd_open has no memory-safety preconditions.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the kernel returned a new descriptor that we now own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        (proc_start_time(self.pid)? == self.start_time).then_some(pidfd)
    }
}

/// Start time of a process in clock ticks since boot, from /proc/PID/stat.
pub(crate) fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the
    // last ')'. Field 3 (state) is the first after it, so field 22 is the 20th.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // A zombie has exited; it is not a live sandbox.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_stable_and_a_dead_pid_has_none() {
        let me = std::process::id() as i32;
        let first = proc_start_time(me).unwrap();
        assert_eq!(proc_start_time(me), Some(first));
        assert_eq!(proc_start_time(i32::MAX), None);
    }

    #[test]
    fn state_round_trips_and_a_stale_start_time_is_not_alive() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        let state = StateFile {
            id: "abc".into(),
            pid: me,
            start_time: proc_start_time(me).unwrap(),
            cgroup: SandboxCgroup::V2 { dir: "/nonexistent".into() },
            address: None,
            socket: Some("/nonexistent/sock".into()),
            host_image: None,
        };
        state.write(dir.path()).unwrap();
        let read = StateFile::read(dir.path()).unwrap();
        assert_eq!(read, state);
        assert!(read.open_if_alive().is_some());
        let stale = StateFile { start_time: state.start_time + 1, ..state };
        assert!(stale.open_if_alive().is_none());
    }
}
