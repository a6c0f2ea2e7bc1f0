//! The normal life of a backend and each way it ends, through the HTTP API.

use crate::support::*;
use std::time::Duration;

const READY_WITHIN: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_lives_scheduled_to_terminated_with_exact_history() {
    let daemon = Daemon::start().await;
    let id = daemon.spawn(None).await;
    let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;
    let address = ready["address"].as_str().unwrap().to_string();
    let page = reqwest::get(format!("http://{address}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page, "hello from drover-test\n");

    assert_eq!(daemon.terminate(&id, false).await, 202);
    let done = daemon.wait_status(&id, "terminated", READY_WITHIN).await;
    // httpd as PID 1 ignores SIGTERM: the grace period ends in SIGKILL.
    assert_eq!(done["exit_code"], 137);
    assert_eq!(
        daemon.statuses(&id).await,
        [
            "scheduled",
            "loading",
            "starting",
            "waiting",
            "ready",
            "terminating",
            "terminated"
        ]
    );
    let last = daemon.events(&id).await.pop().unwrap();
    assert_eq!(last["state"]["termination"], "soft");
    assert_eq!(last["state"]["reason"], "external");
    assert_eq!(last["state"]["last_status"], "ready");
}

/// The backend's row in the database, as JSON (the columns tests look at).
async fn row(daemon: &Daemon, id: &str) -> serde_json::Value {
    query_json(
        &daemon.db_path(),
        &format!(
            "SELECT status, desired, exit_code, termination_kind, termination_reason, \
             last_signal, kill_deadline_ms FROM backends WHERE id = '{id}'"
        ),
    )
    .await
    .pop()
    .unwrap_or_else(|| panic!("no row for {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_terminate_of_a_process_ignoring_sigterm_ends_in_sigkill_after_the_grace_period() {
    let daemon = Daemon::start_with(DaemonConfig {
        soft_terminate_grace: "1s",
        ..DaemonConfig::default()
    })
    .await;
    // The image's httpd runs as PID 1 and ignores SIGTERM.
    let id = daemon.spawn(None).await;
    daemon.wait_status(&id, "ready", READY_WITHIN).await;

    assert_eq!(daemon.terminate(&id, false).await, 202);
    let done = daemon.wait_status(&id, "terminated", READY_WITHIN).await;

    assert_eq!(done["exit_code"], 137);
    assert_eq!(done["state"]["termination"], "soft");
    assert_eq!(done["state"]["reason"], "external");
    let statuses = daemon.statuses(&id).await;
    assert_eq!(
        statuses,
        [
            "scheduled",
            "loading",
            "starting",
            "waiting",
            "ready",
            "terminating",
            "terminated"
        ],
        "the SIGKILL ending a soft termination is no hard termination"
    );
    let db = row(&daemon, &id).await;
    assert_eq!(db["last_signal"], "SIGKILL");
    // The container died no earlier than the end of its grace period.
    let kill_deadline = db["kill_deadline_ms"].as_i64().unwrap();
    let died_at = query_json(
        &daemon.db_path(),
        &format!("SELECT timestamp_ms FROM backend_events WHERE backend_id = '{id}' AND status = 'terminated'"),
    )
    .await[0]["timestamp_ms"]
        .as_i64()
        .unwrap();
    assert!(
        died_at >= kill_deadline,
        "died at {died_at}, before the kill deadline {kill_deadline}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_terminate_of_a_process_that_exits_on_sigterm_gives_its_own_exit_code() {
    let daemon = Daemon::start_with(DaemonConfig {
        soft_terminate_grace: "20s",
        ..DaemonConfig::default()
    })
    .await;
    // httpd without -f daemonizes, so the shell stays PID 1 with its trap.
    let id = daemon
        .spawn(Some(&[
            "sh",
            "-c",
            "trap 'exit 42' TERM; httpd -p $PORT -h /www; while true; do sleep 0.1; done",
        ]))
        .await;
    let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;
    let address = ready["address"].as_str().unwrap();
    let page = reqwest::get(format!("http://{address}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page, "hello from drover-test\n");

    assert_eq!(daemon.terminate(&id, false).await, 202);
    let done = daemon.wait_status(&id, "terminated", READY_WITHIN).await;

    assert_eq!(done["exit_code"], 42);
    assert_eq!(done["state"]["exit_code"], 42);
    assert_eq!(done["state"]["termination"], "soft");
    assert_eq!(done["state"]["reason"], "external");
    assert_eq!(
        daemon.statuses(&id).await,
        [
            "scheduled",
            "loading",
            "starting",
            "waiting",
            "ready",
            "terminating",
            "terminated"
        ]
    );
    assert_eq!(
        row(&daemon, &id).await["last_signal"],
        "SIGTERM",
        "no SIGKILL was needed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_terminate_kills_at_once_and_records_a_hard_termination() {
    // A long grace: only a SIGKILL sent at once ends this test in time.
    let daemon = Daemon::start_with(DaemonConfig {
        soft_terminate_grace: "60s",
        ..DaemonConfig::default()
    })
    .await;
    let id = daemon.spawn(None).await;
    daemon.wait_status(&id, "ready", READY_WITHIN).await;

    assert_eq!(daemon.terminate(&id, true).await, 202);
    let done = daemon.wait_status(&id, "terminated", READY_WITHIN).await;

    assert_eq!(done["exit_code"], 137);
    assert_eq!(done["desired"], "terminated");
    assert_eq!(
        done["state"],
        serde_json::json!({
            "status": "terminated",
            "last_status": "ready",
            "termination": "hard",
            "reason": "external",
            "exit_code": 137
        })
    );
    assert_eq!(
        daemon.statuses(&id).await,
        [
            "scheduled",
            "loading",
            "starting",
            "waiting",
            "ready",
            "hard-terminating",
            "terminated"
        ]
    );
    let events = daemon.events(&id).await;
    assert_eq!(
        events[5]["state"],
        serde_json::json!({"status": "hard-terminating", "last_status": "ready", "reason": "external"})
    );
    let db = row(&daemon, &id).await;
    assert_eq!(db["termination_kind"], "hard");
    assert_eq!(db["last_signal"], "SIGKILL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_exits_by_itself_with_code_3_is_recorded_as_3_with_no_reason() {
    let daemon = Daemon::start().await;
    // One exits once ready and told to (a file appears), one at once.
    let after_ready = daemon
        .spawn(Some(&[
            "sh",
            "-c",
            "httpd -p $PORT -h /www; while [ ! -e /tmp/stop ]; do sleep 0.1; done; exit 3",
        ]))
        .await;
    let at_once = daemon.spawn(Some(&["sh", "-c", "exit 3"])).await;
    let ready = daemon
        .wait_status(&after_ready, "ready", READY_WITHIN)
        .await;
    docker(&[
        "exec",
        ready["container_id"].as_str().unwrap(),
        "touch",
        "/tmp/stop",
    ]);

    for id in [&after_ready, &at_once] {
        let done = daemon.wait_status(id, "terminated", READY_WITHIN).await;
        assert_eq!(done["exit_code"], 3, "{done}");
        assert_eq!(done["state"]["exit_code"], 3, "{done}");
        assert_eq!(
            done["state"]["termination"],
            serde_json::Value::Null,
            "{done}"
        );
        assert_eq!(done["state"]["reason"], serde_json::Value::Null, "{done}");
        assert_eq!(
            done["desired"], "running",
            "nobody asked for it to end: {done}"
        );
        let events = daemon.events(id).await;
        let last = events.last().unwrap();
        assert_eq!(last["exit_code"], 3);
        assert!(
            ["docker-event", "inspect"].contains(&last["source"].as_str().unwrap()),
            "the code comes from Docker: {last}"
        );
    }
    assert_eq!(
        daemon.statuses(&after_ready).await,
        [
            "scheduled",
            "loading",
            "starting",
            "waiting",
            "ready",
            "terminated"
        ]
    );
    let last = daemon.events(&after_ready).await.pop().unwrap();
    assert_eq!(last["state"]["last_status"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_whose_server_never_listens_hits_the_startup_timeout() {
    let daemon = Daemon::start_with(DaemonConfig {
        startup_timeout: "2s",
        ..DaemonConfig::default()
    })
    .await;
    let id = daemon.spawn(Some(&["sleep", "1000"])).await;

    let done = daemon.wait_status(&id, "terminated", READY_WITHIN).await;

    assert_eq!(
        daemon.statuses(&id).await,
        [
            "scheduled",
            "loading",
            "starting",
            "waiting",
            "hard-terminating",
            "terminated"
        ]
    );
    let events = daemon.events(&id).await;
    assert_eq!(
        events[4]["state"],
        serde_json::json!({"status": "hard-terminating", "last_status": "waiting", "reason": "startuptimeout"})
    );
    assert_eq!(
        done["state"],
        serde_json::json!({
            "status": "terminated",
            "last_status": "waiting",
            "termination": "hard",
            "reason": "startuptimeout",
            "exit_code": 137
        })
    );
    assert_eq!(done["exit_code"], 137);
    assert_eq!(done["desired"], "terminated");
}

/// The case where the exit of a removed container cannot be known (no `die`
/// event seen) is decided by the planner (`RecordGone { exit: None }`, in its
/// unit tests) and recorded by the executor as reason `lost` with no exit
/// code; a real engine always reports the `die`, so it is not provoked here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_rm_f_of_a_ready_backend_is_noticed_with_the_exit_code_of_its_die_event() {
    let daemon = Daemon::start().await;
    let id = daemon.spawn(None).await;
    let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;

    docker(&["rm", "-f", ready["container_id"].as_str().unwrap()]);
    let done = daemon.wait_status(&id, "terminated", READY_WITHIN).await;

    assert_eq!(done["exit_code"], 137);
    assert_eq!(
        done["state"],
        serde_json::json!({
            "status": "terminated",
            "last_status": "ready",
            "termination": null,
            "reason": null,
            "exit_code": 137
        })
    );
    assert_eq!(
        daemon.statuses(&id).await,
        [
            "scheduled",
            "loading",
            "starting",
            "waiting",
            "ready",
            "terminated"
        ]
    );
    let last = daemon.events(&id).await.pop().unwrap();
    assert_eq!(last["source"], "docker-event");
    assert!(
        daemon.containers().is_empty(),
        "nothing was re-created: {:?}",
        daemon.containers()
    );
}
