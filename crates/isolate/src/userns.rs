//! The host side of a sandbox's user namespace: its id maps and the idmapped mounts
//! of its image layers. This is the kernel seam for both; the child's side is the
//! early wait in `spawn.rs`.
//!
//! Sandbox uids and gids `0..size` are host ids `base..base + size`. Image layers and
//! the skeleton are owned by host root, which is unmapped in the sandbox (it would
//! show as `nobody`, and root inside could not write through the overlay into the
//! image's directories). So each lower dir is cloned as a detached mount
//! (`open_tree`), idmapped to the sandbox's user namespace (`mount_setattr`), and
//! moved into the sandbox's mount namespace (`move_mount`) at a mount point under
//! the sandbox's directory, all before the child mounts anything. The layer files
//! themselves are never changed: the idmap exists only on those mounts.
//!
//! The mounts are moved in by a short-lived thread that joins the child's mount
//! namespace, rather than handed to the child as descriptors: the child then keeps no
//! descriptor it did not already have, and needs no `recvmsg` before exec.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The host ids that sandboxes with a user namespace run as. The fields are private
/// so that every range went through [`IdRange::new`]: a range holding host root would
/// make root inside root outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    base: u32,
    size: u32,
}

impl IdRange {
    /// The default base, 10^9: far above the ids of real users and system accounts
    /// and above the subordinate ranges Debian's `useradd` hands out from
    /// /etc/subuid (100000 upwards in steps of 65536), so a sandbox's root owns
    /// nothing on the host and is nobody any host service trusts.
    pub const DEFAULT_BASE: u32 = 1_000_000_000;
    /// 65536 ids: the whole 16-bit range images use (root, system users, `nobody`
    /// at 65534).
    pub const DEFAULT_SIZE: u32 = 65536;

    pub fn new(base: u32, size: u32) -> Result<Self, InvalidIdRange> {
        // Host root must never be in the range, and the range must fit below the
        // invalid id (u32::MAX).
        if base == 0 || size == 0 || base.checked_add(size).is_none_or(|end| end == u32::MAX) {
            return Err(InvalidIdRange { base, size });
        }
        Ok(Self { base, size })
    }

    /// Host uid and gid of root in the sandbox.
    pub fn base(&self) -> u32 {
        self.base
    }

    /// How many ids are mapped: sandbox ids `0..size`.
    pub fn size(&self) -> u32 {
        self.size
    }
}

