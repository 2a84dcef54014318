//! Safe extraction of one (untrusted) image layer into an empty directory.
//!
//! The tar crate's `unpack` is not used: every entry goes through
//! [`validate_entry_path`] and is then created relative to directory file
//! descriptors that were opened one component at a time with `O_NOFOLLOW`,
//! so no entry can write outside the layer directory, neither with `..`,
//! an absolute path, nor through a symlink or hard link created by an
//! earlier entry.
//!
//! Policy, in one place:
//! - absolute paths and `..` components fail the whole layer (a registry
//!   serving such a layer is hostile or broken; a half-applied layer is
//!   worse than none);
//! - a parent component that is not a directory of this layer (a symlink, a
//!   regular file) fails the layer instead of being followed;
//! - hard links may only name targets created earlier in the same layer;
//! - character and block devices are skipped (the sandbox gets its own
//!   minimal /dev); FIFOs are created;
//! - setuid and setgid bits are stripped. Sandboxes also run with
//!   `no_new_privs`, so this is defence in depth;
//! - extended attributes from PAX headers (file capabilities, and above all
//!   `trusted.overlay.*`, which would let a layer forge whiteouts or redirects)
//!   are dropped;
//! - `.wh.<name>` becomes an overlayfs whiteout (a 0:0 character device that
//!   we create ourselves) and `.wh..wh..opq` sets `trusted.overlay.opaque=y`
//!   (and `user.overlay.opaque=y`, for overlays mounted in a user namespace)
//!   on its directory, so the directory can be used directly as an overlayfs
//!   lower directory.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens, mkdirat,
    mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};

/// Prefix of a whiteout entry in an image layer.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the entry that marks its directory as opaque.
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
/// Prefix of AUFS bookkeeping entries (`.wh..wh.plnk`, ...), which are skipped.
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";
/// The only permission bits kept: rwx for all plus sticky; never setuid/setgid.
const KEPT_MODE_BITS: u32 = 0o1777;

/// A validated, normalised path of an archive entry, relative to the layer root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryPath {
    components: Vec<Vec<u8>>,
}

impl EntryPath {
    /// The normal components; empty for the layer root itself (`.` or `./`).
    pub fn components(&self) -> &[Vec<u8>] {
        &self.components
    }

    /// Whether this path names the layer root.
    pub fn is_root(&self) -> bool {
        self.components.is_empty()
    }

    fn split_last(&self) -> Option<(&[Vec<u8>], &[u8])> {
        self.components.split_last().map(|(name, parents)| (parents, name.as_slice()))
    }

    fn display(&self) -> String {
        let joined: Vec<&[u8]> = self.components.iter().map(Vec::as_slice).collect();
        String::from_utf8_lossy(&joined.join(&b'/')).into_owned()
    }
}

/// Why an entry path (or hard link target) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryPathError {
    #[error("path is empty")]
    Empty,
    #[error("path is absolute")]
    Absolute,
    #[error("path has a `..` component")]
    ParentComponent,
    #[error("path contains a NUL byte")]
    Nul,
}

/// Validates and normalises the raw path of an archive entry.
///
/// `.` and empty components are dropped (so `./a//b/` is `a/b`); a leading
/// `/` or any `..` component is refused rather than rewritten, because no
/// well-formed layer contains one.
pub fn validate_entry_path(raw: &[u8]) -> Result<EntryPath, EntryPathError> {
    if raw.is_empty() {
        return Err(EntryPathError::Empty);
    }
    if raw.contains(&0) {
        return Err(EntryPathError::Nul);
    }
    if raw.first() == Some(&b'/') {
        return Err(EntryPathError::Absolute);
    }
    let mut components = Vec::new();
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(EntryPathError::ParentComponent),
            name => components.push(name.to_vec()),
        }
    }
    Ok(EntryPath { components })
}

