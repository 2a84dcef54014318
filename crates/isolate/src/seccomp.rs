//! The default seccomp filter: Docker's default profile, rebuilt for x86_64.
//!
//! Source: moby/moby `profiles/seccomp/default.json` as of Docker 26 (after moby#45837,
//! which allowed `name_to_handle_at`; moby#46762, which dropped `io_uring_*`; and
//! moby#47341, which added the syscalls of kernels 5.17 to 6.7). Like Docker's profile it
//! is an allow-list: every syscall not listed below fails with `EPERM`, including any
//! syscall a future kernel adds, so a new kernel never widens the sandbox.
//!
//! What Docker's profile decides from the container's capabilities is decided here from
//! the fixed capability set the driver keeps (Docker's default set): of the capability
//! gated rules only `chroot` (CAP_SYS_CHROOT) applies, and everything gated on another
//! capability (CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYS_TIME, ...) is refused.
//!
//! Deviations from Docker, all deliberate:
//! - Stricter: `ptrace`, `process_vm_readv` and `process_vm_writev` are refused (Docker
//!   allows them on kernels >= 4.8). Sandboxes have no debugging use case that
//!   outweighs the attack surface, and it keeps the behaviour this crate always had.
//! - Stricter: `name_to_handle_at` is refused (Docker allows it since 24.0.3). Its only
//!   use in a sandbox is producing handles for `open_by_handle_at` (refused here and in
//!   Docker: the "shocker" escape).
//! - Stricter: only the native x86_64 convention is accepted. Docker's x86_64 profile also
//!   admits the i386 and x32 ABIs; here an i386 syscall kills the process and an x32
//!   syscall fails with `EPERM` (see [`default_filter`]).
//! - Wider: syscalls Linux added after Docker's list that only spell an allowed
//!   operation differently: the `*xattrat` family (6.13) and `file_getattr` /
//!   `file_setattr` (6.17, the `FS_IOC_FSGETXATTR` / `FS_IOC_FSSETXATTR` ioctls that
//!   are allowed anyway).
//! - 32-bit-only names of Docker's list (`*32`, `*_time64`, `socketcall`, `ipc`,
//!   `mmap2`, ...) have no x86_64 number and are simply absent.

/// x86_64 numbers of syscalls newer than the `libc` crate's tables.
mod nr {
    pub const IO_PGETEVENTS: i64 = 333;
    pub const CACHESTAT: i64 = 451;
    pub const MAP_SHADOW_STACK: i64 = 453;
    pub const FUTEX_WAKE: i64 = 454;
    pub const FUTEX_WAIT: i64 = 455;
    pub const FUTEX_REQUEUE: i64 = 456;
    pub const SETXATTRAT: i64 = 463;
    pub const GETXATTRAT: i64 = 464;
    pub const LISTXATTRAT: i64 = 465;
    pub const REMOVEXATTRAT: i64 = 466;
    pub const FILE_GETATTR: i64 = 468;
    pub const FILE_SETATTR: i64 = 469;
}

