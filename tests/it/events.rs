//! `GET /v1/events` (a JSON array, or Server-Sent Events with `follow=true`),
//! and the CLI commands on top of it: `drover events` and `drover spawn --wait`.

use crate::support::*;
use drover::api::events::{SseDecoder, SseMessage};
use futures::StreamExt;
use serde_json::Value;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(90);

/// An open `follow=true` stream, read message by message.
struct Follow {
    body: futures::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    decoder: SseDecoder,
    ready: std::collections::VecDeque<SseMessage>,
}

impl Follow {
    async fn open(daemon: &Daemon, query: &str, last_event_id: Option<i64>) -> Follow {
        let mut request = daemon.http.get(daemon.url(&format!("/v1/events?follow=true{query}")));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await.expect("GET /v1/events");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Follow {
            body: response.bytes_stream().boxed(),
            decoder: SseDecoder::default(),
            ready: Default::default(),
        }
    }

    /// The next message; `None` when the server ended the stream.
    async fn next(&mut self) -> Option<SseMessage> {
        loop {
            if let Some(message) = self.ready.pop_front() {
                return Some(message);
            }
            let chunk = tokio::time::timeout(WITHIN, self.body.next())
                .await
                .expect("a message within the timeout")?;
            self.ready.extend(self.decoder.push(&chunk.expect("stream chunk")));
        }
    }

    /// The next transition of `backend`, as the API's event JSON.
    async fn next_of(&mut self, backend: &str) -> Value {
        loop {
            let message = self.next().await.expect("stream open");
            let event: Value = serde_json::from_str(&message.data).expect("event JSON");
            assert_eq!(message.id.as_deref(), Some(event["event_id"].to_string().as_str()));
            if event["backend_id"] == backend {
                return event;
            }
        }
    }
}

fn cli(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("--api")
        .arg(daemon.url(""))
        .args(args)
        .env_remove("DROVER_API_TOKEN")
        .output()
        .expect("run drover")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_stream_delivers_each_transition_live() {
    let daemon = Daemon::start().await;
    let mut follow = Follow::open(&daemon, "", None).await;
    let id = daemon.spawn(None).await;
    let mut statuses = Vec::new();
    let mut ids = Vec::new();
    loop {
        let event = follow.next_of(&id).await;
        statuses.push(event["status"].as_str().unwrap().to_string());
        ids.push(event["event_id"].as_i64().unwrap());
        if event["status"] == "ready" {
            break;
        }
    }
    // Terminated only after the stream showed it ready: the stream is live.
    assert_eq!(daemon.terminate(&id, true).await, 202);
    loop {
        let event = follow.next_of(&id).await;
        statuses.push(event["status"].as_str().unwrap().to_string());
        ids.push(event["event_id"].as_i64().unwrap());
        if event["status"] == "terminated" {
            assert_eq!(event["exit_code"], 137);
            break;
        }
    }
    assert_eq!(
        statuses,
        ["scheduled", "loading", "starting", "waiting", "ready", "hard-terminating", "terminated"]
    );
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    let history: Vec<i64> = daemon.events(&id).await.iter().map(|e| e["event_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, history);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_resume_after_an_id_as_json_and_as_a_stream() {
    let daemon = Daemon::start().await;
    let first = daemon.spawn(Some(&["sh", "-c", "exit 4"])).await;
    daemon.wait_status(&first, "terminated", WITHIN).await;
    let (status, all) = daemon.get("/v1/events").await;
    assert_eq!(status, 200);
    let all = all.as_array().unwrap().clone();
    assert_eq!(all.last().unwrap()["exit_code"], 4);
    let head = all.last().unwrap()["event_id"].as_i64().unwrap();
    let cut = all[1]["event_id"].as_i64().unwrap();
    let (_, after) = daemon.get(&format!("/v1/events?after={cut}&limit=2")).await;
    assert_eq!(after.as_array().unwrap()[..], all[2..4]);
    assert_eq!(daemon.get("/v1/events?after=-1").await.0, 400);
    assert_eq!(daemon.get("/v1/events?limit=0").await.0, 400);

    // A reconnecting client's Last-Event-ID wins over an older `after`.
    let second = daemon.spawn(Some(&["sh", "-c", "exit 5"])).await;
    let mut follow = Follow::open(&daemon, "&after=0", Some(head)).await;
    let message = follow.next().await.unwrap();
    let event: Value = serde_json::from_str(&message.data).unwrap();
    assert_eq!(event["backend_id"], second.as_str());
    assert_eq!(event["status"], "scheduled");
    assert!(event["event_id"].as_i64().unwrap() > head);

    // The CLI pages through the same history.
    let output = cli(&daemon, &["events", "--json", "--after", &cut.to_string()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let listed: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listed[..all.len() - 2], all[2..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_wait_prints_transitions_until_ready_and_fails_when_terminated() {
    let daemon = Daemon::start().await;
    let image = test_image();
    let ok = tokio::task::spawn_blocking({
        let args = ["spawn", "--image", image, "--wait"];
        let url = daemon.url("");
        move || {
            std::process::Command::new(BIN)
                .arg("--api")
                .arg(url)
                .args(args)
                .output()
                .unwrap()
        }
    });
    let ok = tokio::time::timeout(WITHIN, ok).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout).to_string();
    assert!(ok.status.success(), "{stdout}{}", String::from_utf8_lossy(&ok.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    let id = lines[0];
    let printed: Vec<&str> = lines[1..]
        .iter()
        .map(|line| line.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(printed, ["scheduled", "loading", "starting", "waiting", "ready"]);
    daemon.wait_status(id, "ready", WITHIN).await;

    let failed = tokio::task::spawn_blocking({
        let url = daemon.url("");
        move || {
            std::process::Command::new(BIN)
                .arg("--api")
                .arg(url)
                .args(["spawn", "--image", image, "--wait", "--", "sh", "-c", "exit 5"])
                .output()
                .unwrap()
        }
    });
    let failed = tokio::time::timeout(WITHIN, failed).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&failed.stdout).to_string();
    let stderr = String::from_utf8_lossy(&failed.stderr).to_string();
    assert!(!failed.status.success(), "{stdout}");
    assert!(stdout.lines().last().unwrap().contains("terminated"), "{stdout}");
    assert!(stderr.contains("exit=5"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_stops_promptly_with_a_follower_attached() {
    let mut daemon = Daemon::start().await;
    let mut follow = Follow::open(&daemon, "", None).await;
    let stopped = tokio::task::spawn_blocking(move || {
        let status = daemon.stop();
        (daemon, status)
    });
    let (_daemon, status) = tokio::time::timeout(WITHIN, stopped).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
    assert!(follow.next().await.is_none(), "the stream ends with the daemon");
}
