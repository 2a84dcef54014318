//! Durable state behind one trait, so that PostgreSQL can follow SQLite.
//!
//! The controller is the only writer: it keeps everything in memory and
//! writes each change through before it answers, so the store is read only
//! once, on open.

mod sqlite;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;

pub use sqlite::SqliteStore;

use crate::model::{SandboxSpec, SandboxState};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceRecord {
    pub name: String,
    pub created_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub namespace: String,
    /// Lower-case hex SHA-256 of the key.
    pub key_sha256: String,
    pub created_at_ms: i64,
}

/// A stop the server asked for: the reason the sandbox ends `terminated` with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopRequest {
    pub reason: String,
    pub grace_secs: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SandboxRecord {
    pub id: String,
    /// Creation order, unique and increasing.
    pub seq: i64,
    pub namespace: String,
    pub state: SandboxState,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub node: Option<String>,
    pub spec: SandboxSpec,
    pub tags: BTreeMap<String, String>,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub deadline_ms: i64,
    pub idle_timeout_secs: Option<u64>,
    pub stop: Option<StopRequest>,
    pub deleted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub namespace: String,
    pub key: String,
    pub body_sha256: String,
    pub sandbox_id: String,
    pub created_at_ms: i64,
}

/// Everything the controller needs to start: deleted sandboxes are left out.
#[derive(Clone, Debug, Default)]
pub struct StoredState {
    pub namespaces: Vec<NamespaceRecord>,
    pub api_keys: Vec<ApiKeyRecord>,
    pub sandboxes: Vec<SandboxRecord>,
    pub idempotency_keys: Vec<IdempotencyRecord>,
    /// The highest `seq` of any sandbox ever stored, deleted ones included.
    pub max_sandbox_seq: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot migrate the database schema")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database query failed: {what}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("stored {what} of sandbox {id} is not valid JSON")]
    Json {
        what: &'static str,
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("stored state {state:?} of sandbox {id} is unknown")]
    UnknownState { id: String, state: String },
}

/// The server's durable state. Every write is an upsert or a delete, so the
/// controller can write each change through on its own; changes it makes
/// together (placements, one node report) go in one transaction, and so does
/// deleting a namespace, which touches many records.
pub trait Store: Send + Sync + 'static {
    fn load(&self) -> impl Future<Output = Result<StoredState, StoreError>> + Send;
    fn put_namespace(
        &self,
        namespace: &NamespaceRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn put_api_key(
        &self,
        key: &ApiKeyRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn delete_api_key(&self, id: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn put_sandbox(
        &self,
        sandbox: &SandboxRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Writes all of `sandboxes` or none of them.
    fn put_sandboxes(
        &self,
        sandboxes: &[SandboxRecord],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Deletes a namespace with its API keys and idempotency keys, and
    /// writes `sandboxes` (its sandboxes, marked deleted), all at once: a
    /// crash leaves either the namespace whole or all of it gone.
    fn delete_namespace(
        &self,
        name: &str,
        sandboxes: &[SandboxRecord],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn put_idempotency_key(
        &self,
        record: &IdempotencyRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Flushes and closes the store; called once, when the controller stops.
    fn close(&self) -> impl Future<Output = ()> + Send;
    /// Forgets idempotency keys created before `created_before_ms`.
    fn expire_idempotency_keys(
        &self,
        created_before_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
