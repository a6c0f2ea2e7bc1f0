//! Reading history as an outbox: `backend_events` in event-id order, followed
//! live, and the acknowledgements of named consumers (`event_subscriptions`).
//!
//! The history rows are the outbox itself: nothing is copied and nothing is
//! deleted, a consumer only moves its cursor. Every transition commits its
//! row before the store bumps its history watch, and SQLite writes one
//! transaction at a time, so event ids become visible in increasing order: a
//! reader that asks for "everything after N" never skips a row. Followers
//! wait on that watch, never on a timer.

use super::{EventRow, Result, Store, StoreError};
use crate::model::{BackendName, Millis};
use futures::stream::{BoxStream, StreamExt};
use sqlx::Row;
use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;

/// How many rows one read of a follower takes at most.
const BATCH: i64 = 500;

/// After a failed read, the next try waits for new history or this long.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// A backend's end, read from its `terminated` row of `backend_events`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitRow {
    pub event_id: i64,
    pub backend_id: BackendName,
    /// `None` when no exit code is known (lost, never started, internal error).
    pub exit_code: Option<i32>,
}

/// A row that has a place in history.
pub trait HistoryItem {
    fn event_id(&self) -> i64;
}

impl HistoryItem for EventRow {
    fn event_id(&self) -> i64 {
        self.event_id
    }
}

impl HistoryItem for ExitRow {
    fn event_id(&self) -> i64 {
        self.event_id
    }
}

/// Waits for history to grow past what a reader has seen, or for a stop.
///
/// A dropped stop sender counts as a stop, so a follower never outlives the
/// thing that owns it.
pub struct HistoryFollower {
    changes: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
}

impl HistoryFollower {
    pub fn new(store: &Store, stop: watch::Receiver<bool>) -> Self {
        Self {
            changes: store.subscribe_history(),
            stop,
        }
    }

    pub fn stopped(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// Marks everything committed so far as seen. Call it before reading, so
    /// a row committed during the read wakes the next [`Self::wait`].
    pub fn mark_seen(&mut self) {
        self.changes.borrow_and_update();
    }

    /// Resolves when a history row was committed since [`Self::mark_seen`]
    /// (true) or the stop came (false); `limit` bounds the wait (true).
    pub async fn wait(&mut self, limit: Option<Duration>) -> bool {
        let changed = async {
            tokio::select! {
                _ = self.changes.changed() => true,
                _ = self.stop.wait_for(|stop| *stop) => false,
            }
        };
        match limit {
            Some(limit) => tokio::time::timeout(limit, changed).await.unwrap_or(true),
            None => changed.await,
        }
    }
}

impl Store {
    /// The id of the newest history row (0 when there is none).
    pub async fn last_event_id(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(event_id), 0) FROM backend_events")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Backends' ends after `after_event_id`, oldest first, at most `limit`.
    pub async fn exits_after(&self, after_event_id: i64, limit: i64) -> Result<Vec<ExitRow>> {
        let rows = sqlx::query(
            "SELECT event_id, backend_id, exit_code FROM backend_events \
             WHERE event_id > ? AND status = 'terminated' ORDER BY event_id LIMIT ?",
        )
        .bind(after_event_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let backend_id: String = row.try_get("backend_id")?;
                Ok(ExitRow {
                    event_id: row.try_get("event_id")?,
                    backend_id: BackendName::parse(&backend_id).map_err(|e| {
                        StoreError::Corrupt(format!("backend_events.backend_id: {e}"))
                    })?,
                    exit_code: row.try_get("exit_code")?,
                })
            })
            .collect()
    }

    /// Every transition after `after_event_id`, then each new one as it is
    /// committed, until `stop`. A failed read is yielded as an error and
    /// tried again (after new history or a second).
    pub fn follow_events(
        &self,
        after_event_id: i64,
        stop: watch::Receiver<bool>,
    ) -> BoxStream<'static, Result<EventRow>> {
        follow(self.clone(), after_event_id, stop, |store, after| async move {
            store.events_after(after, BATCH).await
        })
    }

    /// Like [`Self::follow_events`], for backends' ends only.
    pub fn follow_exits(
        &self,
        after_event_id: i64,
        stop: watch::Receiver<bool>,
    ) -> BoxStream<'static, Result<ExitRow>> {
        follow(self.clone(), after_event_id, stop, |store, after| async move {
            store.exits_after(after, BATCH).await
        })
    }

    /// The last event a named consumer acknowledged, registering the name
    /// (at 0, the start of history) the first time it is seen.
    pub async fn open_subscription(&self, name: &str, now: Millis) -> Result<i64> {
        sqlx::query(
            "INSERT INTO event_subscriptions (name, acked_event_id, updated_at_ms) VALUES (?, 0, ?) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT acked_event_id FROM event_subscriptions WHERE name = ?")
                .bind(name)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Records that `name` has handled every event up to `event_id`. The
    /// cursor only moves forward; an id past the newest history row is
    /// refused (false), since it would skip events not yet recorded.
    pub async fn ack_subscription(&self, name: &str, event_id: i64, now: Millis) -> Result<bool> {
        let applied = sqlx::query(
            "INSERT INTO event_subscriptions (name, acked_event_id, updated_at_ms) \
             SELECT ?1, ?2, ?3 WHERE ?2 >= 0 \
               AND ?2 <= (SELECT COALESCE(MAX(event_id), 0) FROM backend_events) \
             ON CONFLICT (name) DO UPDATE SET \
               acked_event_id = MAX(acked_event_id, excluded.acked_event_id), \
               updated_at_ms = excluded.updated_at_ms",
        )
        .bind(name)
        .bind(event_id)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(applied > 0)
    }
}

