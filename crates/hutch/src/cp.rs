//! `hutch sandbox cp`: files and directories in and out of a sandbox,
//! streamed both ways with no size limit. Directories travel as tar streams
//! through sandboxd's archive endpoints; `-` is our stdin or stdout.
//!
//! Destinations follow `cp`/`docker cp`: copying into an existing directory
//! (or a path ending in `/`) puts the source inside it under its own name;
//! otherwise the destination is the new name.

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use hutch_api::FileKind;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};

use crate::UsageError;
use crate::client::Client;
use crate::daemon::Daemon;

/// Upload bodies and tar streams move in chunks of this size.
const CHUNK: usize = 256 * 1024;

#[derive(Debug, PartialEq, Eq)]
enum Location {
    Local(PathBuf),
    /// `-`: stdin as a source, stdout as a destination.
    Stdio,
    Remote {
        id: String,
        path: String,
    },
}

/// `ID:/path` is remote; anything else (`./a:b`, `/x`, `a/b:c`) is local.
fn parse_location(text: &str) -> Result<Location, UsageError> {
    if text == "-" {
        return Ok(Location::Stdio);
    }
    match text.split_once(':') {
        Some((id, path)) if !id.is_empty() && !id.contains('/') && !id.starts_with('.') => {
            if !path.starts_with('/') {
                return Err(UsageError(format!(
                    "the path in the sandbox must be absolute: {text:?} (try {id}:/{path})"
                )));
            }
            Ok(Location::Remote { id: id.to_owned(), path: path.to_owned() })
        }
        _ if text.is_empty() => Err(UsageError("empty path".into())),
        _ => Ok(Location::Local(PathBuf::from(text))),
    }
}

pub async fn copy(client: &Client, source: &str, destination: &str) -> anyhow::Result<()> {
    match (parse_location(source)?, parse_location(destination)?) {
        (Location::Local(local), Location::Remote { id, path }) => {
            upload(&client.daemon(&id), &local, &path).await
        }
        (Location::Stdio, Location::Remote { id, path }) => {
            let body =
                reqwest::Body::wrap_stream(ReaderStream::with_capacity(tokio::io::stdin(), CHUNK));
            client.daemon(&id).upload_file(&path, None, body).await.map(drop)
        }
        (Location::Remote { id, path }, Location::Local(local)) => {
            download(&client.daemon(&id), &path, &local).await
        }
        (Location::Remote { id, path }, Location::Stdio) => {
            let response = client.daemon(&id).download_file(&path).await?;
            let mut stdout = tokio::io::stdout();
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                stdout.write_all(&chunk.context("reading the file from the sandbox")?).await?;
            }
            stdout.flush().await?;
            Ok(())
        }
        (Location::Remote { .. }, Location::Remote { .. }) => Err(UsageError(
            "copying between sandboxes is not supported: copy through a local path".into(),
        )
        .into()),
        _ => Err(UsageError("one of source and destination must be in a sandbox: ID:/path".into())
            .into()),
    }
}

/// `dir/name` for a remote directory path.
fn remote_join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

async fn upload(daemon: &Daemon, local: &Path, remote: &str) -> anyhow::Result<()> {
    let metadata = tokio::fs::metadata(local)
        .await
        .with_context(|| format!("cannot read {}", local.display()))?;
    let name = match local.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        // `.`, `..`, `/`: the directory's real name.
        None => std::fs::canonicalize(local)?
            .file_name()
            .map_or_else(|| "root".to_owned(), |n| n.to_string_lossy().into_owned()),
    };
    let target = match daemon.stat(remote).await? {
        Some(info) if info.kind == FileKind::Dir => remote_join(remote, &name),
        _ if remote.ends_with('/') => remote_join(remote, &name),
        _ => remote.to_owned(),
    };
    if metadata.is_dir() {
        upload_dir(daemon, local, &target).await
    } else if metadata.is_file() {
        let file = tokio::fs::File::open(local)
            .await
            .with_context(|| format!("cannot open {}", local.display()))?;
        let body = reqwest::Body::wrap_stream(ReaderStream::with_capacity(file, CHUNK));
        daemon.upload_file(&target, Some(metadata.permissions().mode() & 0o7777), body).await?;
        Ok(())
    } else {
        anyhow::bail!("{} is neither a regular file nor a directory", local.display())
    }
}

