//! Native sandbox driver: turns a [`SandboxSpec`] into an isolated, limited process
//! tree whose PID 1 is sandboxd.
//!
//! A sandbox is a child cloned into new mount, pid, uts, ipc, net and cgroup
//! namespaces, and with [`SandboxSpec::user_namespace`] into a user namespace that
//! owns them all (`userns.rs`: id maps, idmapped image layers). The child assembles its root (an overlayfs over read-only image layers
//! with a tmpfs upper sized to the disk limit) entirely inside its own mount
//! namespace, pivots into it, drops to Docker's default capabilities, sets
//! `no_new_privs`, installs a Docker-like seccomp filter and execs sandboxd. The parent
//! meanwhile puts it into per-sandbox cgroups and records it on disk, so that another
//! process can adopt it after a restart and sweep what a crash left behind.
//!
//! Host artefacts of sandbox `ID`: `{run_dir}/ID/` (state.json, sandboxd.log, `root/`
//! where the child mounts its scratch tmpfs, `sandboxd/` bind-mounted at /.hutch/run,
//! with a user namespace `mnt/`, the empty mount points of its idmapped layers) and a
//! `hutch-ID` cgroup per controller. No mount is ever made in the host's namespace.

mod cgroup;
mod netns;
mod rootfs;
mod seccomp;
mod socket;
mod spawn;
mod spec;
mod state;
mod userns;

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, NulError};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;

use hutch_net::NetManager;
use tokio::io::AsyncReadExt;
use tokio::io::unix::AsyncFd;

pub use cgroup::{CgroupError, CgroupLayout, SandboxCgroup};
pub use rootfs::{PlanMountsError, PrepareImageError};
pub use spec::{Egress, InvalidSandboxId, Limits, Rootfs, SandboxId, SandboxSpec};
pub use userns::{IdRange, InvalidIdRange, SetUpUserNamespaceError};

pub use netns::NetnsPoolStats;
use spawn::{ChildFds, ChildPlan, STEP_BASE, Step};
use state::{StateFile, proc_start_time};

/// The tag sandboxd gives a sandbox's main command ([`SandboxSpec::command`]), so it
/// is `GET /processes/main` in sandboxd's API.
pub const MAIN_TAG: &str = "main";
/// How much of sandboxd's log a failed create reports.
const LOG_TAIL_BYTES: u64 = 4096;
/// How long sandboxd gets to report readiness.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the kernel gets to tear down a killed sandbox before we give up.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// File-descriptor limit of sandboxd and its processes (capped by our own hard limit:
/// this host withholds CAP_SYS_RESOURCE).
const NOFILE: u64 = 1 << 20;
/// sandboxd's socket in a sandbox's dir (see `socket.rs`).
const SOCKET_NAME: &str = "sock";
/// Where sandboxd of earlier versions bound its own socket: a directory under the
/// sandbox's dir that was mounted at /.hutch/run, writable from inside until sealed.
const LEGACY_SANDBOXD_DIR: &str = "sandboxd";
/// The OOM score sandboxd gives every process it starts: the highest, so that in a
/// sandbox out of memory the kernel kills one of them and never sandboxd (whose death
/// ends the sandbox), and so that on a host out of memory sandboxes go first.
const CHILD_OOM_SCORE_ADJ: i32 = 1000;
/// How long a failed create keeps reading sandboxd's log once it has exited: a
/// process of the sandbox may hold the pipe open.
const LOG_DRAIN: Duration = Duration::from_millis(200);
/// The directory under a sandbox's dir holding the mount points of a sandbox with a
/// user namespace (see `userns.rs`).
const MOUNT_POINTS_DIR: &str = "mnt";

