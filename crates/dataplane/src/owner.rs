//! The owner task: the one place that changes the sandbox table.
//!
//! It applies the server's desired state level-triggered: every pass compares
//! the whole desired set with the whole table and starts whatever operation
//! closes the gap, unless one is already under way for that sandbox. Creates,
//! stops and destroys run as spawned tasks that message the owner when done,
//! after which the owner compares again. A repeated, stale or lost desired
//! state is therefore harmless: only the newest one is kept, and an operation
//! is started only from the table's current state.
//!
//! What the owner knows is published as an immutable [`Snapshot`] on a watch
//! channel, read by the proxy (routing) and the sync client (reports).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize};
use std::time::{Duration, Instant};

use hutch_api::{ExitInfo, ProcessStatus};
use hutch_image::{ImageStore, PullOptions};
use hutch_isolate::{Driver, Egress, Limits, SandboxId, SandboxSpec, SandboxState};
use hutch_proto::node;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};

use crate::config::{Capacity, DataplaneConfig};
use crate::record::{Observed, Phase, Record, RecordError, Records, Spec, now_ms};
use crate::sandboxd::{self, SandboxdCallError};

/// Reasons the node reports (see docs/platform-api.md for the server's).
pub(crate) mod reason {
    pub const PULLING_IMAGE: &str = "pulling_image";
    pub const CREATING: &str = "creating";
    pub const IMAGE_PULL_FAILED: &str = "image_pull_failed";
    pub const START_FAILED: &str = "start_failed";
    pub const INVALID_SPEC: &str = "invalid_spec";
    pub const EXITED: &str = "exited";
    pub const OOM: &str = "oom";
    pub const STOPPED: &str = "stopped";
    /// The sandbox's PID 1 (sandboxd) died.
    pub const SANDBOX_DIED: &str = "sandbox_died";
    /// The node could not write the sandbox's record before creating it (a full
    /// or failing disk), so it did not create it.
    pub const STATE_NOT_PERSISTED: &str = "state_not_persisted";
}

/// How often the owner checks that running sandboxes are still alive, and
/// retries operations that failed.
const TICK: Duration = Duration::from_secs(1);
/// How long a failed stop or destroy waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Everything the node's tasks share; immutable after open.
#[derive(Debug)]
pub(crate) struct Node {
    pub driver: Driver,
    pub images: ImageStore,
    pub records: Records,
    pub config: DataplaneConfig,
    pub capacity: Capacity,
    /// Bounds how many sandboxes are being created at once. Creation is CPU
    /// work; a hundred at once would share the cores and all finish late,
    /// while a few at a time finish in order and the first are usable at once.
    pub create_slots: tokio::sync::Semaphore,
    /// The driver's run dir, removed at shutdown when no sandbox is left in it.
    pub run_dir: std::path::PathBuf,
    /// Sandbox networking (also the driver's), for the addresses it blocks.
    pub network: Option<Arc<hutch_net::NetManager>>,
}

impl Node {
    pub fn pull_options(&self) -> PullOptions {
        PullOptions {
            insecure_registries: self.config.insecure_registries.clone(),
            ..Default::default()
        }
    }
}

/// One sandbox as the proxy and the reports see it.
#[derive(Clone, Debug)]
pub(crate) struct SandboxView {
    pub id: SandboxId,
    pub ports: Vec<u16>,
    pub observed: Observed,
    /// Unix ms of the last proxy request; bumped by the proxy without the owner.
    pub activity: Arc<AtomicI64>,
    /// Connections the proxy holds into the sandbox; counted by the proxy.
    pub connections: Arc<AtomicUsize>,
    /// sandboxd is up, so the sandbox can be proxied to.
    pub reachable: bool,
}

/// The published table.
pub(crate) type Snapshot = Arc<BTreeMap<String, SandboxView>>;

/// The newest desired state from the server; `None` until the first arrives.
pub(crate) type DesiredSlot = Option<Arc<node::DesiredState>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Busy {
    Idle,
    Creating,
    Stopping,
    Destroying,
}