/// What a file name means to overlayfs-style layer semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhiteoutKind<'a> {
    /// An ordinary name.
    None,
    /// `.wh..wh..opq`: the containing directory hides everything below it.
    Opaque,
    /// `.wh.<name>`: `<name>` is deleted from the lower layers.
    Whiteout(&'a [u8]),
    /// Other `.wh..wh.*` AUFS bookkeeping; ignored.
    AufsMeta,
}

/// Classifies the last component of an entry path.
pub fn classify_whiteout(name: &[u8]) -> WhiteoutKind<'_> {
    if name == OPAQUE_WHITEOUT {
        WhiteoutKind::Opaque
    } else if name.starts_with(AUFS_META_PREFIX) {
        WhiteoutKind::AufsMeta
    } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
        WhiteoutKind::Whiteout(hidden)
    } else {
        WhiteoutKind::None
    }
}

/// What one layer contained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries in the archive.
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub file_bytes: u64,
    /// Device nodes and other entries that were deliberately not created.
    pub skipped: u64,
    /// Whiteouts and opaque markers created.
    pub whiteouts: u64,
}

/// Errors while unpacking a layer.
#[derive(Debug, thiserror::Error)]
pub enum UnpackLayerError {
    #[error("layer has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("layer content exceeds {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("cannot open layer directory {path}")]
    OpenDestination {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot read layer archive")]
    ReadArchive(#[source] io::Error),
    #[error("refusing archive entry {path:?}")]
    UnsafePath {
        path: String,
        #[source]
        source: EntryPathError,
    },
    #[error("refusing hard link {path:?} to {target:?}")]
    UnsafeLinkTarget {
        path: String,
        target: String,
        #[source]
        source: EntryPathError,
    },
    #[error("refusing whiteout {path:?}: it names no file")]
    InvalidWhiteout { path: String },
    #[error("refusing entry {path:?}: a parent component is not a directory of this layer")]
    ParentNotDirectory {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("entry {path:?} has unsupported tar entry type {entry_type}")]
    UnsupportedEntryType { path: String, entry_type: u8 },
    #[error("cannot {operation} for entry {path:?}")]
    CreateEntry {
        path: String,
        operation: &'static str,
        #[source]
        source: Errno,
    },
    #[error("cannot write content of {path:?}")]
    WriteContent {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Wraps a layer stream in the decompressor its magic bytes announce
/// (gzip, zstd) or returns it as plain tar.
pub fn decompress<'a, R: BufRead + 'a>(mut reader: R) -> io::Result<Box<dyn Read + 'a>> {
    let head = reader.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(reader)?))
    } else {
        Ok(Box::new(reader))
    }
}

/// Unpacks one layer (gzip, zstd or plain tar) into `dest`, which must be an
/// existing, empty directory that nothing else writes to.
pub fn unpack_layer<R: Read>(reader: R, dest: &Path) -> Result<UnpackStats, UnpackLayerError> {
    unpack_layer_with_limits(reader, dest, UnpackLimits::default())
}

/// Bounds on what one layer may create, so that a small compressed blob
/// cannot expand into a full disk or an inode exhaustion (a decompression
/// bomb). The defaults are far above any sane image layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Total bytes of regular-file content.
    pub max_file_bytes: u64,
    /// Archive entries of any kind.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits { max_file_bytes: 64 << 30, max_entries: 4_000_000 }
    }
}

/// [`unpack_layer`] with explicit [`UnpackLimits`].
pub fn unpack_layer_with_limits<R: Read>(
    reader: R,
    dest: &Path,
    limits: UnpackLimits,
) -> Result<UnpackStats, UnpackLayerError> {
    let root = openat(
        nix::fcntl::AT_FDCWD,
        dest,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| UnpackLayerError::OpenDestination { path: dest.to_owned(), source })?;
    let reader = decompress(BufReader::with_capacity(256 * 1024, reader))
        .map_err(UnpackLayerError::ReadArchive)?;
    let mut archive = tar::Archive::new(reader);
    let mut unpacker = Unpacker { root, stats: UnpackStats::default(), dirs: HashMap::new() };
    let entries = archive.entries().map_err(UnpackLayerError::ReadArchive)?;
    for entry in entries {
        let entry = entry.map_err(UnpackLayerError::ReadArchive)?;
        unpacker.stats.entries += 1;
        if unpacker.stats.entries > limits.max_entries {
            return Err(UnpackLayerError::TooManyEntries { limit: limits.max_entries });
        }
        let size = entry.size();
        if entry.header().entry_type().is_file()
            && unpacker.stats.file_bytes.saturating_add(size) > limits.max_file_bytes
        {
            return Err(UnpackLayerError::TooLarge { limit: limits.max_file_bytes });
        }
        unpacker.entry(entry)?;
    }
    unpacker.finish_directories()?;
    Ok(unpacker.stats)
}