/// Syscalls allowed whatever their arguments: Docker's unconditional list for amd64,
/// in its order, without the deviations listed in the module documentation.
const ALLOWED: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_access,
    libc::SYS_adjtimex,
    libc::SYS_alarm,
    libc::SYS_bind,
    libc::SYS_brk,
    nr::CACHESTAT,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_chdir,
    libc::SYS_chmod,
    libc::SYS_chown,
    // Reading the clock only: adjusting it needs CAP_SYS_TIME, which sandboxes lack.
    libc::SYS_clock_adjtime,
    libc::SYS_clock_getres,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_connect,
    libc::SYS_copy_file_range,
    libc::SYS_creat,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_ctl_old,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_wait_old,
    libc::SYS_eventfd,
    libc::SYS_eventfd2,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_fallocate,
    libc::SYS_fanotify_mark,
    libc::SYS_fchdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_flock,
    libc::SYS_fork,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    nr::FUTEX_REQUEUE,
    nr::FUTEX_WAIT,
    libc::SYS_futex_waitv,
    nr::FUTEX_WAKE,
    libc::SYS_futimesat,
    libc::SYS_getcpu,
    libc::SYS_getcwd,
    libc::SYS_getdents,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getgroups,
    libc::SYS_getitimer,
    libc::SYS_getpeername,
    libc::SYS_getpgid,
    libc::SYS_getpgrp,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getpriority,
    libc::SYS_getrandom,
    libc::SYS_getresgid,
    libc::SYS_getresuid,
    libc::SYS_getrlimit,
    libc::SYS_get_robust_list,
    libc::SYS_getrusage,
    libc::SYS_getsid,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_get_thread_area,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_getuid,
    libc::SYS_getxattr,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_init,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_rm_watch,
    libc::SYS_io_cancel,
    libc::SYS_ioctl,
    libc::SYS_io_destroy,
    libc::SYS_io_getevents,
    nr::IO_PGETEVENTS,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    libc::SYS_io_setup,
    libc::SYS_io_submit,
    libc::SYS_kill,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_restrict_self,
    libc::SYS_lchown,
    libc::SYS_lgetxattr,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_listen,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_lseek,
    libc::SYS_lsetxattr,
    libc::SYS_lstat,
    libc::SYS_madvise,
    nr::MAP_SHADOW_STACK,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_memfd_secret,
    libc::SYS_mincore,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_mlockall,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mq_getsetattr,
    libc::SYS_mq_notify,
    libc::SYS_mq_open,
    libc::SYS_mq_timedreceive,
    libc::SYS_mq_timedsend,
    libc::SYS_mq_unlink,
    libc::SYS_mremap,
    libc::SYS_msgctl,
    libc::SYS_msgget,
    libc::SYS_msgrcv,
    libc::SYS_msgsnd,
    libc::SYS_msync,
    libc::SYS_munlock,
    libc::SYS_munlockall,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_pause,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_pkey_mprotect,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_prlimit64,
    libc::SYS_process_mrelease,
    libc::SYS_pselect6,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readahead,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmmsg,
    libc::SYS_recvmsg,
    libc::SYS_remap_file_pages,
    libc::SYS_removexattr,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_restart_syscall,
    libc::SYS_rmdir,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_getparam,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_yield,
    libc::SYS_seccomp,
    libc::SYS_select,
    libc::SYS_semctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_sendfile,
    libc::SYS_sendmmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setfsgid,
    libc::SYS_setfsuid,
    libc::SYS_setgid,
    libc::SYS_setgroups,
    libc::SYS_setitimer,
    libc::SYS_setpgid,
    libc::SYS_setpriority,
    libc::SYS_setregid,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setreuid,
    libc::SYS_setrlimit,
    libc::SYS_set_robust_list,
    libc::SYS_setsid,
    libc::SYS_setsockopt,
    libc::SYS_set_thread_area,
    libc::SYS_set_tid_address,
    libc::SYS_setuid,
    libc::SYS_setxattr,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_shmdt,
    libc::SYS_shmget,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd,
    libc::SYS_signalfd4,
    libc::SYS_splice,
    libc::SYS_stat,
    libc::SYS_statfs,
    libc::SYS_statx,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_sync,
    libc::SYS_sync_file_range,
    libc::SYS_syncfs,
    libc::SYS_sysinfo,
    libc::SYS_tee,
    libc::SYS_tgkill,
    libc::SYS_time,
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_gettime,
    libc::SYS_timer_settime,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_times,
    libc::SYS_tkill,
    libc::SYS_truncate,
    libc::SYS_umask,
    libc::SYS_uname,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_utime,
    libc::SYS_utimensat,
    libc::SYS_utimes,
    libc::SYS_vfork,
    libc::SYS_vmsplice,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_write,
    libc::SYS_writev,
    // Docker's amd64-only entries.
    libc::SYS_arch_prctl,
    libc::SYS_modify_ldt,
    // Docker allows chroot to containers that keep CAP_SYS_CHROOT, as ours do.
    libc::SYS_chroot,
    // Newer spellings of allowed operations (see the module documentation).
    nr::SETXATTRAT,
    nr::GETXATTRAT,
    nr::LISTXATTRAT,
    nr::REMOVEXATTRAT,
    nr::FILE_GETATTR,
    nr::FILE_SETATTR,
];

