//! SQL of the metrics area: `metrics_samples` (append, read, batched
//! retention) and the aggregates `/metrics` reads at scrape time.
//!
//! Samples are the one kind of history that is deleted: they are bounded by
//! `metrics.retention`. Nothing here reads Docker.

use super::{Result, Store, StoreError};
use crate::metrics::{CpuBaseline, MetricsSample};
use crate::model::{BackendName, Millis};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

/// Transition and exit totals from `backend_events`, for counters that
/// survive restarts (the table is append-only, so they only grow).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistoryTotals {
    /// The last event counted; the next count starts after it.
    pub last_event_id: i64,
    /// Transitions by status.
    pub transitions: Vec<(String, u64)>,
    /// Recorded exits by exit code (`None`: the exit code is unknown).
    pub exits: Vec<(Option<i32>, u64)>,
}

const SAMPLE_COLUMNS: &str =
    "backend_id, timestamp_ms, mem_total, mem_used, mem_active, mem_inactive, \
     mem_unevictable, mem_limit, cpu_used, sys_cpu, cpu_total_ns, sys_cpu_total_ns";

/// SQLite integers are signed; no real counter comes near the top bit.
fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_sql(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl Store {
    /// Backends whose container may be running: not terminated, with a
    /// container recorded. `(backend, container id)`, in name order.
    pub async fn sampling_targets(&self) -> Result<Vec<(BackendName, String)>> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, container_id FROM backends \
             WHERE status <> 'terminated' AND container_id IS NOT NULL ORDER BY id",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(id, container)| {
                BackendName::parse(&id)
                    .map(|id| (id, container))
                    .map_err(|e| StoreError::Corrupt(format!("backends.id: {e}")))
            })
            .collect()
    }

    /// Appends samples in one transaction.
    pub async fn insert_samples(&self, samples: &[MetricsSample]) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        for sample in samples {
            sqlx::query(&format!(
                "INSERT INTO metrics_samples ({SAMPLE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .bind(sample.backend_id.as_str())
            .bind(sample.timestamp_ms)
            .bind(to_sql(sample.mem_total))
            .bind(to_sql(sample.mem_used))
            .bind(to_sql(sample.mem_active))
            .bind(to_sql(sample.mem_inactive))
            .bind(to_sql(sample.mem_unevictable))
            .bind(to_sql(sample.mem_limit))
            .bind(sample.cpu_used.map(to_sql))
            .bind(sample.sys_cpu.map(to_sql))
            .bind(to_sql(sample.cpu_total_ns))
            .bind(to_sql(sample.sys_cpu_total_ns))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The cumulative CPU counters of the backend's latest stored sample.
    pub async fn latest_cpu_baseline(&self, id: &BackendName) -> Result<Option<CpuBaseline>> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT cpu_total_ns, sys_cpu_total_ns FROM metrics_samples \
             WHERE backend_id = ? ORDER BY timestamp_ms DESC, sample_id DESC LIMIT 1",
        )
        .bind(id.as_str())
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|(cpu, sys)| CpuBaseline {
            cpu_total_ns: from_sql(cpu),
            sys_cpu_total_ns: from_sql(sys),
        }))
    }

    /// A backend's samples at or after `since`, oldest first, at most `limit`.
    pub async fn samples_for(
        &self,
        id: &BackendName,
        since: Option<Millis>,
        limit: u32,
    ) -> Result<Vec<MetricsSample>> {
        let rows = sqlx::query(&format!(
            "SELECT {SAMPLE_COLUMNS} FROM metrics_samples \
             WHERE backend_id = ?1 AND timestamp_ms >= ?2 \
             ORDER BY timestamp_ms, sample_id LIMIT ?3"
        ))
        .bind(id.as_str())
        .bind(since.unwrap_or(i64::MIN))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(decode_sample).collect()
    }

    /// Deletes at most `batch` samples taken before `cutoff`, oldest first;
    /// returns how many went.
    pub async fn delete_samples_before(&self, cutoff: Millis, batch: u32) -> Result<u64> {
        let deleted = sqlx::query(
            "DELETE FROM metrics_samples WHERE sample_id IN \
             (SELECT sample_id FROM metrics_samples WHERE timestamp_ms < ? ORDER BY timestamp_ms LIMIT ?)",
        )
        .bind(cutoff)
        .bind(batch)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(deleted)
    }

    /// How many backends are in each status now (statuses with none are absent).
    pub async fn backend_counts_by_status(&self) -> Result<Vec<(String, u64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM backends GROUP BY status ORDER BY status")
                .fetch_all(self.pool())
                .await?;
        Ok(rows.into_iter().map(|(s, n)| (s, from_sql(n))).collect())
    }

    /// Adds the events after `totals.last_event_id` to `totals`, reading only
    /// those (the event id index makes this cheap however long the history).
    pub async fn add_history_totals(&self, totals: &mut HistoryTotals) -> Result<()> {
        let after = totals.last_event_id;
        let mut tx = self.pool().begin().await?;
        let last: Option<i64> = sqlx::query_scalar("SELECT MAX(event_id) FROM backend_events")
            .fetch_one(&mut *tx)
            .await?;
        let Some(last) = last.filter(|last| *last > after) else {
            return Ok(());
        };
        let transitions: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, COUNT(*) FROM backend_events \
             WHERE event_id > ? AND event_id <= ? GROUP BY status",
        )
        .bind(after)
        .bind(last)
        .fetch_all(&mut *tx)
        .await?;
        let exits: Vec<(Option<i32>, i64)> = sqlx::query_as(
            "SELECT exit_code, COUNT(*) FROM backend_events \
             WHERE event_id > ? AND event_id <= ? AND status = 'terminated' GROUP BY exit_code",
        )
        .bind(after)
        .bind(last)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        for (status, count) in transitions {
            add_to(&mut totals.transitions, status, from_sql(count));
        }
        for (code, count) in exits {
            add_to(&mut totals.exits, code, from_sql(count));
        }
        totals.last_event_id = last;
        Ok(())
    }
}

