//! The prune journal (`prune_runs`) and the ledger of images drover pulled
//! (`pulled_images`).
//!
//! Only SQL lives here: which containers and images may go is decided by
//! [`crate::prune`], from what these queries answer. Nothing here talks to
//! Docker.

use super::{Result, Store};
use crate::model::{BackendName, Millis};
use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use std::collections::HashMap;

/// One row of `prune_runs`. Times are milliseconds since the epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PruneRunRow {
    pub run_id: i64,
    pub started_at: Millis,
    /// `None` while the pass runs, or if the daemon died during it.
    pub finished_at: Option<Millis>,
    pub triggered_by: String,
    pub containers_removed: i64,
    pub images_removed: i64,
    pub bytes_reclaimed: i64,
    pub error: Option<String>,
}

/// What a finished pass did, to complete its row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneTotals {
    pub containers_removed: i64,
    pub images_removed: i64,
    pub bytes_reclaimed: i64,
    pub error: Option<String>,
}

/// One row of `pulled_images`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PulledImage {
    pub image: String,
    pub digest: Option<String>,
    pub first_pulled_at_ms: Millis,
    pub last_used_at_ms: Millis,
}

const PRUNE_RUN_COLUMNS: &str = "run_id, started_at, finished_at, triggered_by, \
     containers_removed, images_removed, bytes_reclaimed, error";

const PULLED_IMAGE_COLUMNS: &str = "image, digest, first_pulled_at_ms, last_used_at_ms";

/// SQLite's default limit on bound parameters is far above this; chunks keep
/// each statement small.
const IDS_PER_QUERY: usize = 500;

impl Store {
    /// Appends a prune run that starts now; complete it with [`Store::finish_prune_run`].
    pub async fn begin_prune_run(&self, triggered_by: &str, at: Millis) -> Result<i64> {
        let run_id = sqlx::query("INSERT INTO prune_runs (started_at, triggered_by) VALUES (?, ?)")
            .bind(at)
            .bind(triggered_by)
            .execute(&self.pool)
            .await?
            .last_insert_rowid();
        Ok(run_id)
    }

    /// Records what a prune run did and when it ended; returns the full row.
    pub async fn finish_prune_run(
        &self,
        run_id: i64,
        totals: &PruneTotals,
        at: Millis,
    ) -> Result<PruneRunRow> {
        let sql = format!(
            "UPDATE prune_runs SET finished_at = ?, containers_removed = ?, images_removed = ?, \
             bytes_reclaimed = ?, error = ? WHERE run_id = ? RETURNING {PRUNE_RUN_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(at)
            .bind(totals.containers_removed)
            .bind(totals.images_removed)
            .bind(totals.bytes_reclaimed)
            .bind(&totals.error)
            .bind(run_id)
            .fetch_one(&self.pool)
            .await?;
        decode_prune_run(&row)
    }

    /// Prune runs, newest first, at most `limit`.
    pub async fn prune_runs(&self, limit: i64) -> Result<Vec<PruneRunRow>> {
        let sql = format!(
            "SELECT {PRUNE_RUN_COLUMNS} FROM prune_runs ORDER BY run_id DESC LIMIT ?"
        );
        let rows = sqlx::query(&sql).bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(decode_prune_run).collect()
    }

    /// For those of `backends` whose end is recorded (status `terminated`,
    /// with its `terminated` history row), the time of that end: the
    /// container's exit time when Docker reported the exit. Backends not in
    /// the answer are live (or unknown) and their containers must be left alone.
    pub async fn recorded_ends(&self, backends: &[BackendName]) -> Result<HashMap<BackendName, Millis>> {
        let mut ends = HashMap::new();
        for chunk in backends.chunks(IDS_PER_QUERY) {
            let placeholders = vec!["?"; chunk.len()].join(", ");
            let sql = format!(
                "SELECT b.id, e.timestamp_ms FROM backends b \
                 JOIN backend_events e ON e.backend_id = b.id AND e.status = 'terminated' \
                 WHERE b.status = 'terminated' AND b.id IN ({placeholders})"
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id.as_str());
            }
            for row in query.fetch_all(&self.pool).await? {
                let id: String = row.try_get("id")?;
                let at: Millis = row.try_get("timestamp_ms")?;
                if let Ok(id) = BackendName::parse(&id) {
                    ends.insert(id, at);
                }
            }
        }
        Ok(ends)
    }