/// Metadata applied to a directory once all of its children exist, because
/// creating a child changes the directory's mtime.
#[derive(Debug, Clone, Copy)]
struct DirMeta {
    mode: u32,
    mtime: i64,
}

struct Unpacker {
    root: OwnedFd,
    stats: UnpackStats,
    dirs: HashMap<EntryPath, DirMeta>,
}

fn entry_mode(header: &tar::Header) -> u32 {
    header.mode().unwrap_or(0o644) & KEPT_MODE_BITS
}

fn mtime_spec(mtime: i64) -> TimeSpec {
    TimeSpec::new(mtime, 0)
}

impl Unpacker {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackLayerError> {
        let raw_path = entry.path_bytes().into_owned();
        let path =
            validate_entry_path(&raw_path).map_err(|source| UnpackLayerError::UnsafePath {
                path: String::from_utf8_lossy(&raw_path).into_owned(),
                source,
            })?;
        let header = entry.header().clone();
        let entry_type = header.entry_type();
        let shown = path.display();
        let mode = entry_mode(&header);
        let mtime = header.mtime().ok().and_then(|m| i64::try_from(m).ok()).unwrap_or(0);
        let uid = header.uid().ok().and_then(|u| u32::try_from(u).ok()).unwrap_or(0);
        let gid = header.gid().ok().and_then(|g| u32::try_from(g).ok()).unwrap_or(0);