/// Streams a tar of `local`'s contents into the remote directory `target`.
async fn upload_dir(daemon: &Daemon, local: &Path, target: &str) -> anyhow::Result<()> {
    let (sender, receiver) = mpsc::channel::<io::Result<Bytes>>(4);
    let source = local.to_path_buf();
    let archiver = tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter { buffer: BytesMut::with_capacity(CHUNK), sender };
        let result = (|| {
            let mut builder = tar::Builder::new(&mut writer);
            builder.follow_symlinks(false);
            builder.append_dir_all(".", &source)?;
            builder.finish()?;
            drop(builder);
            writer.flush()
        })();
        if let Err(error) = &result {
            // The request body fails too, so sandboxd never takes a
            // truncated archive for a complete one.
            let _ =
                writer.sender.blocking_send(Err(io::Error::new(error.kind(), error.to_string())));
        }
        result
    });
    let body = reqwest::Body::wrap_stream(tokio_stream_from(receiver));
    let uploaded = daemon.upload_archive(target, body).await;
    let archived = archiver.await.context("the archiving task failed")?;
    match (archived, uploaded) {
        (Err(error), _) if error.kind() != io::ErrorKind::BrokenPipe => {
            Err(error).with_context(|| format!("cannot archive {}", local.display()))
        }
        (_, uploaded) => uploaded.map(drop),
    }
}

fn tokio_stream_from(
    mut receiver: mpsc::Receiver<io::Result<Bytes>>,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// A blocking `Write` that hands full chunks to an async body.
struct ChannelWriter {
    buffer: BytesMut,
    sender: mpsc::Sender<io::Result<Bytes>>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = self.buffer.split().freeze();
        self.sender
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload ended early"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

async fn download(daemon: &Daemon, remote: &str, local: &Path) -> anyhow::Result<()> {
    let Some(info) = daemon.stat(remote).await? else {
        anyhow::bail!("no such file or directory in the sandbox: {remote}");
    };
    let name = if info.name.is_empty() || info.name == "/" {
        "root".to_owned()
    } else {
        info.name.clone()
    };
    let target = if tokio::fs::metadata(local).await.is_ok_and(|m| m.is_dir()) {
        local.join(&name)
    } else if local.as_os_str().to_string_lossy().ends_with('/') {
        tokio::fs::create_dir_all(local)
            .await
            .with_context(|| format!("cannot create {}", local.display()))?;
        local.join(&name)
    } else {
        local.to_path_buf()
    };
    match info.kind {
        FileKind::Dir => download_dir(daemon, remote, &target).await,
        FileKind::File | FileKind::Symlink => {
            download_file(daemon, remote, &target, info.mode).await
        }
        FileKind::Other => anyhow::bail!("{remote} is neither a regular file nor a directory"),
    }
}

async fn download_file(
    daemon: &Daemon,
    remote: &str,
    target: &Path,
    mode: u32,
) -> anyhow::Result<()> {
    let response = daemon.download_file(remote).await?;
    // Written beside the target and renamed over it once complete, so a
    // failed copy never leaves a truncated file under the real name.
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name =
        target.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let temp = parent.join(format!(".{file_name}.hutch-{}", std::process::id()));
    let result = async {
        let mut file = tokio::fs::File::create(&temp)
            .await
            .with_context(|| format!("cannot create {}", temp.display()))?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.context("reading the file from the sandbox")?;
            file.write_all(&chunk)
                .await
                .with_context(|| format!("cannot write {}", temp.display()))?;
        }
        file.flush().await?;
        if mode != 0 {
            // Never setuid, setgid or sticky: a sandbox chooses these bits, and a
            // setuid file it hands out must not become one on this host.
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777)).await?;
        }
        drop(file);
        tokio::fs::rename(&temp, target)
            .await
            .with_context(|| format!("cannot write {}", target.display()))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&temp).await;
    }
    result
}