    /// Notes that drover pulled `image` (which names image `digest`) at `at`.
    pub async fn record_pulled_image(&self, image: &str, digest: Option<&str>, at: Millis) -> Result<()> {
        sqlx::query(
            "INSERT INTO pulled_images (image, digest, first_pulled_at_ms, last_used_at_ms) \
             VALUES (?, ?, ?, ?) \
             ON CONFLICT (image) DO UPDATE SET digest = COALESCE(excluded.digest, digest), \
                last_used_at_ms = MAX(last_used_at_ms, excluded.last_used_at_ms)",
        )
        .bind(image)
        .bind(digest)
        .bind(at)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Notes that a backend uses `image` at `at`; nothing when drover did not pull it.
    pub async fn touch_pulled_image(&self, image: &str, at: Millis) -> Result<()> {
        sqlx::query(
            "UPDATE pulled_images SET last_used_at_ms = ? WHERE image = ? AND last_used_at_ms < ?",
        )
        .bind(at)
        .bind(image)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn pulled_image(&self, image: &str) -> Result<Option<PulledImage>> {
        let sql = format!("SELECT {PULLED_IMAGE_COLUMNS} FROM pulled_images WHERE image = ?");
        let row = sqlx::query(&sql).bind(image).fetch_optional(&self.pool).await?;
        row.as_ref().map(decode_pulled_image).transpose()
    }

    /// Images drover pulled that no live backend names and that no backend has
    /// used since `unused_since` (a backend uses its image until it ends).
    pub async fn idle_pulled_images(&self, unused_since: Millis) -> Result<Vec<PulledImage>> {
        let sql = format!(
            "SELECT {PULLED_IMAGE_COLUMNS} FROM pulled_images p \
             WHERE NOT EXISTS (SELECT 1 FROM backends b WHERE b.image = p.image AND b.status <> 'terminated') \
               AND MAX(p.last_used_at_ms, \
                       COALESCE((SELECT MAX(b.updated_at_ms) FROM backends b WHERE b.image = p.image), 0)) \
                   <= ? \
             ORDER BY p.image"
        );
        let rows = sqlx::query(&sql).bind(unused_since).fetch_all(&self.pool).await?;
        rows.iter().map(decode_pulled_image).collect()
    }

    /// Whether a backend not yet terminated names `image`.
    pub async fn image_in_live_use(&self, image: &str) -> Result<bool> {
        let live: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM backends WHERE image = ? AND status <> 'terminated')",
        )
        .bind(image)
        .fetch_one(&self.pool)
        .await?;
        Ok(live)
    }