        let Some((parents, name)) = path.split_last() else {
            // The layer root itself (`./`): only directory metadata applies.
            if entry_type.is_dir() {
                fchown(&self.root, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(
                    |source| UnpackLayerError::CreateEntry {
                        path: shown,
                        operation: "chown",
                        source,
                    },
                )?;
                self.dirs.insert(path, DirMeta { mode, mtime });
            } else {
                self.stats.skipped += 1;
            }
            return Ok(());
        };

        match classify_whiteout(name) {
            WhiteoutKind::None => {}
            WhiteoutKind::AufsMeta => {
                self.stats.skipped += 1;
                return Ok(());
            }
            WhiteoutKind::Opaque => {
                let dir = self.open_dir(parents, true, &shown)?;
                set_opaque(&dir).map_err(|source| UnpackLayerError::CreateEntry {
                    path: shown,
                    operation: "set overlay.opaque",
                    source,
                })?;
                self.stats.whiteouts += 1;
                return Ok(());
            }
            WhiteoutKind::Whiteout(hidden) => {
                if matches!(hidden, b"" | b"." | b"..") {
                    return Err(UnpackLayerError::InvalidWhiteout { path: shown });
                }
                let dir = self.open_dir(parents, true, &shown)?;
                remove_existing(&dir, hidden, &shown)?;
                mknodat(&dir, hidden, SFlag::S_IFCHR, Mode::empty(), 0).map_err(|source| {
                    UnpackLayerError::CreateEntry {
                        path: shown,
                        operation: "create whiteout",
                        source,
                    }
                })?;
                self.stats.whiteouts += 1;
                return Ok(());
            }
        }

        let parent = self.open_dir(parents, true, &shown)?;
        let name = OsStr::from_bytes(name);
        let owner = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
        let create_err = |operation: &'static str, shown: &str| {
            let path = shown.to_owned();
            move |source| UnpackLayerError::CreateEntry { path, operation, source }
        };
        match entry_type {
            tar::EntryType::Directory => {
                match fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st)
                        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
                            == SFlag::S_IFDIR => {}
                    Ok(_) => {
                        remove_existing(&parent, name.as_bytes(), &shown)?;
                        mkdirat(&parent, name, Mode::from_bits_truncate(0o700))
                            .map_err(create_err("mkdir", &shown))?;
                    }
                    Err(Errno::ENOENT) => mkdirat(&parent, name, Mode::from_bits_truncate(0o700))
                        .map_err(create_err("mkdir", &shown))?,
                    Err(source) => return Err(create_err("stat", &shown)(source)),
                }
                fchownat(&parent, name, owner.0, owner.1, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(create_err("chown", &shown))?;
                self.dirs.insert(path.clone(), DirMeta { mode, mtime });
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_existing(&parent, name.as_bytes(), &shown)?;
                let fd = openat(
                    &parent,
                    name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(create_err("create file", &shown))?;
                let mut file = File::from(fd);
                let written = io::copy(&mut entry, &mut file).map_err(|source| {
                    UnpackLayerError::WriteContent { path: shown.clone(), source }
                })?;
                self.stats.file_bytes += written;
                // chown before chmod: chown clears setuid bits, and we want the
                // final mode to be exactly the (already sanitised) one we chose.
                fchown(&file, owner.0, owner.1).map_err(create_err("chown", &shown))?;
                fchmod(&file, Mode::from_bits_truncate(mode))
                    .map_err(create_err("chmod", &shown))?;
                futimens(&file, &mtime_spec(mtime), &mtime_spec(mtime))
                    .map_err(create_err("set times", &shown))?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                remove_existing(&parent, name.as_bytes(), &shown)?;
                // The target is stored verbatim: it is only ever resolved inside
                // the sandbox's root, never by us.
                symlinkat(OsStr::from_bytes(&target), &parent, name)
                    .map_err(create_err("create symlink", &shown))?;
                fchownat(&parent, name, owner.0, owner.1, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(create_err("chown", &shown))?;
                utimensat(
                    &parent,
                    name,
                    &mtime_spec(mtime),
                    &mtime_spec(mtime),
                    UtimensatFlags::NoFollowSymlink,
                )
                .map_err(create_err("set times", &shown))?;
            }
            tar::EntryType::Link => {
                let raw_target =
                    entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                let target = validate_entry_path(&raw_target)
                    .and_then(|t| if t.is_root() { Err(EntryPathError::Empty) } else { Ok(t) })
                    .map_err(|source| UnpackLayerError::UnsafeLinkTarget {
                        path: shown.clone(),
                        target: String::from_utf8_lossy(&raw_target).into_owned(),
                        source,
                    })?;
                if target == path {
                    return Ok(());
                }
                let Some((target_parents, target_name)) = target.split_last() else {
                    return Ok(());
                };
                // Never create directories for a link target: it must already
                // exist in this layer.
                let target_dir = self.open_dir(target_parents, false, &shown)?;
                remove_existing(&parent, name.as_bytes(), &shown)?;
                linkat(
                    &target_dir,
                    OsStr::from_bytes(target_name),
                    &parent,
                    name,
                    AtFlags::empty(),
                )
                .map_err(create_err("create hard link", &shown))?;
            }
            tar::EntryType::Fifo => {
                remove_existing(&parent, name.as_bytes(), &shown)?;
                mknodat(&parent, name, SFlag::S_IFIFO, Mode::from_bits_truncate(0o600), 0)
                    .map_err(create_err("create fifo", &shown))?;
                fchownat(&parent, name, owner.0, owner.1, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(create_err("chown", &shown))?;
                fchmodat(
                    &parent,
                    name,
                    Mode::from_bits_truncate(mode),
                    FchmodatFlags::FollowSymlink,
                )
                .map_err(create_err("chmod", &shown))?;
                utimensat(
                    &parent,
                    name,
                    &mtime_spec(mtime),
                    &mtime_spec(mtime),
                    UtimensatFlags::NoFollowSymlink,
                )
                .map_err(create_err("set times", &shown))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                self.stats.skipped += 1;
            }
            // PAX and GNU long-name headers are consumed by the tar crate
            // itself; a stray one carries nothing we apply.
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {
                self.stats.skipped += 1;
            }
            other => {
                return Err(UnpackLayerError::UnsupportedEntryType {
                    path: shown,
                    entry_type: other.as_byte(),
                });
            }
        }
        Ok(())
    }

    /// Opens the directory `components` below the layer root one component at
    /// a time with `O_NOFOLLOW`, creating missing ones when `create` is set.
    /// A symlink or non-directory anywhere on the way is an error, which is
    /// what stops `a -> /elsewhere` followed by `a/file` from writing outside.
    fn open_dir(
        &self,
        components: &[Vec<u8>],
        create: bool,
        shown: &str,
    ) -> Result<OwnedFd, UnpackLayerError> {
        let mut current =
            self.root.try_clone().map_err(|source| UnpackLayerError::CreateEntry {
                path: shown.to_owned(),
                operation: "duplicate directory descriptor",
                source: Errno::from_raw(source.raw_os_error().unwrap_or(libc::EBADF)),
            })?;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        for component in components {
            let name = OsStr::from_bytes(component);
            let next = match openat(&current, name, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(&current, name, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(source) => {
                            return Err(UnpackLayerError::CreateEntry {
                                path: shown.to_owned(),
                                operation: "create parent directory",
                                source,
                            });
                        }
                    }
                    openat(&current, name, flags, Mode::empty()).map_err(|source| {
                        UnpackLayerError::ParentNotDirectory { path: shown.to_owned(), source }
                    })?
                }
                Err(source) => {
                    return Err(UnpackLayerError::ParentNotDirectory {
                        path: shown.to_owned(),
                        source,
                    });
                }
            };
            current = next;
        }
        Ok(current)
    }

