//! Observability endpoints: a backend's resource samples
//! (`GET /v1/backends/{id}/metrics`), its container's output
//! (`GET /v1/backends/{id}/logs`), and the daemon's own series in the
//! Prometheus text format (`GET /metrics`).
//!
//! `/metrics` is rendered fresh on every scrape from what is true then: the
//! store (backends by status, transition and exit totals) and the in-process
//! counters (reconciler, Docker calls, sampler). No series is kept between
//! scrapes, and the exporter runs no listener of its own. Logs are the one
//! place the API reads from Docker; it never acts on a container.

use super::{load, parse_id, rfc3339, ApiError, ApiResult, ApiState};
use crate::metrics::{MetricsFeed, MetricsSample};
use crate::model::{BackendStatus, Millis};
use crate::store::metrics::HistoryTotals;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusBuilder;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Samples returned by one request when `limit` is not given; page with `since`.
pub const DEFAULT_SAMPLE_LIMIT: u32 = 10_000;
pub const MAX_SAMPLE_LIMIT: u32 = 100_000;

/// What `/metrics` keeps between scrapes: the sampler's feed, and the
/// transition totals counted so far (each scrape reads only newer events).
#[derive(Clone, Default)]
pub struct Telemetry {
    pub feed: MetricsFeed,
    /// tokio's Mutex: held across the store query that extends the totals.
    history: Arc<tokio::sync::Mutex<HistoryTotals>>,
}

impl Telemetry {
    pub fn new(feed: MetricsFeed) -> Self {
        Self {
            feed,
            history: Arc::default(),
        }
    }
}

/// One resource sample as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct SampleView {
    pub backend_id: String,
    pub timestamp: String,
    pub timestamp_ms: Millis,
    pub mem_total: u64,
    pub mem_used: u64,
    pub mem_active: u64,
    pub mem_inactive: u64,
    pub mem_unevictable: u64,
    pub mem_limit: u64,
    pub cpu_used: Option<u64>,
    pub sys_cpu: Option<u64>,
    pub cpu_total_ns: u64,
    pub sys_cpu_total_ns: u64,
}

impl From<MetricsSample> for SampleView {
    fn from(sample: MetricsSample) -> Self {
        Self {
            backend_id: sample.backend_id.to_string(),
            timestamp: rfc3339(sample.timestamp_ms),
            timestamp_ms: sample.timestamp_ms,
            mem_total: sample.mem_total,
            mem_used: sample.mem_used,
            mem_active: sample.mem_active,
            mem_inactive: sample.mem_inactive,
            mem_unevictable: sample.mem_unevictable,
            mem_limit: sample.mem_limit,
            cpu_used: sample.cpu_used,
            sys_cpu: sample.sys_cpu,
            cpu_total_ns: sample.cpu_total_ns,
            sys_cpu_total_ns: sample.sys_cpu_total_ns,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SamplesQuery {
    /// RFC 3339, or milliseconds since the epoch.
    since: Option<String>,
    limit: Option<u32>,
}

/// Parses `since`: an RFC 3339 instant or integer milliseconds since the epoch.
pub fn parse_since(raw: &str) -> Result<Millis, String> {
    if let Ok(millis) = raw.parse::<i64>() {
        return Ok(millis);
    }
    chrono::DateTime::parse_from_rfc3339(raw)
        .map(|time| time.timestamp_millis())
        .map_err(|_| {
            format!("since: expected an RFC 3339 time or milliseconds since the epoch, got {raw:?}")
        })
}

/// `GET /v1/backends/{id}/metrics`: samples, oldest first, from `since`.
pub(super) async fn backend_metrics(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<SamplesQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<SampleView>>> {
    let id = parse_id(&id)?;
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let since = query
        .since
        .as_deref()
        .map(parse_since)
        .transpose()
        .map_err(ApiError::BadRequest)?;
    let limit = match query.limit {
        None => DEFAULT_SAMPLE_LIMIT,
        Some(n @ 1..=MAX_SAMPLE_LIMIT) => n,
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "limit: must be between 1 and {MAX_SAMPLE_LIMIT}, got {n}"
            )))
        }
    };
    load(&state.store, &id).await?;
    let samples = state.store.samples_for(&id, since, limit).await?;
    Ok(Json(samples.into_iter().map(SampleView::from).collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogsQuery {
    #[serde(default)]
    follow: bool,
    /// Only the last N lines; everything when absent.
    tail: Option<u64>,
}

/// `GET /v1/backends/{id}/logs`: the container's stdout and stderr as
/// chunked text; with `follow=true`, until the container stops or the
/// daemon shuts down.
pub(super) async fn backend_logs(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let row = load(&state.store, &id).await?;
    let Some(container) = row.container_id else {
        return Err(ApiError::Conflict(format!(
            "backend {id} has no container (status {})",
            row.status()
        )));
    };
    match state.docker.inspect(&container).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(ApiError::Conflict(format!(
                "the container of backend {id} no longer exists"
            )))
        }
        Err(e) => return Err(ApiError::Unavailable(e.to_string())),
    }
    let mut stopping = state.shutdown.clone();
    let stopped = async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    let backend = id.clone();
    let chunks = state
        .docker
        .logs(&container, query.follow, query.tail)
        .take_until(stopped)
        // A failure mid-stream ends the body; what was sent stays sent.
        .take_while(move |chunk| {
            if let Err(e) = chunk {
                tracing::debug!(backend = %backend, error = %e, "log stream ended");
            }
            std::future::ready(chunk.is_ok())
        })
        .filter_map(|chunk| std::future::ready(chunk.ok()))
        .map(|chunk| Ok::<_, std::convert::Infallible>(Bytes::from(chunk)));
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}

/// `GET /metrics`: the daemon's series in the Prometheus text format.
pub(super) async fn prometheus(State(state): State<ApiState>) -> ApiResult<Response> {
    let by_status = state.store.backend_counts_by_status().await?;
    let history = {
        let mut totals = state.telemetry.history.lock().await;
        state.store.add_history_totals(&mut totals).await?;
        totals.clone()
    };
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    ::metrics::with_local_recorder(&recorder, || record_series(&state, &by_status, &history));
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response())
}