#[derive(Debug)]
struct Entry {
    record: Record,
    activity: Arc<AtomicI64>,
    connections: Arc<AtomicUsize>,
    busy: Busy,
    /// The driver holds a sandbox (alive or not) for this id.
    exists: bool,
    /// sandboxd was seen dead.
    dead: bool,
    watcher: Option<AbortHandle>,
    /// A failed stop or destroy is retried only after this instant.
    retry_at: Option<Instant>,
    /// The record on disk is older than this one (a write failed); every tick
    /// tries again.
    dirty: bool,
}

impl Entry {
    fn new(record: Record) -> Self {
        Self {
            record,
            activity: Arc::new(AtomicI64::new(0)),
            connections: Arc::new(AtomicUsize::new(0)),
            busy: Busy::Idle,
            exists: false,
            dead: false,
            watcher: None,
            retry_at: None,
            dirty: false,
        }
    }

    /// Writes the record; a failure is logged and marks the entry for a retry on
    /// every tick. The observed state the node reports is the one in memory
    /// either way.
    fn persist(&mut self, records: &Records) -> Result<(), RecordError> {
        let result = records.save(&self.record);
        self.dirty = result.is_err();
        if let Err(error) = &result {
            tracing::warn!(id = %self.record.spec.id, error = %error_chain(error), "cannot write a sandbox record; retrying");
        }
        result
    }

    /// [`Entry::persist`] after a change that has happened whatever the disk
    /// says (a sandbox that exited has exited): the record catches up on a later
    /// tick, and until then a restarted node would find the record before it,
    /// which it reconciles (a creating sandbox found alive counts as running).
    fn persist_or_retry(&mut self, records: &Records) {
        let _logged_and_retried = self.persist(records);
    }

    fn view(&self) -> SandboxView {
        SandboxView {
            id: self.record.spec.id.clone(),
            ports: self.record.spec.ports.clone(),
            observed: self.record.observed.clone(),
            activity: self.activity.clone(),
            connections: self.connections.clone(),
            reachable: self.reachable(),
        }
    }

    /// Whether [`Entry::view`] would equal `view`.
    fn shows_as(&self, view: &SandboxView) -> bool {
        view.id == self.record.spec.id
            && view.ports == self.record.spec.ports
            && view.observed == self.record.observed
            && view.reachable == self.reachable()
            && Arc::ptr_eq(&view.activity, &self.activity)
    }

    /// sandboxd is up, so the sandbox can be proxied to.
    fn reachable(&self) -> bool {
        let phase = self.record.observed.phase;
        self.exists
            && !self.dead
            && self.busy != Busy::Destroying
            && matches!(phase, Phase::Running | Phase::Exited)
    }

    fn stop_watcher(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
    }
}

/// What one reconcile pass does for one sandbox.
#[derive(Clone, Copy, Debug)]
enum Action {
    None,
    Create,
    Stop(Duration),
    Destroy,
    /// Asked to stop before it was ever created.
    NeverStarted,
    /// Dropped by the server and already destroyed.
    Forget,
}

#[derive(Debug)]
struct Failure {
    reason: &'static str,
    message: String,
}

#[derive(Debug)]
enum Event {
    Created { id: SandboxId, result: Result<bool, Failure> },
    Stopped { id: SandboxId, result: Result<(), String> },
    Destroyed { id: SandboxId, result: Result<(), String> },
    MainExited { id: SandboxId, exit: Option<ExitInfo> },
}

#[derive(Clone, Debug)]
struct Desired {
    /// Only until the node has reported the sandbox (see the proto): a
    /// sandbox the node has is matched by id alone.
    spec: Option<node::SandboxSpec>,
    stop: bool,
    grace: Duration,
}

/// The owner task and its channels, built by `Dataplane::open`.
#[derive(Debug)]
pub(crate) struct Owner {
    node: Arc<Node>,
    entries: BTreeMap<SandboxId, Entry>,
    /// Sandboxes found running without a record, settled by the first desired
    /// state (see [`Owner::settle_orphans`]).
    orphans: Vec<SandboxId>,
    /// Shared so that a reconcile pass can walk it while it changes the table.
    desired: Option<Arc<BTreeMap<String, Desired>>>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    tasks: JoinSet<()>,
    snapshot: watch::Sender<Snapshot>,
}

