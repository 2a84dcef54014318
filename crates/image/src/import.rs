//! Importing `docker save` and OCI image-layout tarballs.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_client::manifest::{OciImageIndex, OciImageManifest};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::extract::{
    EntryPathError, UnpackLimits, decompress, unpack_layer_with_limits, validate_entry_path,
};
use crate::reference::{InvalidReferenceError, normalize_reference};
use crate::store::{
    FetchLayerError, Image, ImageConfig, ImageStore, parse_image_config, sha256_digest_of,
    sha256_hex,
};

/// Largest JSON member (manifest, index, config) we read into memory.
const MAX_JSON_MEMBER: u64 = 16 << 20;
/// How many symlinks a member lookup follows before giving up.
const MAX_MEMBER_LINKS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ImportImageError {
    #[error("cannot read image archive {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is neither a `docker save` archive nor an OCI image layout (no manifest.json or index.json)"
    )]
    NotAnImageArchive { path: PathBuf },
    #[error("archive member {member:?} is missing")]
    MissingMember { member: String },
    #[error("archive member {member:?} is not a regular file or is too large")]
    UnusableMember { member: String },
    #[error("refusing archive member {member:?}")]
    UnsafeMember {
        member: String,
        #[source]
        source: EntryPathError,
    },
    #[error("archive member {member:?} is not valid JSON of the expected shape")]
    InvalidJson {
        member: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid digest {digest:?} in the archive (only sha256 is supported)")]
    InvalidDigest { digest: String },
    #[error("archive member {member:?} hashes to {actual}, expected {expected}")]
    DigestMismatch { member: String, expected: String, actual: String },
    #[error("image config {member:?} lists fewer diff_ids than the image has layers")]
    MissingDiffId { member: String },
    #[error("no manifest in the image index matches this platform")]
    NoMatchingPlatform,
    #[error(transparent)]
    InvalidReference(#[from] InvalidReferenceError),
    #[error(transparent)]
    Layer(Arc<FetchLayerError>),
    #[error("cannot write the image record")]
    WriteRecord(#[source] io::Error),
    #[error("import worker failed")]
    Worker(#[source] tokio::task::JoinError),
}

/// Where a member of the (uncompressed) archive lives.
#[derive(Debug, Clone)]
enum Member {
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink or hard link, already resolved to an archive path.
    Link(String),
}

/// The table of contents of an image archive.
#[derive(Debug)]
struct ArchiveIndex {
    path: PathBuf,
    members: HashMap<String, Member>,
}

/// Joins validated components with `/`.
fn member_name(components: &[Vec<u8>]) -> String {
    let joined: Vec<&[u8]> = components.iter().map(Vec::as_slice).collect();
    String::from_utf8_lossy(&joined.join(&b'/')).into_owned()
}

/// Resolves a symlink target relative to the link's directory inside the
/// archive; `None` if it leaves the archive root or is absolute.
fn resolve_link(link: &str, target: &[u8]) -> Option<String> {
    if target.first() == Some(&b'/') {
        return None;
    }
    let mut parts: Vec<&[u8]> = link.as_bytes().split(|&b| b == b'/').collect();
    parts.pop();
    for component in target.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            name => parts.push(name),
        }
    }
    Some(String::from_utf8_lossy(&parts.join(&b'/')).into_owned())
}

impl ArchiveIndex {
    fn build(path: &Path) -> Result<ArchiveIndex, ImportImageError> {
        let read_err = |source| ImportImageError::Read { path: path.to_owned(), source };
        let file = File::open(path).map_err(read_err)?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut members = HashMap::new();
        for entry in archive.entries().map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let raw = entry.path_bytes().into_owned();
            let name =
                validate_entry_path(&raw).map_err(|source| ImportImageError::UnsafeMember {
                    member: String::from_utf8_lossy(&raw).into_owned(),
                    source,
                })?;
            let name = member_name(name.components());
            let member = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    Member::File { offset: entry.raw_file_position(), size: entry.size() }
                }
                tar::EntryType::Symlink => {
                    let target = entry.link_name_bytes().unwrap_or_default();
                    match resolve_link(&name, &target) {
                        Some(resolved) => Member::Link(resolved),
                        None => continue,
                    }
                }
                tar::EntryType::Link => {
                    let target = entry.link_name_bytes().unwrap_or_default();
                    match validate_entry_path(&target) {
                        Ok(t) => Member::Link(member_name(t.components())),
                        Err(_) => continue,
                    }
                }
                _ => continue,
            };
            members.insert(name, member);
        }
        Ok(ArchiveIndex { path: path.to_owned(), members })
    }

    fn locate(&self, member: &str) -> Result<(u64, u64), ImportImageError> {
        let mut name = member.trim_start_matches("./").to_owned();
        for _ in 0..MAX_MEMBER_LINKS {
            match self.members.get(&name) {
                Some(Member::File { offset, size }) => return Ok((*offset, *size)),
                Some(Member::Link(target)) => name = target.clone(),
                None => {
                    return Err(ImportImageError::MissingMember { member: member.to_owned() });
                }
            }
        }
        Err(ImportImageError::UnusableMember { member: member.to_owned() })
    }

    fn contains(&self, member: &str) -> bool {
        self.locate(member).is_ok()
    }

    fn open(&self, member: &str) -> Result<(io::Take<File>, u64), ImportImageError> {
        let (offset, size) = self.locate(member)?;
        let read_err = |source| ImportImageError::Read { path: self.path.clone(), source };
        let mut file = File::open(&self.path).map_err(read_err)?;
        file.seek(SeekFrom::Start(offset)).map_err(read_err)?;
        Ok((file.take(size), size))
    }

    fn read_small(&self, member: &str) -> Result<Vec<u8>, ImportImageError> {
        let (mut reader, size) = self.open(member)?;
        if size > MAX_JSON_MEMBER {
            return Err(ImportImageError::UnusableMember { member: member.to_owned() });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        reader
            .read_to_end(&mut bytes)
            .map_err(|source| ImportImageError::Read { path: self.path.clone(), source })?;
        Ok(bytes)
    }

    /// Reads an OCI-layout blob and checks it against its digest.
    fn read_blob(&self, digest: &str) -> Result<Vec<u8>, ImportImageError> {
        let hex = sha256_hex(digest)
            .ok_or_else(|| ImportImageError::InvalidDigest { digest: digest.to_owned() })?;
        let member = format!("blobs/sha256/{hex}");
        let bytes = self.read_small(&member)?;
        let actual = sha256_digest_of(&bytes);
        if actual != digest {
            return Err(ImportImageError::DigestMismatch {
                member,
                expected: digest.to_owned(),
                actual,
            });
        }
        Ok(bytes)
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(
    member: &str,
    bytes: &[u8],
) -> Result<T, ImportImageError> {
    serde_json::from_slice(bytes)
        .map_err(|source| ImportImageError::InvalidJson { member: member.to_owned(), source })
}

/// One entry of a `docker save` manifest.json.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// An image found in an archive, before its layers are unpacked.
#[derive(Debug)]
struct Planned {
    references: Vec<String>,
    digest: String,
    config: ImageConfig,
    /// (layer digest, archive member) bottom to top.
    layers: Vec<(String, String)>,
    size: u64,
}

fn plan_docker(index: &ArchiveIndex) -> Result<Vec<Planned>, ImportImageError> {
    let entries: Vec<DockerManifestEntry> =
        parse_json("manifest.json", &index.read_small("manifest.json")?)?;
    let mut planned = Vec::new();
    for entry in entries {
        let config_bytes = index.read_small(&entry.config)?;
        let config_digest = sha256_digest_of(&config_bytes);
        let (config, diff_ids) = parse_image_config(&config_bytes).map_err(|source| {
            ImportImageError::InvalidJson { member: entry.config.clone(), source }
        })?;
        let mut layers = Vec::new();
        let mut size = 0u64;
        for (i, member) in entry.layers.iter().enumerate() {
            // Docker 25+ stores layers as OCI blobs named by their digest;
            // older versions use <id>/layer.tar, an uncompressed tar whose
            // digest is the config's diff_id.
            let digest =
                match member.strip_prefix("blobs/sha256/").map(|hex| format!("sha256:{hex}")) {
                    Some(digest) => digest,
                    None => diff_ids.get(i).cloned().ok_or_else(|| {
                        ImportImageError::MissingDiffId { member: entry.config.clone() }
                    })?,
                };
            if sha256_hex(&digest).is_none() {
                return Err(ImportImageError::InvalidDigest { digest });
            }
            size = size.saturating_add(index.locate(member)?.1);
            layers.push((digest, member.clone()));
        }
        let mut references = Vec::new();
        for tag in entry.repo_tags.unwrap_or_default() {
            references.push(normalize_reference(&tag)?);
        }
        if references.is_empty() {
            references.push(config_digest.clone());
        }
        planned.push(Planned { references, digest: config_digest, config, layers, size });
    }
    Ok(planned)
}

const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

fn plan_oci(index: &ArchiveIndex) -> Result<Vec<Planned>, ImportImageError> {
    let top: OciImageIndex = parse_json("index.json", &index.read_small("index.json")?)?;
    let mut planned = Vec::new();
    for descriptor in top.manifests {
        let annotations = descriptor.annotations.clone().unwrap_or_default();
        let mut references = Vec::new();
        if let Some(name) = annotations.get(ANNOTATION_CONTAINERD_NAME) {
            references.push(normalize_reference(name)?);
        } else if let Some(name) = annotations.get(ANNOTATION_REF_NAME) {
            // A bare tag (`latest`) names no repository; only full references
            // are usable as names.
            if name.contains('/') || name.contains(':') {
                references.push(normalize_reference(name)?);
            }
        }
        let mut digest = descriptor.digest.clone();
        let mut bytes = index.read_blob(&digest)?;
        // Follow (at most two levels of) image indexes to this platform's manifest.
        for _ in 0..2 {
            let Ok(nested) = serde_json::from_slice::<OciImageIndex>(&bytes) else {
                break;
            };
            if nested.manifests.is_empty() {
                break;
            }
            let chosen = oci_client::client::current_platform_resolver(&nested.manifests)
                .ok_or(ImportImageError::NoMatchingPlatform)?;
            digest = chosen;
            bytes = index.read_blob(&digest)?;
        }
        let manifest: OciImageManifest = parse_json(&digest, &bytes)?;
        let config_bytes = index.read_blob(&manifest.config.digest)?;
        let (config, _) = parse_image_config(&config_bytes).map_err(|source| {
            ImportImageError::InvalidJson { member: manifest.config.digest.clone(), source }
        })?;
        let mut layers = Vec::new();
        let mut size = 0u64;
        for layer in &manifest.layers {
            let hex = sha256_hex(&layer.digest)
                .ok_or_else(|| ImportImageError::InvalidDigest { digest: layer.digest.clone() })?;
            let member = format!("blobs/sha256/{hex}");
            size = size.saturating_add(index.locate(&member)?.1);
            layers.push((layer.digest.clone(), member));
        }
        if references.is_empty() {
            references.push(digest.clone());
        }
        planned.push(Planned { references, digest, config, layers, size });
    }
    Ok(planned)
}

/// Hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks one archive member into `work`, verifying that the member's
/// bytes hash to `digest`. On a mismatch the caller discards `work`.
fn unpack_member(
    index: &ArchiveIndex,
    member: &str,
    digest: &str,
    work: &Path,
    limits: UnpackLimits,
) -> Result<(), FetchLayerError> {
    let io_err = |source| FetchLayerError::Io { path: index.path.clone(), source };
    let (reader, _) = index.open(member).map_err(|e| match e {
        ImportImageError::Read { source, .. } => io_err(source),
        other => io_err(io::Error::other(other.to_string())),
    })?;
    let mut hashing = HashingReader { inner: reader, hasher: Sha256::new() };
    unpack_layer_with_limits(&mut hashing, work, limits)
        .map_err(|source| FetchLayerError::Unpack { digest: digest.to_owned(), source })?;
    // The tar reader stops at the end-of-archive marker; hash the rest too.
    io::copy(&mut hashing, &mut io::sink()).map_err(io_err)?;
    let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
    if actual != digest {
        return Err(FetchLayerError::DigestMismatch { expected: digest.to_owned(), actual });
    }
    Ok(())
}

/// Returns a plain-tar path for `tarball`, decompressing a gzip or zstd
/// archive into `scratch` first.
fn plain_tar(tarball: &Path, scratch: &Path) -> Result<Option<PathBuf>, ImportImageError> {
    let read_err = |source| ImportImageError::Read { path: tarball.to_owned(), source };
    let mut head = [0u8; 4];
    let mut file = File::open(tarball).map_err(read_err)?;
    let n = file.read(&mut head).map_err(read_err)?;
    let compressed = head[..n].starts_with(&[0x1f, 0x8b]) || head[..n] == [0x28, 0xb5, 0x2f, 0xfd];
    if !compressed {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mut reader = decompress(BufReader::new(file)).map_err(read_err)?;
    let mut out = File::create(scratch)
        .map_err(|source| ImportImageError::Read { path: scratch.to_owned(), source })?;
    io::copy(&mut reader, &mut out).map_err(read_err)?;
    Ok(Some(scratch.to_owned()))
}

impl ImageStore {
    /// Imports every image in a `docker save` tarball or an OCI image-layout
    /// tarball (plain, gzip or zstd). Tagged images are stored under their
    /// normalised tags; untagged ones under their digest (`sha256:<hex>`).
    pub async fn import(&self, tarball: &Path) -> Result<Vec<Image>, ImportImageError> {
        let _shared = self.inner.gc.read().await;
        let tarball = tarball.to_owned();
        let scratch = self.inner.temp_path();
        let scratch_guard = RemoveOnDrop(scratch.clone());
        let (index, planned) = tokio::task::spawn_blocking(move || {
            let plain = plain_tar(&tarball, &scratch)?.unwrap_or(tarball);
            let index = ArchiveIndex::build(&plain)?;
            let planned = if index.contains("manifest.json") {
                plan_docker(&index)?
            } else if index.contains("index.json") {
                plan_oci(&index)?
            } else {
                return Err(ImportImageError::NotAnImageArchive { path: plain });
            };
            Ok((index, planned))
        })
        .await
        .map_err(ImportImageError::Worker)??;
        let index = Arc::new(index);

        let mut images = Vec::new();
        for plan in planned {
            for (digest, member) in &plan.layers {
                let index = Arc::clone(&index);
                let member = member.clone();
                let layer_digest = digest.clone();
                let limits = self.inner.limits;
                self.inner
                    .ensure_layer(digest, move |work| async move {
                        let worker_digest = layer_digest.clone();
                        tokio::task::spawn_blocking(move || {
                            unpack_member(&index, &member, &layer_digest, &work, limits)
                        })
                        .await
                        .map_err(|source| FetchLayerError::Worker {
                            digest: worker_digest,
                            source,
                        })?
                    })
                    .await
                    .map_err(ImportImageError::Layer)?;
            }
            let layer_digests: Vec<String> = plan.layers.iter().map(|(d, _)| d.clone()).collect();
            for reference in &plan.references {
                let image = self
                    .inner
                    .image(
                        reference.clone(),
                        plan.digest.clone(),
                        layer_digests.clone(),
                        plan.config.clone(),
                        plan.size,
                    )
                    .ok_or_else(|| ImportImageError::InvalidDigest {
                        digest: layer_digests.join(","),
                    })?;
                self.inner.write_record(&image).map_err(ImportImageError::WriteRecord)?;
                images.push(image);
            }
        }
        drop(scratch_guard);
        Ok(images)
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::resolve_link;

    #[test]
    fn archive_symlinks_resolve_inside_the_archive_only() {
        assert_eq!(
            resolve_link("abc/layer.tar", b"../def/layer.tar").as_deref(),
            Some("def/layer.tar")
        );
        assert_eq!(resolve_link("abc/layer.tar", b"../../etc/passwd"), None);
        assert_eq!(resolve_link("abc/layer.tar", b"/etc/passwd"), None);
    }
}
