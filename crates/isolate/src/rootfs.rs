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

/// What of the host's /etc the `host` image carries: an allow-list of files and
/// directories that configure programs and hold nothing secret. Everything else
/// stays out: shadow, ssh keys, TLS private keys (`ssl/private`), machine-id,
/// `environment`, credentials of host services, whatever an operator keeps there.
/// Even within the list, a file that is not world-readable is left out: a secret
/// dropped into an allowed directory must not reach sandboxes either.
/// `passwd`, `group`, `hosts` and `resolv.conf` are generated (see
/// [`build_host`]).
const HOST_ETC: [&str; 30] = [
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl/certs",
    "ssl/openssl.cnf",
    "ca-certificates.conf",
    "localtime",
    "timezone",
    "protocols",
    "services",
    "networks",
    "ethertypes",
    "rpc",
    "mime.types",
    "os-release",
    "debian_version",
    "issue",
    "lsb-release",
    "profile",
    "bash.bashrc",
    "inputrc",
    "shells",
    "login.defs",
    "mailcap",
    "magic",
    "libaudit.conf",
];

/// Sources of generated files: read (never copied) to build the `host` image's
/// own `passwd`, `group` and `resolv.conf`, and watched for changes with the
/// allow-list.
const HOST_ETC_SOURCES: [&str; 4] =
    ["/etc/passwd", "/etc/group", "/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"];

/// Changed whenever what [`build_host`] writes changes, so that a new version never
/// reuses a `host` image an old one built.
const HOST_IMAGE_VERSION: &str = "host-image-2";

/// How often a create may check whether the host's files changed (a few hundred
/// `stat` calls).
const HOST_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

/// The first uid and gid of real users on Debian (`UID_MIN` in login.defs); the
/// `host` image keeps only system accounts below it, and `nobody`.
const FIRST_USER_ID: u32 = 1000;
const NOBODY_ID: u32 = 65534;

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
#[derive(Debug)]
pub(crate) struct Images {
    /// Where the image directories live.
    root: PathBuf,
    /// Top layer of every sandbox: the mount points the driver needs.
    skeleton: PathBuf,
    /// The `host` image: symlinks like the host's, empty mount points for the host's
    /// directories, an allow-listed /etc. Rebuilt under a new name when the host's
    /// files change (see [`Images::host`]).
    host: std::sync::Mutex<HostImage>,
    /// Host directories bind-mounted read-only for the `host` image.
    host_binds: Vec<String>,
    /// Masked paths present on this kernel, with whether each is a directory.
    masked: Vec<(&'static str, bool)>,
}

#[derive(Debug)]
struct HostImage {
    dir: PathBuf,
    fingerprint: String,
    checked: std::time::Instant,
}

impl Images {
    /// Builds `{images}/skeleton-v2` unless it exists, and the `host` image for the
    /// host's files as they are now. Both are built under a temporary name and
    /// renamed, so a crash never leaves half an image.
    pub(crate) fn prepare(images: &Path) -> Result<Self, PrepareImageError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| PrepareImageError::Io { path, source }
        };
        fs::create_dir_all(images).map_err(io(images))?;

        let skeleton = images.join("skeleton-v2");
        if !skeleton.exists() {
            let tmp = images.join(format!("skeleton-v2.tmp{}", std::process::id()));
            build_skeleton(&tmp).map_err(io(&tmp))?;
            fs::rename(&tmp, &skeleton).map_err(io(&skeleton))?;
        }

