//! Pulling images from a registry with `oci-client`.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor};
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc::UnboundedSender;

use crate::extract::{UnpackLimits, unpack_layer_with_limits};
use crate::reference::{InvalidReferenceError, parse_reference};
use crate::store::{
    FetchLayerError, Image, ImageStore, Inner, LayerOutcome, ReadImageError, parse_image_config,
};

/// Layers downloaded (and unpacked) at the same time by one pull.
const MAX_CONCURRENT_LAYERS: usize = 3;
/// Granularity of [`PullProgress::LayerBytes`] events.
const PROGRESS_STEP: u64 = 256 * 1024;

/// Credentials for a registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum RegistryAuth {
    #[default]
    Anonymous,
    /// HTTP basic auth, or the credentials for the registry's token service
    /// (oci-client performs the bearer-token exchange when challenged).
    Basic { username: String, password: String },
    /// A ready bearer token.
    Bearer { token: String },
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryAuth::Anonymous => f.write_str("Anonymous"),
            RegistryAuth::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            RegistryAuth::Bearer { .. } => {
                f.debug_struct("Bearer").field("token", &"<redacted>").finish()
            }
        }
    }
}

impl From<&RegistryAuth> for oci_client::secrets::RegistryAuth {
    fn from(auth: &RegistryAuth) -> Self {
        match auth {
            RegistryAuth::Anonymous => oci_client::secrets::RegistryAuth::Anonymous,
            RegistryAuth::Basic { username, password } => {
                oci_client::secrets::RegistryAuth::Basic(username.clone(), password.clone())
            }
            RegistryAuth::Bearer { token } => {
                oci_client::secrets::RegistryAuth::Bearer(token.clone())
            }
        }
    }
}

/// Which manifest of a multi-platform image to pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// GOOS-style name, e.g. `linux`.
    pub os: String,
    /// GOARCH-style name, e.g. `amd64`, `arm64`.
    pub architecture: String,
    pub variant: Option<String>,
}

/// When a pull talks to the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Use the stored image for this reference if there is one; no network.
    #[default]
    IfNotPresent,
    /// Always resolve the reference again (layers already cached are reused).
    Always,
}

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registries (`host:port` as in the reference) spoken to over plain
    /// HTTP, e.g. `127.0.0.1:5000`.
    pub insecure_registries: Vec<String>,
    /// Defaults to the platform this process runs on.
    pub platform: Option<Platform>,
    pub policy: PullPolicy,
}

/// Progress of a pull, for UIs and logs. Events go to the caller whose
/// request started the pull: callers that joined an in-flight pull of the
/// same image get none, and a pull that joins another image's in-flight
/// download of a shared layer sees only `LayerDone` for that layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullProgress {
    Resolved { digest: String, layers: usize },
    LayerStarted { digest: String, total: u64 },
    LayerBytes { digest: String, downloaded: u64, total: u64 },
    LayerDone { digest: String },
    LayerCached { digest: String },
}

/// A pull failed. Cheap to clone: every caller that joined the same pull
/// gets the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot pull image {reference}")]
pub struct PullImageError {
    pub reference: String,
    #[source]
    failure: Arc<PullFailure>,
}

impl PullImageError {
    fn new(reference: &str, failure: PullFailure) -> Self {
        PullImageError { reference: reference.to_owned(), failure: Arc::new(failure) }
    }

