//! Resource samples, `/metrics` and container logs, against the real engine:
//! rows appear while a backend runs and stop when it exits, retention keeps
//! the table bounded, the Prometheus series say what happened, and logs reach
//! the API and the CLI.

use crate::support::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

const READY_WITHIN: Duration = Duration::from_secs(90);
const SAMPLES_WITHIN: Duration = Duration::from_secs(60);

fn sampling(interval: &str, retention: &str) -> DaemonConfig {
    DaemonConfig {
        extra_toml: format!("[metrics]\ninterval = {interval:?}\nretention = {retention:?}\n"),
        ..DaemonConfig::default()
    }
}

/// The value of one series in a Prometheus text page (`name{labels}` exactly as rendered).
fn series(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
}

async fn scrape(daemon: &Daemon) -> String {
    let response = daemon
        .http
        .get(daemon.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status().as_u16(), 200);
    response.text().await.unwrap()
}

/// Waits until the sampler has run `ticks` more times than now.
async fn wait_ticks(daemon: &Daemon, ticks: f64) {
    let start = series(&scrape(daemon).await, "drover_metrics_ticks_total").expect("ticks series");
    wait_for("sampler ticks", SAMPLES_WITHIN, || async {
        series(&scrape(daemon).await, "drover_metrics_ticks_total").unwrap() >= start + ticks
    })
    .await;
}

async fn samples(daemon: &Daemon, id: &str) -> Vec<Value> {
    let (status, body) = daemon.get(&format!("/v1/backends/{id}/metrics")).await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().clone()
}

