//! The sandbox's filesystem: the skeleton and `host` image directories prepared once
//! per driver, and the mount steps that build a sandbox's root from them.

use std::ffi::{CString, NulError};
use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use crate::spawn::Op;
use crate::spec::Rootfs;

#[derive(Debug, thiserror::Error)]
pub enum PrepareImageError {
    #[error("prepare image directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PlanMountsError {
    #[error("path contains a NUL byte")]
    Nul(#[from] NulError),
    #[error("path is not UTF-8: {0}")]
    NotUtf8(PathBuf),
    #[error(
        "overlay options are {len} bytes, the kernel takes at most 4095 (too many or too long layer paths)"
    )]
    OverlayOptionsTooLong { len: usize },
    #[error("an image needs at least one layer")]
    NoLayers,
}

/// Top-level directories of the host that the `host` image exposes read-only.
const HOST_DIRS: [&str; 7] = ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Entries of the host's /etc copied into the `host` image. Everything else (shadow,
/// ssh keys, machine-id, credentials of host services) stays out.
const HOST_ETC: [&str; 24] = [
    "passwd",
    "group",
    "nsswitch.conf",
    "resolv.conf",
    "host.conf",
    "gai.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "localtime",
    "timezone",
    "protocols",
    "services",
    "mime.types",
    "os-release",
    "debian_version",
    "profile",
    "bash.bashrc",
    "inputrc",
    "environment",
];

/// Docker's masked paths: files are covered with /dev/null, directories with an
/// empty read-only tmpfs.
const MASKED: [&str; 12] = [
    "proc/asound",
    "proc/acpi",
    "proc/interrupts",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];

/// Docker's read-only paths in /proc.
const READ_ONLY: [&str; 5] = ["proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger"];

/// Device nodes bind-mounted from the host.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// The directories prepared once per driver.
#[derive(Debug, Clone)]
pub(crate) struct Images {
    /// Top layer of every sandbox: the mount points the driver needs.
    skeleton: PathBuf,
    /// The `host` image: symlinks like the host's, empty mount points for the host's
    /// directories, a filtered /etc.
    host: PathBuf,
    /// Host directories bind-mounted read-only for the `host` image.
    host_binds: Vec<String>,
    /// Masked paths present on this kernel, with whether each is a directory.
    masked: Vec<(&'static str, bool)>,
}

impl Images {
    /// Builds `{images}/skeleton-v1` and `{images}/host-v1` unless they exist. They are
    /// built under a temporary name and renamed, so a crash never leaves half an image.
    pub(crate) fn prepare(images: &Path) -> Result<Self, PrepareImageError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| PrepareImageError::Io { path, source }
        };
        fs::create_dir_all(images).map_err(io(images))?;

        let skeleton = images.join("skeleton-v1");
        if !skeleton.exists() {
            let tmp = images.join(format!("skeleton-v1.tmp{}", std::process::id()));
            build_skeleton(&tmp).map_err(io(&tmp))?;
            fs::rename(&tmp, &skeleton).map_err(io(&skeleton))?;
        }

        let mut host_binds = Vec::new();
        let host = images.join("host-v1");
        for name in HOST_DIRS {
            let path = Path::new("/").join(name);
            if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                host_binds.push(name.to_owned());
            }
        }
        if !host.exists() {
            let tmp = images.join(format!("host-v1.tmp{}", std::process::id()));
            build_host(&tmp).map_err(io(&tmp))?;
            fs::rename(&tmp, &host).map_err(io(&host))?;
        }

        let masked = MASKED
            .iter()
            .filter_map(|p| {
                let meta = fs::metadata(Path::new("/").join(p)).ok()?;
                Some((*p, meta.is_dir()))
            })
            .collect();
        Ok(Self { skeleton, host, host_binds, masked })
    }
}

fn build_skeleton(dir: &Path) -> io::Result<()> {
    let _ = fs::remove_dir_all(dir);
    for sub in ["", "proc", "dev", "sys", "tmp", ".hutch", ".hutch/run"] {
        fs::create_dir(dir.join(sub))?;
    }
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::write(dir.join(".hutch/sandboxd"), b"")?;
    Ok(())
}

fn build_host(dir: &Path) -> io::Result<()> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir(dir)?;
    for name in HOST_DIRS {
        let host = Path::new("/").join(name);
        let Ok(meta) = fs::symlink_metadata(&host) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            symlink(fs::read_link(&host)?, dir.join(name))?;
        } else if meta.is_dir() {
            fs::create_dir(dir.join(name))?;
        }
    }
    for (sub, mode) in [
        ("root", 0o700),
        ("home", 0o755),
        ("run", 0o755),
        ("mnt", 0o755),
        ("opt", 0o755),
        ("srv", 0o755),
        ("var", 0o755),
        ("var/tmp", 0o1777),
        ("var/lib", 0o755),
        ("var/cache", 0o755),
        ("var/log", 0o755),
        ("etc", 0o755),
    ] {
        fs::create_dir(dir.join(sub))?;
        fs::set_permissions(dir.join(sub), fs::Permissions::from_mode(mode))?;
    }
    let etc = dir.join("etc");
    for name in HOST_ETC {
        copy_tree(&Path::new("/etc").join(name), &etc.join(name))?;
    }
    // python3.11 and friends keep their site configuration in /etc/python3*.
    for entry in fs::read_dir("/etc")? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.starts_with("python3")) {
            copy_tree(&entry.path(), &etc.join(&name))?;
        }
    }
    // Our own hosts file: the host's may name machines on its network.
    fs::write(
        etc.join("hosts"),
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )?;
    Ok(())
}

