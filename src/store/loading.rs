//! A backend's loading detail: the last progress line of its image pull
//! (column `backends.loading_detail`).
//!
//! Written by the executor while it pulls, throttled by the caller; read by
//! the API. It changes no status and appends no history row.

use super::{Result, Store};
use crate::model::BackendName;
use std::collections::HashMap;

impl Store {
    /// Replaces the backend's loading detail.
    pub async fn set_loading_detail(&self, id: &BackendName, detail: &str) -> Result<()> {
        sqlx::query("UPDATE backends SET loading_detail = ? WHERE id = ?")
            .bind(detail)
            .bind(id.as_str())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The backend's loading detail, if its image was ever pulled.
    pub async fn loading_detail(&self, id: &BackendName) -> Result<Option<String>> {
        let detail: Option<Option<String>> =
            sqlx::query_scalar("SELECT loading_detail FROM backends WHERE id = ?")
                .bind(id.as_str())
                .fetch_optional(self.pool())
                .await?;
        Ok(detail.flatten())
    }

    /// Every backend's loading detail that is set, by backend id.
    pub async fn loading_details(&self) -> Result<HashMap<String, String>> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, loading_detail FROM backends WHERE loading_detail IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{BackendName, ExecutorSpec};
    use crate::store::Store;

    #[tokio::test]
    async fn loading_detail_is_kept_per_backend_without_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).await.unwrap();
        let id = BackendName::parse("ba-pull").unwrap();
        let spec = ExecutorSpec::from_json(serde_json::json!({"image": "busybox"})).unwrap();
        store.create_backend(&id, &spec, None, 1).await.unwrap();
        assert_eq!(store.loading_detail(&id).await.unwrap(), None);

        store
            .set_loading_detail(&id, "Downloading 1/2")
            .await
            .unwrap();
        store
            .set_loading_detail(&id, "Pull complete")
            .await
            .unwrap();

        assert_eq!(
            store.loading_detail(&id).await.unwrap().as_deref(),
            Some("Pull complete")
        );
        assert_eq!(
            store.loading_details().await.unwrap()["ba-pull"],
            "Pull complete"
        );
        assert_eq!(
            store.events_for(&id).await.unwrap().len(),
            1,
            "no history row added"
        );
    }
}
