//! The SQLite store: desired state, current state and append-only history.
//!
//! The only module that names sqlx. Every write that changes a backend's
//! status also appends its `backend_events` row in the same transaction, and
//! is a compare-and-set on the previous status, so a transition is recorded
//! exactly once even when two paths (an event and a resync) learn of it.
//! Nothing here talks to Docker.

use crate::model::{
    BackendName, BackendRow, BackendState, BackendStatus, Desired, EventSource, ExecutorSpec,
    Millis, Signal, TerminationKind, TerminationReason,
};
use serde::Serialize;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

mod changes;
mod check;
mod launch;
mod loading;
pub mod metrics;
mod outbox;
mod prune;
pub mod sql;

pub use check::ReadOnlyStore;
pub use launch::{Launch, LaunchKey};
pub use outbox::{ExitRow, HistoryFollower, HistoryItem};
pub use prune::{PruneRunRow, PruneTotals, PulledImage};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create database file {path}: {source}")]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database {path} was written by a newer drover (schema version {version} is unknown to this binary); upgrade drover or use another database")]
    NewerSchema { path: PathBuf, version: i64 },
    #[error("database {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot migrate database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("corrupt row in database: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        // Disk full, read-only file, locked database: the store cannot take
        // writes now but may later. Callers answer 503 and retry.
        if let sqlx::Error::Database(db) = &error {
            let code = db.code().unwrap_or_default();
            // SQLITE_BUSY 5, SQLITE_LOCKED 6, SQLITE_READONLY 8, SQLITE_IOERR 10, SQLITE_FULL 13, SQLITE_CANTOPEN 14
            let primary = code.parse::<i32>().map(|c| c & 0xff).unwrap_or(-1);
            if matches!(primary, 5 | 6 | 8 | 10 | 13 | 14) {
                return StoreError::Unavailable(db.message().to_string());
            }
        }
        if matches!(error, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) {
            return StoreError::Unavailable(error.to_string());
        }
        StoreError::Database(error)
    }
}

/// A status transition to record, with the row fields that change with it.
#[derive(Clone, Debug)]
pub struct Transition {
    pub state: BackendState,
    pub source: EventSource,
    pub at: Millis,
    pub error: Option<String>,
    pub container_id: Option<String>,
    pub startup_deadline: Option<Millis>,
    pub kill_deadline: Option<Millis>,
    pub oom_killed: Option<bool>,
    /// Also mark termination desired (a startup timeout decides this itself).
    pub requested_termination: Option<(TerminationKind, TerminationReason)>,
}

impl Transition {
    pub fn new(state: BackendState, source: EventSource, at: Millis) -> Self {
        Self {
            state,
            source,
            at,
            error: None,
            container_id: None,
            startup_deadline: None,
            kill_deadline: None,
            oom_killed: None,
            requested_termination: None,
        }
    }
}

/// One row of `backend_events`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventRow {
    pub event_id: i64,
    pub backend_id: String,
    pub status: String,
    pub state: serde_json::Value,
    pub exit_code: Option<i32>,
    pub source: String,
    pub error: Option<String>,
    pub timestamp_ms: Millis,
}

pub enum CreateOutcome {
    Created(BackendRow),
    /// The same id with the same spec already exists.
    Existing(BackendRow),
    /// The id exists with another spec.
    Conflict(BackendRow),
}

pub enum TerminateOutcome {
    NotFound,
    AlreadyTerminated(BackendRow),
    Requested(BackendRow),
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    instance_id: String,
    /// Woken after a commit that changes desired state (a spawn, a termination
    /// request): the reconciler's "desired changed" wake-up.
    desired_changed: Arc<Notify>,
    /// Bumped after every committed history row, so readers of history (event
    /// streams, waiters) know to look again.
    history_changed: Arc<watch::Sender<u64>>,
    /// Backends whose row changed since the reconciler last took them (see
    /// `changes.rs`). std Mutex, not tokio's: never held across an await.
    changed: Arc<std::sync::Mutex<changes::ChangedBackends>>,
}