struct Follow<T, F> {
    store: Store,
    cursor: i64,
    buffered: VecDeque<T>,
    follower: HistoryFollower,
    failed: bool,
    fetch: F,
}

fn follow<T, F, Fut>(
    store: Store,
    after_event_id: i64,
    stop: watch::Receiver<bool>,
    fetch: F,
) -> BoxStream<'static, Result<T>>
where
    T: HistoryItem + Send + 'static,
    F: Fn(Store, i64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Vec<T>>> + Send,
{
    let state = Follow {
        follower: HistoryFollower::new(&store, stop),
        store,
        cursor: after_event_id,
        buffered: VecDeque::new(),
        failed: false,
        fetch,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if state.follower.stopped() {
                return None;
            }
            if let Some(item) = state.buffered.pop_front() {
                return Some((Ok(item), state));
            }
            if state.failed {
                state.failed = false;
                if !state.follower.wait(Some(RETRY_AFTER_ERROR)).await {
                    return None;
                }
            }
            state.follower.mark_seen();
            match (state.fetch)(state.store.clone(), state.cursor).await {
                Ok(batch) if batch.is_empty() => {
                    if !state.follower.wait(None).await {
                        return None;
                    }
                }
                Ok(batch) => {
                    state.cursor = batch.last().map_or(state.cursor, HistoryItem::event_id);
                    state.buffered.extend(batch);
                }
                Err(error) => {
                    state.failed = true;
                    return Some((Err(error), state));
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        BackendState, EventSource, ExecutorSpec, TerminationKind, TerminationReason,
    };
    use crate::store::Transition;

    use crate::store::tests::temp_store;

    async fn create(store: &Store, name: &str) -> BackendName {
        let id = BackendName::parse(name).unwrap();
        let spec = ExecutorSpec::from_json(serde_json::json!({ "image": "x" })).unwrap();
        store.create_backend(&id, &spec, None, 1).await.unwrap();
        id
    }

    async fn end(store: &Store, id: &BackendName, exit_code: Option<i32>) {
        let state = BackendState::Scheduled.to_terminated(
            Some((TerminationKind::Hard, TerminationReason::External)),
            exit_code,
        );
        let transition = Transition::new(state, EventSource::Inspect, 2);
        assert!(store
            .record_transition(id, crate::model::BackendStatus::Scheduled, &transition)
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn exits_after_reads_only_terminated_rows_in_order() {
        let (_dir, store) = temp_store().await;
        let a = create(&store, "ba-a").await;
        let b = create(&store, "ba-b").await;
        end(&store, &b, Some(3)).await;
        end(&store, &a, None).await;
        let exits = store.exits_after(0, 10).await.unwrap();
        assert_eq!(
            exits.iter().map(|e| (e.backend_id.as_str(), e.exit_code)).collect::<Vec<_>>(),
            [("ba-b", Some(3)), ("ba-a", None)]
        );
        assert_eq!(store.last_event_id().await.unwrap(), exits[1].event_id);
        assert!(store.exits_after(exits[1].event_id, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn follower_sees_rows_committed_after_it_started_and_ends_on_stop() {
        let (_dir, store) = temp_store().await;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut exits = store.follow_exits(0, stop_rx);
        let a = create(&store, "ba-late").await;
        let reader = tokio::spawn(async move {
            let first = exits.next().await.unwrap().unwrap();
            (first, exits)
        });
        end(&store, &a, Some(137)).await;
        let (first, mut exits) = reader.await.unwrap();
        assert_eq!(first.backend_id, a);
        assert_eq!(first.exit_code, Some(137));
        stop_tx.send(true).unwrap();
        assert!(exits.next().await.is_none());
    }

    #[tokio::test]
    async fn acknowledgements_only_move_forward_and_never_past_history() {
        let (_dir, store) = temp_store().await;
        assert_eq!(store.open_subscription("fwd", 1).await.unwrap(), 0);
        let a = create(&store, "ba-x").await;
        end(&store, &a, Some(0)).await;
        let head = store.last_event_id().await.unwrap();
        assert!(!store.ack_subscription("fwd", head + 1, 2).await.unwrap());
        assert!(store.ack_subscription("fwd", head, 2).await.unwrap());
        assert!(store.ack_subscription("fwd", 1, 3).await.unwrap());
        assert_eq!(store.open_subscription("fwd", 4).await.unwrap(), head);
        assert_eq!(store.open_subscription("other", 4).await.unwrap(), 0);
    }
}
