//! The kernel seam: every fork, signal, wait and terminal ioctl sandboxd
//! makes goes through this module, so the logic above it reads as plain
//! Rust and the unsafe surface is in one place.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use hutch_api::PtySize;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::users::User;

/// Everything needed to start one process, already validated.
#[derive(Debug)]
pub struct SpawnSpec {
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    pub user: Option<User>,
    pub stdin_pipe: bool,
    pub pty: Option<PtySize>,
    /// Written to the process's `oom_score_adj` once it runs (see
    /// `SupervisorConfig::child_oom_score_adj`).
    pub oom_score_adj: Option<i32>,
}

/// The parent's ends of a freshly started process.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// The terminal's master side (read output, write input) when under a PTY.
    pub pty_master: Option<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {command:?}: {source}")]
    Exec {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot allocate a pseudo-terminal: {0}")]
    Pty(#[source] Errno),
}

/// Starts a process in its own process group (so it and its children can
/// be signalled together) or, under a PTY, in its own session with the
/// terminal as its controlling terminal.
///
/// Without a PTY and without an OOM score to set this takes std's `posix_spawn`
/// path (a `vfork`-style clone), which is cheaper than `fork` for a large parent;
/// sandboxd is small enough that the `fork` a `pre_exec` hook needs costs little
/// more (see [`raise_oom_score_before_exec`]).
pub fn spawn(spec: &SpawnSpec) -> Result<Spawned, SpawnError> {
    let mut command = Command::new(&spec.command);
    command.args(&spec.args);
    if let Some(user) = &spec.user {
        // Programs expect these to match the user they run as; explicit
        // request variables, applied next, still win.
        if let Some(home) = &user.home {
            command.env("HOME", home);
        }
        if let Some(name) = &user.name {
            command.env("USER", name).env("LOGNAME", name);
        }
        // With an OOM score to set, the hook switches users itself, after
        // writing the score (see raise_oom_score_before_exec).
        if spec.oom_score_adj.is_none() {
            command.uid(user.uid).gid(user.gid);
        }
    }
    if spec.pty.is_some() && !spec.env.contains_key("TERM") {
        command.env("TERM", "xterm-256color");
    }
    command.envs(spec.env.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))));
    if let Some(dir) = &spec.working_dir {
        command.current_dir(dir);
    }
    let exec_error = |source| SpawnError::Exec { command: spec.command.clone(), source };
    if let Some(adj) = spec.oom_score_adj {
        let ids = spec.user.as_ref().map(|user| (user.uid, user.gid));
        raise_oom_score_before_exec(&mut command, adj, ids);
    }

    if let Some(size) = spec.pty {
        let pty = nix::pty::openpty(Some(&winsize(size.rows, size.cols)), None)
            .map_err(SpawnError::Pty)?;
        set_cloexec(pty.master.as_raw_fd()).map_err(SpawnError::Pty)?;
        set_cloexec(pty.slave.as_raw_fd()).map_err(SpawnError::Pty)?;
        let slave = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(exec_error);
        command.stdin(slave(&pty.slave)?).stdout(slave(&pty.slave)?).stderr(slave(&pty.slave)?);
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only async-signal-safe functions (setsid, ioctl).
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(exec_error)?;
        return Ok(Spawned {
            pid: child.id(),
            stdin: None,
            stdout: None,
            stderr: None,
            pty_master: Some(pty.master),
        });
    }

    command.process_group(0);
    command.stdin(if spec.stdin_pipe { Stdio::piped() } else { Stdio::null() });
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().map_err(exec_error)?;
    // std's `Child` is only a bag of fds here: sandboxd reaps every child
    // itself (see `reap`), so the `Child` is never waited on.
    Ok(Spawned {
        pid: child.id(),
        stdin: child.stdin.take().map(OwnedFd::from),
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
        pty_master: None,
    })
}

/// Makes the child write its own `oom_score_adj` between fork and exec, so that
/// everything it ever runs or forks has the score: a score written from outside
/// after the spawn would miss whatever the child forks first (a shell's first
/// command, measured), which then competes with sandboxd on equal terms.
///
/// The hook then switches to `ids` (uid, gid) itself, as std's `uid`/`gid` would:
/// it must write the score first, since a process that changed its uid is no
/// longer dumpable, and its /proc files then belong to root.
///
/// A `pre_exec` hook moves std from `posix_spawn` to `fork`, which for a process as
/// small as sandboxd costs about as much (see BENCHMARKS.md).
fn raise_oom_score_before_exec(command: &mut Command, adj: i32, ids: Option<(u32, u32)>) {
    // Formatted before the fork: the child may only make async-signal-safe calls.
    let value = adj.to_string().into_bytes();
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // open, write, close, setgroups, setgid and setuid on a constant path and on
    // values made before the fork.
    unsafe {
        command.pre_exec(move || {
            let check =
                |ret: libc::c_int| if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) };
            let fd = check(libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            ))?;
            let written = libc::write(fd, value.as_ptr().cast(), value.len());
            libc::close(fd);
            if written < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid)) = ids {
                // As std does for a root parent: no supplementary groups of ours.
                if libc::getuid() == 0 {
                    check(libc::setgroups(0, std::ptr::null()))?;
                }
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
            Ok(())
        });
    }
}

fn winsize(rows: u16, cols: u16) -> nix::pty::Winsize {
    nix::pty::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 }
}

fn set_cloexec(fd: RawFd) -> Result<(), Errno> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    // SAFETY: `fd` is open for the duration of this call; the borrow does
    // not outlive it.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(drop)
}

pub fn set_window_size(master: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads a `struct winsize`, which `size` is, from a
    // pointer valid for the duration of the call.
    let rc = unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &size) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Duplicates a descriptor with close-on-exec set.
pub fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

/// Sends `signal` to `pid`, or to its process group when `group` is set.
/// A process that is already gone is not an error.
pub fn signal(pid: u32, signal: i32, group: bool) -> Result<(), Errno> {
    let signal = Signal::try_from(signal)?;
    let target = if group { Pid::from_raw(-(pid as i32)) } else { Pid::from_raw(pid as i32) };
    match kill(target, signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Signals every process in the pid namespace but ourselves. Only ever
/// called when sandboxd is PID 1: outside a pid namespace `kill(-1)` would
/// reach every process of the host that we may signal.
pub fn signal_all_in_namespace(signal: Signal) {
    if std::process::id() == 1 {
        let _ = kill(Pid::from_raw(-1), signal);
    }
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    Code(i32),
    Signal(i32),
}

/// Reaps one exited child, if any, without blocking. `Ok(None)` means no
/// child has exited yet; `Err(ECHILD)` means there are no children at all.
pub fn reap() -> Result<Option<(u32, ChildExit)>, Errno> {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG))? {
            WaitStatus::Exited(pid, code) => {
                return Ok(Some((pid.as_raw() as u32, ChildExit::Code(code))));
            }
            WaitStatus::Signaled(pid, signal, _) => {
                return Ok(Some((pid.as_raw() as u32, ChildExit::Signal(signal as i32))));
            }
            WaitStatus::StillAlive => return Ok(None),
            // Stops and continues are reported only when asked for, which
            // we never do; skip them defensively.
            _ => continue,
        }
    }
}

/// Makes sandboxd the reaper of orphaned descendants even when it is not
/// PID 1 (in tests, or on a host), so orphans never pile up as zombies.
pub fn become_subreaper() -> Result<(), Errno> {
    nix::sys::prctl::set_child_subreaper(true)
}
