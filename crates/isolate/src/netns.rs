//! A pool of network namespaces made ahead of time, so that a burst of creates
//! does not make them while it waits.
//!
//! Making a network namespace is the dearest single step of a create: the
//! kernel runs the init of every per-namespace subsystem (sysctl tables,
//! loopback, routing, netfilter), about 0.8 ms of CPU. The pool's thread makes
//! them while no create runs, each with `lo` up, and a create without a user
//! namespace takes one ([`NetnsPool::take`]): the cloning thread enters it
//! just for the clone, so the child is born in it (see [`crate::spawn`]).
//!
//! Every pooled namespace is fresh and goes to one sandbox only; it is exactly
//! what `CLONE_NEWNET` would have made, with `lo` already up. A sandbox with a
//! user namespace does not use the pool: its network namespace must belong to
//! its user namespace, so that its root may configure it.
//!
//! Each idle namespace costs about 130 KiB of kernel memory.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the pool's thread waits after it failed to make a namespace.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long no create must have run before the pool is refilled: the gaps
/// between the creates of one burst are shorter.
const QUIET: Duration = Duration::from_millis(250);

/// Network namespaces ready to be entered, refilled in the background.
#[derive(Debug)]
pub(crate) struct NetnsPool {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct State {
    ready: Vec<OwnedFd>,
    target: usize,
    /// Creates under way: the pool is refilled only when there are none, so
    /// that refilling never takes CPU from a burst of creates.
    busy: usize,
    /// When the last create ended; `None` before the first.
    idle_since: Option<Instant>,
    /// Namespaces handed out since the pool started.
    taken: u64,
    closed: bool,
}

/// What [`crate::Driver::netns_pool`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsPoolStats {
    /// Namespaces ready now.
    pub ready: usize,
    /// Namespaces handed to sandboxes so far.
    pub taken: u64,
}

impl NetnsPool {
    /// Starts the thread that keeps `target` namespaces ready, refilling once no
    /// create has run for a moment.
    pub(crate) fn start(target: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared::default());
        shared.lock().target = target;
        let thread = std::thread::Builder::new().name("hutch-netns-pool".into()).spawn({
            let shared = shared.clone();
            move || refill(&shared)
        })?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// A fresh namespace with `lo` up, if one is ready.
    pub(crate) fn take(&self) -> Option<OwnedFd> {
        let mut state = self.shared.lock();
        let netns = state.ready.pop();
        state.taken += u64::from(netns.is_some());
        self.shared.wake.notify_one();
        drop(state);
        netns
    }

    /// Marks a create under way until the guard is dropped.
    pub(crate) fn busy(&self) -> BusyGuard<'_> {
        self.shared.lock().busy += 1;
        BusyGuard { shared: &self.shared }
    }

    pub(crate) fn stats(&self) -> NetnsPoolStats {
        let state = self.shared.lock();
        NetnsPoolStats { ready: state.ready.len(), taken: state.taken }
    }

    #[cfg(test)]
    fn ready(&self) -> usize {
        self.stats().ready
    }
}

impl Drop for NetnsPool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The namespaces go with their last descriptors, dropped with `shared`.
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// See [`NetnsPool::busy`].
#[derive(Debug)]
pub(crate) struct BusyGuard<'a> {
    shared: &'a Shared,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.busy -= 1;
        if state.busy == 0 {
            state.idle_since = Some(Instant::now());
            self.shared.wake.notify_one();
        }
    }
}

