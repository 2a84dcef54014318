//! Cloning the sandbox's PID 1.
//!
//! The child is cloned with `CLONE_VM`: it runs on its own small stack but in the
//! dataplane's memory until it execs sandboxd, so the clone copies no page tables.
//! Sharing memory with a multithreaded tokio process means the child may only make raw
//! system calls until `execve` (no allocation, no libc `errno`, no thread-locals), and
//! everything it reads (paths, mount options, argv, envp, the seccomp programs) lives in
//! one allocation, computed by the parent into a [`ChildPlan`], that stays alive until
//! the kernel says the child has left (exec or exit). The child reports a failure as
//! `(step, errno)` on a close-on-exec pipe, so the parent learns both that and where it
//! failed; a successful `execve` closes the pipe.

use std::ffi::{CString, c_char, c_int, c_uint, c_ulong, c_void};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::seccomp::BpfProgram;

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
    /// Waiting for the parent to write the user namespace's id maps.
    UserNamespaceWait,
    /// Becoming root of the user namespace (`setresgid`, `setgroups`, `setresuid`).
    UserNamespaceRoot,
}

pub(crate) const STEP_BASE: u32 = 1 << 20;

impl Step {
    pub(crate) fn from_code(code: u32) -> Option<Self> {
        const ALL: [Step; 17] = [
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
            Step::UserNamespaceWait,
            Step::UserNamespaceRoot,
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
    /// Clone into a new user namespace too (`CLONE_NEWUSER`), which then owns every
    /// other namespace of the sandbox. The child then waits for a first byte on
    /// `sync_r` (the parent has written its id maps and placed its idmapped mounts)
    /// before any mount step, and resolves the plan's relative paths from the working
    /// directory [`spawn_in`] gave it.
    pub user_namespace: bool,
    /// Bring `lo` up: false for a pooled network namespace, where it already is.
    pub loopback_up: bool,
}

/// File descriptors handed to the child; all close-on-exec in the parent.
///
/// None of them names a host file: sandboxd's stdout and stderr are a pipe the
/// driver reads, its stdin is the sandbox's own `/dev/null` (opened after
/// `pivot_root`), and its listening socket is one the driver bound. A process in
/// the sandbox that reopens one of them through `/proc/1/fd` gets a pipe or
/// nothing, never a file on the host.
#[derive(Debug)]
pub(crate) struct ChildFds {
    /// Write end of the log pipe: sandboxd's stdout and stderr.
    pub log: OwnedFd,
    /// Write end of the ready pipe: sandboxd's fd 3.
    pub ready_w: OwnedFd,
    /// The socket sandboxd listens on: its fd 4 (see `socket.rs`).
    pub listen: OwnedFd,
    pub sync_r: OwnedFd,
    pub err_w: OwnedFd,
}

/// Where sandboxd finds the ready pipe and its socket.
pub(crate) const READY_FD: RawFd = 3;
pub(crate) const LISTEN_FD: RawFd = 4;

/// The child as seen by the parent.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
    /// What the child reads; keep it until the child has exec'd or been reaped.
    pub memory: ChildMemory,
}

/// Namespaces the sandbox gets at clone time. The cgroup namespace is unshared by the
/// child after the parent has moved it into its cgroup, so that the namespace's root
/// is the sandbox cgroup.
const NAMESPACE_FLAGS: c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET;

/// The child shares our memory until it execs (`CLONE_VM`), as `posix_spawn` does:
/// copying the page tables of a large multi-threaded process, and the copy-on-write
/// faults and TLB shootdowns that follow, cost more than everything else a create
/// does. `CLONE_CHILD_CLEARTID` makes the kernel zero [`Shared::running`] when the
/// child leaves our memory by exec or exit, which is how [`ChildMemory`] knows when it
/// may be freed. No exit signal (the low byte is zero): a stray `waitpid(-1)` elsewhere
/// in the process must not reap the sandbox's PID 1 (it needs `__WALL`); we reap it
/// through its pidfd.
///
/// `CLONE_NEWUSER` combines with `CLONE_VM` (the kernel refuses it only with
/// `CLONE_FS` or `CLONE_THREAD`, neither of which we pass), so a sandbox with a user
/// namespace is cloned the same way, with that one flag more.
const CLONE_FLAGS: c_int =
    NAMESPACE_FLAGS | libc::CLONE_VM | libc::CLONE_CHILD_CLEARTID | libc::CLONE_PIDFD;

/// The child's stack. The plan's walk needs a few KiB; the rest is never touched and,
/// being `MAP_NORESERVE`, never backed.
const STACK_SIZE: usize = 256 * 1024;

/// [`spawn`] with `dir` as the child's working directory, from a short-lived thread
/// that changed only its own (`unshare(CLONE_FS)`).
///
/// A child in a user namespace is not root on the host: it may not search host
/// directories that only host root may (a 0700 data dir above the run dir, say), so
/// its plan names the sandbox's files relative to `dir`. The working directory it
/// inherits is translated into its new mount namespace by the clone, which a
/// descriptor opened beforehand would not be (it would still name the host's mount).
///
/// The thread exits while the child still runs the plan, so the child's thread
/// pointer then names freed thread-local storage; that is harmless because the child
/// never touches thread-local storage at all (see [`raw`]).
pub(crate) fn spawn_in(
    dir: &std::path::Path,
    plan: ChildPlan,
    fds: &ChildFds,
) -> io::Result<Spawned> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare(CLONE_FS) gives this thread its own root and working
                // directory; no memory is involved.
                if unsafe { libc::unshare(libc::CLONE_FS) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                std::env::set_current_dir(dir)?;
                spawn(plan, fds, None)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the spawning thread panicked")))
    })
}

