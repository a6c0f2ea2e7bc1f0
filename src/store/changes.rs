//! Which backend rows changed since the reconciler last read them.
//!
//! Every store method that writes a `backends` row notes the backend's id
//! here right after its commit ([`Store::commit_noting`]); the reconciler takes the set at the start of
//! a pass and re-reads only those rows, instead of every live row on every
//! wake-up. Noting after the commit is what makes this safe: a reader that
//! took the set before a commit finds the id again on its next pass. Nothing
//! here touches SQLite.

use super::{Result, Store, StoreError};
use crate::model::BackendName;
use std::collections::HashSet;

/// More ids than this (nobody reading them, say) collapse into "everything
/// changed", so the set never grows without bound.
const MAX_TRACKED: usize = 100_000;

/// Backend ids whose row changed since the set was last taken.
#[derive(Debug, Default)]
pub struct ChangedBackends {
    ids: HashSet<BackendName>,
    /// Too many to track: every row must be read again.
    all: bool,
}

impl ChangedBackends {
    fn note(&mut self, id: &BackendName) {
        if self.all {
            return;
        }
        if self.ids.len() >= MAX_TRACKED {
            self.ids = HashSet::new();
            self.all = true;
        } else {
            self.ids.insert(id.clone());
        }
    }
}

impl Store {
    /// Commits `tx`, then notes that `id`'s row changed — both in a task of
    /// their own, so that a caller cancelled while the commit is under way (an
    /// HTTP client that went away, a cancelled probe) cannot leave a committed
    /// write un-noted, which the reconciler would then never read.
    pub(super) async fn commit_noting(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        id: &BackendName,
    ) -> Result<()> {
        let changed = self.changed.clone();
        let id = id.clone();
        tokio::spawn(async move {
            tx.commit().await?;
            changed.lock().expect("changed-rows lock").note(&id);
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("commit task failed: {e}")))?
    }

    /// The backends whose row changed since the last call, and forgets them;
    /// `None` when too many changed to track and every row must be read.
    pub fn take_changed(&self) -> Option<HashSet<BackendName>> {
        let taken = std::mem::take(&mut *self.changed.lock().expect("changed-rows lock"));
        (!taken.all).then_some(taken.ids)
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{BackendName, BackendState, BackendStatus, EventSource, ExecutorSpec, Signal};
    use crate::model::{TerminationKind, TerminationReason};
    use crate::store::{Store, Transition};
    use std::collections::HashSet;

    #[tokio::test]
    async fn every_backend_write_is_noted_once_and_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).await.unwrap();
        let spec = ExecutorSpec::from_json(serde_json::json!({ "image": "busybox" })).unwrap();
        let one = BackendName::parse("ba-one").unwrap();
        let two = BackendName::parse("ba-two").unwrap();
        assert_eq!(store.take_changed(), Some(HashSet::new()));

        store.create_backend(&one, &spec, None, 1).await.unwrap();
        store.create_backend(&two, &spec, None, 1).await.unwrap();
        assert_eq!(store.take_changed(), Some(HashSet::from([one.clone(), two.clone()])));
        assert_eq!(store.take_changed(), Some(HashSet::new()));

        let loading = Transition::new(BackendState::Loading, EventSource::Reconciler, 2);
        store.record_transition(&one, BackendStatus::Scheduled, &loading).await.unwrap();
        assert_eq!(store.take_changed(), Some(HashSet::from([one.clone()])));
        // A compare-and-set that lost writes nothing, so notes nothing.
        store.record_transition(&one, BackendStatus::Scheduled, &loading).await.unwrap();
        assert_eq!(store.take_changed(), Some(HashSet::new()));

        store.record_signal(&two, Signal::Term, 3).await.unwrap();
        store
            .request_termination(&two, TerminationKind::Soft, TerminationReason::External, 4)
            .await
            .unwrap();
        assert_eq!(store.take_changed(), Some(HashSet::from([two])));
    }
}
