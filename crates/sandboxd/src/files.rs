//! File operations on the sandbox's filesystem. Everything here is blocking
//! and runs on Tokio's blocking pool; bodies stream through in chunks and
//! are never held whole in memory.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use hutch_api::{FileInfo, FileKind};
use tokio::sync::mpsc;

/// Chunk size for streaming reads. Large enough that syscalls and task
/// wake-ups are a small fraction of the cost at several GB/s.
pub const READ_CHUNK: usize = 256 * 1024;

/// Write buffer of an upload.
const UPLOAD_BUFFER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0} does not exist")]
    NotFound(PathBuf),
    #[error("{0} (or one of its parents) is not a directory")]
    NotADirectory(PathBuf),
    #[error("{0} is a directory")]
    IsADirectory(PathBuf),
    #[error("{0} already exists")]
    AlreadyExists(PathBuf),
    #[error("directory {0} is not empty")]
    DirectoryNotEmpty(PathBuf),
    #[error("permission denied on {0}")]
    PermissionDenied(PathBuf),
    #[error("refusing to {0} the root directory")]
    Root(&'static str),
    #[error("invalid mode {0:?}: expected octal permission bits such as 644 or 0755")]
    InvalidMode(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FileError {
    /// Classifies an I/O error on `path` into the error a client can act on.
    pub fn at(path: &Path, source: io::Error) -> FileError {
        let path = path.to_path_buf();
        match source.kind() {
            io::ErrorKind::NotFound => FileError::NotFound(path),
            io::ErrorKind::NotADirectory => FileError::NotADirectory(path),
            io::ErrorKind::IsADirectory => FileError::IsADirectory(path),
            io::ErrorKind::AlreadyExists => FileError::AlreadyExists(path),
            io::ErrorKind::DirectoryNotEmpty => FileError::DirectoryNotEmpty(path),
            io::ErrorKind::PermissionDenied => FileError::PermissionDenied(path),
            _ => FileError::Io { path, source },
        }
    }
}

/// Parses octal permission bits: `644`, `0644`, `0o644`.
pub fn parse_mode(raw: &str) -> Result<u32, FileError> {
    let digits = raw.strip_prefix("0o").unwrap_or(raw);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777 && !digits.is_empty())
        .ok_or_else(|| FileError::InvalidMode(raw.to_owned()))
}

/// Describes `path` without following a final symlink.
pub fn stat(path: &Path) -> Result<FileInfo, FileError> {
    let meta = fs::symlink_metadata(path).map_err(|e| FileError::at(path, e))?;
    Ok(describe(path, &meta))
}

fn describe(path: &Path, meta: &fs::Metadata) -> FileInfo {
    let kind = if meta.is_symlink() {
        FileKind::Symlink
    } else if meta.is_dir() {
        FileKind::Dir
    } else if meta.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    FileInfo {
        path: path.to_string_lossy().into_owned(),
        name: path.file_name().map_or_else(|| "/".into(), |n| n.to_string_lossy().into_owned()),
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        modified_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
        symlink_target: (kind == FileKind::Symlink)
            .then(|| fs::read_link(path).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned()),
    }
}

/// Lists a directory, sorted by name.
pub fn list(path: &Path) -> Result<Vec<FileInfo>, FileError> {
    let meta = fs::metadata(path).map_err(|e| FileError::at(path, e))?;
    if !meta.is_dir() {
        return Err(FileError::NotADirectory(path.to_path_buf()));
    }
    let mut entries = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| FileError::at(path, e))? {
        let entry = entry.map_err(|e| FileError::at(path, e))?;
        let child = entry.path();
        // An entry removed between readdir and lstat is simply not listed.
        if let Ok(meta) = fs::symlink_metadata(&child) {
            entries.push(describe(&child, &meta));
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// `mkdir -p`. An existing directory is fine; an existing file is not.
pub fn mkdir(path: &Path, mode: Option<u32>) -> Result<FileInfo, FileError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    if let Some(mode) = mode {
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, mode);
    }
    builder.create(path).map_err(|e| FileError::at(path, e))?;
    let info = stat(path)?;
    if info.kind != FileKind::Dir {
        return Err(FileError::AlreadyExists(path.to_path_buf()));
    }
    Ok(info)
}

/// Removes a file, a symlink, or a directory (only when `recursive` if it is
/// not empty). Symlinks are removed, never followed.
pub fn remove(path: &Path, recursive: bool) -> Result<(), FileError> {
    if path == Path::new("/") {
        return Err(FileError::Root("delete"));
    }
    let meta = fs::symlink_metadata(path).map_err(|e| FileError::at(path, e))?;
    let result = if !meta.is_dir() {
        fs::remove_file(path)
    } else if recursive {
        fs::remove_dir_all(path)
    } else {
        fs::remove_dir(path)
    };
    result.map_err(|e| FileError::at(path, e))
}

/// Renames `from` to `to`, copying and deleting when they are on different
/// filesystems (an overlay root and a tmpfs /tmp, say).
pub fn rename(from: &Path, to: &Path, overwrite: bool) -> Result<FileInfo, FileError> {
    if from == Path::new("/") || to == Path::new("/") {
        return Err(FileError::Root("move"));
    }
    fs::symlink_metadata(from).map_err(|e| FileError::at(from, e))?;
    if !overwrite && fs::symlink_metadata(to).is_ok() {
        return Err(FileError::AlreadyExists(to.to_path_buf()));
    }
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(|e| FileError::at(parent, e))?;
    }
    match fs::rename(from, to) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
            if overwrite && fs::symlink_metadata(to).is_ok() {
                remove(to, false)?;
            }
            copy_tree(from, to)?;
            remove(from, true)?;
        }
        Err(e) => return Err(FileError::at(to, e)),
    }
    stat(to)
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), FileError> {
    let meta = fs::symlink_metadata(from).map_err(|e| FileError::at(from, e))?;
    if meta.is_symlink() {
        let target = fs::read_link(from).map_err(|e| FileError::at(from, e))?;
        std::os::unix::fs::symlink(target, to).map_err(|e| FileError::at(to, e))?;
    } else if meta.is_dir() {
        fs::create_dir(to).map_err(|e| FileError::at(to, e))?;
        for entry in fs::read_dir(from).map_err(|e| FileError::at(from, e))? {
            let entry = entry.map_err(|e| FileError::at(from, e))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        fs::set_permissions(to, meta.permissions()).map_err(|e| FileError::at(to, e))?;
    } else {
        fs::copy(from, to).map_err(|e| FileError::at(to, e))?;
    }
    let _ = std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()));
    Ok(())
}

