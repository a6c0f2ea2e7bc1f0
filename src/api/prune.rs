//! `POST /v1/prune` (run a prune pass now, answer its row) and
//! `GET /v1/prune-runs` (the journal of passes, newest first).
//!
//! The handlers only ask the prune task and read the store: the pass itself,
//! and every Docker call, runs in [`crate::prune`].

use super::{rfc3339, ApiError, ApiResult, ApiState};
use crate::prune::PruneError;
use crate::store::PruneRunRow;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};

/// Most rows `GET /v1/prune-runs` answers with, and its default.
const MAX_RUNS: i64 = 1000;
const DEFAULT_RUNS: i64 = 100;

/// A prune pass as the API shows it; times in RFC 3339.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct PruneRunView {
    pub run_id: i64,
    pub started_at: String,
    /// `None` while the pass runs, or if the daemon died during it.
    pub finished_at: Option<String>,
    /// `interval` or `api`.
    pub triggered_by: String,
    pub containers_removed: i64,
    pub images_removed: i64,
    pub bytes_reclaimed: i64,
    pub error: Option<String>,
}

impl From<PruneRunRow> for PruneRunView {
    fn from(row: PruneRunRow) -> Self {
        Self {
            run_id: row.run_id,
            started_at: rfc3339(row.started_at),
            finished_at: row.finished_at.map(rfc3339),
            triggered_by: row.triggered_by,
            containers_removed: row.containers_removed,
            images_removed: row.images_removed,
            bytes_reclaimed: row.bytes_reclaimed,
            error: row.error,
        }
    }
}

impl From<PruneError> for ApiError {
    /// Both mean "no pass now, maybe later": the task is stopping, or the
    /// store could not take the pass's writes.
    fn from(error: PruneError) -> Self {
        ApiError::Unavailable(error.to_string())
    }
}

pub async fn prune_now(State(state): State<ApiState>) -> ApiResult<Json<PruneRunView>> {
    let row = state.prune.run_now().await?;
    Ok(Json(PruneRunView::from(row)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    /// At most this many rows (default 100, at most 1000).
    limit: Option<i64>,
}

pub async fn prune_runs(
    State(state): State<ApiState>,
    query: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<PruneRunView>>> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_RUNS);
    if !(1..=MAX_RUNS).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit: must be between 1 and {MAX_RUNS}, got {limit}"
        )));
    }
    let rows = state.store.prune_runs(limit).await?;
    Ok(Json(rows.into_iter().map(PruneRunView::from).collect()))
}
