//! What a backend is launched with besides its spec: the key it holds, with
//! its fencing token, and its static token (columns of `backends`).
//!
//! Written once, with the backend's row, by [`Store::create_backend`]; read
//! only by the executor when it creates the container. The static token is a
//! secret: nothing here returns it with a backend row, and it is never copied
//! into `backend_events`.

use super::{Result, Store};
use crate::model::BackendName;
use sqlx::Row;
use std::fmt;

/// The key a backend holds, as Plane's drone receives it with a spawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchKey {
    pub name: String,
    pub namespace: String,
    pub tag: String,
    /// Grows each time the key changes hands, so the backend can reject a
    /// stale holder's writes.
    pub fencing_token: i64,
}

/// A backend's key and static token; `Default` is a launch with neither.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Launch {
    pub key: Option<LaunchKey>,
    pub static_token: Option<String>,
}

impl fmt::Debug for Launch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Launch")
            .field("key", &self.key)
            .field("static_token", &self.static_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Store {
    /// The launch a backend was created with (`None` when there is no such backend).
    pub async fn launch_of(&self, id: &BackendName) -> Result<Option<Launch>> {
        let mut conn = self.pool.acquire().await?;
        fetch_launch(&mut conn, id).await
    }
}

pub(super) async fn fetch_launch(
    conn: &mut sqlx::SqliteConnection,
    id: &BackendName,
) -> Result<Option<Launch>> {
    let row = sqlx::query(
        "SELECT key_name, key_namespace, key_tag, fencing_token, static_token \
         FROM backends WHERE id = ?",
    )
    .bind(id.as_str())
    .fetch_optional(conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let name: Option<String> = row.try_get("key_name")?;
    let key = match name {
        Some(name) => Some(LaunchKey {
            name,
            namespace: row.try_get::<Option<String>, _>("key_namespace")?.unwrap_or_default(),
            tag: row.try_get::<Option<String>, _>("key_tag")?.unwrap_or_default(),
            fencing_token: row.try_get::<Option<i64>, _>("fencing_token")?.unwrap_or_default(),
        }),
        None => None,
    };
    Ok(Some(Launch {
        key,
        static_token: row.try_get("static_token")?,
    }))
}