const BACKEND_COLUMNS: &str = "id, spec, desired, termination_kind, termination_reason, status, state, \
     container_id, exit_code, oom_killed, error, startup_deadline_ms, kill_deadline_ms, \
     last_signal, last_signal_at_ms, created_at_ms, updated_at_ms";

impl Store {
    /// Opens (creating if needed, mode 0600) and migrates the database.
    pub async fn open(path: &Path) -> Result<Self> {
        create_private_file(path)?;
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(StoreError::Database)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed transaction survives a process kill and a power loss.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .after_release(|conn, _| Box::pin(connection_is_reusable(conn)))
            .connect_with(options)
            .await?;
        let store = Self {
            pool,
            instance_id: String::new(),
            desired_changed: Arc::new(Notify::new()),
            history_changed: Arc::new(watch::channel(0).0),
            changed: Arc::default(),
        };
        store.migrate(path).await?;
        let instance_id = store.ensure_instance_id().await?;
        Ok(Self { instance_id, ..store })
    }

    async fn migrate(&self, path: &Path) -> Result<()> {
        match MIGRATOR.run(&self.pool).await {
            Ok(()) => Ok(()),
            Err(sqlx::migrate::MigrateError::VersionMissing(version)) => {
                Err(StoreError::NewerSchema {
                    path: path.to_path_buf(),
                    version,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn ensure_instance_id(&self) -> Result<String> {
        let fresh = format!("dr-{}", BackendName::new_random().as_str().trim_start_matches("ba-"));
        sqlx::query(
            "INSERT INTO instance (singleton, instance_id, created_at_ms) VALUES (1, ?, ?) \
             ON CONFLICT (singleton) DO NOTHING",
        )
        .bind(&fresh)
        .bind(crate::model::now_millis())
        .execute(&self.pool)
        .await?;
        let id: String = sqlx::query_scalar("SELECT instance_id FROM instance WHERE singleton = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(id)
    }

    /// The id of the drover instance this database belongs to.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Resolves after the next commit that changes desired state.
    pub fn desired_changed(&self) -> Arc<Notify> {
        self.desired_changed.clone()
    }

    /// A receiver that sees a change after every committed history row.
    pub fn subscribe_history(&self) -> watch::Receiver<u64> {
        self.history_changed.subscribe()
    }

    fn notify_history(&self) {
        self.history_changed.send_modify(|n| *n += 1);
    }

    /// Inserts a backend (with its key and static token, if any) and its
    /// `scheduled` event in one transaction; an existing id is returned as it
    /// is (same spec and launch) or as a conflict.
    pub async fn create_backend(
        &self,
        id: &BackendName,
        spec: &ExecutorSpec,
        launch: Option<&Launch>,
        now: Millis,
    ) -> Result<CreateOutcome> {
        let spec_json = serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let state = BackendState::Scheduled;
        let state_json = serde_json::to_string(&state).expect("state serializes");
        let launch = launch.cloned().unwrap_or_default();
        let key = launch.key.as_ref();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO backends (id, spec, image, desired, status, state, created_at_ms, updated_at_ms, \
             key_name, key_namespace, key_tag, fencing_token, static_token) \
             VALUES (?, ?, ?, 'running', 'scheduled', ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(&spec_json)
        .bind(&spec.image)
        .bind(&state_json)
        .bind(now)
        .bind(now)
        .bind(key.map(|k| k.name.as_str()))
        .bind(key.map(|k| k.namespace.as_str()))
        .bind(key.map(|k| k.tag.as_str()))
        .bind(key.map(|k| k.fencing_token))
        .bind(launch.static_token.as_deref())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            insert_event(&mut tx, id, &state, None, EventSource::Api, None, now).await?;
        }
        let row = fetch_backend(&mut *tx, id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("backend {id} vanished after insert")))?;
        let same_launch = inserted || launch::fetch_launch(&mut tx, id).await? == Some(launch);
        self.commit_noting(tx, id).await?;
        if inserted {
            self.desired_changed.notify_one();
            self.notify_history();
        }
        Ok(if inserted {
            CreateOutcome::Created(row)
        } else if row.spec == *spec && same_launch {
            CreateOutcome::Existing(row)
        } else {
            CreateOutcome::Conflict(row)
        })
    }

    pub async fn get_backend(&self, id: &BackendName) -> Result<Option<BackendRow>> {
        let mut conn = self.pool.acquire().await?;
        fetch_backend(&mut *conn, id).await
    }

    /// Backends, oldest first; `status` filters, `include_terminated` false hides finished ones.
    pub async fn list_backends(
        &self,
        status: Option<BackendStatus>,
        include_terminated: bool,
    ) -> Result<Vec<BackendRow>> {
        let sql = format!(
            "SELECT {BACKEND_COLUMNS} FROM backends \
             WHERE (?1 IS NULL OR status = ?1) AND (?2 OR status <> 'terminated') \
             ORDER BY created_at_ms, id"
        );
        let rows = sqlx::query(&sql)
            .bind(status.map(|s| s.as_str()))
            .bind(include_terminated)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode_backend).collect()
    }

    /// Every backend not yet terminated: the reconciler's working set.
    pub async fn live_backends(&self) -> Result<Vec<BackendRow>> {
        self.list_backends(None, false).await
    }

    /// Marks termination desired. Idempotent; a harder request overrides a softer one.
    pub async fn request_termination(
        &self,
        id: &BackendName,
        kind: TerminationKind,
        reason: TerminationReason,
        now: Millis,
    ) -> Result<TerminateOutcome> {
        // IMMEDIATE: this transaction reads, then writes. A deferred one would
        // take a read snapshot first, and its write then fails at once with
        // SQLITE_BUSY (no busy timeout applies) if the reconciler committed in
        // between.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let Some(row) = fetch_backend(&mut *tx, id).await? else {
            return Ok(TerminateOutcome::NotFound);
        };
        if row.status() == BackendStatus::Terminated {
            return Ok(TerminateOutcome::AlreadyTerminated(row));
        }
        let keep_existing = matches!(
            row.requested_termination,
            Some((TerminationKind::Hard, _))
        ) || (row.requested_termination.is_some() && kind == TerminationKind::Soft);
        if !keep_existing {
            sqlx::query(
                "UPDATE backends SET desired = 'terminated', termination_kind = ?, termination_reason = ?, \
                 updated_at_ms = ? WHERE id = ?",
            )
            .bind(kind.as_str())
            .bind(reason.as_str())
            .bind(now)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        }
        let row = fetch_backend(&mut *tx, id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("backend {id} vanished")))?;
        self.commit_noting(tx, id).await?;
        self.desired_changed.notify_one();
        Ok(TerminateOutcome::Requested(row))
    }

    /// Records a transition if the backend is still in status `from`.
    /// Returns false (and writes nothing) when it is not: someone else
    /// recorded a transition first.
    pub async fn record_transition(
        &self,
        id: &BackendName,
        from: BackendStatus,
        transition: &Transition,
    ) -> Result<bool> {
        let state = &transition.state;
        let state_json = serde_json::to_string(state).expect("state serializes");
        let exit_code = match state {
            BackendState::Terminated { exit_code, .. } => *exit_code,
            _ => None,
        };
        let (kind, reason) = match transition.requested_termination {
            Some((kind, reason)) => (Some(kind.as_str()), Some(reason.as_str())),
            None => (None, None),
        };
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE backends SET status = ?, state = ?, \
                address = COALESCE(?, address), \
                exit_code = COALESCE(?, exit_code), \
                error = COALESCE(?, error), \
                container_id = COALESCE(?, container_id), \
                startup_deadline_ms = COALESCE(?, startup_deadline_ms), \
                kill_deadline_ms = COALESCE(?, kill_deadline_ms), \
                oom_killed = COALESCE(?, oom_killed), \
                desired = CASE WHEN ? IS NULL THEN desired ELSE 'terminated' END, \
                termination_kind = COALESCE(?, termination_kind), \
                termination_reason = COALESCE(?, termination_reason), \
                updated_at_ms = ? \
             WHERE id = ? AND status = ?",
        )
        .bind(state.status().as_str())
        .bind(&state_json)
        .bind(state.address())
        .bind(exit_code)
        .bind(&transition.error)
        .bind(&transition.container_id)
        .bind(transition.startup_deadline)
        .bind(transition.kill_deadline)
        .bind(transition.oom_killed)
        .bind(kind)
        .bind(kind)
        .bind(reason)
        .bind(transition.at.max(0))
        .bind(id.as_str())
        .bind(from.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !updated {
            return Ok(false);
        }
        insert_event(
            &mut tx,
            id,
            state,
            exit_code,
            transition.source,
            transition.error.as_deref(),
            transition.at,
        )
        .await?;
        self.commit_noting(tx, id).await?;
        self.notify_history();
        Ok(true)
    }

    /// Notes that `signal` was sent to the backend's container at `at`.
    pub async fn record_signal(&self, id: &BackendName, signal: Signal, at: Millis) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE backends SET last_signal = ?, last_signal_at_ms = ? WHERE id = ?")
            .bind(signal.as_str())
            .bind(at)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        self.commit_noting(tx, id).await
    }

    /// Every transition of one backend, oldest first.
    pub async fn events_for(&self, id: &BackendName) -> Result<Vec<EventRow>> {
        self.events_query("WHERE backend_id = ? ORDER BY event_id", Some(id.as_str()))
            .await
    }

    /// Every transition after `after_event_id`, oldest first, at most `limit`.
    pub async fn events_after(&self, after_event_id: i64, limit: i64) -> Result<Vec<EventRow>> {
        let rows = sqlx::query(
            "SELECT event_id, backend_id, status, state, exit_code, source, error, timestamp_ms \
             FROM backend_events WHERE event_id > ? ORDER BY event_id LIMIT ?",
        )
        .bind(after_event_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_event).collect()
    }

    async fn events_query(&self, clause: &str, bind: Option<&str>) -> Result<Vec<EventRow>> {
        let sql = format!(
            "SELECT event_id, backend_id, status, state, exit_code, source, error, timestamp_ms \
             FROM backend_events {clause}"
        );
        let rows = sqlx::query(&sql).bind(bind).fetch_all(&self.pool).await?;
        rows.iter().map(decode_event).collect()
    }

    pub async fn get_meta(&self, key: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES (?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Opens an outage of the Docker engine unless one is open already.
    pub async fn open_docker_outage(&self, noticed_by: &str, detail: &str, at: Millis) -> Result<()> {
        sqlx::query(
            "INSERT INTO docker_outages (started_at_ms, noticed_by, detail) \
             SELECT ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM docker_outages WHERE ended_at_ms IS NULL)",
        )
        .bind(at)
        .bind(noticed_by)
        .bind(detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Closes the open outage, if any.
    pub async fn close_docker_outage(&self, at: Millis) -> Result<bool> {
        let closed = sqlx::query("UPDATE docker_outages SET ended_at_ms = ? WHERE ended_at_ms IS NULL")
            .bind(at)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(closed > 0)
    }

    /// `PRAGMA integrity_check`'s answer (`"ok"` when sound).
    pub async fn integrity_check(&self) -> Result<String> {
        let rows: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.join("\n"))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Whether a connection handed back to the pool may be used again.
///
/// When a write fails with a full disk or an I/O error, SQLite may roll the
/// whole transaction back by itself; sqlx's own `ROLLBACK` then fails and sqlx
/// goes on believing a transaction is open. Its next "transaction" on that
/// connection becomes a savepoint whose release commits nothing and keeps the
/// write lock: later spawns answer `201` and vanish, or wait on the lock. So
/// a connection that is not at transaction depth 0 once its queued rollback
/// has run is closed instead (closing rolls back whatever SQLite still holds).
async fn connection_is_reusable(conn: &mut sqlx::SqliteConnection) -> Result<bool, sqlx::Error> {
    use sqlx::{Connection, TransactionManager};
    type Manager = <sqlx::Sqlite as sqlx::Database>::TransactionManager;
    if Manager::get_transaction_depth(conn) == 0 {
        // The common case, and certain: no transaction, none being rolled back.
        return Ok(true);
    }
    // A dropped transaction queued its rollback; the worker runs commands in
    // order, so once the ping is answered the rollback has run.
    if conn.ping().await.is_err() {
        return Ok(false);
    }
    let depth = Manager::get_transaction_depth(conn);
    if depth != 0 {
        tracing::warn!(depth, "closing a database connection left inside a failed transaction");
    }
    Ok(depth == 0)
}

/// Creates the database file with mode 0600 before SQLite does, so it is
/// never readable by others, even for a moment.
fn create_private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| StoreError::CreateFile {
            path: path.to_path_buf(),
            source,
        })?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(|_| ())
        .map_err(|source| StoreError::CreateFile {
            path: path.to_path_buf(),
            source,
        })
}

async fn insert_event(
    tx: &mut sqlx::SqliteConnection,
    id: &BackendName,
    state: &BackendState,
    exit_code: Option<i32>,
    source: EventSource,
    error: Option<&str>,
    at: Millis,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO backend_events (backend_id, status, state, exit_code, source, error, timestamp_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(id.as_str())
    .bind(state.status().as_str())
    .bind(serde_json::to_string(state).expect("state serializes"))
    .bind(exit_code)
    .bind(source.as_str())
    .bind(error)
    .bind(at)
    .execute(tx)
    .await?;
    Ok(())
}

async fn fetch_backend(
    conn: &mut sqlx::SqliteConnection,
    id: &BackendName,
) -> Result<Option<BackendRow>> {
    let sql = format!("SELECT {BACKEND_COLUMNS} FROM backends WHERE id = ?");
    let row = sqlx::query(&sql)
        .bind(id.as_str())
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(decode_backend).transpose()
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {detail}"))
}

fn decode_backend(row: &SqliteRow) -> Result<BackendRow> {
    let id: String = row.try_get("id")?;
    let id = BackendName::parse(&id).map_err(|e| corrupt("backends.id", e))?;
    let spec: String = row.try_get("spec")?;
    let spec: ExecutorSpec =
        serde_json::from_str(&spec).map_err(|e| corrupt("backends.spec", e))?;
    let desired = match row.try_get::<String, _>("desired")?.as_str() {
        "running" => Desired::Running,
        _ => Desired::Terminated,
    };
    let kind: Option<String> = row.try_get("termination_kind")?;
    let reason: Option<String> = row.try_get("termination_reason")?;
    let requested_termination = match (kind, reason) {
        (Some(kind), Some(reason)) => Some((
            TerminationKind::parse(&kind).ok_or_else(|| corrupt("termination_kind", &kind))?,
            TerminationReason::parse(&reason)
                .ok_or_else(|| corrupt("termination_reason", &reason))?,
        )),
        _ => None,
    };
    let state: String = row.try_get("state")?;
    let state: BackendState =
        serde_json::from_str(&state).map_err(|e| corrupt("backends.state", e))?;
    let signal: Option<String> = row.try_get("last_signal")?;
    let signal_at: Option<i64> = row.try_get("last_signal_at_ms")?;
    let last_signal = match (signal, signal_at) {
        (Some(signal), Some(at)) => {
            Some((Signal::parse(&signal).ok_or_else(|| corrupt("last_signal", &signal))?, at))
        }
        _ => None,
    };
    Ok(BackendRow {
        id,
        spec,
        desired,
        requested_termination,
        state,
        container_id: row.try_get("container_id")?,
        exit_code: row.try_get("exit_code")?,
        oom_killed: row.try_get("oom_killed")?,
        error: row.try_get("error")?,
        startup_deadline: row.try_get("startup_deadline_ms")?,
        kill_deadline: row.try_get("kill_deadline_ms")?,
        last_signal,
        created_at: row.try_get("created_at_ms")?,
        updated_at: row.try_get("updated_at_ms")?,
    })
}

fn decode_event(row: &SqliteRow) -> Result<EventRow> {
    let state: String = row.try_get("state")?;
    Ok(EventRow {
        event_id: row.try_get("event_id")?,
        backend_id: row.try_get("backend_id")?,
        status: row.try_get("status")?,
        state: serde_json::from_str(&state).map_err(|e| corrupt("backend_events.state", e))?,
        exit_code: row.try_get("exit_code")?,
        source: row.try_get("source")?,
        error: row.try_get("error")?,
        timestamp_ms: row.try_get("timestamp_ms")?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::TerminationReason;

    /// A store on a fresh database in a temp dir, for the store's unit tests.
    pub(crate) async fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).await.unwrap();
        (dir, store)
    }

    fn spec(image: &str) -> ExecutorSpec {
        ExecutorSpec::from_json(serde_json::json!({ "image": image })).unwrap()
    }

    #[tokio::test]
    async fn database_file_is_private_and_keeps_its_instance_id() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("d.db");
        let first = Store::open(&path).await.unwrap();
        let id = first.instance_id().to_string();
        assert!(id.starts_with("dr-"));
        first.close().await;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Store::open(&path).await.unwrap();
        assert_eq!(again.instance_id(), id);
    }

    #[tokio::test]
    async fn create_is_idempotent_and_conflicts_on_other_spec() {
        let (_dir, store) = temp_store().await;
        let id = BackendName::parse("ba-one").unwrap();
        assert!(matches!(
            store.create_backend(&id, &spec("a"), None, 1).await.unwrap(),
            CreateOutcome::Created(_)
        ));
        assert!(matches!(
            store.create_backend(&id, &spec("a"), None, 2).await.unwrap(),
            CreateOutcome::Existing(_)
        ));
        assert!(matches!(
            store.create_backend(&id, &spec("b"), None, 3).await.unwrap(),
            CreateOutcome::Conflict(_)
        ));
        let events = store.events_for(&id).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].status, "scheduled");
    }

    #[tokio::test]
    async fn transition_is_compare_and_set_on_status() {
        let (_dir, store) = temp_store().await;
        let id = BackendName::parse("ba-two").unwrap();
        store.create_backend(&id, &spec("a"), None, 1).await.unwrap();
        let loading = Transition::new(BackendState::Loading, EventSource::Reconciler, 2);
        assert!(store
            .record_transition(&id, BackendStatus::Scheduled, &loading)
            .await
            .unwrap());
        assert!(!store
            .record_transition(&id, BackendStatus::Scheduled, &loading)
            .await
            .unwrap());
        let events = store.events_for(&id).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.status.as_str()).collect::<Vec<_>>(),
            ["scheduled", "loading"]
        );
    }