impl Owner {
    /// Builds the table from the records on disk and what the driver adopted;
    /// `orphans` are sandboxes the driver runs that have no record.
    pub fn new(node: Arc<Node>, records: Vec<Record>, orphans: Vec<SandboxId>) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut entries = BTreeMap::new();
        for record in records {
            let id = record.spec.id.clone();
            let alive =
                node.driver.inspect(&id).is_ok_and(|info| info.state == SandboxState::Running);
            let mut entry = Entry::new(record);
            let observed = &mut entry.record.observed;
            if alive {
                entry.exists = true;
                if observed.phase == Phase::Creating {
                    // We crashed after the driver created it but before we recorded it.
                    observed.phase = Phase::Running;
                    observed.reason.clear();
                    observed.started_at_ms = now_ms();
                    entry.record.has_main = !entry.record.spec.command.is_empty();
                }
            } else if observed.phase == Phase::Running {
                observed.finish(
                    Phase::Failed,
                    reason::SANDBOX_DIED,
                    None,
                    "the sandbox ended while the dataplane was down".to_owned(),
                );
            }
            entry.persist_or_retry(&node.records);
            entries.insert(id, entry);
        }
        let (snapshot, _) = watch::channel(Snapshot::default());
        let owner = Self {
            node,
            entries,
            orphans,
            desired: None,
            events_tx,
            events_rx,
            tasks: JoinSet::new(),
            snapshot,
        };
        owner.publish();
        owner
    }

    pub fn snapshots(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.subscribe()
    }

    /// Runs until `shutdown`; sandboxes keep running afterwards, to be
    /// re-adopted by the next open.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<DesiredSlot>,
        shutdown: impl Future<Output = ()>,
    ) {
        let ids: Vec<SandboxId> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.exists && e.record.has_main && e.record.observed.phase == Phase::Running
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.spawn_watcher(&id);
        }
        let mut tick = tokio::time::interval(TICK);
        let mut desired_open = true;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                changed = desired.changed(), if desired_open => match changed {
                    Ok(()) => {
                        let state = desired.borrow_and_update().clone();
                        if let Some(state) = state {
                            self.set_desired(&state);
                        }
                    }
                    Err(_) => desired_open = false,
                },
                Some(event) = self.events_rx.recv() => self.apply(event),
                _ = tick.tick() => self.check_alive(),
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
                () = &mut shutdown => break,
            }
            self.reconcile();
            self.publish();
        }
        self.tasks.shutdown().await;
    }

    fn set_desired(&mut self, state: &node::DesiredState) {
        let mut desired = BTreeMap::new();
        for sandbox in &state.sandboxes {
            // Servers before the id field named sandboxes by their spec only.
            let id = match (&sandbox.id, &sandbox.spec) {
                (id, _) if !id.is_empty() => id.clone(),
                (_, Some(spec)) => spec.id.clone(),
                _ => continue,
            };
            desired.insert(
                id,
                Desired {
                    spec: sandbox.spec.clone(),
                    stop: sandbox.phase == node::Phase::Stop as i32,
                    grace: Duration::from_secs(sandbox.grace_secs.into()),
                },
            );
        }
        self.desired = Some(Arc::new(desired));
        if let Some(network) = &self.node.network {
            let blocked: Vec<std::net::Ipv4Addr> =
                state.blocked_addresses.iter().filter_map(|a| a.parse().ok()).collect();
            if let Err(error) = network.block_addresses("cluster", &blocked) {
                tracing::warn!(error = %error_chain(&error), "cannot block the cluster's addresses");
            }
        }
    }

    /// Starts what closes the gap between the desired state and the table.
    fn reconcile(&mut self) {
        let Some(desired) = self.desired.clone() else {
            // Until the server has spoken, keep everything as it is.
            return;
        };
        self.settle_orphans(&desired);
        for (raw_id, want) in desired.iter() {
            if self.entries.contains_key(raw_id.as_str()) {
                continue;
            }
            let Ok(id) = SandboxId::new(raw_id.clone()) else {
                tracing::warn!(id = %raw_id, "ignoring a desired sandbox with an invalid id");
                continue;
            };
            let Some(spec) = &want.spec else {
                // Its spec comes with a later message, in answer to our next report.
                continue;
            };
            let mut entry = self.new_entry(&id, spec, want.stop);
            // A sandbox is created only once its record is on disk (so a restarted
            // node knows it); one whose record cannot be written is not created.
            if let Err(error) = entry.persist(&self.node.records)
                && entry.record.observed.phase == Phase::Creating
            {
                entry.record.observed.finish(
                    Phase::Failed,
                    reason::STATE_NOT_PERSISTED,
                    None,
                    format!("the node cannot write the sandbox's record: {}", error_chain(&error)),
                );
            }
            self.entries.insert(id, entry);
        }
        let now = Instant::now();
        let ids: Vec<SandboxId> = self.entries.keys().cloned().collect();
        for id in ids {
            let Some(entry) = self.entries.get_mut(&id) else { continue };
            if entry.busy != Busy::Idle || entry.retry_at.is_some_and(|at| at > now) {
                continue;
            }
            let action = match desired.get(id.as_str()) {
                None if entry.exists => Action::Destroy,
                None => Action::Forget,
                Some(want) => match (want.stop, entry.record.observed.phase) {
                    (false, Phase::Creating) => Action::Create,
                    (true, Phase::Creating) => Action::NeverStarted,
                    (true, Phase::Running) => Action::Stop(want.grace),
                    // Never restart a finished sandbox; an exited one stays up
                    // (its output stays readable) until it is dropped.
                    _ => Action::None,
                },
            };
            match action {
                Action::None => {}
                Action::Create => self.start_create(&id),
                Action::Stop(grace) => self.start_stop(&id, grace),
                Action::Destroy => self.start_destroy(&id),
                Action::NeverStarted => {
                    entry.record.observed.finish(
                        Phase::Stopped,
                        reason::STOPPED,
                        None,
                        String::new(),
                    );
                    entry.persist_or_retry(&self.node.records);
                }
                Action::Forget => {
                    self.entries.remove(&id);
                    if let Err(error) = self.node.records.remove(&id) {
                        tracing::warn!(%id, %error, "cannot remove sandbox record");
                    }
                }
            }
        }
    }

    /// Sandboxes found running without a record: those the server wants are
    /// taken over with the spec it sent (a record is written for them now); the
    /// rest get an entry with no record, which the pass destroys as for any
    /// sandbox the server dropped.
    fn settle_orphans(&mut self, desired: &BTreeMap<String, Desired>) {
        for id in std::mem::take(&mut self.orphans) {
            let want = desired.get(id.as_str());
            if want.is_some_and(|want| want.spec.is_none()) {
                // Wanted, but its spec comes with a later message.
                self.orphans.push(id);
                continue;
            }
            let wanted = want.and_then(|want| Spec::from_proto(want.spec.as_ref()?).ok());
            let mut entry = match wanted {
                Some(spec) => {
                    tracing::info!(%id, "taking over a running sandbox that had no record");
                    let has_main = !spec.command.is_empty() || !spec.is_host_image();
                    let mut observed = Observed::creating(reason::CREATING);
                    observed.phase = Phase::Running;
                    observed.reason.clear();
                    observed.started_at_ms = now_ms();
                    let mut entry = Entry::new(Record { spec, observed, has_main });
                    entry.persist_or_retry(&self.node.records);
                    entry
                }
                None => {
                    tracing::warn!(%id, "destroying a sandbox the server does not want and no record names");
                    Entry::new(Record {
                        spec: Spec::placeholder(id.clone()),
                        observed: Observed::creating(reason::CREATING),
                        has_main: false,
                    })
                }
            };
            entry.exists = true;
            let watch = entry.record.has_main && desired.contains_key(id.as_str());
            self.entries.insert(id.clone(), entry);
            if watch {
                self.spawn_watcher(&id);
            }
        }
    }

    fn new_entry(&self, id: &SandboxId, proto_spec: &node::SandboxSpec, stop: bool) -> Entry {
        match Spec::from_proto(proto_spec) {
            Ok(spec) => {
                let reason = if spec.is_host_image()
                    || self.node.images.get(&spec.image).ok().flatten().is_some()
                {
                    reason::CREATING
                } else {
                    reason::PULLING_IMAGE
                };
                let mut observed = Observed::creating(reason);
                if stop {
                    observed.finish(Phase::Stopped, reason::STOPPED, None, String::new());
                }
                Entry::new(Record { spec, observed, has_main: false })
            }
            Err(error) => {
                let spec = Spec {
                    namespace: proto_spec.namespace.clone(),
                    image: proto_spec.image.clone(),
                    ..Spec::placeholder(id.clone())
                };
                let mut observed = Observed::creating(reason::CREATING);
                observed.finish(Phase::Failed, reason::INVALID_SPEC, None, error.to_string());
                Entry::new(Record { spec, observed, has_main: false })
            }
        }
    }

    fn start_create(&mut self, id: &SandboxId) {
        let Some(entry) = self.entries.get_mut(id) else { return };
        entry.busy = Busy::Creating;
        let spec = entry.record.spec.clone();
        let node = self.node.clone();
        let events = self.events_tx.clone();
        let id = id.clone();
        self.tasks.spawn(async move {
            let result = create(&node, &spec).await;
            let _ = events.send(Event::Created { id, result });
        });
    }

    fn start_stop(&mut self, id: &SandboxId, grace: Duration) {
        let Some(entry) = self.entries.get_mut(id) else { return };
        entry.busy = Busy::Stopping;
        entry.stop_watcher();
        let node = self.node.clone();
        let events = self.events_tx.clone();
        let id = id.clone();
        self.tasks.spawn(async move {
            let result = node.driver.stop(&id, grace).await.map(drop).map_err(|e| error_chain(&e));
            let _ = events.send(Event::Stopped { id, result });
        });
    }

    fn start_destroy(&mut self, id: &SandboxId) {
        let Some(entry) = self.entries.get_mut(id) else { return };
        entry.busy = Busy::Destroying;
        entry.stop_watcher();
        let node = self.node.clone();
        let events = self.events_tx.clone();
        let id = id.clone();
        self.tasks.spawn(async move {
            let result = match node.driver.destroy(&id).await {
                Ok(()) | Err(hutch_isolate::DestroySandboxError::NotFound(_)) => Ok(()),
                Err(e) => Err(error_chain(&e)),
            };
            let _ = events.send(Event::Destroyed { id, result });
        });
    }

    fn spawn_watcher(&mut self, id: &SandboxId) {
        let node = self.node.clone();
        let events = self.events_tx.clone();
        let task_id = id.clone();
        let handle = self.tasks.spawn(async move {
            if let Some(exit) = watch_main(&node, &task_id).await {
                let _ = events.send(Event::MainExited { id: task_id, exit });
            }
        });
        if let Some(entry) = self.entries.get_mut(id) {
            entry.watcher = Some(handle);
        }
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Created { id, result } => {
                let Some(entry) = self.entries.get_mut(&id) else { return };
                entry.busy = Busy::Idle;
                let observed = &mut entry.record.observed;
                match result {
                    Ok(has_main) => {
                        entry.exists = true;
                        entry.record.has_main = has_main;
                        observed.phase = Phase::Running;
                        observed.reason.clear();
                        observed.started_at_ms = now_ms();
                        entry.persist_or_retry(&self.node.records);
                        if has_main {
                            self.spawn_watcher(&id);
                        }
                    }
                    Err(failure) => {
                        tracing::warn!(%id, reason = failure.reason, message = %failure.message, "sandbox create failed");
                        observed.finish(Phase::Failed, failure.reason, None, failure.message);
                        entry.persist_or_retry(&self.node.records);
                    }
                }
            }
            Event::Stopped { id, result } => {
                let Some(entry) = self.entries.get_mut(&id) else { return };
                entry.busy = Busy::Idle;
                match result {
                    Ok(()) => {
                        entry.retry_at = None;
                        entry.record.observed.finish(
                            Phase::Stopped,
                            reason::STOPPED,
                            None,
                            String::new(),
                        );
                        entry.persist_or_retry(&self.node.records);
                    }
                    Err(error) => {
                        tracing::warn!(%id, %error, "sandbox stop failed; retrying");
                        entry.retry_at = Some(Instant::now() + RETRY_AFTER);
                    }
                }
            }
            Event::Destroyed { id, result } => {
                let Some(entry) = self.entries.get_mut(&id) else { return };
                entry.busy = Busy::Idle;
                match result {
                    Ok(()) => {
                        entry.exists = false;
                        entry.retry_at = None;
                        // The next reconcile forgets it (or, if the server wants it
                        // again, which it never does for a used id, keeps reporting it).
                    }
                    Err(error) => {
                        tracing::warn!(%id, %error, "sandbox destroy failed; retrying");
                        entry.retry_at = Some(Instant::now() + RETRY_AFTER);
                    }
                }
            }
            Event::MainExited { id, exit } => {
                let Some(entry) = self.entries.get_mut(&id) else { return };
                entry.watcher = None;
                // A stop in progress explains the exit; it reports STOPPED.
                if entry.busy != Busy::Idle || entry.record.observed.phase != Phase::Running {
                    return;
                }
                let (code, signal) = exit.map_or((None, None), |e| (e.exit_code, e.signal));
                let oom_kills = self.node.driver.inspect(&id).map_or(0, |info| info.oom_kills);
                let reason = if signal == Some(libc::SIGKILL) && oom_kills > 0 {
                    reason::OOM
                } else {
                    reason::EXITED
                };
                // A signal is reported the way shells do: 128 + its number.
                let code = code.or(signal.map(|s| 128 + s));
                entry.record.observed.finish(Phase::Exited, reason, code, String::new());
                entry.persist_or_retry(&self.node.records);
                // sandboxd killed what the command left; its network goes too, while
                // its output and files stay readable until the server drops it.
                let node = self.node.clone();
                self.tasks.spawn(async move {
                    if let Err(error) = node.driver.finish(&id).await {
                        tracing::warn!(%id, error = %error_chain(&error), "cannot take a finished sandbox's network away");
                    }
                });
            }
        }
    }

    /// Notices sandboxes whose PID 1 died, and writes records a failed write left
    /// behind.
    fn check_alive(&mut self) {
        for entry in self.entries.values_mut().filter(|e| e.dirty) {
            entry.persist_or_retry(&self.node.records);
        }
        for (id, entry) in &mut self.entries {
            if !entry.exists || entry.dead || entry.busy != Busy::Idle {
                continue;
            }
            let info = self.node.driver.inspect(id).ok();
            if info.as_ref().is_some_and(|i| i.state == SandboxState::Running) {
                continue;
            }
            entry.dead = true;
            entry.stop_watcher();
            if entry.record.observed.phase == Phase::Running {
                let oom = info.is_some_and(|i| i.oom_kills > 0);
                let reason = if oom { reason::OOM } else { reason::SANDBOX_DIED };
                entry.record.observed.finish(
                    Phase::Failed,
                    reason,
                    None,
                    "the sandbox's init (sandboxd) exited".to_owned(),
                );
                entry.persist_or_retry(&self.node.records);
            }
        }
    }

    fn publish(&self) {
        let visible = || {
            self.entries.iter().filter(|(_, e)| {
                e.busy != Busy::Destroying && !(e.exists && self.is_absent(&e.record.spec.id))
            })
        };
        // Most passes change nothing the snapshot shows: find that out without
        // building a new table, which allocates for every sandbox.
        let unchanged = {
            let current = self.snapshot.borrow();
            let mut shown = current.iter();
            visible().all(|(id, entry)| {
                shown.next().is_some_and(|(key, view)| key == id.as_str() && entry.shows_as(view))
            }) && shown.next().is_none()
        };
        if unchanged {
            return;
        }
        let views: BTreeMap<String, SandboxView> =
            visible().map(|(id, e)| (id.to_string(), e.view())).collect();
        self.snapshot.send_replace(Arc::new(views));
    }

    /// Whether the server dropped this sandbox (so it is being forgotten).
    fn is_absent(&self, id: &SandboxId) -> bool {
        self.desired.as_ref().is_some_and(|d| !d.contains_key(id.as_str()))
    }
}

