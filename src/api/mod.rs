//! The HTTP API: the only module that knows HTTP and the API's JSON shapes.
//!
//! Requests are parsed into domain types at the edge (a bad field is a `400`
//! naming it, and nothing is written); the handlers then call the store.
//! The API never calls Docker: it writes desired state and the reconciler
//! does the rest. Errors map to statuses in one place, [`ApiError`].

pub mod events;
pub mod metrics;
pub mod prune;

use crate::config::Config;
use crate::model::{
    now_millis, BackendName, BackendRow, BackendStatus, ExecutorSpec, Millis, MountSpec,
    TerminationKind, TerminationReason,
};
use crate::reconciler::ReconcilerStatus;
use crate::store::{CreateOutcome, EventRow, Store, StoreError, TerminateOutcome};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub config: Arc<Config>,
    pub reconciler: Arc<ReconcilerStatus>,
    pub docker_endpoint: String,
    /// Turns `true` when the daemon stops: ends open event streams, so the
    /// graceful shutdown does not wait on followers forever.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// For reading only (container logs, call counters): the API never acts on containers.
    pub docker: crate::docker::DockerClient,
    /// The resource sampler's feed and the `/metrics` totals.
    pub telemetry: metrics::Telemetry,
    /// Asks the prune task for a pass (`POST /v1/prune`).
    pub prune: crate::prune::PruneHandle,
}

