//! The SQLite store: one file, `<data_dir>/hutch.db`, in WAL mode.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, SqlSafeStr};

use super::{
    ApiKeyRecord, IdempotencyRecord, NamespaceRecord, SandboxRecord, StopRequest, Store,
    StoreError, StoredState,
};
use crate::model::SandboxState;
use crate::time::now_ms;

/// The schema's migrations, compiled in so the binary needs no files beside it.
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "initial", include_str!("../../migrations/0001_initial.sql"))];

#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        // NORMAL is durable against a process crash in WAL mode; only an OS
        // crash or power loss can lose the last commits, and saves an fsync
        // on every sandbox change.
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        // One connection: the controller is the only writer and writes one
        // change at a time.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open { path: path.to_owned(), source })?;
        let migrations = MIGRATIONS
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect();
        Migrator::with_migrations(migrations).run(&pool).await?;
        Ok(SqliteStore { pool })
    }
}

fn query_error(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

fn sandbox_from_row(row: &SqliteRow) -> Result<SandboxRecord, StoreError> {
    let get = |source| StoreError::Query { what: "read sandbox row", source };
    let id: String = row.try_get("id").map_err(get)?;
    let state: String = row.try_get("state").map_err(get)?;
    let spec: String = row.try_get("spec").map_err(get)?;
    let tags: String = row.try_get("tags").map_err(get)?;
    let stop_reason: Option<String> = row.try_get("stop_reason").map_err(get)?;
    let stop_grace_secs: Option<i64> = row.try_get("stop_grace_secs").map_err(get)?;
    let idle_timeout_secs: Option<i64> = row.try_get("idle_timeout_secs").map_err(get)?;
    let Some(state) = SandboxState::parse(&state) else {
        return Err(StoreError::UnknownState { id, state });
    };
    let spec = serde_json::from_str(&spec).map_err(|source| StoreError::Json {
        what: "spec",
        id: id.clone(),
        source,
    })?;
    let tags: BTreeMap<String, String> = serde_json::from_str(&tags)
        .map_err(|source| StoreError::Json { what: "tags", id: id.clone(), source })?;
    Ok(SandboxRecord {
        seq: row.try_get("seq").map_err(get)?,
        namespace: row.try_get("namespace").map_err(get)?,
        state,
        reason: row.try_get("reason").map_err(get)?,
        exit_code: row.try_get("exit_code").map_err(get)?,
        node: row.try_get("node").map_err(get)?,
        spec,
        tags,
        created_at_ms: row.try_get("created_at").map_err(get)?,
        started_at_ms: row.try_get("started_at").map_err(get)?,
        finished_at_ms: row.try_get("finished_at").map_err(get)?,
        deadline_ms: row.try_get("deadline").map_err(get)?,
        idle_timeout_secs: idle_timeout_secs.and_then(|secs| u64::try_from(secs).ok()),
        stop: stop_reason.map(|reason| StopRequest {
            reason,
            grace_secs: stop_grace_secs.and_then(|g| u32::try_from(g).ok()).unwrap_or(0),
        }),
        deleted: row.try_get::<i64, _>("deleted").map_err(get)? != 0,
        id,
    })
}

/// Upserts one sandbox row, in the pool or inside a transaction.
async fn put_sandbox<'e, E>(executor: E, sandbox: &SandboxRecord) -> Result<(), StoreError>
where
    E: sqlx::SqliteExecutor<'e>,
{
    let spec = serde_json::to_string(&sandbox.spec).map_err(|source| StoreError::Json {
        what: "spec",
        id: sandbox.id.clone(),
        source,
    })?;
    let tags = serde_json::to_string(&sandbox.tags).map_err(|source| StoreError::Json {
        what: "tags",
        id: sandbox.id.clone(),
        source,
    })?;
    sqlx::query(
        "INSERT OR REPLACE INTO sandboxes (id, seq, namespace, state, reason, exit_code, node, \
         spec, tags, created_at, started_at, finished_at, deadline, idle_timeout_secs, \
         stop_reason, stop_grace_secs, deleted, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&sandbox.id)
    .bind(sandbox.seq)
    .bind(&sandbox.namespace)
    .bind(sandbox.state.as_str())
    .bind(&sandbox.reason)
    .bind(sandbox.exit_code)
    .bind(&sandbox.node)
    .bind(spec)
    .bind(tags)
    .bind(sandbox.created_at_ms)
    .bind(sandbox.started_at_ms)
    .bind(sandbox.finished_at_ms)
    .bind(sandbox.deadline_ms)
    .bind(sandbox.idle_timeout_secs.and_then(|secs| i64::try_from(secs).ok()))
    .bind(sandbox.stop.as_ref().map(|stop| stop.reason.clone()))
    .bind(sandbox.stop.as_ref().map(|stop| i64::from(stop.grace_secs)))
    .bind(i64::from(sandbox.deleted))
    .bind(now_ms())
    .execute(executor)
    .await
    .map_err(query_error("put sandbox"))?;
    Ok(())
}

impl Store for SqliteStore {
    async fn close(&self) {
        self.pool.close().await;
    }

    async fn load(&self) -> Result<StoredState, StoreError> {
        let namespaces = sqlx::query("SELECT name, created_at FROM namespaces ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("load namespaces"))?
            .iter()
            .map(|row| {
                Ok(NamespaceRecord {
                    name: row.try_get("name")?,
                    created_at_ms: row.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(query_error("read namespace row"))?;
        let api_keys =
            sqlx::query("SELECT id, namespace, key_sha256, created_at FROM api_keys ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .map_err(query_error("load api keys"))?
                .iter()
                .map(|row| {
                    Ok(ApiKeyRecord {
                        id: row.try_get("id")?,
                        namespace: row.try_get("namespace")?,
                        key_sha256: row.try_get("key_sha256")?,
                        created_at_ms: row.try_get("created_at")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(query_error("read api key row"))?;
        let sandboxes = sqlx::query(
            "SELECT * FROM sandboxes WHERE deleted = 0 OR state NOT IN \
             ('completed', 'failed', 'terminated') ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("load sandboxes"))?
        .iter()
        .map(sandbox_from_row)
        .collect::<Result<_, _>>()?;
        let idempotency_keys = sqlx::query(
            "SELECT namespace, key, body_sha256, sandbox_id, created_at FROM idempotency_keys",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("load idempotency keys"))?
        .iter()
        .map(|row| {
            Ok(IdempotencyRecord {
                namespace: row.try_get("namespace")?,
                key: row.try_get("key")?,
                body_sha256: row.try_get("body_sha256")?,
                sandbox_id: row.try_get("sandbox_id")?,
                created_at_ms: row.try_get("created_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(query_error("read idempotency key row"))?;
        let max_sandbox_seq: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM sandboxes")
                .fetch_one(&self.pool)
                .await
                .map_err(query_error("read the highest sandbox seq"))?;
        Ok(StoredState { namespaces, api_keys, sandboxes, idempotency_keys, max_sandbox_seq })
    }

    async fn put_namespace(&self, namespace: &NamespaceRecord) -> Result<(), StoreError> {
        sqlx::query("INSERT OR REPLACE INTO namespaces (name, created_at) VALUES (?, ?)")
            .bind(&namespace.name)
            .bind(namespace.created_at_ms)
            .execute(&self.pool)
            .await
            .map_err(query_error("put namespace"))?;
        Ok(())
    }

    async fn put_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR REPLACE INTO api_keys (id, namespace, key_sha256, created_at) \
             VALUES (?, ?, ?, ?)",
        )
        .bind(&key.id)
        .bind(&key.namespace)
        .bind(&key.key_sha256)
        .bind(key.created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(query_error("put api key"))?;
        Ok(())
    }

    async fn delete_api_key(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM api_keys WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_error("delete api key"))?;
        Ok(())
    }

    async fn put_sandbox(&self, sandbox: &SandboxRecord) -> Result<(), StoreError> {
        put_sandbox(&self.pool, sandbox).await
    }

    async fn put_sandboxes(&self, sandboxes: &[SandboxRecord]) -> Result<(), StoreError> {
        if let [sandbox] = sandboxes {
            return put_sandbox(&self.pool, sandbox).await;
        }
        let mut tx = self.pool.begin().await.map_err(query_error("begin sandbox writes"))?;
        for sandbox in sandboxes {
            put_sandbox(&mut *tx, sandbox).await?;
        }
        tx.commit().await.map_err(query_error("commit sandbox writes"))?;
        Ok(())
    }

    async fn delete_namespace(
        &self,
        name: &str,
        sandboxes: &[SandboxRecord],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(query_error("begin namespace delete"))?;
        for sandbox in sandboxes {
            put_sandbox(&mut *tx, sandbox).await?;
        }
        // Keys first: they reference the namespace.
        for (what, sql) in [
            ("delete the namespace's api keys", "DELETE FROM api_keys WHERE namespace = ?"),
            (
                "delete the namespace's idempotency keys",
                "DELETE FROM idempotency_keys WHERE namespace = ?",
            ),
            ("delete namespace", "DELETE FROM namespaces WHERE name = ?"),
        ] {
            sqlx::query(sql).bind(name).execute(&mut *tx).await.map_err(query_error(what))?;
        }
        tx.commit().await.map_err(query_error("commit namespace delete"))?;
        Ok(())
    }

    async fn put_idempotency_key(&self, record: &IdempotencyRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR REPLACE INTO idempotency_keys \
             (namespace, key, body_sha256, sandbox_id, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&record.namespace)
        .bind(&record.key)
        .bind(&record.body_sha256)
        .bind(&record.sandbox_id)
        .bind(record.created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(query_error("put idempotency key"))?;
        Ok(())
    }

    async fn expire_idempotency_keys(&self, created_before_ms: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE created_at < ?")
            .bind(created_before_ms)
            .execute(&self.pool)
            .await
            .map_err(query_error("expire idempotency keys"))?;
        Ok(())
    }
}
