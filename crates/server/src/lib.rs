//! The Hutch control plane: the REST API users call, the gRPC service
//! dataplanes sync with, and the one controller task between them that
//! owns all state (namespaces, keys, sandboxes, nodes) and writes it
//! through to a [`Store`] (SQLite in `<data_dir>/hutch.db`).
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let server = hutch_server::Server::open(hutch_server::ServerConfig::new("/var/lib/hutch")).await?;
//! let api = tokio::net::TcpListener::bind("127.0.0.1:8900").await?;
//! let grpc = tokio::net::TcpListener::bind("127.0.0.1:8901").await?;
//! server.run(api, grpc, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

mod controller;
mod grpc;
mod http;
mod keys;
pub mod model;
mod scheduler;
mod store;
mod time;
mod validate;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::grpc::NODE_ID_METADATA;
pub use crate::http::{ApiError, MAX_JSON_BODY};
pub use crate::keys::SecretFileError;
pub use crate::store::{
    ApiKeyRecord, IdempotencyRecord, NamespaceRecord, SandboxRecord, SqliteStore, StopRequest,
    Store, StoreError, StoredState,
};
pub use crate::validate::{InvalidField, validate_create};

use crate::controller::{Controller, ControllerConfig};
use crate::http::{AppState, RequestCounters};

