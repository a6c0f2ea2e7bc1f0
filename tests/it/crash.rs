//! Crash safety (issue 3): the daemon is killed with SIGKILL (or stopped with
//! SIGTERM) at chosen instants, Docker is changed while it is down, and after
//! the restart each test asserts on Docker (same container, same `StartedAt`,
//! exactly one container) and on the database (same history, exactly one
//! `terminated` row, stored deadlines unchanged, `integrity_check` ok).
//!
//! Deterministic kills use the named crash points of `drover::crash`
//! (`DROVER_CRASH_AT`), compiled into the test build. Every test here fails if
//! the guarantee it names is broken: e.g. with the boot's replay and resync
//! taken out (nothing adopted), the ready backend is recorded lost.

use crate::support::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_WITHIN: Duration = Duration::from_secs(90);
const EXIT_WITHIN: Duration = Duration::from_secs(90);
const WATERMARK_KEY: &str = "docker_events_since_nanos";
const HAPPY_PATH: [&str; 5] = ["scheduled", "loading", "starting", "waiting", "ready"];

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

// ---------------------------------------------------------------------------
// Helpers: killing, restarting, and reading what the daemon left behind.

/// SIGKILLs the daemon and checks that the database it leaves is sound.
async fn kill_daemon(daemon: &mut Daemon) {
    daemon.kill9();
    assert_integrity(daemon).await;
}

async fn assert_integrity(daemon: &Daemon) {
    let answer = daemon.query_one("PRAGMA integrity_check").await;
    assert_eq!(answer, "ok", "integrity_check after a kill");
}

/// Waits for the daemon to die at the crash point it was started with, and
/// checks it died by SIGKILL there and left a sound database.
async fn wait_crash(daemon: &mut Daemon, point: &str) {
    let status = daemon.wait_exit(EXIT_WITHIN).await;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "daemon did not die by SIGKILL: {status}");
    assert!(
        daemon.log().contains(&format!("crash point {point} reached")),
        "daemon died elsewhere than {point}; log:\n{}",
        daemon.log()
    );
    assert_integrity(daemon).await;
}

async fn watermark(daemon: &Daemon) -> Option<i64> {
    let sql = format!("SELECT value FROM meta WHERE key = '{WATERMARK_KEY}'");
    daemon.query_one(&sql).await.as_str().and_then(|v| v.parse().ok())
}

/// Waits until the daemon has saved its Docker event watermark, which it does
/// only after a full resync and a pass with no exit pending: from then on, an
/// exit while it is down is replayed from Docker's events on restart.
async fn wait_watermark(daemon: &Daemon) {
    wait_for("the event watermark", Duration::from_secs(20), || async {
        watermark(daemon).await.is_some()
    })
    .await;
}

/// Waits until the daemon, (re)started after the watermark was `before`, has
/// completed a full resync and a pass (it then saves a newer watermark):
/// whatever it meant to do on boot, it has decided.
async fn wait_full_pass(daemon: &Daemon, before: Option<i64>) {
    wait_for("a full reconcile pass after boot", Duration::from_secs(20), || async {
        watermark(daemon).await > before
    })
    .await;
}

/// A column of the backend's row.
async fn column(daemon: &Daemon, id: &str, column: &str) -> Value {
    daemon
        .query_one(&format!("SELECT {column} FROM backends WHERE id = '{id}'"))
        .await
}

/// The backend's history rows straight from the database, oldest first.
async fn history(daemon: &Daemon, id: &str) -> Vec<Value> {
    query_json(
        &daemon.db_path(),
        &format!(
            "SELECT status, exit_code, source, timestamp_ms, state FROM backend_events \
             WHERE backend_id = '{id}' ORDER BY event_id"
        ),
    )
    .await
}

async fn history_statuses(daemon: &Daemon, id: &str) -> Vec<String> {
    history(daemon, id)
        .await
        .iter()
        .map(|e| e["status"].as_str().unwrap().to_string())
        .collect()
}

/// The one history row with `status`; panics if there is not exactly one.
async fn only_event(daemon: &Daemon, id: &str, status: &str) -> Value {
    let rows: Vec<Value> = history(daemon, id)
        .await
        .into_iter()
        .filter(|e| e["status"] == status)
        .collect();
    assert_eq!(rows.len(), 1, "{id}: expected exactly one {status} row: {rows:?}");
    rows.into_iter().next().unwrap()
}

/// Containers named `plane-ID` (any instance, any state): `(id, state)`.
fn named_containers(id: &str) -> Vec<(String, String)> {
    let filter = format!("name=^/plane-{id}$");
    docker(&["ps", "-a", "--no-trunc", "--filter", &filter, "--format", "{{.ID}} {{.State}}"])
        .lines()
        .filter_map(|line| {
            let (id, state) = line.split_once(' ')?;
            Some((id.to_string(), state.to_string()))
        })
        .collect()
}