/// Clones the child and runs the plan in it. Returns in the parent only.
///
/// With `netns` the child is born in that network namespace (one of
/// [`crate::netns::NetnsPool`]'s) instead of a new one.
///
/// The returned [`Spawned::memory`] holds everything the child reads; it must be kept
/// until the child has exec'd or died, which its `Drop` checks for itself.
pub(crate) fn spawn(
    plan: ChildPlan,
    fds: &ChildFds,
    netns: Option<BorrowedFd<'_>>,
) -> io::Result<Spawned> {
    let stack = Stack::new()?;
    // Raw pointer arrays are built before the clone (the child cannot allocate) and
    // after the plan reached its final place, although moving a CString does not move
    // its bytes either.
    let mut shared = Box::new(Shared {
        plan,
        argv: Vec::new(),
        envp: Vec::new(),
        fprogs: Vec::new(),
        fds: [
            fds.log.as_raw_fd(),
            fds.ready_w.as_raw_fd(),
            fds.listen.as_raw_fd(),
            fds.sync_r.as_raw_fd(),
            fds.err_w.as_raw_fd(),
        ],
        running: AtomicU32::new(1),
    });
    shared.argv = null_terminated(&shared.plan.argv);
    shared.envp = null_terminated(&shared.plan.envp);
    shared.fprogs = shared
        .plan
        .seccomp
        .iter()
        .map(|p| SockFprog { len: p.len() as u16, filter: p.as_ptr() })
        .collect();
    let shared = Box::into_raw(shared);

    // Block every signal while the child runs our handlers' memory: it resets them all
    // to the default before it unblocks anything, so no handler of ours ever runs in it.
    // SAFETY: sigset_t is plain old data initialised by sigfillset/pthread_sigmask.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both point to valid sigset_t values on our stack.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let mut pidfd: c_int = -1;
    // SAFETY: `shared` is the live allocation made above; nothing else uses it yet.
    let user_namespace = unsafe { (*shared).plan.user_namespace };
    let mut flags = if user_namespace { CLONE_FLAGS | libc::CLONE_NEWUSER } else { CLONE_FLAGS };
    if netns.is_some() {
        // Born in the namespace this thread enters for the clone.
        flags &= !libc::CLONE_NEWNET;
    }
    let mut clone = || {
        // SAFETY: the child runs `child_entry` on its own stack and reads only
        // `shared`, which stays allocated until `running` is cleared (see
        // ChildMemory's Drop). It makes raw syscalls only: no allocation, no errno,
        // no thread-local storage of the thread it was cloned from. The pidfd is
        // stored through `parent_tid`, as clone(2) documents for CLONE_PIDFD.
        let ret = unsafe {
            libc::clone(
                child_entry,
                stack.top(),
                flags,
                shared.cast(),
                &mut pidfd as *mut c_int,
                std::ptr::null_mut::<c_void>(),
                std::ptr::addr_of_mut!((*shared).running),
            )
        };
        (ret, io::Error::last_os_error())
    };
    let (ret, clone_error) = match netns {
        None => clone(),
        Some(netns) => crate::netns::while_in(netns, clone).unwrap_or_else(|e| (-1, e)),
    };
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if ret < 0 {
        // No child exists; nothing else refers to the memory.
        // SAFETY: `shared` came from Box::into_raw above and is dropped once.
        drop(unsafe { Box::from_raw(shared) });
        return Err(clone_error);
    }
    Ok(Spawned {
        pid: ret,
        // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor we now own.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        memory: ChildMemory { shared, stack: Some(stack) },
    })
}

