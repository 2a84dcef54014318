//! Per-sandbox cgroups: the one seam through which limits are set and read.
//!
//! Both hierarchies are plain directory trees, so the code below only mkdirs, writes,
//! reads and rmdirs files under a root it is given. cgroup v1 is exercised for real by
//! the privileged tests; cgroup v2 is exercised against a fake tree in a temp dir.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::{Limits, SandboxId};

/// CPU bandwidth period; the quota is `cpu_millis * PERIOD / 1000`.
const CPU_PERIOD_US: u64 = 100_000;

/// The v1 controllers a sandbox gets a cgroup in. cpuacct is read for CPU usage.
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: no v1 memory controller and no cgroup2 mount")]
    NoHierarchy,
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("create cgroup {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remove cgroup {path}")]
    Rmdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Which cgroup hierarchy sandboxes are placed in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupLayout {
    /// One directory per controller: `(controller, parent dir of the sandbox cgroups)`.
    V1 { parents: Vec<(String, PathBuf)> },
    /// The unified hierarchy: the parent dir of the sandbox cgroups.
    V2 { parent: PathBuf },
}

impl CgroupLayout {
    /// Finds where this process's cgroups are and puts `parent_name` beneath them.
    pub fn detect(parent_name: &str) -> Result<Self, CgroupError> {
        let read = |path: &str| {
            fs::read_to_string(path)
                .map_err(|source| CgroupError::Read { path: path.into(), source })
        };
        let own = read("/proc/self/cgroup")?;
        let mountinfo = read("/proc/self/mountinfo")?;
        Self::from_proc(&own, &mountinfo, Path::new("/"), parent_name)
    }

    /// Pure form of [`CgroupLayout::detect`]: `own` is `/proc/self/cgroup`, `mountinfo`
    /// is `/proc/self/mountinfo`, and mount points are resolved beneath `root`.
    ///
    /// v1 wins when it has a memory controller, because a hybrid host (like the test
    /// machine) mounts a controller-less cgroup2 next to the real v1 hierarchies.
    pub fn from_proc(
        own: &str,
        mountinfo: &str,
        root: &Path,
        parent_name: &str,
    ) -> Result<Self, CgroupError> {
        let mounts: Vec<Mount<'_>> = mountinfo.lines().filter_map(Mount::parse).collect();
        let own_path = |controller: &str| {
            own.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers.split(',').any(|c| c == controller).then_some(path)
            })
        };
        let under = |mount: &Mount<'_>, path: &str| {
            let relative = path.strip_prefix(mount.root).unwrap_or(path).trim_start_matches('/');
            let mut dir = root.join(mount.point.trim_start_matches('/'));
            if !relative.is_empty() {
                dir.push(relative);
            }
            dir.join(parent_name)
        };

        let mut parents = Vec::new();
        for controller in V1_CONTROLLERS {
            let mount = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == controller));
            if let (Some(mount), Some(path)) = (mount, own_path(controller)) {
                parents.push((controller.to_owned(), under(mount, path)));
            }
        }
        if parents.iter().any(|(c, _)| c == "memory") {
            return Ok(Self::V1 { parents });
        }
        let unified = mounts.iter().find(|m| m.fstype == "cgroup2");
        let unified_path = own.lines().find_map(|line| line.strip_prefix("0::"));
        match (unified, unified_path) {
            (Some(mount), Some(path)) => Ok(Self::V2 { parent: under(mount, path) }),
            _ => Err(CgroupError::NoHierarchy),
        }
    }

    /// Creates the shared parent cgroup(s) and, on v2, delegates the controllers to it.
    pub fn prepare(&self) -> Result<(), CgroupError> {
        match self {
            Self::V1 { parents } => {
                for (_, parent) in parents {
                    mkdir_all(parent)?;
                }
            }
            Self::V2 { parent } => {
                // A v2 parent can only hand controllers to its children once they are
                // enabled in every ancestor's subtree_control; the dataplane's own cgroup
                // is configured by whoever started it, so only our level is touched.
                mkdir_all(parent)?;
                write(&parent.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
            }
        }
        Ok(())
    }

    /// Removes the shared parent cgroup(s) if no sandbox cgroup is left in them,
    /// so a driver that shuts down with no sandboxes leaves nothing behind. A
    /// parent that still holds sandboxes (they keep running across a restart)
    /// stays: rmdir refuses a non-empty cgroup.
    pub fn release(&self) {
        let parents: Vec<&PathBuf> = match self {
            Self::V1 { parents } => parents.iter().map(|(_, p)| p).collect(),
            Self::V2 { parent } => vec![parent],
        };
        for parent in parents {
            let _ = fs::remove_dir(parent);
        }
    }

    /// The cgroup of one sandbox, without touching the filesystem.
    pub fn sandbox(&self, id: &SandboxId) -> SandboxCgroup {
        let name = format!("hutch-{id}");
        match self {
            Self::V1 { parents } => SandboxCgroup::V1 {
                dirs: parents.iter().map(|(c, p)| (c.clone(), p.join(&name))).collect(),
            },
            Self::V2 { parent } => SandboxCgroup::V2 { dir: parent.join(name) },
        }
    }

    /// Names of sandbox cgroups (`hutch-<id>` directories) present on the host.
    pub fn existing_ids(&self) -> Vec<String> {
        let parents: Vec<&PathBuf> = match self {
            Self::V1 { parents } => parents.iter().map(|(_, p)| p).collect(),
            Self::V2 { parent } => vec![parent],
        };
        let mut ids: Vec<String> = parents
            .into_iter()
            .filter_map(|p| fs::read_dir(p).ok())
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("hutch-").map(str::to_owned))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// One line of /proc/self/mountinfo, as far as cgroups care.
struct Mount<'a> {
    root: &'a str,
    point: &'a str,
    fstype: &'a str,
    options: &'a str,
}