/// Copies a file, symlink or directory tree; a missing source is skipped.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(src) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        symlink(fs::read_link(src)?, dst)
    } else if kind.is_dir() {
        fs::create_dir(dst)?;
        fs::set_permissions(dst, meta.permissions())?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
        Ok(())
    } else if kind.is_file() {
        fs::copy(src, dst).map(drop)
    } else {
        Ok(())
    }
}

/// Host paths one sandbox's mount steps refer to.
#[derive(Debug)]
pub(crate) struct SandboxPaths<'a> {
    /// The sandbox's directory on the host. In the child's mount namespace a tmpfs is
    /// mounted on its [`scratch_dir`] to hold the overlay's upper, work and merged
    /// dirs, so the host sees none of them.
    pub dir: &'a Path,
    /// The host directory mounted at /.hutch/run.
    pub run: &'a Path,
    pub sandboxd: &'a Path,
    pub disk_bytes: u64,
    /// The overlay's lower dirs, top first (see [`lower_dirs`]).
    pub lowers: &'a [PathBuf],
    /// The child runs in a user namespace: the overlay then keeps its own metadata in
    /// `user.overlay.*` xattrs (`userxattr`), since `trusted.*` needs privileges in
    /// the host's user namespace.
    pub user_namespace: bool,
}

/// The overlay's lower dirs of a sandbox, top first as overlayfs lists them: the
/// skeleton (the mount points the driver needs win over the image), then the image's
/// layers or the `host` image's directory.
pub(crate) fn lower_dirs(
    images: &Images,
    rootfs: &Rootfs,
) -> Result<Vec<PathBuf>, PlanMountsError> {
    let mut lowers = vec![images.skeleton.clone()];
    match rootfs {
        Rootfs::Host => lowers.push(images.host.clone()),
        Rootfs::Layers { lower } => {
            if lower.is_empty() {
                return Err(PlanMountsError::NoLayers);
            }
            lowers.extend(lower.iter().rev().cloned());
        }
    }
    Ok(lowers)
}

fn utf8(path: &Path) -> Result<&str, PlanMountsError> {
    path.to_str().ok_or_else(|| PlanMountsError::NotUtf8(path.to_owned()))
}

const NOSUID: u64 = libc::MS_NOSUID;
const NODEV: u64 = libc::MS_NODEV;
const NOEXEC: u64 = libc::MS_NOEXEC;

/// Where the child mounts its scratch tmpfs (an empty directory on the host).
pub(crate) fn scratch_dir(dir: &Path) -> PathBuf {
    dir.join("root")
}

/// Where the child assembles and pivots into the root: beneath the scratch tmpfs.
pub(crate) fn new_root(dir: &Path) -> PathBuf {
    scratch_dir(dir).join("merged")
}

