//! `GET /v1/events`: every backend's transitions in history order, as a JSON
//! array of [`EventView`]s, or with `follow=true` as Server-Sent Events that
//! go on live (`id:` is the event id, `data:` the `EventView` JSON). `after`
//! (or the `Last-Event-ID` header a reconnecting client sends) resumes after
//! an event id; nothing is skipped.
//!
//! Also [`SseDecoder`], the small client-side reader of such a stream used by
//! the CLI. The stream is read from the store and woken by its commits; it
//! ends when the daemon stops.

use super::{ApiError, ApiResult, ApiState, EventView};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;

/// Rows a non-following request returns when it names no `limit`.
const DEFAULT_LIMIT: i64 = 1000;
const MAX_LIMIT: i64 = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    after: Option<i64>,
    follow: Option<bool>,
    limit: Option<i64>,
}

pub(super) async fn events(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let mut after = query.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::BadRequest("after: must not be negative".into()));
    }
    if let Some(last) = headers.get("last-event-id") {
        let last = last
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|v| *v >= 0)
            .ok_or_else(|| ApiError::BadRequest("Last-Event-ID: must be an event id".into()))?;
        after = after.max(last);
    }
    if !query.follow.unwrap_or(false) {
        let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::BadRequest(format!(
                "limit: must be between 1 and {MAX_LIMIT}"
            )));
        }
        let rows = state.store.events_after(after, limit).await?;
        let views: Vec<EventView> = rows.into_iter().map(EventView::from).collect();
        return Ok(Json(views).into_response());
    }
    if query.limit.is_some() {
        return Err(ApiError::BadRequest("limit: not allowed with follow=true".into()));
    }
    // Fail with a status now rather than with an empty stream.
    state.store.last_event_id().await?;
    let transitions = state
        .store
        .follow_events(after, state.shutdown.clone())
        // A failed read ends the stream; the client resumes with Last-Event-ID.
        .take_while(|row| {
            if let Err(error) = row {
                tracing::warn!(%error, "event stream ended by a store error");
            }
            std::future::ready(row.is_ok())
        })
        .filter_map(|row| std::future::ready(row.ok()))
        .map(|row| {
            let id = row.event_id.to_string();
            Event::default().id(id).json_data(EventView::from(row))
        });
    Ok(Sse::new(transitions)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// One message of a Server-Sent Events stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseMessage {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Cuts a Server-Sent Events byte stream into messages, chunk by chunk
/// (a chunk may end anywhere, even inside a line). Comments are skipped.
#[derive(Debug, Default)]
pub struct SseDecoder {
    pending: Vec<u8>,
    current: SseMessage,
    has_data: bool,
}

impl SseDecoder {
    /// Takes the next chunk; returns the messages it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseMessage> {
        self.pending.extend_from_slice(chunk);
        let mut done = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.pending.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                let message = std::mem::take(&mut self.current);
                if std::mem::take(&mut self.has_data) {
                    done.push(message);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line.as_ref(), ""),
            };
            match field {
                "data" => {
                    if self.has_data {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                    self.has_data = true;
                }
                "id" => self.current.id = Some(value.to_string()),
                "event" => self.current.event = Some(value.to_string()),
                _ => {}
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_reassembles_messages_split_anywhere() {
        let stream = b": keep-alive\n\nid: 7\ndata: {\"a\":1}\n\r\nevent: x\r\ndata: one\ndata: two\n\n";
        for split in 0..stream.len() {
            let mut decoder = SseDecoder::default();
            let mut messages = decoder.push(&stream[..split]);
            messages.extend(decoder.push(&stream[split..]));
            assert_eq!(
                messages,
                [
                    SseMessage {
                        id: Some("7".into()),
                        event: None,
                        data: "{\"a\":1}".into()
                    },
                    SseMessage {
                        id: None,
                        event: Some("x".into()),
                        data: "one\ntwo".into()
                    },
                ],
                "split at {split}"
            );
        }
    }
}