    #[tokio::test]
    async fn history_is_append_only_and_one_terminated_per_backend() {
        let (_dir, store) = temp_store().await;
        let id = BackendName::parse("ba-three").unwrap();
        store.create_backend(&id, &spec("a"), None, 1).await.unwrap();
        let err = sqlx::query("DELETE FROM backend_events")
            .execute(store.pool())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
        let terminated = BackendState::Scheduled.to_terminated(
            Some((TerminationKind::Soft, TerminationReason::External)),
            None,
        );
        let t = Transition::new(terminated, EventSource::Reconciler, 5);
        assert!(store
            .record_transition(&id, BackendStatus::Scheduled, &t)
            .await
            .unwrap());
        // Even bypassing the status check, a second terminated row is refused.
        let again = sqlx::query(
            "INSERT INTO backend_events (backend_id, status, state, source, timestamp_ms) \
             VALUES ('ba-three', 'terminated', '{}', 'inspect', 6)",
        )
        .execute(store.pool())
        .await;
        assert!(again.is_err());
    }

    #[tokio::test]
    async fn termination_request_keeps_hard_over_soft() {
        let (_dir, store) = temp_store().await;
        let id = BackendName::parse("ba-four").unwrap();
        store.create_backend(&id, &spec("a"), None, 1).await.unwrap();
        let missing = BackendName::parse("ba-nope").unwrap();
        assert!(matches!(
            store
                .request_termination(&missing, TerminationKind::Soft, TerminationReason::External, 2)
                .await
                .unwrap(),
            TerminateOutcome::NotFound
        ));
        store
            .request_termination(&id, TerminationKind::Hard, TerminationReason::Swept, 2)
            .await
            .unwrap();
        let TerminateOutcome::Requested(row) = store
            .request_termination(&id, TerminationKind::Soft, TerminationReason::External, 3)
            .await
            .unwrap()
        else {
            panic!("expected requested");
        };
        assert_eq!(row.desired, Desired::Terminated);
        assert_eq!(
            row.requested_termination,
            Some((TerminationKind::Hard, TerminationReason::Swept))
        );
    }
}
