//! Cloning the sandbox's PID 1.
//!
//! The dataplane is a multithreaded tokio process, so after `clone3` the child may only
//! make raw syscalls until `execve`: another thread may have held the allocator's lock
//! at the moment of the clone. Everything the child needs (paths, mount options, argv,
//! envp, the seccomp programs) is therefore computed by the parent into a [`ChildPlan`]
//! and the child only walks it. The child reports a failure as `(step, errno)` on a
//! close-on-exec pipe, so the parent learns both that and where it failed; a successful
//! `execve` closes the pipe.

use std::ffi::{CString, c_char, c_int, c_uint, c_ulong};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use seccompiler::BpfProgram;

/// One filesystem step executed by the child before `pivot_root`.
#[derive(Debug)]
pub(crate) enum Op {
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: c_ulong,
        data: Option<CString>,
        /// `ENOENT` is not an error (a masked path this kernel does not have).
        optional: bool,
    },
    /// `mkdir`; an existing directory is fine.
    Mkdir { path: CString, mode: libc::mode_t },
    /// Creates an empty file to bind-mount a file over; an existing one is fine.
    Touch { path: CString },
    /// `symlink(target, path)`; an existing entry is fine.
    Symlink { target: CString, path: CString },
}

impl Op {
    pub(crate) fn mount(
        source: Option<&str>,
        target: &str,
        fstype: Option<&str>,
        flags: c_ulong,
        data: Option<&str>,
    ) -> Result<Self, std::ffi::NulError> {
        Ok(Self::Mount {
            source: source.map(CString::new).transpose()?,
            target: CString::new(target)?,
            fstype: fstype.map(CString::new).transpose()?,
            flags,
            data: data.map(CString::new).transpose()?,
            optional: false,
        })
    }

    pub(crate) fn optional(mut self) -> Self {
        if let Self::Mount { optional, .. } = &mut self {
            *optional = true;
        }
        self
    }
}

/// A step of the child that is not an [`Op`]; reported as `STEP_BASE + step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Step {
    MoveFds = 0,
    Umask,
    Hostname,
    PivotRoot,
    Loopback,
    Rlimit,
    SyncWait,
    CgroupNamespace,
    Chdir,
    Setsid,
    Stdio,
    Capabilities,
    NoNewPrivs,
    Seccomp,
    Exec,
}

pub(crate) const STEP_BASE: u32 = 1 << 20;

impl Step {
    pub(crate) fn from_code(code: u32) -> Option<Self> {
        const ALL: [Step; 15] = [
            Step::MoveFds,
            Step::Umask,
            Step::Hostname,
            Step::PivotRoot,
            Step::Loopback,
            Step::Rlimit,
            Step::SyncWait,
            Step::CgroupNamespace,
            Step::Chdir,
            Step::Setsid,
            Step::Stdio,
            Step::Capabilities,
            Step::NoNewPrivs,
            Step::Seccomp,
            Step::Exec,
        ];
        ALL.get(code.checked_sub(STEP_BASE)? as usize).copied()
    }
}

/// Everything the child does, precomputed.
#[derive(Debug)]
pub(crate) struct ChildPlan {
    pub ops: Vec<Op>,
    pub new_root: CString,
    pub hostname: CString,
    pub rlimits: Vec<(c_int, libc::rlimit)>,
    /// Capabilities kept in the bounding, permitted and effective sets.
    pub caps_keep: u64,
    pub last_cap: u32,
    pub seccomp: Vec<BpfProgram>,
    pub workdir: CString,
    /// Directories created (root-owned, 0755, an existing one is fine) before the
    /// chdir to `workdir`, parents first. They are made after pivot_root, so a symlink
    /// in the image resolves inside the sandbox's root and never onto the host.
    pub workdir_ancestors: Vec<CString>,
    pub exe: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
}

/// File descriptors handed to the child; all close-on-exec in the parent.
#[derive(Debug)]
pub(crate) struct ChildFds {
    pub stdin: OwnedFd,
    pub log: OwnedFd,
    pub ready_w: OwnedFd,
    pub sync_r: OwnedFd,
    pub err_w: OwnedFd,
}

/// The child as seen by the parent.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
}

/// Namespaces the sandbox gets at clone time. The cgroup namespace is unshared by the
/// child after the parent has moved it into its cgroup, so that the namespace's root
/// is the sandbox cgroup.
const CLONE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET
    | libc::CLONE_PIDFD) as u64;