    /// Applies directory modes and mtimes, deepest first, after all entries
    /// exist.
    fn finish_directories(&mut self) -> Result<(), UnpackLayerError> {
        let mut dirs: Vec<(EntryPath, DirMeta)> = self.dirs.drain().collect();
        dirs.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().len()));
        for (path, meta) in dirs {
            let shown = path.display();
            let fd = self.open_dir(path.components(), false, &shown)?;
            fchmod(&fd, Mode::from_bits_truncate(meta.mode)).map_err(|source| {
                UnpackLayerError::CreateEntry { path: shown.clone(), operation: "chmod", source }
            })?;
            futimens(&fd, &mtime_spec(meta.mtime), &mtime_spec(meta.mtime)).map_err(|source| {
                UnpackLayerError::CreateEntry { path: shown, operation: "set times", source }
            })?;
        }
        Ok(())
    }
}

/// Removes whatever `name` is in `dir` (without following it), so that a
/// later entry replaces an earlier one as tar semantics require.
fn remove_existing(dir: &OwnedFd, name: &[u8], shown: &str) -> Result<(), UnpackLayerError> {
    let name = OsStr::from_bytes(name);
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(source) => {
            return Err(UnpackLayerError::CreateEntry {
                path: shown.to_owned(),
                operation: "stat existing entry",
                source,
            });
        }
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
        // remove_dir_all does not follow symlinks inside the tree; the
        // /proc/self/fd path pins the parent we already validated.
        let path = Path::new("/proc/self/fd").join(dir.as_fd().as_raw_fd().to_string()).join(name);
        std::fs::remove_dir_all(&path).map_err(|source| UnpackLayerError::CreateEntry {
            path: shown.to_owned(),
            operation: "remove replaced directory",
            source: Errno::from_raw(source.raw_os_error().unwrap_or(libc::EIO)),
        })
    } else {
        unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(|source| {
            UnpackLayerError::CreateEntry {
                path: shown.to_owned(),
                operation: "remove replaced entry",
                source,
            }
        })
    }
}