/// How long shutdown waits for open connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Server settings. Every field has a default, so a YAML file may name only
/// what it changes.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Holds `hutch.db`, `admin.key` and `node.key`.
    pub data_dir: PathBuf,
    /// The token dataplanes authenticate with. `None`: read
    /// `<data_dir>/node.key`, creating it on first open.
    pub node_token: Option<String>,
    /// How often dataplanes should report (sent to them on Register).
    pub heartbeat_interval_ms: u64,
    /// A node silent this long is lost; its sandboxes fail with `node_lost`.
    pub node_timeout_ms: u64,
    /// How long a finished sandbox stays on its node (logs stay readable).
    pub retention_secs: u64,
    /// How long a finished sandbox stays visible in the API (then it is
    /// forgotten as if deleted).
    pub history_secs: u64,
    /// Period of the timer that enforces deadlines, idle timeouts, node loss
    /// and retention.
    pub tick_ms: u64,
    /// How long a daemon request waits for a pending or creating sandbox.
    pub daemon_wait_secs: u64,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig { data_dir: data_dir.into(), ..ServerConfig::default() }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("/var/lib/hutch"),
            node_token: None,
            heartbeat_interval_ms: 2000,
            node_timeout_ms: 15_000,
            retention_secs: 60,
            history_secs: 86_400,
            tick_ms: 250,
            daemon_wait_secs: 60,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenServerError {
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read or create a key file")]
    Secret(#[from] SecretFileError),
    #[error("cannot open the store")]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunServerError {
    #[error("the REST API server failed")]
    Api(#[source] std::io::Error),
    #[error("the gRPC server failed")]
    Grpc(#[source] tonic::transport::Error),
}

/// An opened server: state loaded, controller running, not yet listening.
#[derive(Debug)]
pub struct Server {
    data_dir: PathBuf,
    admin_key: Arc<str>,
    node_token: Arc<str>,
    state: AppState,
    /// Stops the REST and gRPC servers and everything streaming from them.
    serving: CancellationToken,
    /// Stops the controller once serving has ended (or the server is dropped).
    controller_stop: CancellationToken,
    controller_task: Option<JoinHandle<()>>,
}

impl Server {
    /// Opens the data dir: reads or creates `admin.key` and `node.key`
    /// (mode 0600), opens and migrates `hutch.db`, loads the state and
    /// starts the controller.
    pub async fn open(config: ServerConfig) -> Result<Server, OpenServerError> {
        create_data_dir(&config.data_dir)?;
        private_database(&config.data_dir)?;
        let store = SqliteStore::open(&config.data_dir.join("hutch.db")).await?;
        Server::open_with_store(config, store).await
    }

    /// Like [`Server::open`], with another store (the key files still live
    /// in `data_dir`).
    pub async fn open_with_store<S: Store>(
        config: ServerConfig,
        store: S,
    ) -> Result<Server, OpenServerError> {
        let data_dir = config.data_dir.clone();
        create_data_dir(&data_dir)?;
        let admin_key: Arc<str> = keys::read_or_create_secret(&data_dir.join("admin.key"))?.into();
        let node_token: Arc<str> = match &config.node_token {
            Some(token) => token.as_str().into(),
            None => keys::read_or_create_secret(&data_dir.join("node.key"))?.into(),
        };
        let controller_config = ControllerConfig {
            heartbeat_interval: Duration::from_millis(config.heartbeat_interval_ms),
            node_timeout: Duration::from_millis(config.node_timeout_ms),
            retention: Duration::from_secs(config.retention_secs),
            history: Duration::from_secs(config.history_secs),
            tick: Duration::from_millis(config.tick_ms.max(1)),
        };
        let (controller, handle, commands) = Controller::load(store, controller_config).await?;
        let controller_stop = CancellationToken::new();
        let controller_task = tokio::spawn(controller.run(commands, controller_stop.clone()));
        let serving = CancellationToken::new();
        let state = AppState {
            controller: handle,
            admin_key: admin_key.clone(),
            node_token: node_token.clone(),
            daemon_wait: Duration::from_secs(config.daemon_wait_secs),
            shutdown: serving.clone(),
            requests: Arc::new(RequestCounters::default()),
        };
        Ok(Server {
            data_dir,
            admin_key,
            node_token,
            state,
            serving,
            controller_stop,
            controller_task: Some(controller_task),
        })
    }

    /// The admin key (also in `<data_dir>/admin.key`).
    pub fn admin_key(&self) -> &str {
        &self.admin_key
    }

    /// The token dataplanes must present (`<data_dir>/node.key` unless
    /// configured).
    pub fn node_token(&self) -> &str {
        &self.node_token
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The REST API, for embedding in another server.
    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    /// Serves the REST API on `api` and the gRPC node service on `grpc`
    /// until `shutdown` resolves, then drains both, stops the controller
    /// and closes the store.
    pub async fn run(
        mut self,
        api: TcpListener,
        grpc: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunServerError> {
        let serving = self.serving.clone();
        let trigger = serving.clone();
        tokio::spawn(async move {
            shutdown.await;
            trigger.cancel();
        });
        let api_server = {
            use axum::serve::ListenerExt;
            // Exec round trips are small messages; do not let Nagle delay them.
            let listener = api.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, self.router())
                .with_graceful_shutdown(serving.clone().cancelled_owned())
        };
        let grpc_server = tonic::transport::Server::builder()
            .add_service(grpc::service(
                self.state.controller.clone(),
                self.node_token.clone(),
                serving.clone(),
            ))
            .serve_with_incoming_shutdown(
                // tcp_nodelay above applies only to listeners tonic binds
                // itself; without it small desired states wait out Nagle
                // and the node's delayed ACK (40 ms).
                tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::TcpListenerStream::new(grpc),
                    |stream| {
                        if let Ok(stream) = &stream {
                            let _ = stream.set_nodelay(true);
                        }
                        stream
                    },
                ),
                serving.clone().cancelled_owned(),
            );
        let api_task = async { api_server.await.map_err(RunServerError::Api) };
        let grpc_task = async { grpc_server.await.map_err(RunServerError::Grpc) };
        // Forwarded streams (logs, attach) can outlive any grace period;
        // after DRAIN_TIMEOUT they are cut rather than holding shutdown up.
        let drain_limit = async {
            serving.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        };
        let result = tokio::select! {
            result = async { tokio::try_join!(api_task, grpc_task) } => result,
            () = drain_limit => {
                tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
                Ok(((), ()))
            }
        };
        // One failing server takes the other down with it.
        serving.cancel();
        self.stop_controller().await;
        result.map(|_| ())
    }

    async fn stop_controller(&mut self) {
        self.controller_stop.cancel();
        if let Some(task) = self.controller_task.take()
            && let Err(error) = task.await
        {
            tracing::error!(%error, "controller task failed");
        }
    }
}

fn data_dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> OpenServerError {
    let path = path.to_owned();
    move |source| OpenServerError::DataDir { path, source }
}

/// Creates the data dir, the owner's alone: it holds the keys and the database,
/// which holds tenants' environments.
fn create_data_dir(path: &Path) -> Result<(), OpenServerError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(path).map_err(data_dir_error(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(data_dir_error(path))
}

/// Makes the SQLite database files the owner's alone, whatever the umask.
fn private_database(path: &Path) -> Result<(), OpenServerError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let error = data_dir_error;
    // SQLite gives its -wal and -shm files the database file's mode, so a
    // database created 0600 here keeps all three private.
    let db = path.join("hutch.db");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&db)
        .map_err(error(&db))?;
    for name in ["hutch.db", "hutch.db-wal", "hutch.db-shm"] {
        let file = path.join(name);
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(error(&file)(e)),
            _ => {}
        }
    }
    Ok(())
}

impl Drop for Server {
    fn drop(&mut self) {
        self.serving.cancel();
        self.controller_stop.cancel();
    }
}
