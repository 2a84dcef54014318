//! The one task that owns the server's state: namespaces, keys, sandboxes,
//! nodes and idempotency keys, all in memory, written through to the store
//! before any command is answered.
//!
//! HTTP handlers and gRPC streams talk to it with [`Command`]s carrying a
//! oneshot reply. Every sandbox change is broadcast (for SSE), and every
//! change to what a node should run is published on that node's `watch`
//! channel, which its Sync stream forwards.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hutch_proto::node as proto;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::model::{
    CreatedKey, Egress, Namespace, Node as NodeView, NodeResources, NodeState, Resources, Sandbox,
    SandboxList, SandboxState,
};
use crate::scheduler::{self, Free};
use crate::store::{
    ApiKeyRecord, IdempotencyRecord, NamespaceRecord, SandboxRecord, StopRequest, Store,
    StoreError, StoredState,
};
use crate::time::{now_ms, rfc3339};
use crate::validate::ValidCreate;

/// The namespace that always exists: created on first open, and the
/// namespace clients use when they name none, so it cannot be deleted.
pub const DEFAULT_NAMESPACE: &str = "default";
/// How long an idempotency key is remembered.
const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;
/// How many queued commands are handled before desired states are rebuilt.
const BATCH: usize = 64;
/// How many sandbox changes SSE subscribers may fall behind before they
/// re-read the state.
const EVENT_BUFFER: usize = 4096;

/// Timings of the controller; see [`crate::ServerConfig`].
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub heartbeat_interval: Duration,
    pub node_timeout: Duration,
    pub retention: Duration,
    pub history: Duration,
    pub tick: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("namespace {0} not found")]
    NamespaceNotFound(String),
    #[error("namespace {0} already exists")]
    NamespaceExists(String),
    #[error("namespace {0} is reserved and cannot be deleted")]
    NamespaceReserved(String),
    #[error("sandbox {0} not found")]
    SandboxNotFound(String),
    #[error("key {0} not found")]
    KeyNotFound(String),
    #[error("idempotency key {0:?} was used with a different body")]
    IdempotencyConflict(String),
    #[error("sandbox {id} is {state}")]
    NotRunning { id: String, state: SandboxState, reason: Option<String> },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("node {0} is not registered; call Register first")]
    NodeNotRegistered(String),
    #[error("cannot write the change to the store")]
    Store(#[from] StoreError),
    #[error("the sandbox fits no node")]
    TooLarge(crate::validate::InvalidField),
}

/// Which sandboxes a list asks for.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub states: Vec<SandboxState>,
    pub tags: Vec<(String, String)>,
    pub include_stopped: bool,
    pub limit: usize,
    /// `seq` of the last sandbox of the previous page.
    pub cursor: Option<i64>,
}

/// Where a daemon request for a sandbox goes.
#[derive(Debug)]
pub enum DaemonTarget {
    /// Forward to this node proxy.
    Ready { proxy_url: String },
    /// Not running yet: ask again once the receiver fires, at the sandbox's
    /// next change (or its node's registration).
    NotYet(oneshot::Receiver<()>),
    /// Finished (or never will run).
    Finished { state: SandboxState, reason: Option<String>, retained_proxy_url: Option<String> },
}

/// A node the server can forward image calls to.
#[derive(Clone, Debug)]
pub struct NodeTarget {
    pub id: String,
    pub proxy_url: String,
}

#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    pub sandboxes: BTreeMap<SandboxState, u64>,
    pub nodes_ready: u64,
    pub nodes_lost: u64,
}

type Reply<T> = oneshot::Sender<T>;

#[derive(Debug)]
pub enum Command {
    Authenticate {
        key_sha256: String,
        reply: Reply<Option<String>>,
    },
    CreateNamespace {
        name: String,
        reply: Reply<Result<Namespace, ControlError>>,
    },
    ListNamespaces {
        reply: Reply<Vec<Namespace>>,
    },
    /// Stops and forgets every sandbox of the namespace, then deletes its
    /// keys and the namespace itself.
    DeleteNamespace {
        name: String,
        reply: Reply<Result<Namespace, ControlError>>,
    },
    CreateKey {
        namespace: String,
        reply: Reply<Result<CreatedKey, ControlError>>,
    },
    DeleteKey {
        namespace: String,
        id: String,
        reply: Reply<Result<(), ControlError>>,
    },
    CreateSandbox {
        namespace: String,
        request: Box<ValidCreate>,
        idempotency: Option<(String, String)>,
        reply: Reply<Result<(Sandbox, bool), ControlError>>,
    },
    ListSandboxes {
        namespace: String,
        filter: ListFilter,
        reply: Reply<Result<SandboxList, ControlError>>,
    },
    GetSandbox {
        namespace: String,
        id: String,
        reply: Reply<Result<Sandbox, ControlError>>,
    },
    DeleteSandbox {
        namespace: String,
        id: String,
        reply: Reply<Result<Sandbox, ControlError>>,
    },
    StopSandbox {
        namespace: String,
        id: String,
        grace_secs: Option<u32>,
        reply: Reply<Result<Sandbox, ControlError>>,
    },
    SetTimeout {
        namespace: String,
        id: String,
        timeout_secs: u64,
        reply: Reply<Result<Sandbox, ControlError>>,
    },
    ResolveDaemon {
        namespace: String,
        id: String,
        reply: Reply<Result<DaemonTarget, ControlError>>,
    },
    ListNodes {
        reply: Reply<Vec<NodeTarget>>,
    },
    /// Every known node (or only `only`), with capacity and allocations.
    DescribeNodes {
        only: Option<String>,
        reply: Reply<Vec<NodeView>>,
    },
    Metrics {
        reply: Reply<MetricsSnapshot>,
    },
    Register {
        request: proto::RegisterRequest,
        reply: Reply<proto::RegisterResponse>,
    },
    Connect {
        node_id: String,
        reply: Reply<Result<watch::Receiver<Arc<NodeDesired>>, ControlError>>,
    },
    Report {
        report: proto::NodeReport,
        reply: Reply<Result<Arc<NodeDesired>, ControlError>>,
    },
}

