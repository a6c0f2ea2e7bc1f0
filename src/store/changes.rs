//! Which backend rows changed since the reconciler last read them.
//!
//! Every store method that writes a `backends` row notes the backend's id
//! here right after its commit; the reconciler takes the set at the start of
//! a pass and re-reads only those rows, instead of every live row on every
//! wake-up. Noting after the commit is what makes this safe: a reader that
//! took the set before a commit finds the id again on its next pass. Nothing
//! here touches SQLite.

use super::Store;
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

impl Store {
    /// Notes that `id`'s row changed. Call it after the write has committed.
    pub(super) fn note_changed(&self, id: &BackendName) {
        let mut changed = self.changed.lock().expect("changed-rows lock");
        if changed.all {
            return;
        }
        if changed.ids.len() >= MAX_TRACKED {
            changed.ids = HashSet::new();
            changed.all = true;
        } else {
            changed.ids.insert(id.clone());
        }
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