pub fn router(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/v1/backends", post(spawn_backend).get(list_backends))
        .route("/v1/backends/{id}", get(get_backend))
        .route("/v1/backends/{id}/terminate", post(terminate_backend))
        .route("/v1/backends/{id}/events", get(backend_events))
        .route("/v1/events", get(events::events))
        .route("/v1/backends/{id}/metrics", get(metrics::backend_metrics))
        .route("/v1/backends/{id}/logs", get(metrics::backend_logs))
        .route("/metrics", get(metrics::prometheus))
        .route("/v1/prune", post(prune::prune_now))
        .route("/v1/prune-runs", get(prune::prune_runs))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Every error the API answers with, mapped to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("unauthorized: missing or wrong bearer token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("request body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(message) => {
                ApiError::Unavailable(format!("database unavailable: {message}"))
            }
            other => {
                tracing::error!(error = %other, "store error");
                ApiError::Internal("database error".into())
            }
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge
        } else {
            ApiError::BadRequest(rejection.body_text())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.config.api_token {
        use subtle::ConstantTimeEq;
        // The scheme is case-insensitive (RFC 7235); the token is compared in
        // constant time, so its bytes cannot be guessed one at a time.
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token);
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            let mut response = ApiError::Unauthorized.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

/// A backend as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct BackendView {
    pub id: String,
    pub status: String,
    pub state: Value,
    pub desired: String,
    pub address: Option<String>,
    pub container_id: Option<String>,
    pub exit_code: Option<i32>,
    pub oom_killed: Option<bool>,
    pub error: Option<String>,
    /// The last progress line of the image pull, once one was pulled.
    #[serde(default)]
    pub loading_detail: Option<String>,
    pub executable: Value,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&BackendRow> for BackendView {
    fn from(row: &BackendRow) -> Self {
        Self {
            id: row.id.to_string(),
            status: row.status().to_string(),
            state: serde_json::to_value(&row.state).expect("state serializes"),
            desired: row.desired.as_str().to_string(),
            address: row.state.address().map(str::to_string),
            container_id: row.container_id.clone(),
            exit_code: row.exit_code,
            oom_killed: row.oom_killed,
            error: row.error.clone(),
            loading_detail: None,
            executable: serde_json::to_value(row.spec.redacted()).expect("spec serializes"),
            created_at: rfc3339(row.created_at),
            updated_at: rfc3339(row.updated_at),
        }
    }
}

/// A transition as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct EventView {
    pub event_id: i64,
    pub backend_id: String,
    pub status: String,
    pub state: Value,
    pub exit_code: Option<i32>,
    pub source: String,
    pub error: Option<String>,
    pub timestamp: String,
}

impl From<EventRow> for EventView {
    fn from(row: EventRow) -> Self {
        Self {
            event_id: row.event_id,
            backend_id: row.backend_id,
            status: row.status,
            state: row.state,
            exit_code: row.exit_code,
            source: row.source,
            error: row.error,
            timestamp: rfc3339(row.timestamp_ms),
        }
    }
}

/// RFC 3339, UTC, with milliseconds.
pub fn rfc3339(millis: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnBody {
    id: Option<String>,
    executable: Value,
}

/// A validated spawn request.
pub struct SpawnRequest {
    pub id: BackendName,
    pub spec: ExecutorSpec,
}

/// Parses a JSON request body; a field of the wrong type is named by its
/// path (`id: invalid type ...`), anything else is an invalid body.
fn parse_json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    if body.trim_ascii_start().starts_with(b"[") {
        // serde would read a struct from an array; request bodies are objects.
        return Err(ApiError::BadRequest(
            "invalid request body: invalid type: sequence, expected an object".into(),
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = crate::model::error_field_path(&e);
        if path.is_empty() {
            ApiError::BadRequest(format!("invalid request body: {}", e.into_inner()))
        } else {
            ApiError::BadRequest(format!("{path}: {}", e.into_inner()))
        }
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?;
    Ok(parsed)
}

/// Parses and validates a spawn body; the error names the offending field.
pub fn parse_spawn(body: &[u8], config: &Config) -> ApiResult<SpawnRequest> {
    let body: SpawnBody = parse_json_body(body)?;
    let id = match body.id {
        Some(raw) => BackendName::parse(&raw).map_err(|e| ApiError::BadRequest(format!("id: {e}")))?,
        None => BackendName::new_random(),
    };
    let spec = ExecutorSpec::from_json(body.executable)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    match &spec.mount {
        Some(MountSpec::Flag(true)) => {
            return Err(ApiError::BadRequest(
                "executable.mount: true needs a key to name the folder; give a relative path".into(),
            ))
        }
        Some(MountSpec::Path(path)) => {
            let base = config.docker.mount_base.as_ref().ok_or_else(|| {
                ApiError::BadRequest(
                    "executable.mount: mounts are disabled (docker.mount_base is not configured)".into(),
                )
            })?;
            crate::mounts::verify(base, path).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        }
        _ => {}
    }
    Ok(SpawnRequest { id, spec })
}

async fn spawn_backend(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let request = parse_spawn(&body?, &state.config)?;
    let outcome = state
        .store
        .create_backend(&request.id, &request.spec, None, now_millis())
        .await?;
    Ok(match outcome {
        CreateOutcome::Created(row) => {
            tracing::info!(backend = %row.id, image = %row.spec.image, "backend scheduled");
            (StatusCode::CREATED, Json(BackendView::from(&row))).into_response()
        }
        CreateOutcome::Existing(row) => (StatusCode::OK, Json(BackendView::from(&row))).into_response(),
        CreateOutcome::Conflict(row) => {
            return Err(ApiError::Conflict(format!(
                "backend {} exists with a different executable",
                row.id
            )))
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    /// `true` hides terminated backends.
    live: Option<bool>,
}

async fn list_backends(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<BackendView>>> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let status = match query.status.as_deref() {
        None => None,
        Some(raw) => Some(BackendStatus::parse(raw).ok_or_else(|| {
            ApiError::BadRequest(format!("status: unknown status {raw:?}"))
        })?),
    };
    let rows = state
        .store
        .list_backends(status, !query.live.unwrap_or(false))
        .await?;
    let mut details = state.store.loading_details().await?;
    Ok(Json(
        rows.iter()
            .map(|row| BackendView {
                loading_detail: details.remove(row.id.as_str()),
                ..BackendView::from(row)
            })
            .collect(),
    ))
}

fn parse_id(raw: &str) -> ApiResult<BackendName> {
    BackendName::parse(raw).map_err(|e| ApiError::BadRequest(format!("id: {e}")))
}

async fn load(store: &Store, id: &BackendName) -> ApiResult<BackendRow> {
    store
        .get_backend(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no backend {id}")))
}

async fn get_backend(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<BackendView>> {
    let id = parse_id(&id)?;
    let row = load(&state.store, &id).await?;
    Ok(Json(BackendView {
        loading_detail: state.store.loading_detail(&id).await?,
        ..BackendView::from(&row)
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TerminateBody {
    #[serde(default)]
    hard: bool,
    reason: Option<String>,
}

async fn terminate_backend(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let body = body?;
    let body: TerminateBody = if body.iter().all(u8::is_ascii_whitespace) {
        TerminateBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?
    };
    let reason = match body.reason.as_deref() {
        None => TerminationReason::External,
        Some(raw) => TerminationReason::parse(raw)
            .ok_or_else(|| ApiError::BadRequest(format!("reason: unknown reason {raw:?}")))?,
    };
    let kind = if body.hard {
        TerminationKind::Hard
    } else {
        TerminationKind::Soft
    };
    match state
        .store
        .request_termination(&id, kind, reason, now_millis())
        .await?
    {
        TerminateOutcome::NotFound => Err(ApiError::NotFound(format!("no backend {id}"))),
        TerminateOutcome::AlreadyTerminated(row) => {
            Ok((StatusCode::OK, Json(BackendView::from(&row))).into_response())
        }
        TerminateOutcome::Requested(row) => {
            tracing::info!(backend = %id, kind = kind.as_str(), reason = reason.as_str(), "termination requested");
            Ok((StatusCode::ACCEPTED, Json(BackendView::from(&row))).into_response())
        }
    }
}

async fn backend_events(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<EventView>>> {
    let id = parse_id(&id)?;
    load(&state.store, &id).await?;
    let events = state.store.events_for(&id).await?;
    Ok(Json(events.into_iter().map(EventView::from).collect()))
}

async fn healthz(State(state): State<ApiState>) -> ApiResult<Json<Value>> {
    if !state.reconciler.docker_up.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable(format!(
            "docker engine unreachable at {}",
            state.docker_endpoint
        )));
    }
    Ok(Json(json!({ "status": "ok" })))
}