/// Namespace flags `clone` must not carry, Docker's mask: CLONE_NEWNS, CLONE_NEWCGROUP,
/// CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID and CLONE_NEWNET. (CLONE_NEWTIME
/// shares its bit with the exit signal in `clone`'s flags and only exists for `clone3`
/// and `unshare`, both refused.)
const CLONE_NAMESPACE_FLAGS: u32 = 0x7E02_0000;

/// `personality(2)` values Docker allows: PER_LINUX, PER_LINUX32, UNAME26,
/// PER_LINUX32|UNAME26 and the query value. Notably not ADDR_NO_RANDOMIZE.
const ALLOWED_PERSONALITIES: [u32; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The socket families a sandbox may create: Unix, IPv4, IPv6, netlink (what `ip`
/// and glibc's interface lookups use) and packet (raw frames; CAP_NET_RAW inside).
///
/// An allow-list, as Docker's profile had from 2016 (moby#29076) until that broke
/// `socketcall` on 32-bit and was reverted: every other family fails with EPERM,
/// among them AF_ALG (the kernel crypto API: CVE-2026-31431's page-cache write,
/// which Docker now refuses too), AF_VSOCK (the hypervisor, Docker's other refusal),
/// and the dozens of rarely audited ones (TIPC, RDS, X.25, Bluetooth, ...). This
/// filter admits only the native x86_64 convention, which has no `socketcall`.
const ALLOWED_SOCKET_FAMILIES: [u32; 5] = [
    libc::AF_UNIX as u32,
    libc::AF_INET as u32,
    libc::AF_INET6 as u32,
    libc::AF_NETLINK as u32,
    libc::AF_PACKET as u32,
];

/// A classic BPF program as `seccomp(SECCOMP_SET_MODE_FILTER)` takes it.
pub type BpfProgram = Vec<libc::sock_filter>;

/// What the filter decides for one syscall number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Allow,
    Eperm,
    /// `clone3` fails with `ENOSYS`, so that glibc falls back to `clone`, whose flags a
    /// classic BPF filter can inspect (`clone3` passes them in memory). Docker does the
    /// same.
    Enosys,
    /// `clone`: allowed without namespace flags.
    Clone,
    /// `personality`: Docker's values only.
    Personality,
    /// `socket`: [`ALLOWED_SOCKET_FAMILIES`] only.
    Socket,
    /// `socketpair`: `AF_UNIX` only (the one family where a pair means anything
    /// beyond what `socket` allows).
    SocketPair,
}

/// One past the highest syscall number the table spells out; everything from here
/// up is refused, so a syscall a future kernel adds never widens the sandbox.
const TABLE_END: u32 = 512;

fn verdict_of(nr: u32) -> Verdict {
    let nr = i64::from(nr);
    match nr {
        libc::SYS_clone => Verdict::Clone,
        libc::SYS_clone3 => Verdict::Enosys,
        libc::SYS_personality => Verdict::Personality,
        libc::SYS_socket => Verdict::Socket,
        libc::SYS_socketpair => Verdict::SocketPair,
        _ if ALLOWED.contains(&nr) => Verdict::Allow,
        _ => Verdict::Eperm,
    }
}

/// The whole policy as one program: the calling convention is checked first, then
/// the syscall number is found by binary search over the runs of equal verdicts.
///
/// Why not a generic filter compiler: seccompiler emits one linear chain with a
/// comparison per listed syscall (1,564 instructions for this list, in three programs
/// because a seccompiler filter has a single match action). The kernel
/// checks, converts and JIT-compiles every instruction on install, and then runs the
/// program once per syscall number to fill its cache of always-allowed calls; for
/// sandboxes created in a burst that was 7 % of all CPU. This program has 169
/// instructions, and any syscall the cache does not cover takes about ten
/// comparisons instead of hundreds.
///
/// Argument checks compare the low 32 bits only: the kernel reads `clone`'s flags,
/// `personality`'s persona and `socket`'s family as 32-bit values, so this is exact,
/// and set high bits cannot slip an argument past a comparison.
pub fn default_filter() -> BpfProgram {
    // Runs of equal verdicts over 0..TABLE_END, then everything above refused.
    let mut runs: Vec<(u32, Verdict)> = Vec::new();
    for nr in 0..TABLE_END {
        let verdict = verdict_of(nr);
        if runs.last().is_none_or(|&(_, last)| last != verdict) {
            runs.push((nr, verdict));
        }
    }
    if runs.last().is_some_and(|&(_, last)| last != Verdict::Eperm) {
        runs.push((TABLE_END, Verdict::Eperm));
    }

    let mut program = vec![
        // Anything but the x86_64 convention (i386 `int 0x80`, which Docker admits)
        // kills the process: its numbers mean other syscalls.
        stmt(LD_W_ABS, ARCH_OFFSET),
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        // The x32 ABI (bit 30 set in the number), which Docker admits, is refused.
        stmt(LD_W_ABS, NR_OFFSET),
        jump(JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(RET_K, RET_EPERM),
    ];
    program.extend(search(&runs));
    program
}

/// Code that leaves the verdict for the number in the accumulator, given that it is
/// at least `runs[0].0` and below the start of the run after the last one.
fn search(runs: &[(u32, Verdict)]) -> BpfProgram {
    if let [(_, verdict)] = runs {
        return leaf(*verdict);
    }
    let (low, high) = runs.split_at(runs.len() / 2);
    let (low, high) = (search(low), search(high));
    let mut code = Vec::with_capacity(low.len() + high.len() + 2);
    match u8::try_from(low.len()) {
        // `number >= start of the upper half` skips over the lower half's code.
        Ok(skip) => code.push(jump(JGE_K, high_start(runs), skip, 0)),
        // Conditional jumps reach 255 instructions; a longer lower half is jumped
        // over with an unconditional jump, which reaches 2^32.
        Err(_) => {
            code.push(jump(JGE_K, high_start(runs), 0, 1));
            code.push(stmt(JA, u32::try_from(low.len()).expect("a program below 4096")));
        }
    }
    code.extend(low);
    code.extend(high);
    code
}

fn high_start(runs: &[(u32, Verdict)]) -> u32 {
    runs[runs.len() / 2].0
}

fn leaf(verdict: Verdict) -> BpfProgram {
    const ARG0_LOW: u32 = 16;
    match verdict {
        Verdict::Allow => vec![stmt(RET_K, libc::SECCOMP_RET_ALLOW)],
        Verdict::Eperm => vec![stmt(RET_K, RET_EPERM)],
        Verdict::Enosys => vec![stmt(RET_K, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32)],
        Verdict::Clone => vec![
            stmt(LD_W_ABS, ARG0_LOW),
            jump(JSET_K, CLONE_NAMESPACE_FLAGS, 0, 1),
            stmt(RET_K, RET_EPERM),
            stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        ],
        Verdict::Personality => one_of(ARG0_LOW, &ALLOWED_PERSONALITIES),
        Verdict::Socket => one_of(ARG0_LOW, &ALLOWED_SOCKET_FAMILIES),
        Verdict::SocketPair => one_of(ARG0_LOW, &[libc::AF_UNIX as u32]),
    }
}

/// Allows the call when the 32-bit word at `offset` is one of `values`, else EPERM.
fn one_of(offset: u32, values: &[u32]) -> BpfProgram {
    let mut code = vec![stmt(LD_W_ABS, offset)];
    let n = values.len();
    for (i, value) in values.iter().enumerate() {
        // Matched: jump past the remaining comparisons and the refusal.
        code.push(jump(JEQ_K, *value, (n - i) as u8, 0));
    }
    code.push(stmt(RET_K, RET_EPERM));
    code.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
    code
}

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
const RET_EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// Offsets in `struct seccomp_data`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    const KILL_PROCESS: u32 = libc::SECCOMP_RET_KILL_PROCESS;

    /// What the kernel decides for one x86_64 syscall under the default filters.
    fn verdict(nr: i64, args: [u64; 6]) -> u32 {
        verdict_for_arch(AUDIT_ARCH_X86_64, nr, args)
    }

    /// Runs the filter over a `struct seccomp_data` as the kernel would.
    fn verdict_for_arch(arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, arg) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&arg.to_le_bytes());
        }
        static PROGRAM: std::sync::LazyLock<BpfProgram> = std::sync::LazyLock::new(default_filter);
        run(&PROGRAM, &data)
    }

    /// A classic BPF interpreter for the instructions [`default_filter`] emits.
    fn run(program: &[libc::sock_filter], data: &[u8; 64]) -> u32 {
        const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
        const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
        const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
        const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
        const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
        const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
        const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
        const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let insn = &program[pc];
            pc += 1;
            let jump = |taken: bool| usize::from(if taken { insn.jt } else { insn.jf });
            match insn.code {
                LD_W_ABS => {
                    let k = insn.k as usize;
                    a = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                }
                AND_K => a &= insn.k,
                JA => pc += insn.k as usize,
                JEQ_K => pc += jump(a == insn.k),
                JGT_K => pc += jump(a > insn.k),
                JGE_K => pc += jump(a >= insn.k),
                JSET_K => pc += jump(a & insn.k != 0),
                RET_K => return insn.k,
                code => panic!("unexpected BPF instruction {code:#x} at {}", pc - 1),
            }
        }
    }

    #[test]
    fn the_filter_is_small_and_every_jump_lands_inside_it() {
        let program = default_filter();
        eprintln!("{} instructions", program.len());
        // Far below the kernel's BPF_MAXINSNS (4096); the point of compiling it here.
        assert!(program.len() < 256, "{} instructions", program.len());
        for (pc, insn) in program.iter().enumerate() {
            let next = pc + 1;
            let targets = match insn.code {
                JA => vec![next + insn.k as usize],
                RET_K => vec![],
                LD_W_ABS => vec![next],
                _ => vec![next + usize::from(insn.jt), next + usize::from(insn.jf)],
            };
            assert!(targets.iter().all(|&t| t < program.len()), "jump out at {pc}");
        }
        assert_eq!(program.last().unwrap().code, RET_K, "the program must end in a return");
    }

    #[test]
    fn every_number_gets_the_verdict_of_the_table() {
        let expect = |nr: u32, args: [u64; 6]| match verdict_of(nr.min(TABLE_END)) {
            Verdict::Allow => ALLOW,
            Verdict::Eperm => EPERM,
            Verdict::Enosys => ENOSYS,
            Verdict::Clone if args[0] as u32 & CLONE_NAMESPACE_FLAGS == 0 => ALLOW,
            Verdict::Personality if ALLOWED_PERSONALITIES.contains(&(args[0] as u32)) => ALLOW,
            Verdict::Socket if ALLOWED_SOCKET_FAMILIES.contains(&(args[0] as u32)) => ALLOW,
            Verdict::SocketPair if args[0] as u32 == libc::AF_UNIX as u32 => ALLOW,
            Verdict::Clone | Verdict::Personality | Verdict::Socket | Verdict::SocketPair => EPERM,
        };
        let argument_sets = [[0; 6], [u64::MAX; 6], [libc::SIGCHLD as u64, 1, 2, 3, 4, 5]];
        for nr in (0..2048).chain([0x3fff_ffff, u32::MAX >> 2]) {
            for args in argument_sets {
                assert_eq!(verdict(i64::from(nr), args), expect(nr, args), "syscall {nr}");
            }
        }
    }

    #[test]
    fn allow_list_has_no_duplicates() {
        let unique: std::collections::BTreeSet<_> = ALLOWED.iter().collect();
        assert_eq!(unique.len(), ALLOWED.len());
    }

    #[test]
    fn listed_syscalls_pass_whatever_their_arguments() {
        for &nr in ALLOWED {
            assert_eq!(verdict(nr, [u64::MAX; 6]), ALLOW, "syscall {nr}");
            assert_eq!(verdict(nr, [0; 6]), ALLOW, "syscall {nr}");
        }
    }

    #[test]
    fn everything_else_fails_with_eperm_including_unknown_numbers() {
        let refused = [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_name_to_handle_at,
            libc::SYS_open_by_handle_at,
            libc::SYS_io_uring_setup,
            libc::SYS_bpf,
            libc::SYS_keyctl,
            libc::SYS_kexec_file_load,
            libc::SYS_acct,
            libc::SYS_pivot_root,
            libc::SYS_userfaultfd,
            libc::SYS_perf_event_open,
            libc::SYS_sethostname,
            libc::SYS_mseal,
            467, // open_tree_attr
            470, // listns, newer than this list
            1000,
        ];
        for nr in refused {
            assert_eq!(verdict(nr, [0; 6]), EPERM, "syscall {nr}");
        }
    }

    #[test]
    fn clone_passes_without_namespace_flags_only() {
        let fork = libc::SIGCHLD as u64;
        let thread = 0x003d_0f00; // glibc's pthread_create flags
        assert_eq!(verdict(libc::SYS_clone, [fork, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(verdict(libc::SYS_clone, [thread, 0, 0, 0, 0, 0]), ALLOW);
        for flag in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWCGROUP,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
        ] {
            let flags = fork | flag as u64;
            assert_eq!(verdict(libc::SYS_clone, [flags, 0, 0, 0, 0, 0]), EPERM, "{flag:#x}");
            // The kernel reads the low 32 bits only; high bits hide nothing.
            let flags = flags | 1 << 40;
            assert_eq!(verdict(libc::SYS_clone, [flags, 0, 0, 0, 0, 0]), EPERM, "{flag:#x}");
        }
    }

    #[test]
    fn clone3_fails_with_enosys_so_that_libc_falls_back_to_clone() {
        assert_eq!(verdict(libc::SYS_clone3, [0; 6]), ENOSYS);
    }

    #[test]
    fn personality_admits_dockers_values_only() {
        for persona in ALLOWED_PERSONALITIES {
            assert_eq!(verdict(libc::SYS_personality, [persona.into(), 0, 0, 0, 0, 0]), ALLOW);
        }
        for persona in [0x4_0000, 0x40_0000, 0x4_0008, 0x0800_0000, 0x1] {
            let args = [persona, 0, 0, 0, 0, 0];
            assert_eq!(verdict(libc::SYS_personality, args), EPERM, "{persona:#x}");
        }
    }

    #[test]
    fn socket_admits_only_the_allowed_families() {
        for family in
            [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK, libc::AF_PACKET]
        {
            let args = [family as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
            assert_eq!(verdict(libc::SYS_socket, args), ALLOW, "family {family}");
        }
        for family in [libc::AF_ALG, libc::AF_VSOCK, libc::AF_TIPC, libc::AF_RDS, 0, 46, 255] {
            let args = [family as u64, libc::SOCK_SEQPACKET as u64, 0, 0, 0, 0];
            assert_eq!(verdict(libc::SYS_socket, args), EPERM, "family {family}");
        }
        // The kernel reads the family as an int: high bits must not smuggle it past.
        let alg = libc::AF_ALG as u64;
        assert_eq!(verdict(libc::SYS_socket, [1 << 32 | alg, 5, 0, 0, 0, 0]), EPERM);
        assert_eq!(verdict(libc::SYS_socketpair, [libc::AF_UNIX as u64, 1, 0, 0, 0, 0]), ALLOW);
        assert_eq!(verdict(libc::SYS_socketpair, [libc::AF_TIPC as u64, 1, 0, 0, 0, 0]), EPERM);
    }

    #[test]
    fn foreign_calling_conventions_are_refused() {
        // x32: the x86_64 arch with bit 30 set in the number.
        assert_eq!(verdict(0x4000_0000 | libc::SYS_read, [0; 6]), EPERM);
        // i386 `int 0x80`: the process is killed, whatever the number.
        assert_eq!(verdict_for_arch(AUDIT_ARCH_I386, 20, [0; 6]), KILL_PROCESS);
        assert_eq!(verdict_for_arch(AUDIT_ARCH_I386, 0, [0; 6]), KILL_PROCESS);
    }
}