/// Clones the child and runs the plan in it. Returns in the parent only.
pub(crate) fn spawn(plan: &ChildPlan, fds: &ChildFds) -> io::Result<Spawned> {
    // Raw pointer arrays are built before the clone: the child cannot allocate.
    let argv = null_terminated(&plan.argv);
    let envp = null_terminated(&plan.envp);
    let fprogs: Vec<SockFprog> = plan
        .seccomp
        .iter()
        .map(|p| SockFprog { len: p.len() as u16, filter: p.as_ptr() })
        .collect();
    let raw = RawChild {
        plan,
        argv: &argv,
        envp: &envp,
        fprogs: &fprogs,
        fds: [
            fds.stdin.as_raw_fd(),
            fds.log.as_raw_fd(),
            fds.ready_w.as_raw_fd(),
            fds.sync_r.as_raw_fd(),
            fds.err_w.as_raw_fd(),
        ],
    };

    let mut pidfd: c_int = -1;
    // SAFETY: clone_args is plain old data; zero is the documented default of every
    // field we do not set.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = CLONE_FLAGS;
    args.pidfd = &mut pidfd as *mut c_int as u64;
    // No exit signal: a stray waitpid(-1) elsewhere in the process must not reap the
    // sandbox's PID 1 (it needs __WALL); we reap it through its pidfd.
    args.exit_signal = 0;
    // SAFETY: clone3 with a zero stack behaves like fork: the child continues on a
    // copy of this stack. The child only runs `child_main`, which makes raw syscalls on
    // memory prepared above and never returns.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        // SAFETY: we are the child; see above.
        0 => unsafe { child_main(&raw) },
        pid => Ok(Spawned {
            pid: pid as i32,
            // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor we now own.
            pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        }),
    }
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const seccompiler::sock_filter,
}

struct RawChild<'a> {
    plan: &'a ChildPlan,
    argv: &'a [*const c_char],
    envp: &'a [*const c_char],
    fprogs: &'a [SockFprog],
    /// stdin, log, ready_w, sync_r, err_w.
    fds: [RawFd; 5],
}

const NULL: *const c_char = std::ptr::null();