/// Everything one node should run, as the controller publishes it. The Sync
/// stream turns it into `DesiredState` messages that carry each spec only until
/// the node has the sandbox (see `grpc.rs`); specs are shared, never copied per
/// change, so a change costs O(sandboxes) pointer copies however large the
/// specs are.
#[derive(Debug, Default)]
pub struct NodeDesired {
    /// Sorted by id.
    pub sandboxes: Vec<DesiredEntry>,
    /// IPv4 addresses of the server's nodes, which no sandbox may reach.
    pub blocked_addresses: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct DesiredEntry {
    pub id: String,
    pub spec: Arc<proto::SandboxSpec>,
    pub phase: proto::Phase,
    pub grace_secs: u32,
}

impl NodeDesired {
    /// Whether `other` asks for the same: specs never change for an id, so
    /// comparing ids, phases and graces is enough.
    fn same_as(&self, other: &NodeDesired) -> bool {
        self.blocked_addresses == other.blocked_addresses
            && self.sandboxes.len() == other.sandboxes.len()
            && self
                .sandboxes
                .iter()
                .zip(&other.sandboxes)
                .all(|(a, b)| a.id == b.id && a.phase == b.phase && a.grace_secs == b.grace_secs)
    }
}

/// A cheap, cloneable way to talk to the controller.
#[derive(Clone, Debug)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<Arc<Sandbox>>,
}

impl Handle {
    /// Sends a command and waits for its reply.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| ControlError::ShuttingDown)?;
        answer.await.map_err(|_| ControlError::ShuttingDown)
    }

    /// Every sandbox change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Sandbox>> {
        self.events.subscribe()
    }
}

struct Entry {
    record: SandboxRecord,
    /// The spec as nodes get it, built once: a sandbox's spec never changes.
    spec: Arc<proto::SandboxSpec>,
    /// Unix ms of the last API, daemon or proxy activity.
    last_activity_ms: i64,
    /// Whether a finished sandbox is still in its node's desired state
    /// (for the retention period, so its logs stay readable).
    retained: bool,
}

struct Node {
    capacity: Resources,
    /// The largest sandbox it runs (its real resources); `None` until it says.
    sandbox_max: Option<Resources>,
    proxy_url: String,
    last_seen: Instant,
    /// Unix ms of the last Register or report (None: not since we started).
    last_seen_ms: Option<i64>,
    /// False for nodes known only from sandboxes loaded at open, until they
    /// register again.
    registered: bool,
    lost: bool,
    desired: watch::Sender<Arc<NodeDesired>>,
}

impl Node {
    fn new(now: Instant) -> Self {
        Node {
            capacity: Resources { cpus: 0.0, memory_mb: 0, disk_mb: 0, pids: 0 },
            sandbox_max: None,
            proxy_url: String::new(),
            last_seen: now,
            last_seen_ms: None,
            registered: false,
            lost: false,
            desired: watch::Sender::new(Arc::new(NodeDesired::default())),
        }
    }
}

pub struct Controller<S> {
    store: S,
    config: ControllerConfig,
    namespaces: BTreeMap<String, NamespaceRecord>,
    keys: HashMap<String, ApiKeyRecord>,
    sandboxes: HashMap<String, Entry>,
    nodes: BTreeMap<String, Node>,
    idempotency: HashMap<(String, String), IdempotencyRecord>,
    events: broadcast::Sender<Arc<Sandbox>>,
    /// Daemon requests waiting for their sandbox to run, woken at its next
    /// change. Per sandbox, so that a burst of creates, each with a request
    /// waiting, wakes one request per change rather than all of them.
    daemon_waiters: HashMap<String, Vec<oneshot::Sender<()>>>,
    /// Nodes whose desired state may have changed since it was published.
    dirty_nodes: BTreeSet<String>,
    /// Whether placement should be retried (capacity or pending set changed).
    reschedule: bool,
    last_expiry_ms: i64,
    /// `seq` of the next sandbox created.
    next_seq: i64,
}

impl<S: Store> Controller<S> {
    /// Builds the controller from the stored state; `default` is created if
    /// missing.
    pub async fn load(
        store: S,
        config: ControllerConfig,
    ) -> Result<(Self, Handle, mpsc::Receiver<Command>), StoreError> {
        let StoredState { namespaces, api_keys, sandboxes, idempotency_keys, max_sandbox_seq } =
            store.load().await?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (commands, receiver) = mpsc::channel(1024);
        let now = now_ms();
        let instant = Instant::now();
        let mut controller = Controller {
            store,
            config,
            namespaces: namespaces.into_iter().map(|ns| (ns.name.clone(), ns)).collect(),
            keys: api_keys.into_iter().map(|key| (key.key_sha256.clone(), key)).collect(),
            sandboxes: HashMap::new(),
            daemon_waiters: HashMap::new(),
            nodes: BTreeMap::new(),
            idempotency: idempotency_keys
                .into_iter()
                .filter(|rec| rec.created_at_ms + IDEMPOTENCY_TTL_MS > now)
                .map(|rec| ((rec.namespace.clone(), rec.key.clone()), rec))
                .collect(),
            events: events.clone(),
            dirty_nodes: BTreeSet::new(),
            reschedule: true,
            last_expiry_ms: 0,
            next_seq: max_sandbox_seq + 1,
        };
        for record in sandboxes {
            // Nodes are not stored: a node that held sandboxes is expected
            // back, and is lost like any other if it stays silent.
            if let Some(node) = &record.node {
                controller.nodes.entry(node.clone()).or_insert_with(|| Node::new(instant));
            }
            let retained = !record.state.is_terminal()
                || record.finished_at_ms.unwrap_or(now) + millis(controller.config.retention) > now;
            controller.sandboxes.insert(
                record.id.clone(),
                Entry { spec: node_spec(&record), record, last_activity_ms: now, retained },
            );
        }
        if !controller.namespaces.contains_key(DEFAULT_NAMESPACE) {
            let record = NamespaceRecord { name: DEFAULT_NAMESPACE.to_owned(), created_at_ms: now };
            controller.store.put_namespace(&record).await?;
            controller.namespaces.insert(record.name.clone(), record);
        }
        Ok((controller, Handle { commands, events }, receiver))
    }

    /// Serves commands until `shutdown` fires or every handle is gone.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                command = commands.recv() => match command {
                    Some(command) => {
                        self.handle(command).await;
                        // A burst (many creates at once) is handled before
                        // the nodes' desired states are rebuilt, once.
                        for _ in 0..BATCH {
                            match commands.try_recv() {
                                Ok(command) => self.handle(command).await,
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => self.tick().await,
            }
            self.settle().await;
        }
        self.store.close().await;
    }