/// Marks a directory opaque for overlayfs: in `trusted.overlay.opaque`, which an
/// overlay mounted by host root reads, and in `user.overlay.opaque`, which an overlay
/// mounted inside a user namespace (`userxattr`) reads instead.
fn set_opaque(dir: &OwnedFd) -> Result<(), Errno> {
    let value = b"y";
    for name in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
        // SAFETY: `dir` is an open descriptor owned by the caller, `name` is a
        // NUL-terminated C string and `value` points to `value.len()` readable bytes.
        let rc = unsafe {
            libc::fsetxattr(dir.as_raw_fd(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0)
        };
        Errno::result(rc)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(p: &EntryPath) -> Vec<&str> {
        p.components().iter().map(|c| std::str::from_utf8(c).unwrap_or("<non-utf8>")).collect()
    }

    #[test]
    fn normal_paths_are_normalised() {
        let p = validate_entry_path(b"./usr//bin/./sh").expect("valid");
        assert_eq!(comps(&p), ["usr", "bin", "sh"]);
        let p = validate_entry_path(b"etc/").expect("valid");
        assert_eq!(comps(&p), ["etc"]);
    }

    #[test]
    fn root_entries_are_the_layer_root() {
        assert!(validate_entry_path(b"./").expect("valid").is_root());
        assert!(validate_entry_path(b".").expect("valid").is_root());
    }

    #[test]
    fn escaping_paths_are_refused() {
        assert_eq!(validate_entry_path(b"/etc/passwd"), Err(EntryPathError::Absolute));
        assert_eq!(validate_entry_path(b"../escape"), Err(EntryPathError::ParentComponent));
        assert_eq!(validate_entry_path(b"a/../../b"), Err(EntryPathError::ParentComponent));
        assert_eq!(validate_entry_path(b"a/.."), Err(EntryPathError::ParentComponent));
        assert_eq!(validate_entry_path(b""), Err(EntryPathError::Empty));
        assert_eq!(validate_entry_path(b"a\0b"), Err(EntryPathError::Nul));
    }

    #[test]
    fn dotted_names_that_are_not_parent_refs_are_fine() {
        let p = validate_entry_path(b"..a/b../...").expect("valid");
        assert_eq!(comps(&p), ["..a", "b..", "..."]);
    }

    #[test]
    fn whiteouts_are_classified() {
        assert_eq!(classify_whiteout(b".wh..wh..opq"), WhiteoutKind::Opaque);
        assert_eq!(classify_whiteout(b".wh.foo"), WhiteoutKind::Whiteout(b"foo"));
        assert_eq!(classify_whiteout(b".wh..wh.plnk"), WhiteoutKind::AufsMeta);
        assert_eq!(classify_whiteout(b"foo.wh."), WhiteoutKind::None);
    }

    /// A small deterministic generator, so the property below needs no extra crate.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Property: for any byte string, an accepted path has only normal
    /// components (no `..`, `.`, empty, `/` or NUL inside), and joining it
    /// under a base directory stays under that base lexically.
    #[test]
    fn accepted_paths_never_leave_the_root() {
        let alphabet: &[&[u8]] = &[b"/", b".", b"..", b"a", b"\0", b"b/", b"./", b"../", b".wh."];
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..50_000 {
            let len = (rng.next() % 12) as usize;
            let mut raw = Vec::new();
            for _ in 0..len {
                let piece = alphabet[(rng.next() % alphabet.len() as u64) as usize];
                raw.extend_from_slice(piece);
            }
            let Ok(path) = validate_entry_path(&raw) else {
                continue;
            };
            let base = Path::new("/base");
            let mut joined = base.to_path_buf();
            for c in path.components() {
                assert!(!c.is_empty());
                assert_ne!(c.as_slice(), b".");
                assert_ne!(c.as_slice(), b"..");
                assert!(!c.contains(&b'/'));
                assert!(!c.contains(&0));
                joined.push(OsStr::from_bytes(c));
            }
            assert!(joined.starts_with(base), "{raw:?} escaped to {joined:?}");
            assert!(joined.components().all(|c| !matches!(c, std::path::Component::ParentDir)));
        }
    }
}