        let mut host_binds = Vec::new();
        for name in HOST_DIRS {
            let path = Path::new("/").join(name);
            if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                host_binds.push(name.to_owned());
            }
        }
        let fingerprint = host_fingerprint();
        let dir = ensure_host_image(images, &fingerprint)?;

        let masked = MASKED
            .iter()
            .filter_map(|p| {
                let meta = fs::metadata(Path::new("/").join(p)).ok()?;
                Some((*p, meta.is_dir()))
            })
            .collect();
        Ok(Self {
            root: images.to_owned(),
            skeleton,
            host: std::sync::Mutex::new(HostImage {
                dir,
                fingerprint,
                checked: std::time::Instant::now(),
            }),
            host_binds,
            masked,
        })
    }

    /// The current `host` image directory. At most every [`HOST_CHECK_INTERVAL`]
    /// it checks whether the host's allow-listed files changed, and if they did
    /// builds a new image: a sandbox created afterwards sees the host's new
    /// certificates or time zone, while running sandboxes keep the directory they
    /// were created with (removed by [`Images::remove_unused_host_images`] once none
    /// uses it).
    pub(crate) fn host(&self) -> Result<PathBuf, PrepareImageError> {
        let mut host = self.host.lock().unwrap_or_else(|e| e.into_inner());
        if host.checked.elapsed() >= HOST_CHECK_INTERVAL {
            host.checked = std::time::Instant::now();
            let fingerprint = host_fingerprint();
            if fingerprint != host.fingerprint {
                host.dir = ensure_host_image(&self.root, &fingerprint)?;
                host.fingerprint = fingerprint;
                tracing::info!(dir = %host.dir.display(), "the host's files changed: new host image");
            }
        }
        Ok(host.dir.clone())
    }

    /// Removes `host` image directories other than the current one and those in
    /// `in_use` (directory names). Nothing in them is ever a mount on the host, but
    /// they are removed without following symlinks all the same.
    pub(crate) fn remove_unused_host_images(&self, in_use: &std::collections::HashSet<String>) {
        let current = self.host.lock().unwrap_or_else(|e| e.into_inner()).dir.clone();
        let Ok(entries) = fs::read_dir(&self.root) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("host-") || in_use.contains(&name) || entry.path() == current {
                continue;
            }
            if let Err(error) = fs::remove_dir_all(entry.path()) {
                tracing::warn!(dir = %entry.path().display(), %error, "cannot remove an old host image");
            }
        }
    }
}

/// The `host` image directory for `fingerprint`, built if it does not exist.
fn ensure_host_image(images: &Path, fingerprint: &str) -> Result<PathBuf, PrepareImageError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PrepareImageError::Io { path, source }
    };
    let host = images.join(format!("host-{fingerprint}"));
    if !host.exists() {
        let tmp = images.join(format!("host-{fingerprint}.tmp{}", std::process::id()));
        build_host(&tmp).map_err(io(&tmp))?;
        fs::rename(&tmp, &host).map_err(io(&host))?;
    }
    Ok(host)
}

/// A digest of everything [`build_host`] reads: names, types, sizes, modification
/// times and link targets of the allow-listed files and of the generated files'
/// sources. Cheap enough to compute on a create now and then.
fn host_fingerprint() -> String {
    use sha2::Digest as _;
    use std::os::unix::fs::MetadataExt as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(HOST_IMAGE_VERSION);
    let mut visit = |path: &Path| {
        let mut stack = vec![path.to_owned()];
        while let Some(path) = stack.pop() {
            hasher.update(path.as_os_str().as_encoded_bytes());
            let Ok(meta) = fs::symlink_metadata(&path) else {
                hasher.update(b"\0missing");
                continue;
            };
            hasher.update(format!(
                "\0{:o} {} {} {}",
                meta.mode(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec()
            ));
            if meta.file_type().is_symlink() {
                if let Ok(target) = fs::read_link(&path) {
                    hasher.update(target.as_os_str().as_encoded_bytes());
                }
            } else if meta.is_dir()
                && let Ok(entries) = fs::read_dir(&path)
            {
                let mut children: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                children.sort();
                stack.extend(children.into_iter().rev());
            }
        }
    };
    for name in HOST_ETC {
        visit(&Path::new("/etc").join(name));
    }
    for source in HOST_ETC_SOURCES {
        visit(Path::new(source));
    }
    for dir in python_etc_dirs() {
        visit(&dir);
    }
    // The top-level directories only as far as the image mirrors them: whether
    // each is a directory or a symlink, and where the link points.
    for name in HOST_DIRS {
        let path = Path::new("/").join(name);
        let kind = fs::symlink_metadata(&path).map(|m| m.file_type());
        hasher.update(format!(
            "{name}:{:?}:{:?}",
            kind.map(|k| k.is_symlink()).ok(),
            fs::read_link(&path).ok()
        ));
    }
    hex::encode(&hasher.finalize()[..8])
}

fn build_skeleton(dir: &Path) -> io::Result<()> {
    let _ = fs::remove_dir_all(dir);
    for sub in ["", "proc", "dev", "sys", "tmp", ".hutch"] {
        fs::create_dir(dir.join(sub))?;
    }
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::write(dir.join(".hutch/sandboxd"), b"")?;
    Ok(())
}

/// `/etc/python3*`: python3.11 and friends keep their site configuration there.
fn python_etc_dirs() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/etc") else { return Vec::new() };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("python3")))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
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
        ("etc/ssl", 0o755),
    ] {
        fs::create_dir(dir.join(sub))?;
        fs::set_permissions(dir.join(sub), fs::Permissions::from_mode(mode))?;
    }
    let etc = dir.join("etc");
    for name in HOST_ETC {
        copy_tree(&Path::new("/etc").join(name), &etc.join(name))?;
    }
    for source in python_etc_dirs() {
        if let Some(name) = source.file_name() {
            copy_tree(&source, &etc.join(name))?;
        }
    }
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    fs::write(etc.join("passwd"), system_accounts(&read("/etc/passwd"), 2))?;
    fs::write(etc.join("group"), system_accounts(&read("/etc/group"), 2))?;
    fs::write(
        etc.join("resolv.conf"),
        resolv_conf(&read("/etc/resolv.conf"), &read("/run/systemd/resolve/resolv.conf")),
    )?;
    // Our own hosts file: the host's may name machines on its network.
    fs::write(
        etc.join("hosts"),
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )?;
    Ok(())
}