impl Default for IdRange {
    fn default() -> Self {
        Self { base: Self::DEFAULT_BASE, size: Self::DEFAULT_SIZE }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("id range {base}+{size} must start above 0 and end below 2^32 - 1")]
pub struct InvalidIdRange {
    pub base: u32,
    pub size: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SetUpUserNamespaceError {
    #[error("write {path}")]
    WriteMap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("open {path}")]
    OpenNamespace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("clone a mount of {path}")]
    CloneTree {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("idmap the mount of {path}")]
    Idmap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("enter the sandbox's mount namespace")]
    Enter(#[source] io::Error),
    #[error("mount at {path} in the sandbox's mount namespace")]
    Place {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spawn the mounting thread")]
    Thread(#[source] io::Error),
}

/// A mount the parent places in the child's mount namespace before it mounts anything.
#[derive(Debug)]
pub(crate) struct Placement {
    /// The host path cloned.
    pub source: PathBuf,
    /// Where it is mounted in the child's namespace (a host path that stays an empty
    /// directory or file on the host).
    pub target: PathBuf,
    /// Idmapped to the sandbox's user namespace (image layers), or kept with host ids.
    pub idmap: bool,
}

/// Writes the child's id maps, then places `placements`. Only then may the child go
/// on: before, it is nobody in its own namespace.
pub(crate) fn set_up(
    pid: i32,
    pidfd: &OwnedFd,
    ids: IdRange,
    placements: &[Placement],
) -> Result<(), SetUpUserNamespaceError> {
    // One write each, as the kernel requires. As root of the parent namespace we may
    // map a range and need not deny setgroups, so sandboxd can still drop to an image's
    // user with its supplementary groups.
    let map = format!("0 {} {}\n", ids.base, ids.size);
    for name in ["uid_map", "gid_map"] {
        let path = PathBuf::from(format!("/proc/{pid}/{name}"));
        fs::write(&path, &map)
            .map_err(|source| SetUpUserNamespaceError::WriteMap { path, source })?;
    }
    if placements.is_empty() {
        return Ok(());
    }
    let path = PathBuf::from(format!("/proc/{pid}/ns/user"));
    let userns: OwnedFd = fs::File::open(&path)
        .map_err(|source| SetUpUserNamespaceError::OpenNamespace { path, source })?
        .into();
    let mut mounts = Vec::with_capacity(placements.len());
    for placement in placements {
        let fd = clone_tree(&placement.source, placement.idmap.then_some(&userns))?;
        mounts.push((fd, placement.target.clone()));
    }
    let pidfd = pidfd.try_clone().map_err(SetUpUserNamespaceError::Enter)?;
    std::thread::Builder::new()
        .name("hutch-userns".into())
        .spawn(move || move_into(&pidfd, &mounts))
        .map_err(SetUpUserNamespaceError::Thread)?
        .join()
        .unwrap_or_else(|_| Err(SetUpUserNamespaceError::Thread(io::Error::other("panicked"))))
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// The kernel's `struct mount_attr`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// A detached, read-only, nosuid, nodev clone of the mount at `path` (not of the
/// mounts beneath it), idmapped to `userns` if given.
fn clone_tree(path: &Path, userns: Option<&OwnedFd>) -> Result<OwnedFd, SetUpUserNamespaceError> {
    let c = c_path(path)
        .map_err(|source| SetUpUserNamespaceError::CloneTree { path: path.to_owned(), source })?;
    // SAFETY: open_tree with a NUL-terminated path; it returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        let source = io::Error::last_os_error();
        return Err(SetUpUserNamespaceError::CloneTree { path: path.to_owned(), source });
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // Read-only: overlayfs never writes to a lower dir, and the sandboxd binary is
    // never written.
    let mut attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    if let Some(userns) = userns {
        attr.attr_set |= MOUNT_ATTR_IDMAP;
        attr.userns_fd = userns.as_raw_fd() as u64;
    }
    // SAFETY: mount_setattr on our detached mount with a valid mount_attr of the size
    // we pass.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret < 0 {
        let source = io::Error::last_os_error();
        return Err(SetUpUserNamespaceError::Idmap { path: path.to_owned(), source });
    }
    Ok(fd)
}

/// On the calling thread (which must be about to exit): joins the mount namespace of
/// the process behind `pidfd` and moves each detached mount onto its target there.
fn move_into(
    pidfd: &OwnedFd,
    mounts: &[(OwnedFd, PathBuf)],
) -> Result<(), SetUpUserNamespaceError> {
    let check = |ret: libc::c_int| if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: unshare(CLONE_FS) detaches this thread's root and cwd from the other
    // threads' (setns into a mount namespace requires it); setns then only changes this
    // thread, which exits when we return.
    unsafe {
        check(libc::unshare(libc::CLONE_FS)).map_err(SetUpUserNamespaceError::Enter)?;
        check(libc::setns(pidfd.as_raw_fd(), libc::CLONE_NEWNS))
            .map_err(SetUpUserNamespaceError::Enter)?;
        // The namespace's mounts are already slaves of the host's (the kernel makes
        // them so when a less privileged user namespace owns the copy), so nothing
        // mounted here reaches the host; making them private says so outright, as the
        // child's own first step does again.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))
        .map_err(SetUpUserNamespaceError::Enter)?;
    }
    for (fd, target) in mounts {
        let place = |source| SetUpUserNamespaceError::Place { path: target.clone(), source };
        let c = c_path(target).map_err(place)?;
        // SAFETY: move_mount of our detached mount onto a NUL-terminated path.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                fd.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                c.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if ret < 0 {
            return Err(place(io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_range_excludes_host_root_and_the_invalid_id() {
        assert_eq!(IdRange::default(), IdRange::new(1_000_000_000, 65536).unwrap());
        assert!(IdRange::new(0, 65536).is_err());
        assert!(IdRange::new(1000, 0).is_err());
        assert!(IdRange::new(u32::MAX - 65536, 65536).is_err());
        assert!(IdRange::new(u32::MAX - 65537, 65536).is_ok());
    }
}