async fn max_sample_time(daemon: &Daemon, id: &str) -> Value {
    daemon
        .query_one(&format!(
            "SELECT MAX(timestamp_ms) FROM metrics_samples WHERE backend_id = '{id}'"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_appear_for_a_running_backend_with_its_memory_and_stop_when_it_exits() {
    let daemon = Daemon::start_with(sampling("300ms", "1h")).await;
    let limit = 64 * 1024 * 1024;
    let id = daemon
        .spawn_executable(json!({
            "image": test_image(),
            "resource_limits": { "memory_limit_bytes": limit }
        }))
        .await;
    daemon.wait_status(&id, "ready", READY_WITHIN).await;

    wait_for("two samples of the backend", SAMPLES_WITHIN, || async {
        samples(&daemon, &id).await.len() >= 2
    })
    .await;
    let rows = samples(&daemon, &id).await;
    let (first, second) = (&rows[0], &rows[1]);
    assert_eq!(first["backend_id"], id.as_str());
    assert!(first["mem_used"].as_u64().unwrap() > 0, "{first}");
    assert!(first["mem_total"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(first["mem_limit"].as_u64(), Some(limit), "{first}");
    assert!(first["cpu_total_ns"].as_u64().unwrap() > 0, "{first}");
    // CPU is reported as Plane does, as deltas between two samples.
    assert_eq!(first["cpu_used"], Value::Null, "{first}");
    assert!(second["sys_cpu"].as_u64().unwrap() > 0, "{second}");
    assert_eq!(
        second["cpu_used"].as_u64().unwrap(),
        second["cpu_total_ns"].as_u64().unwrap() - first["cpu_total_ns"].as_u64().unwrap()
    );
    assert!(second["timestamp_ms"].as_i64() > first["timestamp_ms"].as_i64());
    let stored = query_json(
        &daemon.db_path(),
        &format!("SELECT COUNT(*) AS n, MIN(mem_used) AS low FROM metrics_samples WHERE backend_id = '{id}'"),
    )
    .await;
    assert!(stored[0]["n"].as_i64().unwrap() >= 2);
    assert!(stored[0]["low"].as_i64().unwrap() > 0);
    // `since` (RFC 3339 or ms) leaves out older samples.
    let since = second["timestamp_ms"].as_i64().unwrap();
    let (status, later) = daemon
        .get(&format!("/v1/backends/{id}/metrics?since={since}"))
        .await;
    assert_eq!(status, 200);
    assert!(later
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["timestamp_ms"].as_i64().unwrap() >= since));
    assert!(later.as_array().unwrap().len() < samples(&daemon, &id).await.len());
    let (status, body) = daemon
        .get(&format!("/v1/backends/{id}/metrics?since=yesterday"))
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("since"), "{body}");

    assert_eq!(daemon.terminate(&id, true).await, 202);
    daemon.wait_status(&id, "terminated", READY_WITHIN).await;
    wait_ticks(&daemon, 1.0).await;
    let last = max_sample_time(&daemon, &id).await;
    wait_ticks(&daemon, 3.0).await;
    assert_eq!(
        max_sample_time(&daemon, &id).await,
        last,
        "samples after the exit"
    );

    let (status, _) = daemon.get("/v1/backends/ba-never-spawned/metrics").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_samples_older_than_the_configured_age() {
    let daemon = Daemon::start_with(sampling("300ms", "2s")).await;
    let id = daemon.spawn(None).await;
    daemon.wait_status(&id, "ready", READY_WITHIN).await;
    wait_for("a first sample", SAMPLES_WITHIN, || async {
        !samples(&daemon, &id).await.is_empty()
    })
    .await;
    let first = samples(&daemon, &id).await[0]["timestamp_ms"]
        .as_i64()
        .unwrap();

    // The backend keeps running: new samples come, the first one ages out.
    wait_for("the first sample to be deleted", SAMPLES_WITHIN, || async {
        let rows = samples(&daemon, &id).await;
        !rows.is_empty() && rows[0]["timestamp_ms"].as_i64().unwrap() > first
    })
    .await;
    let page = scrape(&daemon).await;
    assert!(
        series(&page, "drover_metrics_samples_deleted_total").unwrap() >= 1.0,
        "{page}"
    );
    // Bounded: ticks are at least 300 ms apart, so 2 s holds a handful of
    // samples (with slack for a tick's rows before its own retention pass).
    let count = daemon
        .query_one(&format!(
            "SELECT COUNT(*) FROM metrics_samples WHERE backend_id = '{id}'"
        ))
        .await;
    assert!(
        count.as_i64().unwrap() <= 12,
        "{count} samples kept for 2 s of retention"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_page_counts_backends_transitions_exits_and_docker_calls() {
    let daemon = Daemon::start_with(sampling("300ms", "1h")).await;
    let id = daemon.spawn(None).await;
    daemon.wait_status(&id, "ready", READY_WITHIN).await;

    let page = scrape(&daemon).await;
    assert_eq!(
        series(&page, r#"drover_backends{status="ready"}"#),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        series(&page, r#"drover_backends{status="terminated"}"#),
        Some(0.0),
        "{page}"
    );
    for status in ["scheduled", "loading", "starting", "waiting", "ready"] {
        let name = format!(r#"drover_backend_transitions_total{{status="{status}"}}"#);
        assert_eq!(series(&page, &name), Some(1.0), "{name} in\n{page}");
    }
    assert!(
        series(&page, "drover_reconcile_passes_total").unwrap() >= 1.0,
        "{page}"
    );
    assert!(
        series(&page, "drover_reconcile_pass_microseconds_total").unwrap() > 0.0,
        "{page}"
    );
    for endpoint in ["create", "start", "list"] {
        let name = format!(r#"drover_docker_calls_total{{endpoint="{endpoint}"}}"#);
        assert!(series(&page, &name).unwrap() >= 1.0, "{name} in\n{page}");
    }
    assert!(
        series(&page, "drover_docker_errors_total").is_some(),
        "{page}"
    );
    assert_eq!(
        series(&page, "drover_docker_event_stream_reconnects_total"),
        Some(0.0),
        "{page}"
    );
    assert_eq!(series(&page, "drover_docker_up"), Some(1.0), "{page}");
    assert!(
        page.contains("# TYPE drover_backend_transitions_total counter"),
        "{page}"
    );
    assert!(page.contains("# TYPE drover_backends gauge"), "{page}");
    wait_for("a sample", SAMPLES_WITHIN, || async {
        !samples(&daemon, &id).await.is_empty()
    })
    .await;

    assert_eq!(daemon.terminate(&id, true).await, 202);
    daemon.wait_status(&id, "terminated", READY_WITHIN).await;
    let page = scrape(&daemon).await;
    assert_eq!(
        series(&page, r#"drover_backends{status="ready"}"#),
        Some(0.0),
        "{page}"
    );
    assert_eq!(
        series(&page, r#"drover_backends{status="terminated"}"#),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        series(&page, r#"drover_backend_exits_total{exit_code="137"}"#),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        series(
            &page,
            r#"drover_backend_transitions_total{status="terminated"}"#
        ),
        Some(1.0),
        "{page}"
    );
    // Sampling cost: one stats call per running backend per tick, nothing more.
    let stats_calls = series(&page, r#"drover_docker_calls_total{endpoint="stats"}"#).unwrap();
    let stored = series(&page, "drover_metrics_samples_total").unwrap();
    assert!(stored >= 1.0 && stats_calls >= stored, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_page_requires_the_api_token_when_one_is_set() {
    let daemon = Daemon::start_with(DaemonConfig {
        extra_toml: "api_token = \"metrics-secret\"\n".to_string(),
        ..DaemonConfig::default()
    })
    .await;
    let bare = daemon
        .http
        .get(daemon.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status().as_u16(), 401);
    let authorized = daemon
        .http
        .get(daemon.url("/metrics"))
        .bearer_auth("metrics-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(authorized.status().as_u16(), 200);
    let page = authorized.text().await.unwrap();
    assert_eq!(
        series(&page, r#"drover_backends{status="ready"}"#),
        Some(0.0),
        "{page}"
    );
}

fn cli(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--api")
        .arg(daemon.url(""))
        .args(args)
        .env_remove("DROVER_API_TOKEN")
        .output()
        .expect("run drover")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_a_backend_reach_the_api_and_the_cli_while_its_container_exists() {
    let daemon = Daemon::start_with(sampling("300ms", "1h")).await;
    let id = daemon
        .spawn(Some(&[
            "sh",
            "-c",
            "echo drover-log-line-42; echo drover-to-stderr >&2; exec httpd -f -p $PORT -h /www",
        ]))
        .await;
    daemon.wait_status(&id, "ready", READY_WITHIN).await;

    let logs = |query: &'static str| {
        let url = daemon.url(&format!("/v1/backends/{id}/logs{query}"));
        let http = daemon.http.clone();
        async move {
            let response = http.get(url).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (status, text) = logs("").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("drover-log-line-42\n"), "{text:?}");
    assert!(text.contains("drover-to-stderr\n"), "{text:?}");
    // Docker orders stdout and stderr lines by arrival, so which comes last varies.
    let (status, text) = logs("?tail=1").await;
    assert_eq!(status, 200);
    assert!(
        text == "drover-to-stderr\n" || text == "drover-log-line-42\n",
        "{text:?}"
    );

    let output = cli(&daemon, &["logs", &id]);
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("drover-log-line-42"), "{printed}");

    wait_for("a sample", SAMPLES_WITHIN, || async {
        !samples(&daemon, &id).await.is_empty()
    })
    .await;
    let output = cli(&daemon, &["metrics", &id]);
    assert!(output.status.success(), "{output:?}");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.starts_with("TIME"), "{table}");
    assert!(table.lines().count() >= 2, "{table}");
    let output = cli(&daemon, &["metrics", &id, "--json"]);
    let parsed: Value = serde_json::from_slice(&output.stdout).expect("metrics --json");
    assert!(!parsed.as_array().unwrap().is_empty());

    // A followed stream gets the output, then ends when the container stops.
    let mut follow = daemon
        .http
        .get(daemon.url(&format!("/v1/backends/{id}/logs?follow=true")))
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status().as_u16(), 200);
    let mut seen = String::new();
    while !seen.contains("drover-log-line-42") {
        let chunk = tokio::time::timeout(SAMPLES_WITHIN, follow.chunk())
            .await
            .expect("followed logs")
            .unwrap()
            .expect("stream open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(daemon.terminate(&id, true).await, 202);
    let rest = tokio::time::timeout(READY_WITHIN, async {
        while follow.chunk().await.unwrap().is_some() {}
    })
    .await;
    assert!(rest.is_ok(), "followed logs did not end with the container");
    daemon.wait_status(&id, "terminated", READY_WITHIN).await;

    // Unknown backend: 404. A backend that never had a container: 409.
    let (status, _) = daemon.get("/v1/backends/ba-nobody-here/logs").await;
    assert_eq!(status, 404);
    let missing = daemon
        .spawn_executable(json!({"image": "drover-test/absent:never", "pull_policy": "Never"}))
        .await;
    daemon
        .wait_status(&missing, "terminated", READY_WITHIN)
        .await;
    let (status, body) = daemon.get(&format!("/v1/backends/{missing}/logs")).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("no container"),
        "{body}"
    );
    let output = cli(&daemon, &["logs", &missing]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no container"),
        "{output:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_stops_promptly_while_a_client_follows_logs() {
    let mut daemon = Daemon::start().await;
    let id = daemon.spawn(None).await;
    daemon.wait_status(&id, "ready", READY_WITHIN).await;
    let mut follow = daemon
        .http
        .get(daemon.url(&format!("/v1/backends/{id}/logs?follow=true")))
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status().as_u16(), 200);

    let pid = daemon.child.as_ref().unwrap().id() as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = daemon.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");
    // The stream ended with the daemon; the backend's container keeps running.
    while let Ok(Some(_)) = follow.chunk().await {}
    assert!(daemon
        .containers()
        .iter()
        .any(|(_, _, state)| state == "running"));
}