impl<'a> Mount<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        let (left, right) = line.split_once(" - ")?;
        let mut left = left.split(' ');
        let root = left.nth(3)?;
        let point = left.next()?;
        let mut right = right.split(' ');
        let fstype = right.next()?;
        let _source = right.next()?;
        let options = right.next()?;
        Some(Self { root, point, fstype, options })
    }
}

/// The cgroup(s) of one sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxCgroup {
    V1 { dirs: Vec<(String, PathBuf)> },
    V2 { dir: PathBuf },
}

impl SandboxCgroup {
    fn dir(&self, controller: &str) -> Option<&Path> {
        match self {
            Self::V1 { dirs } => {
                dirs.iter().find(|(c, _)| c == controller).map(|(_, d)| d.as_path())
            }
            Self::V2 { dir } => Some(dir),
        }
    }

    fn dirs(&self) -> impl Iterator<Item = &Path> {
        let (v1, v2) = match self {
            Self::V1 { dirs } => (Some(dirs.iter().map(|(_, d)| d.as_path())), None),
            Self::V2 { dir } => (None, Some(dir.as_path())),
        };
        v1.into_iter().flatten().chain(v2)
    }

    /// Creates the cgroup(s) and writes the limits.
    pub fn create(&self, limits: &Limits) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(CgroupError::Mkdir { path: dir.to_owned(), source });
                }
            }
        }
        let quota = u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000;
        match self {
            Self::V1 { .. } => {
                if let Some(dir) = self.dir("memory") {
                    write(&dir.join("memory.limit_in_bytes"), limits.memory_limit())?;
                    // Without swap accounting the file is absent and there is nothing
                    // to limit; with it, swap must not extend the memory limit.
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, limits.memory_limit())?;
                    }
                }
                if let Some(dir) = self.dir("cpu") {
                    write(&dir.join("cpu.cfs_period_us"), CPU_PERIOD_US)?;
                    write(&dir.join("cpu.cfs_quota_us"), quota)?;
                }
                if let Some(dir) = self.dir("pids") {
                    write(&dir.join("pids.max"), limits.pids)?;
                }
            }
            Self::V2 { dir } => {
                write(&dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
                write(&dir.join("memory.max"), limits.memory_limit())?;
                write(&dir.join("memory.swap.max"), 0)?;
                write(&dir.join("pids.max"), limits.pids)?;
            }
        }
        Ok(())
    }

    /// Moves a process into the cgroup(s).
    pub fn attach(&self, pid: i32) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            write(&dir.join("cgroup.procs"), pid)?;
        }
        Ok(())
    }

    /// How many processes the kernel's OOM killer has killed in this cgroup.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        let (file, dir) = match self {
            Self::V1 { .. } => ("memory.oom_control", self.dir("memory")),
            Self::V2 { dir } => ("memory.events", Some(dir.as_path())),
        };
        let Some(dir) = dir else { return Ok(0) };
        let text = read(&dir.join(file))?;
        Ok(keyed_value(&text, "oom_kill").unwrap_or(0))
    }

    /// Total CPU time used by the cgroup, in nanoseconds.
    pub fn cpu_usage_ns(&self) -> Result<u64, CgroupError> {
        match self {
            Self::V1 { .. } => {
                let Some(dir) = self.dir("cpuacct") else {
                    return Ok(0);
                };
                Ok(read(&dir.join("cpuacct.usage"))?.trim().parse().unwrap_or(0))
            }
            Self::V2 { dir } => {
                let text = read(&dir.join("cpu.stat"))?;
                Ok(keyed_value(&text, "usage_usec").unwrap_or(0) * 1000)
            }
        }
    }

    /// Memory charged to the cgroup, in bytes.
    pub fn memory_usage(&self) -> Result<u64, CgroupError> {
        let (file, dir) = match self {
            Self::V1 { .. } => ("memory.usage_in_bytes", self.dir("memory")),
            Self::V2 { dir } => ("memory.current", Some(dir.as_path())),
        };
        let Some(dir) = dir else { return Ok(0) };
        Ok(read(&dir.join(file))?.trim().parse().unwrap_or(0))
    }

    /// Pids of every process in the cgroup.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let Some(dir) = self.dirs().next() else {
            return Ok(Vec::new());
        };
        match fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(CgroupError::Read { path: dir.join("cgroup.procs"), source }),
        }
    }

    /// SIGKILLs every process in the cgroup: `cgroup.kill` where the kernel has it
    /// (v2, 5.14+), otherwise each pid in `cgroup.procs`.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if let Self::V2 { dir } = self {
            let kill = dir.join("cgroup.kill");
            if kill.exists() {
                return write(&kill, 1);
            }
        }
        for pid in self.pids()? {
            // SAFETY: kill(2) has no memory-safety preconditions. A pid that has
            // already exited makes it fail with ESRCH, which is what we want anyway.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        Ok(())
    }

    /// Removes the cgroup(s). Fails with `EBUSY` while tasks are still exiting; the
    /// caller retries until a deadline.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CgroupError::Rmdir { path: dir.to_owned(), source });
                }
            }
        }
        Ok(())
    }

    /// Whether any of the cgroup directories still exists.
    pub fn exists(&self) -> bool {
        self.dirs().any(Path::exists)
    }
}