async fn download_dir(daemon: &Daemon, remote: &str, target: &Path) -> anyhow::Result<()> {
    let response = daemon.download_archive(remote).await?;
    let stream = response.bytes_stream().map(|chunk| chunk.map_err(io::Error::other));
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let target = target.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&target)
            .with_context(|| format!("cannot create {}", target.display()))?;
        unpack_untrusted(reader, &target)
    })
    .await
    .context("the unpacking task failed")?
}

/// Unpacks a sandbox's archive: the sandbox chose every byte of it, so only
/// files, directories and links are made (never a device node or a FIFO), never
/// outside `target` (tar's `unpack_in`), never setuid, setgid or sticky, and
/// owned by whoever runs `hutch`.
fn unpack_untrusted(reader: impl io::Read, target: &Path) -> anyhow::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(false);
    archive.set_preserve_ownerships(false);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let unpack_error = || format!("cannot unpack into {}", target.display());
    for entry in archive.entries().with_context(unpack_error)? {
        let mut entry = entry.with_context(unpack_error)?;
        let kind = entry.header().entry_type();
        let allowed = kind.is_file()
            || kind.is_dir()
            || kind.is_symlink()
            || kind.is_hard_link()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions();
        if !allowed {
            let path = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
            eprintln!("hutch: skipping {path}: not a file, directory or link");
            continue;
        }
        entry.unpack_in(target).with_context(unpack_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_from_a_sandbox_makes_no_setuid_file_and_no_device() {
        use std::os::unix::fs::PermissionsExt as _;
        let mut builder = tar::Builder::new(Vec::new());
        let mut file = tar::Header::new_gnu();
        file.set_path("root-shell").unwrap();
        file.set_mode(0o4755);
        file.set_size(4);
        file.set_entry_type(tar::EntryType::Regular);
        file.set_cksum();
        builder.append(&file, &b"#!/x"[..]).unwrap();
        let mut device = tar::Header::new_gnu();
        device.set_path("disk").unwrap();
        device.set_mode(0o666);
        device.set_size(0);
        device.set_entry_type(tar::EntryType::Block);
        device.set_device_major(8).unwrap();
        device.set_device_minor(0).unwrap();
        device.set_cksum();
        builder.append(&device, &[][..]).unwrap();
        let bytes = builder.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        unpack_untrusted(&bytes[..], dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("root-shell")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777 & !0o022, 0o755 & !0o022, "{mode:o}");
        assert_eq!(mode & 0o7000, 0, "{mode:o}");
        assert!(!dir.path().join("disk").exists());
    }

    #[test]
    fn an_id_and_an_absolute_path_make_a_remote_location() {
        assert_eq!(
            parse_location("abc123:/tmp/x").unwrap(),
            Location::Remote { id: "abc123".into(), path: "/tmp/x".into() }
        );
        assert_eq!(parse_location("./a:b").unwrap(), Location::Local("./a:b".into()));
        assert_eq!(parse_location("dir/a:/b").unwrap(), Location::Local("dir/a:/b".into()));
        assert_eq!(parse_location("/abs").unwrap(), Location::Local("/abs".into()));
        assert_eq!(parse_location("-").unwrap(), Location::Stdio);
        assert!(parse_location("abc:relative").is_err());
        assert!(parse_location("").is_err());
    }

    #[test]
    fn remote_joins_keep_one_slash() {
        assert_eq!(remote_join("/", "a"), "/a");
        assert_eq!(remote_join("/tmp/", "a"), "/tmp/a");
        assert_eq!(remote_join("/tmp", "a"), "/tmp/a");
    }
}