fn refill(shared: &Shared) {
    // Refilling is background work: below every create and every sandbox.
    // SAFETY: setpriority on this thread (who 0 = the caller); raising our own
    // nice value needs no privilege.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    let mut state = shared.lock();
    loop {
        if state.closed {
            return;
        }
        if state.ready.len() >= state.target || state.busy > 0 {
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        let quiet_for = state.idle_since.map_or(QUIET, |since| since.elapsed());
        if quiet_for < QUIET {
            state = shared
                .wake
                .wait_timeout(state, QUIET - quiet_for)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        drop(state);
        let made = new_netns();
        state = shared.lock();
        match made {
            Ok(netns) => state.ready.push(netns),
            Err(error) => {
                tracing::warn!(%error, "cannot make a network namespace for the pool");
                state = shared
                    .wake
                    .wait_timeout(state, RETRY_AFTER)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }
}

/// Makes a network namespace with `lo` up. The calling thread is left in it,
/// which for the pool's thread, which does nothing else, is harmless.
fn new_netns() -> io::Result<OwnedFd> {
    // SAFETY: unshare(CLONE_NEWNET) moves only this thread into a new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let netns: OwnedFd = File::open("/proc/thread-self/ns/net")?.into();
    loopback_up()?;
    Ok(netns)
}

/// Sets `lo` up in this thread's network namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a new socket we own at once.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `sock` is a fresh descriptor nothing else owns.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
    // SAFETY: ifreq is plain old data; the ioctls read and write only it.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs `f` with the calling thread in the network namespace `netns`, and
/// brings the thread back to its own afterwards.
///
/// # Panics
/// Aborts the process if the thread cannot return to its namespace: it would
/// otherwise go on serving other work inside a sandbox's network.
pub(crate) fn while_in<T>(netns: BorrowedFd<'_>, f: impl FnOnce() -> T) -> io::Result<T> {
    let own: OwnedFd = File::open("/proc/thread-self/ns/net")?.into();
    // SAFETY: setns on descriptors of network namespaces; it changes only this
    // thread's namespace.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let result = f();
    // SAFETY: as above, back into the namespace we opened before leaving it.
    if unsafe { libc::setns(own.as_fd().as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        let error = io::Error::last_os_error();
        eprintln!("hutch-isolate: cannot return to the driver's network namespace: {error}");
        std::process::abort();
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn loopback_is_up() -> bool {
        // SAFETY: a socket we close below; ifreq is plain old data.
        unsafe {
            let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            assert!(sock >= 0);
            let mut req: libc::ifreq = std::mem::zeroed();
            for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
                *dst = *src as libc::c_char;
            }
            assert_eq!(libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req), 0);
            libc::close(sock);
            req.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short != 0
        }
    }

    fn namespace_of(path: &str) -> u64 {
        std::fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn the_pool_fills_waits_for_creates_and_hands_out_distinct_namespaces() {
        let pool = NetnsPool::start(3).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.ready() < 3 {
            assert!(std::time::Instant::now() < deadline, "the pool never filled");
            std::thread::sleep(Duration::from_millis(5));
        }
        let busy = pool.busy();
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        let own = namespace_of("/proc/thread-self/ns/net");
        let ino = |fd: &OwnedFd| File::from(fd.try_clone().unwrap()).metadata().unwrap().ino();
        assert!(ino(&a) != ino(&b) && ino(&a) != own && ino(&b) != own);
        // While a create is under way nothing is made. (Proving that something does
        // not happen takes a wait; a wrong pool refills in well under this.)
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(pool.ready(), 1);
        drop(busy);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.ready() < 3 {
            assert!(std::time::Instant::now() < deadline, "the pool never refilled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn while_in_enters_the_namespace_and_comes_back() {
        let pool = NetnsPool::start(1).unwrap();
        let netns = loop {
            if let Some(netns) = pool.take() {
                break netns;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let own = namespace_of("/proc/thread-self/ns/net");
        let pooled = File::from(netns.try_clone().unwrap()).metadata().unwrap().ino();
        let (inside, lo_up) = while_in(netns.as_fd(), || {
            (namespace_of("/proc/thread-self/ns/net"), loopback_is_up())
        })
        .unwrap();
        assert_eq!(inside, pooled);
        assert!(lo_up);
        assert_eq!(namespace_of("/proc/thread-self/ns/net"), own);
    }
}