    /// Takes `image` off the ledger unconditionally (it is gone, or it now
    /// names an image drover did not pull).
    pub async fn forget_pulled_image(&self, image: &str) -> Result<()> {
        sqlx::query("DELETE FROM pulled_images WHERE image = ?")
            .bind(image)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn decode_prune_run(row: &SqliteRow) -> Result<PruneRunRow> {
    Ok(PruneRunRow {
        run_id: row.try_get("run_id")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        triggered_by: row.try_get("triggered_by")?,
        containers_removed: row.try_get("containers_removed")?,
        images_removed: row.try_get("images_removed")?,
        bytes_reclaimed: row.try_get("bytes_reclaimed")?,
        error: row.try_get("error")?,
    })
}

fn decode_pulled_image(row: &SqliteRow) -> Result<PulledImage> {
    Ok(PulledImage {
        image: row.try_get("image")?,
        digest: row.try_get("digest")?,
        first_pulled_at_ms: row.try_get("first_pulled_at_ms")?,
        last_used_at_ms: row.try_get("last_used_at_ms")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendState, EventSource, ExecutorSpec, TerminationKind, TerminationReason};
    use crate::store::Transition;

    use crate::store::tests::temp_store;

    async fn backend(store: &Store, id: &str, image: &str, at: Millis) -> BackendName {
        let id = BackendName::parse(id).unwrap();
        let spec = ExecutorSpec::from_json(serde_json::json!({ "image": image })).unwrap();
        store.create_backend(&id, &spec, None, at).await.unwrap();
        id
    }

    async fn terminate(store: &Store, id: &BackendName, at: Millis) {
        let state = BackendState::Scheduled.to_terminated(
            Some((TerminationKind::Hard, TerminationReason::External)),
            Some(137),
        );
        let transition = Transition::new(state, EventSource::Inspect, at);
        assert!(store
            .record_transition(id, crate::model::BackendStatus::Scheduled, &transition)
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn prune_run_rows_are_appended_then_completed() {
        let (_dir, store) = temp_store().await;
        let run = store.begin_prune_run("api", 100).await.unwrap();
        let open = store.prune_runs(10).await.unwrap();
        assert_eq!(open[0].finished_at, None);
        let totals = PruneTotals {
            containers_removed: 2,
            images_removed: 1,
            bytes_reclaimed: 4096,
            error: None,
        };
        let row = store.finish_prune_run(run, &totals, 150).await.unwrap();
        assert_eq!(
            row,
            PruneRunRow {
                run_id: run,
                started_at: 100,
                finished_at: Some(150),
                triggered_by: "api".into(),
                containers_removed: 2,
                images_removed: 1,
                bytes_reclaimed: 4096,
                error: None,
            }
        );
        let second = store.begin_prune_run("interval", 200).await.unwrap();
        let runs = store.prune_runs(10).await.unwrap();
        assert_eq!(runs.iter().map(|r| r.run_id).collect::<Vec<_>>(), [second, run]);
    }

    #[tokio::test]
    async fn only_terminated_backends_have_a_recorded_end() {
        let (_dir, store) = temp_store().await;
        let live = backend(&store, "ba-live", "img", 1).await;
        let done = backend(&store, "ba-done", "img", 1).await;
        terminate(&store, &done, 42).await;
        let unknown = BackendName::parse("ba-unknown").unwrap();
        let ends = store.recorded_ends(&[live, done.clone(), unknown]).await.unwrap();
        assert_eq!(ends, HashMap::from([(done, 42)]));
    }

    #[tokio::test]
    async fn pulled_images_are_idle_only_when_no_backend_used_them_lately() {
        let (_dir, store) = temp_store().await;
        store.record_pulled_image("reg/a:1", Some("sha256:a"), 10).await.unwrap();
        store.record_pulled_image("reg/b:1", Some("sha256:b"), 10).await.unwrap();
        // Touching an image drover did not pull writes nothing.
        store.touch_pulled_image("someone/else:1", 50).await.unwrap();
        assert_eq!(store.pulled_image("someone/else:1").await.unwrap(), None);
        store.touch_pulled_image("reg/a:1", 20).await.unwrap();
        let a = store.pulled_image("reg/a:1").await.unwrap().unwrap();
        assert_eq!((a.first_pulled_at_ms, a.last_used_at_ms), (10, 20));

        // b is named by a live backend: never idle.
        backend(&store, "ba-uses-b", "reg/b:1", 30).await;
        let idle = store.idle_pulled_images(1_000).await.unwrap();
        assert_eq!(idle.iter().map(|i| i.image.as_str()).collect::<Vec<_>>(), ["reg/a:1"]);
        assert!(store.image_in_live_use("reg/b:1").await.unwrap());
        assert!(!store.image_in_live_use("reg/a:1").await.unwrap());

        // A backend of a that ended at 500 used it until then.
        let user = backend(&store, "ba-uses-a", "reg/a:1", 25).await;
        terminate(&store, &user, 500).await;
        assert!(store.idle_pulled_images(499).await.unwrap().is_empty());
        assert_eq!(store.idle_pulled_images(500).await.unwrap().len(), 1);
        store.forget_pulled_image("reg/a:1").await.unwrap();
        assert_eq!(store.pulled_image("reg/a:1").await.unwrap(), None);
    }
}
