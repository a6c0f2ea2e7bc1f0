//! The SQL history: every query of `docs/sql.md`, the views, and
//! `drover sql`, checked on a database recorded from one real run.
//!
//! The run (made once, shared by the tests here) spawns backends with
//! different ends — one that never starts, one soft-terminated that handles
//! SIGTERM (exit 0), one that exits 3 on its own, one hard-killed (137), one
//! still ready at the end — samples their memory, goes through a Docker
//! outage (drover talks to the engine through a socket proxy the run closes
//! for a while), and runs a prune. Each query is read from `docs/sql.md` by its
//! `<!-- query: NAME -->` marker, so the documented text is what is tested.

use crate::support::*;
use drover::model::now_millis;
use drover::store::sql::{query_read_only, QueryResult, SqlParam};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(90);
const DOC: &str = include_str!("../../docs/sql.md");
/// The images of the run: the test image by its full name, and by its bare
/// name (the same image, but another `image` string, so queries by image
/// have two groups to tell apart).
const TAGGED: &str = "drover-test/busybox:latest";
const BARE: &str = "drover-test/busybox";
const ABSENT: &str = "drover-test/absent:none";

/// Every query in docs/sql.md, each checked by a test below.
const TESTED: [&str; 10] = [
    "time-to-ready-percentiles",
    "backends-lost-per-day",
    "images-exiting-non-zero",
    "running-at-instant",
    "peak-memory-per-backend",
    "prune-history",
    "exit-codes-last-hour",
    "docker-outages",
    "backend-history",
    "how-backends-ended",
];

/// What the recorded run did, and the copy of its database.
struct RecordedRun {
    _dir: tempfile::TempDir,
    db: PathBuf,
    /// Image absent, pull policy Never: terminated with `internalerror`.
    never_started: String,
    /// Ready, then soft-terminated; its shell handles SIGTERM with exit 0.
    soft: String,
    /// Ready, then exits 3 on its own (image named without its tag).
    self_exit: String,
    /// Ready, then hard-terminated: SIGKILL, 137.
    hard: String,
    /// Still ready when the run ended.
    live: String,
    /// An instant when the last four were all ready.
    all_ready_at: i64,
    /// An instant after the soft, self-exit and hard backends had ended.
    ended_at: i64,
    /// The `POST /v1/prune` answer of the run.
    prune: Value,
}

fn recorded_run() -> &'static RecordedRun {
    static RUN: OnceLock<Result<RecordedRun, String>> = OnceLock::new();
    let recorded = RUN.get_or_init(|| {
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(record())
        })
        .join()
        .map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the recorded run panicked".into())
        })
    });
    match recorded {
        Ok(run) => run,
        Err(message) => panic!("the recorded run failed: {message}"),
    }
}

async fn run() -> &'static RecordedRun {
    tokio::task::spawn_blocking(recorded_run).await.unwrap()
}

/// Serves HTTP, and exits with `code` once `/tmp/go` exists in the container.
fn exit_on_cue(code: u8) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("httpd -p $PORT -h /www; while [ ! -f /tmp/go ]; do sleep 0.1; done; exit {code}"),
    ]
}