/// The mount steps that assemble a sandbox's root at `paths.root`, all executed in the
/// child's own mount namespace: nothing is mounted in the host's namespace, so a
/// sandbox's mounts vanish with it and cannot leak.
pub(crate) fn plan_mounts(
    images: &Images,
    rootfs: &Rootfs,
    paths: &SandboxPaths<'_>,
) -> Result<Vec<Op>, PlanMountsError> {
    let scratch_path = scratch_dir(paths.dir);
    let scratch = utf8(&scratch_path)?;
    let root_path = new_root(paths.dir);
    let root = utf8(&root_path)?;
    let at = |rel: &str| format!("{root}/{rel}");
    let mut ops = Vec::new();

    // Nothing we mount may propagate back to the host.
    ops.push(Op::mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?);

    // The writable layer is a tmpfs sized to the disk limit (see Limits::disk_bytes).
    ops.push(Op::mount(
        Some("tmpfs"),
        scratch,
        Some("tmpfs"),
        NOSUID | NODEV,
        Some(&format!("size={},mode=0700", paths.disk_bytes.max(4096))),
    )?);
    let upper = format!("{scratch}/upper");
    let work = format!("{scratch}/work");
    ops.push(Op::Mkdir { path: CString::new(root)?, mode: 0o755 });
    ops.push(Op::Mkdir { path: CString::new(upper.clone())?, mode: 0o755 });
    ops.push(Op::Mkdir { path: CString::new(work.clone())?, mode: 0o700 });

    let lowers = paths.lowers.iter().map(|p| utf8(p)).collect::<Result<Vec<_>, _>>()?;
    let userxattr = if paths.user_namespace { ",userxattr" } else { "" };
    let options = format!(
        "lowerdir={},upperdir={upper},workdir={work},volatile{userxattr}",
        lowers.join(":")
    );
    if options.len() >= 4096 {
        return Err(PlanMountsError::OverlayOptionsTooLong { len: options.len() });
    }
    ops.push(Op::mount(Some("overlay"), root, Some("overlay"), NOSUID | NODEV, Some(&options))?);

    if *rootfs == Rootfs::Host {
        for name in &images.host_binds {
            bind(&mut ops, &format!("/{name}"), &at(name), true, NOSUID | NODEV)?;
        }
    }

    // /proc of the new pid namespace, masked and partly read-only as Docker does it.
    ops.push(Op::mount(Some("proc"), &at("proc"), Some("proc"), NOSUID | NODEV | NOEXEC, None)?);
    let mask = |ops: &mut Vec<Op>, rel: &str, is_dir: bool| -> Result<(), PlanMountsError> {
        let op = if is_dir {
            Op::mount(
                Some("tmpfs"),
                &at(rel),
                Some("tmpfs"),
                libc::MS_RDONLY | NOSUID | NODEV | NOEXEC,
                Some("size=0"),
            )?
        } else {
            Op::mount(Some("/dev/null"), &at(rel), None, libc::MS_BIND, None)?
        };
        ops.push(op.optional());
        Ok(())
    };
    for (rel, is_dir) in images.masked.iter().filter(|(p, _)| p.starts_with("proc/")) {
        mask(&mut ops, rel, *is_dir)?;
    }
    for rel in READ_ONLY {
        let target = at(rel);
        ops.push(
            Op::mount(Some(&target), &target, None, libc::MS_BIND | libc::MS_REC, None)?.optional(),
        );
        ops.push(
            Op::mount(
                None,
                &target,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | NOSUID | NODEV | NOEXEC,
                None,
            )?
            .optional(),
        );
    }

    // A minimal /dev. The tmpfs is nodev, and so is every other mount, so a node made
    // with CAP_MKNOD is useless; the bound host nodes are separate mounts and work.
    ops.push(Op::mount(
        Some("tmpfs"),
        &at("dev"),
        Some("tmpfs"),
        NOSUID | NODEV | NOEXEC,
        Some("mode=0755,size=65536"),
    )?);
    for device in DEVICES {
        let target = at(&format!("dev/{device}"));
        ops.push(Op::Touch { path: CString::new(target.clone())? });
        ops.push(Op::mount(Some(&format!("/dev/{device}")), &target, None, libc::MS_BIND, None)?);
    }
    for dir in ["dev/pts", "dev/shm", "dev/mqueue"] {
        ops.push(Op::Mkdir { path: CString::new(at(dir))?, mode: 0o755 });
    }
    ops.push(Op::mount(
        Some("devpts"),
        &at("dev/pts"),
        Some("devpts"),
        NOSUID | NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?);
    ops.push(Op::mount(
        Some("shm"),
        &at("dev/shm"),
        Some("tmpfs"),
        NOSUID | NODEV | NOEXEC,
        Some("mode=1777,size=67108864"),
    )?);
    ops.push(Op::mount(
        Some("mqueue"),
        &at("dev/mqueue"),
        Some("mqueue"),
        NOSUID | NODEV | NOEXEC,
        None,
    )?);
    for (link, target) in [
        ("dev/ptmx", "pts/ptmx"),
        ("dev/fd", "/proc/self/fd"),
        ("dev/stdin", "/proc/self/fd/0"),
        ("dev/stdout", "/proc/self/fd/1"),
        ("dev/stderr", "/proc/self/fd/2"),
    ] {
        ops.push(Op::Symlink { target: CString::new(target)?, path: CString::new(at(link))? });
    }

    // sysfs of the new network namespace, read-only.
    ops.push(Op::mount(
        Some("sysfs"),
        &at("sys"),
        Some("sysfs"),
        libc::MS_RDONLY | NOSUID | NODEV | NOEXEC,
        None,
    )?);
    for (rel, is_dir) in images.masked.iter().filter(|(p, _)| p.starts_with("sys/")) {
        mask(&mut ops, rel, *is_dir)?;
    }

    bind(&mut ops, utf8(paths.sandboxd)?, &at(".hutch/sandboxd"), true, NOSUID | NODEV)?;
    bind(&mut ops, utf8(paths.run)?, &at(".hutch/run"), false, NOSUID | NODEV | NOEXEC)?;
    Ok(ops)
}

/// A bind mount, then a remount to apply the flags (a bind ignores them).
fn bind(
    ops: &mut Vec<Op>,
    source: &str,
    target: &str,
    read_only: bool,
    flags: u64,
) -> Result<(), PlanMountsError> {
    ops.push(Op::mount(Some(source), target, None, libc::MS_BIND, None)?);
    let ro = if read_only { libc::MS_RDONLY } else { 0 };
    ops.push(Op::mount(None, target, None, libc::MS_BIND | libc::MS_REMOUNT | ro | flags, None)?);
    Ok(())
}