    /// What went wrong.
    pub fn failure(&self) -> &PullFailure {
        &self.failure
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullFailure {
    #[error(transparent)]
    InvalidReference(#[from] InvalidReferenceError),
    #[error("the registry refused the credentials (or demands some)")]
    Unauthorized(#[source] OciDistributionError),
    #[error("the registry has no such image")]
    NotFound(#[source] OciDistributionError),
    #[error("registry request failed")]
    Registry(#[source] OciDistributionError),
    #[error("the image config is not valid JSON of the expected shape")]
    InvalidConfig(#[source] serde_json::Error),
    #[error("the image manifest names an invalid layer digest {digest:?}")]
    InvalidLayerDigest { digest: String },
    #[error("the image manifest gives layer {digest} a negative size")]
    InvalidLayerSize { digest: String },
    #[error(transparent)]
    Layer(Arc<FetchLayerError>),
    #[error(transparent)]
    ReadRecord(#[from] ReadImageError),
    #[error("cannot write the image record")]
    WriteRecord(#[source] std::io::Error),
}

fn classify_registry_error(error: OciDistributionError) -> PullFailure {
    let not_found = |code: &OciErrorCode| {
        matches!(
            code,
            OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::BlobUnknown
        )
    };
    let unauthorized =
        |code: &OciErrorCode| matches!(code, OciErrorCode::Unauthorized | OciErrorCode::Denied);
    match &error {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => PullFailure::Unauthorized(error),
        OciDistributionError::ImageManifestNotFoundError(_) => PullFailure::NotFound(error),
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| unauthorized(&e.code)) =>
        {
            PullFailure::Unauthorized(error)
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| not_found(&e.code)) =>
        {
            PullFailure::NotFound(error)
        }
        OciDistributionError::ServerError { code: 401, .. } => PullFailure::Unauthorized(error),
        OciDistributionError::ServerError { code: 404, .. } => PullFailure::NotFound(error),
        _ => PullFailure::Registry(error),
    }
}

impl ImageStore {
    /// Pulls `reference` (normalised like Docker does) into the store and
    /// returns it with all layers unpacked. Concurrent pulls of the same
    /// reference share one pull; layers already in the cache are not fetched.
    pub async fn pull(
        &self,
        reference: &str,
        auth: RegistryAuth,
        options: PullOptions,
        progress: Option<UnboundedSender<PullProgress>>,
    ) -> Result<Image, PullImageError> {
        let parsed = parse_reference(reference)
            .map_err(|e| PullImageError::new(reference, PullFailure::InvalidReference(e)))?;
        let normalized = parsed.whole();
        if options.policy == PullPolicy::IfNotPresent {
            // Cached metadata: no lock, no flight, no network.
            match self.inner.get_normalized(&normalized) {
                Ok(Some(image)) => return Ok(image),
                Ok(None) => {}
                Err(e) => return Err(PullImageError::new(&normalized, e.into())),
            }
        }
        let inner = Arc::clone(&self.inner);
        // Callers with different credentials or platforms never share a
        // pull: one caller's credentials must not fetch another's image.
        let fingerprint = client_fingerprint(&auth, &options);
        let key = format!("{normalized} {fingerprint} {:?}", options.policy);
        self.inner
            .image_flights
            .run(&key, move || async move {
                let _shared = inner.gc.read().await;
                let client = inner.client(&fingerprint, || client_for(&options));
                pull_uncached(&inner, client, parsed, &auth, progress.as_ref())
                    .await
                    .map_err(|failure| PullImageError::new(&normalized, failure))
            })
            .await
    }
}

/// Identifies the client configuration a pull needs: credentials (hashed,
/// never stored in clear), platform and plain-HTTP registries. Clients are
/// cached per fingerprint because building one costs tens of milliseconds
/// (TLS roots) and because oci-client remembers one credential per registry.
fn client_fingerprint(auth: &RegistryAuth, options: &PullOptions) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    match auth {
        RegistryAuth::Anonymous => field(b"anonymous"),
        RegistryAuth::Basic { username, password } => {
            field(b"basic");
            field(username.as_bytes());
            field(password.as_bytes());
        }
        RegistryAuth::Bearer { token } => {
            field(b"bearer");
            field(token.as_bytes());
        }
    }
    let mut insecure = options.insecure_registries.clone();
    insecure.sort();
    for registry in &insecure {
        field(registry.as_bytes());
    }
    field(format!("{:?}", options.platform).as_bytes());
    hex::encode(hasher.finalize())
}

type PlatformResolver = dyn Fn(&[ImageIndexEntry]) -> Option<String> + Send + Sync;

fn client_for(options: &PullOptions) -> Client {
    let platform = options.platform.clone();
    let resolver: Box<PlatformResolver> = match platform {
        None => Box::new(oci_client::client::current_platform_resolver),
        Some(wanted) => Box::new(move |entries: &[ImageIndexEntry]| {
            entries
                .iter()
                .find(|entry| {
                    entry.platform.as_ref().is_some_and(|p| {
                        p.os.to_string() == wanted.os
                            && p.architecture.to_string() == wanted.architecture
                            && (wanted.variant.is_none() || p.variant == wanted.variant)
                    })
                })
                .map(|entry| entry.digest.clone())
        }),
    };
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(options.insecure_registries.clone()),
        platform_resolver: Some(resolver),
        ..ClientConfig::default()
    })
}

async fn pull_uncached(
    inner: &Arc<Inner>,
    client: Client,
    reference: Reference,
    auth: &RegistryAuth,
    progress: Option<&UnboundedSender<PullProgress>>,
) -> Result<Image, PullFailure> {
    let send = |event: PullProgress| {
        if let Some(tx) = progress {
            // A caller that stopped listening does not stop the pull.
            let _ = tx.send(event);
        }
    };
    let oci_auth = oci_client::secrets::RegistryAuth::from(auth);
    let (manifest, digest, config_json) = client
        .pull_manifest_and_config(&reference, &oci_auth)
        .await
        .map_err(classify_registry_error)?;
    let (config, _diff_ids) =
        parse_image_config(config_json.as_bytes()).map_err(PullFailure::InvalidConfig)?;
    send(PullProgress::Resolved { digest: digest.clone(), layers: manifest.layers.len() });

    let mut size = 0u64;
    for layer in &manifest.layers {
        if crate::store::sha256_hex(&layer.digest).is_none() {
            return Err(PullFailure::InvalidLayerDigest { digest: layer.digest.clone() });
        }
        let layer_size = u64::try_from(layer.size)
            .map_err(|_| PullFailure::InvalidLayerSize { digest: layer.digest.clone() })?;
        size = size.saturating_add(layer_size);
    }

    let results: Vec<_> = futures_util::stream::iter(manifest.layers.iter().cloned())
        .map(|layer| {
            let client = client.clone();
            let reference = reference.clone();
            let progress = progress.cloned();
            async move {
                let digest = layer.digest.clone();
                let outcome = inner
                    .ensure_layer(&digest.clone(), {
                        let progress = progress.clone();
                        let limits = inner.limits;
                        move |work| async move {
                            fetch_and_unpack(&client, &reference, &layer, &work, limits, progress)
                                .await
                        }
                    })
                    .await;
                if let Some(tx) = &progress {
                    let event = match outcome {
                        Ok(LayerOutcome::Cached) => {
                            Some(PullProgress::LayerCached { digest: digest.clone() })
                        }
                        Ok(LayerOutcome::Unpacked) => {
                            Some(PullProgress::LayerDone { digest: digest.clone() })
                        }
                        Err(_) => None,
                    };
                    if let Some(event) = event {
                        let _ = tx.send(event);
                    }
                }
                outcome
            }
        })
        .buffered(MAX_CONCURRENT_LAYERS)
        .collect()
        .await;
    for result in results {
        result.map_err(PullFailure::Layer)?;
    }

    let layer_digests: Vec<String> = manifest.layers.iter().map(|l| l.digest.clone()).collect();
    // Every digest was validated above, so this cannot fail; map it anyway
    // rather than panic.
    let image = inner
        .image(reference.whole(), digest, layer_digests.clone(), config, size)
        .ok_or_else(|| PullFailure::InvalidLayerDigest { digest: layer_digests.join(",") })?;
    inner.write_record(&image).map_err(PullFailure::WriteRecord)?;
    Ok(image)
}

/// Streams one layer blob from the registry into the unpacker while
/// verifying its size and sha256, so download and unpack overlap and the
/// compressed blob never touches the disk.
///
/// The unpacker sees bytes before the digest is known to match; it is built
/// for hostile input anyway (a blob with the right digest is no more
/// trustworthy than its publisher). The layer only becomes visible in the
/// cache if both the unpack and the verification succeed; otherwise the
/// caller discards `work`.
async fn fetch_and_unpack(
    client: &Client,
    reference: &Reference,
    layer: &OciDescriptor,
    work: &Path,
    limits: UnpackLimits,
    progress: Option<UnboundedSender<PullProgress>>,
) -> Result<(), FetchLayerError> {
    let digest = layer.digest.clone();
    if !layer.media_type.contains("tar") {
        return Err(FetchLayerError::UnsupportedMediaType {
            digest,
            media_type: layer.media_type.clone(),
        });
    }
    let expected_size = u64::try_from(layer.size).unwrap_or(0);
    let send = |event: PullProgress| {
        if let Some(tx) = &progress {
            let _ = tx.send(event);
        }
    };
    send(PullProgress::LayerStarted { digest: digest.clone(), total: expected_size });
    let download_err = |source| FetchLayerError::Download { digest: digest.clone(), source };
    let mut stream = client.pull_blob_stream(reference, layer).await.map_err(download_err)?;

    let (chunks, receiver) = tokio::sync::mpsc::channel::<bytes::Bytes>(UNPACK_QUEUE_CHUNKS);
    let unpacker = tokio::task::spawn_blocking({
        let work = work.to_owned();
        let digest = digest.clone();
        move || {
            let mut reader = ChannelReader { receiver, current: bytes::Bytes::new() };
            unpack_layer_with_limits(&mut reader, &work, limits)
                .map_err(|source| FetchLayerError::Unpack { digest, source })?;
            // Consume the tail after the end-of-archive marker so the
            // download side can hash the whole blob.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
            Ok(())
        }
    });

    let download = async {
        let mut hasher = Sha256::new();
        let mut downloaded = 0u64;
        let mut reported = 0u64;
        let mut unpacker_running = true;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) if e.get_ref().is_some_and(|inner| inner.is::<DigestError>()) => {
                    return Err(FetchLayerError::DigestMismatch {
                        expected: digest.clone(),
                        actual: format!("sha256:{}", hex::encode(hasher.finalize())),
                    });
                }
                Err(e) => return Err(download_err(OciDistributionError::IoError(e))),
            };
            downloaded += chunk.len() as u64;
            // A registry that sends more than the descriptor promised is cut
            // off here instead of being allowed to fill the disk.
            if downloaded > expected_size {
                return Err(FetchLayerError::SizeMismatch {
                    digest: digest.clone(),
                    expected: expected_size,
                    actual: downloaded,
                });
            }
            hasher.update(&chunk);
            // If the unpacker gave up early, keep hashing (the size is
            // bounded above) so that a corrupt blob is reported as such
            // rather than as whatever the unpacker made of it.
            if unpacker_running && chunks.send(chunk).await.is_err() {
                unpacker_running = false;
            }
            if downloaded - reported >= PROGRESS_STEP || downloaded == expected_size {
                reported = downloaded;
                send(PullProgress::LayerBytes {
                    digest: digest.clone(),
                    downloaded,
                    total: expected_size,
                });
            }
        }
        drop(chunks);
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(FetchLayerError::DigestMismatch { expected: digest.clone(), actual });
        }
        if downloaded != expected_size {
            return Err(FetchLayerError::SizeMismatch {
                digest: digest.clone(),
                expected: expected_size,
                actual: downloaded,
            });
        }
        Ok(())
    };
    let downloaded = download.await;
    // Dropping the sender (inside `download`) has ended the unpacker's input.
    let unpacked = unpacker
        .await
        .map_err(|source| FetchLayerError::Worker { digest: digest.clone(), source })?;
    // A verification failure outranks whatever the unpacker made of the
    // bytes; otherwise report the unpacker's own error.
    match (downloaded, unpacked) {
        (Err(e @ FetchLayerError::DigestMismatch { .. }), _) => Err(e),
        (Err(e @ FetchLayerError::SizeMismatch { .. }), _) => Err(e),
        (_, Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// Chunks of a blob queued between download and unpack (backpressure: a
/// slow disk slows the download instead of buffering the layer in memory).
const UNPACK_QUEUE_CHUNKS: usize = 64;

/// A blocking `Read` over chunks sent from the async download.
struct ChannelReader {
    receiver: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