/// Everything the child reads, in one allocation shared with it.
struct Shared {
    plan: ChildPlan,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    fprogs: Vec<SockFprog>,
    /// log, ready_w, listen, sync_r, err_w.
    fds: [RawFd; 5],
    /// Non-zero while the child may still run in our memory; the kernel zeroes it
    /// (`CLONE_CHILD_CLEARTID`) when the child execs or exits.
    running: AtomicU32,
}

/// The child's plan and stack, which live in the parent's memory. Dropped before the
/// child has left that memory (a child that neither exec'd nor was reaped), they are
/// leaked rather than freed under it.
#[derive(Debug)]
pub(crate) struct ChildMemory {
    shared: *mut Shared,
    stack: Option<Stack>,
}

// SAFETY: the parent only reads the plan through a shared reference, the child only
// reads it, and the one word the kernel writes is atomic; nothing is tied to the thread
// that cloned the child.
unsafe impl Send for ChildMemory {}
// SAFETY: as above; `&ChildMemory` gives only read access.
unsafe impl Sync for ChildMemory {}

impl ChildMemory {
    pub(crate) fn plan(&self) -> &ChildPlan {
        // SAFETY: `shared` is a live allocation owned by self and never written after
        // the clone.
        unsafe { &(*self.shared).plan }
    }

    fn child_left(&self) -> bool {
        // SAFETY: as in `plan`.
        unsafe { (*self.shared).running.load(Ordering::Acquire) == 0 }
    }
}

impl Drop for ChildMemory {
    fn drop(&mut self) {
        if !self.child_left() {
            tracing::warn!("sandbox child still shares the driver's memory; leaking its plan");
            std::mem::forget(self.stack.take());
            return;
        }
        // SAFETY: the child has exec'd or exited, so nobody else refers to `shared`,
        // which came from Box::into_raw in `spawn`.
        drop(unsafe { Box::from_raw(self.shared) });
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("plan", &self.plan).finish_non_exhaustive()
    }
}

/// An anonymous mapping the child runs on, with a guard page below it.
#[derive(Debug)]
struct Stack {
    base: *mut c_void,
}