/// Pulls the image if needed and creates the sandbox; returns whether it has
/// a main command.
async fn create(node: &Node, spec: &Spec) -> Result<bool, Failure> {
    let mut sandbox = if spec.is_host_image() {
        SandboxSpec::new(spec.id.clone())
    } else {
        let image = node
            .images
            .pull(&spec.image, node.config.registry_auth(&spec.image), node.pull_options(), None)
            .await
            .map_err(|e| Failure { reason: reason::IMAGE_PULL_FAILED, message: error_chain(&e) })?;
        SandboxSpec::from_image(spec.id.clone(), &image)
    };
    if !spec.command.is_empty() {
        sandbox.command = Some(spec.command.clone());
    }
    for (key, value) in &spec.env {
        sandbox.set_env(key.clone(), value.clone());
    }
    if !spec.working_dir.is_empty() {
        sandbox.working_dir = Some(spec.working_dir.clone());
    }
    if !spec.user.is_empty() {
        sandbox.user = Some(spec.user.clone());
    }
    sandbox.limits = limits(spec);
    node.capacity
        .check(&sandbox.limits)
        .map_err(|message| Failure { reason: reason::INVALID_SPEC, message })?;
    sandbox.egress = if spec.internet { Egress::Internet } else { Egress::None };
    sandbox.user_namespace = node.config.user_namespace;
    let has_main = sandbox.command.is_some();
    // The semaphore is never closed, so acquiring only waits.
    let _slot = node.create_slots.acquire().await;
    node.driver
        .create(sandbox)
        .await
        .map_err(|e| Failure { reason: reason::START_FAILED, message: error_chain(&e) })?;
    Ok(has_main)
}