    async fn handle(&mut self, command: Command) {
        // A dropped reply means the caller went away; nothing to do then.
        match command {
            Command::Authenticate { key_sha256, reply } => {
                let _ = reply.send(self.keys.get(&key_sha256).map(|key| key.namespace.clone()));
            }
            Command::CreateNamespace { name, reply } => {
                let _ = reply.send(self.create_namespace(name).await);
            }
            Command::ListNamespaces { reply } => {
                let _ = reply.send(self.namespaces.values().map(namespace_view).collect());
            }
            Command::DeleteNamespace { name, reply } => {
                let _ = reply.send(self.delete_namespace(&name).await);
            }
            Command::CreateKey { namespace, reply } => {
                let _ = reply.send(self.create_key(namespace).await);
            }
            Command::DeleteKey { namespace, id, reply } => {
                let _ = reply.send(self.delete_key(&namespace, &id).await);
            }
            Command::CreateSandbox { namespace, request, idempotency, reply } => {
                let _ = reply.send(self.create_sandbox(namespace, *request, idempotency).await);
            }
            Command::ListSandboxes { namespace, filter, reply } => {
                let _ = reply.send(self.list_sandboxes(&namespace, filter));
            }
            Command::GetSandbox { namespace, id, reply } => {
                let result = self.touch(&namespace, &id).map(|entry| entry.record.clone());
                let _ = reply.send(result.map(|record| self.view(&record)));
            }
            Command::DeleteSandbox { namespace, id, reply } => {
                let _ = reply.send(self.delete_sandbox(&namespace, &id).await);
            }
            Command::StopSandbox { namespace, id, grace_secs, reply } => {
                let _ = reply.send(self.stop_sandbox(&namespace, &id, grace_secs).await);
            }
            Command::SetTimeout { namespace, id, timeout_secs, reply } => {
                let _ = reply.send(self.set_timeout(&namespace, &id, timeout_secs).await);
            }
            Command::ResolveDaemon { namespace, id, reply } => {
                let _ = reply.send(self.resolve_daemon(&namespace, &id));
            }
            Command::ListNodes { reply } => {
                let nodes = self
                    .nodes
                    .iter()
                    .filter(|(_, node)| node.registered && !node.lost)
                    .map(|(id, node)| NodeTarget {
                        id: id.clone(),
                        proxy_url: node.proxy_url.clone(),
                    })
                    .collect();
                let _ = reply.send(nodes);
            }
            Command::DescribeNodes { only, reply } => {
                let _ = reply.send(self.describe_nodes(only.as_deref()));
            }
            Command::Metrics { reply } => {
                let _ = reply.send(self.metrics());
            }
            Command::Register { request, reply } => {
                let _ = reply.send(self.register(request));
            }
            Command::Connect { node_id, reply } => {
                let result = match self.nodes.get(&node_id) {
                    Some(node) if node.registered => {
                        self.dirty_nodes.insert(node_id);
                        Ok(node.desired.subscribe())
                    }
                    _ => Err(ControlError::NodeNotRegistered(node_id)),
                };
                let _ = reply.send(result);
            }
            Command::Report { report, reply } => {
                let result = self.report(report).await;
                let _ = reply.send(result);
            }
        }
    }

    async fn create_namespace(&mut self, name: String) -> Result<Namespace, ControlError> {
        if self.namespaces.contains_key(&name) {
            return Err(ControlError::NamespaceExists(name));
        }
        let record = NamespaceRecord { name, created_at_ms: now_ms() };
        self.store.put_namespace(&record).await?;
        let view = namespace_view(&record);
        self.namespaces.insert(record.name.clone(), record);
        Ok(view)
    }

    /// Deletes a namespace. Its sandboxes are marked deleted (so a new
    /// namespace of the same name never sees them) and those still alive are
    /// stopped with reason `namespace_deleted`; its keys stop working at once.
    async fn delete_namespace(&mut self, name: &str) -> Result<Namespace, ControlError> {
        if name == DEFAULT_NAMESPACE {
            return Err(ControlError::NamespaceReserved(name.to_owned()));
        }
        let Some(namespace) = self.namespaces.get(name).map(namespace_view) else {
            return Err(ControlError::NamespaceNotFound(name.to_owned()));
        };
        let sandboxes: Vec<SandboxRecord> = self
            .sandboxes
            .values()
            .map(|entry| &entry.record)
            .filter(|record| record.namespace == name && !record.deleted)
            .map(|record| {
                let mut record = record.clone();
                record.deleted = true;
                if !record.state.is_terminal() {
                    let grace = record.stop.as_ref().map_or(10, |stop| stop.grace_secs);
                    stop_record(&mut record, "namespace_deleted", grace);
                }
                record
            })
            .collect();
        // One transaction: a crash leaves the namespace either whole or gone.
        self.store.delete_namespace(name, &sandboxes).await?;
        for record in sandboxes {
            self.remember(record);
        }
        self.keys.retain(|_, key| key.namespace != name);
        self.idempotency.retain(|(namespace, _), _| namespace != name);
        self.namespaces.remove(name);
        Ok(namespace)
    }

    async fn create_key(&mut self, namespace: String) -> Result<CreatedKey, ControlError> {
        if !self.namespaces.contains_key(&namespace) {
            return Err(ControlError::NamespaceNotFound(namespace));
        }
        let key = crate::keys::generate_key();
        let record = ApiKeyRecord {
            id: uuid::Uuid::new_v4().simple().to_string()[..16].to_owned(),
            namespace,
            key_sha256: crate::keys::sha256_hex(key.as_bytes()),
            created_at_ms: now_ms(),
        };
        self.store.put_api_key(&record).await?;
        let created =
            CreatedKey { id: record.id.clone(), key, namespace: record.namespace.clone() };
        self.keys.insert(record.key_sha256.clone(), record);
        Ok(created)
    }

    async fn delete_key(&mut self, namespace: &str, id: &str) -> Result<(), ControlError> {
        let Some(hash) = self
            .keys
            .values()
            .find(|key| key.id == id && key.namespace == namespace)
            .map(|key| key.key_sha256.clone())
        else {
            return Err(ControlError::KeyNotFound(id.to_owned()));
        };
        self.store.delete_api_key(id).await?;
        self.keys.remove(&hash);
        Ok(())
    }

