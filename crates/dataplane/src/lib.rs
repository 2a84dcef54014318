//! The Hutch dataplane: the node agent that runs sandboxes for the server.
//!
//! [`Dataplane::open`] sets up the native driver, the image store and the
//! sandbox table (re-adopting sandboxes a previous run left running), and
//! [`Dataplane::run`] then runs three things until shutdown:
//!
//! * the owner task (`owner.rs`), the only writer of the sandbox table, which
//!   applies the server's desired state level-triggered;
//! * the sync client (`sync.rs`), which registers with the server and holds
//!   the bidirectional Sync stream, reconnecting forever;
//! * the proxy (`proxy.rs`), which routes HTTP (and WebSockets) to sandbox
//!   ports, to sandboxd, and to the node API (`node_api.rs`).
//!
//! Shutting down leaves sandboxes running: the next open adopts them.

mod config;
mod node_api;
mod owner;
mod proxy;
mod record;
mod sandboxd;
mod sync;

use std::sync::Arc;

use hutch_image::ImageStore;
use hutch_isolate::{Driver, DriverConfig, SandboxId};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{Capacity, CapacityConfig, ConfigError, DataplaneConfig, RegistryLogin};
pub use proxy::{
    BadRoute, HEADER_NODE_TOKEN, HEADER_SANDBOX_ID, HEADER_SANDBOX_PORT, Route, SANDBOXD_PORT,
    route,
};
pub use record::RecordError;

use owner::{Node, Owner};

