//! The HTTP API's contract, against a real daemon: bad input is a `400`
//! naming the field and writes nothing; spawn is idempotent per id; unknown
//! ids are `404`; terminate is `202`, or a `200` no-op once terminated;
//! listing filters; timestamps are RFC 3339 UTC with milliseconds; `/healthz`;
//! and the database file's permissions.

use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;

const READY_WITHIN: Duration = Duration::from_secs(90);

async fn count(daemon: &Daemon, table: &str) -> i64 {
    daemon
        .query_one(&format!("SELECT count(*) FROM {table}"))
        .await
        .as_i64()
        .unwrap()
}

/// `2024-01-02T03:04:05.678Z`: RFC 3339, UTC, exactly three fraction digits.
fn is_rfc3339_utc_millis(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits =
        |range: std::ops::Range<usize>| range.into_iter().all(|i| bytes[i].is_ascii_digit());
    bytes.len() == 24
        && digits(0..4)
        && bytes[4] == b'-'
        && digits(5..7)
        && bytes[7] == b'-'
        && digits(8..10)
        && bytes[10] == b'T'
        && digits(11..13)
        && bytes[13] == b':'
        && digits(14..16)
        && bytes[16] == b':'
        && digits(17..19)
        && bytes[19] == b'.'
        && digits(20..23)
        && bytes[23] == b'Z'
        && chrono::DateTime::parse_from_rfc3339(text).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawning_the_same_id_twice_is_idempotent_and_a_different_spec_conflicts() {
    let daemon = Daemon::start().await;
    let id = format!("ba-idem{}", free_port());
    let body = json!({ "id": id, "executable": { "image": test_image(), "env": {"A": "1"} } });

    let (first_status, first) = daemon.post("/v1/backends", body.clone()).await;
    let (again_status, again) = daemon.post("/v1/backends", body.clone()).await;

    assert_eq!(first_status, 201, "{first}");
    assert_eq!(again_status, 200, "{again}");
    for field in ["id", "executable", "created_at", "desired"] {
        assert_eq!(again[field], first[field], "{field}");
    }
    let mut other = body.clone();
    other["executable"]["env"]["A"] = json!("2");
    let (conflict_status, conflict) = daemon.post("/v1/backends", other).await;
    assert_eq!(conflict_status, 409, "{conflict}");
    assert!(
        conflict["error"].as_str().unwrap().contains(&id),
        "{conflict}"
    );

    daemon.wait_status(&id, "ready", READY_WITHIN).await;
    let (late_status, late) = daemon.post("/v1/backends", body).await;
    assert_eq!(late_status, 200, "{late}");
    assert_eq!(late["status"], "ready");
    assert_eq!(
        late["executable"]["env"]["A"], "1",
        "the conflicting spec changed nothing"
    );
    assert_eq!(count(&daemon, "backends").await, 1);
    assert_eq!(
        daemon.statuses(&id).await,
        ["scheduled", "loading", "starting", "waiting", "ready"],
        "events are not duplicated"
    );
    assert_eq!(daemon.containers().len(), 1, "one container per backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_spawn_input_is_a_400_naming_the_field_and_writes_nothing() {
    let daemon = Daemon::start().await;
    let image = test_image();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // Syntax errors say where they are.
        (
            "malformed JSON",
            br#"{"executable": {"image": "#.to_vec(),
            "line 1 column",
        ),
        ("not an object", b"42".to_vec(), "invalid request body"),
        ("no executable", br#"{"id": "ba-x"}"#.to_vec(), "executable"),
        (
            "unknown pull policy",
            json!({"executable": {"image": image, "pull_policy": "Sometimes"}})
                .to_string()
                .into_bytes(),
            "pull_policy",
        ),
        (
            "unknown executable field",
            json!({"executable": {"image": image, "colour": "red"}})
                .to_string()
                .into_bytes(),
            "colour",
        ),
        (
            "invalid backend id",
            json!({"id": "BA-Upper", "executable": {"image": image}})
                .to_string()
                .into_bytes(),
            "id",
        ),
        (
            "backend id with a bad character",
            json!({"id": "ba-a_b", "executable": {"image": image}})
                .to_string()
                .into_bytes(),
            "id",
        ),
        (
            "backend id too long",
            json!({"id": format!("ba-{}", "a".repeat(43)), "executable": {"image": image}})
                .to_string()
                .into_bytes(),
            "id",
        ),
        (
            "empty image",
            json!({"executable": {"image": ""}})
                .to_string()
                .into_bytes(),
            "executable.image",
        ),
        (
            "mount path with ..",
            json!({"executable": {"image": image, "mount": "a/../../etc"}})
                .to_string()
                .into_bytes(),
            "executable.mount",
        ),
        (
            "absolute mount path",
            json!({"executable": {"image": image, "mount": "/etc"}})
                .to_string()
                .into_bytes(),
            "executable.mount",
        ),
        (
            "negative memory limit",
            json!({"executable": {"image": image, "resource_limits": {"memory_limit_bytes": -1}}})
                .to_string()
                .into_bytes(),
            "executable.resource_limits.memory_limit_bytes",
        ),
        (
            "negative cpu period",
            json!({"executable": {"image": image, "resource_limits": {"cpu_period": -100}}})
                .to_string()
                .into_bytes(),
            "executable.resource_limits.cpu_period",
        ),
    ];

    for (what, body, field) in cases {
        let (status, answer) = daemon.post_raw("/v1/backends", body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        let error = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error: {answer}"));
        assert!(
            error.contains(field),
            "{what}: error does not name {field:?}: {error}"
        );
    }

    assert_eq!(
        count(&daemon, "backends").await,
        0,
        "no backend row written"
    );
    assert_eq!(
        count(&daemon, "backend_events").await,
        0,
        "no event row written"
    );
    assert!(daemon.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_are_404_and_invalid_ids_400_on_get_terminate_and_events() {
    let daemon = Daemon::start().await;

    let (get, body) = daemon.get("/v1/backends/ba-nosuchbackend").await;
    assert_eq!(get, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("ba-nosuchbackend"),
        "{body}"
    );
    assert_eq!(daemon.terminate("ba-nosuchbackend", false).await, 404);
    assert_eq!(daemon.terminate("ba-nosuchbackend", true).await, 404);
    let (events, body) = daemon.get("/v1/backends/ba-nosuchbackend/events").await;
    assert_eq!(events, 404, "{body}");

    let (get, body) = daemon.get("/v1/backends/not-a-backend").await;
    assert_eq!(get, 400, "{body}");
    assert!(body["error"].as_str().unwrap().starts_with("id:"), "{body}");
    assert_eq!(daemon.terminate("not-a-backend", false).await, 400);
    assert_eq!(count(&daemon, "backends").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_a_terminated_backend_is_a_200_no_op() {
    let daemon = Daemon::start().await;
    let id = daemon.spawn(None).await;
    daemon.wait_status(&id, "ready", READY_WITHIN).await;
    let (accepted, requested) = daemon
        .post(
            &format!("/v1/backends/{id}/terminate"),
            json!({"hard": true}),
        )
        .await;
    assert_eq!(accepted, 202, "{requested}");
    assert_eq!(requested["desired"], "terminated");
    let done = daemon.wait_status(&id, "terminated", READY_WITHIN).await;
    let events_before = daemon.events(&id).await;

    for body in [
        json!({"hard": false}),
        json!({"hard": true, "reason": "swept"}),
    ] {
        let (status, again) = daemon
            .post(&format!("/v1/backends/{id}/terminate"), body)
            .await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again, done, "nothing changed");
    }

    assert_eq!(daemon.events(&id).await, events_before, "no event added");
    assert_eq!(daemon.backend(&id).await, done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_terminate_during_a_soft_ones_grace_kills_at_once() {
    let daemon = Daemon::start_with(DaemonConfig {
        soft_terminate_grace: "60s",
        ..DaemonConfig::default()
    })
    .await;
    let id = daemon.spawn(None).await;
    daemon.wait_status(&id, "ready", READY_WITHIN).await;
    assert_eq!(daemon.terminate(&id, false).await, 202);
    daemon.wait_status(&id, "terminating", READY_WITHIN).await;

    // A second soft request changes nothing; a hard one overrides.
    assert_eq!(daemon.terminate(&id, false).await, 202);
    assert_eq!(daemon.terminate(&id, true).await, 202);
    let done = daemon.wait_status(&id, "terminated", READY_WITHIN).await;

    assert_eq!(
        daemon.statuses(&id).await,
        [
            "scheduled",
            "loading",
            "starting",
            "waiting",
            "ready",
            "terminating",
            "hard-terminating",
            "terminated"
        ]
    );
    assert_eq!(done["exit_code"], 137);
    assert_eq!(done["state"]["termination"], "hard");
    assert_eq!(done["state"]["last_status"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_rejects_an_unknown_reason_and_a_malformed_body_and_changes_nothing() {
    let daemon = Daemon::start().await;
    let id = daemon.spawn(None).await;
    daemon.wait_status(&id, "ready", READY_WITHIN).await;
    let path = format!("/v1/backends/{id}/terminate");

    let (status, body) = daemon
        .post(&path, json!({"hard": true, "reason": "boredom"}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("reason"), "{body}");
    let (status, body) = daemon.post_raw(&path, b"{\"hard\": tru".to_vec()).await;
    assert_eq!(status, 400, "{body}");

    let backend = daemon.backend(&id).await;
    assert_eq!(backend["desired"], "running");
    assert_eq!(backend["status"], "ready");
    assert_eq!(
        daemon
            .query_one(&format!(
                "SELECT termination_kind FROM backends WHERE id = '{id}'"
            ))
            .await,
        Value::Null
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_with_a_status_returns_only_backends_in_that_status() {
    let daemon = Daemon::start().await;
    let ready = daemon.spawn(None).await;
    // Never listens: stays waiting for the 20 s startup timeout.
    let waiting = daemon.spawn(Some(&["sleep", "1000"])).await;
    daemon.wait_status(&ready, "ready", READY_WITHIN).await;
    daemon.wait_status(&waiting, "waiting", READY_WITHIN).await;

    let ids = |list: &Value| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, list) = daemon.get("/v1/backends?status=ready").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(ids(&list), [ready.clone()]);
    let (_, list) = daemon.get("/v1/backends?status=waiting").await;
    assert_eq!(ids(&list), [waiting.clone()]);
    let (_, list) = daemon.get("/v1/backends?status=terminated").await;
    assert_eq!(ids(&list), Vec::<String>::new());
    let (_, list) = daemon.get("/v1/backends").await;
    assert_eq!(ids(&list), [ready, waiting]);

    let (status, body) = daemon.get("/v1/backends?status=sleepy").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("status"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_are_rfc3339_utc_with_milliseconds() {
    let daemon = Daemon::start().await;
    let id = daemon.spawn(None).await;
    let backend = daemon.wait_status(&id, "ready", READY_WITHIN).await;

    for field in ["created_at", "updated_at"] {
        let text = backend[field].as_str().unwrap();
        assert!(is_rfc3339_utc_millis(text), "{field}: {text}");
    }
    let events = daemon.events(&id).await;
    assert_eq!(events.len(), 5, "{events:?}");
    let stored = query_json(
        &daemon.db_path(),
        &format!(
            "SELECT timestamp_ms FROM backend_events WHERE backend_id = '{id}' ORDER BY event_id"
        ),
    )
    .await;
    for (event, row) in events.iter().zip(&stored) {
        let text = event["timestamp"].as_str().unwrap();
        assert!(is_rfc3339_utc_millis(text), "{event}");
        let parsed = chrono::DateTime::parse_from_rfc3339(text).unwrap();
        assert_eq!(
            parsed.timestamp_millis(),
            row["timestamp_ms"].as_i64().unwrap()
        );
        assert_eq!(event["backend_id"], id.as_str());
        assert!(event["event_id"].is_i64());
    }
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e["event_id"].as_i64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_ok_once_the_store_is_open_and_docker_answered() {
    let daemon = Daemon::start().await;
    let (status, body) = daemon.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"status": "ok"}));
    let (status, body) = daemon.get("/v1/no-such-thing").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_file_and_its_wal_are_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let daemon = Daemon::start().await;
    // A write, so the WAL holds something.
    let id = daemon.spawn(Some(&["sleep", "1000"])).await;
    daemon.wait_status(&id, "waiting", READY_WITHIN).await;

    assert_eq!(daemon.query_one("PRAGMA journal_mode").await, "wal");
    let db = daemon.db_path();
    let wal = db.with_file_name("drover.db-wal");
    for path in [&db, &wal] {
        let mode = std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "{} has mode {:o}",
            path.display(),
            mode & 0o777
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_requests_succeed_while_the_reconciler_is_writing() {
    let daemon = Daemon::start().await;
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(daemon.spawn(None).await);
    }
    for id in &ids {
        daemon.wait_status(id, "ready", READY_WITHIN).await;
    }

    // Each request lands while the reconciler records the others' terminations.
    let daemon = &daemon;
    let answers = futures::future::join_all(ids.iter().map(|id| async move {
        let path = format!("/v1/backends/{id}/terminate");
        let soft = daemon.post(&path, json!({"hard": false})).await;
        let hard = daemon.post(&path, json!({"hard": true})).await;
        (soft, hard)
    }))
    .await;

    for ((soft, hard), id) in answers.iter().zip(&ids) {
        assert!(matches!(soft.0, 200 | 202), "{id} soft: {soft:?}");
        assert!(matches!(hard.0, 200 | 202), "{id} hard: {hard:?}");
    }
    for id in &ids {
        let done = daemon.wait_status(id, "terminated", READY_WITHIN).await;
        assert_eq!(done["desired"], "terminated");
    }
}