impl Stack {
    fn new() -> io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                STACK_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Self { base };
        // SAFETY: the lowest page of the mapping we just made; an overflow faults there
        // instead of writing into whatever lies below.
        if unsafe { libc::mprotect(base, page_size(), libc::PROT_NONE) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    fn top(&self) -> *mut c_void {
        // SAFETY: one past the end of the mapping, which is what clone(2) expects for a
        // downward-growing stack; STACK_SIZE keeps it 16-byte aligned.
        unsafe { self.base.cast::<u8>().add(STACK_SIZE).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used by the child (see ChildMemory).
        unsafe { libc::munmap(self.base, STACK_SIZE) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const libc::sock_filter,
}

const NULL: *const c_char = std::ptr::null();

fn opt_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(NULL, |s| s.as_ptr())
}

/// Raw system calls for the cloned child.
///
/// The child shares the parent's memory and its thread pointer, so it must not touch
/// libc's `errno` (a thread-local of the thread that cloned it, which keeps running):
/// these return `-errno` in the result instead, as the kernel does.
mod raw {
    use std::ffi::c_long;

    /// # Safety
    /// The arguments must be valid for system call `nr`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(super) unsafe fn syscall(nr: c_long, a: [usize; 6]) -> isize {
        let ret: isize;
        // SAFETY: the x86_64 system call convention; the caller vouches for the
        // arguments. rcx and r11 are clobbered by the instruction.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") nr as isize => ret,
                in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
                in("r10") a[3], in("r8") a[4], in("r9") a[5],
                lateout("rcx") _, lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    /// # Safety
    /// The arguments must be valid for system call `nr`.
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    pub(super) unsafe fn syscall(nr: c_long, a: [usize; 6]) -> isize {
        let ret: isize;
        // SAFETY: the aarch64 system call convention; the caller vouches for the
        // arguments.
        unsafe {
            std::arch::asm!(
                "svc 0",
                in("x8") nr,
                inlateout("x0") a[0] as isize => ret,
                in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
                options(nostack),
            );
        }
        ret
    }
}

/// `raw::syscall` with up to six arguments of any integer or pointer type.
macro_rules! sys {
    ($nr:expr $(, $arg:expr)* $(,)?) => {{
        let mut args = [0usize; 6];
        let given = [$($arg as usize),*];
        let mut i = 0;
        while i < given.len() {
            args[i] = given[i];
            i += 1;
        }
        raw::syscall($nr, args)
    }};
}

/// Reports `(step, errno)` to the parent and exits. Only meant for the cloned child.
///
/// # Safety
/// Raw syscalls only; never returns.
unsafe fn fail(err_fd: RawFd, step: u32, errno: i32) -> ! {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&step.to_ne_bytes());
    buf[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: writing a stack buffer to a pipe, then exiting without running any
    // destructor or atexit handler of the parent whose memory we share.
    unsafe {
        sys!(libc::SYS_write, err_fd, buf.as_ptr(), buf.len());
        loop {
            sys!(libc::SYS_exit_group, 127);
        }
    }
}

/// The entry point `clone` calls on the child's stack.
extern "C" fn child_entry(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Shared` that `spawn` passed, alive until we exec or exit;
    // we are the cloned child.
    unsafe { child_main(&*arg.cast::<Shared>()) }
}

/// The kernel's `struct sigaction` (not libc's): handler, flags, restorer, mask.
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// The child: walk the plan, then exec sandboxd. Never returns.
///
/// # Safety
/// Must only be called in the child of `spawn`'s clone: it changes the process's
/// namespaces, mounts, credentials and seccomp filter. It allocates nothing and makes
/// raw syscalls only.
unsafe fn child_main(raw: &Shared) -> ! {
    let plan = &raw.plan;
    let mut err_fd = raw.fds[4];

    macro_rules! check {
        ($step:expr, $call:expr) => {{
            let ret = $call;
            if ret < 0 {
                fail(err_fd, $step, -ret as i32)
            }
            ret
        }};
    }

    // SAFETY: every call below is a raw syscall on stack values, on descriptors we
    // inherited, or on NUL-terminated strings and arrays owned by `raw`, which outlives
    // us (we leave its memory at exec).
    unsafe {
        // First our own signal state: every handler back to the default (they are the
        // parent's code, on memory we share), then unblock what `spawn` blocked.
        let default = KernelSigaction { handler: 0, flags: 0, restorer: 0, mask: 0 };
        for sig in 1..=64usize {
            if sig != libc::SIGKILL as usize && sig != libc::SIGSTOP as usize {
                sys!(libc::SYS_rt_sigaction, sig, &default as *const KernelSigaction, 0, 8);
            }
        }
        let empty: u64 = 0;
        sys!(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &empty as *const u64, 0, 8);

        // Move our descriptors above LISTEN_FD so that the dup3 onto 0..=LISTEN_FD
        // below cannot clobber one.
        let mut fds = [0 as RawFd; 5];
        for (i, fd) in raw.fds.iter().enumerate() {
            fds[i] = check!(
                STEP_BASE + Step::MoveFds as u32,
                sys!(libc::SYS_fcntl, *fd, libc::F_DUPFD_CLOEXEC, LISTEN_FD + 1)
            ) as RawFd;
        }
        let [log, ready_w, listen, sync_r, moved_err] = fds;
        err_fd = moved_err;

        // Close every other descriptor above stderr. The clone copied all of the
        // parent's, close-on-exec or not, and we hold them until exec: a pipe another
        // thread of the parent was writing to a helper's stdin (nft) would then never
        // see EOF, while the parent waits for that helper before releasing us. Sorted on
        // the stack: the child cannot allocate.
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
                // Failure would only leave them open, as before.
                sys!(libc::SYS_close_range, first, fd - 1, 0);
            }
            first = fd + 1;
        }
        sys!(libc::SYS_close_range, first, c_uint::MAX, 0);

        sys!(libc::SYS_umask, 0o022);

        if plan.user_namespace {
            // Until the parent has written our id maps we are nobody in our own
            // namespace: files we created would be refused (no mapping for our fsuid)
            // and the idmapped image layers are not in place yet. EOF means the parent
            // gave up on us.
            let mut byte = 0u8;
            let n = sys!(libc::SYS_read, sync_r, &mut byte as *mut u8, 1);
            if n != 1 {
                fail(
                    err_fd,
                    STEP_BASE + Step::UserNamespaceWait as u32,
                    if n < 0 { -n as i32 } else { 0 },
                );
            }
            // We still have the ids we were cloned with, host root's, which the map
            // leaves out: become the namespace's root (host `base`), with no
            // supplementary groups of the host's. Our capabilities in the namespace are
            // kept: the kernel drops them only on leaving uid 0.
            let root = STEP_BASE + Step::UserNamespaceRoot as u32;
            check!(root, sys!(libc::SYS_setresgid, 0, 0, 0));
            check!(root, sys!(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()));
            check!(root, sys!(libc::SYS_setresuid, 0, 0, 0));
        }

        for (index, op) in plan.ops.iter().enumerate() {
            let step = index as u32;
            let (ret, optional) = match op {
                Op::Mount { source, target, fstype, flags, data, optional } => (
                    sys!(
                        libc::SYS_mount,
                        opt_ptr(source),
                        target.as_ptr(),
                        opt_ptr(fstype),
                        *flags,
                        opt_ptr(data)
                    ),
                    *optional,
                ),
                Op::Mkdir { path, mode } => {
                    let r = sys!(libc::SYS_mkdirat, libc::AT_FDCWD, path.as_ptr(), *mode);
                    (if r == -(libc::EEXIST as isize) { 0 } else { r }, false)
                }
                Op::Touch { path } => {
                    let fd = sys!(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644
                    );
                    if fd >= 0 {
                        sys!(libc::SYS_close, fd);
                    }
                    (fd, false)
                }
                Op::Symlink { target, path } => {
                    let r =
                        sys!(libc::SYS_symlinkat, target.as_ptr(), libc::AT_FDCWD, path.as_ptr());
                    (if r == -(libc::EEXIST as isize) { 0 } else { r }, false)
                }
            };
            if ret < 0 && !(optional && ret == -(libc::ENOENT as isize)) {
                fail(err_fd, step, -ret as i32)
            }
        }

        check!(
            STEP_BASE + Step::Hostname as u32,
            sys!(libc::SYS_sethostname, plan.hostname.as_ptr(), plan.hostname.as_bytes().len())
        );

        // pivot_root(".", ".") stacks the old root beneath the new one; detaching it
        // leaves only the new root, without needing a directory for the old one.
        let pivot = STEP_BASE + Step::PivotRoot as u32;
        check!(pivot, sys!(libc::SYS_chdir, plan.new_root.as_ptr()));
        let dot = c".".as_ptr();
        check!(pivot, sys!(libc::SYS_pivot_root, dot, dot));
        check!(pivot, sys!(libc::SYS_umount2, dot, libc::MNT_DETACH));
        check!(pivot, sys!(libc::SYS_chdir, c"/".as_ptr()));

        if plan.loopback_up {
            check!(STEP_BASE + Step::Loopback as u32, loopback_up());
        }

        for (resource, limit) in &plan.rlimits {
            check!(
                STEP_BASE + Step::Rlimit as u32,
                sys!(
                    libc::SYS_prlimit64,
                    0,
                    *resource,
                    limit as *const libc::rlimit,
                    std::ptr::null_mut::<libc::rlimit>()
                )
            );
        }

        // Wait until the parent has moved us into our cgroup (and wired the network).
        // EOF means the parent gave up on us.
        let mut byte = 0u8;
        let n = sys!(libc::SYS_read, sync_r, &mut byte as *mut u8, 1);
        if n != 1 {
            fail(err_fd, STEP_BASE + Step::SyncWait as u32, if n < 0 { -n as i32 } else { 0 });
        }
        check!(
            STEP_BASE + Step::CgroupNamespace as u32,
            sys!(libc::SYS_unshare, libc::CLONE_NEWCGROUP)
        );
        let chdir = STEP_BASE + Step::Chdir as u32;
        for dir in &plan.workdir_ancestors {
            let r = sys!(libc::SYS_mkdirat, libc::AT_FDCWD, dir.as_ptr(), 0o755);
            if r < 0 && r != -(libc::EEXIST as isize) {
                fail(err_fd, chdir, -r as i32);
            }
        }
        check!(chdir, sys!(libc::SYS_chdir, plan.workdir.as_ptr()));
        check!(STEP_BASE + Step::Setsid as u32, sys!(libc::SYS_setsid));

        // stdin is the sandbox's own /dev/null, opened inside the new root, so that
        // not even it names a host file.
        let stdio = STEP_BASE + Step::Stdio as u32;
        let null = check!(
            stdio,
            sys!(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/dev/null".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC
            )
        );
        check!(stdio, sys!(libc::SYS_dup3, null, 0, 0));
        check!(stdio, sys!(libc::SYS_dup3, log, 1, 0));
        check!(stdio, sys!(libc::SYS_dup3, log, 2, 0));
        check!(stdio, sys!(libc::SYS_dup3, ready_w, READY_FD, 0));
        check!(stdio, sys!(libc::SYS_dup3, listen, LISTEN_FD, 0));

        let caps = STEP_BASE + Step::Capabilities as u32;
        for cap in 0..=plan.last_cap {
            if plan.caps_keep & (1u64 << cap) == 0 {
                check!(caps, sys!(libc::SYS_prctl, libc::PR_CAPBSET_DROP, cap, 0, 0, 0));
            }
        }
        check!(
            caps,
            sys!(libc::SYS_prctl, libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        );
        let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let low = plan.caps_keep as u32;
        let high = (plan.caps_keep >> 32) as u32;
        let data = [
            CapData { effective: low, permitted: low, inheritable: 0 },
            CapData { effective: high, permitted: high, inheritable: 0 },
        ];
        check!(caps, sys!(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()));

        check!(
            STEP_BASE + Step::NoNewPrivs as u32,
            sys!(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        );
        for fprog in &raw.fprogs {
            check!(
                STEP_BASE + Step::Seccomp as u32,
                sys!(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    fprog as *const SockFprog
                )
            );
        }

        let r = sys!(libc::SYS_execve, plan.exe.as_ptr(), raw.argv.as_ptr(), raw.envp.as_ptr());
        fail(err_fd, STEP_BASE + Step::Exec as u32, -r as i32)
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
/// Returns `-errno` on failure.
///
/// # Safety
/// Raw syscalls only; safe to call in the cloned child.
unsafe fn loopback_up() -> isize {
    // SAFETY: ifreq is plain old data; the ioctls read and write only it.
    unsafe {
        let sock = sys!(libc::SYS_socket, libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return sock;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as c_char;
        }
        let mut ret = sys!(libc::SYS_ioctl, sock, libc::SIOCGIFFLAGS, &mut req as *mut libc::ifreq);
        if ret == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            ret = sys!(libc::SYS_ioctl, sock, libc::SIOCSIFFLAGS, &req as *const libc::ifreq);
        }
        sys!(libc::SYS_close, sock);
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
