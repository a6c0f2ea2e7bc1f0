//! drover across restarts of the Docker engine it drives: the exits the
//! engine's stop or crash caused are recorded once each with their codes,
//! the event stream is re-opened from the last event seen and works again,
//! and each outage is journaled in `docker_outages`, also when drover itself
//! was down when the engine came back.
//!
//! The engine restarted is a private `dockerd` ([`PrivateEngine`]), never the
//! machine's shared one. These tests resync only hourly, so what they see
//! comes from the event stream and its reconnect, not from a periodic resync.

use crate::support::private_engine::PrivateEngine;
use crate::support::*;
use serde_json::Value;
use std::time::Duration;

const READY_WITHIN: Duration = Duration::from_secs(90);
/// Long enough for the engine's restart and drover's reconnect backoff (at
/// most 5 s between pings).
const RECOVERY_WITHIN: Duration = Duration::from_secs(90);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn healthz_status(daemon: &Daemon) -> Option<u16> {
    let response = daemon.http.get(daemon.url("/healthz")).send().await.ok()?;
    Some(response.status().as_u16())
}

async fn outages(daemon: &Daemon) -> Vec<Value> {
    query_json(
        &daemon.db_path(),
        "SELECT outage_id, started_at_ms, ended_at_ms, noticed_by, detail \
         FROM docker_outages ORDER BY outage_id",
    )
    .await
}