/// The backend's one container; panics unless there is exactly one.
fn one_container(id: &str) -> (String, String) {
    let list = named_containers(id);
    assert_eq!(list.len(), 1, "expected exactly one container named plane-{id}: {list:?}");
    list.into_iter().next().unwrap()
}

fn inspect(container: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, container])
}

fn docker_time_ms(raw: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(raw)
        .unwrap_or_else(|e| panic!("bad docker time {raw:?}: {e}"))
        .timestamp_millis()
}

fn finished_at_ms(container: &str) -> i64 {
    docker_time_ms(&inspect(container, "{{.State.FinishedAt}}"))
}

async fn wait_container_state(container: &str, state: &str) {
    wait_for(&format!("container {container} {state}"), EXIT_WITHIN, || async {
        inspect(container, "{{.State.Status}}") == state
    })
    .await;
}

/// Posts a spawn with a chosen id. The daemon may die at a crash point before
/// it answers, so a broken connection is not an error; the id is returned.
async fn spawn_racing_crash(daemon: &Daemon, executable: Value) -> String {
    let id = format!("ba-crash-{}", rand_suffix());
    let _ = daemon
        .http
        .post(daemon.url("/v1/backends"))
        .json(&json!({ "id": id, "executable": executable }))
        .send()
        .await;
    id
}

/// Requests a termination; the daemon may die at a crash point before it answers.
async fn terminate_racing_crash(daemon: &Daemon, id: &str, hard: bool) {
    let _ = daemon
        .http
        .post(daemon.url(&format!("/v1/backends/{id}/terminate")))
        .json(&json!({ "hard": hard }))
        .send()
        .await;
}

fn rand_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..8).map(|_| (b'a' + rng.gen_range(0..26)) as char).collect()
}

async fn fetch_page(address: &str) -> String {
    reqwest::get(format!("http://{address}/"))
        .await
        .expect("GET backend")
        .text()
        .await
        .unwrap()
}

fn test_executable(command: Option<&[&str]>) -> Value {
    let mut executable = json!({ "image": test_image() });
    if let Some(command) = command {
        executable["command"] = json!(command);
    }
    executable
}

/// Spawns the test image's httpd and waits until it is ready; returns
/// `(backend id, container id)`.
async fn ready_backend(daemon: &Daemon, command: Option<&[&str]>) -> (String, String) {
    let id = daemon.spawn_executable(test_executable(command)).await;
    let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;
    (id, ready["container_id"].as_str().unwrap().to_string())
}

// ---------------------------------------------------------------------------
// 1. Adopt on restart.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_backend_survives_daemon_kill_in_the_same_container() {
    let mut daemon = Daemon::start().await;
    let (id, container) = ready_backend(&daemon, None).await;
    let started_at = inspect(&container, "{{.State.StartedAt}}");
    let events_before = daemon.events(&id).await;
    let mark = watermark(&daemon).await;

    kill_daemon(&mut daemon).await;
    daemon.launch().await;
    wait_full_pass(&daemon, mark).await;

    let after = daemon.backend(&id).await;
    assert_eq!(after["status"], "ready");
    assert_eq!(after["container_id"], container.as_str());
    assert_eq!(one_container(&id), (container.clone(), "running".to_string()));
    assert_eq!(inspect(&container, "{{.State.StartedAt}}"), started_at, "container was restarted");
    assert_eq!(daemon.events(&id).await, events_before, "adoption wrote history");
    let page = fetch_page(after["address"].as_str().unwrap()).await;
    assert_eq!(page, "hello from drover-test\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_ready_backends_are_adopted_after_daemon_kill() {
    const COUNT: usize = 100;
    let mut daemon = Daemon::start().await;
    let spawns = (0..COUNT).map(|_| daemon.spawn_executable(test_executable(None)));
    let ids: Vec<String> = futures::future::join_all(spawns).await;
    let started = Instant::now();
    wait_for("100 backends ready", Duration::from_secs(240), || async {
        daemon.get("/v1/backends?status=ready").await.1.as_array().map_or(0, Vec::len) == COUNT
    })
    .await;
    println!("100 backends ready {:?} after their spawns", started.elapsed());
    let containers: BTreeMap<String, String> = query_json(
        &daemon.db_path(),
        "SELECT id, container_id FROM backends",
    )
    .await
    .iter()
    .map(|r| (r["id"].as_str().unwrap().to_string(), r["container_id"].as_str().unwrap().to_string()))
    .collect();
    assert_eq!(containers.len(), COUNT);
    let started_at: BTreeMap<String, String> = containers
        .values()
        .map(|c| (c.clone(), inspect(c, "{{.State.StartedAt}}")))
        .collect();
    let events_before = daemon.query_one("SELECT COUNT(*) FROM backend_events").await;
    wait_watermark(&daemon).await;
    let mark = watermark(&daemon).await;

    kill_daemon(&mut daemon).await;
    let boot = Instant::now();
    daemon.launch().await;
    let serving = boot.elapsed();
    wait_for("100 backends ready after restart", Duration::from_secs(20), || async {
        daemon.get("/v1/backends?status=ready").await.1.as_array().map_or(0, Vec::len) == COUNT
    })
    .await;
    wait_full_pass(&daemon, mark).await;
    println!(
        "restart with {COUNT} ready backends: serving after {serving:?}, first full pass done after {:?}",
        boot.elapsed()
    );

    for id in &ids {
        assert_eq!(column(&daemon, id, "status").await, "ready", "{id}");
    }
    let listed = daemon.containers();
    assert_eq!(listed.len(), COUNT, "no container added or removed");
    for (container_id, name, state) in listed {
        let backend = name.trim_start_matches("plane-");
        assert_eq!(containers[backend], container_id, "{backend} has another container");
        assert_eq!(state, "running");
        assert_eq!(inspect(&container_id, "{{.State.StartedAt}}"), started_at[&container_id]);
    }
    assert_eq!(
        daemon.query_one("SELECT COUNT(*) FROM backend_events").await,
        events_before,
        "adoption wrote history"
    );
}