async fn record() -> RecordedRun {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let mut proxy = SocketProxy::open(socket.clone());
    let mut daemon = Daemon::start_with(DaemonConfig {
        extra_toml: "[metrics]\ninterval = \"200ms\"\n\n[prune]\ninterval = \"1h\"\nmin_age = \"0s\"\n".into(),
        env: vec![("DOCKER_HOST".into(), format!("unix://{}", socket.display()))],
        ..Default::default()
    })
    .await;

    let never_started = daemon
        .spawn_executable(json!({ "image": ABSENT, "pull_policy": "Never" }))
        .await;
    daemon.wait_status(&never_started, "terminated", WITHIN).await;
    let soft = daemon
        .spawn_executable(json!({
            "image": test_image(),
            "command": ["sh", "-c", "trap 'exit 0' TERM; httpd -f -p $PORT -h /www & wait"],
        }))
        .await;
    let self_exit = daemon
        .spawn_executable(json!({ "image": BARE, "command": exit_on_cue(3) }))
        .await;
    let hard = daemon.spawn(None).await;
    let live = daemon.spawn(None).await;
    let running = [&soft, &self_exit, &hard, &live];
    for id in running {
        daemon.wait_status(id, "ready", WITHIN).await;
    }
    let ids = running.map(|id| format!("'{id}'")).join(", ");
    wait_for("a memory sample of every running backend", WITHIN, || async {
        daemon
            .query_one(&format!(
                "SELECT COUNT(DISTINCT backend_id) FROM metrics_samples WHERE backend_id IN ({ids})"
            ))
            .await
            == 4
    })
    .await;

    // The engine stops answering drover for a while.
    proxy.close();
    wait_for("drover to open an outage", WITHIN, || async {
        daemon
            .query_one("SELECT COUNT(*) FROM docker_outages WHERE ended_at_ms IS NULL")
            .await
            == 1
    })
    .await;
    proxy.reopen();
    let deadline = std::time::Instant::now() + WITHIN;
    while daemon
        .query_one("SELECT COUNT(*) FROM docker_outages WHERE ended_at_ms IS NOT NULL")
        .await
        != 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "drover did not close the outage; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let all_ready_at = now_millis();
    assert_eq!(daemon.terminate(&soft, false).await, 202);
    let done = daemon.wait_status(&soft, "terminated", WITHIN).await;
    assert_eq!(done["exit_code"], 0, "{done}");
    let container = daemon.backend(&self_exit).await["container_id"]
        .as_str()
        .unwrap()
        .to_string();
    docker(&["exec", &container, "touch", "/tmp/go"]);
    let done = daemon.wait_status(&self_exit, "terminated", WITHIN).await;
    assert_eq!(done["exit_code"], 3, "{done}");
    assert_eq!(daemon.terminate(&hard, true).await, 202);
    let done = daemon.wait_status(&hard, "terminated", WITHIN).await;
    assert_eq!(done["exit_code"], 137, "{done}");
    let ended_at = now_millis();

    let (status, prune) = daemon.post("/v1/prune", Value::Null).await;
    assert_eq!(status, 200, "{prune}");

    daemon.stop();
    let db = dir.path().join("recorded.db");
    for suffix in ["", "-wal", "-shm"] {
        let source = PathBuf::from(format!("{}{suffix}", daemon.db_path().display()));
        if source.exists() {
            std::fs::copy(&source, format!("{}{suffix}", db.display())).unwrap();
        }
    }
    drop(daemon);
    proxy.close();
    RecordedRun {
        _dir: dir,
        db,
        never_started,
        soft,
        self_exit,
        hard,
        live,
        all_ready_at,
        ended_at,
        prune,
    }
}