/// The `terminated` rows of a backend's history.
async fn terminated_events(daemon: &Daemon, id: &str) -> Vec<Value> {
    query_json(
        &daemon.db_path(),
        &format!(
            "SELECT exit_code, source, timestamp_ms FROM backend_events \
             WHERE backend_id = '{id}' AND status = 'terminated'"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_restart_records_the_exits_it_caused_once_journals_the_outage_and_reopens_the_event_stream() {
    // Declared first so it is dropped last, after the daemon.
    let mut engine = PrivateEngine::start();
    let daemon = Daemon::start_with(DaemonConfig {
        // No periodic resync within the test: the outage must be noticed by
        // the event stream, and recovery must come from its reconnect.
        resync_interval: "1h",
        env: vec![("DOCKER_HOST".to_string(), engine.host())],
        ..DaemonConfig::default()
    })
    .await;
    let first = daemon.spawn(None).await;
    let second = daemon.spawn(None).await;
    daemon.wait_status(&first, "ready", READY_WITHIN).await;
    daemon.wait_status(&second, "ready", READY_WITHIN).await;
    assert!(outages(&daemon).await.is_empty());

    // Stop the engine as `systemctl stop docker` does. Live restore is off:
    // it stops both containers (httpd as PID 1 ignores SIGTERM, so SIGKILL
    // after their 10 s stop timeout) and exits.
    let stopped_at = now_ms();
    let status = engine.stop();
    assert!(status.success(), "dockerd exited with {status}:\n{}", engine.log_tail(30));

    wait_for("/healthz to answer 503 with the engine down", RECOVERY_WITHIN, || async {
        healthz_status(&daemon).await == Some(503)
    })
    .await;
    wait_for("an open docker_outages row", RECOVERY_WITHIN, || async {
        outages(&daemon).await.iter().any(|o| o["ended_at_ms"].is_null())
    })
    .await;

    let restarting_at = now_ms();
    engine.start_again();

    wait_for("/healthz to answer 200 again", RECOVERY_WITHIN, || async {
        healthz_status(&daemon).await == Some(200)
    })
    .await;
    wait_for("the outage to be closed", RECOVERY_WITHIN, || async {
        outages(&daemon).await.iter().all(|o| !o["ended_at_ms"].is_null())
    })
    .await;
    let journal = outages(&daemon).await;
    assert_eq!(journal.len(), 1, "one engine stop, one outage: {journal:?}");
    let outage = &journal[0];
    let started = outage["started_at_ms"].as_i64().unwrap();
    let ended = outage["ended_at_ms"].as_i64().unwrap();
    assert!(started >= stopped_at, "outage began at {started}, before the stop at {stopped_at}");
    assert!(ended >= restarting_at, "outage ended at {ended}, before the engine was started again at {restarting_at}");
    assert_eq!(outage["noticed_by"], "event-stream", "{outage}");
    assert!(
        outage["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "the outage says what broke: {outage}"
    );

    // Both exits are recorded, each exactly once, with the code the engine
    // gives a container it stopped: 137 (SIGKILL after the stop timeout).
    for id in [&first, &second] {
        let done = daemon.wait_status(id, "terminated", RECOVERY_WITHIN).await;
        assert_eq!(done["exit_code"], 137, "{done}");
        assert_eq!(done["state"]["last_status"], "ready", "{done}");
        assert_eq!(done["state"]["reason"], Value::Null, "nobody asked for this exit: {done}");
        assert_eq!(
            daemon.statuses(id).await,
            ["scheduled", "loading", "starting", "waiting", "ready", "terminated"]
        );
        let terminated = terminated_events(&daemon, id).await;
        assert_eq!(terminated.len(), 1, "{terminated:?}");
        assert_eq!(terminated[0]["exit_code"], 137);
        // During its shutdown the engine still streams the `die` events to
        // connections already open; an exit it did not stream is read with
        // inspect after the restart. Either way, once.
        let source = terminated[0]["source"].as_str().unwrap();
        assert!(["docker-event", "inspect"].contains(&source), "{terminated:?}");
        let died_at = terminated[0]["timestamp_ms"].as_i64().unwrap();
        assert!(
            died_at >= stopped_at && died_at <= restarting_at,
            "the exit is stamped with the container's own end ({died_at}), between the stop ({stopped_at}) and the restart ({restarting_at})"
        );
    }

    // The event stream works on the restarted engine: a new backend gets
    // ready, and its `die` after `docker kill` comes through the stream
    // (with no periodic resync, nothing else would report it).
    let third = daemon.spawn(None).await;
    daemon.wait_status(&third, "ready", READY_WITHIN).await;
    let container = format!("plane-{third}");
    engine.docker(&["kill", &container]);
    let done = daemon.wait_status(&third, "terminated", READY_WITHIN).await;
    assert_eq!(done["exit_code"], 137, "{done}");
    let terminated = terminated_events(&daemon, &third).await;
    assert_eq!(terminated.len(), 1, "{terminated:?}");
    assert_eq!(terminated[0]["source"], "docker-event", "{terminated:?}");
    assert_eq!(outages(&daemon).await.len(), 1, "no further outage");
    assert_eq!(healthz_status(&daemon).await, Some(200));
}

/// Sends `signal` to the daemon's process.
fn signal_daemon(daemon: &Daemon, signal: i32) {
    let pid = daemon.child.as_ref().expect("daemon running").id();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_from_an_engine_crash_keep_their_codes_even_for_a_container_removed_before_drover_looked() {
    let mut engine = PrivateEngine::start();
    let daemon = Daemon::start_with(DaemonConfig {
        resync_interval: "1h",
        env: vec![("DOCKER_HOST".to_string(), engine.host())],
        ..DaemonConfig::default()
    })
    .await;
    let removed = daemon.spawn(None).await;
    let kept = daemon.spawn(None).await;
    daemon.wait_status(&removed, "ready", READY_WITHIN).await;
    daemon.wait_status(&kept, "ready", READY_WITHIN).await;

    // The engine crashes; its containers run on without it.
    let crashed_at = now_ms();
    engine.kill();
    wait_for("/healthz to answer 503 with the engine down", RECOVERY_WITHIN, || async {
        healthz_status(&daemon).await == Some(503)
    })
    .await;
    wait_for("an open docker_outages row", RECOVERY_WITHIN, || async {
        outages(&daemon).await.iter().any(|o| o["ended_at_ms"].is_null())
    })
    .await;

    // Drover is frozen while the engine comes back, so it cannot look before
    // one of the containers is removed: what it learns afterwards comes from
    // the events the engine kept (`since` the last one drover saw).
    signal_daemon(&daemon, libc::SIGSTOP);
    let restarting_at = now_ms();
    // With live restore off, the restarted engine stops the orphaned
    // containers before it serves: SIGTERM, ignored by httpd, then SIGKILL.
    engine.start_again();
    let removed_container = format!("plane-{removed}");
    assert!(
        engine.docker(&["inspect", "--format", "{{.State.Status}}", &removed_container]) == "exited",
        "the restarted engine stopped the orphaned container"
    );
    engine.docker(&["rm", &removed_container]);
    signal_daemon(&daemon, libc::SIGCONT);

    wait_for("/healthz to answer 200 again", RECOVERY_WITHIN, || async {
        healthz_status(&daemon).await == Some(200)
    })
    .await;
    wait_for("the outage to be closed", RECOVERY_WITHIN, || async {
        outages(&daemon).await.iter().all(|o| !o["ended_at_ms"].is_null())
    })
    .await;
    let journal = outages(&daemon).await;
    assert_eq!(journal.len(), 1, "one crash, one outage: {journal:?}");
    let started = journal[0]["started_at_ms"].as_i64().unwrap();
    let ended = journal[0]["ended_at_ms"].as_i64().unwrap();
    assert!(started >= crashed_at && ended >= restarting_at, "{journal:?}");
    assert_eq!(journal[0]["noticed_by"], "event-stream", "{journal:?}");

    // The removed container's exit code is known only from its `die` event,
    // replayed when the stream was re-opened.
    let done = daemon.wait_status(&removed, "terminated", RECOVERY_WITHIN).await;
    let terminated = terminated_events(&daemon, &removed).await;
    assert_eq!(terminated.len(), 1, "{terminated:?}");
    assert_eq!(done["exit_code"], 137, "{done}\n{terminated:?}");
    assert_eq!(terminated[0]["source"], "docker-event", "{terminated:?}");
    assert_eq!(done["state"]["reason"], Value::Null, "{done}");
    let died_at = terminated[0]["timestamp_ms"].as_i64().unwrap();
    assert!(died_at >= restarting_at, "stamped with the engine's time of the exit: {died_at} < {restarting_at}");

    let done = daemon.wait_status(&kept, "terminated", RECOVERY_WITHIN).await;
    assert_eq!(done["exit_code"], 137, "{done}");
    let terminated = terminated_events(&daemon, &kept).await;
    assert_eq!(terminated.len(), 1, "{terminated:?}");
    for id in [&removed, &kept] {
        assert_eq!(
            daemon.statuses(id).await,
            ["scheduled", "loading", "starting", "waiting", "ready", "terminated"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_left_open_by_a_killed_drover_is_closed_at_its_next_start_and_later_outages_are_journaled_too() {
    let mut engine = PrivateEngine::start();
    let mut daemon = Daemon::start_with(DaemonConfig {
        resync_interval: "1h",
        env: vec![("DOCKER_HOST".to_string(), engine.host())],
        ..DaemonConfig::default()
    })
    .await;
    engine.stop();
    wait_for("an open docker_outages row", RECOVERY_WITHIN, || async {
        outages(&daemon).await.iter().any(|o| o["ended_at_ms"].is_null())
    })
    .await;

    // Drover dies during the outage; the engine comes back while it is down.
    daemon.kill9();
    engine.start_again();
    let relaunched_at = now_ms();
    daemon.launch().await;
    wait_for("the outage to be closed by the next start", RECOVERY_WITHIN, || async {
        outages(&daemon).await.iter().all(|o| !o["ended_at_ms"].is_null())
    })
    .await;
    let journal = outages(&daemon).await;
    assert_eq!(journal.len(), 1, "{journal:?}");
    let ended = journal[0]["ended_at_ms"].as_i64().unwrap();
    assert!(ended >= relaunched_at, "closed when drover found the engine again: {journal:?}");

    // The next outage gets a row of its own, opened and closed.
    engine.stop();
    wait_for("a second, open outage", RECOVERY_WITHIN, || async {
        let journal = outages(&daemon).await;
        journal.len() == 2 && journal[1]["ended_at_ms"].is_null()
    })
    .await;
    assert_eq!(healthz_status(&daemon).await, Some(503));
    engine.start_again();
    wait_for("the second outage to be closed", RECOVERY_WITHIN, || async {
        outages(&daemon).await.iter().all(|o| !o["ended_at_ms"].is_null())
    })
    .await;
    wait_for("/healthz to answer 200 again", RECOVERY_WITHIN, || async {
        healthz_status(&daemon).await == Some(200)
    })
    .await;
    let journal = outages(&daemon).await;
    assert_eq!(journal.len(), 2, "{journal:?}");
    assert_eq!(journal[1]["noticed_by"], "event-stream", "{journal:?}");
}