fn opt_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(NULL, |s| s.as_ptr())
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Reports `(step, errno)` to the parent and exits. Only meant for the cloned child.
fn fail(err_fd: RawFd, step: u32, errno: i32) -> ! {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&step.to_ne_bytes());
    buf[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: writing a stack buffer to a pipe, then exiting without running any
    // destructor or atexit handler of the (copied) parent.
    unsafe {
        libc::write(err_fd, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// The child: walk the plan, then exec sandboxd. Never returns.
///
/// # Safety
/// Must only be called in the child of a fork-like clone: it changes the process's
/// namespaces, mounts, credentials and seccomp filter. It allocates nothing.
unsafe fn child_main(raw: &RawChild<'_>) -> ! {
    let plan = raw.plan;
    let mut err_fd = raw.fds[4];

    macro_rules! check {
        ($step:expr, $call:expr) => {
            if $call < 0 {
                fail(err_fd, $step, errno())
            }
        };
    }

    // Move our descriptors above 3 so that the dup2 onto 0..=3 below cannot clobber one.
    let mut fds = [0 as RawFd; 5];
    for (i, fd) in raw.fds.iter().enumerate() {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we inherited.
        let moved = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 4) };
        check!(STEP_BASE + Step::MoveFds as u32, moved);
        fds[i] = moved;
    }
    let [stdin, log, ready_w, sync_r, moved_err] = fds;
    err_fd = moved_err;

    // Close every other descriptor above stderr. The clone copied all of the parent's,
    // close-on-exec or not, and we hold them until exec: a pipe another thread of the
    // parent was writing to a helper's stdin (nft) would then never see EOF, while the
    // parent waits for that helper before releasing us. Sorted on the stack: the child
    // cannot allocate.
    let mut keep = fds;
    for i in 1..keep.len() {
        let mut j = i;
        while j > 0 && keep[j - 1] > keep[j] {
            keep.swap(j - 1, j);
            j -= 1;
        }
    }
    let mut first: c_uint = 3;
    for fd in keep {
        let fd = fd as c_uint;
        if fd > first {
            // SAFETY: close_range on descriptors of this process that nothing in the
            // child uses; failure would only leave them open, as before.
            unsafe { libc::syscall(libc::SYS_close_range, first, fd - 1, 0) };
        }
        first = fd + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, first, c_uint::MAX, 0) };

    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o022) };

    for (index, op) in plan.ops.iter().enumerate() {
        let step = index as u32;
        // SAFETY: every pointer is a NUL-terminated string owned by the plan, which
        // outlives the child (the child's copy of the parent's memory).
        let (ret, optional) = unsafe {
            match op {
                Op::Mount { source, target, fstype, flags, data, optional } => (
                    libc::mount(
                        opt_ptr(source),
                        target.as_ptr(),
                        opt_ptr(fstype),
                        *flags,
                        opt_ptr(data).cast(),
                    ),
                    *optional,
                ),
                Op::Mkdir { path, mode } => {
                    let r = libc::mkdir(path.as_ptr(), *mode);
                    (if r < 0 && errno() == libc::EEXIST { 0 } else { r }, false)
                }
                Op::Touch { path } => {
                    let fd = libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    (fd, false)
                }
                Op::Symlink { target, path } => {
                    let r = libc::symlink(target.as_ptr(), path.as_ptr());
                    (if r < 0 && errno() == libc::EEXIST { 0 } else { r }, false)
                }
            }
        };
        if ret < 0 && !(optional && errno() == libc::ENOENT) {
            fail(err_fd, step, errno())
        }
    }

    // SAFETY: the remaining calls take pointers into the plan or to stack values.
    unsafe {
        check!(
            STEP_BASE + Step::Hostname as u32,
            libc::sethostname(plan.hostname.as_ptr(), plan.hostname.as_bytes().len())
        );

        // pivot_root(".", ".") stacks the old root beneath the new one; detaching it
        // leaves only the new root, without needing a directory for the old one.
        let pivot = STEP_BASE + Step::PivotRoot as u32;
        check!(pivot, libc::chdir(plan.new_root.as_ptr()));
        let dot = c".".as_ptr();
        check!(pivot, libc::syscall(libc::SYS_pivot_root, dot, dot));
        check!(pivot, libc::umount2(dot, libc::MNT_DETACH));
        check!(pivot, libc::chdir(c"/".as_ptr()));

        check!(STEP_BASE + Step::Loopback as u32, loopback_up());

        for (resource, limit) in &plan.rlimits {
            check!(STEP_BASE + Step::Rlimit as u32, libc::setrlimit(*resource as _, limit));
        }

        // Wait until the parent has moved us into our cgroup (and wired the network).
        // EOF means the parent gave up on us.
        let mut byte = 0u8;
        let n = libc::read(sync_r, (&mut byte as *mut u8).cast(), 1);
        if n != 1 {
            fail(err_fd, STEP_BASE + Step::SyncWait as u32, errno());
        }
        check!(STEP_BASE + Step::CgroupNamespace as u32, libc::unshare(libc::CLONE_NEWCGROUP));
        let chdir = STEP_BASE + Step::Chdir as u32;
        for dir in &plan.workdir_ancestors {
            if libc::mkdir(dir.as_ptr(), 0o755) < 0 && errno() != libc::EEXIST {
                fail(err_fd, chdir, errno());
            }
        }
        check!(chdir, libc::chdir(plan.workdir.as_ptr()));
        check!(STEP_BASE + Step::Setsid as u32, libc::setsid());

        let stdio = STEP_BASE + Step::Stdio as u32;
        check!(stdio, libc::dup2(stdin, 0));
        check!(stdio, libc::dup2(log, 1));
        check!(stdio, libc::dup2(log, 2));
        check!(stdio, libc::dup2(ready_w, 3));

        let caps = STEP_BASE + Step::Capabilities as u32;
        for cap in 0..=plan.last_cap {
            if plan.caps_keep & (1u64 << cap) == 0 {
                check!(caps, libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0));
            }
        }
        check!(
            caps,
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong, 0, 0, 0)
        );
        let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let low = plan.caps_keep as u32;
        let high = (plan.caps_keep >> 32) as u32;
        let data = [
            CapData { effective: low, permitted: low, inheritable: 0 },
            CapData { effective: high, permitted: high, inheritable: 0 },
        ];
        check!(caps, libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()));

        check!(
            STEP_BASE + Step::NoNewPrivs as u32,
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        );
        for fprog in raw.fprogs {
            check!(
                STEP_BASE + Step::Seccomp as u32,
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    fprog as *const SockFprog
                )
            );
        }

        libc::execve(plan.exe.as_ptr(), raw.argv.as_ptr(), raw.envp.as_ptr());
        fail(err_fd, STEP_BASE + Step::Exec as u32, errno())
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Brings `lo` up in the current network namespace with the SIOCSIFFLAGS ioctl.
///
/// # Safety
/// Raw syscalls only; safe to call in the cloned child.
unsafe fn loopback_up() -> c_int {
    // SAFETY: ifreq is plain old data; the ioctls read and write only it.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return -1;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as c_char;
        }
        let mut ret = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
        if ret == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            ret = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        }
        libc::close(sock);
        ret
    }
}

/// Docker's default capability set.
pub(crate) const DEFAULT_CAPS: [u32; 14] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

pub(crate) fn default_caps_mask() -> u64 {
    DEFAULT_CAPS.iter().fold(0, |mask, cap| mask | (1u64 << cap))
}

/// Creates a close-on-exec pipe: `(read end, write end)`.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
