//! sandboxd's socket: bound by the driver on the host, listened on by sandboxd.
//!
//! The socket's path is `{run_dir}/{id}/sock`, in a directory no process of any
//! sandbox can reach: nothing under a sandbox's directory is mounted into it.
//! The driver binds it before the clone and hands the descriptor to sandboxd,
//! which only calls `listen`. So the dataplane never resolves a path a sandbox
//! can write, and every connection can be checked: the peer credentials of a
//! connected Unix socket are those of the process that called `listen`, which
//! must be the sandbox's PID 1.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The longest path `sun_path` holds with its terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// A Unix stream socket bound to `path` (not yet listening), close-on-exec.
pub(crate) fn bind(path: &Path) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just created and own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    with_address(path, |addr, len| {
        // SAFETY: `addr` points to a sockaddr_un of `len` bytes.
        match unsafe { libc::bind(socket.as_raw_fd(), addr, len) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    })?;
    Ok(socket)
}

/// Connects to the socket at `path` without blocking the runtime for long: a
/// connect to a Unix socket never waits for the peer (a full backlog is
/// `EAGAIN`, which tokio's connect then waits out).
pub(crate) async fn connect(path: &Path) -> io::Result<tokio::net::UnixStream> {
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return tokio::net::UnixStream::connect(path).await;
    }
    // A run dir deep enough to make the path too long for `sun_path`: name it
    // through a descriptor of its directory instead.
    let (dir, name) = split(path)?;
    let dir = std::fs::File::open(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    let stream = tokio::net::UnixStream::connect(&short).await;
    drop(dir);
    stream
}

/// The pid (in our pid namespace) of the process on the other end: for a
/// socket the driver bound, the process that called `listen`.
pub(crate) fn peer_pid(socket: RawFd) -> io::Result<i32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes one ucred into `cred`, whose size `len` gives.
    let ret = unsafe {
        libc::getsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid)
}

fn split(path: &Path) -> io::Result<(&Path, &std::ffi::OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => Ok((dir, name)),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path has no file name")),
    }
}

/// Calls `f` with a `sockaddr_un` for `path`, going through a descriptor of its
/// directory (`/proc/self/fd/N/name`) when the path is too long for `sun_path`.
fn with_address(
    path: &Path,
    f: impl FnOnce(*const libc::sockaddr, libc::socklen_t) -> io::Result<()>,
) -> io::Result<()> {
    let mut dir_fd = None;
    let bytes: Vec<u8> = if path.as_os_str().len() <= SUN_PATH_MAX {
        path.as_os_str().as_bytes().to_vec()
    } else {
        let (dir, name) = split(path)?;
        let dir = std::fs::File::open(dir)?;
        let short = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        dir_fd = Some(dir);
        [short.as_slice(), name.as_bytes()].concat()
    };
    let c_path = CString::new(bytes)?;
    let raw = c_path.as_bytes_with_nul();
    // SAFETY: sockaddr_un is plain old data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if raw.len() > addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path is too long"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(raw) {
        *dst = *src as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + raw.len()) as libc::socklen_t;
    let result = f((&addr as *const libc::sockaddr_un).cast(), len);
    drop(dir_fd);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_peer_is_the_process_that_listens_and_long_paths_work() {
        let dir = tempfile::tempdir().unwrap();
        // Deep enough to overflow sun_path.
        let deep = dir.path().join("a".repeat(60)).join("b".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("sock");
        assert!(path.as_os_str().len() > SUN_PATH_MAX);
        let socket = bind(&path).unwrap();
        // Bound but not listening: nobody is there yet.
        assert!(connect(&path).await.is_err());
        // SAFETY: listen on a socket we own.
        assert_eq!(unsafe { libc::listen(socket.as_raw_fd(), 8) }, 0);
        let stream = connect(&path).await.unwrap();
        assert_eq!(peer_pid(stream.as_raw_fd()).unwrap(), std::process::id() as i32);
    }
}