    async fn create_sandbox(
        &mut self,
        namespace: String,
        request: ValidCreate,
        idempotency: Option<(String, String)>,
    ) -> Result<(Sandbox, bool), ControlError> {
        if !self.namespaces.contains_key(&namespace) {
            return Err(ControlError::NamespaceNotFound(namespace));
        }
        let now = now_ms();
        if let Some((key, body_sha256)) = &idempotency
            && let Some(previous) = self.idempotency.get(&(namespace.clone(), key.clone()))
            && previous.created_at_ms + IDEMPOTENCY_TTL_MS > now
        {
            if previous.body_sha256 != *body_sha256 {
                return Err(ControlError::IdempotencyConflict(key.clone()));
            }
            // The first sandbox may have been deleted and forgotten since;
            // then the key starts over.
            if let Some(entry) = self.sandboxes.get(&previous.sandbox_id) {
                return Ok((self.view(&entry.record), false));
            }
        }
        self.check_fits_a_node(&request.spec.resources)?;
        let mut record = SandboxRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            seq: self.next_seq,
            namespace,
            state: SandboxState::Pending,
            reason: None,
            exit_code: None,
            node: None,
            spec: request.spec,
            tags: request.tags,
            created_at_ms: now,
            started_at_ms: None,
            finished_at_ms: None,
            deadline_ms: now.saturating_add(secs_to_ms(request.timeout_secs)),
            idle_timeout_secs: request.idle_timeout_secs,
            stop: None,
            deleted: false,
        };
        // Placing before the first write saves a second write per create.
        let free = self.free_by_node();
        match scheduler::pick(
            free.iter().map(|(id, free)| (id.as_str(), free)),
            &record.spec.resources,
        ) {
            Some(node) => record.node = Some(node.to_owned()),
            None => record.reason = Some("no_capacity".to_owned()),
        }
        if let Some((key, body_sha256)) = idempotency {
            let idem = IdempotencyRecord {
                namespace: record.namespace.clone(),
                key,
                body_sha256,
                sandbox_id: record.id.clone(),
                created_at_ms: now,
            };
            self.store.put_idempotency_key(&idem).await?;
            self.idempotency.insert((idem.namespace.clone(), idem.key.clone()), idem);
        }
        self.save(record.clone()).await?;
        self.next_seq += 1;
        Ok((self.view(&record), true))
    }

    fn list_sandboxes(
        &self,
        namespace: &str,
        filter: ListFilter,
    ) -> Result<SandboxList, ControlError> {
        if !self.namespaces.contains_key(namespace) {
            return Err(ControlError::NamespaceNotFound(namespace.to_owned()));
        }
        let mut matching: Vec<&SandboxRecord> = self
            .sandboxes
            .values()
            .map(|entry| &entry.record)
            .filter(|record| record.namespace == namespace && !record.deleted)
            .filter(|record| {
                if filter.states.is_empty() {
                    filter.include_stopped || !record.state.is_terminal()
                } else {
                    filter.states.contains(&record.state)
                }
            })
            .filter(|record| {
                filter.tags.iter().all(|(key, value)| record.tags.get(key) == Some(value))
            })
            .filter(|record| filter.cursor.is_none_or(|cursor| record.seq < cursor))
            .collect();
        // Newest first; the id breaks ties so paging is stable.
        matching.sort_by_key(|record| std::cmp::Reverse(record.seq));
        let limit = filter.limit.max(1);
        let next_cursor = (matching.len() > limit)
            .then(|| matching.get(limit - 1).map(|last| last.seq.to_string()))
            .flatten();
        let sandboxes = matching.into_iter().take(limit).map(|record| self.view(record)).collect();
        Ok(SandboxList { sandboxes, next_cursor })
    }

    /// Finds a sandbox of `namespace` and counts the call as activity.
    fn touch(&mut self, namespace: &str, id: &str) -> Result<&Entry, ControlError> {
        match self.sandboxes.get_mut(id) {
            Some(entry) if entry.record.namespace == namespace && !entry.record.deleted => {
                entry.last_activity_ms = now_ms();
                Ok(entry)
            }
            _ => Err(ControlError::SandboxNotFound(id.to_owned())),
        }
    }

    async fn delete_sandbox(&mut self, namespace: &str, id: &str) -> Result<Sandbox, ControlError> {
        let mut record = self.touch(namespace, id)?.record.clone();
        record.deleted = true;
        if !record.state.is_terminal() {
            let grace = record.stop.as_ref().map_or(10, |stop| stop.grace_secs);
            stop_record(&mut record, "deleted", grace);
        }
        let view = self.view(&record);
        self.save(record).await?;
        Ok(view)
    }

    async fn stop_sandbox(
        &mut self,
        namespace: &str,
        id: &str,
        grace_secs: Option<u32>,
    ) -> Result<Sandbox, ControlError> {
        let mut record = self.touch(namespace, id)?.record.clone();
        if !record.state.is_terminal() && record.stop.is_none() {
            stop_record(&mut record, "stopped", grace_secs.unwrap_or(10));
            self.save(record.clone()).await?;
        }
        Ok(self.view(&record))
    }

    async fn set_timeout(
        &mut self,
        namespace: &str,
        id: &str,
        timeout_secs: u64,
    ) -> Result<Sandbox, ControlError> {
        let mut record = self.touch(namespace, id)?.record.clone();
        if record.state.is_terminal() || record.stop.is_some() {
            return Err(ControlError::NotRunning {
                id: record.id,
                state: record.state,
                reason: record.reason,
            });
        }
        record.deadline_ms = now_ms().saturating_add(secs_to_ms(timeout_secs));
        self.save(record.clone()).await?;
        Ok(self.view(&record))
    }

    fn resolve_daemon(&mut self, namespace: &str, id: &str) -> Result<DaemonTarget, ControlError> {
        let entry = self.touch(namespace, id)?;
        let retained = entry.retained;
        let record = &entry.record.clone();
        let proxy_url = |nodes: &BTreeMap<String, Node>| {
            record
                .node
                .as_ref()
                .and_then(|node| nodes.get(node))
                .filter(|node| node.registered && !node.lost)
                .map(|node| node.proxy_url.clone())
        };
        let mut not_yet = || {
            let (waiter, changed) = oneshot::channel();
            let waiters = self.daemon_waiters.entry(id.to_owned()).or_default();
            // Requests that timed out and went away.
            waiters.retain(|waiter| !waiter.is_closed());
            waiters.push(waiter);
            DaemonTarget::NotYet(changed)
        };
        Ok(match record.state {
            SandboxState::Running if record.stop.is_none() => match proxy_url(&self.nodes) {
                Some(proxy_url) => DaemonTarget::Ready { proxy_url },
                None => not_yet(),
            },
            SandboxState::Pending | SandboxState::Creating if record.stop.is_none() => not_yet(),
            state => DaemonTarget::Finished {
                state,
                reason: record
                    .reason
                    .clone()
                    .or_else(|| record.stop.as_ref().map(|s| s.reason.clone())),
                retained_proxy_url: if state.is_terminal() && retained {
                    proxy_url(&self.nodes)
                } else {
                    None
                },
            },
        })
    }

    fn describe_nodes(&self, only: Option<&str>) -> Vec<NodeView> {
        let mut allocated: BTreeMap<&str, (NodeResources, u64)> = BTreeMap::new();
        for (node, resources) in self.reservations() {
            let (sum, count) = allocated.entry(node).or_default();
            sum.cpus += resources.cpus;
            sum.memory_mb = sum.memory_mb.saturating_add(resources.memory_mb);
            sum.disk_mb = sum.disk_mb.saturating_add(resources.disk_mb);
            *count += 1;
        }
        self.nodes
            .iter()
            .filter(|(id, _)| only.is_none_or(|only| only == id.as_str()))
            .map(|(id, node)| {
                let (mut allocated, sandboxes) = allocated.remove(id.as_str()).unwrap_or_default();
                // Sums of fractions such as 0.1 drift; cpus are shown to the
                // millicpu, the precision a cgroup quota has anyway.
                allocated.cpus = (allocated.cpus * 1000.0).round() / 1000.0;
                NodeView {
                    id: id.clone(),
                    state: if node.lost {
                        NodeState::Lost
                    } else if node.registered {
                        NodeState::Ready
                    } else {
                        NodeState::Unregistered
                    },
                    proxy_url: Some(node.proxy_url.clone()).filter(|url| !url.is_empty()),
                    capacity: NodeResources {
                        cpus: node.capacity.cpus,
                        memory_mb: node.capacity.memory_mb,
                        disk_mb: node.capacity.disk_mb,
                    },
                    allocated,
                    sandboxes,
                    last_seen_at: node.last_seen_ms.map(rfc3339),
                }
            })
            .collect()
    }

    fn metrics(&self) -> MetricsSnapshot {
        let mut snapshot = MetricsSnapshot::default();
        for state in SandboxState::ALL {
            snapshot.sandboxes.insert(state, 0);
        }
        for entry in self.sandboxes.values() {
            *snapshot.sandboxes.entry(entry.record.state).or_default() += 1;
        }
        for node in self.nodes.values() {
            if node.lost {
                snapshot.nodes_lost += 1;
            } else if node.registered {
                snapshot.nodes_ready += 1;
            }
        }
        snapshot
    }

    fn register(&mut self, request: proto::RegisterRequest) -> proto::RegisterResponse {
        let now = Instant::now();
        let node = self.nodes.entry(request.node_id.clone()).or_insert_with(|| Node::new(now));
        if node.lost {
            tracing::info!(node = %request.node_id, "lost node registered again");
        }
        node.capacity = resources_from_proto(request.capacity.as_ref());
        node.sandbox_max = request
            .sandbox_max
            .as_ref()
            .filter(|max| max.memory_mb > 0)
            .map(|max| resources_from_proto(Some(max)));
        node.proxy_url = request.proxy_url.trim_end_matches('/').to_owned();
        node.last_seen = now;
        node.last_seen_ms = Some(now_ms());
        node.registered = true;
        node.lost = false;
        tracing::info!(node = %request.node_id, proxy_url = %node.proxy_url, version = %request.version, "node registered");
        self.dirty_nodes.insert(request.node_id);
        self.reschedule = true;
        // A running sandbox of a node that was away can be reached again.
        for (_, waiters) in self.daemon_waiters.drain() {
            for waiter in waiters {
                let _ = waiter.send(());
            }
        }
        proto::RegisterResponse {
            heartbeat_interval_ms: u32::try_from(self.config.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            node_timeout_ms: u32::try_from(self.config.node_timeout.as_millis())
                .unwrap_or(u32::MAX),
        }
    }

    async fn report(
        &mut self,
        report: proto::NodeReport,
    ) -> Result<Arc<NodeDesired>, ControlError> {
        let node_id = report.node_id.clone();
        let Some(node) = self.nodes.get_mut(&node_id).filter(|node| node.registered) else {
            return Err(ControlError::NodeNotRegistered(node_id));
        };
        node.last_seen = Instant::now();
        node.last_seen_ms = Some(now_ms());
        if node.lost {
            // Its sandboxes already failed with node_lost and stay omitted
            // from its desired state, so it destroys them.
            tracing::info!(node = %node_id, "lost node reports again");
            node.lost = false;
            self.reschedule = true;
        }
        if let Some(max) = report.sandbox_max.as_ref().filter(|max| max.memory_mb > 0) {
            node.sandbox_max = Some(resources_from_proto(Some(max)));
        }
        if let Some(capacity) = report.capacity.as_ref().filter(|c| c.memory_mb > 0) {
            let capacity = resources_from_proto(Some(capacity));
            if capacity != node.capacity {
                node.capacity = capacity;
                self.reschedule = true;
            }
        }
        let now = now_ms();
        let reported: BTreeSet<&str> = report.sandboxes.iter().map(|s| s.id.as_str()).collect();
        let mut changed = Vec::new();
        for observed in &report.sandboxes {
            let Some(entry) = self.sandboxes.get_mut(&observed.id) else { continue };
            if entry.record.node.as_deref() != Some(node_id.as_str()) {
                continue;
            }
            if observed.last_activity_ms > entry.last_activity_ms {
                entry.last_activity_ms = observed.last_activity_ms;
            }
            if let Some(record) = apply_observed(&entry.record, observed, now) {
                changed.push(record);
            }
        }
        // A sandbox the server wants stopped that the node does not have is
        // as stopped as it will get (the node may never have created it).
        for entry in self.sandboxes.values() {
            let record = &entry.record;
            if record.node.as_deref() == Some(node_id.as_str())
                && !record.state.is_terminal()
                && record.stop.is_some()
                && !reported.contains(record.id.as_str())
            {
                let mut record = record.clone();
                finish_stopped(&mut record, None, now);
                changed.push(record);
            }
        }
        self.save_all(changed).await?;
        self.settle().await;
        // settle() published this node's state; answer with that very one.
        Ok(self
            .nodes
            .get(&node_id)
            .map_or_else(|| self.desired_state(&node_id), |node| node.desired.borrow().clone()))
    }

    async fn tick(&mut self) {
        let now = now_ms();
        let instant = Instant::now();
        let mut changed = Vec::new();
        let lost: Vec<String> = self
            .nodes
            .iter_mut()
            .filter(|(_, node)| {
                !node.lost && instant.duration_since(node.last_seen) >= self.config.node_timeout
            })
            .map(|(id, node)| {
                node.lost = true;
                id.clone()
            })
            .collect();
        for node in &lost {
            tracing::warn!(node = %node, "node lost: silent for {:?}", self.config.node_timeout);
            self.dirty_nodes.insert(node.clone());
        }
        let retention_ms = millis(self.config.retention);
        let history_ms = millis(self.config.history);
        let mut forget = Vec::new();
        for entry in self.sandboxes.values_mut() {
            let record = &entry.record;
            if record.state.is_terminal() {
                if record.deleted {
                    forget.push(record.id.clone());
                } else if entry.retained && record.finished_at_ms.unwrap_or(0) + retention_ms <= now
                {
                    entry.retained = false;
                    if let Some(node) = &record.node {
                        self.dirty_nodes.insert(node.clone());
                    }
                } else if record.finished_at_ms.unwrap_or(0) + history_ms <= now {
                    // Old history leaves memory and the list API, as if
                    // deleted, so neither grows without bound.
                    let mut record = record.clone();
                    record.deleted = true;
                    changed.push(record);
                }
                continue;
            }
            if record.node.as_ref().is_some_and(|node| lost.contains(node)) {
                let mut record = record.clone();
                record.state = SandboxState::Failed;
                record.reason = Some("node_lost".to_owned());
                record.finished_at_ms = Some(now);
                changed.push(record);
                continue;
            }
            if record.stop.is_some() {
                continue;
            }
            let reason = if now >= record.deadline_ms {
                Some("timeout")
            } else if let Some(idle) = record.idle_timeout_secs
                && record.state == SandboxState::Running
                && now - entry.last_activity_ms >= secs_to_ms(idle)
            {
                Some("idle_timeout")
            } else {
                None
            };
            if let Some(reason) = reason {
                let mut record = record.clone();
                stop_record(&mut record, reason, 10);
                changed.push(record);
            }
        }
        for id in forget {
            self.wake_daemon_waiters(&id);
            if let Some(entry) = self.sandboxes.remove(&id)
                && let Some(node) = entry.record.node
            {
                self.dirty_nodes.insert(node);
            }
        }
        if let Err(error) = self.save_all(changed).await {
            tracing::error!(error = %error_chain(&error), "cannot record timed sandbox changes; retrying on the next tick");
        }
        if now - self.last_expiry_ms > 60_000 {
            self.last_expiry_ms = now;
            let before = now - IDEMPOTENCY_TTL_MS;
            self.idempotency.retain(|_, rec| rec.created_at_ms >= before);
            if let Err(error) = self.store.expire_idempotency_keys(before).await {
                tracing::error!(error = %error_chain(&error), "cannot expire idempotency keys");
            }
        }
    }

    /// Retries placement if anything changed, then publishes the desired
    /// state of every node that may have changed.
    async fn settle(&mut self) {
        if std::mem::take(&mut self.reschedule) {
            self.schedule().await;
        }
        for node_id in std::mem::take(&mut self.dirty_nodes) {
            let desired = self.desired_state(&node_id);
            if let Some(node) = self.nodes.get(&node_id) {
                node.desired.send_if_modified(|current| {
                    if current.same_as(&desired) {
                        false
                    } else {
                        *current = desired;
                        true
                    }
                });
            }
        }
    }

    async fn schedule(&mut self) {
        let mut pending: Vec<SandboxRecord> = self
            .sandboxes
            .values()
            .map(|entry| &entry.record)
            .filter(|r| r.state == SandboxState::Pending && r.node.is_none() && r.stop.is_none())
            .cloned()
            .collect();
        if pending.is_empty() {
            return;
        }
        pending.sort_by_key(|record| record.seq);
        let mut free = self.free_by_node();
        let mut placed = Vec::new();
        for mut record in pending {
            let choice = scheduler::pick(
                free.iter().map(|(id, free)| (id.as_str(), free)),
                &record.spec.resources,
            )
            .map(str::to_owned);
            match choice {
                Some(node) => {
                    if let Some(f) = free.get_mut(&node) {
                        f.reserve(&record.spec.resources);
                    }
                    record.node = Some(node);
                    record.reason = None;
                }
                None if record.reason.as_deref() == Some("no_capacity") => continue,
                None => record.reason = Some("no_capacity".to_owned()),
            }
            placed.push(record);
        }
        let saved = self.save_all(placed).await;
        // Saving placements asks for another pass; nothing is left to place.
        self.reschedule = false;
        if let Err(error) = saved {
            tracing::error!(error = %error_chain(&error), "cannot record placements");
            self.reschedule = true;
        }
    }

    /// Free resources of every schedulable node after its reservations.
    fn free_by_node(&self) -> BTreeMap<String, Free> {
        let mut free: BTreeMap<String, Free> = self
            .nodes
            .iter()
            .filter(|(_, node)| node.registered && !node.lost)
            .map(|(id, node)| (id.clone(), Free::of(&node.capacity, node.sandbox_max.as_ref())))
            .collect();
        for (node, resources) in self.reservations() {
            if let Some(f) = free.get_mut(node) {
                f.reserve(resources);
            }
        }
        free
    }

    /// What every placed, unfinished sandbox holds, and on which node.
    fn reservations(&self) -> impl Iterator<Item = (&str, &Resources)> {
        self.sandboxes
            .values()
            .map(|entry| &entry.record)
            .filter(|record| !record.state.is_terminal())
            .filter_map(|record| record.node.as_deref().map(|node| (node, &record.spec.resources)))
    }

    fn desired_state(&self, node_id: &str) -> Arc<NodeDesired> {
        let mut sandboxes: Vec<DesiredEntry> = self
            .sandboxes
            .values()
            .filter(|entry| entry.record.node.as_deref() == Some(node_id))
            .filter(|entry| {
                let record = &entry.record;
                // node_lost sandboxes are omitted so that a node coming back
                // destroys them.
                !record.state.is_terminal()
                    || (entry.retained
                        && !record.deleted
                        && record.reason.as_deref() != Some("node_lost"))
            })
            .map(|entry| {
                let stop = entry.record.stop.as_ref();
                DesiredEntry {
                    id: entry.record.id.clone(),
                    spec: entry.spec.clone(),
                    phase: if stop.is_some() { proto::Phase::Stop } else { proto::Phase::Run },
                    grace_secs: stop.map_or(0, |stop| stop.grace_secs),
                }
            })
            .collect();
        sandboxes.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Arc::new(NodeDesired { sandboxes, blocked_addresses: self.cluster_addresses() })
    }

    /// The IPv4 addresses the nodes registered with (their proxies'), which no
    /// sandbox may reach: a node's address may be public, so the private ranges
    /// the dataplanes block by default do not cover it.
    fn cluster_addresses(&self) -> Vec<String> {
        let mut addresses: Vec<String> = self
            .nodes
            .values()
            .filter_map(|node| {
                let authority = node.proxy_url.split("://").nth(1)?.split('/').next()?;
                let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host);
                host.parse::<std::net::Ipv4Addr>().ok().map(|ip| ip.to_string())
            })
            .collect();
        addresses.sort();
        addresses.dedup();
        addresses
    }

    /// Whether some node could ever run a sandbox this large: none whose
    /// [`Node::sandbox_max`] it fits means 400 at create, not a sandbox pending
    /// forever. Nodes that have not said what they take are assumed to fit.
    fn check_fits_a_node(&self, resources: &Resources) -> Result<(), ControlError> {
        let maxima: Vec<&Resources> = self
            .nodes
            .values()
            .filter(|node| node.registered || node.sandbox_max.is_some())
            .map(|node| node.sandbox_max.as_ref())
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default();
        if maxima.is_empty() || maxima.iter().any(|max| scheduler::within(resources, max)) {
            return Ok(());
        }
        let most = |f: fn(&Resources) -> f64| maxima.iter().map(|max| f(max)).fold(0.0, f64::max);
        let memory = most(|max| max.memory_mb as f64);
        let cpus = most(|max| max.cpus);
        let pids = most(|max| f64::from(max.pids));
        let (field, message) = if (resources.memory_mb + resources.disk_mb) as f64 > memory {
            (
                "resources.memory_mb",
                format!(
                    "memory_mb + disk_mb must fit a node's memory: at most {memory} MiB together \
                     (a sandbox's disk lives in memory)"
                ),
            )
        } else if resources.cpus > cpus {
            ("resources.cpus", format!("must fit a node: at most {cpus}"))
        } else if f64::from(resources.pids) > pids {
            ("resources.pids", format!("at most {pids}, what the nodes allow one sandbox"))
        } else {
            ("resources", "no single node has all of these at once".to_owned())
        };
        Err(ControlError::TooLarge(crate::validate::InvalidField {
            field: field.to_owned(),
            message,
        }))
    }

    /// Writes a sandbox through to the store, then to memory, and tells
    /// whoever watches.
    async fn save(&mut self, record: SandboxRecord) -> Result<(), StoreError> {
        self.store.put_sandbox(&record).await?;
        self.remember(record);
        Ok(())
    }

    /// [`Controller::save`] for changes made together: one transaction.
    async fn save_all(&mut self, records: Vec<SandboxRecord>) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        self.store.put_sandboxes(&records).await?;
        for record in records {
            self.remember(record);
        }
        Ok(())
    }

    /// The in-memory half of [`Controller::save`], for a record already
    /// written to the store.
    fn remember(&mut self, record: SandboxRecord) {
        self.wake_daemon_waiters(&record.id);
        let now = now_ms();
        if let Some(node) = &record.node {
            self.dirty_nodes.insert(node.clone());
        }
        let view = Arc::new(self.view(&record));
        match self.sandboxes.get_mut(&record.id) {
            Some(entry) => {
                if let Some(old) = &entry.record.node
                    && record.node.as_ref() != Some(old)
                {
                    self.dirty_nodes.insert(old.clone());
                }
                if record.state.is_terminal() != entry.record.state.is_terminal() {
                    self.reschedule = true;
                }
                entry.record = record;
            }
            None => {
                self.reschedule = true;
                self.sandboxes.insert(
                    record.id.clone(),
                    Entry {
                        spec: node_spec(&record),
                        record,
                        last_activity_ms: now,
                        retained: true,
                    },
                );
            }
        }
        // Nobody listening is fine.
        let _ = self.events.send(view);
    }

    /// Lets the daemon requests waiting for this sandbox look again.
    fn wake_daemon_waiters(&mut self, id: &str) {
        for waiter in self.daemon_waiters.remove(id).unwrap_or_default() {
            // A request that went away is fine.
            let _ = waiter.send(());
        }
    }

    fn view(&self, record: &SandboxRecord) -> Sandbox {
        let proxy_url = record
            .node
            .as_ref()
            .and_then(|node| self.nodes.get(node))
            .map(|node| node.proxy_url.as_str())
            .filter(|url| !url.is_empty());
        let urls = match proxy_url {
            Some(proxy) if !record.state.is_terminal() => record
                .spec
                .ports
                .iter()
                .map(|port| (port.to_string(), format!("{proxy}/{}/{port}/", record.id)))
                .collect(),
            _ => BTreeMap::new(),
        };
        Sandbox {
            id: record.id.clone(),
            namespace: record.namespace.clone(),
            state: record.state,
            reason: record.reason.clone(),
            exit_code: record.exit_code,
            image: record.spec.image.clone(),
            command: record.spec.command.clone(),
            resources: record.spec.resources.clone(),
            network: record.spec.network.clone(),
            ports: record.spec.ports.clone(),
            tags: record.tags.clone(),
            created_at: rfc3339(record.created_at_ms),
            started_at: record.started_at_ms.map(rfc3339),
            finished_at: record.finished_at_ms.map(rfc3339),
            deadline: (!record.state.is_terminal()).then(|| rfc3339(record.deadline_ms)),
            idle_timeout_secs: record.idle_timeout_secs,
            node: record.node.clone(),
            urls,
        }
    }
}

