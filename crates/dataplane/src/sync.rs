//! The gRPC client towards the server: Register, then one Sync stream on which
//! full reports go out and full desired states come in. Reconnects forever
//! with backoff; while the server is away, sandboxes and the proxy carry on.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::Stream;
use hutch_proto::node::node_client::NodeClient;
use hutch_proto::node::{self, DesiredState, NodeReport, ObservedSandbox, RegisterRequest};
use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

use crate::config::Capacity;
use crate::owner::{DesiredSlot, Node, Snapshot};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    #[error("invalid server url {url:?}")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the node token is not a valid header value")]
    Token,
    #[error("connect to the server")]
    Connect(#[source] tonic::transport::Error),
    #[error("register with the server")]
    Register(#[source] tonic::Status),
    #[error("sync stream")]
    Stream(#[source] tonic::Status),
    #[error("the server closed the sync stream")]
    Closed,
}

/// Holds a session with the server for as long as the returned future runs.
pub(crate) async fn run(
    node: Arc<Node>,
    snapshots: watch::Receiver<Snapshot>,
    desired: watch::Sender<DesiredSlot>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = tokio::time::Instant::now();
        match session(&node, snapshots.clone(), &desired).await {
            Ok(()) => {}
            Err(error) => {
                tracing::warn!(error = %crate::owner::error_chain(&error), "sync with the server failed")
            }
        }
        // A session that lasted a while was healthy: start the backoff over.
        if started.elapsed() > BACKOFF_MAX * 2 {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn session(
    node: &Node,
    snapshots: watch::Receiver<Snapshot>,
    desired: &watch::Sender<DesiredSlot>,
) -> Result<(), SyncError> {
    let config = &node.config;
    let endpoint = Endpoint::from_shared(config.server_url.clone())
        .map_err(|source| SyncError::Url { url: config.server_url.clone(), source })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let channel = endpoint.connect().await.map_err(SyncError::Connect)?;
    let token: MetadataValue<_> =
        format!("Bearer {}", config.node_token).parse().map_err(|_| SyncError::Token)?;
    let mut client =
        NodeClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            request.metadata_mut().insert("authorization", token.clone());
            Ok(request)
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let registered = client
        .register(RegisterRequest {
            node_id: config.node_id.clone(),
            capacity: Some(resources(&node.capacity)),
            proxy_url: config.proxy_url.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            sandbox_max: Some(sandbox_max(&node.capacity)),
        })
        .await
        .map_err(SyncError::Register)?
        .into_inner();
    let interval = match registered.heartbeat_interval_ms {
        0 => config.report_interval,
        ms => Duration::from_millis(ms.into()).min(config.report_interval),
    };
    tracing::info!(server = %config.server_url, "registered with the server");
    let reports = reports(config.node_id.clone(), node.capacity, snapshots, interval);
    let mut stream = client.sync(reports).await.map_err(SyncError::Stream)?.into_inner();
    while let Some(state) = stream.message().await.map_err(SyncError::Stream)? {
        publish_desired(desired, state);
    }
    Err(SyncError::Closed)
}

/// Keeps only the newest desired state; an identical repeat wakes nobody.
fn publish_desired(desired: &watch::Sender<DesiredSlot>, state: DesiredState) {
    desired.send_if_modified(|slot| {
        if slot.as_deref() == Some(&state) {
            return false;
        }
        *slot = Some(Arc::new(state));
        true
    });
}

/// The outgoing half of a session: a report at once, then one after every
/// change of the table (coalesced: a burst of changes is one report of the
/// newest table) and at least every `interval`.
fn reports(
    node_id: String,
    capacity: Capacity,
    snapshots: watch::Receiver<Snapshot>,
    interval: Duration,
) -> impl Stream<Item = NodeReport> + Send + 'static {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures_util::stream::unfold((snapshots, ticker, true), move |(mut rx, mut ticker, first)| {
        let node_id = node_id.clone();
        async move {
            if first {
                ticker.tick().await;
            } else {
                tokio::select! {
                    changed = rx.changed() => changed.ok()?,
                    _ = ticker.tick() => {}
                }
            }
            let snapshot = rx.borrow_and_update().clone();
            Some((report(node_id, capacity, &snapshot), (rx, ticker, false)))
        }
    })
}

pub(crate) fn report(node_id: String, capacity: Capacity, snapshot: &Snapshot) -> NodeReport {
    NodeReport {
        node_id,
        capacity: Some(resources(&capacity)),
        sandbox_max: Some(sandbox_max(&capacity)),
        sandboxes: snapshot
            .values()
            .map(|view| ObservedSandbox {
                id: view.id.to_string(),
                phase: view.observed.phase.to_proto() as i32,
                reason: view.observed.reason.clone(),
                message: truncate(&view.observed.message, MAX_REPORTED_MESSAGE),
                exit_code: view.observed.exit_code,
                started_at_ms: view.observed.started_at_ms,
                finished_at_ms: view.observed.finished_at_ms,
                last_activity_ms: view.activity.load(Ordering::Relaxed),
            })
            .collect(),
    }
}

/// The largest message either side decodes (the server's limit too).
const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// The most of a failure's message one report carries, so that a report of
/// thousands of sandboxes stays far below [`MAX_MESSAGE_BYTES`].
const MAX_REPORTED_MESSAGE: usize = 1024;

/// `text` cut to at most `max` bytes, on a character boundary, marked if cut.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

fn sandbox_max(capacity: &Capacity) -> node::Resources {
    let max = capacity.per_sandbox;
    node::Resources { cpus: max.cpus, memory_mb: max.memory_mb, disk_mb: 0, pids: max.pids }
}

pub(crate) fn resources(capacity: &Capacity) -> node::Resources {
    node::Resources {
        cpus: capacity.cpus,
        memory_mb: capacity.memory_mb,
        disk_mb: capacity.disk_mb,
        pids: capacity.pids,
    }
}