// ---------------------------------------------------------------------------
// 2. Resume mid-flight, at every crash point of the spawn path.

/// The crash points each test below covers; together, every point in
/// `drover::crash::POINTS`.
const SPAWN_POINTS: [&str; 7] = [
    "after_loading_recorded",
    "before_pull",
    "after_pull",
    "after_starting_recorded",
    "after_create",
    "after_start",
    "after_waiting_recorded",
];
const TERMINATION_POINTS: [&str; 3] = [
    "after_terminating_recorded",
    "after_hard_terminating_recorded",
    "before_exit_recorded",
];

#[test]
fn every_crash_point_has_a_test() {
    let covered: BTreeSet<&str> = SPAWN_POINTS.iter().chain(&TERMINATION_POINTS).copied().collect();
    let all: BTreeSet<&str> = drover::crash::POINTS.iter().copied().collect();
    assert_eq!(covered, all);
}

/// A `docker-registry` on a loopback port holding a copy of the test image,
/// so a spawn with `pull_policy: Always` really pulls. Docker trusts
/// registries on 127.0.0.0/8 over plain HTTP. Dropping it stops the registry
/// and removes the local tag.
struct LocalRegistry {
    child: Child,
    image: String,
    _dir: tempfile::TempDir,
}

impl LocalRegistry {
    async fn start() -> LocalRegistry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("run docker-registry (Debian package docker-registry)");
        let image = format!("127.0.0.1:{port}/drover-crash/busybox:latest");
        let registry = LocalRegistry {
            child,
            image,
            _dir: dir,
        };
        let v2 = format!("http://127.0.0.1:{port}/v2/");
        wait_for("the local registry", Duration::from_secs(20), || async {
            reqwest::get(&v2).await.is_ok_and(|r| r.status().is_success())
        })
        .await;
        docker(&["tag", test_image(), &registry.image]);
        docker(&["push", &registry.image]);
        // Only the registry has it now: a spawn must pull it.
        docker(&["rmi", &registry.image]);
        registry
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = try_docker(&["rmi", &self.image]);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the daemon at `point` while it spawns a backend, restarts it, and
/// checks the backend reaches ready in exactly one container with a history
/// that has no duplicate and no gap.
async fn spawn_resumes_after_crash_at(point: &str) {
    let registry = match point {
        "before_pull" | "after_pull" => Some(LocalRegistry::start().await),
        _ => None,
    };
    let executable = match &registry {
        Some(registry) => json!({ "image": registry.image, "pull_policy": "Always" }),
        None => test_executable(None),
    };
    let mut daemon = Daemon::start().await;
    kill_daemon(&mut daemon).await;
    daemon.launch_with_env(&[("DROVER_CRASH_AT", point)]).await;
    let id = spawn_racing_crash(&daemon, executable).await;
    wait_crash(&mut daemon, point).await;

    // Where the crash left things.
    let expected_status = match point {
        "after_loading_recorded" | "before_pull" | "after_pull" => "loading",
        "after_starting_recorded" | "after_create" | "after_start" => "starting",
        "after_waiting_recorded" => "waiting",
        other => panic!("not a spawn crash point: {other}"),
    };
    assert_eq!(column(&daemon, &id, "status").await, expected_status);
    let left = named_containers(&id);
    let expected_state = match point {
        "after_create" => Some("created"),
        "after_start" | "after_waiting_recorded" => Some("running"),
        _ => None,
    };
    assert_eq!(
        left.iter().map(|(_, state)| state.as_str()).collect::<Vec<_>>(),
        expected_state.into_iter().collect::<Vec<_>>(),
        "containers left by the crash"
    );
    let deadline_before = column(&daemon, &id, "startup_deadline_ms").await;
    let started_before = left
        .first()
        .filter(|(_, state)| state == "running")
        .map(|(container, _)| inspect(container, "{{.State.StartedAt}}"));

    daemon.launch().await;
    let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;

    let (container, state) = one_container(&id);
    assert_eq!(state, "running");
    assert_eq!(ready["container_id"], container.as_str());
    if let Some((left_id, _)) = left.first() {
        assert_eq!(*left_id, container, "the container left by the crash was replaced");
    }
    if let Some(started) = started_before {
        assert_eq!(inspect(&container, "{{.State.StartedAt}}"), started, "container restarted");
    }
    // The port was looked up from Docker, whichever process started it.
    let port = docker(&["port", &container, "8080/tcp"]);
    let address = ready["address"].as_str().unwrap();
    assert_eq!(
        address.rsplit(':').next(),
        port.lines().next().and_then(|l| l.rsplit(':').next()),
        "address {address} is not docker's port {port}"
    );
    assert_eq!(fetch_page(address).await, "hello from drover-test\n");
    assert_eq!(history_statuses(&daemon, &id).await, HAPPY_PATH);
    if point == "after_waiting_recorded" {
        assert!(deadline_before.is_i64());
        assert_eq!(
            column(&daemon, &id, "startup_deadline_ms").await,
            deadline_before,
            "startup deadline changed on restart"
        );
    }
    drop(registry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_resumes_after_crash_after_loading_recorded() {
    spawn_resumes_after_crash_at("after_loading_recorded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_resumes_after_crash_before_pull() {
    spawn_resumes_after_crash_at("before_pull").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_resumes_after_crash_after_pull() {
    spawn_resumes_after_crash_at("after_pull").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_resumes_after_crash_after_starting_recorded() {
    spawn_resumes_after_crash_at("after_starting_recorded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_container_is_started_not_duplicated_after_crash_after_create() {
    spawn_resumes_after_crash_at("after_create").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_container_is_adopted_and_its_port_looked_up_after_crash_after_start() {
    spawn_resumes_after_crash_at("after_start").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_wait_resumes_with_its_stored_deadline_after_crash_after_waiting_recorded() {
    spawn_resumes_after_crash_at("after_waiting_recorded").await;
}

/// A process killed between its `create` and its `start` may have sent the
/// `start` already: Docker can finish it seconds later, after the restarted
/// daemon has recorded the backend terminated. So a never-started container
/// of a backend whose termination is desired is removed, not left to a late
/// `start`. Here the termination is accepted just before the kill (written as
/// `POST /terminate` writes it) and the late `start` is the test's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_container_of_a_backend_terminated_meanwhile_is_removed_before_a_late_start_runs_it() {
    let point = "after_create";
    let mut daemon = Daemon::start().await;
    kill_daemon(&mut daemon).await;
    daemon.launch_with_env(&[("DROVER_CRASH_AT", point)]).await;
    let id = spawn_racing_crash(&daemon, test_executable(None)).await;
    wait_crash(&mut daemon, point).await;
    let (container, state) = one_container(&id);
    assert_eq!(state, "created");
    write_db(
        &daemon,
        &format!(
            "UPDATE backends SET desired = 'terminated', termination_kind = 'soft', \
             termination_reason = 'external' WHERE id = '{id}'"
        ),
    )
    .await;

    daemon.launch().await;
    let done = daemon.wait_status(&id, "terminated", EXIT_WITHIN).await;
    assert_eq!(done["exit_code"], Value::Null);
    assert_eq!(done["state"]["last_status"], "starting");
    assert_eq!(done["state"]["termination"], "soft");
    assert_eq!(history_statuses(&daemon, &id).await, ["scheduled", "loading", "starting", "terminated"]);
    assert!(
        try_docker(&["start", &container]).is_none(),
        "the never-started container is still there: a late start ran it after terminated"
    );
    assert!(named_containers(&id).is_empty());
}

/// A backend whose server never listens, killed while waiting for readiness.
/// Returns the daemon (down), the backend id and its stored startup deadline.
async fn never_ready_backend_with_daemon_killed(startup_timeout: &'static str) -> (Daemon, String, i64) {
    let mut daemon = Daemon::start_with(DaemonConfig {
        startup_timeout,
        ..DaemonConfig::default()
    })
    .await;
    let id = daemon.spawn_executable(test_executable(Some(&["sleep", "3600"]))).await;
    daemon.wait_status(&id, "waiting", READY_WITHIN).await;
    let deadline = column(&daemon, &id, "startup_deadline_ms").await.as_i64().unwrap();
    kill_daemon(&mut daemon).await;
    (daemon, id, deadline)
}

async fn assert_startup_timeout_recorded(daemon: &Daemon, id: &str, deadline: i64) {
    let done = daemon.wait_status(id, "terminated", EXIT_WITHIN).await;
    assert_eq!(done["state"]["reason"], "startuptimeout");
    assert_eq!(done["state"]["termination"], "hard");
    assert_eq!(done["state"]["last_status"], "waiting");
    assert_eq!(done["exit_code"], 137);
    assert_eq!(
        history_statuses(daemon, id).await,
        ["scheduled", "loading", "starting", "waiting", "hard-terminating", "terminated"]
    );
    assert_eq!(column(daemon, id, "startup_deadline_ms").await, deadline, "startup deadline changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_deadline_passed_during_downtime_hard_terminates_at_once_on_restart() {
    let (mut daemon, id, deadline) = never_ready_backend_with_daemon_killed("3s").await;
    wait_for("the startup deadline to pass", Duration::from_secs(10), || async {
        now_ms() > deadline + 200
    })
    .await;
    let restart = now_ms();
    daemon.launch().await;
    assert_startup_timeout_recorded(&daemon, &id, deadline).await;
    let hard = only_event(&daemon, &id, "hard-terminating").await;
    let decided = hard["timestamp_ms"].as_i64().unwrap();
    // Decided on restart, against the stored deadline: not after a fresh 3 s.
    assert!(decided >= restart, "hard-terminating at {decided}, before the restart at {restart}");
    assert!(
        decided < restart + 3_000,
        "hard-terminating at {decided}: the startup timeout restarted from zero at {restart}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_deadline_still_ahead_at_restart_is_kept() {
    let (mut daemon, id, deadline) = never_ready_backend_with_daemon_killed("4s").await;
    // Down long enough that a deadline counted from the restart would fall
    // well after the stored one.
    wait_for("part of the startup timeout to pass", Duration::from_secs(10), || async {
        now_ms() >= deadline - 2_500
    })
    .await;
    let restart = now_ms();
    assert!(restart < deadline, "the deadline passed while down");
    daemon.launch().await;
    assert_startup_timeout_recorded(&daemon, &id, deadline).await;
    let hard = only_event(&daemon, &id, "hard-terminating").await;
    let decided = hard["timestamp_ms"].as_i64().unwrap();
    assert!(decided >= deadline, "hard-terminating at {decided}, before the deadline {deadline}");
    assert!(
        decided < restart + 4_000,
        "hard-terminating at {decided}: the startup timeout restarted from zero at {restart}"
    );
}

// ---------------------------------------------------------------------------
// 3. Exits during downtime are recorded.

/// What happens to the container while the daemon is down.
#[derive(Clone, Copy, Debug)]
enum Downtime {
    /// `/tmp/go` is created: the container's script ends by itself.
    Trigger,
    /// `docker kill`.
    Kill,
    /// `docker rm -f`.
    Remove,
}

/// Runs a ready backend, kills the daemon, does `what` to the container,
/// restarts and waits for the exit to be recorded. Returns the daemon,
/// backend id, container id and terminated backend.
async fn exit_during_downtime(
    executable: Value,
    what: Downtime,
    forget_watermark: bool,
) -> (Daemon, String, String, Value) {
    let mut daemon = Daemon::start().await;
    let id = daemon.spawn_executable(executable).await;
    let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;
    let container = ready["container_id"].as_str().unwrap().to_string();
    wait_watermark(&daemon).await;
    kill_daemon(&mut daemon).await;

    match what {
        Downtime::Trigger => {
            docker(&["exec", &container, "touch", "/tmp/go"]);
            wait_container_state(&container, "exited").await;
        }
        Downtime::Kill => {
            docker(&["kill", &container]);
        }
        Downtime::Remove => {
            docker(&["rm", "-f", &container]);
        }
    }
    if forget_watermark {
        // As if the daemon had never saved one: nothing to replay from.
        write_db(&daemon, &format!("DELETE FROM meta WHERE key = '{WATERMARK_KEY}'")).await;
    }
    let restart = now_ms();
    daemon.launch().await;
    let done = daemon.wait_status(&id, "terminated", EXIT_WITHIN).await;
    let terminated = only_event(&daemon, &id, "terminated").await;
    assert!(
        terminated["timestamp_ms"].as_i64().unwrap() < restart,
        "the exit is dated at the restart, not when it happened: {terminated}"
    );
    assert_eq!(
        history_statuses(&daemon, &id).await,
        ["scheduled", "loading", "starting", "waiting", "ready", "terminated"]
    );
    assert_eq!(done["state"]["last_status"], "ready");
    (daemon, id, container, done)
}

/// Writes to the database of a stopped daemon.
async fn write_db(daemon: &Daemon, sql: &str) {
    assert!(daemon.child.is_none(), "the daemon must be down");
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(daemon.db_path());
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::query(sql).execute(&pool).await.unwrap();
    pool.close().await;
}

/// A command serving HTTP (httpd in the background) that ends with `then`
/// once the file `/tmp/go` appears (created with `docker exec`).
fn serve_then(then: &str) -> Value {
    let script = format!("httpd -p $PORT -h /www; until [ -e /tmp/go ]; do sleep 0.05; done; {then}");
    test_executable(Some(&["sh", "-c", &script]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_during_downtime_is_recorded_with_its_code_at_its_finish_time() {
    let (daemon, id, container, done) = exit_during_downtime(
        serve_then("exit 3"),
        Downtime::Trigger,
        false,
    )
    .await;
    assert_eq!(done["exit_code"], 3);
    assert_eq!(done["state"]["reason"], Value::Null);
    let terminated = only_event(&daemon, &id, "terminated").await;
    assert_eq!(terminated["exit_code"], 3);
    assert_eq!(terminated["timestamp_ms"], finished_at_ms(&container));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_kill_during_downtime_is_recorded_as_137_at_its_finish_time() {
    let (daemon, id, container, done) = exit_during_downtime(
        test_executable(None),
        Downtime::Kill,
        false,
    )
    .await;
    assert_eq!(done["exit_code"], 137);
    let terminated = only_event(&daemon, &id, "terminated").await;
    assert_eq!(terminated["source"], "docker-event");
    assert_eq!(terminated["timestamp_ms"], finished_at_ms(&container));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_removed_during_downtime_gets_the_exit_code_replayed_from_docker_events() {
    let (daemon, id, _container, done) = exit_during_downtime(
        test_executable(None),
        Downtime::Remove,
        false,
    )
    .await;
    assert_eq!(done["exit_code"], 137);
    assert_eq!(done["state"]["reason"], Value::Null);
    let terminated = only_event(&daemon, &id, "terminated").await;
    assert_eq!(terminated["source"], "docker-event");
    assert!(named_containers(&id).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_during_downtime_without_events_to_replay_is_read_by_inspect() {
    let (daemon, id, container, done) = exit_during_downtime(
        test_executable(None),
        Downtime::Kill,
        true,
    )
    .await;
    assert_eq!(done["exit_code"], 137);
    let terminated = only_event(&daemon, &id, "terminated").await;
    assert_eq!(terminated["source"], "inspect");
    assert_eq!(terminated["timestamp_ms"], finished_at_ms(&container));
}

/// Without a watermark nothing is replayed at boot, but before settling for
/// `lost` the daemon asks Docker's event log for the vanished container's
/// `die`. (`lost` itself needs an engine that forgot the event: its log
/// keeps only the latest events, which a test cannot flush without robbing
/// the tests running beside it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_removed_during_downtime_without_a_watermark_still_gets_its_exit_code() {
    let (daemon, id, _container, done) = exit_during_downtime(
        test_executable(None),
        Downtime::Remove,
        true,
    )
    .await;
    assert_eq!(done["exit_code"], 137);
    assert_eq!(done["state"]["reason"], Value::Null);
    let terminated = only_event(&daemon, &id, "terminated").await;
    assert_eq!(terminated["source"], "docker-event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_during_downtime_is_recorded_as_oom_killed_at_its_finish_time() {
    // Doubling a shell variable until the 16 MiB limit (swap capped to it)
    // makes the kernel's OOM killer end the container.
    let mut executable = serve_then("x=x; while :; do x=$x$x; done");
    executable["resource_limits"] = json!({ "memory_limit_bytes": 16 * 1024 * 1024 });
    let (daemon, id, container, done) = exit_during_downtime(
        executable,
        Downtime::Trigger,
        false,
    )
    .await;
    assert_eq!(inspect(&container, "{{.State.OOMKilled}}"), "true", "docker saw no OOM");
    assert_eq!(done["exit_code"], 137);
    assert_eq!(done["oom_killed"], true);
    let terminated = only_event(&daemon, &id, "terminated").await;
    assert_eq!(terminated["timestamp_ms"], finished_at_ms(&container));
}

// ---------------------------------------------------------------------------
// 4. Deadlines survive restart.

/// A ready httpd (which ignores SIGTERM as PID 1) in a soft termination whose
/// SIGTERM has been sent, with the daemon then killed. Returns the daemon
/// (down), the backend id, its container and its stored kill deadline.
async fn soft_termination_with_daemon_killed(grace: &'static str) -> (Daemon, String, String, i64) {
    let mut daemon = Daemon::start_with(DaemonConfig {
        soft_terminate_grace: grace,
        ..DaemonConfig::default()
    })
    .await;
    let (id, container) = ready_backend(&daemon, None).await;
    assert_eq!(daemon.terminate(&id, false).await, 202);
    wait_for("SIGTERM sent", Duration::from_secs(10), || async {
        column(&daemon, &id, "last_signal").await == "SIGTERM"
    })
    .await;
    let deadline = column(&daemon, &id, "kill_deadline_ms").await.as_i64().unwrap();
    kill_daemon(&mut daemon).await;
    assert_eq!(inspect(&container, "{{.State.Status}}"), "running", "httpd obeyed SIGTERM");
    (daemon, id, container, deadline)
}

async fn assert_soft_termination_ended_by_kill(daemon: &Daemon, id: &str, deadline: i64) -> i64 {
    let done = daemon.wait_status(id, "terminated", EXIT_WITHIN).await;
    assert_eq!(done["exit_code"], 137);
    assert_eq!(done["state"]["termination"], "soft");
    assert_eq!(done["state"]["reason"], "external");
    assert_eq!(column(daemon, id, "kill_deadline_ms").await, deadline, "kill deadline changed");
    assert_eq!(column(daemon, id, "last_signal").await, "SIGKILL");
    assert_eq!(
        history_statuses(daemon, id).await,
        ["scheduled", "loading", "starting", "waiting", "ready", "terminating", "terminated"]
    );
    only_event(daemon, id, "terminated").await["timestamp_ms"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_that_ran_out_during_downtime_is_escalated_to_sigkill_at_once() {
    let (mut daemon, id, _container, deadline) = soft_termination_with_daemon_killed("3s").await;
    wait_for("the grace period to run out", Duration::from_secs(10), || async {
        now_ms() > deadline + 200
    })
    .await;
    let restart = now_ms();
    daemon.launch().await;
    let killed = assert_soft_termination_ended_by_kill(&daemon, &id, deadline).await;
    assert!(killed >= restart, "killed at {killed}, before the restart at {restart}");
    assert!(killed < restart + 3_000, "killed at {killed}: a new grace began at the restart {restart}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_still_running_at_restart_keeps_its_original_kill_deadline() {
    let (mut daemon, id, _container, deadline) = soft_termination_with_daemon_killed("4s").await;
    wait_for("part of the grace period to pass", Duration::from_secs(10), || async {
        now_ms() >= deadline - 2_500
    })
    .await;
    let restart = now_ms();
    assert!(restart < deadline, "the grace ran out while down");
    daemon.launch().await;
    assert_eq!(column(&daemon, &id, "kill_deadline_ms").await, deadline);
    let killed = assert_soft_termination_ended_by_kill(&daemon, &id, deadline).await;
    assert!(killed >= deadline, "killed at {killed}, before the kill deadline {deadline}");
    assert!(killed < restart + 4_000, "killed at {killed}: a new grace began at the restart {restart}");
}

// ---------------------------------------------------------------------------
// Crash points of the termination path, and 5. exactly once.

/// A ready backend, with the daemon restarted to die at `point`.
async fn ready_backend_under_crash_point(point: &str) -> (Daemon, String, String) {
    let mut daemon = Daemon::start().await;
    let (id, container) = ready_backend(&daemon, None).await;
    wait_watermark(&daemon).await;
    kill_daemon(&mut daemon).await;
    daemon.launch_with_env(&[("DROVER_CRASH_AT", point)]).await;
    (daemon, id, container)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_termination_resumes_after_crash_before_sigterm() {
    let point = "after_terminating_recorded";
    let (mut daemon, id, container) = ready_backend_under_crash_point(point).await;
    terminate_racing_crash(&daemon, &id, false).await;
    wait_crash(&mut daemon, point).await;
    assert_eq!(column(&daemon, &id, "status").await, "terminating");
    assert_eq!(column(&daemon, &id, "last_signal").await, Value::Null);
    let deadline = column(&daemon, &id, "kill_deadline_ms").await;
    assert_eq!(inspect(&container, "{{.State.Status}}"), "running");

    daemon.launch().await;
    let done = daemon.wait_status(&id, "terminated", EXIT_WITHIN).await;
    assert_eq!(done["exit_code"], 137);
    assert_eq!(done["state"]["termination"], "soft");
    assert_eq!(column(&daemon, &id, "kill_deadline_ms").await, deadline);
    assert_eq!(
        history_statuses(&daemon, &id).await,
        ["scheduled", "loading", "starting", "waiting", "ready", "terminating", "terminated"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_termination_resumes_after_crash_before_sigkill() {
    let point = "after_hard_terminating_recorded";
    let (mut daemon, id, container) = ready_backend_under_crash_point(point).await;
    terminate_racing_crash(&daemon, &id, true).await;
    wait_crash(&mut daemon, point).await;
    assert_eq!(column(&daemon, &id, "status").await, "hard-terminating");
    assert_eq!(inspect(&container, "{{.State.Status}}"), "running");

    daemon.launch().await;
    let done = daemon.wait_status(&id, "terminated", EXIT_WITHIN).await;
    assert_eq!(done["exit_code"], 137);
    assert_eq!(done["state"]["termination"], "hard");
    assert_eq!(
        history_statuses(&daemon, &id).await,
        ["scheduled", "loading", "starting", "waiting", "ready", "hard-terminating", "terminated"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_seen_but_not_recorded_before_a_crash_is_recorded_once_after_restart() {
    let point = "before_exit_recorded";
    let (mut daemon, id, container) = ready_backend_under_crash_point(point).await;
    docker(&["kill", &container]);
    wait_crash(&mut daemon, point).await;
    assert_eq!(column(&daemon, &id, "status").await, "ready");

    daemon.launch().await;
    let done = daemon.wait_status(&id, "terminated", EXIT_WITHIN).await;
    assert_eq!(done["exit_code"], 137);
    let terminated = only_event(&daemon, &id, "terminated").await;
    assert_eq!(terminated["timestamp_ms"], finished_at_ms(&container));
    assert_eq!(
        history_statuses(&daemon, &id).await,
        ["scheduled", "loading", "starting", "waiting", "ready", "terminated"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_seen_by_events_and_resyncs_at_once_are_recorded_once() {
    const COUNT: usize = 6;
    // Resyncs every 50 ms race the event stream for every exit.
    let daemon = Daemon::start_with(DaemonConfig {
        resync_interval: "50ms",
        ..DaemonConfig::default()
    })
    .await;
    let mut backends = Vec::new();
    for _ in 0..COUNT {
        backends.push(daemon.spawn_executable(test_executable(None)).await);
    }
    let mut containers = Vec::new();
    for id in &backends {
        let ready = daemon.wait_status(id, "ready", READY_WITHIN).await;
        containers.push(ready["container_id"].as_str().unwrap().to_string());
    }
    let mut args = vec!["kill"];
    args.extend(containers.iter().map(String::as_str));
    docker(&args);
    for (id, container) in backends.iter().zip(&containers) {
        let done = daemon.wait_status(id, "terminated", EXIT_WITHIN).await;
        assert_eq!(done["exit_code"], 137);
        let terminated = only_event(&daemon, id, "terminated").await;
        assert_eq!(terminated["exit_code"], 137);
        assert_eq!(terminated["timestamp_ms"], finished_at_ms(container));
        assert_eq!(
            history_statuses(&daemon, id).await,
            ["scheduled", "loading", "starting", "waiting", "ready", "terminated"]
        );
    }
}

// ---------------------------------------------------------------------------
// 7. The database stays sound; an acknowledged spawn is never lost.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_spawns_survive_a_kill_in_the_middle_of_a_spawn_burst() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut daemon = Daemon::start().await;
    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..3 {
        let kill_after = Duration::from_millis(rng.gen_range(20..250));
        let base = daemon.url("/v1/backends");
        let http = daemon.http.clone();
        // Spawns back to back until the daemon stops answering (at most 8 a
        // round, so the containers stay few).
        let burst = tokio::spawn(async move {
            let mut acked = Vec::new();
            for _ in 0..8 {
                let body = json!({ "executable": { "image": test_image() } });
                match http.post(&base).json(&body).send().await {
                    Ok(response) if response.status().as_u16() == 201 => {
                        let body: Value = response.json().await.unwrap_or(Value::Null);
                        match body["id"].as_str() {
                            Some(id) => acked.push(id.to_string()),
                            None => break,
                        }
                    }
                    _ => break,
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            acked
        });
        tokio::time::sleep(kill_after).await;
        kill_daemon(&mut daemon).await;
        let acked = burst.await.unwrap();
        println!("round {round}: killed after {kill_after:?}, {} spawns acknowledged", acked.len());
        for id in &acked {
            assert_eq!(
                daemon.query_one(&format!("SELECT COUNT(*) FROM backends WHERE id = '{id}'")).await,
                1,
                "acknowledged spawn {id} lost"
            );
        }
        acknowledged.extend(acked);
        daemon.launch().await;
    }
    for id in &acknowledged {
        daemon.wait_status(id, "ready", READY_WITHIN).await;
        one_container(id);
        assert_eq!(history_statuses(&daemon, id).await, HAPPY_PATH);
    }
}

// ---------------------------------------------------------------------------
// 8. Clean shutdown.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_shutdown_leaves_containers_running_and_restart_adopts_them() {
    let mut daemon = Daemon::start().await;
    let (id, container) = ready_backend(&daemon, None).await;
    let started_at = inspect(&container, "{{.State.StartedAt}}");
    let events_before = daemon.events(&id).await;
    let mark = watermark(&daemon).await;

    let status = daemon.stop();
    assert_eq!(status.code(), Some(0), "SIGTERM did not end the daemon cleanly: {status}");
    assert_integrity(&daemon).await;
    assert_eq!(inspect(&container, "{{.State.Status}}"), "running");

    daemon.launch().await;
    wait_full_pass(&daemon, mark).await;
    let after = daemon.backend(&id).await;
    assert_eq!(after["status"], "ready");
    assert_eq!(one_container(&id), (container.clone(), "running".to_string()));
    assert_eq!(inspect(&container, "{{.State.StartedAt}}"), started_at);
    assert_eq!(daemon.events(&id).await, events_before, "restart after a clean stop wrote history");
    assert_eq!(fetch_page(after["address"].as_str().unwrap()).await, "hello from drover-test\n");
}