/// A unix socket that forwards every connection to the Docker engine, and
/// can be closed (cutting every open connection) to fake an engine outage
/// for the one daemon that uses it.
struct SocketProxy {
    path: PathBuf,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SocketProxy {
    fn open(path: PathBuf) -> SocketProxy {
        let mut proxy = SocketProxy { path, task: None };
        proxy.reopen();
        proxy
    }

    /// Listens again, at the same path.
    fn reopen(&mut self) {
        assert!(self.task.is_none(), "proxy already open");
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).unwrap();
        let task = tokio::spawn(async move {
            // Dropped with the task: every forwarded connection ends with it.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut engine) = tokio::net::UnixStream::connect("/var/run/docker.sock").await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut engine).await;
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        self.task = Some(task);
    }

    /// Stops listening and cuts every forwarded connection.
    fn close(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for SocketProxy {
    fn drop(&mut self) {
        self.close();
    }
}

/// The SQL under `<!-- query: NAME -->` in docs/sql.md.
fn doc_query(name: &str) -> String {
    let marker = format!("<!-- query: {name} -->");
    let after = DOC
        .split_once(&marker)
        .unwrap_or_else(|| panic!("docs/sql.md has no {marker}"))
        .1;
    let block = after
        .trim_start()
        .strip_prefix("```sql\n")
        .unwrap_or_else(|| panic!("{marker} is not followed by a ```sql block"));
    block.split_once("```").unwrap().0.to_string()
}

/// Runs a documented query on the recorded database, read-only, as `drover sql` does.
async fn documented(name: &str, params: &[&str]) -> QueryResult {
    let params: Vec<SqlParam> = params.iter().map(|p| SqlParam::infer(p)).collect();
    query_read_only(&run().await.db, &doc_query(name), &params)
        .await
        .unwrap_or_else(|e| panic!("query {name}: {e}"))
}

/// Raw facts from the recorded database, for the expected answers.
async fn facts(sql: &str) -> Vec<Value> {
    query_read_only(&run().await.db, sql, &[]).await.unwrap().to_objects()
}

fn column<'a>(result: &'a QueryResult, row: usize, name: &str) -> &'a Value {
    let index = result
        .columns
        .iter()
        .position(|c| c == name)
        .unwrap_or_else(|| panic!("no column {name} in {:?}", result.columns));
    &result.rows[row][index]
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn event_time(id: &str, status: &str) -> i64 {
    facts(&format!(
        "SELECT timestamp_ms FROM backend_events WHERE backend_id = '{id}' AND status = '{status}'"
    ))
    .await[0]["timestamp_ms"]
        .as_i64()
        .unwrap()
}

async fn created_at(id: &str) -> i64 {
    facts(&format!("SELECT created_at_ms FROM backends WHERE id = '{id}'")).await[0]["created_at_ms"]
        .as_i64()
        .unwrap()
}

fn approx(value: &Value, expected: f64) -> bool {
    value.as_f64().is_some_and(|v| (v - expected).abs() < 1e-6)
}

#[test]
fn every_documented_query_is_tested() {
    let documented: BTreeSet<&str> = DOC
        .match_indices("<!-- query: ")
        .map(|(at, marker)| {
            let rest = &DOC[at + marker.len()..];
            rest.split_once(" -->").unwrap().0
        })
        .collect();
    assert_eq!(documented, BTreeSet::from(TESTED));
    for name in TESTED {
        assert!(!doc_query(name).trim().is_empty(), "{name}");
    }
}

#[tokio::test]
async fn time_to_ready_percentiles_are_nearest_rank_per_image() {
    let raw = facts(
        "SELECT b.image, (e.timestamp_ms - b.created_at_ms) / 1000.0 AS seconds FROM backends b \
         JOIN backend_events e ON e.backend_id = b.id AND e.status = 'ready'",
    )
    .await;
    let mut by_image: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for row in raw {
        by_image
            .entry(row["image"].as_str().unwrap().to_string())
            .or_default()
            .push(row["seconds"].as_f64().unwrap());
    }
    assert_eq!(by_image.keys().collect::<Vec<_>>(), [BARE, TAGGED]);
    assert_eq!(by_image[TAGGED].len(), 3);

    let result = documented("time-to-ready-percentiles", &[]).await;
    assert_eq!(result.columns, ["image", "backends", "p50", "p90", "p99", "max"]);
    assert_eq!(result.rows.len(), by_image.len());
    for (row, (image, mut seconds)) in by_image.into_iter().enumerate() {
        seconds.sort_by(f64::total_cmp);
        let rank = |p: f64| seconds[((p * seconds.len() as f64).ceil() as usize).max(1) - 1];
        assert_eq!(column(&result, row, "image"), &json!(image));
        assert_eq!(column(&result, row, "backends"), &json!(seconds.len()));
        for (name, p) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
            assert!(approx(column(&result, row, name), rank(p)), "{image} {name}: {:?}", result.rows[row]);
        }
        assert!(approx(column(&result, row, "max"), *seconds.last().unwrap()));
    }
}

#[tokio::test]
async fn backends_lost_per_day_counts_the_ends_nobody_asked_for() {
    let run = run().await;
    let mut expected: BTreeMap<String, [i64; 4]> = BTreeMap::new();
    // The self-exit ended on its own; the never-started one failed to start.
    for (id, kind) in [(&run.self_exit, 1), (&run.never_started, 3)] {
        let day = rfc3339(event_time(id, "terminated").await)[..10].to_string();
        let counts = expected.entry(day).or_default();
        counts[0] += 1;
        counts[kind] += 1;
    }
    let result = documented("backends-lost-per-day", &[]).await;
    assert_eq!(result.columns, ["day", "lost", "exited_on_their_own", "vanished", "failed_to_start"]);
    let answered: BTreeMap<String, [i64; 4]> = result
        .rows
        .iter()
        .map(|row| {
            (
                row[0].as_str().unwrap().to_string(),
                [1, 2, 3, 4].map(|i| row[i].as_i64().unwrap()),
            )
        })
        .collect();
    assert_eq!(answered, expected);
}

#[tokio::test]
async fn images_exiting_non_zero_lists_each_code_with_who_asked() {
    let run = run().await;
    let result = documented("images-exiting-non-zero", &[]).await;
    assert_eq!(result.columns, ["image", "exit_code", "backends", "unrequested", "last_seen"]);
    let self_exit_at = rfc3339(event_time(&run.self_exit, "terminated").await);
    let hard_at = rfc3339(event_time(&run.hard, "terminated").await);
    assert_eq!(
        result.rows,
        [
            vec![json!(BARE), json!(3), json!(1), json!(1), json!(self_exit_at)],
            vec![json!(TAGGED), json!(137), json!(1), json!(0), json!(hard_at)],
        ]
    );
}

#[tokio::test]
async fn running_at_instant_shows_what_was_alive_then() {
    let run = run().await;
    let mut all = vec![run.soft.clone(), run.self_exit.clone(), run.hard.clone(), run.live.clone()];
    all.sort();
    let then = documented("running-at-instant", &[&rfc3339(run.all_ready_at)]).await;
    assert_eq!(then.columns, ["id", "image", "status_then", "since"]);
    let ids: Vec<String> = (0..then.rows.len())
        .map(|i| column(&then, i, "id").as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, all);
    for row in 0..then.rows.len() {
        assert_eq!(column(&then, row, "status_then"), "ready");
    }
    let ready_since = rfc3339(event_time(&run.live, "ready").await);
    let live_row = all.iter().position(|id| *id == run.live).unwrap();
    assert_eq!(column(&then, live_row, "since"), &json!(ready_since));

    // Written the way a user would type it: UTC, space, no zone.
    let later = rfc3339(run.ended_at).replace('T', " ").replace('Z', "");
    let later = documented("running-at-instant", &[&later]).await;
    assert_eq!(later.rows.len(), 1, "{:?}", later.rows);
    assert_eq!(column(&later, 0, "id"), &json!(run.live));
    assert_eq!(column(&later, 0, "image"), TAGGED);

    let before = rfc3339(created_at(&run.never_started).await - 1_000);
    assert!(documented("running-at-instant", &[&before]).await.rows.is_empty());
}

#[tokio::test]
async fn peak_memory_per_backend_is_the_largest_sample() {
    let run = run().await;
    let raw = facts("SELECT backend_id, mem_used, mem_total, mem_limit FROM metrics_samples").await;
    let mut peaks: BTreeMap<String, [i64; 4]> = BTreeMap::new();
    for row in raw {
        let peak = peaks
            .entry(row["backend_id"].as_str().unwrap().to_string())
            .or_insert([0; 4]);
        for (i, name) in ["mem_used", "mem_total", "mem_limit"].into_iter().enumerate() {
            peak[i] = peak[i].max(row[name].as_i64().unwrap());
        }
        peak[3] += 1;
    }
    for id in [&run.soft, &run.self_exit, &run.hard, &run.live] {
        assert!(peaks[id.as_str()][0] > 0, "{id} has no memory use: {peaks:?}");
    }
    let mut expected: Vec<(String, [i64; 4])> = peaks.into_iter().collect();
    expected.sort_by(|(a_id, a), (b_id, b)| b[0].cmp(&a[0]).then(a_id.cmp(b_id)));
    expected.truncate(20);

    let result = documented("peak-memory-per-backend", &[]).await;
    assert_eq!(
        result.columns,
        ["id", "image", "peak_mem_used", "peak_mem_total", "mem_limit", "samples"]
    );
    let answered: Vec<(String, [i64; 4])> = result
        .rows
        .iter()
        .map(|row| {
            (
                row[0].as_str().unwrap().to_string(),
                [2, 3, 4, 5].map(|i| row[i].as_i64().unwrap()),
            )
        })
        .collect();
    assert_eq!(answered, expected);
}

#[tokio::test]
async fn prune_history_shows_the_run_of_the_prune() {
    let run = run().await;
    let result = documented("prune-history", &[]).await;
    assert_eq!(
        result.columns,
        [
            "run_id",
            "started",
            "took_ms",
            "triggered_by",
            "containers_removed",
            "images_removed",
            "bytes_reclaimed",
            "error"
        ]
    );
    assert_eq!(result.rows.len(), 1, "{:?}", result.rows);
    assert_eq!(column(&result, 0, "run_id"), &run.prune["run_id"]);
    assert_eq!(column(&result, 0, "started"), &run.prune["started_at"]);
    assert_eq!(column(&result, 0, "triggered_by"), "api");
    // The soft, self-exit and hard backends' containers; the live one stays,
    // the never-started one had none.
    assert_eq!(column(&result, 0, "containers_removed"), 3);
    assert_eq!(column(&result, 0, "images_removed"), 0);
    assert_eq!(column(&result, 0, "bytes_reclaimed"), &run.prune["bytes_reclaimed"]);
    assert_eq!(column(&result, 0, "error"), &Value::Null);
    assert!(column(&result, 0, "took_ms").as_i64().unwrap() >= 0);
}

#[tokio::test]
async fn exit_codes_in_the_last_hour_count_every_end() {
    let result = documented("exit-codes-last-hour", &[]).await;
    assert_eq!(result.columns, ["exit_code", "backends", "images"]);
    let answered: BTreeSet<(Option<i64>, i64, String)> = result
        .rows
        .iter()
        .map(|row| (row[0].as_i64(), row[1].as_i64().unwrap(), row[2].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        answered,
        BTreeSet::from([
            (None, 1, ABSENT.to_string()),
            (Some(0), 1, TAGGED.to_string()),
            (Some(3), 1, BARE.to_string()),
            (Some(137), 1, TAGGED.to_string()),
        ])
    );
}

#[tokio::test]
async fn docker_outages_show_the_outage_and_its_length() {
    let raw = facts("SELECT started_at_ms, ended_at_ms FROM docker_outages").await;
    assert_eq!(raw.len(), 1, "{raw:?}");
    let (started, ended) = (raw[0]["started_at_ms"].as_i64().unwrap(), raw[0]["ended_at_ms"].as_i64().unwrap());
    let result = documented("docker-outages", &[]).await;
    assert_eq!(
        result.columns,
        ["outage_id", "started", "seconds", "ongoing", "noticed_by", "detail"]
    );
    assert_eq!(result.rows.len(), 1);
    assert_eq!(column(&result, 0, "started"), &json!(rfc3339(started)));
    assert!(approx(column(&result, 0, "seconds"), (ended - started) as f64 / 1000.0));
    assert_eq!(column(&result, 0, "ongoing"), 0);
    let noticed_by = column(&result, 0, "noticed_by").as_str().unwrap();
    assert!(["event-stream", "resync", "action"].contains(&noticed_by), "{noticed_by}");
}

#[tokio::test]
async fn backend_history_lists_every_transition_in_order() {
    let run = run().await;
    let result = documented("backend-history", &[&run.soft]).await;
    let statuses: Vec<&str> = (0..result.rows.len())
        .map(|i| column(&result, i, "status").as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["scheduled", "loading", "starting", "waiting", "ready", "terminating", "terminated"]
    );
    let last = result.rows.len() - 1;
    assert_eq!(column(&result, last, "exit_code"), 0);
    assert_eq!(column(&result, last, "reason"), "external");
    assert_eq!(column(&result, 0, "source"), "api");
    assert_eq!(
        column(&result, last, "at"),
        &json!(rfc3339(event_time(&run.soft, "terminated").await))
    );
}

#[tokio::test]
async fn how_backends_ended_groups_by_reason_and_kind() {
    let run = run().await;
    let result = documented("how-backends-ended", &[]).await;
    assert_eq!(result.columns, ["how", "termination", "backends", "avg_lifetime_seconds"]);
    let lifetime = |id: String| async move {
        let seconds = (event_time(&id, "terminated").await - created_at(&id).await) as f64 / 1000.0;
        (seconds * 10.0).round() / 10.0
    };
    let expected = [
        ("external", json!("hard"), lifetime(run.hard.clone()).await),
        ("external", json!("soft"), lifetime(run.soft.clone()).await),
        ("internalerror", Value::Null, lifetime(run.never_started.clone()).await),
        ("on its own", Value::Null, lifetime(run.self_exit.clone()).await),
    ];
    assert_eq!(result.rows.len(), expected.len(), "{:?}", result.rows);
    for (row, (how, termination, seconds)) in expected.into_iter().enumerate() {
        assert_eq!(column(&result, row, "how"), how);
        assert_eq!(column(&result, row, "termination"), &termination);
        assert_eq!(column(&result, row, "backends"), 1);
        let answered = column(&result, row, "avg_lifetime_seconds").as_f64().unwrap();
        // SQLite and Rust may round a value just under x.x5 differently.
        assert!((answered - seconds).abs() < 0.11, "{how}: {answered} vs {seconds}");
    }
}

#[tokio::test]
async fn backend_lifetimes_view_describes_each_backend() {
    let run = run().await;
    let rows = facts(
        "SELECT id, image, scheduled_at, ready_at, terminated_at, seconds_to_ready, lifetime_seconds, \
         exit_code, reason, status, termination, last_status FROM backend_lifetimes",
    )
    .await;
    let by_id: BTreeMap<String, &Value> = rows
        .iter()
        .map(|row| (row["id"].as_str().unwrap().to_string(), row))
        .collect();
    assert_eq!(by_id.len(), 5);
    for (id, image, exit_code, reason, termination) in [
        (&run.soft, TAGGED, json!(0), json!("external"), json!("soft")),
        (&run.self_exit, BARE, json!(3), Value::Null, Value::Null),
        (&run.hard, TAGGED, json!(137), json!("external"), json!("hard")),
    ] {
        let row = by_id[id.as_str()];
        let scheduled = created_at(id).await;
        let ready = event_time(id, "ready").await;
        let terminated = event_time(id, "terminated").await;
        assert_eq!(row["image"], image, "{row}");
        assert_eq!(row["scheduled_at"], scheduled, "{row}");
        assert_eq!(row["ready_at"], ready, "{row}");
        assert_eq!(row["terminated_at"], terminated, "{row}");
        assert!(approx(&row["seconds_to_ready"], (ready - scheduled) as f64 / 1000.0), "{row}");
        assert!(approx(&row["lifetime_seconds"], (terminated - scheduled) as f64 / 1000.0), "{row}");
        assert_eq!(row["exit_code"], exit_code, "{row}");
        assert_eq!(row["reason"], reason, "{row}");
        assert_eq!(row["termination"], termination, "{row}");
        assert_eq!(row["last_status"], "ready", "{row}");
    }
    let live = by_id[run.live.as_str()];
    assert_eq!(live["status"], "ready");
    for field in ["terminated_at", "lifetime_seconds", "exit_code", "reason"] {
        assert_eq!(live[field], Value::Null, "{field}: {live}");
    }
    let never = by_id[run.never_started.as_str()];
    assert_eq!(never["ready_at"], Value::Null);
    assert_eq!(never["seconds_to_ready"], Value::Null);
    assert_eq!(never["reason"], "internalerror");
    assert_eq!(never["exit_code"], Value::Null);
}

#[tokio::test]
async fn exit_codes_by_image_view_groups_terminated_backends() {
    let rows = facts(
        "SELECT image, exit_code, backends, unrequested FROM exit_codes_by_image ORDER BY image, exit_code",
    )
    .await;
    assert_eq!(
        rows,
        [
            json!({"image": ABSENT, "exit_code": null, "backends": 1, "unrequested": 1}),
            json!({"image": BARE, "exit_code": 3, "backends": 1, "unrequested": 1}),
            json!({"image": TAGGED, "exit_code": 0, "backends": 1, "unrequested": 0}),
            json!({"image": TAGGED, "exit_code": 137, "backends": 1, "unrequested": 0}),
        ]
    );
}

/// Runs `drover sql ARGS...` and returns (success, stdout, stderr).
fn drover_sql(args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(BIN)
        .arg("sql")
        .args(args)
        .env_remove("DROVER_CONFIG")
        .env_remove("DROVER_DB")
        .output()
        .expect("run drover sql");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[tokio::test]
async fn drover_sql_prints_a_table_or_json_from_db_or_config() {
    let run = run().await;
    let db = run.db.display().to_string();
    let query = "SELECT id, exit_code FROM backend_lifetimes WHERE id = ?1";
    let (ok, stdout, stderr) = drover_sql(&["--db", &db, "--json", "--param", &run.hard, query]);
    assert!(ok, "{stderr}");
    let rows: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows, json!([{ "id": run.hard, "exit_code": 137 }]));

    let config = run.db.with_extension("toml");
    std::fs::write(&config, format!("db_path = {db:?}\n")).unwrap();
    let config = config.display().to_string();
    let (ok, stdout, stderr) = drover_sql(&["--config", &config, "--param", &run.hard, query]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["id", "exit_code"]);
    assert_eq!(lines[1].split_whitespace().collect::<Vec<_>>(), [run.hard.as_str(), "137"]);
    assert_eq!(lines[2], "(1 row)");

    let (ok, _, stderr) = drover_sql(&["--db", &db, "--config", &config, "SELECT 1"]);
    assert!(!ok);
    assert!(stderr.contains("--config") || stderr.contains("--db"), "{stderr}");
}

#[tokio::test]
async fn drover_sql_refuses_every_write_and_changes_nothing() {
    let run = run().await;
    let db = run.db.display().to_string();
    let before = file_bytes(&run.db);
    let count = "SELECT COUNT(*) AS n FROM backend_events";
    let events_before = facts(count).await;
    for statement in [
        "INSERT INTO backends (id, spec, image, desired, status, state, created_at_ms, updated_at_ms) \
         VALUES ('ba-intruder', '{}', 'x', 'running', 'scheduled', '{}', 0, 0)",
        "UPDATE backends SET exit_code = 0",
        "DELETE FROM prune_runs",
        "DROP TABLE prune_runs",
        "DROP VIEW backend_lifetimes",
        "PRAGMA query_only = OFF; DELETE FROM docker_outages",
    ] {
        let (ok, stdout, stderr) = drover_sql(&["--db", &db, statement]);
        assert!(!ok, "{statement} succeeded: {stdout}");
        assert!(stderr.contains("read-only"), "{statement}: {stderr}");
    }
    assert_eq!(file_bytes(&run.db), before);
    assert_eq!(facts(count).await, events_before);
    assert_eq!(facts("SELECT COUNT(*) AS n FROM prune_runs").await, [json!({"n": 1})]);
    assert_eq!(facts("SELECT COUNT(*) AS n FROM docker_outages").await, [json!({"n": 1})]);
}