/// Asks for a sandbox to stop; one that was never placed ends at once.
fn stop_record(record: &mut SandboxRecord, reason: &str, grace_secs: u32) {
    record.stop = Some(StopRequest { reason: reason.to_owned(), grace_secs });
    if record.node.is_none() {
        finish_stopped(record, None, now_ms());
    }
}

/// Records the end of a sandbox the server asked to stop.
fn finish_stopped(record: &mut SandboxRecord, exit_code: Option<i32>, now: i64) {
    record.state = SandboxState::Terminated;
    record.reason =
        record.stop.as_ref().map(|stop| stop.reason.clone()).or(Some("stopped".to_owned()));
    record.exit_code = exit_code;
    record.finished_at_ms.get_or_insert(now);
}

/// The record after a node's observation, or `None` if nothing changed.
fn apply_observed(
    record: &SandboxRecord,
    observed: &proto::ObservedSandbox,
    now: i64,
) -> Option<SandboxRecord> {
    if record.state.is_terminal() {
        return None;
    }
    // Most reports repeat what the server already knows; answer those
    // without copying the record (a node reports every sandbox each time).
    let phase = observed.phase;
    let unchanged = match record.state {
        SandboxState::Running => {
            phase == proto::ObservedPhase::ObservedRunning as i32 && record.started_at_ms.is_some()
        }
        SandboxState::Pending | SandboxState::Creating => {
            phase == proto::ObservedPhase::ObservedCreating as i32
                && (record.state == SandboxState::Creating || observed.reason == "pulling_image")
                && record.reason.as_deref().unwrap_or("") == observed.reason
                && (observed.started_at_ms <= 0 || record.started_at_ms.is_some())
        }
        _ => false,
    };
    if unchanged {
        return None;
    }
    let mut next = record.clone();
    let phase = proto::ObservedPhase::try_from(observed.phase)
        .unwrap_or(proto::ObservedPhase::ObservedFailed);
    let reason = (!observed.reason.is_empty()).then(|| observed.reason.clone());
    let finished = || Some(if observed.finished_at_ms > 0 { observed.finished_at_ms } else { now });
    match phase {
        proto::ObservedPhase::ObservedCreating => {
            // The contract shows a sandbox waiting for its image as
            // `pending`/`pulling_image`; once the pull is done it is `creating`.
            if reason.as_deref() == Some("pulling_image") && next.state == SandboxState::Pending {
                next.reason = reason;
            } else if matches!(next.state, SandboxState::Pending | SandboxState::Creating) {
                next.state = SandboxState::Creating;
                next.reason = reason;
            }
        }
        proto::ObservedPhase::ObservedRunning => {
            next.state = SandboxState::Running;
            next.reason = None;
            if next.started_at_ms.is_none() {
                next.started_at_ms =
                    Some(if observed.started_at_ms > 0 { observed.started_at_ms } else { now });
            }
        }
        proto::ObservedPhase::ObservedExited
        | proto::ObservedPhase::ObservedStopped
        | proto::ObservedPhase::ObservedFailed
            if next.stop.is_some() =>
        {
            next.finished_at_ms = finished();
            finish_stopped(&mut next, observed.exit_code, now);
        }
        proto::ObservedPhase::ObservedExited => {
            let code = observed.exit_code.unwrap_or(-1);
            next.state = if code == 0 { SandboxState::Completed } else { SandboxState::Failed };
            next.reason =
                Some(reason.filter(|r| r == "oom").unwrap_or_else(|| "exited".to_owned()));
            next.exit_code = Some(code);
            next.finished_at_ms = finished();
        }
        proto::ObservedPhase::ObservedStopped => {
            next.state = SandboxState::Terminated;
            next.reason = Some("stopped".to_owned());
            next.exit_code = observed.exit_code;
            next.finished_at_ms = finished();
        }
        proto::ObservedPhase::ObservedFailed => {
            next.state = SandboxState::Failed;
            next.reason = Some(reason.unwrap_or_else(|| "start_failed".to_owned()));
            next.exit_code = observed.exit_code;
            next.finished_at_ms = finished();
        }
    }
    if next.started_at_ms.is_none() && observed.started_at_ms > 0 {
        next.started_at_ms = Some(observed.started_at_ms);
    }
    (next != *record).then_some(next)
}

