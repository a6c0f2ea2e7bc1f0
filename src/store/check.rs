//! A read-only view of a drover database, for `drover check`.
//!
//! It never migrates and never writes, so it is safe to point at the database
//! of a running daemon (of any version that shares the schema) and at a copy
//! taken after a crash. It reads whole tables at once: `drover check` compares
//! them with Docker in memory.

use super::{decode_backend, Result, StoreError, BACKEND_COLUMNS};
use crate::model::BackendRow;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A drover database opened read-only.
pub struct ReadOnlyStore {
    pool: SqlitePool,
    instance_id: String,
}

impl ReadOnlyStore {
    /// Opens an existing database read-only; a missing file is an error, not
    /// a new empty database.
    pub async fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .read_only(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        let instance_id: Option<String> =
            sqlx::query_scalar("SELECT instance_id FROM instance WHERE singleton = 1")
                .fetch_optional(&pool)
                .await?;
        let instance_id = instance_id.ok_or_else(|| {
            StoreError::Corrupt(format!("{}: no instance id", PathBuf::from(path).display()))
        })?;
        Ok(Self { pool, instance_id })
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Every backend, terminated ones included, oldest first.
    pub async fn all_backends(&self) -> Result<Vec<BackendRow>> {
        let sql = format!("SELECT {BACKEND_COLUMNS} FROM backends ORDER BY created_at_ms, id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(decode_backend).collect()
    }

    /// The statuses of every backend's history rows, oldest first, by backend id.
    pub async fn history_statuses(&self) -> Result<HashMap<String, Vec<String>>> {
        let rows = sqlx::query("SELECT backend_id, status FROM backend_events ORDER BY event_id")
            .fetch_all(&self.pool)
            .await?;
        let mut histories: HashMap<String, Vec<String>> = HashMap::new();
        for row in rows {
            let backend: String = row.try_get("backend_id")?;
            let status: String = row.try_get("status")?;
            histories.entry(backend).or_default().push(status);
        }
        Ok(histories)
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