#[derive(Debug, thiserror::Error)]
pub enum OpenDataplaneError {
    #[error("create {path}")]
    CreateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("set up sandbox networking")]
    Network(#[from] hutch_net::NetSetupError),
    #[error("invalid network_subnet or blocked_networks")]
    Subnet(#[from] hutch_net::ParseIpv4NetError),
    #[error("block the server's addresses")]
    Block(#[source] hutch_net::SetElementError),
    #[error("set up the sandbox driver")]
    Driver(#[from] hutch_isolate::NewDriverError),
    #[error("open the image store")]
    Images(#[from] hutch_image::OpenStoreError),
    #[error("adopt running sandboxes")]
    Adopt(#[from] hutch_isolate::AdoptError),
    #[error("sweep leftovers of dead sandboxes")]
    Sweep(#[from] hutch_isolate::SweepError),
    #[error("start the network namespace pool")]
    NetnsPool(#[source] std::io::Error),
    #[error("sandbox records")]
    Records(#[from] RecordError),
    #[error(
        "this kernel cannot run sandboxes in user namespaces (they need idmapped mounts, \
         Linux 5.12+, over overlayfs, 5.19+); only on such a kernel, set user_namespace: false \
         (HUTCH_USER_NAMESPACE=false) to run sandboxes as host root"
    )]
    UserNamespace(#[source] hutch_isolate::CreateSandboxError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunDataplaneError {}

/// The IPv4 addresses the server's URL names (resolved, if it names a host).
async fn server_addresses(url: &str) -> Vec<std::net::Ipv4Addr> {
    let Some(authority) = url.split("://").nth(1).and_then(|rest| rest.split('/').next()) else {
        return Vec::new();
    };
    let with_port =
        if authority.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) {
            authority.to_owned()
        } else {
            format!("{authority}:443")
        };
    match tokio::net::lookup_host(with_port).await {
        Ok(addresses) => addresses
            .filter_map(|address| match address.ip() {
                std::net::IpAddr::V4(ip) => Some(ip),
                std::net::IpAddr::V6(_) => None,
            })
            .collect(),
        Err(error) => {
            tracing::warn!(url, %error, "cannot resolve the server's address to block it");
            Vec::new()
        }
    }
}

/// An opened dataplane, ready to [`Dataplane::run`].
#[derive(Debug)]
pub struct Dataplane {
    node: Arc<Node>,
    owner: Owner,
}

impl Dataplane {
    /// Prepares the driver (cgroups beneath our own, named after the node),
    /// networking when enabled, the image store in `<data_dir>/images`; adopts
    /// sandboxes still running from a previous run, sweeps what dead ones left,
    /// and loads the sandbox records from `<data_dir>/sandboxes.log`.
    pub async fn open(config: DataplaneConfig) -> Result<Self, OpenDataplaneError> {
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .and_then(|()| {
                // The sandbox journal holds tenants' environments: the owner's alone.
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| OpenDataplaneError::CreateDir { path: data_dir.clone(), source })?;
        // Uploads a crash interrupted (node API imports); only files we name.
        if let Ok(entries) = std::fs::read_dir(data_dir.join("tmp")) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with("import-") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let run_dir = config.resolve_run_dir().map_err(|source| OpenDataplaneError::CreateDir {
            path: data_dir.join("run"),
            source,
        })?;
        let mut driver = Driver::new(DriverConfig {
            state_dir: data_dir.join("driver"),
            run_dir: run_dir.clone(),
            sandboxd_path: config.sandboxd_path.clone(),
            cgroup_parent: Some(config.cgroup_parent()),
        })?
        .with_netns_pool(config.netns_pool)
        .map_err(OpenDataplaneError::NetnsPool)?;
        let mut network = None;
        if config.network {
            let manager = Arc::new(hutch_net::NetManager::new(config.net_config()?).await?);
            // The server's own address, which may be public: no sandbox may
            // reach it. (The nodes' come with the server's desired states.)
            let server = server_addresses(&config.server_url).await;
            manager.block_addresses("server", &server).map_err(OpenDataplaneError::Block)?;
            driver = driver.with_network(manager.clone());
            network = Some(manager);
        }
        if config.user_namespace {
            driver.check_user_namespaces().await.map_err(OpenDataplaneError::UserNamespace)?;
        } else {
            tracing::warn!(
                "user_namespace is off: root in every sandbox is root on this host, \
                 kept in only by namespaces, capabilities and seccomp"
            );
        }
        let images = ImageStore::open(data_dir.join("images"))?;
        let adopted = driver.adopt().await?;
        let swept = driver.sweep().await?;
        tracing::info!(
            adopted = adopted.adopted.len(),
            removed = adopted.removed.len() + swept.removed.len(),
            "dataplane opened"
        );

        let (records, loaded) = record::Records::open(&data_dir)?;
        // Sandboxes the driver runs without a record (the journal was lost or
        // damaged) are left alone until the server has spoken: it adopts those it
        // still wants and the owner destroys the rest, never before.
        let orphans: Vec<SandboxId> = driver
            .list()
            .into_iter()
            .map(|info| info.id)
            .filter(|id| !loaded.iter().any(|r| &r.spec.id == id))
            .collect();
        if !orphans.is_empty() {
            tracing::warn!(
                count = orphans.len(),
                "sandboxes without a record: kept until the server says whether it wants them"
            );
        }
        let capacity = Capacity::resolve(&config.capacity, &data_dir);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let create_slots = tokio::sync::Semaphore::new(cores.max(2));
        let node = Arc::new(Node {
            driver,
            images,
            records,
            config,
            capacity,
            create_slots,
            run_dir,
            network,
        });
        let owner = Owner::new(node.clone(), loaded, orphans);
        Ok(Self { node, owner })
    }

    /// The capacity this node offers.
    pub fn capacity(&self) -> Capacity {
        self.node.capacity
    }

    /// Runs the owner task, the sync client and the proxy on `proxy` until
    /// `shutdown` resolves. Sandboxes keep running after it returns.
    pub async fn run(
        self,
        proxy: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunDataplaneError> {
        let Self { node, owner } = self;
        let snapshots = owner.snapshots();
        let (desired_tx, desired_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };

        let owner_task = tokio::spawn(owner.run(desired_rx, stopped(stop_rx.clone())));
        let sync_task = tokio::spawn(sync::run(node.clone(), snapshots.clone(), desired_tx));
        let state = Arc::new(proxy::ProxyState { node: node.clone(), snapshots });
        let proxy_task = tokio::spawn(proxy::serve(proxy, state, stopped(stop_rx)));

        shutdown.await;
        let _ = stop_tx.send(true);
        sync_task.abort();
        let _ = sync_task.await;
        let _ = proxy_task.await;
        let _ = owner_task.await;
        // Sandboxes keep running across a restart; only an empty parent goes, and
        // an empty run dir we chose ourselves (one the operator configured stays, as
        // does the parent of all derived ones, shared with other nodes).
        node.driver.cgroup_layout().release();
        if node.config.run_dir.is_none() {
            let _ = std::fs::remove_dir(&node.run_dir);
        }
        Ok(())
    }
}