/// The spec nodes get for a sandbox.
fn node_spec(record: &SandboxRecord) -> Arc<proto::SandboxSpec> {
    let spec = &record.spec;
    Arc::new(proto::SandboxSpec {
        id: record.id.clone(),
        namespace: record.namespace.clone(),
        image: spec.image.clone(),
        command: spec.command.clone(),
        env: spec.env.clone().into_iter().collect(),
        working_dir: spec.working_dir.clone().unwrap_or_default(),
        user: spec.user.clone().unwrap_or_default(),
        resources: Some(proto::Resources {
            cpus: spec.resources.cpus,
            memory_mb: spec.resources.memory_mb,
            disk_mb: spec.resources.disk_mb,
            pids: spec.resources.pids,
        }),
        egress: match spec.network.egress {
            Egress::None => proto::Egress::None as i32,
            Egress::Internet => proto::Egress::Internet as i32,
        },
        ports: spec.ports.iter().map(|&port| u32::from(port)).collect(),
    })
}

fn resources_from_proto(resources: Option<&proto::Resources>) -> Resources {
    resources.map_or(Resources { cpus: 0.0, memory_mb: 0, disk_mb: 0, pids: 0 }, |r| Resources {
        cpus: r.cpus,
        memory_mb: r.memory_mb,
        disk_mb: r.disk_mb,
        pids: r.pids,
    })
}

fn namespace_view(record: &NamespaceRecord) -> Namespace {
    Namespace { name: record.name.clone(), created_at: rfc3339(record.created_at_ms) }
}

fn secs_to_ms(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX / 1000).saturating_mul(1000)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// An error and its sources on one line, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