/// Reads `key value` from a flat-keyed cgroup file.
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.to_owned(), source })
}

fn write(path: &Path, value: impl ToString) -> Result<(), CgroupError> {
    let value = value.to_string();
    fs::write(path, &value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value,
        source,
    })
}

fn mkdir_all(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(|source| CgroupError::Mkdir { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_CGROUP: &str =
        "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n";
    const HYBRID_MOUNTINFO: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_host_uses_v1_beneath_own_cgroups() {
        let layout =
            CgroupLayout::from_proc(HYBRID_CGROUP, HYBRID_MOUNTINFO, Path::new("/"), "hutch")
                .unwrap();
        let CgroupLayout::V1 { parents } = layout else { panic!("expected v1, got {layout:?}") };
        let memory = parents.iter().find(|(c, _)| c == "memory").unwrap();
        assert_eq!(memory.1, Path::new("/sys/fs/cgroup/memory/process_api/abc/hutch"));
        let cpu = parents.iter().find(|(c, _)| c == "cpu").unwrap();
        assert_eq!(cpu.1, Path::new("/sys/fs/cgroup/cpu/hutch"));
        assert_eq!(parents.len(), 4);
    }

    #[test]
    fn pure_v2_host_uses_unified_hierarchy() {
        let layout = CgroupLayout::from_proc(
            "0::/system.slice/hutch.service\n",
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n",
            Path::new("/fake"),
            "sandboxes",
        )
        .unwrap();
        assert_eq!(
            layout,
            CgroupLayout::V2 {
                parent: PathBuf::from("/fake/sys/fs/cgroup/system.slice/hutch.service/sandboxes")
            }
        );
    }

    #[test]
    fn v2_limits_oom_and_removal_on_a_fake_cgroupfs() {
        let root = tempfile::tempdir().unwrap();
        let layout = CgroupLayout::V2 { parent: root.path().join("hutch") };
        layout.prepare().unwrap();
        assert_eq!(
            fs::read_to_string(root.path().join("hutch/cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
        let id = SandboxId::new("abc").unwrap();
        let cgroup = layout.sandbox(&id);
        let limits =
            Limits { cpu_millis: 500, memory_bytes: 64 << 20, pids: 100, disk_bytes: 1 << 20 };
        cgroup.create(&limits).unwrap();
        let dir = root.path().join("hutch/hutch-abc");
        let file = |name: &str| fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(file("cpu.max"), "50000 100000");
        assert_eq!(file("memory.max"), ((64u64 << 20) + (1 << 20)).to_string());
        assert_eq!(file("memory.swap.max"), "0");
        assert_eq!(file("pids.max"), "100");
        assert_eq!(layout.existing_ids(), vec!["abc".to_owned()]);

        // What the kernel reports after an OOM kill.
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(cgroup.oom_kills().unwrap(), 2);
        fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        assert_eq!(cgroup.cpu_usage_ns().unwrap(), 1_500_000);

        // cgroup.kill is preferred over killing pids one by one.
        fs::write(dir.join("cgroup.kill"), "0").unwrap();
        cgroup.kill_all().unwrap();
        assert_eq!(file("cgroup.kill"), "1");

        // A real cgroupfs has no regular files to delete; emulate that, then rmdir.
        for entry in fs::read_dir(&dir).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
        cgroup.remove().unwrap();
        assert!(!cgroup.exists());
        assert!(layout.existing_ids().is_empty());
    }

    #[test]
    fn v1_oom_counter_is_read_from_oom_control() {
        let root = tempfile::tempdir().unwrap();
        let cgroup = SandboxCgroup::V1 { dirs: vec![("memory".into(), root.path().to_owned())] };
        fs::write(
            root.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n",
        )
        .unwrap();
        assert_eq!(cgroup.oom_kills().unwrap(), 4);
    }
}