/// Where the driver keeps its files and what it runs.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// The prepared images (e.g. `/var/lib/hutch`).
    pub state_dir: PathBuf,
    /// Per-sandbox state, log and sandboxd's socket (e.g. `/run/hutch`). Sandboxes do
    /// not survive a reboot, so like runc's `/run/runc` this belongs on a tmpfs, which
    /// also keeps directory operations off the create and destroy paths' disk.
    pub run_dir: PathBuf,
    /// A statically linked sandboxd on the host, bind-mounted into every sandbox.
    pub sandboxd_path: PathBuf,
    /// Name of the cgroup created beneath our own that holds the sandbox cgroups;
    /// `hutch` when `None`.
    pub cgroup_parent: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NewDriverError {
    #[error("create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sandboxd binary {path} is not a regular file")]
    Sandboxd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("prepare images")]
    Images(#[from] PrepareImageError),
    #[error("set up cgroups")]
    Cgroup(#[from] CgroupError),
    #[error("read /proc/sys/kernel/cap_last_cap")]
    LastCap(#[source] io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum CreateSandboxError {
    #[error("sandbox {0} already exists")]
    AlreadyExists(SandboxId),
    #[error("{feature} is not supported yet")]
    Unsupported { feature: &'static str },
    #[error("hostname {0:?} is not valid")]
    InvalidHostname(String),
    #[error("working directory {0:?} is not an absolute path without '..'")]
    InvalidWorkingDir(String),
    #[error("spec contains a NUL byte")]
    Nul(#[from] NulError),
    #[error("plan mounts")]
    Mounts(#[from] PlanMountsError),
    #[error("refresh the host image")]
    HostImage(#[from] PrepareImageError),
    #[error("create {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("create cgroup")]
    Cgroup(#[from] CgroupError),
    #[error("clone the sandbox's init")]
    Clone(#[source] io::Error),
    #[error("sandbox init failed at {step}")]
    Child {
        step: String,
        #[source]
        source: io::Error,
    },
    /// sandboxd (or the main command it starts) failed; `output` is the end of its log,
    /// which is removed with the rest of the failed sandbox.
    #[error("sandboxd exited before it was ready: {output}")]
    SandboxdExited { output: String },
    #[error("sandboxd was not ready within {0:?}")]
    ReadyTimeout(Duration),
    #[error("write sandbox state")]
    State(#[from] state::StateError),
    #[error("wait for sandboxd")]
    Wait(#[source] io::Error),
    #[error("attach the sandbox's network")]
    Network(#[from] hutch_net::AttachNetworkError),
    #[error("set up the sandbox's user namespace")]
    UserNamespace(#[from] SetUpUserNamespaceError),
}

#[derive(Debug, thiserror::Error)]
pub enum StopSandboxError {
    #[error("no sandbox {0}")]
    NotFound(SandboxId),
    #[error("signal sandbox init")]
    Signal(#[source] io::Error),
    #[error("sandbox did not exit within {0:?} of SIGKILL")]
    KillTimeout(Duration),
    #[error("kill processes in cgroup")]
    Cgroup(#[from] CgroupError),
}

#[derive(Debug, thiserror::Error)]
pub enum FinishSandboxError {
    #[error("no sandbox {0}")]
    NotFound(SandboxId),
    #[error("detach the sandbox's network")]
    Network(#[from] hutch_net::DetachNetworkError),
}

#[derive(Debug, thiserror::Error)]
pub enum DestroySandboxError {
    #[error("no sandbox {0}")]
    NotFound(SandboxId),
    #[error("stop sandbox")]
    Stop(#[from] StopSandboxError),
    #[error("remove host artefacts")]
    Teardown(#[from] TeardownError),
}

#[derive(Debug, thiserror::Error)]
pub enum InspectSandboxError {
    #[error("no sandbox {0}")]
    NotFound(SandboxId),
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("read {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remove leftovers of sandbox {id}")]
    Teardown {
        id: String,
        #[source]
        source: TeardownError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("sweep sandbox networks")]
    Network(#[source] hutch_net::NetSweepError),
    #[error("read {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remove leftovers of sandbox {id}")]
    Teardown {
        id: String,
        #[source]
        source: TeardownError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectPortError {
    #[error("no sandbox {0}")]
    NotFound(SandboxId),
    #[error("sandbox {0} is not running")]
    NotRunning(SandboxId),
    #[error("enter the sandbox's network namespace")]
    Setns(#[source] io::Error),
    #[error("connect to 127.0.0.1:{port} in the sandbox")]
    Connect {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("nothing accepted a connection to 127.0.0.1:{port} in the sandbox within {after:?}")]
    Timeout { port: u16, after: Duration },
    #[error("create a socket in the sandbox's network namespace")]
    Socket(#[source] io::Error),
    #[error("run the connecting thread")]
    Thread(#[source] io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectSandboxdError {
    #[error("no sandbox {0}")]
    NotFound(SandboxId),
    #[error("connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read the credentials of the socket's peer")]
    PeerCredentials(#[source] io::Error),
    /// The socket is not served by the sandbox's PID 1: something else listens on
    /// the path. Never connected through.
    #[error(
        "the socket of sandbox {id} is served by pid {found}, not by its sandboxd (pid {expected})"
    )]
    WrongPeer { id: SandboxId, expected: i32, found: i32 },
}

#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error("cgroup")]
    Cgroup(#[from] CgroupError),
    #[error("cgroup still busy {0:?} after killing its processes")]
    CgroupBusy(Duration),
    #[error("remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("detach the sandbox's network")]
    Network(#[from] hutch_net::DetachNetworkError),
}

/// Lifecycle state of a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxState {
    Running,
    Exited,
}

/// How the sandbox's PID 1 ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// PID 1 was adopted, so its status went to another parent.
    Unknown,
}

/// Why a sandbox ended, or what went wrong in a running one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Stopped through [`Driver::stop`] or [`Driver::destroy`].
    Stopped,
    /// The kernel's OOM killer killed a process in the sandbox (a running sandbox
    /// keeps running if PID 1 survived).
    Oom,
    /// PID 1 exited on its own.
    Exited,
}

/// A snapshot of one sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxInfo {
    pub id: SandboxId,
    pub state: SandboxState,
    /// Host pid of the sandbox's PID 1.
    pub pid: i32,
    /// The sandbox's address on the host bridge, reachable from the host (the proxy);
    /// `None` with egress `none`, where [`Driver::connect_port`] is the way in.
    pub address: Option<Ipv4Addr>,
    pub exit: Option<ExitStatus>,
    pub reason: Option<Reason>,
    /// Processes killed by the OOM killer in the sandbox's cgroup.
    pub oom_kills: u64,
}

/// Result of [`Driver::adopt`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdoptReport {
    /// Running sandboxes now managed by this driver.
    pub adopted: Vec<SandboxId>,
    /// Dead sandboxes whose leftovers were removed.
    pub removed: Vec<String>,
}

/// Result of [`Driver::sweep`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Ids whose leftovers (state dir, run dir, cgroups) were removed.
    pub removed: Vec<String>,
}

#[derive(Debug)]
struct Sandbox {
    id: SandboxId,
    pid: i32,
    pidfd: OwnedFd,
    /// Whether we cloned it (and so can reap it and read its exit status).
    is_child: bool,
    cgroup: SandboxCgroup,
    /// Address on the host bridge (egress internet only).
    address: Option<Ipv4Addr>,
    /// sandboxd's socket on the host.
    socket: PathBuf,
    /// [`Driver::finish`] took its network away.
    finished: AtomicBool,
    stop_requested: AtomicBool,
    exit: Mutex<Option<ExitStatus>>,
}

impl Sandbox {
    fn exit(&self) -> MutexGuard<'_, Option<ExitStatus>> {
        // A poisoned lock only means another thread panicked while holding a plain
        // value; the value is still meaningful.
        self.exit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reaps PID 1 if it has exited; returns its status once it has.
    fn poll_exit(&self) -> Option<ExitStatus> {
        let mut exit = self.exit();
        if exit.is_some() {
            return *exit;
        }
        let mut pfd = libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd with a zero timeout.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        if ready <= 0 {
            return None;
        }
        let status = if self.is_child {
            // SAFETY: siginfo_t is plain old data filled in by waitid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on our own child's pidfd.
            let ret = unsafe {
                libc::waitid(
                    libc::P_PIDFD,
                    self.pidfd.as_raw_fd() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::__WALL | libc::WNOHANG,
                )
            };
            // SAFETY: si_status is valid for SIGCHLD-style siginfo filled by waitid.
            let si_status = unsafe { info.si_status() };
            match (ret, info.si_code) {
                (0, libc::CLD_EXITED) => ExitStatus::Code(si_status),
                (0, libc::CLD_KILLED | libc::CLD_DUMPED) => ExitStatus::Signal(si_status),
                _ => ExitStatus::Unknown,
            }
        } else {
            ExitStatus::Unknown
        };
        *exit = Some(status);
        *exit
    }

    fn info(&self) -> SandboxInfo {
        let exit = self.poll_exit();
        let oom_kills = self.cgroup.oom_kills().unwrap_or(0);
        let reason = match exit {
            Some(_) if self.stop_requested.load(Ordering::Relaxed) => Some(Reason::Stopped),
            _ if oom_kills > 0 => Some(Reason::Oom),
            Some(_) => Some(Reason::Exited),
            None => None,
        };
        SandboxInfo {
            id: self.id.clone(),
            state: if exit.is_some() { SandboxState::Exited } else { SandboxState::Running },
            pid: self.pid,
            address: self.address.filter(|_| !self.finished.load(Ordering::Relaxed)),
            exit,
            reason,
            oom_kills,
        }
    }

    fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal on our pidfd; the pidfd makes it immune to pid reuse.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        match ret {
            0 => Ok(()),
            _ => {
                let err = io::Error::last_os_error();
                // ESRCH: it already exited, which is what we wanted.
                if err.raw_os_error() == Some(libc::ESRCH) { Ok(()) } else { Err(err) }
            }
        }
    }

    /// Waits until PID 1 has exited, up to `timeout`. Returns whether it has.
    async fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        if self.poll_exit().is_some() {
            return Ok(true);
        }
        let pidfd = self.pidfd.try_clone()?;
        // SAFETY: the AsyncFd owns `pidfd`, an OwnedFd, which stays open and refers to
        // the same pidfd until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        let _ = tokio::time::timeout(timeout, fd.readable()).await;
        Ok(self.poll_exit().is_some())
    }
}

/// The native sandbox driver. Owns nothing global except what is named after the ids
/// of its sandboxes.
#[derive(Debug)]
pub struct Driver {
    config: DriverConfig,
    images: rootfs::Images,
    cgroups: CgroupLayout,
    seccomp: Vec<seccomp::BpfProgram>,
    last_cap: u32,
    nofile: u64,
    network: Option<Arc<NetManager>>,
    /// Host ids of sandboxes with [`SandboxSpec::user_namespace`]; all share them, as
    /// Docker's userns-remap does.
    user_ids: IdRange,
    /// Network namespaces made ahead of time ([`Driver::with_netns_pool`]).
    netns_pool: Option<netns::NetnsPool>,
    sandboxes: Mutex<HashMap<SandboxId, Arc<Sandbox>>>,
    /// Ids being created, reserved so that two creates of one id cannot race.
    creating: Mutex<HashSet<SandboxId>>,
}

impl Driver {
    pub fn new(config: DriverConfig) -> Result<Self, NewDriverError> {
        for dir in [config.state_dir.clone(), config.run_dir.clone()] {
            fs::create_dir_all(&dir)
                .map_err(|source| NewDriverError::CreateDir { path: dir.clone(), source })?;
        }
        let meta = fs::metadata(&config.sandboxd_path).and_then(|m| {
            if m.is_file() { Ok(m) } else { Err(io::Error::from(io::ErrorKind::InvalidInput)) }
        });
        if let Err(source) = meta {
            return Err(NewDriverError::Sandboxd { path: config.sandboxd_path.clone(), source });
        }
        let images = rootfs::Images::prepare(&config.state_dir.join("images"))?;
        let cgroups = CgroupLayout::detect(config.cgroup_parent.as_deref().unwrap_or("hutch"))?;
        cgroups.prepare()?;
        let last_cap = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .map_err(NewDriverError::LastCap)?
            .trim()
            .parse()
            .unwrap_or(40);
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit fills the struct.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        Ok(Self {
            images,
            cgroups,
            seccomp: vec![seccomp::default_filter()],
            last_cap,
            nofile: NOFILE.min(limit.rlim_max),
            config,
            network: None,
            user_ids: IdRange::default(),
            netns_pool: None,
            sandboxes: Mutex::default(),
            creating: Mutex::default(),
        })
    }

    /// Gives sandboxes with [`Egress::Internet`] a veth on the host bridge managed by
    /// `network`. Without it, such sandboxes are refused as unsupported.
    pub fn with_network(mut self, network: Arc<NetManager>) -> Self {
        self.network = Some(network);
        self
    }

    /// Keeps `size` network namespaces made ahead of time, by a background thread
    /// while no create runs, for sandboxes without a user namespace; 0 keeps none.
    /// A burst of creates then skips the dearest step of each (about 0.8 ms of
    /// CPU), for about 130 KiB of kernel memory per idle namespace.
    pub fn with_netns_pool(mut self, size: usize) -> io::Result<Self> {
        self.netns_pool = match size {
            0 => None,
            size => Some(netns::NetnsPool::start(size)?),
        };
        Ok(self)
    }

    /// The network namespace pool's figures; `None` without a pool.
    pub fn netns_pool(&self) -> Option<NetnsPoolStats> {
        self.netns_pool.as_ref().map(netns::NetnsPool::stats)
    }

    /// The host ids that sandboxes with [`SandboxSpec::user_namespace`] run as
    /// ([`IdRange::default`] unless set here). A separate setter rather than a
    /// [`DriverConfig`] field so that existing configs stay valid.
    pub fn with_user_ids(mut self, ids: IdRange) -> Self {
        self.user_ids = ids;
        self
    }

    /// See [`Driver::with_user_ids`].
    pub fn user_ids(&self) -> IdRange {
        self.user_ids
    }

    /// The cgroup hierarchy sandboxes are placed in.
    pub fn cgroup_layout(&self) -> &CgroupLayout {
        &self.cgroups
    }

    /// The cgroup(s) of a sandbox (present while it exists).
    pub fn cgroup(&self, id: &SandboxId) -> SandboxCgroup {
        self.cgroups.sandbox(id)
    }

    /// Host path of sandboxd's unix socket in a sandbox. Tests and benches may
    /// connect to it directly; the platform uses [`Driver::connect_sandboxd`], which
    /// also checks who answers.
    pub fn sandboxd_socket(&self, id: &SandboxId) -> PathBuf {
        match self.get(id) {
            Some(sandbox) => sandbox.socket.clone(),
            None => self.sandbox_dir(id.as_str()).join(SOCKET_NAME),
        }
    }

    /// A connection to the sandbox's sandboxd, verified: the process listening on
    /// the socket must be the sandbox's PID 1 (`SO_PEERCRED`), so a connection can
    /// never end up at another sandbox's sandboxd or at any other socket on the host,
    /// whatever a sandbox did to paths it could reach.
    pub async fn connect_sandboxd(
        &self,
        id: &SandboxId,
    ) -> Result<tokio::net::UnixStream, ConnectSandboxdError> {
        let sandbox = self.get(id).ok_or_else(|| ConnectSandboxdError::NotFound(id.clone()))?;
        let stream = socket::connect(&sandbox.socket).await.map_err(|source| {
            ConnectSandboxdError::Connect { path: sandbox.socket.clone(), source }
        })?;
        let found =
            socket::peer_pid(stream.as_raw_fd()).map_err(ConnectSandboxdError::PeerCredentials)?;
        if found != sandbox.pid {
            return Err(ConnectSandboxdError::WrongPeer {
                id: id.clone(),
                expected: sandbox.pid,
                found,
            });
        }
        Ok(stream)
    }

    /// Host side of a user namespace before the clone: mount points for the mounts the
    /// parent places in the child's namespace (see `userns.rs`). The overlay's upper
    /// and work dirs need nothing: the child makes them on a tmpfs it mounts itself,
    /// as its own root.
    fn prepare_user_namespace(
        &self,
        dir: &Path,
        lowers: &[PathBuf],
    ) -> Result<UserNamespacePlan, CreateSandboxError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| CreateSandboxError::Io { path, source }
        };
        let mounts = dir.join(MOUNT_POINTS_DIR);
        fs::create_dir(&mounts).map_err(io_err(&mounts))?;
        let relative = Path::new(".").join(MOUNT_POINTS_DIR);
        let mut placements = Vec::with_capacity(lowers.len() + 1);
        let mut relative_lowers = Vec::with_capacity(lowers.len());
        for (i, lower) in lowers.iter().enumerate() {
            let name = format!("lower{i}");
            let target = mounts.join(&name);
            fs::create_dir(&target).map_err(io_err(&target))?;
            placements.push(userns::Placement { source: lower.clone(), target, idmap: true });
            relative_lowers.push(relative.join(name));
        }
        // sandboxd keeps its host owner (root, unmapped: nobody inside); it only has
        // to be executable. It is placed by the parent because the child may not be
        // able to reach its host path.
        let target = mounts.join("sandboxd");
        fs::File::create(&target).map_err(io_err(&target))?;
        placements.push(userns::Placement {
            source: self.config.sandboxd_path.clone(),
            target,
            idmap: false,
        });
        Ok(UserNamespacePlan {
            placements,
            lowers: relative_lowers,
            sandboxd: relative.join("sandboxd"),
        })
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.config.run_dir.join(id)
    }

    fn map(&self) -> MutexGuard<'_, HashMap<SandboxId, Arc<Sandbox>>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, id: &SandboxId) -> Option<Arc<Sandbox>> {
        self.map().get(id).cloned()
    }

    /// Creates and starts a sandbox; returns once sandboxd listens on its socket.
    pub async fn create(&self, spec: SandboxSpec) -> Result<SandboxInfo, CreateSandboxError> {
        let network = match spec.egress {
            Egress::None => None,
            Egress::Internet => {
                Some(self.network.clone().ok_or(CreateSandboxError::Unsupported {
                    feature: "egress internet without a network manager (Driver::with_network)",
                })?)
            }
        };
        let id = spec.id.clone();
        let _reservation = self.reserve(&id)?;
        let _busy = self.netns_pool.as_ref().map(netns::NetnsPool::busy);

        let cgroup = self.cgroups.sandbox(&id);
        let started = match self.start(&spec, &cgroup) {
            Ok(started) => started,
            Err(e) => {
                let _ = self.teardown(id.as_str(), &cgroup, None).await;
                return Err(e);
            }
        };
        let mut sandbox = Sandbox {
            id: id.clone(),
            pid: started.pid,
            pidfd: started.pidfd,
            is_child: true,
            cgroup,
            address: None,
            socket: self.sandbox_dir(id.as_str()).join(SOCKET_NAME),
            finished: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            exit: Mutex::new(None),
        };
        let result = self
            .finish_start(&mut sandbox, network.as_deref(), started.sync_w, started.host_image)
            .await;
        let result = match result {
            Ok(()) => {
                self.wait_ready(
                    started.ready_r,
                    started.log_r,
                    started.err_r,
                    &started.memory.plan().ops,
                )
                .await
            }
            // The child closed its end of the sync pipe: it failed (and exited), and
            // said where.
            Err(CreateSandboxError::Wait(e)) if e.raw_os_error() == Some(libc::EPIPE) => {
                Err(child_failure(started.err_r, &started.memory.plan().ops)
                    .unwrap_or(CreateSandboxError::Wait(e)))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let _ = sandbox.signal(libc::SIGKILL);
            let _ = sandbox.wait_exit(KILL_TIMEOUT).await;
            let _ = self.teardown(id.as_str(), &sandbox.cgroup, network.as_deref()).await;
            // Only now may the child's memory go: it has been reaped (or, if not, the
            // memory is leaked rather than freed under it).
            drop(started.memory);
            return Err(e);
        }
        // sandboxd is ready, so the child has exec'd and left our memory.
        drop(started.memory);
        let sandbox = Arc::new(sandbox);
        self.map().insert(id, sandbox.clone());
        Ok(sandbox.info())
    }

    /// Wires the network (while the child still waits), records the sandbox on disk
    /// and releases the child.
    async fn finish_start(
        &self,
        sandbox: &mut Sandbox,
        network: Option<&NetManager>,
        sync_w: OwnedFd,
        host_image: Option<String>,
    ) -> Result<(), CreateSandboxError> {
        if let Some(network) = network {
            // Our unreaped child: its pid cannot be reused while we hold it.
            let netns = PathBuf::from(format!("/proc/{}/ns/net", sandbox.pid));
            let net =
                network.attach(sandbox.id.as_str(), &netns, hutch_net::Egress::Internet).await?;
            sandbox.address = net.address;
        }
        StateFile {
            id: sandbox.id.to_string(),
            pid: sandbox.pid,
            start_time: proc_start_time(sandbox.pid).unwrap_or(0),
            cgroup: sandbox.cgroup.clone(),
            address: sandbox.address,
            socket: Some(sandbox.socket.clone()),
            host_image,
        }
        .write(&self.sandbox_dir(sandbox.id.as_str()))?;
        // Release the child: it is in its cgroups, wired and on record.
        write_byte(&sync_w).map_err(CreateSandboxError::Wait)
    }

    fn reserve(&self, id: &SandboxId) -> Result<Reservation<'_>, CreateSandboxError> {
        let mut creating = self.creating.lock().unwrap_or_else(|e| e.into_inner());
        if self.map().contains_key(id)
            || creating.contains(id)
            || self.sandbox_dir(id.as_str()).exists()
        {
            return Err(CreateSandboxError::AlreadyExists(id.clone()));
        }
        creating.insert(id.clone());
        Ok(Reservation { driver: self, id: id.clone() })
    }

    /// Everything up to releasing the child: directories, cgroups, the clone, the
    /// state file. Synchronous because the plan holds raw pointers and takes well
    /// under a millisecond.
    fn start(
        &self,
        spec: &SandboxSpec,
        cgroup: &SandboxCgroup,
    ) -> Result<Started, CreateSandboxError> {
        let id = &spec.id;
        let dir = self.sandbox_dir(id.as_str());
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| CreateSandboxError::Io { path, source }
        };
        for path in [&dir, &rootfs::scratch_dir(&dir)] {
            fs::create_dir(path).map_err(io_err(path))?;
        }
        let host_image = match spec.rootfs {
            Rootfs::Host => Some(self.images.host()?),
            Rootfs::Layers { .. } => None,
        };
        let lowers = rootfs::lower_dirs(
            &self.images,
            host_image.as_deref().unwrap_or(Path::new("/nonexistent")),
            &spec.rootfs,
        )?;
        let userns = spec.user_namespace.then(|| self.prepare_user_namespace(&dir, &lowers));
        let userns = userns.transpose()?;
        // A user namespace must own its network namespace (see `netns`).
        let pooled_netns =
            if userns.is_none() { self.netns_pool.as_ref().and_then(|p| p.take()) } else { None };
        cgroup.create(&spec.limits)?;

        // With a user namespace the plan names the sandbox's files relative to its
        // directory, the child's working directory: its root may not search the host
        // directories above (see `spawn_in`).
        let (plan_dir, sandboxd, plan_lowers) = match &userns {
            None => (dir.as_path(), self.config.sandboxd_path.as_path(), &lowers),
            Some(userns) => (Path::new("."), userns.sandboxd.as_path(), &userns.lowers),
        };
        let ops = rootfs::plan_mounts(
            &self.images,
            &spec.rootfs,
            &rootfs::SandboxPaths {
                dir: plan_dir,
                sandboxd,
                disk_bytes: spec.limits.disk_bytes,
                lowers: plan_lowers,
                user_namespace: userns.is_some(),
            },
        )?;
        let new_root = rootfs::new_root(plan_dir);
        let hostname = spec.hostname.clone().unwrap_or_else(|| id.to_string());
        if hostname.is_empty() || hostname.len() > 64 {
            return Err(CreateSandboxError::InvalidHostname(hostname));
        }
        let defaults: Vec<(String, String)> = vec![
            ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ("HOME".into(), "/root".into()),
            ("HOSTNAME".into(), hostname.clone()),
        ];
        let mut env = spec::merge_env(defaults, &spec.env);
        if let Some(user) = &spec.user {
            // Last, so that the spec's user wins over a HUTCH_USER in its env.
            env.retain(|(k, _)| k != "HUTCH_USER");
            env.push(("HUTCH_USER".into(), user.clone()));
        }
        let workdir = spec.working_dir.as_deref().unwrap_or("/");
        let workdir_ancestors = spec::working_dir_ancestors(workdir)
            .ok_or_else(|| CreateSandboxError::InvalidWorkingDir(workdir.to_owned()))?;
        let listen = format!("fd:{}", spawn::LISTEN_FD);
        let ready = spawn::READY_FD.to_string();
        let oom = CHILD_OOM_SCORE_ADJ.to_string();
        let mut argv = vec![
            "/.hutch/sandboxd",
            "--listen",
            &listen,
            "--ready-fd",
            &ready,
            "--child-oom-score-adj",
            &oom,
        ];
        if let Some(command) = &spec.command {
            // Once the main command exits the sandbox has ended: nothing of it may
            // go on running (its output and files stay readable).
            argv.extend(["--end-with-main", "--main-tag", MAIN_TAG, "--"]);
            argv.extend(command.iter().map(String::as_str));
        }
        let plan = ChildPlan {
            ops,
            new_root: CString::new(new_root.as_os_str().as_encoded_bytes())?,
            hostname: CString::new(hostname)?,
            rlimits: vec![
                (
                    libc::RLIMIT_NOFILE as i32,
                    libc::rlimit { rlim_cur: self.nofile, rlim_max: self.nofile },
                ),
                // A core dump may be piped to a host helper (core_pattern), so none.
                (libc::RLIMIT_CORE as i32, libc::rlimit { rlim_cur: 0, rlim_max: 0 }),
            ],
            caps_keep: spawn::default_caps_mask(),
            last_cap: self.last_cap,
            seccomp: self.seccomp.clone(),
            workdir: CString::new(workdir)?,
            workdir_ancestors: workdir_ancestors
                .into_iter()
                .map(CString::new)
                .collect::<Result<_, _>>()?,
            exe: CString::new("/.hutch/sandboxd")?,
            argv: argv.into_iter().map(CString::new).collect::<Result<_, _>>()?,
            envp: env
                .iter()
                .map(|(k, v)| CString::new(format!("{k}={v}")))
                .collect::<Result<_, _>>()?,
            user_namespace: userns.is_some(),
            loopback_up: pooled_netns.is_none(),
        };

        let socket_path = dir.join(SOCKET_NAME);
        let listen = socket::bind(&socket_path).map_err(io_err(&socket_path))?;
        let pipe = || spawn::pipe().map_err(io_err(Path::new("pipe")));
        let (log_r, log) = pipe()?;
        let (ready_r, ready_w) = pipe()?;
        let (sync_r, sync_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let fds = ChildFds { log, ready_w, listen, sync_r, err_w };
        let spawned = match userns {
            None => spawn::spawn(plan, &fds, pooled_netns.as_ref().map(AsFd::as_fd)),
            Some(_) => spawn::spawn_in(&dir, plan, &fds),
        }
        .map_err(CreateSandboxError::Clone)?;
        // The child's copies are all it needs; ours would hide its EOFs.
        drop(fds);
        let kill = |e: CreateSandboxError| {
            // SAFETY: pidfd_send_signal and waitid on the pidfd of our own child, which
            // dies at once (SIGKILL) and must be reaped: it has no exit signal, so
            // nobody else will.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    spawned.pidfd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(
                    libc::P_PIDFD,
                    spawned.pidfd.as_raw_fd() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::__WALL,
                );
            };
            e
        };

        if let Some(userns) = &userns {
            // The first byte lets the child mount; the second, after the cgroup,
            // network and state file, lets it exec.
            let released =
                userns::set_up(spawned.pid, &spawned.pidfd, self.user_ids, &userns.placements)
                    .map_err(CreateSandboxError::from)
                    .and_then(|()| write_byte(&sync_w).map_err(CreateSandboxError::Wait));
            if let Err(e) = released {
                let e = kill(e);
                // A child that failed first says where; it is gone, so this read
                // cannot block.
                let reported = err_r
                    .try_clone()
                    .ok()
                    .and_then(|err_r| child_failure(err_r, &spawned.memory.plan().ops));
                return Err(reported.unwrap_or(e));
            }
        }
        cgroup.attach(spawned.pid).map_err(|e| kill(e.into()))?;
        Ok(Started {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            sync_w,
            ready_r,
            log_r,
            err_r,
            memory: spawned.memory,
            host_image: host_image
                .and_then(|dir| dir.file_name().map(|n| n.to_string_lossy().into_owned())),
        })
    }

    /// Waits for sandboxd's ready byte, reading its log meanwhile: the log is a pipe
    /// (never a host file, see [`spawn::ChildFds`]) and sandboxd would block on a
    /// full one. The last [`LOG_TAIL_BYTES`] are kept for the error of a failed
    /// create; once sandboxd is ready the pipe is closed, and what it logs later is
    /// discarded (writes fail with `EPIPE`, which sandboxd ignores).
    async fn wait_ready(
        &self,
        ready_r: OwnedFd,
        log_r: OwnedFd,
        err_r: OwnedFd,
        ops: &[spawn::Op],
    ) -> Result<(), CreateSandboxError> {
        let mut ready = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_r)
            .map_err(CreateSandboxError::Wait)?;
        let mut log = tokio::net::unix::pipe::Receiver::from_owned_fd(log_r)
            .map_err(CreateSandboxError::Wait)?;
        let mut tail = LogTail::default();
        let mut byte = [0u8; 1];
        let mut chunk = vec![0u8; 16 * 1024];
        let mut log_open = true;
        let deadline = tokio::time::sleep(READY_TIMEOUT);
        tokio::pin!(deadline);
        let n = loop {
            tokio::select! {
                result = ready.read(&mut byte) => break result.map_err(CreateSandboxError::Wait)?,
                read = log.read(&mut chunk), if log_open => match read {
                    Ok(0) | Err(_) => log_open = false,
                    Ok(n) => tail.push(&chunk[..n]),
                },
                () = &mut deadline => return Err(CreateSandboxError::ReadyTimeout(READY_TIMEOUT)),
            }
        };
        if n == 1 {
            return Ok(());
        }
        // EOF: the child failed before exec (and said where), or sandboxd exited.
        if let Some(e) = child_failure(err_r, ops) {
            return Err(e);
        }
        let drain = async {
            while log_open {
                match log.read(&mut chunk).await {
                    Ok(0) | Err(_) => log_open = false,
                    Ok(n) => tail.push(&chunk[..n]),
                }
            }
        };
        let _ = tokio::time::timeout(LOG_DRAIN, drain).await;
        Err(CreateSandboxError::SandboxdExited { output: tail.text() })
    }

    /// Stops a sandbox: SIGTERM to PID 1, then after `grace` SIGKILL to it and to every
    /// process in its cgroup. Killing a pid namespace's init kills the whole namespace;
    /// the cgroup sweep is belt and braces.
    pub async fn stop(
        &self,
        id: &SandboxId,
        grace: Duration,
    ) -> Result<SandboxInfo, StopSandboxError> {
        let sandbox = self.get(id).ok_or_else(|| StopSandboxError::NotFound(id.clone()))?;
        stop_sandbox(&sandbox, grace).await?;
        Ok(sandbox.info())
    }

    /// Creates and destroys a sandbox in a user namespace, to learn whether this
    /// kernel runs them (they need idmapped mounts of the image layers, Linux
    /// 5.12+, and an overlayfs that takes idmapped lower layers, 5.19+). The error
    /// is the create's own.
    pub async fn check_user_namespaces(&self) -> Result<(), CreateSandboxError> {
        let id = SandboxId::new(format!("userns-probe-{}", std::process::id()))
            .expect("a valid id: lower-case letters, digits and dashes");
        let mut spec = SandboxSpec::new(id.clone());
        spec.user_namespace = true;
        spec.limits = Limits { memory_bytes: 32 << 20, disk_bytes: 1 << 20, ..Limits::default() };
        self.create(spec).await?;
        if let Err(error) = self.destroy(&id).await {
            tracing::warn!(%id, error = %error, "cannot remove the user namespace probe");
        }
        Ok(())
    }

    /// Ends a sandbox whose main command exited but whose output and files must
    /// stay readable: takes its network away (its veth, its address, its nft set
    /// elements), so that nothing of it reaches the network, while sandboxd goes
    /// on answering on its socket. sandboxd itself killed every other process when
    /// the main command exited (`--end-with-main`). Idempotent.
    pub async fn finish(&self, id: &SandboxId) -> Result<(), FinishSandboxError> {
        let sandbox = self.get(id).ok_or_else(|| FinishSandboxError::NotFound(id.clone()))?;
        if sandbox.finished.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        if let (Some(_), Some(network)) = (sandbox.address, self.network.as_deref()) {
            network.detach(id.as_str()).await?;
        }
        Ok(())
    }

    /// Stops the sandbox if needed and removes every host artefact of it.
    pub async fn destroy(&self, id: &SandboxId) -> Result<(), DestroySandboxError> {
        let sandbox = self.get(id).ok_or_else(|| DestroySandboxError::NotFound(id.clone()))?;
        stop_sandbox(&sandbox, Duration::ZERO).await?;
        let network = sandbox.address.and(self.network.as_deref());
        self.teardown(id.as_str(), &sandbox.cgroup, network).await?;
        self.map().remove(id);
        Ok(())
    }

    pub fn inspect(&self, id: &SandboxId) -> Result<SandboxInfo, InspectSandboxError> {
        self.get(id).map(|s| s.info()).ok_or_else(|| InspectSandboxError::NotFound(id.clone()))
    }

    pub fn list(&self) -> Vec<SandboxInfo> {
        let sandboxes: Vec<Arc<Sandbox>> = self.map().values().cloned().collect();
        let mut infos: Vec<SandboxInfo> = sandboxes.iter().map(|s| s.info()).collect();
        infos.sort_by(|a, b| a.id.cmp(&b.id));
        infos
    }

    /// Takes over running sandboxes recorded in the state dir (after a restart of the
    /// owning process) and removes the leftovers of dead ones.
    pub async fn adopt(&self) -> Result<AdoptReport, AdoptError> {
        let mut report = AdoptReport::default();
        let dir = self.config.run_dir.clone();
        let entries = fs::read_dir(&dir)
            .map_err(|source| AdoptError::ReadDir { path: dir.clone(), source })?;
        let mut names: Vec<String> =
            entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        names.sort();
        for name in names.clone() {
            let Ok(id) = SandboxId::new(name.clone()) else {
                continue;
            };
            if self.get(&id).is_some() || self.is_creating(&id) {
                continue;
            }
            let state = StateFile::read(&self.sandbox_dir(&name)).ok();
            let alive = state.as_ref().and_then(|s| Some((s, s.open_if_alive()?)));
            match alive {
                Some((state, pidfd)) => {
                    // A record of an earlier version names no socket: its sandboxd
                    // bound one itself, which connect_sandboxd's peer check makes
                    // safe to use.
                    let socket = state.socket.clone().unwrap_or_else(|| {
                        self.sandbox_dir(&name).join(LEGACY_SANDBOXD_DIR).join("sandboxd.sock")
                    });
                    let sandbox = Arc::new(Sandbox {
                        id: id.clone(),
                        pid: state.pid,
                        pidfd,
                        is_child: false,
                        cgroup: state.cgroup.clone(),
                        address: state.address,
                        socket,
                        finished: AtomicBool::new(false),
                        stop_requested: AtomicBool::new(false),
                        exit: Mutex::new(None),
                    });
                    self.map().insert(id.clone(), sandbox);
                    report.adopted.push(id);
                }
                None => {
                    let cgroup =
                        state.map(|s| s.cgroup).unwrap_or_else(|| self.cgroups.sandbox(&id));
                    self.teardown(&name, &cgroup, self.network.as_deref())
                        .await
                        .map_err(|source| AdoptError::Teardown { id: name.clone(), source })?;
                    report.removed.push(name);
                }
            }
        }
        // Every `host` image a live sandbox was made from stays; the rest were left
        // by changes of the host's files and go.
        let mut host_images = HashSet::new();
        for name in &names {
            if let Ok(state) = StateFile::read(&self.sandbox_dir(name)) {
                // A record of an earlier version does not say: keep the image every
                // earlier version used.
                host_images.insert(state.host_image.unwrap_or_else(|| "host-v1".to_owned()));
            }
        }
        self.images.remove_unused_host_images(&host_images);
        Ok(report)
    }

    /// Removes what a crash left behind for sandboxes that are neither managed by this
    /// driver nor alive: state dirs, run dirs and cgroups named after them.
    pub async fn sweep(&self) -> Result<SweepReport, SweepError> {
        let mut candidates: Vec<String> = Vec::new();
        {
            let dir = self.config.run_dir.clone();
            let entries = fs::read_dir(&dir)
                .map_err(|source| SweepError::ReadDir { path: dir.clone(), source })?;
            candidates.extend(entries.filter_map(|e| e.ok()?.file_name().into_string().ok()));
        }
        candidates.extend(self.cgroups.existing_ids());
        candidates.sort();
        candidates.dedup();

        let mut report = SweepReport::default();
        for name in candidates {
            let Ok(id) = SandboxId::new(name.clone()) else {
                continue;
            };
            if self.get(&id).is_some() || self.is_creating(&id) {
                continue;
            }
            let state = StateFile::read(&self.sandbox_dir(&name)).ok();
            if state.as_ref().and_then(|s| s.open_if_alive()).is_some() {
                continue;
            }
            let cgroup = state.map(|s| s.cgroup).unwrap_or_else(|| self.cgroups.sandbox(&id));
            self.teardown(&name, &cgroup, self.network.as_deref())
                .await
                .map_err(|source| SweepError::Teardown { id: name.clone(), source })?;
            report.removed.push(name);
        }
        if let Some(network) = &self.network {
            let live: HashSet<String> = self.map().keys().map(|id| id.to_string()).collect();
            network.sweep(&live).await.map_err(SweepError::Network)?;
        }
        Ok(report)
    }

    fn is_creating(&self, id: &SandboxId) -> bool {
        self.creating.lock().unwrap_or_else(|e| e.into_inner()).contains(id)
    }

    /// Kills what is left in the cgroup, removes it, then the sandbox's directories.
    /// Mounts need no cleanup: they only ever existed in the sandbox's own mount
    /// namespace, which died with its last process.
    async fn teardown(
        &self,
        id: &str,
        cgroup: &SandboxCgroup,
        network: Option<&NetManager>,
    ) -> Result<(), TeardownError> {
        if let Some(network) = network {
            network.detach(id).await?;
        }
        let deadline = Instant::now() + KILL_TIMEOUT;
        let mut spins = 0u32;
        loop {
            cgroup.kill_all()?;
            match cgroup.remove() {
                Ok(()) => break,
                Err(CgroupError::Rmdir { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    // Exiting tasks leave the cgroup asynchronously; this takes
                    // microseconds, so yield a few times before sleeping.
                    spins += 1;
                    if spins < 50 {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                Err(CgroupError::Rmdir { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) =>
                {
                    return Err(TeardownError::CgroupBusy(KILL_TIMEOUT));
                }
                Err(e) => return Err(e.into()),
            }
        }

        let dir = self.sandbox_dir(id);
        // Only names we created, and never recursively: if a mount ever showed up in
        // the host namespace, a recursive delete could walk into the host's /usr.
        for file in ["state.json", SOCKET_NAME, "sandboxd.log"] {
            remove(&dir.join(file), |p| fs::remove_file(p))?;
        }
        remove(&rootfs::scratch_dir(&dir), |p| fs::remove_dir(p))?;
        remove_mount_points(&dir.join(MOUNT_POINTS_DIR))?;
        // A sandbox of an earlier version could write its sandboxd dir, so it may
        // hold anything, but never a mount (sandboxes cannot mount), and
        // remove_dir_all does not follow symlinks.
        remove(&dir.join(LEGACY_SANDBOXD_DIR), |p| fs::remove_dir_all(p))?;
        remove(&dir, |p| fs::remove_dir(p))?;
        Ok(())
    }

    /// A TCP connection to `127.0.0.1:port` inside the sandbox's network namespace.
    /// This is how a proxy reaches exposed ports even when the sandbox has no
    /// network.
    ///
    /// Only the socket is made inside the namespace (a socket belongs to the
    /// namespace it was created in), by a blocking-pool thread that enters it for
    /// that one call; the connect itself is asynchronous and gives up after
    /// `timeout`. A sandbox that leaves connections hanging (a full backlog drops
    /// SYNs) therefore ties up no thread of the node.
    pub async fn connect_port(
        &self,
        id: &SandboxId,
        port: u16,
        timeout: Duration,
    ) -> Result<tokio::net::TcpStream, ConnectPortError> {
        let sandbox = self.get(id).ok_or_else(|| ConnectPortError::NotFound(id.clone()))?;
        if sandbox.poll_exit().is_some() {
            return Err(ConnectPortError::NotRunning(id.clone()));
        }
        let pidfd = sandbox.pidfd.try_clone().map_err(ConnectPortError::Setns)?;
        let socket = tokio::task::spawn_blocking(move || socket_in_netns(&pidfd))
            .await
            .map_err(|e| ConnectPortError::Thread(io::Error::other(e)))??;
        let address = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match tokio::time::timeout(timeout, socket.connect(address)).await {
            Ok(result) => result.map_err(|source| ConnectPortError::Connect { port, source }),
            Err(_) => Err(ConnectPortError::Timeout { port, after: timeout }),
        }
    }
}

/// A non-blocking TCP socket made in the network namespace of the process behind
/// `pidfd`, from the calling thread, which returns to its own namespace after.
fn socket_in_netns(pidfd: &OwnedFd) -> Result<tokio::net::TcpSocket, ConnectPortError> {
    let made = netns::while_in(pidfd.as_fd(), || {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 { Err(io::Error::last_os_error()) } else { Ok(fd) }
    })
    .map_err(ConnectPortError::Setns)?
    .map_err(ConnectPortError::Socket)?;
    // SAFETY: a descriptor socket(2) just returned, owned by nobody else.
    let stream = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(made) };
    Ok(tokio::net::TcpSocket::from_std_stream(stream))
}

async fn stop_sandbox(sandbox: &Sandbox, grace: Duration) -> Result<(), StopSandboxError> {
    if sandbox.poll_exit().is_some() {
        return Ok(());
    }
    sandbox.stop_requested.store(true, Ordering::Relaxed);
    if !grace.is_zero() {
        sandbox.signal(libc::SIGTERM).map_err(StopSandboxError::Signal)?;
        if sandbox.wait_exit(grace).await.map_err(StopSandboxError::Signal)? {
            return Ok(());
        }
    }
    sandbox.signal(libc::SIGKILL).map_err(StopSandboxError::Signal)?;
    sandbox.cgroup.kill_all()?;
    if sandbox.wait_exit(KILL_TIMEOUT).await.map_err(StopSandboxError::Signal)? {
        Ok(())
    } else {
        Err(StopSandboxError::KillTimeout(KILL_TIMEOUT))
    }
}

/// Removes the empty mount points a sandbox with a user namespace had under its
/// directory, one by one and never recursively: on the host they are only ever empty
/// directories and files.
fn remove_mount_points(dir: &Path) -> Result<(), TeardownError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(TeardownError::Remove { path: dir.to_owned(), source }),
    };
    for entry in entries {
        let entry =
            entry.map_err(|source| TeardownError::Remove { path: dir.to_owned(), source })?;
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove(&path, |p| fs::remove_dir(p))?;
        } else {
            remove(&path, |p| fs::remove_file(p))?;
        }
    }
    remove(dir, |p| fs::remove_dir(p))
}

fn remove(path: &Path, op: fn(&Path) -> io::Result<()>) -> Result<(), TeardownError> {
    match op(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TeardownError::Remove { path: path.to_owned(), source }),
    }
}

/// The last [`LOG_TAIL_BYTES`] of sandboxd's log, for the error of a failed create.
#[derive(Debug, Default)]
struct LogTail(std::collections::VecDeque<u8>);

impl LogTail {
    fn push(&mut self, bytes: &[u8]) {
        let keep = LOG_TAIL_BYTES as usize;
        let bytes = &bytes[bytes.len().saturating_sub(keep)..];
        self.0.extend(bytes);
        let excess = self.0.len().saturating_sub(keep);
        self.0.drain(..excess);
    }

    fn text(&self) -> String {
        let bytes: Vec<u8> = self.0.iter().copied().collect();
        match String::from_utf8_lossy(&bytes).trim() {
            "" => "(no output)".to_owned(),
            text => text.to_owned(),
        }
    }
}

/// What a child that failed before exec reported on its error pipe: `(step, errno)`.
/// Reads after the child has gone (or exec'd), so the read does not block.
fn child_failure(err_r: OwnedFd, ops: &[spawn::Op]) -> Option<CreateSandboxError> {
    let mut buf = [0u8; 8];
    let mut err = fs::File::from(err_r);
    let got = io::Read::read(&mut err, &mut buf).unwrap_or(0);
    if got != 8 {
        return None;
    }
    let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let step = match Step::from_code(step) {
        Some(step) => format!("{step:?}"),
        None if step < STEP_BASE => ops
            .get(step as usize)
            .map(|op| format!("{op:?}"))
            .unwrap_or_else(|| format!("mount step {step}")),
        None => format!("step {step}"),
    };
    Some(CreateSandboxError::Child { step, source: io::Error::from_raw_os_error(errno) })
}

fn write_byte(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: writing one byte from a stack buffer to a pipe we own.
    match unsafe { libc::write(fd.as_raw_fd(), [1u8].as_ptr().cast(), 1) } {
        1 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[derive(Debug)]
struct Started {
    pid: i32,
    pidfd: OwnedFd,
    /// Writing a byte releases the child; closing it unwritten makes the child exit.
    sync_w: OwnedFd,
    ready_r: OwnedFd,
    /// Read end of sandboxd's stdout and stderr.
    log_r: OwnedFd,
    err_r: OwnedFd,
    /// What the child reads until it execs; also names the step a failing child
    /// reports.
    memory: spawn::ChildMemory,
    /// The name of the `host` image directory it was built from.
    host_image: Option<String>,
}

/// What `start` needs for a sandbox with a user namespace.
#[derive(Debug)]
struct UserNamespacePlan {
    placements: Vec<userns::Placement>,
    /// The overlay's lower dirs, relative to the sandbox's directory.
    lowers: Vec<PathBuf>,
    /// sandboxd, relative to the sandbox's directory.
    sandboxd: PathBuf,
}

/// Releases an id reserved by [`Driver::reserve`].
struct Reservation<'a> {
    driver: &'a Driver,
    id: SandboxId,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.driver.creating.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}