/// The spec's resources as driver limits; zero means the driver's default.
fn limits(spec: &Spec) -> Limits {
    let defaults = Limits::default();
    Limits {
        cpu_millis: if spec.cpus > 0.0 {
            ((spec.cpus * 1000.0).round() as u32).max(1)
        } else {
            defaults.cpu_millis
        },
        memory_bytes: if spec.memory_mb > 0 { spec.memory_mb << 20 } else { defaults.memory_bytes },
        pids: if spec.pids > 0 { spec.pids } else { defaults.pids },
        disk_bytes: if spec.disk_mb > 0 { spec.disk_mb << 20 } else { defaults.disk_bytes },
    }
}

/// Waits for the main command to exit through sandboxd's wait endpoint.
/// Returns `None` when there is nothing to report: sandboxd died (the owner's
/// liveness check reports that) or no longer knows the process.
async fn watch_main(node: &Node, id: &SandboxId) -> Option<Option<ExitInfo>> {
    let mut delay = Duration::from_millis(20);
    loop {
        match sandboxd::wait_process(&node.driver, id, hutch_isolate::MAIN_TAG).await {
            Ok(info) if info.status == ProcessStatus::Exited => return Some(info.exit),
            Ok(_) => continue,
            Err(SandboxdCallError::Status { status, body })
                if status == http::StatusCode::NOT_FOUND =>
            {
                tracing::warn!(%id, %body, "sandboxd does not know the main process");
                return None;
            }
            Err(error) => {
                let alive = node.driver.inspect(id).is_ok_and(|i| i.state == SandboxState::Running);
                if !alive {
                    return None;
                }
                tracing::debug!(%id, %error, "waiting for the main process failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// An error and its sources, joined by ": ", for messages sent to the server.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_resources_mean_the_driver_defaults() {
        let spec = Spec {
            id: SandboxId::new("a").unwrap(),
            namespace: String::new(),
            image: "host".into(),
            command: vec![],
            env: BTreeMap::new(),
            working_dir: String::new(),
            user: String::new(),
            cpus: 0.0,
            memory_mb: 0,
            disk_mb: 0,
            pids: 0,
            internet: false,
            ports: vec![],
        };
        assert_eq!(limits(&spec), Limits::default());
        let spec = Spec { cpus: 0.25, memory_mb: 64, disk_mb: 16, pids: 10, ..spec };
        assert_eq!(
            limits(&spec),
            Limits { cpu_millis: 250, memory_bytes: 64 << 20, pids: 10, disk_bytes: 16 << 20 }
        );
    }
}