/// Opens a regular file for reading and returns it with its size.
pub fn open_for_read(path: &Path) -> Result<(File, u64), FileError> {
    let file = File::open(path).map_err(|e| FileError::at(path, e))?;
    let meta = file.metadata().map_err(|e| FileError::at(path, e))?;
    if meta.is_dir() {
        return Err(FileError::IsADirectory(path.to_path_buf()));
    }
    Ok((file, meta.len()))
}

/// Streams `len` bytes of `file` into `sink` in [`READ_CHUNK`]s. Stops
/// quietly when the receiver is gone (the client hung up).
pub fn stream_file(
    path: &Path,
    mut file: File,
    start: u64,
    len: u64,
    sink: mpsc::Sender<io::Result<Bytes>>,
) {
    use std::io::Seek;
    if start > 0
        && let Err(e) = file.seek(io::SeekFrom::Start(start))
    {
        let _ = sink.blocking_send(Err(e));
        return;
    }
    let mut remaining = len;
    while remaining > 0 {
        let want = (remaining as usize).min(READ_CHUNK);
        let mut buf = BytesMut::zeroed(want);
        match file.read(&mut buf) {
            Ok(0) => {
                // The file shrank under us: end the body short rather than
                // pad it, so the client sees a truncated transfer.
                let message = format!("{} shrank while being read", path.display());
                let _ =
                    sink.blocking_send(Err(io::Error::new(io::ErrorKind::UnexpectedEof, message)));
                return;
            }
            Ok(n) => {
                buf.truncate(n);
                remaining -= n as u64;
                if sink.blocking_send(Ok(buf.freeze())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = sink.blocking_send(Err(e));
                return;
            }
        }
    }
}

/// An upload in progress: bytes go to a temporary file beside the target,
/// which replaces the target only when complete, so readers never see a
/// half-written file and a failed upload leaves the old one intact.
#[derive(Debug)]
pub struct Upload {
    target: PathBuf,
    temp: PathBuf,
    /// Frames arrive in pieces of 64 KiB or less; batching them into large
    /// writes cuts syscalls by more than ten times.
    file: Option<io::BufWriter<File>>,
    mode: u32,
    owner: Option<(u32, u32)>,
    committed: bool,
}

impl Upload {
    pub fn begin(target: &Path, mode: Option<u32>) -> Result<Upload, FileError> {
        if target == Path::new("/") {
            return Err(FileError::IsADirectory(target.to_path_buf()));
        }
        let parent = target.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(parent).map_err(|e| FileError::at(parent, e))?;
        // Overwriting keeps the file's mode and owner unless a mode is given,
        // as `cp` onto an existing file does.
        let existing = match fs::metadata(target) {
            Ok(meta) if meta.is_dir() => return Err(FileError::IsADirectory(target.to_path_buf())),
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(FileError::at(target, e)),
        };
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp = parent.join(format!(".{name}.hutch-upload-{}", unique_suffix()));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| FileError::at(&temp, e))?;
        Ok(Upload {
            target: target.to_path_buf(),
            temp,
            file: Some(io::BufWriter::with_capacity(UPLOAD_BUFFER, file)),
            mode: mode.or(existing.as_ref().map(|m| m.mode() & 0o7777)).unwrap_or(0o644),
            owner: existing.map(|m| (m.uid(), m.gid())),
            committed: false,
        })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        let file = self.file.as_mut().ok_or_else(|| FileError::NotFound(self.temp.clone()))?;
        file.write_all(data).map_err(|e| FileError::at(&self.target, e))
    }

    pub fn commit(mut self) -> Result<FileInfo, FileError> {
        let file = self.file.take().ok_or_else(|| FileError::NotFound(self.temp.clone()))?;
        let file = file.into_inner().map_err(|e| FileError::at(&self.target, e.into_error()))?;
        file.set_permissions(fs::Permissions::from_mode(self.mode))
            .map_err(|e| FileError::at(&self.temp, e))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(|e| FileError::at(&self.temp, e))?;
        }
        drop(file);
        fs::rename(&self.temp, &self.target).map_err(|e| FileError::at(&self.target, e))?;
        self.committed = true;
        stat(&self.target)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A `Write` that hands full chunks to an async receiver, for streaming a
/// tar archive out as it is built.
pub struct ChunkWriter {
    buf: BytesMut,
    sink: mpsc::Sender<io::Result<Bytes>>,
}

impl ChunkWriter {
    pub fn new(sink: mpsc::Sender<io::Result<Bytes>>) -> ChunkWriter {
        ChunkWriter { buf: BytesMut::with_capacity(READ_CHUNK), sink }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.sink
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))
    }

    pub fn fail(&self, error: io::Error) {
        let _ = self.sink.blocking_send(Err(error));
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= READ_CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Writes a tar archive of the directory `dir` (entries relative to it).
/// Symlinks are archived as links, never followed.
pub fn archive_dir(dir: &Path, out: &mut ChunkWriter) -> io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    builder.append_dir_all(".", dir)?;
    builder.into_inner()?.flush()
}

/// Unpacks a tar archive into `dir`, creating it. The tar crate refuses
/// entries that would land outside `dir` (absolute paths, `..`, writes
/// through symlinks).
pub fn extract_archive(reader: impl Read, dir: &Path) -> Result<FileInfo, FileError> {
    fs::create_dir_all(dir).map_err(|e| FileError::at(dir, e))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.unpack(dir).map_err(|e| FileError::Io { path: dir.to_path_buf(), source: e })?;
    stat(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_octal() {
        assert_eq!(parse_mode("644").unwrap(), 0o644);
        assert_eq!(parse_mode("0755").unwrap(), 0o755);
        assert_eq!(parse_mode("0o600").unwrap(), 0o600);
        for bad in ["", "9", "abc", "17777", "-1", "0o"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_failed_upload_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        fs::write(&target, "old").unwrap();
        let mut upload = Upload::begin(&target, None).unwrap();
        upload.write(b"new but unfinished").unwrap();
        drop(upload);
        assert_eq!(fs::read_to_string(&target).unwrap(), "old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "temp file removed");
    }
}
