//! The on-disk store: layout, image records, layer cache and removal.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::extract::{UnpackLayerError, UnpackLimits};
use crate::flight::SingleFlight;
use crate::reference::{InvalidReferenceError, normalize_reference};

/// The parts of an image config a sandbox needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub cmd: Vec<String>,
    pub entrypoint: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// An image whose layers are all unpacked in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Normalised reference (`docker.io/library/busybox:latest`), or
    /// `sha256:<hex>` for an untagged imported image.
    pub reference: String,
    /// Manifest digest for pulled and OCI-layout images; config digest (the
    /// Docker image id) for `docker save` imports, which carry no manifest.
    pub digest: String,
    /// Layer blob digests, bottom to top.
    pub layer_digests: Vec<String>,
    /// Unpacked layer directories, bottom to top (overlayfs lower dirs are
    /// given top first, so reverse this for `lowerdir=`).
    pub layers: Vec<PathBuf>,
    pub config: ImageConfig,
    /// Sum of the layer blob sizes in bytes (compressed, as transferred).
    pub size: u64,
}

/// What is stored in `images/<sha256(reference)>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageRecord {
    reference: String,
    digest: String,
    layers: Vec<String>,
    config: ImageConfig,
    size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    #[error("image store {path} is already open (in this or another process)")]
    Locked { path: PathBuf },
    #[error("cannot lock image store {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create store directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot clear leftovers in {path}")]
    ClearTemp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ReadImageError {
    #[error(transparent)]
    InvalidReference(#[from] InvalidReferenceError),
    #[error("cannot read image record {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("corrupt image record {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("image record {path} names an invalid layer digest {digest:?}")]
    InvalidLayerDigest { path: PathBuf, digest: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ListImagesError {
    #[error("cannot list {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Record(#[from] ReadImageError),
}

#[derive(Debug, thiserror::Error)]
pub enum RemoveImageError {
    #[error(transparent)]
    InvalidReference(#[from] InvalidReferenceError),
    #[error("image {reference} is not in the store")]
    NotFound { reference: String },
    #[error(transparent)]
    Read(#[from] ReadImageError),
    #[error(transparent)]
    List(#[from] ListImagesError),
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Fetching or unpacking one layer failed. Shared (behind an `Arc`) by every
/// caller that waited on the same layer.
#[derive(Debug, thiserror::Error)]
pub enum FetchLayerError {
    #[error("unsupported layer digest {digest:?} (only sha256 is supported)")]
    UnsupportedDigest { digest: String },
    #[error("cannot download layer {digest}")]
    Download {
        digest: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("layer {expected} failed verification: its content hashes to {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("layer {digest} is {actual} bytes, but its descriptor says {expected}")]
    SizeMismatch { digest: String, expected: u64, actual: u64 },
    #[error("unsupported media type {media_type:?} for layer {digest}")]
    UnsupportedMediaType { digest: String, media_type: String },
    #[error("cannot unpack layer {digest}")]
    Unpack {
        digest: String,
        #[source]
        source: UnpackLayerError,
    },
    #[error("i/o error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer worker for {digest} failed")]
    Worker {
        digest: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Whether [`Inner::ensure_layer`] found the layer or produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerOutcome {
    Cached,
    Unpacked,
}

pub(crate) type LayerResult = Result<LayerOutcome, Arc<FetchLayerError>>;

/// The hex part of a `sha256:<64 lowercase hex>` digest. Digests come from
/// untrusted manifests and become path components, so nothing else passes.
pub(crate) fn sha256_hex(digest: &str) -> Option<&str> {
    digest.strip_prefix("sha256:").filter(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

pub(crate) fn sha256_digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A content-addressed store of unpacked image layers and image records.
///
/// One `ImageStore` (one process) owns a root directory; clones of the
/// handle are cheap and share single-flight state.
#[derive(Debug, Clone)]
pub struct ImageStore {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    root: PathBuf,
    /// Held for the store's lifetime; released by the kernel if we die.
    _lock: nix::fcntl::Flock<std::fs::File>,
    pub(crate) image_flights: SingleFlight<Result<Image, crate::pull::PullImageError>>,
    layer_flights: SingleFlight<LayerResult>,
    /// Pulls and imports hold this shared; removal holds it exclusively, so a
    /// layer that a pull just found in the cache cannot vanish before the
    /// pull's image record refers to it.
    pub(crate) gc: tokio::sync::RwLock<()>,
    /// Registry clients by configuration fingerprint (see `pull.rs`).
    clients: ClientCache,
    pub(crate) limits: UnpackLimits,
}

#[derive(Default)]
struct ClientCache(std::sync::Mutex<HashMap<String, oci_client::Client>>);

impl std::fmt::Debug for ClientCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCache").finish_non_exhaustive()
    }
}

impl ImageStore {
    /// Opens (creating if needed) a store rooted at `root` and removes
    /// leftovers of interrupted pulls from `root/tmp`.
    pub fn open(root: PathBuf) -> Result<ImageStore, OpenStoreError> {
        Self::open_with_limits(root, UnpackLimits::default())
    }

    /// [`ImageStore::open`] with explicit bounds on what one layer may unpack to.
    pub fn open_with_limits(
        root: PathBuf,
        limits: UnpackLimits,
    ) -> Result<ImageStore, OpenStoreError> {
        for dir in [root.join("layers").join("sha256"), root.join("images"), root.join("tmp")] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| OpenStoreError::CreateDir { path: dir, source })?;
        }
        // One owner per store: the single-flight and removal logic below
        // assume nobody else writes to this root.
        let lock_path = root.join("lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| OpenStoreError::Lock { path: lock_path.clone(), source })?;
        let lock =
            match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(OpenStoreError::Locked { path: root });
                }
                Err((_, errno)) => {
                    return Err(OpenStoreError::Lock { path: lock_path, source: errno.into() });
                }
            };
        let tmp = root.join("tmp");
        let leftovers = std::fs::read_dir(&tmp)
            .map_err(|source| OpenStoreError::ClearTemp { path: tmp.clone(), source })?;
        for leftover in leftovers {
            let leftover = leftover
                .map_err(|source| OpenStoreError::ClearTemp { path: tmp.clone(), source })?;
            let path = leftover.path();
            let removed = match leftover.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            removed.map_err(|source| OpenStoreError::ClearTemp { path, source })?;
        }
        Ok(ImageStore {
            inner: Arc::new(Inner {
                root,
                _lock: lock,
                image_flights: SingleFlight::new(),
                layer_flights: SingleFlight::new(),
                gc: tokio::sync::RwLock::new(()),
                clients: ClientCache::default(),
                limits,
            }),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The image stored under `reference` (normalised first), if any.
    pub fn get(&self, reference: &str) -> Result<Option<Image>, ReadImageError> {
        let reference = normalize_reference(reference)?;
        self.inner.read_record(&self.inner.record_path(&reference))
    }

    /// When the image stored under `reference` was last pulled or imported
    /// into this store (the time its record was written); `None` if absent.
    pub fn stored_at(&self, reference: &str) -> Option<std::time::SystemTime> {
        let reference = normalize_reference(reference).ok()?;
        std::fs::metadata(self.inner.record_path(&reference)).ok()?.modified().ok()
    }

    /// Every image in the store, sorted by reference.
    pub fn list(&self) -> Result<Vec<Image>, ListImagesError> {
        self.inner.list()
    }

    /// Removes the image record for `reference` and every layer of it that
    /// no other image uses. The caller must make sure no running sandbox
    /// still uses those layers as lower dirs.
    pub async fn remove(&self, reference: &str) -> Result<(), RemoveImageError> {
        let reference = normalize_reference(reference)?;
        let _exclusive = self.inner.gc.write().await;
        let record_path = self.inner.record_path(&reference);
        let Some(image) = self.inner.read_record(&record_path)? else {
            return Err(RemoveImageError::NotFound { reference });
        };
        std::fs::remove_file(&record_path)
            .map_err(|source| RemoveImageError::Remove { path: record_path.clone(), source })?;
        let still_used: HashSet<String> =
            self.inner.list()?.into_iter().flat_map(|image| image.layer_digests).collect();
        for (digest, dir) in image.layer_digests.iter().zip(&image.layers) {
            if still_used.contains(digest) {
                continue;
            }
            // Rename first so the cache never shows a half-deleted layer.
            let doomed = self.inner.temp_path();
            match std::fs::rename(dir, &doomed) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(RemoveImageError::Remove { path: dir.clone(), source });
                }
            }
            let result = tokio::task::spawn_blocking({
                let doomed = doomed.clone();
                move || std::fs::remove_dir_all(&doomed)
            })
            .await
            .unwrap_or_else(|join| Err(io::Error::other(join)));
            result.map_err(|source| RemoveImageError::Remove { path: doomed, source })?;
        }
        Ok(())
    }
}

impl Inner {
    /// The cached registry client for `fingerprint`, built with `build` on
    /// first use.
    pub(crate) fn client(
        &self,
        fingerprint: &str,
        build: impl FnOnce() -> oci_client::Client,
    ) -> oci_client::Client {
        let cached = self
            .clients
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(fingerprint)
            .cloned();
        if let Some(client) = cached {
            return client;
        }
        // Built outside the lock: it is slow, and a duplicate is harmless.
        let client = build();
        self.clients
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(fingerprint.to_owned())
            .or_insert(client)
            .clone()
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh, unused path under `tmp/`.
    pub(crate) fn temp_path(&self) -> PathBuf {
        self.tmp_dir().join(uuid::Uuid::new_v4().simple().to_string())
    }

    pub(crate) fn layer_dir(&self, hex: &str) -> PathBuf {
        self.root.join("layers").join("sha256").join(hex)
    }

    fn record_path(&self, reference: &str) -> PathBuf {
        let key = hex::encode(Sha256::digest(reference.as_bytes()));
        self.root.join("images").join(format!("{key}.json"))
    }

    fn image_from_record(&self, path: &Path, record: ImageRecord) -> Result<Image, ReadImageError> {
        let layers = record
            .layers
            .iter()
            .map(|digest| {
                sha256_hex(digest).map(|hex| self.layer_dir(hex)).ok_or_else(|| {
                    ReadImageError::InvalidLayerDigest {
                        path: path.to_owned(),
                        digest: digest.clone(),
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Image {
            reference: record.reference,
            digest: record.digest,
            layer_digests: record.layers,
            layers,
            config: record.config,
            size: record.size,
        })
    }

    fn read_record(&self, path: &Path) -> Result<Option<Image>, ReadImageError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ReadImageError::Read { path: path.to_owned(), source });
            }
        };
        let record: ImageRecord = serde_json::from_slice(&bytes)
            .map_err(|source| ReadImageError::Parse { path: path.to_owned(), source })?;
        self.image_from_record(path, record).map(Some)
    }

    pub(crate) fn get_normalized(&self, reference: &str) -> Result<Option<Image>, ReadImageError> {
        self.read_record(&self.record_path(reference))
    }

    fn list(&self) -> Result<Vec<Image>, ListImagesError> {
        let dir = self.root.join("images");
        let entries = std::fs::read_dir(&dir)
            .map_err(|source| ListImagesError::ReadDir { path: dir.clone(), source })?;
        let mut images = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|source| ListImagesError::ReadDir { path: dir.clone(), source })?;
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "json")
                && let Some(image) = self.read_record(&path)?
            {
                images.push(image);
            }
        }
        images.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(images)
    }

    /// Atomically writes the record for `image` (temp file + rename).
    pub(crate) fn write_record(&self, image: &Image) -> Result<(), io::Error> {
        let record = ImageRecord {
            reference: image.reference.clone(),
            digest: image.digest.clone(),
            layers: image.layer_digests.clone(),
            config: image.config.clone(),
            size: image.size,
        };
        let bytes = serde_json::to_vec_pretty(&record).map_err(io::Error::other)?;
        let tmp = self.temp_path();
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, self.record_path(&image.reference)).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// Builds an [`Image`] value for records that are about to be written.
    pub(crate) fn image(
        &self,
        reference: String,
        digest: String,
        layer_digests: Vec<String>,
        config: ImageConfig,
        size: u64,
    ) -> Option<Image> {
        let layers = layer_digests
            .iter()
            .map(|d| sha256_hex(d).map(|hex| self.layer_dir(hex)))
            .collect::<Option<Vec<_>>>()?;
        Some(Image { reference, digest, layer_digests, layers, config, size })
    }

    /// Makes sure the layer `digest` is unpacked, running `produce` (at most
    /// once across concurrent callers) if it is not. `produce` must unpack
    /// the verified layer into the empty directory it is given.
    pub(crate) async fn ensure_layer<F, Fut>(
        self: &Arc<Self>,
        digest: &str,
        produce: F,
    ) -> LayerResult
    where
        F: FnOnce(PathBuf) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), FetchLayerError>> + Send + 'static,
    {
        let Some(hex) = sha256_hex(digest) else {
            return Err(Arc::new(FetchLayerError::UnsupportedDigest { digest: digest.to_owned() }));
        };
        let final_dir = self.layer_dir(hex);
        if final_dir.is_dir() {
            return Ok(LayerOutcome::Cached);
        }
        let this = Arc::clone(self);
        self.layer_flights
            .run(digest, move || async move {
                this.produce_layer(final_dir, produce).await.map_err(Arc::new)
            })
            .await
    }

    async fn produce_layer<F, Fut>(
        &self,
        final_dir: PathBuf,
        produce: F,
    ) -> Result<LayerOutcome, FetchLayerError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<(), FetchLayerError>>,
    {
        // Another flight may have finished between our check and now.
        if final_dir.is_dir() {
            return Ok(LayerOutcome::Cached);
        }
        let work = self.temp_path();
        std::fs::create_dir(&work)
            .map_err(|source| FetchLayerError::Io { path: work.clone(), source })?;
        let mut guard = RemoveOnDrop(Some(work.clone()));
        produce(work.clone()).await?;
        match std::fs::rename(&work, &final_dir) {
            Ok(()) => {
                guard.0 = None;
                Ok(LayerOutcome::Unpacked)
            }
            // Someone (an import racing a pull) got there first; the
            // content is identical by construction, keep theirs.
            Err(_) if final_dir.is_dir() => Ok(LayerOutcome::Cached),
            Err(source) => Err(FetchLayerError::Io { path: final_dir, source }),
        }
    }
}

/// Removes a work directory unless defused; keeps failed or cancelled
/// unpacks from lingering until the next `open`.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// The subset of the OCI/Docker image config JSON that we read.
#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ContainerConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Parses an image config blob into the fields sandboxes use and the
/// ordered `rootfs.diff_ids`.
pub(crate) fn parse_image_config(
    bytes: &[u8],
) -> Result<(ImageConfig, Vec<String>), serde_json::Error> {
    let file: ConfigFile = serde_json::from_slice(bytes)?;
    let container = file.config.unwrap_or_default();
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    Ok((
        ImageConfig {
            env: container.env.unwrap_or_default(),
            cmd: container.cmd.unwrap_or_default(),
            entrypoint: container.entrypoint.unwrap_or_default(),
            working_dir: non_empty(container.working_dir),
            user: non_empty(container.user),
        },
        file.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
    ))
}