fn add_to<K: PartialEq>(totals: &mut Vec<(K, u64)>, key: K, count: u64) {
    match totals.iter_mut().find(|(k, _)| *k == key) {
        Some((_, total)) => *total += count,
        None => totals.push((key, count)),
    }
}

fn decode_sample(row: &SqliteRow) -> Result<MetricsSample> {
    let id: String = row.try_get("backend_id")?;
    let unsigned = |column: &str| -> Result<u64> { Ok(from_sql(row.try_get(column)?)) };
    Ok(MetricsSample {
        backend_id: BackendName::parse(&id)
            .map_err(|e| StoreError::Corrupt(format!("metrics_samples.backend_id: {e}")))?,
        timestamp_ms: row.try_get("timestamp_ms")?,
        mem_total: unsigned("mem_total")?,
        mem_used: unsigned("mem_used")?,
        mem_active: unsigned("mem_active")?,
        mem_inactive: unsigned("mem_inactive")?,
        mem_unevictable: unsigned("mem_unevictable")?,
        mem_limit: unsigned("mem_limit")?,
        cpu_used: row.try_get::<Option<i64>, _>("cpu_used")?.map(from_sql),
        sys_cpu: row.try_get::<Option<i64>, _>("sys_cpu")?.map(from_sql),
        cpu_total_ns: unsigned("cpu_total_ns")?,
        sys_cpu_total_ns: unsigned("sys_cpu_total_ns")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendState, BackendStatus, EventSource, ExecutorSpec};
    use crate::store::Transition;

    async fn store_with_backend(id: &BackendName) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).await.unwrap();
        let spec = ExecutorSpec::from_json(serde_json::json!({ "image": "busybox" })).unwrap();
        store.create_backend(id, &spec, None, 1).await.unwrap();
        (dir, store)
    }

    fn sample(id: &BackendName, at: Millis, cpu: u64) -> MetricsSample {
        MetricsSample {
            backend_id: id.clone(),
            timestamp_ms: at,
            mem_total: 3,
            mem_used: 2,
            mem_active: 1,
            mem_inactive: 1,
            mem_unevictable: 0,
            mem_limit: u64::MAX,
            cpu_used: (at > 1).then_some(5),
            sys_cpu: None,
            cpu_total_ns: cpu,
            sys_cpu_total_ns: 1_000 + cpu,
        }
    }

    #[tokio::test]
    async fn samples_round_trip_oldest_first_from_since() {
        let id = BackendName::parse("ba-samples").unwrap();
        let (_dir, store) = store_with_backend(&id).await;
        let rows = [sample(&id, 3, 30), sample(&id, 1, 10), sample(&id, 2, 20)];
        store.insert_samples(&rows).await.unwrap();
        let all = store.samples_for(&id, None, 100).await.unwrap();
        assert_eq!(
            all.iter().map(|s| s.timestamp_ms).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(all[1], rows[2].clone().with_limit_clamped());
        let since = store.samples_for(&id, Some(2), 100).await.unwrap();
        assert_eq!(since.len(), 2);
        assert_eq!(store.samples_for(&id, None, 1).await.unwrap().len(), 1);
        assert_eq!(
            store.latest_cpu_baseline(&id).await.unwrap(),
            Some(CpuBaseline {
                cpu_total_ns: 30,
                sys_cpu_total_ns: 1_030
            })
        );
    }

    impl MetricsSample {
        fn with_limit_clamped(mut self) -> Self {
            self.mem_limit = i64::MAX as u64;
            self
        }
    }

    #[tokio::test]
    async fn retention_deletes_in_batches_oldest_first() {
        let id = BackendName::parse("ba-retain").unwrap();
        let (_dir, store) = store_with_backend(&id).await;
        let rows: Vec<_> = (1..=25).map(|at| sample(&id, at, at as u64)).collect();
        store.insert_samples(&rows).await.unwrap();
        assert_eq!(store.delete_samples_before(21, 10).await.unwrap(), 10);
        assert_eq!(store.delete_samples_before(21, 10).await.unwrap(), 10);
        assert_eq!(store.delete_samples_before(21, 10).await.unwrap(), 0);
        let left = store.samples_for(&id, None, 100).await.unwrap();
        assert_eq!(
            left.iter().map(|s| s.timestamp_ms).collect::<Vec<_>>(),
            [21, 22, 23, 24, 25]
        );
    }

    #[tokio::test]
    async fn history_totals_count_only_new_events() {
        let id = BackendName::parse("ba-totals").unwrap();
        let (_dir, store) = store_with_backend(&id).await;
        let mut totals = HistoryTotals::default();
        store.add_history_totals(&mut totals).await.unwrap();
        assert_eq!(totals.transitions, [("scheduled".to_string(), 1)]);
        assert!(totals.exits.is_empty());
        let other = BackendName::parse("ba-totals-two").unwrap();
        let spec = ExecutorSpec::from_json(serde_json::json!({ "image": "busybox" })).unwrap();
        store.create_backend(&other, &spec, None, 2).await.unwrap();
        store.add_history_totals(&mut totals).await.unwrap();
        assert_eq!(totals.transitions, [("scheduled".to_string(), 2)]);
        store.add_history_totals(&mut totals).await.unwrap();
        assert_eq!(totals.transitions, [("scheduled".to_string(), 2)]);
        assert_eq!(
            store.backend_counts_by_status().await.unwrap(),
            [("scheduled".to_string(), 2)]
        );
        let exited = BackendState::Scheduled.to_terminated(None, Some(3));
        let transition = Transition::new(exited, EventSource::Reconciler, 3);
        assert!(store
            .record_transition(&id, BackendStatus::Scheduled, &transition)
            .await
            .unwrap());
        store.add_history_totals(&mut totals).await.unwrap();
        assert_eq!(totals.exits, [(Some(3), 1)]);
        assert!(totals.transitions.contains(&("terminated".to_string(), 1)));
    }
}