fn record_series(state: &ApiState, by_status: &[(String, u64)], history: &HistoryTotals) {
    use ::metrics::{counter, describe_counter, describe_gauge, gauge};

    describe_gauge!("drover_backends", "Backends in each status now.");
    for status in BackendStatus::ALL {
        let count = by_status
            .iter()
            .find(|(s, _)| s == status.as_str())
            .map_or(0, |(_, n)| *n);
        gauge!("drover_backends", "status" => status.as_str()).set(count as f64);
    }

    describe_counter!(
        "drover_backend_transitions_total",
        "Status transitions recorded, by the status entered."
    );
    for status in BackendStatus::ALL {
        let count = history
            .transitions
            .iter()
            .find(|(s, _)| s == status.as_str())
            .map_or(0, |(_, n)| *n);
        counter!("drover_backend_transitions_total", "status" => status.as_str()).absolute(count);
    }

    describe_counter!(
        "drover_backend_exits_total",
        "Backend exits recorded, by exit code (\"unknown\" when none was learned)."
    );
    for (code, count) in &history.exits {
        let code = code.map_or_else(|| "unknown".to_string(), |c| c.to_string());
        counter!("drover_backend_exits_total", "exit_code" => code).absolute(*count);
    }

    let reconciler = &state.reconciler;
    describe_counter!("drover_reconcile_passes_total", "Reconcile passes run.");
    counter!("drover_reconcile_passes_total").absolute(reconciler.passes.load(Ordering::Relaxed));
    describe_counter!(
        "drover_reconcile_pass_microseconds_total",
        "Time spent in reconcile passes, in microseconds."
    );
    counter!("drover_reconcile_pass_microseconds_total")
        .absolute(reconciler.pass_micros_total.load(Ordering::Relaxed));
    describe_counter!(
        "drover_docker_event_stream_reconnects_total",
        "Times the Docker event stream was re-opened after a break."
    );
    counter!("drover_docker_event_stream_reconnects_total")
        .absolute(reconciler.stream_reconnects.load(Ordering::Relaxed));
    describe_gauge!(
        "drover_docker_up",
        "1 when the Docker engine answers, else 0."
    );
    gauge!("drover_docker_up").set(if reconciler.docker_up.load(Ordering::Relaxed) {
        1.0
    } else {
        0.0
    });

    let calls = state.docker.calls();
    describe_counter!(
        "drover_docker_calls_total",
        "Docker API calls made, by endpoint."
    );
    for (endpoint, count) in calls.snapshot() {
        counter!("drover_docker_calls_total", "endpoint" => endpoint).absolute(count);
    }
    describe_counter!(
        "drover_docker_errors_total",
        "Docker API calls that failed."
    );
    counter!("drover_docker_errors_total").absolute(calls.errors.load(Ordering::Relaxed));

    let sampler = state.telemetry.feed.status();
    describe_counter!("drover_metrics_ticks_total", "Resource sampling ticks run.");
    counter!("drover_metrics_ticks_total").absolute(sampler.ticks.load(Ordering::Relaxed));
    describe_counter!(
        "drover_metrics_tick_microseconds_total",
        "Wall time spent in sampling ticks, in microseconds."
    );
    counter!("drover_metrics_tick_microseconds_total")
        .absolute(sampler.tick_micros_total.load(Ordering::Relaxed));
    describe_counter!("drover_metrics_samples_total", "Resource samples stored.");
    counter!("drover_metrics_samples_total").absolute(sampler.samples.load(Ordering::Relaxed));
    describe_counter!(
        "drover_metrics_sample_errors_total",
        "Stats calls that failed while sampling."
    );
    counter!("drover_metrics_sample_errors_total").absolute(sampler.errors.load(Ordering::Relaxed));
    describe_counter!(
        "drover_metrics_samples_deleted_total",
        "Resource samples deleted by retention."
    );
    counter!("drover_metrics_samples_deleted_total")
        .absolute(sampler.deleted.load(Ordering::Relaxed));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_rfc3339_or_millis() {
        assert_eq!(parse_since("1700000000123"), Ok(1_700_000_000_123));
        assert_eq!(parse_since("2024-01-01T00:00:00.5Z"), Ok(1_704_067_200_500));
        assert_eq!(
            parse_since("2024-01-01T01:00:00+01:00"),
            Ok(1_704_067_200_000)
        );
        let err = parse_since("yesterday").unwrap_err();
        assert!(err.starts_with("since:"), "{err}");
    }
}