/// The system accounts of a `passwd` or `group` file (`id_field` is where the
/// numeric id is): ids below [`FIRST_USER_ID`] and `nobody`, with no password
/// field and, for groups, no members (members name real users). The host's
/// real users are nobody's business inside a sandbox.
fn system_accounts(text: &str, id_field: usize) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut fields: Vec<&str> = line.split(':').collect();
        let Some(id) = fields.get(id_field).and_then(|id| id.parse::<u32>().ok()) else {
            continue;
        };
        if (id >= FIRST_USER_ID && id != NOBODY_ID) || fields.len() < 4 {
            continue;
        }
        fields[1] = "x";
        if id_field == 2 && fields.len() == 4 {
            // A group line: name:x:gid:members.
            fields[3] = "";
        }
        out.push_str(&fields.join(":"));
        out.push('\n');
    }
    out
}

/// A resolv.conf for sandboxes: the host's name servers, except loopback ones,
/// which a sandbox cannot reach (its loopback is its own). A host that uses a
/// local stub resolver (systemd-resolved's 127.0.0.53) has its real upstreams in
/// `upstream`. Search domains stay out: they name the host's own network.
fn resolv_conf(host: &str, upstream: &str) -> String {
    let servers = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|line| line.trim().strip_prefix("nameserver"))
            .map(|rest| rest.trim().to_owned())
            .filter(|server| server.parse::<std::net::IpAddr>().is_ok_and(|ip| !ip.is_loopback()))
            .collect()
    };
    let mut found = servers(host);
    if found.is_empty() {
        found = servers(upstream);
    }
    let options: Vec<&str> =
        host.lines().map(str::trim).filter(|line| line.starts_with("options ")).collect();
    let mut out = String::from("# Written by Hutch from the host's name servers.\n");
    for server in found.iter().take(3) {
        out.push_str(&format!("nameserver {server}\n"));
    }
    for line in options {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Copies a file, symlink or directory tree; a missing source is skipped, and so
/// is every file that is not world-readable (see [`HOST_ETC`]).
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
        if meta.permissions().mode() & 0o005 != 0o005 {
            return Ok(());
        }
        fs::create_dir(dst)?;
        fs::set_permissions(dst, meta.permissions())?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
        Ok(())
    } else if kind.is_file() {
        if meta.permissions().mode() & 0o004 == 0 {
            return Ok(());
        }
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
    host: &Path,
    rootfs: &Rootfs,
) -> Result<Vec<PathBuf>, PlanMountsError> {
    let mut lowers = vec![images.skeleton.clone()];
    match rootfs {
        Rootfs::Host => lowers.push(host.to_owned()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_system_accounts_reach_the_host_image() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
                      alice:$6$salt$hash:1000:1000:Alice:/home/alice:/bin/bash\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
                      broken line\n";
        assert_eq!(
            system_accounts(passwd, 2),
            "root:x:0:0:root:/root:/bin/bash\n\
             daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        );
        let group = "root:x:0:\nsudo:x:27:alice,bob\nalice:x:1000:\nnogroup:x:65534:\n";
        assert_eq!(system_accounts(group, 2), "root:x:0:\nsudo:x:27:\nnogroup:x:65534:\n");
    }

    #[test]
    fn resolv_conf_skips_loopback_stubs_and_search_domains() {
        let host = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example\n";
        let upstream = "nameserver 10.0.0.2\nnameserver 192.0.2.53\nsearch corp.example\n";
        let text = resolv_conf(host, upstream);
        assert!(text.contains("nameserver 10.0.0.2\nnameserver 192.0.2.53\n"), "{text}");
        assert!(text.contains("options edns0 trust-ad"), "{text}");
        assert!(!text.contains("127.0.0.53") && !text.contains("search"), "{text}");
        let direct = resolv_conf("nameserver 10.255.255.53\n", "");
        assert!(direct.contains("nameserver 10.255.255.53\n"), "{direct}");
    }

    #[test]
    fn the_host_fingerprint_is_stable_while_nothing_changes() {
        assert_eq!(host_fingerprint(), host_fingerprint());
    }
}
